"""``repe study``: run declarative studies (TOML), rerun one from its run record, list, compare.

repe study list                                  # built-in studies, and the runs under --runs
repe study run honesty_reading                   # a built-in study, or a path to your own TOML
repe study run my_study.toml --jobs 2            # independent steps in 2 local processes
repe study run my_study.toml --engine dask       # on a local Dask cluster (--jobs workers, default 2)
repe study run my_study.toml --engine dask --scheduler tcp://HOST:8786   # on a running Dask cluster
repe study rerun study-runs/honesty_reading/runs/<id>      # from the record alone
repe study diff RUN_A RUN_B                      # metric by metric
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_parser(
    sub: Any,
    add_model_args: Callable[[argparse.ArgumentParser], None],
    positive_int: Callable[[str], int],
    func: Callable[[argparse.Namespace], int],
) -> None:
    del add_model_args  # the study file names its model
    p = sub.add_parser(
        "study",
        help="run declarative probing studies (TOML) with a resumable cache and a run record",
        description=__doc__.split("\n\n")[0],
    )
    acts = p.add_subparsers(dest="study_cmd", required=True, metavar="{run,rerun,list,diff}")
    r = acts.add_parser(
        "run", help="run a study file or a built-in study (finished steps are cached)"
    )
    r.add_argument("study", help="a study TOML file, or the name of a built-in study")
    r.add_argument("--output", default=None, help="runs folder (default: the study's 'output')")
    r.add_argument(
        "--jobs",
        type=positive_int,
        default=None,
        help="independent steps at once: N local processes (default 1: in this process); with "
        "--engine dask, workers of the local cluster (default 2) or steps in flight on a running one "
        "(default: all its worker threads)",
    )
    _engine_args(r)
    r.add_argument("--new", action="store_true", help="start a new run folder, never resume one")
    r.add_argument("--quiet", action="store_true", help="no progress lines")

    rr = acts.add_parser("rerun", help="run again what a run record describes (its study.toml)")
    rr.add_argument("run_dir", help="a run folder (OUTPUT/NAME/runs/<id>)")
    rr.add_argument(
        "--output",
        default=None,
        help="where the new run goes (default: beside the old one, reusing its cache; "
        "a new folder recomputes every step)",
    )
    rr.add_argument("--jobs", type=positive_int, default=None)
    _engine_args(rr)
    rr.add_argument("--quiet", action="store_true")

    ls = acts.add_parser("list", help="the built-in studies, and the runs under --runs")
    ls.add_argument("--runs", default="study-runs", help="folder to look for runs in")
    ls.add_argument("--json", action="store_true", help="machine-readable")

    d = acts.add_parser("diff", help="compare two runs' metrics")
    d.add_argument("run_a")
    d.add_argument("run_b")
    d.add_argument("--all", action="store_true", help="also the metrics that did not change")
    d.add_argument("--json", action="store_true")
    p.set_defaults(func=func)


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        choices=("local", "dask"),
        default="local",
        help="where steps run: local (this process, or --jobs processes) or dask (a Dask cluster; "
        "needs the 'cluster' extra)",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        help="a running Dask scheduler's address, tcp://HOST:8786 (default: $DASK_SCHEDULER_ADDRESS, "
        "else a local cluster); the output folder must be on a filesystem every worker shares",
    )


def _engine(args: argparse.Namespace) -> Any:
    from studies.engines import make_engine

    return make_engine(args.engine, jobs=args.jobs, scheduler=args.scheduler)


def _stop_on_sigterm() -> None:
    """``kill PID`` stops a run as Ctrl-C does: the step in progress leaves nothing half-written and
    the record says "interrupted" (a run killed with SIGKILL leaves at most a hidden temporary folder
    in the cache, which is never read)."""
    import signal
    import threading

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def run(args: argparse.Namespace) -> int:
    from studies import runner, spec

    if args.study_cmd == "list":
        return _list(args)
    if args.study_cmd == "diff":
        rows = runner.diff_runs(args.run_a, args.run_b)
        changed = [r for r in rows if args.all or r["delta"] is None or abs(r["delta"]) > 1e-12]
        if args.json:
            print(json.dumps(changed, indent=1))
            return 0
        print(f"{len(rows)} metrics, {len(changed)} {'shown' if args.all else 'differ'}")
        for r in changed:
            a = "-" if r["a"] is None else f"{r['a']:.6g}"
            b = "-" if r["b"] is None else f"{r['b']:.6g}"
            dl = "" if r["delta"] is None else f"{r['delta']:+.6g}"
            print(f"{r['metric']}\t{a}\t{b}\t{dl}")
        return 0
    _stop_on_sigterm()
    if args.study_cmd == "rerun":
        res = runner.rerun(
            args.run_dir, output=args.output, progress=not args.quiet, engine=_engine(args)
        )
    else:
        study = spec.load(spec.find(args.study))
        try:
            res = runner.run_study(
                study,
                output=args.output,
                resume=not args.new,
                engine=_engine(args),
                progress=not args.quiet,
            )
        except KeyboardInterrupt:
            print(
                f"repe study: interrupted; run `repe study run {args.study}` again to resume",
                file=sys.stderr,
            )
            return 130
    print(f"run: {res.run_dir}")
    print(
        f"steps computed: {', '.join(res.computed) or 'none'}; from the cache: {', '.join(res.cached) or 'none'}"
    )
    print(f"report: {Path(res.run_dir) / 'report.html'}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from studies import runner, spec

    built = {}
    for name, path in spec.builtin_studies().items():
        try:
            s = spec.load(path)
            built[name] = {"file": str(path), "description": s.description, "steps": len(s.steps)}
        except spec.StudyError as exc:
            built[name] = {"file": str(path), "error": str(exc)}
    runs = [
        {
            "run": r["_dir"],
            "study": r.get("study"),
            "status": r.get("status"),
            "started": r.get("started"),
            "commit": (r.get("code") or {}).get("commit"),
            "dirty": (r.get("code") or {}).get("dirty"),
        }
        for r in runner.list_runs(args.runs)
    ]
    if args.json:
        print(json.dumps({"builtin": built, "runs": runs}, indent=1))
        return 0
    print("built-in studies (repe study run NAME):")
    for name, b in built.items():
        print(f"  {name}: {b.get('description') or b.get('error')} ({b.get('steps', '?')} steps)")
    print(f"runs under {args.runs}: {len(runs) or 'none'}")
    for r in runs:
        commit = (r["commit"] or "?")[:10] + ("+dirty" if r["dirty"] else "")
        print(f"  {r['run']}  {r['status']}  {r['started']}  {commit}")
    return 0
