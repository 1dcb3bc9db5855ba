"""The two statistics every contrast reader shares, written once: the (weighted) mean difference of
paired activations and Cohen's d of two score samples.

``MeanDiff``, CAA (:mod:`probes.caa`), the cloze vector (:mod:`probes.cloze`), the quick separation
report (:mod:`probes.separation`) and the layer sweep all call these, so a mean difference or an effect
size means the same thing wherever the workbench prints one.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor


def mean_difference(
    pos: Float[Tensor, "n d"],
    neg: Float[Tensor, "n d"],
    weights: Float[Tensor, " n"] | None = None,
) -> Float[Tensor, " d"]:
    """``sum_i w_i (pos_i - neg_i)`` in float64, with ``w_i = 1/n`` unless ``weights`` are given.

    For paired rows this equals ``mean(pos) - mean(neg)``. ``weights`` (one per pair, non-negative,
    not all zero) are normalised to sum to 1 here."""
    if pos.shape != neg.shape:
        raise ValueError(
            f"the two sides must have the same shape; got {tuple(pos.shape)} and {tuple(neg.shape)}"
        )
    if pos.shape[0] == 0:
        raise ValueError("the mean difference needs at least one pair; got none")
    diff = pos.double() - neg.double()
    if weights is None:
        return diff.mean(dim=0)
    w = torch.as_tensor(weights, dtype=torch.float64, device=diff.device)
    if w.shape != (pos.shape[0],):
        raise ValueError(
            f"weights must have one value per pair ({pos.shape[0]}); got {tuple(w.shape)}"
        )
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0.0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return torch.tensordot(w / w.sum(), diff, dims=1)


def cohens_d(pos_scores: np.ndarray | Tensor, neg_scores: np.ndarray | Tensor) -> float:
    """Cohen's d of two score samples: ``(mean_pos - mean_neg) / s_pooled`` with the textbook pooled
    standard deviation ``s_pooled = sqrt(((n1-1) s1^2 + (n2-1) s2^2) / (n1 + n2 - 2))`` (each ``s^2``
    the unbiased sample variance). Needs at least two scores in all; a zero spread counts as 1e-12."""
    a = np.asarray(pos_scores.detach().cpu() if isinstance(pos_scores, Tensor) else pos_scores)
    b = np.asarray(neg_scores.detach().cpu() if isinstance(neg_scores, Tensor) else neg_scores)
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if a.size == 0 or b.size == 0 or a.size + b.size < 3:
        raise ValueError(
            f"Cohen's d needs a score on each side and at least 3 in all; got {a.size} and {b.size}"
        )
    ss = float(((a - a.mean()) ** 2).sum() + ((b - b.mean()) ** 2).sum())
    pooled = (ss / (a.size + b.size - 2)) ** 0.5
    return float((a.mean() - b.mean()) / max(pooled, 1e-12))
