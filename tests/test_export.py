"""Exporters: every format round-trips; repeng's GGUF reproduces repeng's logits; bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from repe.directions import Direction
from repe.errors import ArtifactMismatchError, DataFormatError
from steering import SteeringSpec, steer
from steering.export import (
    export,
    export_gguf,
    import_gguf,
    import_lmeval_pt,
    import_spec_json,
    llama_cpp_command,
    read_gguf,
    serving_direction,
)

DATA = Path(__file__).parent / "data" / "repeng"
SITES = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]


def direction(lm, sites=SITES) -> Direction:
    g = torch.Generator().manual_seed(0)
    vecs = {s: torch.randn(lm.d_model, generator=g) for s in sites}
    stats = {s: {"resid_norm": 7.5 + i, "mean_diff_norm": 2.0} for i, s in enumerate(sites)}
    return Direction(
        vecs, lm.identity, name="d", method="mean_diff", stats=stats, dataset_fingerprint="abc"
    ).normalized()


def logits(lm, texts):
    lm.tokenizer.padding_side = "left"
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return lm.model(**enc).logits[:, -1]


def test_gguf_round_trip_and_metadata(tiny_lm, tmp_path):
    d = direction(tiny_lm)
    p = export_gguf(d, tmp_path / "d.gguf")
    vectors, meta = read_gguf(p)
    assert sorted(vectors) == [1, 3]
    assert all(v.dtype == np.float32 and v.shape == (64,) for v in vectors.values())
    assert meta["model_hint"] == "llama"
    back = import_gguf(p)  # our own file needs no identity
    assert back.metadata() == d.metadata()
    for s in SITES:
        assert torch.equal(back[s], d[s])
    # llama.cpp's reader keys
    import gguf

    r = gguf.GGUFReader(str(p))
    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "controlvector"
    assert int(r.fields["controlvector.layer_count"].parts[-1][0]) == 2


def test_gguf_folded_coefficient(tiny_lm, tmp_path):
    d = direction(tiny_lm)
    export_gguf(d, tmp_path / "f.gguf", coeff=2.5)
    vectors, _ = read_gguf(tmp_path / "f.gguf")
    assert np.allclose(vectors[1], 2.5 * d[SITES[0]].numpy())
    assert import_gguf(tmp_path / "f.gguf").params["folded_coeff"] == 2.5


def test_gguf_refuses_block_zero_and_other_sites(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="direction.0"):
        export_gguf(direction(tiny_lm, ["blocks.0.hook_resid_post"]), tmp_path / "z.gguf")
    with pytest.raises(ValueError, match="block outputs only"):
        export_gguf(direction(tiny_lm, ["blocks.2.hook_mlp_out"]), tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="NaN or inf"):
        export_gguf(direction(tiny_lm), tmp_path / "n.gguf", coeff=float("inf"))
    assert list(tmp_path.iterdir()) == []  # nothing partial left behind


def test_serving_direction_reproduces_relative_steering(tiny_lm, tmp_path):
    d = direction(tiny_lm)
    texts = ["The cat sat on the mat.", "Hello there"]
    with steer(tiny_lm, SteeringSpec(d, coeff=0.2, scale="relative")):
        ours = logits(tiny_lm, texts)
    p = export(SteeringSpec(d, coeff=0.2), tmp_path / "s.gguf", "gguf")
    raw = import_gguf(p)
    # the file holds unit(v) * resid_norm; adding coeff * file == our relative steering
    file_dir = Direction(dict(raw.vectors), tiny_lm.identity, normalisation="raw")
    with steer(tiny_lm, SteeringSpec(file_dir * 0.2, coeff=1.0, scale="raw")):
        theirs = logits(tiny_lm, texts)
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert serving_direction(d)[SITES[1]].norm() == pytest.approx(8.5, rel=1e-5)


def test_pt_round_trip(tiny_lm, tmp_path):
    d = direction(tiny_lm)
    spec = SteeringSpec(d, coeff=0.3)
    export(spec, tmp_path / "d.pt", "pt")
    raw = torch.load(tmp_path / "d.pt", weights_only=True)
    assert set(raw) == {"layers.1", "layers.3"}
    assert raw["layers.1"]["action"] == "add" and raw["layers.1"]["steering_coefficient"] == 0.3
    back, coeffs, action = import_lmeval_pt(tmp_path / "d.pt", tiny_lm.identity)
    assert action == "add" and coeffs == {s: 0.3 for s in SITES}
    texts = ["A short text", "Another one here"]
    with steer(tiny_lm, spec):
        ours = logits(tiny_lm, texts)
    with steer(tiny_lm, SteeringSpec(back, coeff=coeffs, scale="raw")):
        theirs = logits(tiny_lm, texts)
    assert torch.allclose(ours, theirs, atol=1e-4)
    with pytest.raises(ValueError, match="add and clamp"):
        export(SteeringSpec(d, coeff=0.3, operator="ablate"), tmp_path / "x.pt", "pt")


def test_spec_json_round_trip_is_exact(tiny_lm, tmp_path):
    d = direction(tiny_lm)
    spec = SteeringSpec(
        d,
        coeff={SITES[0]: 0.1, SITES[1]: -0.2},
        operator="ablate_add",
        positions=[0, 2],
        scale="relative",
    )
    export(spec, tmp_path / "s.json", "spec")
    back = import_spec_json(tmp_path / "s.json")
    assert back.to_json() == spec.to_json()
    for s in SITES:
        assert torch.equal(back.direction[s], d[s])
    assert back.direction.stats == d.stats
    payload = json.loads((tmp_path / "s.json").read_text())
    assert payload["intervention"]["operator"] == "ablate_add"


def test_safetensors_round_trip(tiny_lm, tmp_path):
    d = direction(tiny_lm)
    export(SteeringSpec(d, coeff=0.15), tmp_path / "n", "safetensors")
    back = Direction.load(tmp_path / "n", model=tiny_lm)
    assert back.recommended_coeff == 0.15 and torch.equal(back[SITES[0]], d[SITES[0]])


def test_bad_inputs(tiny_lm, embedded_lm, tmp_path):
    d = direction(tiny_lm)
    with pytest.raises(ValueError, match="format must be one of"):
        export(SteeringSpec(d, coeff=1.0), tmp_path / "x", "onnx")
    p = export_gguf(d, tmp_path / "d.gguf")
    # wrong model: our file carries its identity
    with pytest.raises(ArtifactMismatchError):
        import_gguf(p, identity=embedded_lm.identity)
    # truncated and corrupt files
    data = p.read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError):
        import_gguf(tmp_path / "t.gguf")
    (tmp_path / "c.gguf").write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(DataFormatError):
        import_gguf(tmp_path / "c.gguf")
    (tmp_path / "j.json").write_text("{oops")
    with pytest.raises(DataFormatError):
        import_spec_json(tmp_path / "j.json")
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    with pytest.raises(DataFormatError):
        import_lmeval_pt(tmp_path / "bad.pt", tiny_lm.identity)
    # a foreign file of the wrong hidden size
    with pytest.raises(DataFormatError, match="hidden size"):
        import_gguf(DATA / "happy_sad.gguf", identity=tiny_lm.identity)
    with pytest.raises(ValueError, match="identity"):
        import_gguf(DATA / "happy_sad.gguf")
    # an export that fails keeps the old file intact and leaves no temporary file
    with pytest.raises(ValueError):
        export_gguf(d, p, coeff=float("nan"))
    assert p.read_bytes() == data
    assert sorted(f.name for f in tmp_path.iterdir() if f.name.startswith(".")) == []


def test_llama_cpp_command():
    cmd = llama_cpp_command("h.gguf", "model.gguf", 0.5, [13, 25])
    assert (
        "--control-vector-scaled h.gguf:0.5" in cmd and "--control-vector-layer-range 13 25" in cmd
    )


@pytest.mark.integration
def test_repeng_gguf_reproduces_repeng_logits(embedded_lm):
    meta = json.loads((DATA / "repeng_logits.json").read_text())
    ref = np.load(DATA / "repeng_logits.npz")
    d = import_gguf(DATA / "happy_sad.gguf", identity=embedded_lm.identity)
    assert d.sites == [f"blocks.{layer}.hook_resid_post" for layer in meta["layers"]]
    from repe.chat import chat_prompt

    tok = embedded_lm.tokenizer
    for coeff in meta["coefficients"]:
        want = torch.from_numpy(ref[f"logits_coeff_{coeff:+.1f}"])
        got = []
        for prompt in meta["prompts"]:
            enc = tok(chat_prompt(tok, prompt), return_tensors="pt", add_special_tokens=False)
            with steer(embedded_lm, SteeringSpec(d, coeff=coeff, scale="raw")), torch.no_grad():
                got.append(embedded_lm.model(**enc).logits[0, -1])
        got_t = torch.stack(got)
        assert (got_t - want).abs().max() < 2e-3 * want.abs().max(), coeff
    # an off-by-one in the site mapping would not reproduce them
    shifted = Direction(
        {f"blocks.{int(s.split('.')[1]) - 1}.hook_resid_post": v for s, v in d.vectors.items()},
        embedded_lm.identity,
        normalisation="raw",
    )
    enc = tok(chat_prompt(tok, meta["prompts"][0]), return_tensors="pt", add_special_tokens=False)
    with steer(embedded_lm, SteeringSpec(shifted, coeff=2.0, scale="raw")), torch.no_grad():
        off = embedded_lm.model(**enc).logits[0, -1]
    want = torch.from_numpy(ref["logits_coeff_+2.0"])[0]
    assert (off - want).abs().max() > 10 * 2e-3 * want.abs().max()
