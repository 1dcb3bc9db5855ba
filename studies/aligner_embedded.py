"""Study: Aligner global tokens on the embedded model (``steering.evaluation.aligner``), one run per task:
``form`` (open every answer with a fixed phrase; SFT; held-out success rate), ``value`` (DPO on CAA
refusal and hallucination pairs; held-out preference margin with a paired bootstrap interval) and
``facts`` (invented facts; held-out recall, Aligner N=1 vs a LoRA with ~100x its parameters). Each run
sets the base model, a steering vector for the same task and a LoRA of the same task beside the Aligner,
with parameter counts, KL and perplexity on neutral text.

    .venv/bin/python studies/aligner_embedded.py                      # form, value, facts
    .venv/bin/python studies/aligner_embedded.py --tasks form --n-tokens 1 --out aligner_out
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from repe.atomic import write_text  # noqa: E402
from repe.models import load_model  # noqa: E402
from steering.evaluation.aligner import AlignerRun, run_aligner  # noqa: E402

# the facts task's LoRA: rank 2 on q/v of blocks 8..29 of the embedded model = 84,480 parameters,
# ~100x an N=1 Aligner's 828
FACTS_LORA = {"lora_rank": 2, "lora_first_layer": 8}


def line(name: str, m: dict, metric: str) -> str:
    ch = m.get(f"{metric}_change")
    iv = f" change {ch['mean']:+.3f} [{ch['lo']:+.3f}, {ch['hi']:+.3f}]" if ch else ""
    extra = (
        f"  (training wording {m['recall_training_wording']:.3f})"
        if "recall_training_wording" in m
        else ""
    )
    cost = (
        f"  KL {m['neutral_kl']:.4f}  ppl x{m['perplexity_ratio']:.3f}" if "neutral_kl" in m else ""
    )
    params = f"{m['parameters']:>8,d} params  " if "parameters" in m else " " * 17
    return f"{name:14s} {params}{metric} {m[metric]:.3f}{iv}{extra}{cost}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="form,value,facts")
    ap.add_argument("--n-tokens", type=int, default=1)
    ap.add_argument("--train", type=int, default=48)
    ap.add_argument("--held", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=None, help="default: the task's (3, 2, 15)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument(
        "--beta", type=float, default=None, help="value: DPO's beta (default: the run's)"
    )
    ap.add_argument("--lora-lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-vector", action="store_true")
    ap.add_argument("--no-lora", action="store_true")
    ap.add_argument("--out", default="aligner_out")
    args = ap.parse_args()

    lm = load_model()
    summary = {}
    for task in args.tasks.split(","):
        extra = FACTS_LORA if task == "facts" else {}
        run = AlignerRun(
            task=task,
            n_tokens=args.n_tokens,
            train=args.train,
            held=args.held,
            epochs=args.epochs,
            lr=args.lr,
            lora_lr=args.lora_lr,
            **({"beta": args.beta} if args.beta is not None else {}),
            seed=args.seed,
            compare_vector=not args.no_vector,
            compare_lora=not args.no_lora,
            **extra,
        )
        r = run_aligner(lm, run, Path(args.out) / task)
        r.pop("artifact")
        summary[task] = r
        write_text(Path(args.out) / "summary.json", json.dumps(summary, indent=1))
    for task, r in summary.items():
        metric = r["metric"]
        print(f"== {task} ({r['seconds'] / 60:.1f} min)")
        for who in ("base", "aligner", "vector", "lora"):
            if who in r:
                print(line(who, r[who], metric))


if __name__ == "__main__":
    main()
