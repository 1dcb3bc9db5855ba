"""Preference evaluations for interventions that move representations (RAHF adapters, steering vectors):
the preferred-vs-dispreferred log-likelihood margin on held-out pairs, the projection of response-token
states on a pattern direction, and paired bootstrap intervals of the change an intervention makes."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from repe.datasets.preference import PreferencePair
from repe.directions import Direction
from repe.models import LoadedModel
from repe.responses import Response, batch_inputs
from repe.sites import parse_site
from steering.hooks import steer


def _scope(lm: LoadedModel, intervention: Any) -> Any:
    return steer(lm, intervention) if intervention is not None else contextlib.nullcontext()


def response_logprobs(
    lm: LoadedModel,
    items: Sequence[Response],
    intervention: Any = None,
    *,
    instruction: str | None = None,
    batch_size: int = 8,
) -> np.ndarray:
    """Per item, the summed log-probability of its response tokens given its prompt."""
    out: list[float] = []
    for s in range(0, len(items), batch_size):
        inputs, resp = batch_inputs(lm, items[s : s + batch_size], instruction)
        with _scope(lm, intervention), torch.inference_mode():
            logits = lm.model(**inputs).logits.float()
        lp = logits[:, :-1].log_softmax(-1)
        tok = lp.gather(-1, inputs["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
        out += (tok * resp[:, 1:]).sum(1).tolist()
    return np.array(out)


def preference_margins(
    lm: LoadedModel, pairs: Sequence[PreferencePair], intervention: Any = None, batch_size: int = 8
) -> np.ndarray:
    """Per pair with a chosen answer: log p(chosen | prompt) - log p(rejected | prompt)."""
    full = [p for p in pairs if p.chosen is not None]
    if not full:
        raise ValueError("margins need pairs with a chosen answer")
    chosen = [Response(p.prompt, p.chosen) for p in full if p.chosen is not None]
    rejected = [Response(p.prompt, p.rejected) for p in full]
    a = response_logprobs(lm, chosen, intervention, batch_size=batch_size)
    b = response_logprobs(lm, rejected, intervention, batch_size=batch_size)
    return a - b


def pattern_projections(
    lm: LoadedModel,
    items: Sequence[Response],
    direction: Direction,
    intervention: Any = None,
    batch_size: int = 8,
) -> np.ndarray:
    """Per item, the mean over its response tokens and the direction's residual sites of ``h . unit``."""
    sites = direction.sites
    parsed = [parse_site(s) for s in sites]
    bad = [
        s
        for s, p in zip(sites, parsed, strict=True)
        if p.kind != "resid_post" or p.layer >= lm.n_layers - 1
    ]
    if bad:
        raise ValueError(
            f"projections read residual outputs of blocks 0..{lm.n_layers - 2}; not {bad}"
        )
    layers = [p.layer for p in parsed]
    units = torch.stack(
        [direction.vectors[s].float() / direction.vectors[s].float().norm() for s in sites]
    )
    out: list[float] = []
    for s in range(0, len(items), batch_size):
        inputs, resp = batch_inputs(lm, items[s : s + batch_size], None)
        with _scope(lm, intervention), torch.inference_mode():
            hs = lm.backbone(**inputs, output_hidden_states=True, use_cache=False).hidden_states
        proj = torch.stack(
            [hs[L + 1].float() @ units[i].to(hs[0].device) for i, L in enumerate(layers)]
        ).mean(0)  # [B, T]
        out += ((proj * resp).sum(1) / resp.sum(1)).tolist()
    return np.array(out)


def paired_change(
    before: np.ndarray, after: np.ndarray, n: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``after - before`` with a 95% percentile bootstrap interval over items."""
    d = np.asarray(after, float) - np.asarray(before, float)
    if d.size == 0:
        raise ValueError("no items")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n, d.size))].mean(1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
