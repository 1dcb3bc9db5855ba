"""Capture throughput and memory on the embedded model.

Throughput (tokens/s) of each back-end as a ratio to the naive floor: a plain HF forward pass with
``output_hidden_states=True`` over the same batches, in the same run. Memory: peak RSS of a fresh process
capturing 20,000 texts to disk vs 1,000 texts (every block's residual output at the last token, shards of
512). For the memory runs the texts are cut to their first ``MEM_MAX_TOKENS`` tokens: what would pile up
if capture kept anything per example (30 x 576 floats each, 1.4 GB for 20,000) does not depend on the
text length, but the forward passes do, and full-length texts made the 20,000-text run alone take over
15 minutes on this 2-core machine.

    .venv/bin/python bench/capture.py            # full run (~7 minutes on 2 cores)
    .venv/bin/python bench/capture.py --quick    # smaller, for a smoke test
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from repe import capture, load_model  # noqa: E402
from repe.batching import batches, encode  # noqa: E402

MEM_MAX_TOKENS = 6
FACTS = ROOT / "repe" / "data" / "repe_emotions_facts" / "facts" / "facts_true_false.csv"


def statements(n: int) -> list[str]:
    rows = [r["statement"] for r in csv.DictReader(FACTS.open())]
    return [rows[i % len(rows)] + ("" if i < len(rows) else f" ({i})") for i in range(n)]


def floor_seconds(lm, texts: list[str], batch_size: int) -> float:
    enc = encode(lm.tokenizer, texts)
    bs = [b for _, b in batches(enc, batch_size, lm.tokenizer.pad_token_id, "right")]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in bs:
            lm.model(
                input_ids=b.input_ids,
                attention_mask=b.attention_mask,
                output_hidden_states=True,
                use_cache=False,
            )
    return time.perf_counter() - t0


def capture_seconds(lm, texts, sites, backend, batch_size) -> float:
    t0 = time.perf_counter()
    capture(lm, texts, sites, backend=backend, batch_size=batch_size, progress=False)
    return time.perf_counter() - t0


def memory_child(n: int, out: str) -> None:
    import resource

    lm = load_model()
    capture(
        lm,
        statements(n),
        "blocks.*.hook_resid_post",
        batch_size=64,
        out_dir=out,
        shard_size=512,
        progress=False,
        max_length=MEM_MAX_TOKENS,
    )
    print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def peak_rss_mb(n: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        res = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(n), d],
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(res.stdout.strip().splitlines()[-1])["maxrss_kb"] / 1024


def result(name: str, value: float, op: str, target: float) -> None:
    ok = value >= target if op == ">=" else value <= target
    print(f"RESULT {name} {value:.3f} target {op} {target} {'PASS' if ok else 'FAIL'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--memory-child", nargs=2, metavar=("N", "DIR"))
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(int(args.memory_child[0]), args.memory_child[1])
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    lm = load_model()
    load_s = time.perf_counter() - t0
    n, bs = (64, 16) if args.quick else (256, 16)
    texts = statements(n)
    n_tokens = sum(len(e.ids) for e in encode(lm.tokenizer, texts))
    every = "blocks.*.hook_resid_post"
    early = "blocks.24.hook_resid_post"
    runs = {"floor": [], "hf_all": [], "hf_until_24": []}
    extra = {}
    for be in ("transformer_lens", "nnsight"):
        try:
            capture_seconds(lm, texts[:bs], every, be, bs)  # warm-up / availability
            runs[f"{be}_all"] = []
            extra[be] = True
        except Exception as exc:  # noqa: BLE001 - report and continue
            print(f"# {be}: unavailable ({type(exc).__name__}: {exc})")
    floor_seconds(lm, texts[:bs], bs)
    capture_seconds(lm, texts[:bs], every, "hf", bs)
    for _ in range(args.reps):  # interleaved repetitions, medians below
        runs["floor"].append(floor_seconds(lm, texts, bs))
        runs["hf_all"].append(capture_seconds(lm, texts, every, "hf", bs))
        runs["hf_until_24"].append(capture_seconds(lm, texts, early, "hf", bs))
        for be in extra:
            runs[f"{be}_all"].append(capture_seconds(lm, texts, every, be, bs))
    med = {k: statistics.median(v) for k, v in runs.items()}
    floor_tps = n_tokens / med["floor"]
    print(
        f"# {n} texts, {n_tokens} tokens, batch {bs}, {args.reps} reps; embedded model load {load_s:.2f}s"
    )
    for k, v in med.items():
        print(f"# {k:24s} {n_tokens / v:10.0f} tokens/s  ratio to floor {med['floor'] / v:.3f}")
    mem_small = peak_rss_mb(200 if args.quick else 1000)
    mem_big = peak_rss_mb(2000 if args.quick else 20000)
    print(f"# peak RSS capturing to disk: {mem_small:.0f} MB (small) vs {mem_big:.0f} MB (large)")
    print(f"# floor throughput {floor_tps:.0f} tokens/s")
    result("hf_all_blocks_vs_floor", med["floor"] / med["hf_all"], ">=", 0.95)
    result("hf_until_block24_vs_floor", med["floor"] / med["hf_until_24"], ">=", 1.4)
    for be in extra:
        print(f"INFO {be}_all_blocks_vs_floor {med['floor'] / med[f'{be}_all']:.3f}")
    result("disk_capture_peak_rss_20k_over_1k", mem_big / mem_small, "<=", 2.0)
    t1 = time.perf_counter()
    load_model()
    reload_s = time.perf_counter() - t1
    print(f"# total runtime {time.perf_counter() - t0:.0f}s")
    result("embedded_model_reload_seconds", reload_s, "<=", 1.0)


if __name__ == "__main__":
    main()
