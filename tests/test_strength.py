"""A coefficient means one thing everywhere: one calibrated statistic, weights that count, a
coefficient that is never silently 1.0, and one default site set for steer, export and the app."""

from __future__ import annotations

import json

import gguf
import pytest
import torch

from repe.calibration import calibrate, is_calibrated
from repe.directions import Direction
from repe.models import load_model, tiny_model
from steering import SteeringSpec, steer
from steering.spec import resolve

SITES = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post", "blocks.3.hook_resid_post"]
PROMPT = "Tell me about the sea."


@pytest.fixture(scope="module")
def folder_lm(tmp_path_factory, tiny_lm):
    """The tiny model saved as a local folder, so the CLI and the app can load it by path."""
    d = tmp_path_factory.mktemp("tiny") / "model"
    m = tiny_model(tokenizer=tiny_lm.tokenizer, seed=0)
    m.model.save_pretrained(d)
    m.tokenizer.save_pretrained(d)
    return str(d), load_model(d)


def probe_like(lm, best=SITES[1]) -> Direction:
    """A direction as an older ``repe probe`` saved it: unit vectors, a best site, and the sweep's own
    activation statistic stored under the name calibration uses."""
    g = torch.Generator().manual_seed(0)
    vecs = {s: torch.randn(lm.d_model, generator=g) for s in SITES}
    stats = {s: {"resid_norm": 123.0, "mean_diff_norm": 2.0} for s in SITES}
    return Direction(vecs, lm.identity, name="p", stats=stats, best_site=best).normalized()


def last_logits(lm, spec) -> torch.Tensor:
    from repe.chat import chat_prompt

    ids = lm.tokenizer(
        chat_prompt(lm.tokenizer, PROMPT), return_tensors="pt", add_special_tokens=False
    )
    with steer(lm, spec), torch.no_grad():
        return lm.model(**ids).logits[0, -1]


def test_only_calibration_writes_the_relative_statistic(tiny_lm):
    from probes.sweep import sweep
    from repe import capture

    texts = ["a cat", "the dog", "one bird", "a fish", "two cows", "my hen"]
    pos = capture(tiny_lm, texts, SITES[:1], progress=False)
    neg = capture(tiny_lm, [t + " not" for t in texts], SITES[:1], progress=False)
    res = sweep(pos, neg, [0, 1, 2, 3], [4, 5], ["mean_diff"], n_boot=0)
    assert "resid_norm" not in res.stats[SITES[0]] and res.stats[SITES[0]]["contrast_norm"] > 0
    old = probe_like(tiny_lm)
    assert not is_calibrated(old)  # a value without its calibration source does not count
    cal = calibrate(tiny_lm, old)
    assert is_calibrated(cal) and cal.stats[SITES[0]]["resid_norm"] != 123.0
    assert "median per-token" in cal.params["calibration"]


def test_one_file_one_coefficient_same_logits_in_library_cli_and_app(
    folder_lm, tmp_path, monkeypatch
):
    path, lm = folder_lm
    probe_like(lm).save(tmp_path / "p")
    coeff = 0.3
    # library
    d = calibrate(lm, Direction.load(tmp_path / "p", model=lm).select(SITES[1]))
    lib = last_logits(lm, SteeringSpec(d, coeff=coeff))
    # repe steer (the spec it builds, captured where it generates)
    import steering.generate as gen

    seen = {}
    monkeypatch.setattr(
        gen, "compare", lambda lm_, prompts, spec, cfg: seen.setdefault("spec", spec) and []
    )
    from repe.cli import main

    assert (
        main(
            ["steer", "--model", path, "--vector", str(tmp_path / "p"), "--coeff", str(coeff), "x"]
        )
        == 0
    )
    cli = last_logits(lm, seen["spec"])
    # the app
    from app.state import AppState, SteerSettings
    from app.views.steer import build_spec

    state = AppState(model_path=path)
    library = {"p": Direction.load(tmp_path / "p", model=lm)}
    app_spec = build_spec(state, library, SteerSettings(["p"], [1.0], layers=[2], coeff=coeff))
    app = last_logits(lm, app_spec)
    base = last_logits(lm, SteeringSpec(d, coeff=0.0))
    assert not torch.equal(lib, base)
    assert torch.equal(lib, cli) and torch.equal(lib, app)


@pytest.mark.parametrize("scale", ["relative", "unit", "mean_diff"])
def test_weights_set_the_strength_in_every_scale(tiny_lm, scale):
    d = calibrate(tiny_lm, probe_like(tiny_lm))
    full = resolve(tiny_lm, SteeringSpec(d, coeff=0.2, scale=scale)).deltas
    half = resolve(tiny_lm, SteeringSpec(0.5 * d, coeff=0.2, scale=scale)).deltas
    for s in SITES:
        assert torch.allclose(half[s], 0.5 * full[s], atol=1e-6)
    # a weighted sum of two directions steers with both weights
    g = torch.Generator().manual_seed(1)
    e = Direction(
        {s: torch.randn(tiny_lm.d_model, generator=g) for s in SITES},
        tiny_lm.identity,
        name="e",
        stats={s: {"mean_diff_norm": 2.0} for s in SITES},  # as d's, so the sum is linear
    )
    e = calibrate(tiny_lm, e.normalized())
    mix = resolve(tiny_lm, SteeringSpec(0.5 * d + 2.0 * e, coeff=0.2, scale=scale)).deltas
    de = resolve(tiny_lm, SteeringSpec(e, coeff=0.2, scale=scale)).deltas
    for s in SITES:
        assert torch.allclose(mix[s], 0.5 * full[s] + 2.0 * de[s], atol=1e-5)


def test_raw_scale_and_raw_vectors(tiny_lm):
    d = probe_like(tiny_lm)
    raw = resolve(tiny_lm, SteeringSpec(0.5 * d, coeff=2.0, scale="raw")).deltas
    for s in SITES:
        assert torch.allclose(raw[s], 2.0 * 0.5 * d[s], atol=1e-6)
    imported = Direction(
        {s: 7.0 * d[s] for s in SITES}, tiny_lm.identity, name="i", normalisation="raw"
    )
    a = resolve(tiny_lm, SteeringSpec(imported, coeff=2.0, scale="unit")).deltas
    for s in SITES:  # a raw vector of any length counts as its unit direction
        assert torch.allclose(a[s], 2.0 * d[s], atol=1e-5)


def test_app_weights_change_the_steering(folder_lm):
    from app.state import AppState, SteerSettings
    from app.views.steer import build_spec

    path, lm = folder_lm
    library = {"p": calibrate(lm, probe_like(lm))}
    state = AppState(model_path=path)
    one = resolve(
        lm, build_spec(state, library, SteerSettings(["p"], [1.0], layers=[2], coeff=0.3))
    ).deltas
    half = resolve(
        lm, build_spec(state, library, SteerSettings(["p"], [0.5], layers=[2], coeff=0.3))
    ).deltas
    assert torch.allclose(half[SITES[1]], 0.5 * one[SITES[1]], atol=1e-6)


def test_export_needs_a_coefficient_and_uses_the_default_sites(folder_lm, tmp_path, capsys):
    from repe.cli import main

    path, lm = folder_lm
    d = calibrate(lm, probe_like(lm))
    d.save(tmp_path / "p")
    rc = main(
        [
            "export",
            str(tmp_path / "p"),
            "--format",
            "gguf",
            "-o",
            str(tmp_path / "x.gguf"),
            "--model",
            path,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--coeff" in err and not (tmp_path / "x.gguf").exists()
    from dataclasses import replace

    replace(d, recommended_coeff=0.2).save(tmp_path / "r")
    rc = main(
        [
            "export",
            str(tmp_path / "r"),
            "--format",
            "gguf",
            "-o",
            str(tmp_path / "r.gguf"),
            "--model",
            path,
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "recommended coefficient" in out and "0.2" in out
    # the same default site as repe steer: the best site only (block 2 -> direction.2)
    tensors = [t.name for t in gguf.GGUFReader(str(tmp_path / "r.gguf")).tensors]
    assert tensors == ["direction.2"], tensors
    assert "blocks.2.hook_resid_post" in out
    rc = main(
        [
            "export",
            str(tmp_path / "r"),
            "--format",
            "spec",
            "-o",
            str(tmp_path / "all.json"),
            "--all-sites",
            "--model",
            path,
        ]
    )
    assert rc == 0
    assert sorted(json.loads((tmp_path / "all.json").read_text())["vectors"]) == SITES
