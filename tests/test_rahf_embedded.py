"""RAHF on the embedded model, small enough for CI (12 training and 20 held-out refusal pairs): the SCIT
and the negative-only adapters move held-out response states along their pattern (paired bootstrap
interval above 0), the capability check stays within its tolerance, and the vector set beside them
costs the same KL. The held-out margin figures at study size are in ``studies/rahf_embedded.py``'s output
(issue 15's note)."""

from __future__ import annotations

import pytest

from steering.adapter import LowRankAdapter
from steering.evaluation.rahf import TOLERANCE, RAHFRun, run_rahf

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("variant", ["scit", "negative"])
def test_a_small_adapter_moves_held_out_states_along_its_pattern(embedded_lm, tmp_path, variant):
    run = RAHFRun(
        pairs=("caa:refusal",),
        variant=variant,
        train=12,
        held=20,
        epochs=2,
        scit_epochs=2,
        facts=40,
        answer_tokens=24,
    )
    ad, m = run_rahf(embedded_lm, run, tmp_path / variant, progress=False, log=lambda _: None)
    a = m["adapter"]
    assert a["projection_change"]["lo"] > 0, a["projection_change"]
    assert m["training"]["held_out_loss_best"] < m["training"]["held_out_loss_initial"]
    assert a["perplexity_ratio"] <= TOLERANCE["perplexity_ratio_max"], a
    assert a["facts_auc_change"] >= -TOLERANCE["facts_auc_drop_max"], a
    assert a["within_tolerance"]
    assert m["vector"]["neutral_kl"] == pytest.approx(a["neutral_kl"], rel=0.05)
    back = LowRankAdapter.load(tmp_path / variant / "adapter", embedded_lm)
    assert back.params["pattern"] == ("token" if variant == "scit" else "pooled")
    assert back.metrics["held_out"]["projection_change"] == a["projection_change"]
