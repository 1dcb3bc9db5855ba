"""A 4-step study fanned out on a local Dask cluster of 2 workers vs the same study in one process.

The study: four independent probe steps on the embedded model (four persona behaviours, ``--pairs``
contrast pairs each, every layer, three readers). Both runs are the real command line in fresh output folders,
each with one torch thread per process (``OMP_NUM_THREADS=1``; Dask's workers get one thread each):

    repe study run S --quiet                               # in this process, one step after another
    repe study run S --quiet --engine dask --jobs 2        # a local cluster of 2 worker processes

Times are whole commands: the cluster's start, each worker's own model load and the run record are
counted. The metrics of the two runs must be equal. Each worker pays its own start (imports and a model
load, ~10 s here) inside its first step; 144 pairs per step (~80 s) is long enough for that to matter
little, as it would on a cluster, where steps take minutes to hours (at 112 pairs two runs gave 1.655
and 1.541; at 144, 1.811). ``--reps`` pairs of runs, the median speed-up.

    .venv/bin/python bench/fanout.py              # ~8.5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# four behaviours of one dataset: steps of about the same size, so that the figure measures the engine
# rather than how unevenly 4 steps split over 2 workers (with honesty, happiness, CAA refusal, whose texts
# are twice as long, and risk-seeking the same run gave 1.53: one worker idled ~25 s at the end)
BEHAVIOURS = (
    "persona/risk-seeking",
    "persona/narcissism",
    "persona/openness",
    "persona/agreeableness",
)


def study_text(out: Path, pairs: int) -> str:
    head = f'[study]\nname = "bench_fanout"\nmodel = "embedded"\nseed = 0\noutput = "{out}"\n'
    steps = [
        f'\n[[steps]]\nid = "s{i}"\nkind = "probe"\nconcept = "{c}"\nn_pairs = {pairs}\n'
        f'readers = ["mean_diff", "pca_diff", "logistic"]\nn_boot = 200\n'
        for i, c in enumerate(BEHAVIOURS)
    ]
    return head + "".join(steps)


def timed(cmd: list[str]) -> tuple[float, Path]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} exited {proc.returncode}: {proc.stderr[-1500:]}")
    if "from the cache: none" not in proc.stdout:
        raise SystemExit(f"a run in a fresh folder found cached steps:\n{proc.stdout}")
    run_dir = Path(proc.stdout.split("run: ")[1].splitlines()[0])
    return dt, run_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=144)
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    seq_t, par_t = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.reps):
            runs = {}
            for how, extra, times in (
                ("in-process", [], seq_t),
                ("dask-2", ["--engine", "dask", "--jobs", "2"], par_t),
            ):
                f = Path(tmp) / f"{how}-{r}.toml"
                f.write_text(study_text(Path(tmp) / f"runs-{how}-{r}", args.pairs))
                cmd = [sys.executable, "-m", "repe", "study", "run", str(f), "--quiet", *extra]
                dt, run_dir = timed(cmd)
                times.append(dt)
                runs[how] = run_dir
                rec = json.loads((run_dir / "record.json").read_text())
                steps = rec["timings"]["steps"]
                print(
                    f"{how:10s} {dt:7.1f} s  (steps: "
                    + ", ".join(f"{k} {v:.0f} s" for k, v in steps.items())
                    + f"; engine {rec['engine']['name']})",
                    flush=True,
                )
            a = json.loads((runs["in-process"] / "metrics.json").read_text())
            b = json.loads((runs["dask-2"] / "metrics.json").read_text())
            if a != b:
                raise SystemExit("the Dask run's metrics differ from the in-process run's")
    speedup = statistics.median(s / p for s, p in zip(seq_t, par_t, strict=True))
    print(
        f"INFO in-process {statistics.median(seq_t):.1f} s, dask 2 workers {statistics.median(par_t):.1f} s"
    )
    print("INFO metrics of the two runs are equal")
    print(
        f"RESULT fanout_speedup_2_workers {speedup:.3f} target >= 1.6 "
        f"{'PASS' if speedup >= 1.6 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
