"""The command line, run in-process on the embedded model."""

from __future__ import annotations

import pytest
import torch

from repe.cli import main
from repe.directions import Direction


@pytest.mark.integration
def test_quickstart_prints_per_layer_separation(capsys):
    assert main(["quickstart", "--pairs", "48", "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.hook_resid_post" in out and "blocks.29.hook_resid_post" in out
    assert "best site: blocks." in out


@pytest.mark.integration
def test_steer_prints_baseline_and_steered(tmp_path, capsys, embedded_lm):
    g = torch.Generator().manual_seed(0)
    site = "blocks.14.hook_resid_post"
    Direction(
        {site: torch.randn(576, generator=g)}, embedded_lm.identity, name="rand"
    ).normalized().save(tmp_path / "rand")
    rc = main(
        [
            "steer",
            "--vector",
            str(tmp_path / "rand.safetensors"),
            "--coeff",
            "0.6",
            "--max-new-tokens",
            "8",
            "Describe the ocean.",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    base = out.split("--- baseline:\n")[1].split("\n--- steered:")[0]
    steered = out.split("--- steered:\n")[1]
    assert base.strip() and steered.strip() and base.strip() != steered.strip()


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    rc = main(["steer", "--vector", str(tmp_path / "missing.safetensors"), "--coeff", "1", "hi"])
    assert rc == 2
    assert "error:" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    assert '"d_model": 576' in capsys.readouterr().out


def test_export_gguf_prints_the_llama_cpp_command(tmp_path, capsys, embedded_lm):
    g = torch.Generator().manual_seed(1)
    sites = ["blocks.0.hook_resid_post", "blocks.10.hook_resid_post", "blocks.12.hook_resid_post"]
    stats = {s: {"resid_norm": 20.0} for s in sites}
    Direction(
        {s: torch.randn(576, generator=g) for s in sites}, embedded_lm.identity, stats=stats
    ).normalized().save(tmp_path / "v")
    rc = main(
        [
            "export",
            str(tmp_path / "v.safetensors"),
            "--format",
            "gguf",
            "-o",
            str(tmp_path / "v.gguf"),
            "--coeff",
            "0.1",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "v.gguf").is_file()
    assert (
        f"--control-vector-scaled {tmp_path / 'v.gguf'}:0.1" in out
        and "--control-vector-layer-range 10 12" in out
    )
    assert "block 0" in out
    rc = main(
        [
            "export",
            str(tmp_path / "v.safetensors"),
            "--format",
            "gguf",
            "-o",
            str(tmp_path / "w.gguf"),
            "--keep-block0",
            "--coeff",
            "0.1",
        ]
    )
    assert rc == 2 and "direction.0" in capsys.readouterr().err
    assert not (tmp_path / "w.gguf").exists()


@pytest.mark.integration
def test_probe_saves_direction_table_and_figure(tmp_path, capsys):
    rc = main(
        [
            "probe",
            "--concept",
            "emotions/happiness",
            "--out",
            str(tmp_path),
            "--max-pairs",
            "40",
            "--readers",
            "mean_diff,random",
            "--sites",
            "blocks.1[05].hook_resid_post",
            "--n-boot",
            "50",
            "--batch-size",
            "20",
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "blocks.10.hook_resid_post" in out and "blocks.15.hook_resid_post" in out
    saved = Direction.load(tmp_path / "happiness.json")
    assert saved.best_site in ("blocks.10.hook_resid_post", "blocks.15.hook_resid_post")
    assert (tmp_path / "sweep.html").is_file()


@pytest.mark.integration
def test_sweep_recommends_and_saves(tmp_path, capsys):
    """A behaviour this model shows in cloze form (coordinate-other-ais moves by about +0.1 at +0.1 on
    block 12, KL about 0.03): the sweep must recommend the positive coefficient and save it."""
    argv = ["sweep", "--behaviour", "coordinate-other-ais", "--form", "cloze", "--layers", "12"]
    rc = main(
        [*argv, "--coeffs=-0.1,0,0.1", "--items", "16", "--pairs", "32"]
        + ["--out", str(tmp_path / "c")]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "saved the vector" in captured.out
    saved = Direction.load(tmp_path / "c")
    assert saved.recommended_coeff == 0.1 and saved.best_site == "blocks.12.hook_resid_post"


@pytest.mark.integration
def test_sweep_without_a_positive_coefficient_recommends_nothing(tmp_path, capsys):
    argv = ["sweep", "--behaviour", "coordinate-other-ais", "--form", "cloze", "--layers", "12"]
    rc = main(
        [*argv, "--coeffs=-0.1,0", "--items", "8", "--pairs", "16", "--out", str(tmp_path / "c")]
    )
    captured = capsys.readouterr()
    assert rc == 2 and "recommends no setting" in captured.err
    assert not (tmp_path / "c.json").exists() and not (tmp_path / "c.safetensors").exists()


@pytest.mark.integration
def test_sweep_in_cloze_form(tmp_path, capsys):
    rc = main(
        [
            "sweep",
            "--behaviour",
            "myopic-reward",
            "--form",
            "cloze",
            "--layers",
            "6",
            "--coeffs=-0.2,0.2",
            "--items",
            "6",
            "--pairs",
            "16",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "Cloze sweep myopic-reward: 6 held-out items" in out
    assert "A/B control" not in out  # the letter control belongs to the A/B form
    assert "layer   coeff   cloze" in out


# ---- every bad input is one line naming the flag or file ---------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory, embedded_lm):
    d = tmp_path_factory.mktemp("cli")
    Direction(
        {"blocks.14.hook_resid_post": torch.randn(576)}, embedded_lm.identity, name="v"
    ).normalized().save(d / "v")
    (d / "texts.txt").write_text("one\ntwo\n")
    (d / "empty.txt").write_text("\n\n")
    (d / "garbage.json").write_text("{not json")
    (d / "garbage.safetensors").write_bytes(b"\x00" * 16)
    (d / "pairs.jsonl").write_text('{"positive": "a", "negative": "b"}\n{"positive": 3\n')
    (d / "set").mkdir()
    (d / "set" / "meta.json").write_text("{}")
    return d


BAD = [
    (["quickstart", "--pairs", "x"], "--pairs"),
    (["quickstart", "--batch-size", "0"], "--batch-size"),
    (["info", "--model", "{d}/no-such-model"], "no-such-model"),
    (["capture", "{d}/missing.txt", "--out", "{d}/o"], "missing.txt"),
    (["capture", "{d}/empty.txt", "--out", "{d}/o"], "empty.txt"),
    (["capture", "{d}/texts.txt", "--out", "{d}/o", "--positions", "middle"], "--positions"),
    (
        ["capture", "{d}/texts.txt", "--out", "{d}/o", "--sites", "blocks.99.hook_resid_post"],
        "--sites",
    ),
    (
        ["capture", "{d}/texts.txt", "--out", "{d}/set", "--sites", "blocks.1.hook_resid_post"],
        "--out",
    ),
    (["probe", "--concept", "no-such-concept", "--out", "{d}/p"], "--concept"),
    (["probe", "--data", "{d}/missing.jsonl", "--out", "{d}/p"], "missing.jsonl"),
    (["probe", "--data", "{d}/pairs.jsonl", "--out", "{d}/p"], "pairs.jsonl"),
    (["probe", "--concept", "honesty", "--out", "{d}/p", "--positions", "middle"], "--positions"),
    (["probe", "--concept", "honesty", "--out", "{d}/p", "--max-pairs", "0"], "--max-pairs"),
    (["steer", "--vector", "{d}/missing", "--coeff", "1", "hi"], "missing"),
    (["steer", "--vector", "{d}/garbage", "--coeff", "1", "hi"], "garbage"),
    (["steer", "--vector", "{d}/v", "--coeff", "x", "hi"], "--coeff"),
    (
        ["steer", "--vector", "{d}/v", "--coeff", "1", "--sites", "blocks.3.hook_resid_post", "hi"],
        "--sites",
    ),
    (["steer", "--vector", "{d}/v", "--coeff", "1", "--operator", "multiply", "hi"], "--operator"),
    (["sweep", "--behaviour", "no-such-behaviour"], "--behaviour"),
    (["sweep", "--behaviour", "refusal", "--layers", "a,b"], "--layers"),
    (["sweep", "--behaviour", "refusal", "--layers", "99"], "--layers"),
    (["sweep", "--behaviour", "refusal", "--coeffs=x"], "--coeffs"),
    (["sweep", "--behaviour", "refusal", "--vector", "{d}/missing"], "missing"),
    (["export", "{d}/missing", "--format", "gguf", "-o", "{d}/x.gguf"], "missing"),
    (["export", "{d}/garbage", "--format", "gguf", "-o", "{d}/x.gguf"], "garbage"),
    (["export", "{d}/v", "--format", "xyz", "-o", "{d}/x"], "--format"),
    (
        [
            "export",
            "{d}/v",
            "--format",
            "spec",
            "-o",
            "{d}/x.json",
            "--scale",
            "unit",
            "--sites",
            "nope",
        ],
        "--sites",
    ),
    (["app", "--port", "x"], "--port"),
    (["no-such-command"], "no-such-command"),
]


@pytest.mark.parametrize("argv,names", BAD, ids=[" ".join(a[:2]) + f" ({n})" for a, n in BAD])
def test_bad_input_is_one_line_naming_the_flag_or_file(files, capsys, argv, names):
    rc = main([a.format(d=files) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err  # one line, the last
    assert "Traceback" not in err and errors[0].startswith("repe")
    assert names in errors[0], err


def test_app_workspace_flag_sets_the_folder_for_the_server(tmp_path, monkeypatch) -> None:
    """``repe app --workspace DIR``: the server process gets ``REPE_WORKSPACE`` (absolute)."""
    import os

    from repe.cli import build_parser, cmd_app

    seen: dict[str, object] = {}

    def fake_execv(path: str, argv: list[str]) -> None:
        seen["argv"] = argv
        seen["workspace"] = os.environ.get("REPE_WORKSPACE")

    monkeypatch.setattr(os, "execv", fake_execv)
    monkeypatch.delenv("REPE_WORKSPACE", raising=False)
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["app", "--headless", "--workspace", "ws"])
    cmd_app(args)
    assert seen["workspace"] == str(tmp_path / "ws")
    assert "streamlit" in seen["argv"]
