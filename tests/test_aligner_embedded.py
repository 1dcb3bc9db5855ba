"""Aligner global tokens on the embedded model, small enough for CI: one token (828 parameters) learns
the form task (open every answer with a fixed phrase) on held-out questions (32 training questions and
3 epochs, 12 steps, gave 0.34 [0.19, 0.50]: too few; 48 and 4 epochs give 20 steps), and DPO on refusal pairs
raises the held-out preference margin with a paired bootstrap interval above 0. The study-size figures
(and the form-vs-knowledge contrast with a LoRA) come from ``studies/aligner_embedded.py`` (issue 16's
note)."""

from __future__ import annotations

import pytest

from steering.aligner import Aligner
from steering.evaluation.aligner import AlignerRun, run_aligner

pytestmark = pytest.mark.integration


def test_one_token_learns_the_form_task_on_held_out_questions(embedded_lm, tmp_path):
    run = AlignerRun(
        task="form",
        n_tokens=1,
        train=48,
        held=32,
        epochs=4,
        compare_vector=False,
        compare_lora=False,
    )
    r = run_aligner(embedded_lm, run, tmp_path, progress=False, log=lambda _: None)
    assert r["base"]["success"] <= 0.05
    a = r["aligner"]
    assert a["parameters"] == 828
    assert a["success"] >= 0.5 and a["success_change"]["lo"] > 0.3, a
    back = Aligner.load(tmp_path / "aligner", embedded_lm)
    assert back.params["task"] == "form" and back.method == "sft"
    assert back.metrics["success"] == a["success"]


def test_dpo_raises_the_held_out_preference_margin(embedded_lm, tmp_path):
    run = AlignerRun(
        task="value",
        sources=("caa:refusal",),
        n_tokens=1,
        train=24,
        held=32,
        epochs=2,
        compare_vector=False,
        compare_lora=False,
    )
    r = run_aligner(embedded_lm, run, tmp_path, progress=False, log=lambda _: None)
    ch = r["aligner"]["margin_change"]
    assert ch["lo"] > 0, ch
    assert r["aligner"]["training"]["best_held_out"] < r["aligner"]["training"]["initial_held_out"]
