"""Preference activity patterns (RAHF): how the hidden states of the *same response* differ when the model
reads it under a preferred and a dispreferred condition.

``repe.responses.response_states`` reads the residual stream after chosen blocks on the response tokens
only (the assistant turn), flattened in row order; ``activity_pattern`` is the per-token difference
preferred minus dispreferred, summarised per block (mean difference, its norm, the mean per-token norm)
and as a :class:`repe.directions.Direction` that sweeps and scores like any reader's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from repe.directions import Direction
from repe.models import LoadedModel
from repe.responses import (
    BAD_INSTRUCTION,
    GOOD_INSTRUCTION,
    Condition,
    CondLike,
    Response,
    aligned,
    as_condition,
    check_layers,
    response_states,
)

__all__ = [
    "BAD_INSTRUCTION",
    "GOOD_INSTRUCTION",
    "ActivityPattern",
    "Condition",
    "Response",
    "activity_pattern",
    "pooled_pattern",
]


@dataclass
class ActivityPattern:
    """Preferred minus dispreferred response-token states, per block."""

    layers: list[int]
    mean: torch.Tensor  # [L, d] mean per-token difference
    token_norm: torch.Tensor  # [L] mean norm of the per-token difference
    n_tokens: int
    kind: str = "token"  # "token": aligned per-token differences; "pooled": difference of means
    conditions: tuple[str, str] = ("", "")

    def direction(self, lm: LoadedModel, name: str = "rahf_pattern") -> Direction:
        vectors = {
            f"blocks.{layer}.hook_resid_post": self.mean[i] for i, layer in enumerate(self.layers)
        }
        return Direction(
            vectors,
            lm.identity,
            name=name,
            method="rahf_pattern",
            params={
                "n_tokens": self.n_tokens,
                "kind": self.kind,
                "preferred": self.conditions[0],
                "dispreferred": self.conditions[1],
            },
            normalisation="raw",
            stats={
                f"blocks.{layer}.hook_resid_post": {
                    "mean_diff_norm": float(self.mean[i].norm()),
                    "token_diff_norm": float(self.token_norm[i]),
                }
                for i, layer in enumerate(self.layers)
            },
        )


def activity_pattern(
    lm: LoadedModel,
    items: Sequence[Response],
    layers: Sequence[int],
    preferred: CondLike = GOOD_INSTRUCTION,
    dispreferred: CondLike = BAD_INSTRUCTION,
    batch_size: int = 8,
) -> ActivityPattern:
    """The pattern of ``items`` read under a ``preferred`` vs a ``dispreferred`` condition: two
    instructions (SCIT-style; None is the model's default, so ``(value_instruction, None)`` is a
    VILMO-style value-instruction contrast), or two settings or models (:class:`Condition`)."""
    if not items:
        raise ValueError("no items to read a pattern from")
    layers = check_layers(lm, layers)
    total: torch.Tensor | None = None
    norms: torch.Tensor | None = None
    n = 0
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        pos = response_states(lm, chunk, layers, preferred)
        neg = response_states(lm, chunk, layers, dispreferred)
        aligned(pos, neg)
        diff = pos - neg
        total = diff.sum(1) if total is None else total + diff.sum(1)
        tn = diff.norm(dim=-1).sum(1)
        norms = tn if norms is None else norms + tn
        n += diff.shape[1]
    assert total is not None and norms is not None
    names = (as_condition(preferred).describe(), as_condition(dispreferred).describe())
    return ActivityPattern(layers, total / n, norms / n, n, "token", names)


def _token_sum(
    lm: LoadedModel,
    items: Sequence[Response],
    layers: list[int],
    condition: CondLike,
    batch_size: int,
) -> tuple[torch.Tensor, int]:
    total, n = torch.zeros(len(layers), lm.d_model), 0
    for s in range(0, len(items), batch_size):
        h = response_states(lm, items[s : s + batch_size], layers, condition)
        total += h.sum(1).cpu()
        n += h.shape[1]
    return total, n


def pooled_pattern(
    lm: LoadedModel,
    preferred: Sequence[Response],
    dispreferred: Sequence[Response],
    layers: Sequence[int],
    condition: CondLike = None,
    batch_size: int = 8,
) -> ActivityPattern:
    """The mean response-token state of the ``preferred`` responses minus that of the ``dispreferred``
    ones, both read under ``condition``: for responses that differ, so tokens do not line up. D2O-style
    negative-only data gives the model's own answers as ``preferred`` and the human-dispreferred
    answers to the same prompts as ``dispreferred``. ``token_norm`` is the norm of the mean difference."""
    if not preferred or not dispreferred:
        raise ValueError("a pooled pattern needs preferred and dispreferred responses")
    layers = check_layers(lm, layers)
    a, na = _token_sum(lm, preferred, layers, condition, batch_size)
    b, nb = _token_sum(lm, dispreferred, layers, condition, batch_size)
    mean = a / na - b / nb
    return ActivityPattern(
        layers, mean, mean.norm(dim=-1), na + nb, "pooled", ("preferred", "dispreferred")
    )
