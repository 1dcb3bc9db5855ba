"""Can this model answer A/B questions at all? A control for CAA's A/B evaluation.

CAA's A/B score (:func:`steering.evaluation.ab.ab_eval`) only measures a behaviour if the model's answer
letter depends on what the options say. Small models often pick a letter without reading the options
(multiple-choice symbol binding is a late-emerging ability), and then every A/B score sits near 0.5 and
every A/B shift under steering is item-sampling noise or a change of letter preference, whatever the
vector does to the behaviour.

:func:`ab_control` runs the same evaluation, with the same prompt format, on trivially easy questions
(``repe.datasets.load_ab_control``: "What is 2 + 2? (A) 4 (B) 9", each question in both option orders).
Averaging a question's two orders cancels any letter preference, so a model that ignores the options
scores exactly 0.5 and one that reads them scores near 1. ``reads_choices`` is True when the score is
more than two standard errors (over questions) above 0.5.

>>> control = ab_control(lm)
>>> control.reads_choices, control.score, control.se
>>> control.warning()          # None, or a sentence for a report / UI
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from repe.datasets import CAAItem, load_ab_control
from repe.datasets.caa import answer_letter
from repe.models import LoadedModel
from steering.evaluation.ab import ABResult, ab_eval_specs
from steering.spec import SteeringSpec


@dataclass(frozen=True)
class ABControl:
    """The control's result.

    ``score``: mean probability of the correct letter (renormalised over the two letters), averaged per
    question over its two option orders, then over questions; 0.5 = the options are ignored.
    ``se``: its standard error over questions. ``accuracy``: fraction of items whose correct letter is
    the likelier. ``prefers_a``: mean ``p(A) / (p(A) + p(B))`` over items (the letter preference the
    design cancels).
    """

    score: float
    se: float
    accuracy: float
    prefers_a: float
    n_questions: int
    n_items: int

    @property
    def reads_choices(self) -> bool:
        return self.score - 2 * self.se > 0.5

    def warning(self) -> str | None:
        """None when the model reads the options; otherwise what that means for A/B numbers."""
        if self.reads_choices:
            return None
        return (
            f"this model does not read A/B options: on {self.n_questions} trivially easy A/B "
            f"questions its correct-letter probability is {self.score:.3f} (se {self.se:.3f}; 0.5 = "
            f"chance), so A/B scores and shifts measured on it reflect letter preference and "
            f"item-sampling noise, not the behaviour"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reads_choices": self.reads_choices}

    def __str__(self) -> str:
        verdict = "reads the options" if self.reads_choices else "does NOT read the options"
        return (
            f"A/B control: {verdict}; correct-letter probability {self.score:.4f} (se "
            f"{self.se:.4f}) over {self.n_questions} questions x 2 orders, accuracy "
            f"{self.accuracy:.3f}, p(A) share {self.prefers_a:.3f}"
        )


def summarise(items: Sequence[CAAItem], result: ABResult) -> ABControl:
    """Turn an A/B result on control items into an :class:`ABControl` (items of one question share
    their question stem, the text before the first blank line)."""
    if len(items) != len(result.item_scores):
        raise ValueError(
            f"{len(items)} items but {len(result.item_scores)} item scores; pass the items evaluated"
        )
    by_question: dict[str, list[float]] = {}
    prefers_a = []
    for it, p in zip(items, result.item_scores, strict=True):
        by_question.setdefault(it.question.split("\n\n")[0], []).append(p)
        prefers_a.append(p if answer_letter(it.answer_matching_behavior) == "A" else 1.0 - p)
    means = [statistics.fmean(v) for v in by_question.values()]
    se = statistics.stdev(means) / len(means) ** 0.5 if len(means) > 1 else float("nan")
    return ABControl(
        score=statistics.fmean(means),
        se=se,
        accuracy=result.accuracy,
        prefers_a=statistics.fmean(prefers_a),
        n_questions=len(means),
        n_items=len(items),
    )


def ab_control(
    lm: LoadedModel,
    spec: SteeringSpec | None = None,
    *,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> ABControl:
    """Run the A/B control on ``lm`` (optionally steered with ``spec``); a few seconds on CPU for
    a small model (64 short prompts)."""
    items = load_ab_control()
    result = ab_eval_specs(lm, items, [spec], batch_size=batch_size, progress=progress)[0]
    return summarise(items, result)
