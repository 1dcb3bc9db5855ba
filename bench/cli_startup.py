"""Start-up time of the command line: ``repe --help`` and an argument error, each as a ratio to a bare
``python -c pass`` measured in the same run (the floor: no command line can start faster than the
interpreter). The library imports torch and transformers lazily, so help and argument errors should cost
little more than the interpreter itself.

    .venv/bin/python bench/cli_startup.py          # 21 runs of each (~10 s)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def median_seconds(cmd: list[str], runs: int, ok: set[int]) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode not in ok:
            raise SystemExit(f"{cmd} exited {proc.returncode}: {proc.stderr.decode()[-500:]}")
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=21)
    args = ap.parse_args()
    py = sys.executable
    floor = median_seconds([py, "-c", "pass"], args.runs, {0})
    helps = median_seconds([py, "-m", "repe", "--help"], args.runs, {0})
    sub_help = median_seconds([py, "-m", "repe", "steer", "--help"], args.runs, {0})
    bad = median_seconds(
        [py, "-m", "repe", "sweep", "--behaviour", "x", "--layers", "a"], args.runs, {2}
    )
    print(f"python -c pass           {floor * 1e3:7.1f} ms")
    print(f"repe --help              {helps * 1e3:7.1f} ms  ({helps / floor:.2f}x)")
    print(f"repe steer --help        {sub_help * 1e3:7.1f} ms  ({sub_help / floor:.2f}x)")
    print(f"repe sweep --layers a    {bad * 1e3:7.1f} ms  ({bad / floor:.2f}x, argument error)")
    ratio = helps / floor
    print(
        f"RESULT cli_help_seconds_vs_python_startup {ratio:.2f} target <= 3 "
        f"{'PASS' if ratio <= 3 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
