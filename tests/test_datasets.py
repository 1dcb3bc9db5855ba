"""The datasets layer: shipped data loaders, contrast pairs, persona templates, user pairs files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import repe
from repe import datasets as D
from repe.chat import render
from repe.datasets import ContrastDataset, ContrastPair, DatasetNotFoundError
from repe.errors import DataFormatError

PACKAGE_DATA = Path(repe.__file__).resolve().parent / "data"
FOLDERS = (
    "ab_control",
    "anthropic_persona",
    "behaviour_prompts",
    "caa",
    "control_questions",
    "ethics",
    "fictional_facts",
    "moralchoice",
    "neutral",
    "refusal",
    "repe_emotions_facts",
    "value_instructions",
    "valuebench",
)


# --- shipped data -------------------------------------------------------------------------------


def test_data_dir_is_inside_the_package() -> None:
    assert D.DATA_DIR == PACKAGE_DATA
    assert "shared" not in D.DATA_DIR.parts
    assert set(D.shipped_folders()) == set(FOLDERS)


@pytest.mark.parametrize("folder", FOLDERS)
def test_each_folder_has_source_and_licence(folder: str) -> None:
    d = PACKAGE_DATA / folder
    assert (d / "SOURCE.txt").is_file()
    assert (d / "LICENSE.upstream").is_file()
    assert (d / "LICENSE.upstream").stat().st_size > 100
    assert f"`{folder}/`" in (PACKAGE_DATA / "README.md").read_text()


@pytest.mark.parametrize("folder", FOLDERS)
def test_shipped_files_match_source_checksums(folder: str) -> None:
    d = PACKAGE_DATA / folder
    table: dict[str, str] = {}
    for line in (d / "SOURCE.txt").read_text().splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) >= 5 and len(parts[4]) == 64:
            table[parts[0]] = parts[4]
            table.setdefault(parts[0].rsplit("/", 1)[-1], parts[4])
    docs = {"SOURCE.txt", "LICENSE.upstream", "README.md", "README.txt"}
    data_files = [f for f in d.rglob("*") if f.is_file() and f.name not in docs]
    assert data_files
    for f in data_files:
        rel = f.relative_to(d).as_posix()
        expected = table.get(rel) or table.get(f.name)
        assert expected, f"{rel} is not listed in {folder}/SOURCE.txt"
        assert hashlib.sha256(f.read_bytes()).hexdigest() == expected, rel


def test_load_facts() -> None:
    facts = D.load_facts()
    assert len(facts) == 612
    assert all(isinstance(f, D.LabeledStatement) and f.text for f in facts)
    assert {f.label for f in facts} == {True, False}


def test_load_emotions() -> None:
    em = D.load_emotions()
    assert set(em) == set(D.EMOTIONS)
    assert all(len(v) > 100 and all(isinstance(s, str) and s for s in v) for v in em.values())
    assert set(D.load_emotions(include_mixed=True)) == set(D.EMOTIONS + D.MIXED_EMOTIONS)
    outs = D.load_truncated_outputs()
    assert len(outs) > 500 and all(isinstance(s, str) for s in outs)


def test_emotion_pairs_are_deterministic() -> None:
    a = D.emotion_pairs("anger", chat=False, seed=3)
    b = D.emotion_pairs("anger", chat=False, seed=3)
    assert len(a) == len(D.load_emotions()["anger"])
    assert a.fingerprint() == b.fingerprint()
    assert all("Consider the anger" in p.positive for p in a)  # type: ignore[operator]


@pytest.mark.parametrize("behaviour", D.CAA_BEHAVIOURS)
def test_load_caa_puts_answer_letters_in_assistant_turn(behaviour: str) -> None:
    items = D.load_caa_items(behaviour)
    ds = D.load_caa(behaviour)
    assert len(ds) == len(items) > 100
    assert ds.is_chat
    for item, pair in zip(items, ds, strict=True):
        assert isinstance(pair.positive, list) and isinstance(pair.negative, list)
        assert [m["role"] for m in pair.positive] == ["user", "assistant"]
        pos, neg = pair.positive[-1]["content"], pair.negative[-1]["content"]
        assert pos == item.answer_matching_behavior[:-1]
        assert neg == item.answer_not_matching_behavior[:-1]
        assert pos != neg and pos[0] == "(" and len(pos) == 2 and pos[1].isalpha()
        assert pair.positive[0] == pair.negative[0] == {"role": "user", "content": item.question}
        assert pair.label == pos[1]
        assert f"{pos})" in item.question and f"{neg})" in item.question


def test_load_caa_text_mode_and_unknown_behaviour() -> None:
    ds = D.load_caa("sycophancy", chat=False)
    p = ds[0]
    assert isinstance(p.positive, str) and p.positive.endswith("Answer: (" + str(p.label))
    assert D.load_caa("Survival_Instinct").name == "caa/survival-instinct"
    with pytest.raises(DatasetNotFoundError, match="sycophancy"):
        D.load_caa("flattery")


def test_load_persona() -> None:
    names = D.persona_names()
    assert len(names) == 48 and "agreeableness" in names
    items = D.load_persona("agreeableness")
    assert len(items) > 500
    assert all(isinstance(s, D.PersonaStatement) and s.statement in s.question for s in items)
    assert {s.matches_behavior for s in items} == {True, False}
    ds = D.persona_pairs("agreeableness")
    p = ds[0]
    assert isinstance(p.positive, list) and isinstance(p.negative, list)
    assert {p.positive[-1]["content"], p.negative[-1]["content"]} == {"Yes", "No"}
    with pytest.raises(DatasetNotFoundError, match="agreeableness"):
        D.load_persona("no-such-persona")


def test_load_moralchoice() -> None:
    items = D.load_moralchoice_items()
    assert len(items) == 687
    ds = D.load_moralchoice(chat=False)
    assert len(ds) == 687
    s, p = items[0], ds[0]
    assert p.positive == f"{s.context} {s.moral_action}"
    assert p.negative == f"{s.context} {s.immoral_action}"
    assert set(D.load_moralchoice_templates()) == {"ab", "compare", "repeat"}


@pytest.mark.parametrize("subset", sorted(D.ETHICS_SUBSETS))
def test_load_ethics(subset: str) -> None:
    ds = D.load_ethics(subset, chat=False)
    assert len(ds) > 1000
    assert all(isinstance(p.positive, str) and p.positive != p.negative for p in ds.pairs[:200])
    if subset == "utilitarianism":
        with pytest.raises(ValueError, match="no labels|without labels"):
            D.load_ethics_examples(subset)
    else:
        ex = D.load_ethics_examples(subset)
        assert {e.label for e in ex} == {0, 1}
        assert all(isinstance(e, D.EthicsExample) and e.text for e in ex[:100])


def test_ethics_utilitarianism_first_column_is_positive() -> None:
    ds = D.load_ethics("utilitarianism", chat=False)
    first_line = (PACKAGE_DATA / "ethics/utilitarianism/util_train.csv").read_text().split("\n")[0]
    assert first_line.startswith(f"{ds[0].positive},") or first_line.startswith(
        f'"{ds[0].positive}",'
    )


def test_load_valuebench_and_definitions() -> None:
    items = D.load_valuebench()
    assert len(items) == 1988
    assert {i.agreement for i in items} == {-1, 1}
    assert all(isinstance(i, D.ValueItem) and i.item and i.value for i in items)
    defs = D.load_value_definitions()
    assert len(defs) > 100 and all(defs.values())


def test_load_refusal() -> None:
    train, val = D.load_refusal("train"), D.load_refusal("val")
    assert len(train) == 117 and len(val) == 39
    assert len(D.load_refusal("all")) == len(D.load_refusal("ALL")) == 156
    with pytest.raises(DatasetNotFoundError, match="train, val, all"):
        D.load_refusal("test")
    assert all(isinstance(h, D.HarmfulInstruction) and h.instruction for h in train + val)
    assert not {h.instruction for h in train} & {h.instruction for h in val}


def test_available_and_concepts() -> None:
    av = D.available()
    assert set(av) == {
        "facts",
        "emotions",
        "caa",
        "persona",
        "moralchoice",
        "ethics",
        "valuebench",
        "refusal",
    }
    assert all(av.values())
    concepts = D.list_concepts()
    assert "caa/sycophancy" in concepts and "facts/honesty" in concepts
    assert "persona/agreeableness" in concepts and "ethics/justice" in concepts
    with pytest.raises(DatasetNotFoundError, match="caa/sycophancy"):
        D.load_concept("caa/nope")


@pytest.mark.parametrize("name", D.list_concepts())
def test_every_concept_loads(name: str) -> None:
    ds = D.load_concept(name)
    assert isinstance(ds, ContrastDataset) and len(ds) > 0 and ds.name == name
    assert ds.is_chat


# --- contrast pairs and datasets ------------------------------------------------------------------


def _toy(n: int = 20) -> ContrastDataset:
    return ContrastDataset("toy", [ContrastPair(f"good {i}", f"bad {i}") for i in range(n)])


def test_pair_validation() -> None:
    with pytest.raises(ValueError, match="both be texts or both"):
        ContrastPair("text", [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="empty"):
        ContrastPair("", "x")
    with pytest.raises(ValueError, match="role"):
        ContrastPair([{"role": "bot", "content": "x"}], [{"role": "user", "content": "y"}])
    chat = ContrastPair([{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="mixes"):
        ContrastDataset("mixed", [chat, ContrastPair("a", "b")])


def test_positives_negatives_len() -> None:
    ds = _toy(5)
    assert len(ds) == 5
    assert ds.positives() == [f"good {i}" for i in range(5)]
    assert ds.negatives() == [f"bad {i}" for i in range(5)]


def test_split_is_deterministic_and_disjoint() -> None:
    ds = _toy(50)
    tr1, te1 = ds.split(0.8, seed=7)
    tr2, te2 = ds.split(0.8, seed=7)
    assert tr1.positives() == tr2.positives() and te1.positives() == te2.positives()
    assert len(tr1) == 40 and len(te1) == 10
    assert not set(tr1.positives()) & set(te1.positives())
    assert set(tr1.positives()) | set(te1.positives()) == set(ds.positives())
    assert ds.split(0.8, seed=8)[1].positives() != te1.positives()
    with pytest.raises(ValueError, match="train_frac"):
        ds.split(1.0)


def test_split_keeps_groups_together() -> None:
    pairs = [
        ContrastPair(f"p{g}-{k}", f"n{g}-{k}", meta={"group": g})
        for g in range(10)
        for k in range(3)
    ]
    tr, te = ContrastDataset("g", pairs).split(0.5, seed=1)
    groups_tr = {p.meta["group"] for p in tr}
    groups_te = {p.meta["group"] for p in te}
    assert not groups_tr & groups_te and len(tr) + len(te) == 30


def test_fingerprint_stable_and_content_sensitive() -> None:
    a, b = _toy(), _toy()
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 16
    b.name, b.source = "other", "elsewhere"
    assert a.fingerprint() == b.fingerprint()
    changed = ContrastDataset("toy", [*a.pairs[:-1], ContrastPair("good 19", "bad 19!")])
    assert changed.fingerprint() != a.fingerprint()
    labelled = ContrastDataset("toy", [ContrastPair(p.positive, p.negative, "x") for p in a])
    assert labelled.fingerprint() != a.fingerprint()
    assert ContrastDataset("toy", a.pairs[::-1]).fingerprint() != a.fingerprint()
    # pinned value: artifacts record fingerprints, so the hashing scheme must not drift
    assert ContrastDataset("one", [ContrastPair("a", "b")]).fingerprint() == "03fa096f11a21672"
    assert D.load_caa("sycophancy").fingerprint() == D.load_caa("sycophancy").fingerprint()


def test_sample() -> None:
    ds = _toy(30)
    s = ds.sample(10, seed=2)
    assert len(s) == 10 and s.positives() == ds.sample(10, seed=2).positives()
    assert len(ds.sample(100)) == 30


# --- persona templates ----------------------------------------------------------------------------

STATEMENTS = ["The Earth orbits the Sun once a year.", "Water boils at 100 degrees Celsius."]


def test_persona_pairs_without_tokenizer() -> None:
    ds = D.make_persona_pairs(STATEMENTS, "an honest", "an untruthful", chat=False)
    assert len(ds) == 2
    assert ds[0].positive == (
        "Pretend you're an honest person making statements about the world. " + STATEMENTS[0]
    )
    assert ds[0].negative == (
        "Pretend you're an untruthful person making statements about the world. " + STATEMENTS[0]
    )
    chat = D.make_persona_pairs(STATEMENTS, ["an honest", "a truthful"], ["a lying", "a false"])
    assert len(chat) == 4
    assert chat[0].positive == [
        {
            "role": "user",
            "content": "Pretend you're an honest person making statements about the world.",
        },
        {"role": "assistant", "content": STATEMENTS[0]},
    ]
    with pytest.raises(ValueError, match="same length"):
        D.make_persona_pairs(STATEMENTS, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="persona"):
        D.make_persona_pairs(STATEMENTS, "a", "b", template="no placeholder")


def test_persona_pairs_truncate_with_tokenizer(tiny_lm: repe.LoadedModel) -> None:
    tok = tiny_lm.tokenizer
    ds = D.make_persona_pairs(STATEMENTS, "an honest", "an untruthful", tokenizer=tok)
    n_tokens = [len(tok(s, add_special_tokens=False)["input_ids"]) for s in STATEMENTS]
    assert len(ds) == sum(n - 1 for n in n_tokens)  # one pair per prefix, full statement excluded
    first = [p for p in ds if p.meta["group"] == 0]
    prefixes = [p.positive[-1]["content"] for p in first]  # type: ignore[index]
    assert all(STATEMENTS[0].startswith(x) for x in prefixes)
    assert [len(x) for x in prefixes] == sorted(len(x) for x in prefixes)
    assert prefixes[-1] != STATEMENTS[0] and len(prefixes) == n_tokens[0] - 1
    assert [p.meta["prefix_tokens"] for p in first] == list(range(1, n_tokens[0]))
    for p in first:  # same prefix on both sides, different persona
        assert p.positive[-1] == p.negative[-1]  # type: ignore[index]
        assert p.positive[0] != p.negative[0]  # type: ignore[index]
    # prefixes end on token boundaries: re-tokenising gives the first n tokens
    ids = tok(STATEMENTS[0], add_special_tokens=False)["input_ids"]
    for p in first:
        n = p.meta["prefix_tokens"]
        assert tok(p.positive[-1]["content"], add_special_tokens=False)["input_ids"] == ids[:n]  # type: ignore[index]
    # the split keeps all prefixes of a statement together
    tr, te = ds.split(0.5, seed=0)
    assert {p.meta["group"] for p in tr}.isdisjoint({p.meta["group"] for p in te})
    # truncate=False gives the whole statement once
    assert len(D.make_persona_pairs(STATEMENTS, "a", "b", tokenizer=tok, truncate=False)) == 2


def test_persona_pairs_render_with_chat_template(tiny_lm: repe.LoadedModel) -> None:
    tok = tiny_lm.tokenizer
    ds = D.make_persona_pairs(STATEMENTS[:1], "an honest", "an untruthful", tokenizer=tok)
    for p in ds:
        pos, neg = render(tok, p.positive), render(tok, p.negative)  # type: ignore[arg-type]
        prefix = p.positive[-1]["content"]  # type: ignore[index]
        assert pos.text.endswith(prefix) and neg.text.endswith(prefix)
        assert "an honest person" in pos.text and "an untruthful person" in neg.text
        assert pos.assistant_char_start is not None
        assert pos.text[pos.assistant_char_start :] == prefix
    system = D.make_persona_pairs(
        STATEMENTS[:1], "an honest", "an untruthful", role="system", user="Tell me a fact."
    )
    r = render(tok, system[0].positive)  # type: ignore[arg-type]
    assert [m["role"] for m in system[0].positive] == ["system", "user", "assistant"]  # type: ignore[index]
    assert r.text.endswith(STATEMENTS[0]) and "an honest person" in r.text


def test_facts_honesty_pairs(tiny_lm: repe.LoadedModel) -> None:
    ds = D.facts_honesty_pairs(tokenizer=tiny_lm.tokenizer)
    n_true = sum(f.label for f in D.load_facts())
    assert len({p.meta["group"] for p in ds}) <= n_true
    assert len(ds) > n_true
    assert render(tiny_lm.tokenizer, ds[0].positive).text  # type: ignore[arg-type]


def test_caa_renders_with_chat_template(tiny_lm: repe.LoadedModel) -> None:
    p = D.load_caa("refusal")[0]
    r = render(tiny_lm.tokenizer, p.positive)  # type: ignore[arg-type]
    assert r.text.endswith(p.positive[-1]["content"])  # type: ignore[index]
    assert r.text[r.assistant_char_start :] == "(" + str(p.label)


# --- user pairs files and malformed data ----------------------------------------------------------


def test_load_pairs_file_csv_jsonl_json(tmp_path: Path) -> None:
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text('positive,negative,label,note\n"kind, warm",cold,1,x\nyes,no,,y\n')
    ds = D.load_pairs_file(csv_path)
    assert ds.name == "pairs" and len(ds) == 2
    assert ds[0].positive == "kind, warm" and ds[0].label == "1" and ds[0].meta["note"] == "x"
    assert ds[1].label is None and ds[1].meta["line"] == 3

    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    jl = tmp_path / "pairs.jsonl"
    jl.write_text(
        json.dumps(
            {"positive": conv, "negative": conv[:1] + [{"role": "assistant", "content": "go"}]}
        )
        + "\n\n"
        + json.dumps({"positive": conv, "negative": conv, "label": 2})
        + "\n"
    )
    ds2 = D.load_pairs_file(jl)
    assert ds2.is_chat and len(ds2) == 2 and ds2[1].label == "2" and ds2[1].meta["line"] == 3

    js = tmp_path / "pairs.json"
    js.write_text(json.dumps([{"positive": "a", "negative": "b"}]))
    assert D.load_pairs_file(js, name="mine").name == "mine"


def _error(tmp_path: Path, name: str, content: str) -> str:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataFormatError) as info:
        D.load_pairs_file(path)
    msg = str(info.value)
    assert str(path) in msg
    return msg


def test_jsonl_bad_json_on_line_3(tmp_path: Path) -> None:
    good = json.dumps({"positive": "a", "negative": "b"})
    msg = _error(tmp_path, "bad.jsonl", f"{good}\n{good}\n{{not json\n{good}\n")
    assert f"{tmp_path / 'bad.jsonl'}:3:" in msg and "invalid JSON" in msg


def test_jsonl_missing_key(tmp_path: Path) -> None:
    good = json.dumps({"positive": "a", "negative": "b"})
    msg = _error(tmp_path, "miss.jsonl", f"{good}\n{json.dumps({'positive': 'a'})}\n")
    assert ":2:" in msg and "missing key 'negative'" in msg


def test_jsonl_empty_field_and_bad_conversation(tmp_path: Path) -> None:
    msg = _error(tmp_path, "empty.jsonl", json.dumps({"positive": " ", "negative": "b"}) + "\n")
    assert ":1:" in msg and "empty field 'positive'" in msg
    bad = {
        "positive": [{"role": "robot", "content": "x"}],
        "negative": [{"role": "user", "content": "y"}],
    }
    msg = _error(tmp_path, "conv.jsonl", json.dumps(bad) + "\n")
    assert ":1:" in msg and "role" in msg


def test_csv_missing_column(tmp_path: Path) -> None:
    msg = _error(tmp_path, "cols.csv", "positive,label\na,1\n")
    assert ":1:" in msg and "negative" in msg and "missing column" in msg


def test_csv_empty_field(tmp_path: Path) -> None:
    msg = _error(tmp_path, "empty.csv", "positive,negative\na,b\nc,d\ne,\n")
    assert f"{tmp_path / 'empty.csv'}:4:" in msg and "empty field 'negative'" in msg


def test_csv_wrong_column_count(tmp_path: Path) -> None:
    msg = _error(tmp_path, "count.csv", 'positive,negative\n"multi\nline",b\nx,y,z\n')
    assert ":4:" in msg and "expected 2 columns" in msg and "got 3" in msg


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    (tmp_path / "mine.csv").write_text("positive,negative\na,b\n")
    with pytest.raises(DatasetNotFoundError, match="mine.csv") as info:
        D.load_pairs_file(tmp_path / "typo.csv")
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(DataFormatError, match=r"\.txt"):
        D.load_pairs_file(tmp_path / "pairs.txt")
    assert len(D.load_pairs_file(tmp_path / "mine.csv")) == 1
    (tmp_path / "none.csv").write_text("positive,negative\n")
    with pytest.raises(DataFormatError, match="no contrast pairs"):
        D.load_pairs_file(tmp_path / "none.csv")


def test_load_neutral() -> None:
    texts = D.load_neutral()
    assert len(texts) == 40 and all(t.endswith(".") for t in texts)
