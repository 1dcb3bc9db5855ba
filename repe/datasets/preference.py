"""Preference pairs: ``(prompt, chosen, rejected)``, or ``(prompt, rejected)`` when only the dispreferred
answer is known (D2O-style negative-only data).

Built in, from shipped data: CAA behaviours in cloze form (the question stem and the two answers'
texts), with the answer an honest, harmless assistant would give as ``chosen``: the non-hallucinating
answer for ``caa:hallucination``, the AI's honest refusal for ``caa:refusal``, and so on.
A user's JSON-lines file has one object per line with ``prompt`` and ``rejected`` and optionally
``chosen``; every malformed line is refused with its line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from repe.datasets._paths import data_path
from repe.datasets.behaviour import load_caa_items
from repe.datasets.caa import cloze_items
from repe.datasets.io import iter_jsonl, require_keys
from repe.errors import DataFormatError

# which CAA answer is the preferred one: True = the behaviour-matching answer
CAA_PREFERRED_MATCHING = {
    "hallucination": False,
    "refusal": True,
    "sycophancy": False,
    "myopic-reward": False,
    "survival-instinct": False,
    "coordinate-other-ais": False,
    "corrigible-neutral-HHH": True,
}


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    rejected: str
    chosen: str | None = None  # None: negative-only

    def __post_init__(self) -> None:
        for key in ("prompt", "rejected"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                raise ValueError(f"a preference pair needs a non-empty {key}")
        if self.chosen is not None and (
            not isinstance(self.chosen, str) or not self.chosen.strip()
        ):
            raise ValueError("chosen must be a non-empty string or absent")


def caa_preference_pairs(behaviour: str) -> list[PreferencePair]:
    """The CAA behaviour's questions as preference pairs (see ``CAA_PREFERRED_MATCHING``)."""
    if behaviour not in CAA_PREFERRED_MATCHING:
        raise ValueError(
            f"unknown CAA behaviour {behaviour!r}; known: {sorted(CAA_PREFERRED_MATCHING)}"
        )
    matching = CAA_PREFERRED_MATCHING[behaviour]
    out = []
    for it in cloze_items(load_caa_items(behaviour)):
        good, bad = (it.matching, it.other) if matching else (it.other, it.matching)
        out.append(PreferencePair(it.stem, bad, good))
    return out


def load_preference_pairs(name_or_path: str | Path) -> list[PreferencePair]:
    """``caa:<behaviour>`` or a JSON-lines file of ``{"prompt", "rejected"[, "chosen"]}`` objects."""
    s = str(name_or_path)
    if s.startswith("caa:"):
        return caa_preference_pairs(s[4:])
    out = []
    for lineno, obj in iter_jsonl(s):
        where = f"{s}:{lineno}"
        require_keys(obj, ("prompt", "rejected"), where)
        chosen = obj.get("chosen")
        if chosen is not None:
            require_keys(obj, ("chosen",), where)
        out.append(PreferencePair(obj["prompt"], obj["rejected"], chosen))
    if not out:
        raise DataFormatError(f"{s}: no preference pairs (the file has no non-blank lines)")
    return out


def load_value_instructions() -> dict[str, str]:
    """The shipped value instructions (value name -> a one-sentence system instruction), written for
    this project for VILMO-style value-instruction contrasts (``value_instructions/SOURCE.txt``)."""
    path = data_path("value_instructions", "value_instructions.json")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in d.items()
    ):
        raise DataFormatError(f"{path}: expected an object of value name -> instruction text")
    return d


@dataclass(frozen=True)
class FictionalFact:
    """An invented fact: ``statement`` answers the ``train`` questions; ``held_out`` asks the same in
    other words; ``answer`` is the word a recall must contain."""

    answer: str
    statement: str
    train: tuple[str, ...]
    held_out: str


def load_fictional_facts() -> list[FictionalFact]:
    """The shipped invented facts (``fictional_facts/SOURCE.txt``): knowledge no model has, for checking
    whether an intervention can learn facts or only form."""
    path = data_path("fictional_facts", "fictional_facts.jsonl")
    out = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        require_keys(obj, ("answer", "statement", "held_out"), where)
        train = obj.get("train")
        if not isinstance(train, list) or not train or not all(isinstance(q, str) for q in train):
            raise DataFormatError(f"{where}: 'train' must be a non-empty list of questions")
        out.append(FictionalFact(obj["answer"], obj["statement"], tuple(train), obj["held_out"]))
    return out
