"""Studies fanned out on Dask (issue 18): a local Dask cluster of 2 worker processes on this machine
computes the same metrics as the in-process run, from the same unchanged study file; a step whose worker
is killed is computed again on another; the cache is shared between the workers and the client; a
cluster whose workers cannot see the cache folder is refused before any step is sent. Tiny model."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import pytest
from distributed import Client, LocalCluster

from repe.cli import main
from studies import engines
from studies.engines import make_engine
from studies.runner import read_record, run_study
from studies.spec import StudyError, loads

# honesty and happy are independent; scan needs honesty (computed by whichever worker is free)
STUDY = """\
[study]
name = "fanout_demo"
description = "two probes and a scan on the tiny model"
model = "tiny"
seed = 5

[[steps]]
id = "honesty"
kind = "probe"
concept = "facts/honesty"
n_pairs = 48
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
n_pairs = 32
readers = ["mean_diff"]
n_boot = 50
"""


def _write(tmp_path: Path, output: Path) -> Path:
    f = tmp_path / "fanout.toml"
    f.write_text(STUDY.replace("seed = 5", f'seed = 5\noutput = "{output}"'))
    return f


def _study(tmp_path: Path, output: Path):  # noqa: ANN202
    f = _write(tmp_path, output)
    return loads(f.read_text(), str(f))


@pytest.fixture(scope="module")
def in_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("seq")
    return run_study(_study(tmp, tmp / "runs"), progress=False).metrics


def test_local_dask_cluster_equals_in_process_and_shares_the_cache(
    tmp_path: Path, in_process: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    f = _write(tmp_path, out)
    # the same study file, unchanged, on a local cluster of 2 workers through the command line
    assert main(["study", "run", str(f), "--engine", "dask", "--jobs", "2"]) == 0
    cap = capsys.readouterr()
    said = cap.out
    assert "engine dask: 2 workers at tcp://" in cap.err  # the progress lines
    assert "steps computed: honesty, " in said or "steps computed: happy, " in said
    run_dir = Path(said.split("run: ")[1].splitlines()[0])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics == in_process
    rec = read_record(run_dir)
    assert rec["engine"]["name"] == "dask" and rec["engine"]["workers"] == 2
    assert rec["engine"]["local_cluster"] is True
    pids = {rec["steps"][s]["computed_by"]["pid"] for s in ("honesty", "scan", "happy")}
    assert os.getpid() not in pids  # every step ran in a worker process, none here
    # the workers' results are this machine's cache: the client finds every step there
    again = run_study(loads(f.read_text(), str(f)), progress=False, resume=False)
    assert again.computed == [] and again.cached == ["honesty", "scan", "happy"]
    assert again.metrics == in_process
    # all cached on the Dask engine too: no cluster is started for nothing
    cached = run_study(loads(f.read_text(), str(f)), progress=False, resume=False, engine="dask")
    assert cached.computed == [] and "workers" not in read_record(cached.run_dir)["engine"]


def test_the_cluster_computes_only_what_the_cache_lacks(
    tmp_path: Path, in_process: dict[str, Any]
) -> None:
    out = tmp_path / "runs"
    f = _write(tmp_path, out)
    first = loads(f.read_text().split('[[steps]]\nid = "scan"')[0], str(f))  # honesty only
    assert run_study(first, progress=False).computed == ["honesty"]
    res = run_study(loads(f.read_text(), str(f)), progress=False, engine="dask", jobs=2)
    assert res.cached == ["honesty"] and sorted(res.computed) == ["happy", "scan"]
    assert res.metrics == in_process


@contextlib.contextmanager
def _kills_first_busy_worker(client: Client) -> Iterator[list[int]]:
    """While inside, a thread kills (SIGKILL) the first worker seen computing a step; yields the pids
    it killed."""
    killed: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            busy = [w for w, keys in client.processing().items() if keys]
            if busy:
                pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=watch)
    killer.start()
    try:
        yield killed
    finally:
        stop.set()
        killer.join()


def test_a_killed_workers_step_is_computed_again(
    tmp_path: Path, in_process: dict[str, Any]
) -> None:
    study = _study(tmp_path, tmp_path / "runs")
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        with _kills_first_busy_worker(client) as killed:
            res = run_study(
                study, progress=False, engine="dask", scheduler=cluster.scheduler_address
            )
        assert len(killed) == 1
        assert killed[0] not in client.run(os.getpid).values()  # dead; the nanny started another
    assert sorted(res.computed) == ["happy", "honesty", "scan"]
    assert res.metrics == in_process
    rec = read_record(res.run_dir)
    assert rec["status"] == "complete" and rec["engine"]["scheduler"] == cluster.scheduler_address
    # whatever the killed worker had started was finished by another process
    assert killed[0] not in {rec["steps"][s]["computed_by"]["pid"] for s in rec["steps"]}


def test_a_step_whose_workers_keep_dying_fails_the_run_with_the_reason(tmp_path: Path) -> None:
    study = _study(tmp_path, tmp_path / "runs")
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        with (
            _kills_first_busy_worker(client),
            pytest.raises(Exception, match="KilledWorker|died|killed"),
        ):
            run_study(study, progress=False, engine="dask", scheduler=cluster.scheduler_address)
    runs = list((tmp_path / "runs" / "fanout_demo" / "runs").iterdir())
    rec = read_record(runs[0])
    assert rec["status"] == "failed" and "KilledWorker" in rec["error"]


class _FakeClient:
    """Workers that see another filesystem: the folder exists there, the client's token does not."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def run(self, fn, folder: str, token: str) -> dict[str, Any]:  # noqa: ANN001
        assert Path(folder, token).exists()  # the client wrote its token where it asked
        return {"tcp://w1:1": fn(str(self.folder), token), "tcp://w2:1": None}


def test_a_cache_the_workers_cannot_see_is_refused_before_any_step(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    with pytest.raises(StudyError, match=r"on worker tcp://w1:1.*not visible.*1 of 2 workers"):
        engines._check_shared_cache(_FakeClient(elsewhere), cache)
    assert list(cache.iterdir()) == []  # the token is gone
    engines._check_shared_cache(_FakeClient(cache), cache)  # the same folder: accepted


def test_engine_choices_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert make_engine().in_process and not make_engine(jobs=2).in_process
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://10.0.0.1:8786")
    assert make_engine("dask").scheduler == "tcp://10.0.0.1:8786"
    assert make_engine("dask", scheduler="tcp://h:1").scheduler == "tcp://h:1"
    with pytest.raises(StudyError, match="engine must be one of local, dask"):
        make_engine("ray")
    with pytest.raises(StudyError, match="needs engine 'dask'"):
        make_engine("local", scheduler="tcp://h:1")


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = _write(tmp_path, tmp_path / "runs")
    assert main(["study", "run", str(f), "--scheduler", "tcp://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "repe study: error: a scheduler address needs engine 'dask'"
    # nothing listens there: one line naming the address (Dask's connect timeout is shortened)
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        code = main(
            [
                "study",
                "run",
                str(f),
                "--engine",
                "dask",
                "--scheduler",
                "tcp://127.0.0.1:9",
                "--quiet",
            ]
        )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "could not reach the Dask scheduler at 'tcp://127.0.0.1:9'" in err


TWO_MODELS = """\
[study]
name = "two_models"
model = "tiny"
seed = 1
output = "{out}"

[[steps]]
id = "on_tiny"
kind = "probe"
concept = "facts/honesty"
n_pairs = 24
readers = ["mean_diff"]
n_boot = 20

[[steps]]
id = "on_other"
kind = "probe"
model = "{other}"
concept = "facts/honesty"
n_pairs = 24
readers = ["mean_diff"]
n_boot = 20
"""


def test_one_study_two_models_fanned_out(tmp_path: Path) -> None:
    from repe.models import tiny_model

    other = tiny_model(seed=7, n_layers=3)
    folder = tmp_path / "other-model"
    other.model.save_pretrained(folder)
    other.tokenizer.save_pretrained(folder)
    text = TWO_MODELS.format(out=tmp_path / "runs", other=folder)
    study = loads(text, str(tmp_path / "two.toml"))
    assert study.model_of("on_tiny") == "tiny" and study.model_of("on_other") == str(folder)
    # the step's model is part of the resolved file, so a rerun from the record uses it too
    assert loads(study.source, "x").fingerprint() == study.fingerprint()
    res = run_study(study, progress=False, engine="dask", jobs=2)
    rec = read_record(res.run_dir)
    a, b = rec["steps"]["on_tiny"], rec["steps"]["on_other"]
    assert a["model"] == "tiny" and b["model"] == str(folder)
    assert a["model_identity"]["n_layers"] == 4 and b["model_identity"]["n_layers"] == 3
    assert rec["model"]["identity"]["n_layers"] == 4  # the study's own model
    assert a["key"] != b["key"]
    sites = {k: {r["site"] for r in res.metrics[k]["table"]} for k in ("on_tiny", "on_other")}
    assert len(sites["on_tiny"]) == 4 and len(sites["on_other"]) == 3  # each on its own model
    resolved = (res.run_dir / "study.toml").read_text()
    assert f'model = "{folder}"' in resolved
    seq = run_study(loads(resolved, "study.toml"), output=tmp_path / "seq", progress=False)
    assert seq.metrics == res.metrics


def test_a_steps_model_must_be_a_string(tmp_path: Path) -> None:
    text = TWO_MODELS.format(out=tmp_path, other="x").replace('model = "x"', "model = 3")
    with pytest.raises(StudyError, match=r"two.toml:18: steps\[2\] \(id 'on_other'\) key 'model'"):
        loads(text, "two.toml")


def _environ() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")}


def test_local_workers_start_without_dasks_malloc_trim_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dask sets MALLOC_TRIM_THRESHOLD_ for its workers, which makes every large CPU tensor a fresh
    # mmap (a capture ran ~30% slower); a local cluster's workers start without it, one thread each.
    # A nanny also leaves it in the environment of the process that ran it (as any earlier cluster
    # with Dask's defaults did in this test process): workers must not inherit it from there either.
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with engines.executor(make_engine("dask", jobs=2), tmp_path) as (pool, slots):
        got = [pool.submit(_environ).result() for _ in range(2)]
    assert slots == 2
    assert got == [{"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1"}] * 2
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # this process's own value is put back
