"""Nothing lost, nothing partial: writes fail half-way (monkeypatched writers) and the previous file,
folder or artifact survives; nothing is written outside where the user asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import torch

import repe.artifacts as artifacts
from repe import capture
from repe.activations import ActivationSet
from repe.atomic import atomic_file, write_text
from repe.directions import Direction
from repe.errors import DataFormatError
from repe.models import ModelIdentity

IDENT = ModelIdentity("tiny-random-llama", "LlamaForCausalLM", 4, 64, 49152)
SITES = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
TEXTS = ["The weather today is", "Hello", "A long sentence about rivers", "Cats", "One more"]


def make(seed: int, name="d") -> Direction:
    g = torch.Generator().manual_seed(seed)
    vecs = {s: torch.randn(64, generator=g) for s in SITES}
    return Direction(vecs, IDENT, name=name, method="mean_diff").normalized()


def stray(folder: Path) -> list[str]:
    """Temporary leftovers (names starting with a dot, or ending in .tmp / .prev / .old)."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name.startswith(".") or p.suffix in (".tmp", ".prev", ".old")
    )


# ---- activation sets ----------------------------------------------------------------------------


def test_capture_never_deletes_an_existing_folder(tiny_lm, tmp_path):
    out = tmp_path / "acts"
    first = capture(tiny_lm, TEXTS, SITES, out_dir=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite"):
        capture(tiny_lm, TEXTS[:2], SITES, out_dir=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    again = capture(tiny_lm, TEXTS[:2], SITES, out_dir=out, overwrite=True)
    assert len(again) == 2 and len(ActivationSet.load(out)) == 2 and len(first) == 5
    # a folder that is not an activation set is never replaced, even when asked
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an activation set"):
        capture(tiny_lm, TEXTS, SITES, out_dir=other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    assert stray(tmp_path) == []


def test_save_onto_itself_is_refused(tiny_lm, tmp_path):
    out = tmp_path / "acts"
    disk = capture(tiny_lm, TEXTS, SITES, out_dir=out)
    with pytest.raises(ValueError, match="onto itself"):
        disk.save(out, overwrite=True)
    assert len(ActivationSet.load(out)) == len(TEXTS)
    copy = disk.save(tmp_path / "copy")
    assert torch.equal(ActivationSet.load(copy)[SITES[0]], disk[SITES[0]])


def test_interrupted_capture_leaves_nothing_and_keeps_the_previous_set(tiny_lm, tmp_path):
    out = tmp_path / "acts"
    capture(tiny_lm, TEXTS, SITES, out_dir=out)
    old = ActivationSet.load(out)[SITES[0]].clone()

    def stop(done, total):
        if done >= 2:
            raise KeyboardInterrupt

    for target, overwrite in ((out, True), (tmp_path / "new", False)):
        with pytest.raises(KeyboardInterrupt):
            capture(
                tiny_lm,
                TEXTS * 2,
                SITES,
                out_dir=target,
                overwrite=overwrite,
                batch_size=1,
                shard_size=1,
                on_batch=stop,
            )
    assert torch.equal(ActivationSet.load(out)[SITES[0]], old)
    assert not (tmp_path / "new").exists()
    assert stray(tmp_path) == []


# ---- artifacts (safetensors + JSON pair) ---------------------------------------------------------


def test_artifact_write_failing_mid_way_keeps_the_previous_pair(tmp_path, monkeypatch):
    make(0).save(tmp_path / "d")
    old = Direction.load(tmp_path / "d")
    real = artifacts.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(artifacts, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        make(1).save(tmp_path / "d")
    monkeypatch.undo()
    got = Direction.load(tmp_path / "d")
    assert all(torch.equal(got[s], old[s]) for s in SITES)
    assert stray(tmp_path) == []


def test_crash_between_the_two_renames_loads_the_previous_pair(tmp_path, monkeypatch):
    """The tensors file is renamed, then the process dies before the JSON is: the pair on disk is
    new tensors + old JSON. Loading must give the previous artifact whole, never a mix."""
    make(0).save(tmp_path / "d")
    old = Direction.load(tmp_path / "d")
    real = os.replace
    calls = []

    def crash_on_json(src, dst):
        calls.append(str(dst))
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt  # the process dies here
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_json)
    with pytest.raises(KeyboardInterrupt):
        make(1).save(tmp_path / "d")
    monkeypatch.undo()
    assert calls[0].endswith(".safetensors")  # the tensors really were replaced
    got = Direction.load(tmp_path / "d")
    assert all(torch.equal(got[s], old[s]) for s in SITES)
    assert Direction.load(tmp_path / "d").name == old.name  # the roll-back is lasting
    # the next save completes normally
    make(1).save(tmp_path / "d")
    assert not torch.equal(Direction.load(tmp_path / "d")[SITES[0]], old[SITES[0]])
    assert stray(tmp_path) == []


def test_a_pair_from_two_saves_is_refused(tmp_path):
    make(0, name="a").save(tmp_path / "a")
    make(1, name="b").save(tmp_path / "b")
    (tmp_path / "a.safetensors").write_bytes((tmp_path / "b.safetensors").read_bytes())
    with pytest.raises(DataFormatError, match="two different saves"):
        Direction.load(tmp_path / "a")


# ---- single files (sweep outputs, reports, exports) ----------------------------------------------


def test_atomic_file_failing_mid_way_keeps_the_previous_file(tmp_path):
    p = tmp_path / "sweep.json"
    write_text(p, '{"old": 1}')
    with pytest.raises(RuntimeError), atomic_file(p) as tmp:
        tmp.write_text('{"new": ')
        raise RuntimeError("crashed half-way")
    assert json.loads(p.read_text()) == {"old": 1}
    assert stray(tmp_path) == []


def test_sweep_outputs_are_written_atomically(tiny_lm, tmp_path, monkeypatch):
    import csv

    from probes.sweep import sweep

    pos = capture(tiny_lm, TEXTS * 2, SITES, progress=False)
    neg = capture(tiny_lm, [t + " not" for t in TEXTS * 2], SITES, progress=False)
    result = sweep(pos, neg, list(range(6)), list(range(6, 10)), ["mean_diff"], n_boot=0)
    result.write_json(tmp_path / "sweep.json")
    result.write_csv(tmp_path / "sweep.csv")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(csv.DictWriter, "writerows", fail)
    with pytest.raises(OSError):
        result.write_csv(tmp_path / "sweep.csv")
    monkeypatch.setattr(json, "dumps", fail)
    with pytest.raises(OSError):
        result.write_json(tmp_path / "sweep.json")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# ---- the embedded model's de-quantised cache -------------------------------------------------------

_BUILD = (
    "import sys; from repe.models import embedded_model_dir, _cache_is_complete; "
    "d = embedded_model_dir(); assert _cache_is_complete(d), d; print(d)"
)


@pytest.mark.integration
def test_model_cache_two_first_runs_at_once_and_a_damaged_cache(tmp_path):
    """Two processes build the cache at once in an empty REPE_CACHE: both succeed and the result
    verifies. Then a damaged cache (a truncated weights file under a valid-looking manifest) and a
    crashed run's leftover folder are detected and rebuilt, not trusted."""
    env = {**os.environ, "REPE_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1].decode()[-2000:] for o in outs]
    folder = Path(outs[0][0].decode().strip().splitlines()[-1])
    models = folder.parent
    assert [p.name for p in models.iterdir()] == [folder.name]  # no temporary folder left
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 1024)
    (models / f".{folder.name}.leftover.tmp").mkdir()  # a crashed run's folder: ignored
    run = subprocess.run(
        [sys.executable, "-c", _BUILD], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "incomplete or damaged" in run.stderr


def test_cache_check_refuses_missing_or_changed_files(tmp_path):
    from repe.models import _cache_is_complete, _file_digest

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x" * 1000)
    assert not _cache_is_complete(d)  # no manifest
    (d / ".complete").write_text("ok\n")  # the old marker format
    assert not _cache_is_complete(d)
    manifest = {f.name: _file_digest(f) for f in d.iterdir() if not f.name.startswith(".")}
    (d / ".complete").write_text(json.dumps(manifest))
    assert _cache_is_complete(d)
    (d / "model.safetensors").write_bytes(b"x" * 999)
    assert not _cache_is_complete(d)


# ---- the app never writes outside its folders ----------------------------------------------------


@pytest.mark.parametrize("hostile", ["/abs/x", "../x", "..", "a/../../b", "", "  ", ".hidden"])
def test_app_file_names_stay_inside(hostile, tmp_path):
    from app.names import inside, safe_name

    name = safe_name(hostile)
    assert name and "/" not in name and not name.startswith(".")
    assert inside(tmp_path, hostile).parent == tmp_path.resolve()


def test_app_export_with_hostile_names_writes_only_in_its_temp_folder(tiny_lm, tmp_path):
    from app.views.export import export_bytes
    from steering import SteeringSpec

    d = Direction(
        {"blocks.2.hook_resid_post": torch.randn(64)}, tiny_lm.identity, name="d"
    ).normalized()
    spec = SteeringSpec(d, coeff=1.0, scale="unit")
    tag = uuid.uuid4().hex[:8]
    absolute = tmp_path / f"evil-{tag}"
    relative = f"../evil-{tag}"
    for fmt in ("safetensors", "gguf", "pt", "spec"):
        for name in (str(absolute), relative):
            data = export_bytes(spec, fmt, name)
            assert len(data) > 100  # a real file came back (not an empty zip)
    leaked = [p for p in Path(tempfile.gettempdir()).glob(f"evil-{tag}*")]
    leaked += [p for p in tmp_path.glob(f"evil-{tag}*")]
    assert leaked == []


def test_an_atomic_write_is_readable_by_others_like_a_plain_write(tmp_path):
    """mkstemp's private 0600 does not leak into the result: a new file is 0644 (reports are shared),
    and a replaced file keeps its mode."""
    from repe.atomic import write_text

    p = write_text(tmp_path / "report.html", "x")
    assert p.stat().st_mode & 0o777 == 0o644
    p.chmod(0o600)
    write_text(p, "y")
    assert p.stat().st_mode & 0o777 == 0o600 and p.read_text() == "y"
