"""One mean difference and one Cohen's d for the whole workbench (``probes.contrast``): every reader and
report that prints either gives the same number for the same data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probes.contrast import cohens_d, mean_difference
from probes.readers import MeanDiff
from probes.separation import separation
from probes.sweep import sweep
from repe.activations import ActivationMeta, ActivationSet, Shard
from repe.models import LoadedModel, ModelIdentity


def test_cohens_d_is_the_textbook_pooled_estimate() -> None:
    # means 2 and 1, each sample variance 1 (ddof=1): pooled s = 1, d = 1
    assert cohens_d(np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.0, 2.0])) == pytest.approx(1.0)
    a, b = np.array([0.5, 2.0, 4.0, 7.5]), np.array([1.0, -1.0, 0.0])
    s2 = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
    assert cohens_d(a, b) == pytest.approx((a.mean() - b.mean()) / math.sqrt(s2))
    assert cohens_d(torch.tensor(a), torch.tensor(b)) == pytest.approx(cohens_d(a, b))


def test_cohens_d_refuses_too_few_scores() -> None:
    with pytest.raises(ValueError, match="Cohen's d"):
        cohens_d(np.array([1.0]), np.array([0.0]))


def test_mean_difference_plain_and_weighted() -> None:
    g = torch.Generator().manual_seed(0)
    P, N = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    assert torch.allclose(mean_difference(P, N), (P.double().mean(0) - N.double().mean(0)))
    w = torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0, 0.0])
    want = (P - N).double()[[0, 2, 2, 4]].mean(0)
    assert torch.allclose(mean_difference(P, N, w), want)
    with pytest.raises((ValueError, TypeError)):  # the shape check or the function's own error
        mean_difference(P, N, torch.ones(5))
    with pytest.raises(ValueError, match="not all zero"):
        mean_difference(P, N, torch.zeros(6))
    # the suite's shape check (jaxtyping, a TypeError) fires first; without it, the function's own
    # ValueError does: either way a mismatch never passes
    with pytest.raises((ValueError, TypeError)):
        mean_difference(P, N[:5])


SITE = "blocks.0.hook_resid_post"


def in_memory(identity: ModelIdentity, rows: torch.Tensor, fingerprint: str) -> ActivationSet:
    n = rows.shape[0]
    meta = ActivationMeta(identity, [SITE], "last", True, fingerprint, n, "hf", "left")
    return ActivationSet(meta, [Shard({SITE: rows}, torch.arange(n + 1))])


def sets(identity: ModelIdentity, n: int = 40, d: int = 8) -> tuple[ActivationSet, ActivationSet]:
    g = torch.Generator().manual_seed(1)
    shift = torch.zeros(d)
    shift[0] = 0.8
    base = torch.randn(n, d, generator=g)
    pos = base + shift + 0.7 * torch.randn(n, d, generator=g)
    neg = base + 0.7 * torch.randn(n, d, generator=g)
    return in_memory(identity, pos, "p"), in_memory(identity, neg, "p")


def test_sweep_and_separation_report_the_same_effect_size(tiny_lm: LoadedModel) -> None:
    """Before, the sweep divided by the population spread (ddof 0 over both samples) and the quick
    report by the sample spread of the concatenation (ddof 1): two numbers for one d."""
    pos, neg = sets(tiny_lm.identity)
    tr, te = list(range(28)), list(range(28, 40))
    site = SITE
    sep = separation(pos, neg, tr, te)[0]
    row = next(r for r in sweep(pos, neg, tr, te, ["mean_diff"], n_boot=0).scores if r.site == site)
    u = mean_difference(pos[site][tr].double(), neg[site][tr].double())
    u = u / u.norm()
    want = cohens_d(pos[site][te].double() @ u, neg[site][te].double() @ u)
    assert sep.cohens_d == pytest.approx(want, rel=1e-6)
    assert row.cohens_d == pytest.approx(want, rel=1e-6)


def test_the_mean_diff_reader_is_the_shared_mean_difference(tiny_lm: LoadedModel) -> None:
    pos, neg = sets(tiny_lm.identity)
    site = SITE
    P, N = pos[site], neg[site]
    r = MeanDiff().fit(P, N)
    want = mean_difference(P, N)
    cos = torch.nn.functional.cosine_similarity(r.direction_.double(), want, dim=0)
    assert float(cos) == pytest.approx(1.0, abs=1e-6)
