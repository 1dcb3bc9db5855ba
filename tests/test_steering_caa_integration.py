"""CAA steering on the embedded SmolLM2-135M-Instruct: vectors from training pairs move the held-out
A/B answers monotonically with the coefficient.

Per behaviour: a CAA vector from 64 training pairs (letter-balanced mean difference at the answer
letter), then the held-out matching probability, on items with as many A- as B-matching answers, must
rise strictly over the coefficients at block 9. Block 9 is where a sweep (±0.1 relative, blocks
3/6/.../21, 48 letter-balanced held-out items, every token steered) moved these behaviours most
consistently toward the behaviour (+0.024 to +0.029); :func:`test_sweep_on_the_real_model` runs a
smaller sweep here and prints it. The numbers are printed (run with ``-s``) for the report.

What this test is and is not: it pins, on one fixed sample of 32 held-out items, that steering moves
the score the way the coefficient says and that the pipeline (CAA vector, balanced items, A/B scoring,
KL) runs end to end on the real model; a regression in any part of it changes these numbers. It is
not evidence of a robust behavioural effect: on larger held-out samples (72-96 items) the shifts at
+-0.1 are about +-0.01 with paired standard errors of the same size for refusal and
coordinate-other-ais, at blocks 6, 9 and 12, with 64 or with all training pairs (measured for issue 4;
see its note). On this 135M model CAA moves A/B answers by no more than item-sampling noise.

What this small model does and does not do (measured while writing these tests):

* Steering only the opened answer (``positions="assistant"``, CAA's setting on Llama 2) moves the score
  by about a hundredth, inconsistently: every token is steered here (``positions="all"``).
* The effect is small (a few hundredths) and monotonic for |coeff| <= 0.1 of the residual norm (KL about
  0.04 nats per token); from about 0.2 the letters lose probability mass and the score turns back.
* Much of what a vector does is shift the preference between the letters A and B; on items whose
  matching letters are unbalanced that shows up as an effect of either sign, so the items are balanced.
* corrigible-neutral-HHH has no stable vector at 64 pairs (two disjoint halves of its 232 training
  pairs give vectors with cosine 0.08); survival-instinct moves by less than a hundredth at block 9.
"""

from __future__ import annotations

import time

import pytest
import torch

from repe.datasets import CAAItem, load_neutral
from repe.directions import Direction
from repe.models import LoadedModel
from steering import SteeringSpec
from steering.caa import caa_direction, caa_split
from steering.evaluate import NeutralCosts, ab_eval_specs, stratified_sample
from steering.sweep import coeff_layer_sweep

pytestmark = pytest.mark.integration

BEHAVIOURS = ("myopic-reward", "refusal", "coordinate-other-ais")
SWEPT = BEHAVIOURS[0]
LAYERS = (6, 9, 12)
LAYER = 9
COEFFS = (-0.1, -0.05, 0.0, 0.05, 0.1)  # relative: fractions of the residual norm at the site
N_PAIRS = 64
N_TEST = 32  # held-out items for the monotonicity check (16 A-matching, 16 B-matching)
N_SELECT = 8  # other held-out items for the sweep
POSITIONS = "all"
BATCH = 16
KL_BUDGET = 0.1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a shared, busy machine one thread avoids OpenMP threads spinning against other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def kl_texts() -> list[str]:
    return load_neutral()[:8]


_DIRECTIONS: dict[str, Direction] = {}


def direction(lm: LoadedModel, behaviour: str) -> Direction:
    """The behaviour's CAA vector, built once per test session (at every swept layer for the swept
    behaviour, else at LAYER alone: capture stops after the deepest site)."""
    if behaviour not in _DIRECTIONS:
        layers = LAYERS if behaviour == SWEPT else (LAYER,)
        _DIRECTIONS[behaviour] = caa_direction(lm, behaviour, layers=layers, n_pairs=N_PAIRS)
    return _DIRECTIONS[behaviour]


def held_out(behaviour: str) -> tuple[list[CAAItem], list[CAAItem]]:
    """(test items, sweep items): disjoint samples of the held-out split, each with as many
    A-matching as B-matching items (so a mere shift between the letters cancels in the score)."""
    items = caa_split(behaviour, seed=0)[1]
    test = stratified_sample(items, N_TEST, seed=1)
    rest = [it for it in items if it not in test]
    return test, stratified_sample(rest, N_SELECT, seed=1)


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_caa_vector_moves_held_out_ab_answers_monotonically(embedded_lm, kl_texts, behaviour):
    lm = embedded_lm
    t0 = time.perf_counter()
    d = direction(lm, behaviour)
    train = caa_split(behaviour, seed=0)[0]
    assert d.dataset_fingerprint == train.sample(N_PAIRS, seed=0).fingerprint()
    assert d.params["n_pairs_dropped"] == 0
    test, _ = held_out(behaviour)
    assert not {p.positive[-2]["content"] for p in train} & {it.question for it in test}
    t1 = time.perf_counter()

    site = f"blocks.{LAYER}.hook_resid_post"
    specs = [SteeringSpec(d, coeff=c, sites=[site], positions=POSITIONS) for c in COEFFS]
    results = ab_eval_specs(lm, test, specs, batch_size=BATCH)
    costs = NeutralCosts(lm, kl_texts)
    kls = [costs.kl(s) for s in specs]
    t2 = time.perf_counter()

    scores = [r.score for r in results]
    print(f"\n[{behaviour}] layer {LAYER}, {len(test)} held-out items, positions={POSITIONS}")
    print(f"{'coeff':>7} {'A/B':>7} {'KL':>7} {'mass':>6}")
    for c, r, k in zip(COEFFS, results, kls, strict=True):
        print(f"{c:>7.2f} {r.score:>7.4f} {k:>7.4f} {r.letter_mass:>6.3f}")
    print(f"[{behaviour}] times: vector {t1 - t0:.0f}s, A/B + KL {t2 - t1:.0f}s")
    assert kls[COEFFS.index(0.0)] == 0.0 and all(
        k > 0 for c, k in zip(COEFFS, kls, strict=True) if c
    )
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert all(a < b for a, b in zip(scores, scores[1:], strict=False)), (
        f"{behaviour}: the A/B matching probability is not monotonic in the coefficient at layer "
        f"{LAYER}: {dict(zip(COEFFS, scores, strict=True))}"
    )


def test_sweep_on_the_real_model(embedded_lm, kl_texts):
    behaviour = SWEPT
    d = direction(embedded_lm, behaviour)
    _, select = held_out(behaviour)
    t0 = time.perf_counter()
    report = coeff_layer_sweep(
        embedded_lm,
        select,
        LAYERS,
        (-0.1, 0.1),
        kl_budget=KL_BUDGET,
        direction=d,
        n_items=None,
        positions=POSITIONS,
        batch_size=BATCH,
        kl_texts=kl_texts,
    )
    print(f"\n{report.table()}\n[sweep] {time.perf_counter() - t0:.0f}s")
    assert report.layers == list(LAYERS) and report.coeffs == [-0.1, 0.0, 0.1]
    for r in report.rows:
        assert (r.kl == 0.0) == (r.coeff == 0.0)
        assert 0.0 <= r.score <= 1.0
    rec = report.recommended
    if rec is not None:
        assert rec.coeff > 0 and rec.shift > 0 and rec.kl <= KL_BUDGET
        tuned = report.apply_to(d)
        assert tuned.best_site == rec.site and tuned.recommended_coeff == rec.coeff
