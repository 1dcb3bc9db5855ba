"""Clear errors for malformed files, model identity that tells models apart, no download unless asked,
no change to state the caller owns."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from repe.directions import Direction
from repe.errors import ArtifactMismatchError, DataFormatError, ModelNotAvailableError
from repe.models import LoadedModel, load_model, tiny_model
from steering import Condition, SteeringSpec, steer
from steering.export import export, export_gguf, import_gguf, import_lmeval_pt, import_spec_json

SITE = "blocks.2.hook_resid_post"


def direction(lm, site=SITE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Direction(
        {site: torch.randn(lm.d_model, generator=g)}, lm.identity, name="d"
    ).normalized()


# ---- malformed metadata names the key -----------------------------------------------------------


def _rewrite_gguf_meta(src: Path, dst: Path, edit) -> None:
    r = gguf.GGUFReader(str(src))
    meta = json.loads(bytes(r.fields["repe.metadata"].parts[-1]).decode())
    edit(meta)
    w = gguf.GGUFWriter(str(dst), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", 1)
    w.add_string("repe.metadata", json.dumps(meta))
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_malformed_gguf_metadata_names_the_key(tiny_lm, tmp_path):
    p = export_gguf(direction(tiny_lm), tmp_path / "d.gguf")
    _rewrite_gguf_meta(p, tmp_path / "a.gguf", lambda m: m["direction"].pop("model"))
    with pytest.raises(DataFormatError, match="direction.model"):
        import_gguf(tmp_path / "a.gguf")
    _rewrite_gguf_meta(p, tmp_path / "b.gguf", lambda m: m["direction"]["model"].pop("d_model"))
    with pytest.raises(DataFormatError, match="'d_model'"):
        import_gguf(tmp_path / "b.gguf")
    _rewrite_gguf_meta(p, tmp_path / "c.gguf", lambda m: m["direction"].pop("sites"))
    with pytest.raises(DataFormatError, match="sites"):
        import_gguf(tmp_path / "c.gguf")


def test_malformed_pt_names_the_entry(tiny_lm, tmp_path):
    hp = "model.layers.2"
    cases = [
        ({hp: {"steering_vector": [1.0, 2.0]}}, "1-D tensor"),
        ({hp: {"steering_vector": torch.zeros(64), "steering_coefficient": "x"}}, "coefficient"),
        ({"not.a.hookpoint": {"steering_vector": torch.zeros(64)}}, "not.a.hookpoint"),
    ]
    for i, (data, match) in enumerate(cases):
        torch.save(data, tmp_path / f"{i}.pt")
        with pytest.raises(DataFormatError, match=match):
            import_lmeval_pt(tmp_path / f"{i}.pt", tiny_lm.identity)


@pytest.mark.parametrize(
    "path,key",
    [
        (("intervention", "operator"), "operator"),
        (("intervention", "sites"), "sites"),
        (("direction",), "direction"),
        (("vectors",), "vectors"),
        (("direction", "model"), "model"),
    ],
)
def test_malformed_spec_json_names_the_key(tiny_lm, tmp_path, path, key):
    export(SteeringSpec(direction(tiny_lm), coeff=0.5, scale="unit"), tmp_path / "s.json", "spec")
    data = json.loads((tmp_path / "s.json").read_text())
    obj = data
    for k in path[:-1]:
        obj = obj[k]
    del obj[path[-1]]
    (tmp_path / "s.json").write_text(json.dumps(data))
    with pytest.raises(DataFormatError, match=key):
        import_spec_json(tmp_path / "s.json")


def test_a_conditional_spec_that_exports_re_imports(tiny_lm, tmp_path):
    d = direction(tiny_lm)
    cond = Condition(
        direction(tiny_lm, "blocks.0.hook_resid_post", seed=3), "blocks.0.hook_resid_post", 0.1
    )
    spec = SteeringSpec(d, coeff=0.5, scale="unit", condition=cond)
    export(spec, tmp_path / "c.json", "spec")
    back = import_spec_json(tmp_path / "c.json")
    assert back.to_json() == spec.to_json()
    assert back.condition is not None
    enc = tiny_lm.tokenizer(["Hello there", "A cat"], return_tensors="pt", padding=True)
    outs = []
    for s in (spec, back):
        with steer(tiny_lm, s) as state, torch.no_grad():
            state.begin_sequence(attention_mask=enc["attention_mask"])
            outs.append(tiny_lm.model(**enc).logits)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


# ---- identity tells models apart ----------------------------------------------------------------


def test_two_fine_tunes_in_folders_of_the_same_name_differ(tiny_lm, tmp_path):
    for i in range(2):
        m = tiny_model(tokenizer=tiny_lm.tokenizer, seed=i)
        (tmp_path / f"run{i}").mkdir()
        m.model.save_pretrained(tmp_path / f"run{i}" / "model")
        m.tokenizer.save_pretrained(tmp_path / f"run{i}" / "model")
    a = load_model(tmp_path / "run0" / "model")
    b = load_model(tmp_path / "run1" / "model")
    assert a.identity.name == b.identity.name == "model"
    d = direction(a)
    with pytest.raises(ArtifactMismatchError, match="weights differ"):
        d.check_compatible(b)
    d.check_compatible(a)
    # the same weights in float32 and bfloat16 are the same model
    a16 = load_model(tmp_path / "run0" / "model", dtype="bfloat16")
    assert a16.identity.mismatches(a.identity) == []


@pytest.mark.integration
def test_embedded_model_loaded_from_its_cache_path_accepts_its_own_artifacts(embedded_lm):
    from repe.models import embedded_model_dir

    by_path = load_model(embedded_model_dir())
    assert by_path.identity.name != embedded_lm.identity.name  # the folder's name
    d = direction(embedded_lm, "blocks.5.hook_resid_post")
    d.check_compatible(by_path)
    by_path_d = direction(by_path, "blocks.5.hook_resid_post")
    by_path_d.check_compatible(embedded_lm)


def test_old_artifacts_without_hashes_compare_by_name(tiny_lm):
    from dataclasses import replace

    old = replace(tiny_lm.identity, config_hash=None, weights_hash=None)
    assert old.mismatches(tiny_lm.identity) == []
    assert replace(old, name="other").mismatches(tiny_lm.identity)


# ---- no download unless asked --------------------------------------------------------------------


def test_hub_ids_never_download_by_default(monkeypatch):
    """Online (as on a user's machine; the suite itself runs offline), a hub id that is not on this
    machine is refused without asking the hub for the model's files."""
    import huggingface_hub.constants as hub_constants
    import huggingface_hub.file_download as fd

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    asked = []

    def no_metadata(url, *a, **k):
        asked.append(url)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(fd, "get_hf_file_metadata", no_metadata)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(OSError("no")))
    with pytest.raises(ModelNotAvailableError):
        load_model("some-org/a-model-that-is-not-here")
    assert asked == []


# ---- state the caller owns -----------------------------------------------------------------------


def test_tiny_model_leaves_the_global_generator_alone(tiny_lm):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model(tokenizer=tiny_lm.tokenizer, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_loaded_model_does_not_change_the_callers_tokenizer(tiny_lm):
    import copy

    tok = copy.deepcopy(tiny_lm.tokenizer)
    tok.pad_token = None
    assert tok.pad_token is None
    lm = LoadedModel(model=tiny_lm.model, tokenizer=tok, identity=tiny_lm.identity)
    assert tok.pad_token is None
    assert lm.tokenizer.pad_token == tok.eos_token
