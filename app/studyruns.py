"""Reading the study runner's run folders for the Studies page, with plain JSON (the app does not
import ``studies``: it is a shell beside the app, not below it).

A run is ``OUTPUT/NAME/runs/<run id>/`` holding ``record.json`` (format ``repe-study-run``),
``metrics.json`` (step id -> metrics tree), ``steps/<step>.json``, ``figures/<step>.<name>.json``
(plotly JSON), ``samples/<step>.jsonl`` and ``report.html``. :func:`flat_metrics` and
:func:`diff_runs` give what ``studies.runner.flat_metrics`` / ``diff_runs`` give (a test says so).

Everything here reads only: a damaged file becomes one line of error (:class:`RunReadError`), never a
traceback, and file names made from a record's step ids are checked before they touch the disk.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.names import safe_name

RECORD_FORMAT = "repe-study-run"
RUNS_ENV = "REPE_STUDY_RUNS"
DEFAULT_FOLDER = "study-runs"  # the runner's default output, relative to the current folder
SAME = 1e-12  # |b - a| at or below this: the metric did not change (as `repe study diff`)


class RunReadError(ValueError):
    """A run folder, or a file in it, that cannot be read; the message is one line."""


@dataclass
class RunList:
    """The runs found under a folder, newest first, and one line per run folder that failed."""

    root: Path
    exists: bool
    runs: list[dict[str, Any]] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)


def default_root() -> str:
    """``REPE_STUDY_RUNS``, else ``study-runs`` under the current folder."""
    return os.environ.get(RUNS_ENV) or str(Path.cwd() / DEFAULT_FOLDER)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunReadError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunReadError(f"{path}: unreadable ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def read_record(run_dir: Path) -> dict[str, Any]:
    """A run folder's record, with ``_dir`` set to the folder."""
    rec = read_json(run_dir / "record.json")
    if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT:
        got = rec.get("format") if isinstance(rec, dict) else type(rec).__name__
        raise RunReadError(f"{run_dir / 'record.json'}: not a study run record (format {got!r})")
    if not isinstance(rec.get("steps", {}), dict):
        raise RunReadError(f"{run_dir / 'record.json'}: its 'steps' is not a table")
    rec["_dir"] = str(run_dir)
    return rec


def find_runs(root: str | Path) -> RunList:
    """Every run record under ``root`` (folders ``.../runs/<id>/record.json``), newest first."""
    base = Path(root).expanduser()
    out = RunList(base, base.is_dir())
    if not out.exists:
        return out
    for rec_path in sorted(base.glob("**/runs/*/record.json")):
        try:
            out.runs.append(read_record(rec_path.parent))
        except RunReadError as exc:
            out.broken.append(str(exc))
    out.runs.sort(key=lambda r: (str(r.get("started") or ""), r["_dir"]), reverse=True)
    return out


def _table(parent: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``parent[key]`` when it is a table, else an empty one (a record from another version)."""
    value = parent.get(key)
    return value if isinstance(value, Mapping) else {}


def short_commit(code: Any) -> str:
    """``abcdef1234`` or ``abcdef1234+dirty`` (``?`` when the commit is unknown)."""
    code = code if isinstance(code, Mapping) else {}
    return str(code.get("commit") or "?")[:10] + ("+dirty" if code.get("dirty") else "")


def _steps(rec: Mapping[str, Any]) -> dict[str, Any]:
    """The record's steps in the study's order (its resolved config; the record's own table is
    written with sorted keys), then any the config does not name."""
    steps = {str(k): v if isinstance(v, Mapping) else {} for k, v in rec.get("steps", {}).items()}
    config = _table(rec, "config")
    listed = config.get("steps")
    listed = listed if isinstance(listed, list) else []
    order = [str(s.get("id")) for s in listed if isinstance(s, Mapping)]
    order = [sid for sid in dict.fromkeys(order) if sid in steps]
    return {sid: steps[sid] for sid in order + [k for k in steps if k not in order]}


def run_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table of runs: one row each."""
    rows = []
    for r in runs:
        statuses = [s.get("status") for s in _steps(r).values()]
        timings = _table(r, "timings")
        rows.append(
            {
                "study": r.get("study"),
                "run id": Path(r["_dir"]).name,  # = the record's run_id, unless copied
                "status": r.get("status"),
                "started": r.get("started"),
                "commit": short_commit(r.get("code")),
                "total time (s)": timings.get("total_seconds"),
                "steps": len(statuses),
                "computed": statuses.count("computed"),
                "cached": statuses.count("cached"),
            }
        )
    return rows


def provenance(rec: Mapping[str, Any]) -> list[dict[str, str]]:
    """What the run was made with, as (what, value) rows of text."""
    model = _table(rec, "model")
    ident = _table(model, "identity")
    seeds = _table(rec, "seeds")
    timings = _table(rec, "timings")
    packages = _table(rec, "packages")
    code = _table(rec, "code")
    shape = ", ".join(
        f"{label} {ident[k]}"
        for k, label in (("n_layers", "blocks"), ("d_model", "d_model"))
        if k in ident
    )
    described = ", ".join(str(x) for x in (ident.get("name"), shape, model.get("dtype")) if x)
    rows = [
        ("model", f"{model.get('spec', '?')}" + (f" ({described})" if described else "")),
        ("model weights hash", str(ident.get("weights_hash", "?"))),
        ("seed", str(seeds.get("study", "?"))),
        (
            "code",
            f"{code.get('commit') or 'unknown'}"
            + (" (with uncommitted changes)" if code.get("dirty") else ""),
        ),
        ("started / finished (UTC)", f"{rec.get('started')} / {rec.get('finished')}"),
        ("total time (s)", str(timings.get("total_seconds", "?"))),
        ("packages", ", ".join(f"{k} {v}" for k, v in packages.items() if v) or "?"),
        ("study file", str(rec.get("study_file") or "?")),
        ("run folder", str(rec.get("_dir", "?"))),
    ]
    if rec.get("rerun_of"):
        rows.append(("rerun of", str(rec["rerun_of"])))
    if rec.get("resumed"):
        rows.append(("resumed", "yes: an interrupted run, completed"))
    return [{"what": k, "value": v} for k, v in rows]


def step_rows(rec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The per-step status table."""
    return [
        {
            "step": sid,
            "kind": s.get("kind"),
            "status": s.get("status"),
            "time (s)": s.get("seconds"),
            "compute time (s)": s.get("compute_seconds"),
            "samples": s.get("n_samples"),
            "warnings": len(s.get("warnings") or []),
            "key": s.get("key"),
        }
        for sid, s in _steps(rec).items()
    ]


def _file_stem(step_id: str) -> str:
    """A step id as a file-name stem, refused when it is not a plain name (``../x``, ``a/b``)."""
    if safe_name(step_id, default="") != step_id:
        raise RunReadError(f"step id {step_id!r} is not a plain name; its files are not read")
    return step_id


def step_info(run_dir: Path, step_id: str) -> dict[str, Any]:
    """``steps/<step>.json`` (summary, tables, figure names); empty when the step has none."""
    path = run_dir / "steps" / f"{_file_stem(step_id)}.json"
    if not path.exists():
        return {}
    info = read_json(path)
    if not isinstance(info, dict):
        raise RunReadError(f"{path}: not a step description")
    return info


def figure_files(run_dir: Path, step_id: str, names: Any = ()) -> list[tuple[str, Path]]:
    """The step's figures (``figures/<step>.<name>.json``) as (name, file), in the order of
    ``names`` (the step description's), then any others; only files inside ``figures/``."""
    stem = _file_stem(step_id)
    folder = run_dir / "figures"
    if not folder.is_dir():
        return []
    found = {
        p.name[len(stem) + 1 : -len(".json")]: p
        for p in folder.iterdir()
        if p.is_file() and p.name.startswith(stem + ".") and p.name.endswith(".json")
    }
    order = [str(n) for n in names if str(n) in found] + sorted(
        set(found) - {str(n) for n in names}
    )
    return [(n, found[n]) for n in order]


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """``metrics.json`` (step id -> metrics tree); empty when the run has none yet."""
    path = run_dir / "metrics.json"
    if not path.exists():
        return {}
    metrics = read_json(path)
    if not isinstance(metrics, dict):
        raise RunReadError(f"{path}: not a table of metrics by step")
    return metrics


def flat_metrics(metrics: Any, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a metrics tree, by dotted path (``best.accuracy``, ``table[0].auroc``)."""
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


def metric_rows(tree: Any) -> list[dict[str, Any]]:
    return [{"metric": k, "value": v} for k, v in flat_metrics(tree).items()]


def diff_runs(a: str | Path, b: str | Path) -> list[dict[str, Any]]:
    """Metric by metric: rows of metric, a, b, delta (b - a; None where a side lacks it)."""
    ma = flat_metrics(read_metrics(Path(a)))
    mb = flat_metrics(read_metrics(Path(b)))
    rows = []
    for k in sorted(set(ma) | set(mb)):
        va, vb = ma.get(k), mb.get(k)
        rows.append(
            {"metric": k, "a": va, "b": vb, "delta": None if va is None or vb is None else vb - va}
        )
    return rows


def differing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of :func:`diff_runs` that differ (or exist on one side only)."""
    return [r for r in rows if r["delta"] is None or abs(r["delta"]) > SAME]


def builtin_dir() -> Path | None:
    """The folder of the built-in study files (the ``studies`` package's, found without importing
    it), or None when it is not installed."""
    try:
        spec = importlib.util.find_spec("studies")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def builtin_studies(folder: Path | None = None) -> list[dict[str, Any]]:
    """The built-in studies (``<folder>/*.toml``): name, description, steps, the command that runs
    each, or a one-line error for a file that cannot be read."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    folder = folder if folder is not None else builtin_dir()
    if folder is None or not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.toml")):
        row: dict[str, Any] = {"study": path.stem, "description": "", "steps": None}
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
            head = data.get("study", {})
            steps = data.get("steps", [])
            row["description"] = str(head.get("description", "")) if isinstance(head, dict) else ""
            row["steps"] = len(steps) if isinstance(steps, list) else None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            row["description"] = f"(unreadable: {_one_line(exc)})"
        row["command"] = f"repe study run {path.stem}"
        out.append(row)
    return out
