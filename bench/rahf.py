"""RAHF training step time against a plain LoRA SFT step on the same batch, same adapter, same run.

* SFT step: the adapted model's cross-entropy on the response tokens, backward, AdamW step.
* RAHF step (what ``train_rahf`` runs): the adapted model's states at the target blocks, the mean L2
  distance to the targets, backward, AdamW step. The targets (the frozen plain pass and the preferred and
  dispreferred passes) are read once per batch before training (``prepare``); their cost per step, at
  the default 4 epochs, is printed as INFO, and so is the ratio of a step that reads them every time.

Steps alternate (SFT, RAHF, SFT, ...) so drifts of a shared machine hit both; the RESULT is the ratio of
the median step times. Target <= 1.5.

    .venv/bin/python bench/rahf.py
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
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()

    from repe.datasets.preference import caa_preference_pairs
    from repe.models import load_model
    from repe.responses import Response, batch_inputs
    from steering.adapter import LowRankAdapter
    from steering.hooks import steer
    from steering.rahf import RAHFConfig, default_layers, frozen_base, prepare, rahf_loss

    lm = load_model()
    pairs = caa_preference_pairs("hallucination")[: args.batch]
    items = [Response(p.prompt, p.chosen or p.rejected) for p in pairs]
    layers = default_layers(lm.n_layers)
    cfg = RAHFConfig(batch_size=args.batch)
    t0 = time.perf_counter()
    (batch,) = prepare(lm, items, layers, cfg)
    prep_s = time.perf_counter() - t0
    inputs, resp = batch_inputs(lm, items, None)
    labels = inputs["input_ids"].masked_fill(~resp, -100)

    def make() -> tuple[LowRankAdapter, torch.optim.Optimizer]:
        ad = LowRankAdapter.init(lm, list(range(max(layers) + 1)), rank=8, alpha=16)
        for p in ad.parameters():
            p.requires_grad_(True)
        return ad, torch.optim.AdamW(ad.parameters(), lr=1e-4)

    sft_ad, sft_opt = make()
    rahf_ad, rahf_opt = make()

    def sft_step() -> None:
        with steer(lm, sft_ad):
            loss = lm.model(**inputs, labels=labels).loss
        sft_opt.zero_grad(set_to_none=True)
        loss.backward()
        sft_opt.step()

    def rahf_step() -> None:
        loss = rahf_loss(lm, rahf_ad, batch, layers)
        rahf_opt.zero_grad(set_to_none=True)
        loss.backward()
        rahf_opt.step()

    def rahf_online_step() -> None:
        (b,) = prepare(lm, items, layers, cfg)
        loss = rahf_loss(lm, rahf_ad, b, layers)
        rahf_opt.zero_grad(set_to_none=True)
        loss.backward()
        rahf_opt.step()

    times: dict[str, list[float]] = {"sft": [], "rahf": [], "online": []}
    lm.model.eval()
    with frozen_base(lm):
        for f in (sft_step, rahf_step):  # warm-up
            f()
        for i in range(args.steps):
            order = [("sft", sft_step), ("rahf", rahf_step)]
            if i % 3 == 0:
                order.append(("online", rahf_online_step))
            for name, f in order if i % 2 == 0 else order[::-1]:
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["rahf"] / med["sft"]
    n_tok = int(resp.sum())
    print(f"INFO batch {args.batch} pairs, {n_tok} response tokens, target blocks {layers}")
    print(f"INFO sft_step_s {med['sft']:.3f} rahf_step_s {med['rahf']:.3f}")
    print(f"INFO targets_once_s {prep_s:.3f} (per step at 4 epochs: {prep_s / 4:.3f})")
    print(f"INFO rahf_step_with_targets_every_step_vs_sft {med['online'] / med['sft']:.2f}")
    print(
        f"RESULT rahf_step_vs_lora_sft {ratio:.2f} target <= 1.5 {'PASS' if ratio <= 1.5 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
