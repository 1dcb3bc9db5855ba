"""Question sets for value maps (UniVaR-style): the model answers each question as one user turn, and
the answers are embedded to tell which source (persona, steering setting) answered.

>>> from repe.datasets import question_set, load_questions
>>> qs = question_set("values", n=200, seed=0)   # ValueBench, MoralChoice and persona, balanced
>>> ctrl = question_set("control")              # general-knowledge questions, no values involved
>>> qs.fingerprint                              # changes when any question changes

Ids are paths (``valuebench/PVQ40/12``, ``persona/agreeableness/3``); ``QuestionSet.sample`` shares
its picks equally among the groups those paths name, at every level.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from repe.datasets._paths import data_path, pick, source_note
from repe.datasets.behaviour import load_persona, persona_names
from repe.datasets.io import iter_csv, iter_jsonl, require_file, require_keys
from repe.datasets.values import load_moralchoice_items, load_valuebench
from repe.errors import DataFormatError

KINDS = ("value", "control")
QUESTION_SUFFIXES = (".jsonl", ".csv")
PERSONA_TEMPLATE = 'Do you agree with this statement: "{statement}"? Explain your view.'
MORALCHOICE_TEMPLATE = "{context} Which of these would you do, and why?\n- {first}\n- {second}"

T = TypeVar("T")


@dataclass(frozen=True)
class Question:
    """One question, asked to the model as a single user turn."""

    qid: str
    text: str
    set: str
    kind: str


@dataclass(frozen=True)
class QuestionSet:
    """Named, ordered questions with unique ids; ``source`` says where they come from (and licence)."""

    name: str
    questions: tuple[Question, ...]
    source: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "questions", tuple(self.questions))
        seen: set[str] = set()
        for q in self.questions:
            if q.kind not in KINDS:
                raise ValueError(f"question {q.qid!r}: kind must be one of {KINDS}; got {q.kind!r}")
            if not q.text.strip():
                raise ValueError(f"question {q.qid!r} of set {self.name!r} has an empty text")
            if q.qid in seen:
                raise ValueError(f"question set {self.name!r}: duplicate id {q.qid!r}")
            seen.add(q.qid)

    @property
    def fingerprint(self) -> str:
        """sha256 over the name and every (qid, text, kind), first 16 hex digits."""
        h = hashlib.sha256(json.dumps(self.name).encode())
        for q in self.questions:
            h.update(json.dumps([q.qid, q.text, q.kind], ensure_ascii=False).encode())
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.questions)

    def ids(self) -> list[str]:
        return [q.qid for q in self.questions]

    def sample(self, n: int, seed: int = 0) -> QuestionSet:
        """``n`` questions drawn with ``seed``, shared equally among the groups their id paths name
        (at every level, as far as each group's size allows), kept in this set's order; the whole set
        when ``n >= len(self)``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer; got {n!r}")
        if n >= len(self):
            return self
        paths = [(tuple(q.qid.split("/")[:-1]), i) for i, q in enumerate(self.questions)]
        keep = sorted(_spread(paths, n, random.Random(seed), 0))
        return QuestionSet(self.name, tuple(self.questions[i] for i in keep), self.source)


def _spread(
    items: list[tuple[tuple[str, ...], int]], n: int, rng: random.Random, depth: int
) -> list[int]:
    """Pick ``n`` of the items' indices, split equally among the groups named by path segment
    ``depth`` (items whose path ends here form one group of their own), then recursively."""
    groups: dict[str | None, list[tuple[tuple[str, ...], int]]] = {}
    for path, i in items:
        groups.setdefault(path[depth] if len(path) > depth else None, []).append((path, i))
    members = list(groups.values())
    take = [0] * len(members)
    while n > 0:
        open_ = [k for k, m in enumerate(members) if take[k] < len(m)]
        each = n // len(open_)
        if each == 0:
            for k in rng.sample(open_, n):
                take[k] += 1
            break
        for k in open_:
            add = min(each, len(members[k]) - take[k])
            take[k] += add
            n -= add
    out: list[int] = []
    for key, group, k in zip(groups, members, take, strict=True):
        if key is None:
            out += rng.sample([i for _, i in group], k)
        elif k:
            out += _spread(group, k, rng, depth + 1)
    return out


def _round_robin(seqs: Sequence[Sequence[T]]) -> Iterator[T]:
    for i in range(max((len(s) for s in seqs), default=0)):
        yield from (s[i] for s in seqs if i < len(s))


def _unique(questions: Iterable[Question]) -> tuple[Question, ...]:
    """Drop empty texts and repeated texts (ignoring case and spacing), keeping the first."""
    seen: set[str] = set()
    out = []
    for q in questions:
        key = " ".join(q.text.split()).casefold()
        if key and key not in seen:
            seen.add(key)
            out.append(q)
    return tuple(out)


# --- the shipped sets
def _valuebench() -> QuestionSet:
    counts: dict[str, int] = {}
    out = []
    for item in load_valuebench():
        group = re.sub(r"[\s/]+", "_", item.questionnaire.strip())
        counts[group] = counts.get(group, 0) + 1
        text = " ".join(item.question.split())
        out.append(Question(f"valuebench/{group}/{counts[group]}", text, "valuebench", "value"))
    detail = (
        "ValueBench inventory items as advice-seeking questions, MIT (item copyrights: authors)"
    )
    return QuestionSet("valuebench", _unique(out), source_note("valuebench", detail))


def _moralchoice() -> QuestionSet:
    out = []
    for s in load_moralchoice_items():
        first, second = s.moral_action.strip(), s.immoral_action.strip()
        if hashlib.sha256(s.scenario_id.encode()).digest()[0] & 1:
            first, second = second, first
        text = MORALCHOICE_TEMPLATE.format(context=s.context.strip(), first=first, second=second)
        out.append(Question(f"moralchoice/{s.scenario_id}", text, "moralchoice", "value"))
    detail = "MoralChoice low-ambiguity scenarios with both actions in hashed order, MIT"
    return QuestionSet("moralchoice", _unique(out), source_note("moralchoice", detail))


def _persona() -> QuestionSet:
    per_file = [
        [
            Question(
                f"persona/{name}/{i}",
                PERSONA_TEMPLATE.format(statement=" ".join(s.statement.split()).rstrip(".")),
                "persona",
                "value",
            )
            for i, s in enumerate(load_persona(name), start=1)
            if s.statement.strip()
        ]
        for name in persona_names()
    ]
    detail = (
        "Anthropic persona statements, one file at a time in turn, CC-BY-4.0 (Perez et al. 2022)"
    )
    return QuestionSet(
        "persona", _unique(_round_robin(per_file)), source_note("anthropic_persona", detail)
    )


def _values() -> QuestionSet:
    parts = [question_set(name) for name in ("valuebench", "moralchoice", "persona")]
    source = "in turn from: " + "; ".join(f"{p.name}: {p.source}" for p in parts)
    return QuestionSet("values", tuple(_round_robin([p.questions for p in parts])), source)


def _control() -> QuestionSet:
    raw = load_questions(data_path("control_questions", "questions.jsonl"))
    questions = tuple(
        Question(f"control/{q.qid}", q.text, "control", "control") for q in raw.questions
    )
    detail = "general-knowledge and how-to questions written for this project, MIT"
    return QuestionSet("control", questions, source_note("control_questions", detail))


_BUILDERS: dict[str, Callable[[], QuestionSet]] = {
    "valuebench": _valuebench,
    "moralchoice": _moralchoice,
    "persona": _persona,
    "values": _values,
    "control": _control,
}


def list_question_sets() -> list[str]:
    """The shipped question sets: three value sets, their balanced mix, and the control set."""
    return list(_BUILDERS)


@cache
def _build(name: str) -> QuestionSet:
    return _BUILDERS[name]()


def question_set(name: str, n: int | None = None, seed: int = 0) -> QuestionSet:
    """A shipped question set (see ``list_question_sets``); with ``n``, ``sample(n, seed)`` of it."""
    qs = _build(pick(name, list_question_sets(), "question set"))
    return qs if n is None else qs.sample(n, seed)


# --- the user's own questions
def load_questions(path: str | Path) -> QuestionSet:
    """The user's questions: ``.jsonl`` (objects with ``question`` and an optional ``id``) or ``.csv``
    (a header with a ``question`` column and an optional ``id`` one). A row without an id gets
    ``<stem>/<line>``. Every problem raises ``DataFormatError`` starting ``<path>:<line>:``."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in QUESTION_SUFFIXES:
        raise DataFormatError(
            f"{p}:1: unsupported question-file type {p.suffix or '(none)'!r}; use one of {QUESTION_SUFFIXES}"
        )
    require_file(p, "question file")
    data = p.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataFormatError(f"{p}:{line}: not UTF-8 text ({exc.reason})") from exc
    rows: Iterable[tuple[int, dict[str, Any]]]
    rows = iter_jsonl(p) if suffix == ".jsonl" else iter_csv(p, required=("question",))
    first: dict[str, int] = {}
    questions = []
    for line, row in rows:
        where = f"{p}:{line}"
        require_keys(row, ("question",), where)
        qid = _row_id(row.get("id"), where) or f"{p.stem}/{line}"
        if qid in first:
            raise DataFormatError(f"{where}: duplicate id {qid!r} (first on line {first[qid]})")
        first[qid] = line
        questions.append(Question(qid, row["question"].strip(), p.stem, "value"))
    if not questions:
        raise DataFormatError(f"{p}:1: no questions in the file (expected rows with a 'question')")
    return QuestionSet(p.stem, tuple(questions), f"user file {p.stem}")


def _row_id(value: object, where: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataFormatError(f"{where}: 'id' must be a string or an integer; got {value!r}")
