"""The cost of steering: how far it moves the model on neutral text — mean ``KL(base || steered)`` of the
next-token distributions over every real token (:func:`kl_from_base`) and the perplexity
(:func:`perplexity`). :class:`NeutralCosts` computes the unsteered side once for a whole sweep.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from repe.batching import TokenBatch, batches, encode
from repe.datasets import load_neutral
from repe.models import LoadedModel
from steering.evaluation.ab import _begin
from steering.hooks import steer
from steering.spec import SteeringSpec


# ---- the cost: KL and perplexity on neutral text -----------------------------------------------
def neutral_spec(spec: Any) -> Any:
    """The spec as applied to neutral text: text stands in for the steered part of a conversation, so
    ``positions`` ``"assistant"``, ``"generated"`` and ``"prompt"`` steer every token (``"all"``).
    Other interventions (an adapter acts at every token) pass unchanged."""
    if (
        isinstance(spec, SteeringSpec)
        and isinstance(spec.positions, str)
        and spec.positions != "all"
    ):
        return replace(spec, positions="all")
    return spec


@dataclass
class NeutralCosts:
    """The cost of steering on neutral texts (default: ``repe.datasets.load_neutral()``).

    The unsteered log-probabilities are computed once (``n_tokens x vocab`` floats) and reused, so a
    sweep pays one steered forward per setting. Every real token counts: KL is averaged over all of them,
    perplexity over every token that has a predecessor.
    """

    lm: LoadedModel
    texts: Sequence[str] | None = None
    batch_size: int = 16
    _batches: list[TokenBatch] = field(default_factory=list, init=False, repr=False)
    _base: list[torch.Tensor] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size!r}")
        texts = list(self.texts) if self.texts is not None else load_neutral()
        enc = encode(self.lm.tokenizer, texts)
        if not any(len(e.ids) > 1 for e in enc):
            raise ValueError("texts: every text is a single token; perplexity needs at least two")
        pad = self.lm.tokenizer.pad_token_id
        self._batches = [b for _, b in batches(enc, self.batch_size, pad, "left")]

    @property
    def batches(self) -> list[TokenBatch]:
        """The neutral texts' token batches (left-padded), in the order :meth:`base` follows."""
        return self._batches

    @property
    def n_tokens(self) -> int:
        return sum(b.n_tokens for b in self._batches)

    def _logprobs(self, batch: TokenBatch, spec: Any) -> torch.Tensor:
        """``[B, T, V]`` float32 log-probabilities."""
        dev = self.lm.device
        ctx = steer(self.lm, neutral_spec(spec)) if spec is not None else contextlib.nullcontext()
        with ctx as state, torch.inference_mode():
            _begin(state, batch)
            logits = self.lm.model(
                input_ids=batch.input_ids.to(dev),
                attention_mask=batch.attention_mask.to(dev),
                position_ids=batch.position_ids.to(dev),
            ).logits
        return logits.float().log_softmax(-1)

    def base(self) -> list[torch.Tensor]:
        if self._base is None:
            self._base = [self._logprobs(b, None) for b in self._batches]
        return self._base

    def measure(self, spec: Any) -> tuple[float, float]:
        """(mean KL(base || steered) per real token, perplexity) under ``spec`` (None = unsteered)."""
        base = self.base()
        kl_sum, kl_n, nll_sum, nll_n = 0.0, 0, 0.0, 0
        for b, lp_base in zip(self._batches, base, strict=True):
            lp = lp_base if spec is None else self._logprobs(b, spec)
            real = b.attention_mask.to(lp.device).bool()
            kl = (lp_base.exp() * (lp_base - lp)).sum(-1)  # [B, T]
            kl_sum += float(kl[real].double().sum())
            kl_n += int(real.sum())
            s, n = _nll(lp, b)
            nll_sum, nll_n = nll_sum + s, nll_n + n
        return kl_sum / kl_n, math.exp(nll_sum / nll_n)

    def kl(self, spec: Any) -> float:
        """Mean ``KL(base || steered)`` per real token."""
        return self.measure(spec)[0]

    def perplexity(self, spec: Any = None) -> float:
        """Perplexity under ``spec`` (None = unsteered); needs no unsteered pass when steered."""
        nll_sum, nll_n = 0.0, 0
        for i, b in enumerate(self._batches):
            lp = (
                self._base[i]
                if self._base is not None and spec is None
                else self._logprobs(b, spec)
            )
            s, n = _nll(lp, b)
            nll_sum, nll_n = nll_sum + s, nll_n + n
        return math.exp(nll_sum / nll_n)


def _nll(lp: torch.Tensor, b: TokenBatch) -> tuple[float, int]:
    """Sum and count of next-token NLLs over every real token that has a real predecessor."""
    real = b.attention_mask.to(lp.device).bool()
    pred = real[:, :-1] & real[:, 1:]
    ids = b.input_ids.to(lp.device)
    nll = -lp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return float(nll[pred].double().sum()), int(pred.sum())


def kl_from_base(
    lm: LoadedModel,
    spec: SteeringSpec,
    texts: Sequence[str] | None = None,
    *,
    batch_size: int = 16,
) -> float:
    """Mean ``KL(base || steered)`` (nats) of the next-token distributions over every real token of
    neutral text (default: ``repe.datasets.load_neutral()``). 0 for a spec that changes nothing."""
    return NeutralCosts(lm, texts, batch_size).kl(spec)


def perplexity(
    lm: LoadedModel,
    texts: Sequence[str] | None = None,
    spec: SteeringSpec | None = None,
    *,
    batch_size: int = 16,
) -> float:
    """Perplexity on neutral text (default: ``repe.datasets.load_neutral()``): ``exp`` of the mean
    next-token NLL over every token that has a predecessor (pooled over texts), under ``spec`` if given."""
    return NeutralCosts(lm, texts, batch_size).perplexity(spec)
