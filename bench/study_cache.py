"""A rerun of a finished study as a ratio of its first run's time: the second ``repe study run`` of the
same study file finds every step's result in the cache (keyed by the content hash of its inputs) and
only writes a new run record and report.

The study: the honesty reading on the embedded model (``--pairs`` honesty pairs, every reader, every
layer, then a token scan), run as the real command line in a fresh output folder; then the same
command again, ``--reruns`` times (median).

    .venv/bin/python bench/study_cache.py              # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STUDY = """\
[study]
name = "bench_honesty"
model = "embedded"
seed = 0
output = "{out}"

[[steps]]
id = "honesty"
kind = "probe"
concept = "facts/honesty"
n_pairs = {pairs}

[[steps]]
id = "scan"
kind = "scan"
direction = "honesty"
n_facts = 2
"""


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} exited {proc.returncode}: {proc.stderr[-800:]}")
    return dt, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--reruns", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "bench_honesty.toml"
        f.write_text(STUDY.format(out=Path(tmp) / "runs", pairs=args.pairs))
        cmd = [sys.executable, "-m", "repe", "study", "run", str(f), "--quiet"]
        first, out = timed(cmd)
        if "from the cache: none" not in out:
            raise SystemExit(f"the first run found cached steps in a fresh folder:\n{out}")
        again = []
        for _ in range(args.reruns):
            dt, out = timed(cmd)
            if "steps computed: none" not in out:
                raise SystemExit(f"a rerun recomputed steps:\n{out}")
            again.append(dt)
    rerun = statistics.median(again)
    ratio = rerun / first
    print(f"first run  {first:8.2f} s (honesty probe on {args.pairs} pairs, every layer, + scan)")
    print(f"rerun      {rerun:8.2f} s (median of {args.reruns}; every step from the cache)")
    print(
        f"RESULT study_rerun_vs_first {ratio:.4f} target <= 0.05 {'PASS' if ratio <= 0.05 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
