"""The A/B control: trivially easy A/B questions in both option orders tell whether a model reads the
options at all (steering.evaluation.control)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from repe.datasets import load_ab_control
from steering.evaluation.ab import ABResult
from steering.evaluation.control import ab_control, summarise

_OPTION = re.compile(r"\n \(([AB])\) (.*)")


def _options(question: str) -> dict[str, str]:
    return dict(_OPTION.findall(question))


def _result(scores: list[float]) -> ABResult:
    return ABResult(
        score=sum(scores) / len(scores),
        balanced_score=sum(scores) / len(scores),
        n_items=len(scores),
        item_scores=scores,
        letter_mass=1.0,
        accuracy=sum(s > 0.5 for s in scores) / len(scores),
    )


def test_control_items_are_each_question_in_both_orders():
    items = load_ab_control()
    assert len(items) == 64
    stems: dict[str, list[tuple[str, str]]] = {}
    for it in items:
        opts = _options(it.question)
        assert set(opts) == {"A", "B"}, it.question
        right = opts[it.answer_matching_behavior[1]]
        wrong = opts[it.answer_not_matching_behavior[1]]
        assert right != wrong
        stems.setdefault(it.question.split("\n\n")[0], []).append((right, wrong))
    assert len(stems) == 32
    for stem, answers in stems.items():
        assert len(answers) == 2 and answers[0] == answers[1], stem  # same right answer both times
    letters = [it.answer_matching_behavior for it in items]
    assert letters.count("(A)") == letters.count("(B)") == 32


def test_a_model_that_ignores_the_options_scores_exactly_chance():
    """Whatever its letter preference, a model that answers A with probability q_k on question k in
    both orders gets q_k on one order and 1 - q_k on the other: the control reads 0.5 exactly."""
    items = load_ab_control()
    gen = torch.Generator().manual_seed(0)
    q_by_stem: dict[str, float] = {}
    scores = []
    for it in items:
        stem = it.question.split("\n\n")[0]
        q = q_by_stem.setdefault(stem, 0.6 + 0.35 * float(torch.rand((), generator=gen)))
        scores.append(q if it.answer_matching_behavior == "(A)" else 1.0 - q)
    c = summarise(items, _result(scores))
    assert c.score == pytest.approx(0.5, abs=1e-12)
    assert c.prefers_a > 0.6  # the preference is measured, and cancelled in the score
    assert not c.reads_choices
    assert c.warning() is not None and "does not read A/B options" in (c.warning() or "")
    assert "does NOT read" in str(c)


def test_a_model_that_reads_the_options_is_recognised():
    items = load_ab_control()
    scores = [0.9 if i % 3 else 0.7 for i in range(len(items))]
    c = summarise(items, _result(scores))
    assert c.score > 0.75 and c.se < 0.05
    assert c.reads_choices and c.warning() is None
    assert c.to_dict()["reads_choices"] is True
    assert c.n_questions == 32 and c.n_items == 64


def test_a_small_lean_is_not_enough():
    """A mean of 0.52 over questions that spread +-0.2 around it is not two standard errors above
    chance."""
    items = load_ab_control()
    scores = [
        0.52 + (0.2 if (i // 2) % 2 else -0.2) for i in range(64)
    ]  # items 2k, 2k+1: question k
    c = summarise(items, _result(scores))
    assert 0.5 < c.score < 0.5 + 2 * c.se
    assert not c.reads_choices


def test_summarise_checks_lengths():
    items = load_ab_control()
    with pytest.raises(ValueError, match="64 items but 3 item scores"):
        summarise(items, _result([0.5, 0.5, 0.5]))


def test_control_runs_on_the_tiny_model(tiny_lm):
    c = ab_control(tiny_lm)
    assert c.n_items == 64 and c.n_questions == 32
    assert 0.0 <= c.score <= 1.0 and 0.0 <= c.prefers_a <= 1.0 and math.isfinite(c.se)


@pytest.mark.integration
def test_the_embedded_model_does_not_read_ab_options(embedded_lm):
    """SmolLM2-135M-Instruct picks its answer letter without reading the options (measured: 0.4995,
    se 0.003). This is why CAA A/B shifts on it are noise (issue 4); if a change of model or prompt
    format makes it read them, this test fails and the A/B acceptance should be re-measured."""
    c = ab_control(embedded_lm)
    print(f"\n{c}")
    assert not c.reads_choices
    assert abs(c.score - 0.5) < 0.05
