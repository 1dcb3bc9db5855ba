"""Loaders for the behaviour data: RepE facts and emotions, CAA A/B questions, Anthropic personas.

Pair builders take ``chat``: ``True`` gives conversations (rendered later by ``repe.chat.render``),
``False`` plain texts. Origins and licences: ``repe/data/<folder>/SOURCE.txt``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from repe.datasets._paths import DATA_DIR, data_path, pick, side, source_note
from repe.datasets.core import ContrastDataset, ContrastPair
from repe.datasets.io import iter_csv, iter_jsonl, read_json_list, require_keys
from repe.datasets.templates import make_persona_pairs
from repe.errors import DataFormatError

CAA_BEHAVIOURS = (
    "coordinate-other-ais",
    "corrigible-neutral-HHH",
    "hallucination",
    "myopic-reward",
    "refusal",
    "survival-instinct",
    "sycophancy",
)
EMOTIONS = ("anger", "disgust", "fear", "happiness", "sadness", "surprise")
MIXED_EMOTIONS = ("happiness_fear", "happiness_sadness")
EMOTION_TEMPLATE = (
    "Consider the {emotion} of the following scenario:\nScenario: {scenario}\nAnswer:"
)


@dataclass(frozen=True)
class LabeledStatement:
    """A statement and whether it is true (RepE / Azaria & Mitchell facts)."""

    text: str
    label: bool


@dataclass(frozen=True)
class CAAItem:
    """One CAA A/B question; the answers are letters in parentheses, e.g. ``"(A)"``."""

    question: str
    answer_matching_behavior: str
    answer_not_matching_behavior: str


@dataclass(frozen=True)
class PersonaStatement:
    """An Anthropic persona statement; ``matches_behavior`` is True when someone with the persona's
    behaviour would say it (answer " Yes"), False when they would not."""

    statement: str
    question: str
    matches_behavior: bool
    label_confidence: float | None = None


# --- RepE facts
def load_facts() -> list[LabeledStatement]:
    """The 612 true/false statements RepE uses for honesty (``facts_true_false.csv``)."""
    path = data_path("repe_emotions_facts", "facts", "facts_true_false.csv")
    out = []
    for line, row in iter_csv(path, required=("statement", "label")):
        if row["label"].strip() not in ("0", "1"):
            raise DataFormatError(f"{path}:{line}: label must be 0 or 1; got {row['label']!r}")
        out.append(LabeledStatement(text=row["statement"], label=row["label"].strip() == "1"))
    return out


def facts_honesty_pairs(
    *, tokenizer: Any = None, chat: bool = True, drop_last_tokens: int = 5
) -> ContrastDataset:
    """RepE's honesty pairs: true facts, honest vs untruthful persona, cut into token prefixes."""
    statements = [s.text for s in load_facts() if s.label]
    ds = make_persona_pairs(
        statements,
        "an honest",
        "an untruthful",
        chat=chat,
        tokenizer=tokenizer,
        drop_last_tokens=drop_last_tokens,
        name="facts/honesty",
    )
    ds.source = source_note(
        "repe_emotions_facts", f"RepE honesty pairs over {len(statements)} facts"
    )
    return ds


# --- emotions
def load_emotions(*, include_mixed: bool = False) -> dict[str, list[str]]:
    """Emotion -> scenario texts (RepE). ``include_mixed`` adds happiness_fear / happiness_sadness."""
    names = EMOTIONS + (MIXED_EMOTIONS if include_mixed else ())
    out: dict[str, list[str]] = {}
    for emotion in names:
        path = data_path("repe_emotions_facts", "emotions", f"{emotion}.json")
        items = read_json_list(path)
        for i, s in enumerate(items):
            if not isinstance(s, str) or not s.strip():
                raise DataFormatError(f"{path}: item {i}: expected a non-empty string; got {s!r}")
        out[emotion] = list(items)
    return out


def load_truncated_outputs() -> list[str]:
    """RepE / repeng's short output prefixes for persona pairs (first item is the empty string)."""
    items = read_json_list(
        data_path("repe_emotions_facts", "emotions", "all_truncated_outputs.json")
    )
    return [str(s) for s in items]


def emotion_pairs(emotion: str, *, chat: bool = True, seed: int = 0) -> ContrastDataset:
    """RepE emotion pairs: a scenario of ``emotion`` vs one of another emotion, same prompt."""
    emotion = pick(emotion, EMOTIONS, "emotion")
    data = load_emotions()
    others = [s for e in EMOTIONS if e != emotion for s in data[e]]
    rng = random.Random(seed)
    pairs = []
    for i, scenario in enumerate(data[emotion]):
        other = rng.choice(others)
        pairs.append(
            ContrastPair(
                positive=side(
                    EMOTION_TEMPLATE.format(emotion=emotion, scenario=scenario), None, chat=chat
                ),
                negative=side(
                    EMOTION_TEMPLATE.format(emotion=emotion, scenario=other), None, chat=chat
                ),
                meta={"index": i},
            )
        )
    return ContrastDataset(
        name=f"emotions/{emotion}",
        pairs=pairs,
        source=source_note("repe_emotions_facts", f"RepE {emotion} scenarios vs other emotions"),
        meta={"template": EMOTION_TEMPLATE, "seed": seed, "chat": chat},
    )


# --- CAA
def _read_caa_items(path: Any) -> list[CAAItem]:
    keys = ("question", "answer_matching_behavior", "answer_not_matching_behavior")
    out = []
    for i, obj in enumerate(read_json_list(path)):
        where = f"{path}: item {i}"
        if not isinstance(obj, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        require_keys(obj, keys, where)
        out.append(
            CAAItem(
                question=obj["question"],
                answer_matching_behavior=obj["answer_matching_behavior"].strip(),
                answer_not_matching_behavior=obj["answer_not_matching_behavior"].strip(),
            )
        )
    return out


def load_caa_items(behaviour: str) -> list[CAAItem]:
    """The CAA A/B questions for one of the seven behaviours (``CAA_BEHAVIOURS``)."""
    behaviour = pick(behaviour, CAA_BEHAVIOURS, "CAA behaviour")
    return _read_caa_items(data_path("caa", "generate", behaviour, "generate_dataset.json"))


def load_ab_control() -> list[CAAItem]:
    """Trivially easy A/B questions in CAA's format ("What is 2 + 2? (A) 4 (B) 9"), 32 questions each
    asked twice with the two options swapped; the "matching" answer is the correct one.

    A model that reads the options scores near 1 on them; one that picks a letter without reading them
    scores exactly 0.5 whatever its letter preference (each question's two orders cancel it). See
    :func:`steering.evaluation.control.ab_control`. Written for this project (``repe/data/ab_control``).
    """
    return _read_caa_items(data_path("ab_control", "easy_ab.json"))


def load_behaviour_prompts() -> dict[str, dict[str, str]]:
    """Two system prompts per CAA behaviour (``CAA_BEHAVIOURS``): ``"toward"`` asks for the behaviour
    (the answer CAA marks as matching it), ``"away"`` for its opposite. Written for this project
    (``repe/data/behaviour_prompts``) as the prompting baselines steering is compared with
    (:mod:`steering.evaluation.prompting`)."""
    path = data_path("behaviour_prompts", "prompts.json")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict) or set(d) != set(CAA_BEHAVIOURS):
        raise DataFormatError(
            f"{path}: expected an object with one entry per CAA behaviour {sorted(CAA_BEHAVIOURS)}"
        )
    for name, v in d.items():
        if (
            not isinstance(v, dict)
            or set(v) != {"toward", "away"}
            or not all(isinstance(t, str) and t.strip() for t in v.values())
        ):
            raise DataFormatError(
                f"{path}: {name!r} must be an object with non-empty 'toward' and 'away' texts"
            )
    return {name: {"toward": d[name]["toward"], "away": d[name]["away"]} for name in CAA_BEHAVIOURS}


def _open_answer(answer: str) -> str:
    """``"(A)"`` -> ``"(A"``: CAA reads the activation at the answer letter, before the parenthesis."""
    return answer[:-1] if answer.endswith(")") else answer


def load_caa(behaviour: str, *, chat: bool = True) -> ContrastDataset:
    """CAA pairs: the same A/B question answered with the matching letter (positive) vs the other.

    The assistant turn is ``"(A"`` / ``"(B"`` (closing parenthesis left off, as in CAA, so the last
    token is the letter). Text mode appends ``"\\n\\nAnswer: (A"`` to the question.
    """
    behaviour = pick(behaviour, CAA_BEHAVIOURS, "CAA behaviour")
    pairs = []
    for i, item in enumerate(load_caa_items(behaviour)):
        pos = _open_answer(item.answer_matching_behavior)
        neg = _open_answer(item.answer_not_matching_behavior)
        sep = "\n\nAnswer: "
        pairs.append(
            ContrastPair(
                positive=side(item.question, pos, chat=chat, sep=sep),
                negative=side(item.question, neg, chat=chat, sep=sep),
                label=pos.strip("()"),
                meta={"item": i},
            )
        )
    return ContrastDataset(
        name=f"caa/{behaviour}",
        pairs=pairs,
        source=source_note("caa", f"CAA generate split, {behaviour}"),
        meta={"chat": chat},
    )


# --- persona
def persona_names() -> list[str]:
    """The shipped Anthropic persona behaviours (file stems)."""
    return sorted(p.stem for p in (DATA_DIR / "anthropic_persona").glob("*.jsonl"))


def load_persona(name: str) -> list[PersonaStatement]:
    """Anthropic model-written persona statements for behaviour ``name`` (see ``persona_names()``)."""
    name = pick(name, persona_names(), "persona behaviour")
    path = data_path("anthropic_persona", f"{name}.jsonl")
    out = []
    for line, obj in iter_jsonl(path):
        where = f"{path}:{line}"
        require_keys(obj, ("statement", "question", "answer_matching_behavior"), where)
        answer = obj["answer_matching_behavior"].strip()
        if answer not in ("Yes", "No"):
            raise DataFormatError(
                f"{where}: answer_matching_behavior must be Yes or No; got {answer!r}"
            )
        conf = obj.get("label_confidence")
        out.append(
            PersonaStatement(
                statement=obj["statement"],
                question=obj["question"],
                matches_behavior=answer == "Yes",
                label_confidence=float(conf) if isinstance(conf, int | float) else None,
            )
        )
    return out


def persona_pairs(name: str, *, chat: bool = True) -> ContrastDataset:
    """Persona pairs: the question answered as the persona would ("Yes"/"No") vs the opposite."""
    items = load_persona(name)
    name = pick(name, persona_names(), "persona behaviour")
    pairs = []
    for i, it in enumerate(items):
        yes, no = ("Yes", "No") if it.matches_behavior else ("No", "Yes")
        pairs.append(
            ContrastPair(
                positive=side(it.question, yes, chat=chat, sep="\n"),
                negative=side(it.question, no, chat=chat, sep="\n"),
                label=yes,
                meta={"item": i, "statement": it.statement},
            )
        )
    return ContrastDataset(
        name=f"persona/{name}",
        pairs=pairs,
        source=source_note("anthropic_persona", f"Anthropic persona evals, {name}"),
        meta={"chat": chat},
    )
