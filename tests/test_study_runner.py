"""Studies (issue 17): TOML files validated with key + line errors; a cached runner that resumes an
interrupted run without recomputing finished steps, recomputes only what a changed setting touches,
reruns from the record alone with identical metrics, fans independent steps out to processes; the run
record holds everything it promises; ``repe study`` on the command line. All on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from repe.cli import main
from studies import runner
from studies.runner import read_record, rerun, run_study
from studies.spec import StudyError, loads
from studies.steps import KINDS

STUDY = """\
[study]
name = "tiny_demo"
description = "two probes and a scan on the tiny model"
model = "tiny"
seed = 3

[[steps]]
id = "honesty"
kind = "probe"
concept = "facts/honesty"
n_pairs = 24
readers = ["mean_diff", "logistic"]
n_boot = 50

[[steps]]
id = "scan"
kind = "scan"
direction = "honesty"
n_facts = 2

[[steps]]
id = "happy"
kind = "probe"
concept = "emotions/happiness"
n_pairs = 16
readers = ["mean_diff"]
n_boot = 50
"""


@pytest.fixture()
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often each step's computation really ran (in this process)."""
    calls: dict[str, int] = {}
    for name, k in list(KINDS.items()):

        def wrapped(ctx, _run=k.run):  # noqa: ANN001, ANN202
            calls[ctx.step_id] = calls.get(ctx.step_id, 0) + 1
            return _run(ctx)

        monkeypatch.setitem(KINDS, name, type(k)(**{**k.__dict__, "run": wrapped}))
    return calls


def study(tmp_path: Path, text: str = STUDY):  # noqa: ANN201
    return loads(text.replace("seed = 3", f'seed = 3\noutput = "{tmp_path / "runs"}"'), "tiny.toml")


class Stop(KeyboardInterrupt):
    pass


def test_interrupted_run_resumes_without_recomputing(
    tmp_path: Path, counted: dict[str, int]
) -> None:
    s = study(tmp_path)

    def stop_after_second(step_id: str) -> None:
        if step_id == "scan":
            raise Stop  # what Ctrl-C raises, right after the second step finished

    with pytest.raises(KeyboardInterrupt):
        run_study(s, progress=False, after_step=stop_after_second)
    assert counted == {"honesty": 1, "scan": 1}
    runs = sorted((tmp_path / "runs" / "tiny_demo" / "runs").iterdir())
    assert len(runs) == 1
    rec = read_record(runs[0])
    assert rec["status"] == "interrupted" and "resume" in rec["error"]
    assert rec["steps"]["happy"]["status"] == "pending"
    assert (runs[0] / "report.html").exists()  # even an interrupted run can be looked at

    res = run_study(s, progress=False)
    assert counted == {"honesty": 1, "scan": 1, "happy": 1}  # nothing finished was recomputed
    assert res.computed == ["happy"] and res.cached == ["honesty", "scan"]
    assert res.run_dir == runs[0]  # the interrupted run's folder is completed, not a new one
    assert read_record(res.run_dir)["status"] == "complete" and read_record(res.run_dir)["resumed"]

    again = run_study(s, progress=False)  # a finished study: all from the cache, a new record
    assert counted == {"honesty": 1, "scan": 1, "happy": 1}
    assert again.run_dir != res.run_dir and again.metrics == res.metrics


def test_rerun_from_the_record_alone_gives_identical_metrics(tmp_path: Path) -> None:
    first = run_study(study(tmp_path), progress=False)
    # a fresh output folder: an empty cache, so every step is really computed again
    second = rerun(first.run_dir, output=tmp_path / "elsewhere", progress=False)
    assert second.computed == ["honesty", "scan", "happy"]
    assert second.metrics == first.metrics
    assert read_record(second.run_dir)["rerun_of"] == str(first.run_dir)
    assert runner.diff_runs(first.run_dir, second.run_dir) and all(
        r["delta"] == 0 for r in runner.diff_runs(first.run_dir, second.run_dir)
    )


def test_a_changed_setting_recomputes_only_its_dependants(
    tmp_path: Path, counted: dict[str, int]
) -> None:
    run_study(study(tmp_path), progress=False)
    assert counted == {"honesty": 1, "scan": 1, "happy": 1}
    changed = study(tmp_path, STUDY.replace("n_pairs = 24", "n_pairs = 20"))
    res = run_study(changed, progress=False)
    assert sorted(res.computed) == ["honesty", "scan"] and res.cached == ["happy"]
    assert counted == {"honesty": 2, "scan": 2, "happy": 1}
    leaf = study(tmp_path, STUDY.replace("n_facts = 2", "n_facts = 1"))
    res = run_study(leaf, progress=False)
    assert res.computed == ["scan"] and sorted(res.cached) == ["happy", "honesty"]


def test_the_record_holds_every_item(tmp_path: Path) -> None:
    res = run_study(study(tmp_path), progress=False)
    d = res.run_dir
    rec = read_record(d)
    assert rec["config"]["steps"][0]["readers"] == ["mean_diff", "logistic"]
    assert rec["config"]["steps"][0]["train_frac"] == 0.7  # defaults written out
    assert rec["seeds"]["study"] == 3
    assert len(rec["code"]["commit"]) == 40 and isinstance(rec["code"]["dirty"], bool)
    assert (
        rec["packages"]["torch"] and rec["packages"]["transformers"] and rec["packages"]["python"]
    )
    ident = rec["model"]["identity"]
    assert ident["name"] == "tiny-random-llama" and ident["n_layers"] == 4 and ident["config_hash"]
    assert set(rec["data"]) == {"honesty", "scan", "happy"}
    assert rec["data"]["honesty"]["facts/honesty"]  # the data fingerprint
    assert rec["timings"]["total_seconds"] > 0
    assert all(rec["timings"]["steps"][s] is not None for s in ("honesty", "scan", "happy"))
    assert all(rec["steps"][s]["status"] == "computed" for s in rec["steps"])
    # per-sample outputs, metrics, artifacts, figures, the report
    rows = [json.loads(x) for x in (d / "samples" / "honesty.jsonl").read_text().splitlines()]
    assert len(rows) == rec["steps"]["honesty"]["n_samples"] > 0
    assert {"pair", "score_positive", "score_negative", "correct"} <= set(rows[0])
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["honesty"]["best"]["reader"] in ("mean_diff", "logistic")
    assert 0 <= metrics["honesty"]["best"]["accuracy"] <= 1
    assert (d / "artifacts" / "honesty" / "direction.safetensors").exists()
    assert (d / "figures" / "honesty.layers.json").exists()
    html = (d / "report.html").read_text()
    assert "Plotly" in html and "fig-honesty-layers" in html and "<script src=" not in html
    assert rec["code"]["commit"] in html
    # the resolved config is a study file that loads to the same fingerprint
    again = loads((d / "study.toml").read_text(), "study.toml")
    assert again.fingerprint() == rec["config_fingerprint"]
    assert (d / "study.original.toml").read_text().startswith("[study]")


def test_parallel_steps_in_processes_match_the_sequential_run(tmp_path: Path) -> None:
    seq = run_study(study(tmp_path), progress=False)
    par = run_study(study(tmp_path / "par"), progress=False, jobs=2)
    assert sorted(par.computed) == ["happy", "honesty", "scan"]
    assert par.metrics == seq.metrics


@pytest.mark.parametrize(
    ("edit", "line", "words"),
    [
        (
            ("n_boot = 50\n", "n_boot = 50\nreaderz = 1\n"),
            14,
            "steps[1] (id 'honesty') key 'readerz': unknown",
        ),
        (("n_pairs = 16", 'n_pairs = "many"'), 25, "key 'n_pairs': must be an integer"),
        (('direction = "honesty"', 'direction = "nope"'), 18, "names step 'nope'"),
        (('kind = "scan"', 'kind = "scanner"'), 17, "unknown kind 'scanner'"),
        (("seed = 3", "sed = 3"), 5, "[study] key 'sed': unknown"),
        (
            ('readers = ["mean_diff"]', 'readers = ["mean_diff", "magic"]'),
            26,
            "'magic' is not one of",
        ),
        (("n_facts = 2", "n_facts = 2 2"), 19, "TOML syntax"),
        (('concept = "emotions/happiness"', 'concept = "emotions/glee"'), 24, "unknown concept"),
        (('id = "happy"', 'id = "scan"'), 22, "duplicate id"),
        # hostile names: a study or step name becomes a folder name, so no / or ..
        (('name = "tiny_demo"', 'name = "../../etc"'), 2, "[study] key 'name': use letters"),
        (('id = "happy"', 'id = "../happy"'), 22, "'id' must be a name"),
    ],
)
def test_malformed_study_errors_name_the_key_and_the_line(
    edit: tuple[str, str], line: int, words: str
) -> None:
    text = STUDY.replace(*edit)
    assert text != STUDY
    with pytest.raises(StudyError) as err:
        loads(text, "tiny.toml")
    msg = str(err.value)
    assert msg.startswith(f"tiny.toml:{line}: ") and words in msg and "\n" not in msg


def test_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "tiny.toml"
    f.write_text(STUDY.replace("seed = 3", f'seed = 3\noutput = "{tmp_path / "out"}"'))
    assert main(["study", "run", str(f), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "steps computed: honesty, scan, happy" in out
    assert main(["study", "run", str(f), "--quiet"]) == 0
    assert "from the cache: honesty, scan, happy" in capsys.readouterr().out
    runs = sorted((tmp_path / "out" / "tiny_demo" / "runs").iterdir())
    assert main(["study", "diff", str(runs[0]), str(runs[1])]) == 0
    assert " 0 differ" in capsys.readouterr().out
    assert main(["study", "list", "--runs", str(tmp_path / "out"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed["runs"]) == 2 and all(r["status"] == "complete" for r in listed["runs"])
    bad = tmp_path / "bad.toml"
    bad.write_text(STUDY.replace("n_pairs = 24", "n_pairs = -"))
    assert main(["study", "run", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("repe study: error: ") and "bad.toml:" in err and "\n" not in err
    assert main(["study", "rerun", str(tmp_path)]) == 2
    assert "not a study run folder" in capsys.readouterr().err


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_on_the_command_line_leaves_a_resumable_run(tmp_path: Path, sig: str) -> None:
    """A real SIGINT to ``repe study run`` while its third step runs: exit 130, the record says
    interrupted, no half-written step result, and the next run computes only what was left."""
    import signal
    import subprocess
    import sys
    import threading

    # the third step made slow: many pairs, cross-validated logistic readers, a large bootstrap
    slow = STUDY.replace(
        'concept = "emotions/happiness"\nn_pairs = 16\nreaders = ["mean_diff"]\nn_boot = 50',
        'concept = "emotions/happiness"\nn_pairs = 400\nreaders = ["logistic", "lat"]\n'
        "n_boot = 30000",
    )
    assert "n_pairs = 400" in slow
    f = tmp_path / "tiny.toml"
    f.write_text(slow.replace("seed = 3", f'seed = 3\noutput = "{tmp_path / "out"}"'))
    cache = tmp_path / "out" / "tiny_demo" / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-m", "repe", "study", "run", str(f)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a child inherits an ignored SIGINT (and then never sees Ctrl-C), and
        # whatever this test process inherited or was left with is not the command's to honour here
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: list[str] = []
    started = threading.Event()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "[3/3] happy (probe) ..." in line:
                started.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    assert started.wait(240), "".join(lines)[-2000:]  # the third step has just begun
    proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=120)
    reader.join(timeout=30)
    err = "".join(lines)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "again to resume" in err
    (run_dir,) = (tmp_path / "out" / "tiny_demo" / "runs").iterdir()
    rec = read_record(run_dir)
    assert rec["status"] == "interrupted"
    assert [rec["steps"][s]["status"] for s in ("honesty", "scan", "happy")] == [
        "computed",
        "computed",
        "pending",
    ]
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == [
        "honesty",
        "scan",
    ]  # no partial
    out = subprocess.run(
        [sys.executable, "-m", "repe", "study", "run", str(f), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "steps computed: happy; from the cache: honesty, scan" in out.stdout
