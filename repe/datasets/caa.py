"""CAA behaviour items as the workbench reads them: the answer letter, the split by question, and the
cloze form (stem + each answer's text) for models that do not read A/B options.

>>> train, test_items = caa_split("sycophancy", seed=0)   # disjoint by question
>>> items = cloze_items(test_items)                      # ClozeItem(stem, matching, other)
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from repe.chat import messages
from repe.datasets.behaviour import CAAItem, load_caa, load_caa_items
from repe.datasets.core import ContrastDataset, ContrastPair

_LETTER_RE = re.compile(r"^\(([A-Z])\)$")
_OPTION = re.compile(r"^\s*\(([A-Z])\)\s?(.*)$")


def answer_letter(answer: str, what: str = "answer") -> str:
    """``"(A)"`` -> ``"A"``; anything that is not a capital letter in parentheses is refused."""
    m = _LETTER_RE.match(answer.strip())
    if m is None:
        raise ValueError(
            f"{what} must be a capital letter in parentheses such as '(A)'; got {answer!r}"
        )
    return m.group(1)


def caa_split(
    behaviour: str, seed: int = 0, test_frac: float = 0.2
) -> tuple[ContrastDataset, list[CAAItem]]:
    """Split a CAA behaviour's questions into training pairs and held-out A/B items.

    The split is by question (a question never lands on both sides), deterministic for ``seed``; both
    parts keep the original order. Build vectors from the first part (:func:`caa_direction` does
    when given a behaviour name) and evaluate on the second (:func:`steering.evaluation.ab.ab_eval`).
    """
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac must be strictly between 0 and 1; got {test_frac!r}")
    items = load_caa_items(behaviour)
    pairs = load_caa(behaviour)
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.question, []).append(i)
    keys = list(groups)
    if len(keys) < 2:
        raise ValueError(f"CAA behaviour {behaviour!r} has fewer than 2 questions; cannot split")
    random.Random(seed).shuffle(keys)
    n_test = min(max(round(test_frac * len(keys)), 1), len(keys) - 1)
    test_idx = sorted(i for k in keys[:n_test] for i in groups[k])
    test_set = set(test_idx)
    train_idx = [i for i in range(len(items)) if i not in test_set]
    split = {"test_frac": test_frac, "seed": seed, "by": "question"}
    train = ContrastDataset(
        name=f"{pairs.name}[train]",
        pairs=[pairs[i] for i in train_idx],
        source=pairs.source,
        meta={**pairs.meta, "split": split, "parent_fingerprint": pairs.fingerprint()},
    )
    return train, [items[i] for i in test_idx]


@dataclass(frozen=True)
class ClozeItem:
    """One CAA question in cloze form: the stem and the two answers' texts."""

    stem: str
    matching: str
    other: str


def cloze_item(item: CAAItem, what: str = "item") -> ClozeItem:
    """Split a CAA A/B question into its stem and the texts of its matching and other options.

    The options are the lines that start with ``(A)``, ``(B)``, ... (an option runs until the next one);
    the stem is everything before the first option, without a trailing ``Choices:`` line."""
    stem_lines: list[str] = []
    options: dict[str, list[str]] = {}
    current: str | None = None
    for line in item.question.split("\n"):
        m = _OPTION.match(line)
        if m is not None:
            current = m.group(1)
            options[current] = [m.group(2)]
        elif current is not None:
            options[current].append(line)
        else:
            stem_lines.append(line)
    stem = "\n".join(stem_lines).strip()
    if stem.endswith("Choices:"):
        stem = stem[: -len("Choices:")].strip()
    text = {k: "\n".join(v).strip() for k, v in options.items()}
    m_letter = answer_letter(item.answer_matching_behavior, f"{what}: answer_matching_behavior")
    o_letter = answer_letter(
        item.answer_not_matching_behavior, f"{what}: answer_not_matching_behavior"
    )
    missing = [x for x in (m_letter, o_letter) if not text.get(x)]
    if not stem or missing:
        raise ValueError(
            f"{what}: cannot put this question in cloze form ("
            + ("no question before the options" if not stem else f"no option text for {missing}")
            + f"); it reads {item.question[:80]!r}..."
        )
    return ClozeItem(stem, text[m_letter], text[o_letter])


def cloze_items(items: Sequence[CAAItem]) -> list[ClozeItem]:
    return [cloze_item(it, f"item {i}") for i, it in enumerate(items)]


def cloze_pairs(dataset_items: Sequence[CAAItem], name: str) -> ContrastDataset:
    """Contrast pairs (positive = the matching answer's text) as chat conversations."""
    pairs = []
    for c in cloze_items(dataset_items):
        pairs.append(
            ContrastPair(
                positive=messages(c.stem, assistant=c.matching),
                negative=messages(c.stem, assistant=c.other),
            )
        )
    return ContrastDataset(name=name, pairs=pairs, source="caa (cloze form)")


def cloze_split(
    behaviour: str, seed: int = 0, test_frac: float = 0.2
) -> tuple[list[CAAItem], list[CAAItem]]:
    """The training and held-out A/B items of ``caa_split`` (same questions on each side)."""
    test = caa_split(behaviour, seed=seed, test_frac=test_frac)[1]
    held_out = {it.question for it in test}
    return [it for it in load_caa_items(behaviour) if it.question not in held_out], test
