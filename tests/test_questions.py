"""Question sets for value maps: the shipped sets, sampling, fingerprints and the user's own files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from repe import datasets as D
from repe.datasets import Question, QuestionSet, load_questions, question_set
from repe.errors import DataFormatError

MIN_SIZES = {"valuebench": 1000, "moralchoice": 600, "persona": 1000, "control": 240}
VALUE_WORDS = ("should i", "moral", "ethic", "right or wrong", "ought", "opinion", "believe")


# --- the shipped sets ----------------------------------------------------------------------------


def test_list_and_unknown_name() -> None:
    assert D.list_question_sets() == ["valuebench", "moralchoice", "persona", "values", "control"]
    with pytest.raises(ValueError, match="valuebench.*moralchoice.*persona.*values.*control"):
        question_set("nope")


@pytest.mark.parametrize("name", ["valuebench", "moralchoice", "persona", "values", "control"])
def test_shipped_set_is_well_formed(name: str) -> None:
    qs = question_set(name)
    assert qs.name == name and qs.source and "\n" not in qs.source
    assert len(qs) >= MIN_SIZES.get(name, sum(MIN_SIZES.values()) - MIN_SIZES["control"])
    assert len(set(qs.ids())) == len(qs)
    assert all(q.text.strip() and q.qid for q in qs.questions)
    kind = "control" if name == "control" else "value"
    assert {q.kind for q in qs.questions} == {kind}
    if name != "values":
        assert {q.set for q in qs.questions} == {name}
        assert all(q.qid.startswith(f"{name}/") for q in qs.questions)
    assert len({" ".join(q.text.split()).casefold() for q in qs.questions}) == len(qs)


def test_valuebench_ids_name_the_questionnaire() -> None:
    qs = question_set("valuebench")
    groups = {q.qid.split("/")[1] for q in qs.questions}
    assert {"PVQ40", "AB5C", "MFT23"} <= groups
    assert all(len(q.qid.split("/")) == 3 for q in qs.questions)


def test_moralchoice_actions_are_not_always_first() -> None:
    items = {s.scenario_id: s for s in D.load_moralchoice_items()}
    qs = question_set("moralchoice")
    moral_first = []
    for q in qs.questions:
        s = items[q.qid.removeprefix("moralchoice/")]
        assert q.text.startswith(s.context.strip())
        moral, immoral = q.text.index(s.moral_action), q.text.index(s.immoral_action)
        moral_first.append(moral < immoral)
    share = sum(moral_first) / len(moral_first)
    assert 0.35 < share < 0.65, share
    again = [q.text for q in question_set("moralchoice").questions]
    assert again == [q.text for q in qs.questions]


def test_persona_is_round_robin_over_files() -> None:
    qs = question_set("persona")
    first = {q.qid.split("/")[1] for q in qs.questions[:48]}
    assert len(first) == len(D.persona_names()) == 48
    assert qs.questions[0].text.startswith('Do you agree with this statement: "')
    assert (
        qs.sample(96).questions
        and len({q.qid.split("/")[1] for q in qs.sample(96).questions}) == 48
    )


def test_values_mix_is_balanced() -> None:
    head = question_set("values").questions[:3]
    assert [q.set for q in head] == ["valuebench", "moralchoice", "persona"]
    for seed in range(5):
        sets = [q.set for q in question_set("values", n=30, seed=seed).questions]
        assert {s: sets.count(s) for s in set(sets)} == {
            "valuebench": 10,
            "moralchoice": 10,
            "persona": 10,
        }


def test_control_questions_are_not_value_laden() -> None:
    qs = question_set("control")
    for q in qs.questions:
        low = q.text.lower()
        assert not any(w in low for w in VALUE_WORDS), q
        assert q.text.endswith("?"), q
    assert "How do I boil an egg?" in {q.text for q in qs.questions}
    assert not {q.text for q in qs.questions} & {q.text for q in question_set("values").questions}


# --- fingerprint and sampling --------------------------------------------------------------------


def test_fingerprint_is_stable_and_changes_with_any_question() -> None:
    qs = question_set("control")
    assert (
        qs.fingerprint
        == question_set("control").fingerprint
        == QuestionSet(qs.name, qs.questions, "another source").fingerprint
    )
    assert len(qs.fingerprint) == 16 and int(qs.fingerprint, 16) >= 0
    changed = list(qs.questions)
    changed[100] = dataclasses.replace(changed[100], text=changed[100].text + " ")
    assert QuestionSet(qs.name, tuple(changed), qs.source).fingerprint != qs.fingerprint
    changed[100] = dataclasses.replace(qs.questions[100], kind="value")
    assert QuestionSet(qs.name, tuple(changed), qs.source).fingerprint != qs.fingerprint
    assert QuestionSet("other", qs.questions, qs.source).fingerprint != qs.fingerprint
    assert QuestionSet(qs.name, qs.questions[::-1], qs.source).fingerprint != qs.fingerprint


@pytest.mark.parametrize("name", ["valuebench", "control", "values"])
def test_sample_is_deterministic_sized_and_ordered(name: str) -> None:
    full = question_set(name)
    a, b = full.sample(50, seed=1), question_set(name, n=50, seed=1)
    assert a == b and a.fingerprint == b.fingerprint and len(a) == 50 and a.name == name
    assert a.ids() != full.sample(50, seed=2).ids()
    position = {qid: i for i, qid in enumerate(full.ids())}
    assert [position[i] for i in a.ids()] == sorted(position[i] for i in a.ids())
    assert full.sample(len(full) + 5) is full and len(full.sample(0)) == 0
    with pytest.raises(ValueError, match="non-negative"):
        full.sample(-1)


def test_sample_spreads_over_id_groups() -> None:
    qs = QuestionSet(
        "t",
        tuple(Question(f"a/{i}", f"a {i}?", "t", "value") for i in range(100))
        + tuple(Question(f"b/x/{i}", f"bx {i}?", "t", "value") for i in range(3))
        + tuple(Question(f"b/y/{i}", f"by {i}?", "t", "value") for i in range(50)),
        "test",
    )
    ids = qs.sample(20, seed=3).ids()
    assert sum(i.startswith("a/") for i in ids) == 10
    assert sum(i.startswith("b/x/") for i in ids) == 3  # a small group gives all it has
    assert sum(i.startswith("b/y/") for i in ids) == 7


def test_question_set_refuses_bad_questions() -> None:
    q = Question("x/1", "What?", "x", "value")
    with pytest.raises(ValueError, match="duplicate id 'x/1'"):
        QuestionSet("x", (q, q), "s")
    with pytest.raises(ValueError, match="kind"):
        QuestionSet("x", (dataclasses.replace(q, kind="other"),), "s")
    with pytest.raises(ValueError, match="empty text"):
        QuestionSet("x", (dataclasses.replace(q, text="  "),), "s")


# --- the user's own questions --------------------------------------------------------------------


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_load_jsonl(tmp_path: Path) -> None:
    rows = [
        {"question": "Why do we dream?"},
        {"id": "q7", "question": " How are you? "},
        {"id": 3, "question": "Hi?"},
    ]
    text = json.dumps(rows[0]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[1:]) + "\n"
    qs = load_questions(_write(tmp_path / "mine.jsonl", text))
    assert qs.name == "mine" and qs.source == "user file mine"
    assert qs.ids() == ["mine/1", "q7", "3"]
    assert [q.text for q in qs.questions] == ["Why do we dream?", "How are you?", "Hi?"]
    assert {(q.set, q.kind) for q in qs.questions} == {("mine", "value")}


def test_load_csv(tmp_path: Path) -> None:
    text = 'id,question\na,"Is it, though?"\n,"Multi\nline?"\n\nc,Third?\n'
    qs = load_questions(_write(tmp_path / "qs.csv", text))
    assert qs.ids() == ["a", "qs/3", "c"]
    assert qs.questions[1].text == "Multi\nline?"
    assert load_questions(_write(tmp_path / "plain.csv", "question\nOne?\nTwo?\n")).ids() == [
        "plain/2",
        "plain/3",
    ]


@pytest.mark.parametrize(
    ("name", "content", "line", "what"),
    [
        ("bad.jsonl", '{"question": "a?"}\n{"question": "b?"\n', 2, "invalid JSON"),
        ("list.jsonl", '{"question": "a?"}\n\n["a?"]\n', 3, "expected a JSON object"),
        ("missing.jsonl", '{"question": "a?"}\n{"id": "x"}\n', 2, "missing key 'question'"),
        ("empty_q.jsonl", '{"question": "a?"}\n{"question": "  "}\n', 2, "empty field 'question'"),
        ("num_q.jsonl", '{"question": 5}\n', 1, "key 'question' has type int"),
        ("bad_id.jsonl", '{"question": "a?", "id": [1]}\n', 1, "'id' must be a string"),
        (
            "dup.jsonl",
            '{"id": "a", "question": "a?"}\n{"question": "b?"}\n{"id": "a", "question": "c?"}\n',
            3,
            "duplicate id 'a' (first on line 1)",
        ),
        (
            "dup2.jsonl",
            '{"question": "a?"}\n{"id": "dup2/1", "question": "b?"}\n',
            2,
            "duplicate id",
        ),
        ("empty.jsonl", "\n\n", 1, "no questions"),
        ("questions.txt", "What?\n", 1, "unsupported question-file type '.txt'"),
        ("latin1.jsonl", b'{"question": "a?"}\n{"question": "caf\xe9?"}\n', 2, "not UTF-8"),
        ("empty.csv", "", 1, "empty file"),
        ("header.csv", "question\n", 1, "no questions"),
        ("nocol.csv", "text\nA?\n", 1, "missing column"),
        ("blank.csv", "id,question\na,A?\nb,\n", 3, "empty field 'question'"),
        ("cols.csv", "id,question\na,A?\n\nb,B?,extra\n", 4, "expected 2 columns"),
        ("dup.csv", "id,question\na,A?\na,B?\n", 3, "duplicate id 'a'"),
        ("latin1.csv", b"question\nA?\n\xff\n", 3, "not UTF-8"),
    ],
)
def test_load_errors_name_the_line(
    tmp_path: Path, name: str, content: str | bytes, line: int, what: str
) -> None:
    path = _write(tmp_path / name, content)
    with pytest.raises(DataFormatError) as info:
        load_questions(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: "), message
    assert what in message, message


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(D.DatasetNotFoundError, match="question file not found"):
        load_questions(tmp_path / "absent.jsonl")
