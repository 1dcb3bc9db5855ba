"""CAA behaviours on the embedded SmolLM2-135M-Instruct, scored in cloze form: a vector from training
pairs moves the held-out answers monotonically with the coefficient at the layer a sweep recommends.

Why cloze and not A/B letters: this model picks its A/B letter without reading the options
(``tests/test_ab_control.py``: 0.4995 on trivially easy questions, 0.5 = chance), so CAA's A/B score
cannot move with any behaviour on it. In cloze form the question's stem is the user turn and each
option's text is a candidate answer (``steering.evaluation.cloze``).

Per behaviour: a vector from ``N_PAIRS`` training pairs (mean difference of the answer-text
activations), a coefficient x layer sweep on ``N_SELECT`` held-out items picks the layer (largest shift
within the KL budget), then on ``N_TEST`` *other* held-out items the matching probability must rise
strictly over the coefficients at that layer, and the shifts at -0.1 and +0.1 must each be more than
two paired standard errors from zero in the intended direction. The numbers are printed (``-s``).
"""

from __future__ import annotations

import time

import pytest

from probes.cloze import cloze_direction
from repe.datasets import load_neutral
from repe.datasets.caa import caa_split, cloze_split
from steering import SteeringSpec
from steering.evaluation.ab import paired_shift, stratified_sample
from steering.evaluation.cloze import cloze_eval_specs
from steering.evaluation.costs import NeutralCosts
from steering.evaluation.sweep import coeff_layer_sweep

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

BEHAVIOURS = ("refusal", "coordinate-other-ais", "myopic-reward")
LAYERS = (6, 12)
N_PAIRS = 128
N_SELECT = 16  # held-out items for the sweep
N_TEST = 48  # other held-out items for the monotonicity check
COEFFS = (-0.1, -0.05, 0.0, 0.05, 0.1)  # relative: fractions of the residual norm at the site
KL_BUDGET = 0.1


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_cloze_vector_moves_held_out_answers_monotonically_at_the_recommended_layer(
    embedded_lm, behaviour
):
    lm = embedded_lm
    t0 = time.perf_counter()
    d = cloze_direction(lm, behaviour, layers=list(LAYERS), n_pairs=N_PAIRS)
    train, held = cloze_split(behaviour, seed=0)
    assert held == caa_split(behaviour, seed=0)[1]
    assert not {it.question for it in train} & {it.question for it in held}
    select = stratified_sample(held, N_SELECT, seed=1)
    test = stratified_sample([it for it in held if it not in select], N_TEST, seed=1)
    kl_texts = load_neutral()[:8]
    t1 = time.perf_counter()

    report = coeff_layer_sweep(
        lm,
        select,
        list(LAYERS),
        (-0.1, 0.1),
        kl_budget=KL_BUDGET,
        direction=d,
        n_items=None,
        kl_texts=kl_texts,
        form="cloze",
    )
    print(f"\n{report.table()}")
    rec = report.recommended
    assert rec is not None, f"{behaviour}: the sweep recommends nothing"
    assert rec.coeff == 0.1 and rec.kl <= KL_BUDGET
    tuned = report.apply_to(d)
    t2 = time.perf_counter()

    specs = [SteeringSpec(tuned, coeff=c, sites=[rec.site]) for c in COEFFS]
    results = cloze_eval_specs(lm, test, specs)
    costs = NeutralCosts(lm, kl_texts)
    kls = [costs.kl(s) for s in specs]
    t3 = time.perf_counter()

    base = results[COEFFS.index(0.0)]
    scores = [r.score for r in results]
    shifts = [paired_shift(base.item_scores, r.item_scores) for r in results]
    print(f"[{behaviour}] layer {rec.layer} (recommended), {len(test)} other held-out items")
    print(f"{'coeff':>7} {'cloze':>7} {'shift':>8} {'se':>7} {'KL':>7}")
    for c, s, (sh, se), k in zip(COEFFS, scores, shifts, kls, strict=True):
        print(f"{c:>7.2f} {s:>7.4f} {sh:>+8.4f} {se:>7.4f} {k:>7.4f}")
    print(f"[{behaviour}] times: vector {t1 - t0:.0f}s, sweep {t2 - t1:.0f}s, test {t3 - t2:.0f}s")

    assert all(r.form == "cloze" and r.n_items == N_TEST for r in results)
    assert all(a < b for a, b in zip(scores, scores[1:], strict=False)), (
        f"{behaviour}: the matching probability is not monotonic in the coefficient at layer "
        f"{rec.layer}: {dict(zip(COEFFS, scores, strict=True))}"
    )
    (down, se_down), (up, se_up) = shifts[0], shifts[-1]
    assert down < -2 * se_down and up > 2 * se_up, (
        f"{behaviour}: shifts at -0.1 / +0.1 ({down:+.4f} / {up:+.4f}) are within two paired "
        f"standard errors ({se_down:.4f} / {se_up:.4f})"
    )
    assert kls[COEFFS.index(0.0)] == 0.0 and all(
        k > 0 for c, k in zip(COEFFS, kls, strict=True) if c
    )
