"""Preference evaluations for interventions that move representations (RAHF adapters, steering vectors):
the preferred-vs-dispreferred log-likelihood margin on held-out pairs, the projection of response-token
states on a pattern direction, and paired bootstrap intervals of the change an intervention makes."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from repe.batching import batches, encode
from repe.datasets import load_facts
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
        dev = resp.device  # with a device_map the blocks' states sit on their blocks' devices
        proj = torch.stack(
            [
                (hs[L + 1].float() @ units[i].to(hs[L + 1].device)).to(dev)
                for i, L in enumerate(layers)
            ]
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


def text_logprobs(
    lm: LoadedModel, texts: Sequence[str], intervention: Any = None, batch_size: int = 16
) -> np.ndarray:
    """Per text (plain, no chat template), the mean log-probability of its tokens after the first."""
    enc = encode(lm.tokenizer, list(texts))
    if any(len(e.ids) < 2 for e in enc):
        raise ValueError("every text needs at least two tokens")
    out = np.zeros(len(enc))
    dev = lm.device
    for start, b in batches(enc, batch_size, lm.tokenizer.pad_token_id, "right"):
        with _scope(lm, intervention), torch.inference_mode():
            logits = lm.model(
                input_ids=b.input_ids.to(dev),
                attention_mask=b.attention_mask.to(dev),
                position_ids=b.position_ids.to(dev),
            ).logits.float()
        ids = b.input_ids.to(dev)
        real = b.attention_mask.to(dev).bool()
        pred = real[:, :-1] & real[:, 1:]
        lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        out[start : start + len(lp)] = ((lp * pred).sum(1) / pred.sum(1)).cpu().numpy()
    return out


def facts_auc(lm: LoadedModel, intervention: Any = None, *, n: int = 200, seed: int = 0) -> float:
    """A capability check: how well the model's own likelihood tells true from false statements —
    the AUC of the mean token log-probability over ``n`` RepE facts (half true, half false, seeded).
    0.5 is chance; a change that damages what the model knows pulls it toward 0.5."""
    facts = load_facts()
    rng = np.random.default_rng(seed)
    picked = []
    for label in (True, False):
        group = [f for f in facts if f.label == label]
        k = min(n // 2, len(group))
        picked += [group[i] for i in rng.choice(len(group), size=k, replace=False)]
    lp = text_logprobs(lm, [f.text for f in picked], intervention)
    labels = np.array([f.label for f in picked])
    pos, neg = lp[labels], lp[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))
