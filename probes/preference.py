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
    Response,
    aligned,
    check_layers,
    response_states,
)

__all__ = ["BAD_INSTRUCTION", "GOOD_INSTRUCTION", "ActivityPattern", "Response", "activity_pattern"]


@dataclass
class ActivityPattern:
    """Preferred minus dispreferred response-token states, per block."""

    layers: list[int]
    mean: torch.Tensor  # [L, d] mean per-token difference
    token_norm: torch.Tensor  # [L] mean norm of the per-token difference
    n_tokens: int

    def direction(self, lm: LoadedModel, name: str = "rahf_pattern") -> Direction:
        vectors = {
            f"blocks.{layer}.hook_resid_post": self.mean[i] for i, layer in enumerate(self.layers)
        }
        return Direction(
            vectors,
            lm.identity,
            name=name,
            method="rahf_pattern",
            params={"n_tokens": self.n_tokens},
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
    preferred: str | None = GOOD_INSTRUCTION,
    dispreferred: str | None = BAD_INSTRUCTION,
    batch_size: int = 8,
) -> ActivityPattern:
    """The pattern of ``items`` read under ``preferred`` vs ``dispreferred`` instructions."""
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
    return ActivityPattern(layers, total / n, norms / n, n)
