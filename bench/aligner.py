"""Aligner costs on the embedded model, each against its floor measured in the same run:

* generation: tokens per second with an N=10 Aligner (start layer 2, nonzero gates) applied through
  ``steer()`` as a ratio to unsteered generation, same prompts, same greedy settings, KV cache on
  (``steering.generate.generate``). Runs alternate (plain, Aligner, plain, ...) so drifts of a shared
  machine hit both; the ratio is of the best run of each (the machine's other load only slows runs
  down; medians are printed as INFO). Target >= 0.95.
* training: one SFT step of an N=10 Aligner (forward, backward, Adam step) as a ratio to one step of the
  LoRA the Aligner study compares it with (rank 8 on q/v of every block), same batch, steps alternating,
  best step of each (medians as INFO). Target <= 1.0.

    .venv/bin/python bench/aligner.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    from repe.chat import messages
    from repe.datasets.questions import question_set
    from repe.models import load_model
    from repe.responses import Response
    from steering.adapter import LowRankAdapter
    from steering.aligner import Aligner
    from steering.aligner_train import _sft_loss
    from steering.evaluation.aligner import FORM_PHRASE
    from steering.generate import GenerationConfig, generate
    from steering.hooks import steer
    from steering.rahf import frozen_base

    lm = load_model()
    qs = [q.text for q in question_set("control").questions]
    al = Aligner.init(lm, 10, start_layer=2, seed=0)
    al.gates = torch.full_like(al.gates, 0.05)  # as if trained: the hooks do all their work
    chats = [messages(q) for q in qs[: args.prompts]]
    # stop_at_eos off: both runs generate exactly the same number of tokens
    cfg = GenerationConfig(max_new_tokens=args.tokens, stop_at_eos=False)
    generate(lm, chats[:2], None, GenerationConfig(max_new_tokens=4))  # warm-up
    generate(lm, chats[:2], al, GenerationConfig(max_new_tokens=4))
    n_tok = args.prompts * args.tokens
    plain, aligned = [], []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        generate(lm, chats, None, cfg)
        plain.append(n_tok / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        generate(lm, chats, al, cfg)
        aligned.append(n_tok / (time.perf_counter() - t0))
    t0 = time.perf_counter()
    generate(lm, chats, None, cfg)
    plain.append(n_tok / (time.perf_counter() - t0))
    p_med, a_med = statistics.median(plain), statistics.median(aligned)
    print(f"INFO generation medians: plain {p_med:.1f} tok/s, N=10 Aligner {a_med:.1f} tok/s")
    print(
        "INFO per run (plain/Aligner tok/s):",
        " ".join(f"{p:.0f}/{a:.0f}" for p, a in zip(plain, aligned, strict=False)),
    )
    # this machine's other load only ever slows a run down: the best run of each is the least
    # disturbed measure of what the code costs (as timeit's best-of)
    gen_ratio = max(aligned) / max(plain)
    print(
        f"INFO generation best runs: plain {max(plain):.1f} tok/s, N=10 Aligner {max(aligned):.1f} tok/s"
    )

    items = [
        Response(q, f"{FORM_PHRASE} Here is a short answer to that.") for q in qs[: args.batch]
    ]
    train_al = Aligner.init(lm, 10, start_layer=2, seed=1)
    lora = LowRankAdapter.init(lm, list(range(lm.n_layers)), rank=8, seed=0)
    setups = []
    for inter, params in ((train_al, train_al.parameters()), (lora, lora.parameters())):
        for p in params:
            p.requires_grad_(True)
        setups.append((inter, torch.optim.Adam(params, lr=1e-3)))

    def step(inter: object, opt: torch.optim.Optimizer) -> float:
        t0 = time.perf_counter()
        with steer(lm, inter):
            loss = _sft_loss(lm, items)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    times: list[list[float]] = [[], []]
    with frozen_base(lm):
        for i in range(args.steps + 1):
            for j, (inter, opt) in enumerate(setups):
                t = step(inter, opt)
                if i:  # the first step of each warms up
                    times[j].append(t)
    al_s, lora_s = min(times[0]), min(times[1])  # best of each, as for generation
    print(
        f"INFO training step medians: Aligner {statistics.median(times[0]) * 1000:.0f} ms, "
        f"LoRA {statistics.median(times[1]) * 1000:.0f} ms"
    )
    n_lora = sum(t.numel() for t in lora.parameters())
    print(
        f"INFO training step (batch {args.batch}): Aligner N=10 ({train_al.n_parameters} params) "
        f"{al_s * 1000:.0f} ms, LoRA rank 8 ({n_lora} params) {lora_s * 1000:.0f} ms"
    )
    step_ratio = al_s / lora_s
    print(
        f"RESULT aligner_generation_ratio {gen_ratio:.3f} target >= 0.95 "
        f"{'PASS' if gen_ratio >= 0.95 else 'FAIL'}"
    )
    print(
        f"RESULT aligner_step_vs_lora {step_ratio:.3f} target <= 1.0 "
        f"{'PASS' if step_ratio <= 1.0 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
