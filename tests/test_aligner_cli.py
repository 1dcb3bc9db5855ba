"""``repe aligner train|eval|export`` on a tiny model saved to disk, and the serving spec's round trip."""

from __future__ import annotations

import json

import pytest
import torch

from repe.cli import main
from repe.errors import DataFormatError
from repe.models import load_model
from steering.aligner import Aligner
from steering.hooks import steer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_lm):
    src = tmp_path_factory.mktemp("tiny")
    tiny_lm.model.save_pretrained(src)
    tiny_lm.tokenizer.save_pretrained(src)
    return src


def _chats(path, n=8):
    rows = [{"prompt": f"Question {i}?", "response": "Ahoy! An answer."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_on_own_data_then_eval_then_export(tiny_dir, tmp_path, capsys):
    data = _chats(tmp_path / "chats.jsonl")
    out = tmp_path / "al"
    argv = ["aligner", "train", "--model", str(tiny_dir), "--data", str(data), "--out", str(out)]
    assert main([*argv, "--n-tokens", "4", "--start-layer", "1", "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    al = Aligner.load(out / "aligner")
    assert al.n_tokens == 4 and al.start_layer == 1 and al.method == "sft"
    assert f'"parameters": {al.n_parameters}' in printed
    assert al.params["n_examples"] == 8 and len(al.params["data_fingerprint"]) == 16

    ev = ["aligner", "eval", "--model", str(tiny_dir), "--aligner", str(out / "aligner")]
    assert main([*ev, "--task", "form", "--train", "4", "--held", "4"]) == 0
    assert "success: base 0.000" in capsys.readouterr().out

    spec = tmp_path / "serve" / "al_spec.json"
    spec.parent.mkdir()
    assert (
        main(["aligner", "export", "--aligner", str(out / "aligner"), "--output", str(spec)]) == 0
    )
    assert "cannot carry" not in capsys.readouterr().err
    back = Aligner.from_spec(spec)
    assert torch.equal(back.tokens, al.tokens) and torch.equal(back.gates, al.gates)
    assert (spec.parent / "al_spec.safetensors").is_file()
    payload = json.loads(spec.read_text())
    assert payload["blocks"] == list(range(1, al.identity.n_layers))
    assert payload["attention"]["n_kv_heads"] == 2 and "softmax" in payload["formula"]
    lm = load_model(tiny_dir)
    ids = lm.tokenizer("the spec applies as saved", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with steer(lm, al):
            a = lm.model(input_ids=ids).logits
        with steer(lm, back):
            b = lm.model(input_ids=ids).logits
    assert torch.equal(a, b)


def test_llama_cpp_export_is_refused_with_the_reason(tiny_dir, tmp_path, capsys):
    al = Aligner.init(load_model(tiny_dir), 1, start_layer=1)
    al.save(tmp_path / "al")
    capsys.readouterr()
    argv = ["aligner", "export", "--aligner", str(tmp_path / "al"), "--format", "gguf"]
    assert main([*argv, "--output", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "control-vector format" in err and "cannot carry an Aligner" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.gguf").exists()


def test_bad_data_and_flags_get_one_line_errors(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "a", "response": "b"}\n{"prompt": "c", "chosen": "d", "rejected": "e"}\n'
    )
    argv = [
        "aligner",
        "train",
        "--model",
        str(tiny_dir),
        "--data",
        str(bad),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    assert main(["aligner", "train", "--task", "nope", "--out", str(tmp_path / "o")]) == 2
    assert main(["aligner"]) == 2
    (tmp_path / "junk.json").write_text('{"kind": "something else"}')
    with pytest.raises(DataFormatError, match="not an Aligner spec"):
        Aligner.from_spec(tmp_path / "junk.json")
