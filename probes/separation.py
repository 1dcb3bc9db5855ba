"""A quick per-site separation report for a contrast dataset (what the quickstart prints).

For each site: the mean-difference direction of the training pairs, then on held-out pairs the fraction
whose positive side projects higher than its negative side (pair accuracy, chance = 0.5) and the
standardised gap between the two sides' projections (Cohen's d). The full readers live in ``probes``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probes.contrast import cohens_d, mean_difference
from repe.activations import ActivationSet


@dataclass(frozen=True)
class SiteSeparation:
    site: str
    pair_accuracy: float
    cohens_d: float


def separation(
    pos: ActivationSet, neg: ActivationSet, train_idx: list[int], test_idx: list[int]
) -> list[SiteSeparation]:
    """Per-site separation of paired activation sets (same sites, same order of pairs)."""
    if pos.sites != neg.sites or len(pos) != len(neg):
        raise ValueError("positive and negative activation sets must have the same sites and sizes")
    if not train_idx or not test_idx:
        raise ValueError("need at least one training and one held-out pair")
    out = []
    tr, te = torch.tensor(train_idx), torch.tensor(test_idx)
    for site in pos.sites:
        p, n = pos[site].double().flatten(1), neg[site].double().flatten(1)
        direction = mean_difference(p[tr], n[tr])
        direction = direction / direction.norm().clamp(min=1e-12)
        sp, sn = p[te] @ direction, n[te] @ direction
        acc = (sp > sn).double().mean().item()
        out.append(SiteSeparation(site, acc, cohens_d(sp, sn)))
    return out


def format_table(rows: list[SiteSeparation]) -> str:
    best = max(rows, key=lambda r: (r.pair_accuracy, r.cohens_d))
    lines = [f"{'site':28s} {'pair acc':>8s} {'d':>7s}  "]
    for r in rows:
        bar = "#" * int(round(20 * max(0.0, r.pair_accuracy - 0.5) * 2))
        mark = "  <- best" if r is best else ""
        lines.append(f"{r.site:28s} {r.pair_accuracy:8.3f} {r.cohens_d:7.2f}  {bar}{mark}")
    return "\n".join(lines)
