"""Direction artifacts: algebra, round trip, refusal of mismatches and malformed files."""

from __future__ import annotations

import json

import pytest
import torch

from repe.directions import Direction
from repe.errors import ArtifactMismatchError, DataFormatError
from repe.models import ModelIdentity

IDENT = ModelIdentity("tiny-random-llama", "LlamaForCausalLM", 4, 64, 49152)
SITES = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]


def make(seed: int, ident: ModelIdentity = IDENT, sites=SITES, name="d") -> Direction:
    g = torch.Generator().manual_seed(seed)
    vecs = {s: torch.randn(ident.d_model, generator=g) for s in sites}
    return Direction(vecs, ident, name=name, method="mean_diff").normalized()


def test_algebra():
    a, b = make(0, name="a"), make(1, name="b")
    c = 0.5 * a - b
    for s in SITES:
        assert torch.allclose(c[s], 0.5 * a[s] - b[s])
    assert (a + b).normalisation == "weighted"
    assert torch.equal((-a)[s], -a[s])
    assert torch.allclose((a - a)[SITES[0]], torch.zeros(64))
    assert "0.5*a" in c.name


def test_algebra_refuses_mismatches():
    a = make(0)
    other_model = ModelIdentity("other", "LlamaForCausalLM", 4, 64, 49152)
    with pytest.raises(ArtifactMismatchError, match="different models"):
        a + make(1, ident=other_model)
    with pytest.raises(ArtifactMismatchError, match="sites differ"):
        a + make(1, sites=SITES[:1])


def test_round_trip_is_exact(tmp_path, tiny_lm):
    a = make(0)
    a = Direction(
        dict(a.vectors),
        IDENT,
        name="honesty",
        method="pca_diff",
        params={"seed": 3},
        dataset_fingerprint="abc",
        metrics={"auroc": 0.9},
        stats={SITES[0]: {"resid_norm": 3.0}},
        best_site=SITES[1],
        recommended_coeff=0.1,
    )
    path = a.save(tmp_path / "honesty")
    assert path.name == "honesty.safetensors" and (tmp_path / "honesty.json").is_file()
    b = Direction.load(tmp_path / "honesty.json", model=tiny_lm)
    for s in SITES:
        assert torch.equal(a[s], b[s])
    assert b.metadata() == a.metadata()
    meta = json.loads((tmp_path / "honesty.json").read_text())
    assert meta["kind"] == "direction" and meta["format_version"] == 1 and meta["hidden_size"] == 64


def test_load_refuses_another_model(tmp_path, embedded_lm):
    make(0).save(tmp_path / "d")
    with pytest.raises(ArtifactMismatchError, match="d_model: 64 != 576"):
        Direction.load(tmp_path / "d", model=embedded_lm)


def test_wrong_hidden_size_and_nan_refused():
    with pytest.raises(ArtifactMismatchError, match="hidden size"):
        Direction({SITES[0]: torch.ones(65)}, IDENT)
    with pytest.raises(ValueError, match="NaN"):
        Direction({SITES[0]: torch.full((64,), float("nan"))}, IDENT)
    with pytest.raises(ValueError, match="out of range"):
        Direction({"blocks.9.hook_resid_post": torch.ones(64)}, IDENT)


def test_malformed_files(tmp_path):
    make(0).save(tmp_path / "d")
    (tmp_path / "d.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match="safetensors"):
        Direction.load(tmp_path / "d")
    make(0).save(tmp_path / "e")
    meta = json.loads((tmp_path / "e.json").read_text())
    meta["kind"] = "banana"
    (tmp_path / "e.json").write_text(json.dumps(meta))
    with pytest.raises(DataFormatError, match="valid kinds"):
        Direction.load(tmp_path / "e")
    (tmp_path / "f.json").write_text("{not json")
    (tmp_path / "f.safetensors").write_bytes(b"")
    with pytest.raises(DataFormatError, match="JSON"):
        Direction.load(tmp_path / "f")
    with pytest.raises(FileNotFoundError, match="missing"):
        Direction.load(tmp_path / "nope")


def test_save_leaves_no_partial_file(tmp_path):
    a = make(0)
    bad = Direction.__new__(Direction)
    object.__setattr__(bad, "__dict__", dict(a.__dict__))
    object.__setattr__(bad, "vectors", {SITES[0]: torch.full((64,), float("inf"))})
    with pytest.raises(ValueError, match="NaN or inf"):
        bad.save(tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_to_returns_a_copy():
    a = make(0)
    b = a.to(dtype=torch.float64)
    assert b[SITES[0]].dtype == torch.float64 and a[SITES[0]].dtype == torch.float32
    b[SITES[0]].zero_()
    assert a[SITES[0]].abs().sum() > 0
