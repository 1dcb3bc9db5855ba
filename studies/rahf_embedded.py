"""Study: RAHF on the embedded model, one run per variant (``steering.evaluation.rahf``): SCIT-style
(good vs bad assistant instruction), negative-only (the model's own answers minus the rejected ones,
D2O-style) and a value-instruction contrast (VILMO-style). Preference pairs from shipped CAA behaviours
in cloze form; on held-out pairs: the chosen-vs-rejected log-likelihood margin and the projection on the
pattern, before and after, with paired bootstrap intervals; perplexity and KL on neutral text and the
facts AUC as the capability check; a steering vector from the same pattern at matched KL beside it.

    .venv/bin/python studies/rahf_embedded.py                              # scit and negative
    .venv/bin/python studies/rahf_embedded.py --variants vilmo --value honesty --out rahf_out
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
from steering.evaluation.rahf import RAHFRun, run_rahf  # noqa: E402


def line(name: str, m: dict) -> str:
    mc, pc = m["margin_change"], m["projection_change"]
    return (
        f"{name:16s} margin {mc['mean']:+.3f} [{mc['lo']:+.3f}, {mc['hi']:+.3f}]  projection "
        f"{pc['mean']:+.3f} [{pc['lo']:+.3f}, {pc['hi']:+.3f}]  ppl x{m['perplexity_ratio']:.3f}  "
        f"facts AUC {m.get('facts_auc', float('nan')):.3f}  KL {m['neutral_kl']:.4f}  "
        f"within tolerance: {m['within_tolerance']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="scit,negative")
    ap.add_argument("--pairs", default="caa:hallucination,caa:refusal")
    ap.add_argument("--value", default="honesty")
    ap.add_argument("--train", type=int, default=48, help="training pairs per source")
    ap.add_argument("--held", type=int, default=60, help="held-out pairs per source")
    ap.add_argument("--alpha-pattern", type=float, default=None, help="default: the variant's")
    ap.add_argument("--lr", type=float, default=None, help="default: the variant's (DEFAULT_LR)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="rahf_out")
    args = ap.parse_args()

    lm = load_model()
    summary = {}
    for variant in args.variants.split(","):
        run = RAHFRun(
            pairs=tuple(args.pairs.split(",")),
            variant=variant,
            value=args.value,
            train=args.train,
            held=args.held,
            alpha_pattern=args.alpha_pattern,
            lr=args.lr,
            epochs=args.epochs,
            seed=args.seed,
        )
        _, metrics = run_rahf(lm, run, Path(args.out) / variant)
        summary[variant] = metrics
        print(line(f"{variant} adapter", metrics["adapter"]), flush=True)
        if "vector" in metrics:
            print(line(f"{variant} vector", metrics["vector"]), flush=True)
    write_text(Path(args.out) / "summary.json", json.dumps(summary, indent=1))
    print("base:", json.dumps({v: m["base"] for v, m in summary.items()}))
    for v, m in summary.items():
        print(line(f"{v} adapter", m["adapter"]))
        if "vector" in m:
            print(line(f"{v} vector", m["vector"]))


if __name__ == "__main__":
    main()
