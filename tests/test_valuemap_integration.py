"""Value maps on the embedded model (issue 14), small enough for CI: three personas and a two-step
happiness sweep answer 16 ValueBench (short) and 8 control questions; the pipeline trains, identifies and maps;
the command line reruns it from the answer cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from probes.valuemap.encoder import SentenceEncoder
from probes.valuemap.head import ValueEmbedder
from repe.artifacts import load_artifact
from repe.calibration import calibrate
from repe.cli import main as cli_main
from repe.datasets import question_set
from repe.errors import ArtifactMismatchError
from repe.models import LoadedModel
from steering.evaluation.answers import AnswerCache, collect_answers
from steering.evaluation.valuemap import (
    ValueMapConfig,
    ValueMapResult,
    persona_sources,
    run_valuemap,
    save_valuemap,
    sweep_sources,
)
from steering.generate import GenerationConfig
from steering.spec import SteeringSpec

SAMPLING = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=0.7, top_p=0.9, seed=0)
PERSONAS = ["assistant", "traditionalist", "achiever"]


@pytest.fixture(scope="module")
def setup(embedded_lm: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from probes.run import run_probe

    tmp = tmp_path_factory.mktemp("valuemap")
    rep = run_probe(
        embedded_lm,
        "emotions/happiness",
        readers=["mean_diff"],
        sites=["blocks.12.hook_resid_post"],
        max_pairs=48,
        out_dir=tmp / "probe",
        figure=False,
        progress=False,
    )
    direction = calibrate(embedded_lm, rep.direction)
    direction.save(tmp / "happy")
    swept, traj = sweep_sources(
        SteeringSpec(direction, 0.0, scale="relative"), [0.2, 0.4], label="happy", sampling=SAMPLING
    )
    sources = persona_sources(PERSONAS, SAMPLING) + swept
    cache = AnswerCache(tmp / "cache")
    result = run_valuemap(
        embedded_lm,
        sources,
        question_set("valuebench", n=16),
        question_set("control", n=8),
        trajectories=[traj],
        config=ValueMapConfig(k=10),
        cache=cache,
        progress=False,
    )
    return {"tmp": tmp, "result": result, "sources": sources, "cache": cache}


def test_the_pipeline_answers_trains_identifies_and_maps(setup: dict) -> None:
    r: ValueMapResult = setup["result"]
    assert r.complete and len(r.records) == 5 * (16 + 8)
    assert sum(bool(x.answer) for x in r.records) >= 0.9 * len(r.records)
    assert {x.kind for x in r.records} == {"value", "control"}
    train, val, test = (set(r.splits[k]) for k in ("train", "val", "test"))
    assert not (train & test or train & val or val & test)
    assert set(r.splits["control_index"]).isdisjoint(r.splits["control_test"])
    for key in (
        "head_knn",
        "frozen_knn",
        "tfidf_knn",
        "head_linear",
        "frozen_linear",
        "head_knn_control",
    ):
        s = r.scores[key]
        assert 0 <= s.ci1[0] <= s.acc1 <= s.ci1[1] <= 1 and s.acc1 <= s.acc3
        assert s.chance == pytest.approx(1 / 5)
        assert not set(s.qids) & train  # scored only on held-out questions
    assert r.map_xy.shape == (5, 2) and np.isfinite(r.map_xy).all()


def test_the_steering_sweep_moves_away_from_the_base_source_with_the_coefficient(
    setup: dict,
) -> None:
    (t,) = setup["result"].trajectories
    assert t["names"] == ["assistant", "happy+0.2", "happy+0.4"]
    d1, d2 = t["distance_from_base"]
    assert 0 < d1 < d2


def test_saved_outputs_load_and_the_cache_serves_a_rerun(
    setup: dict, embedded_lm: LoadedModel
) -> None:
    r: ValueMapResult = setup["result"]
    paths = save_valuemap(r, setup["tmp"] / "out")
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["scores"]["head_knn"]["n_records"] == r.scores["head_knn"].n_records
    assert "steering sweep" in paths["map"].read_text()
    head = load_artifact(paths["artifact"])
    assert isinstance(head, ValueEmbedder)
    assert head.info["questions"]["fingerprint"] == question_set("valuebench", n=16).fingerprint
    again = collect_answers(
        embedded_lm,
        setup["sources"],
        question_set("valuebench", n=16),
        cache=setup["cache"],
        progress=False,
    )
    assert again.generated == 0
    assert [x.answer for x in again.records] == [x.answer for x in r.records if x.kind == "value"]


def test_the_command_line_writes_the_map_metrics_and_head(setup: dict, capsys) -> None:
    tmp = setup["tmp"]
    # the question set, length, neighbours and answer cache both runs share
    small = ["--questions", "valuebench", "--n-questions", "16", "--tokens", "16", "--k", "10"]
    small += ["--cache", str(tmp / "cache")]
    code = cli_main(
        [
            "valuemap",
            "--personas", ",".join(PERSONAS),
            "--direction", str(tmp / "happy.safetensors"),
            "--coeffs=0.2,0.4",
            "--sweep-label", "happy",
            *small,
            "--control", "8",
            "--out", str(tmp / "cli"),
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "head_knn" in out and "spearman" in out
    for name in (
        "value_map.html",
        "confusion.html",
        "metrics.json",
        "value_head.json",
        "value_head.safetensors",
    ):
        assert (tmp / "cli" / name).is_file()
    assert cli_main(["valuemap", "--personas", "assistant,nobody"]) == 2
    assert "unknown personas" in capsys.readouterr().err
    # the default head reads every encoder layer (an ensemble of 5), its artifact says so, and the
    # frozen features it reads are scored without it beside the other baselines
    head = load_artifact(tmp / "cli" / "value_head.safetensors")
    assert head.info["encoder"]["layers"] == "all" and head.head.d_in == 6 * 384
    assert head.head.config.ensemble == 5 and head.head.d_out == 5 * 384
    assert (
        "frozen_knn_head_input" in json.loads((tmp / "cli" / "metrics.json").read_text())["scores"]
    )
    with pytest.raises(ArtifactMismatchError, match="layers"):
        head.check_encoder(SentenceEncoder().identity)
    # the head on the sentence embedding alone: same cached answers
    code = cli_main(
        [
            "valuemap",
            "--personas", ",".join(PERSONAS),
            *small,
            "--control", "0",
            "--head-layers", "last",
            "--out", str(tmp / "cli_last"),
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().out
    head = load_artifact(tmp / "cli_last" / "value_head.safetensors")
    assert head.info["encoder"]["layers"] == "last" and head.head.d_in == 384
    assert (
        "frozen_knn_head_input"
        not in json.loads((tmp / "cli_last" / "metrics.json").read_text())["scores"]
    )
    head.check_encoder(SentenceEncoder().identity)
