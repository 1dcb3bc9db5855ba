"""Study: RAHF (SCIT-style) on the embedded model. Preference pairs from shipped CAA behaviours (cloze form);
the activity pattern is read under a good vs a bad assistant instruction on the training pairs' chosen
and rejected answers; a rank-8 q/v adapter is trained with the RAHF loss; on held-out pairs we measure
the preferred-vs-dispreferred log-likelihood margin and the projection on the pattern direction, before
and after, with paired bootstrap intervals, and perplexity on neutral text as the capability check.

    .venv/bin/python studies/rahf_embedded.py                       # hallucination + refusal pairs
    .venv/bin/python studies/rahf_embedded.py --train 48 --held 100 --out rahf_out
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from probes.preference import activity_pattern  # noqa: E402
from repe.atomic import write_text  # noqa: E402
from repe.datasets.preference import caa_preference_pairs  # noqa: E402
from repe.models import load_model  # noqa: E402
from repe.responses import Response  # noqa: E402
from steering.evaluation.costs import NeutralCosts  # noqa: E402
from steering.evaluation.preference import (  # noqa: E402
    paired_change,
    pattern_projections,
    preference_margins,
)
from steering.rahf import RAHFConfig, default_layers, train_rahf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--behaviours", default="hallucination,refusal")
    ap.add_argument("--train", type=int, default=48, help="training pairs per behaviour")
    ap.add_argument("--held", type=int, default=60, help="held-out pairs per behaviour")
    ap.add_argument("--alpha-pattern", type=float, default=5.0)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="rahf_out")
    args = ap.parse_args()

    t0 = time.perf_counter()
    lm = load_model()
    rng = random.Random(args.seed)
    train_pairs, held_pairs = [], []
    for b in args.behaviours.split(","):
        pairs = caa_preference_pairs(b)
        rng.shuffle(pairs)
        train_pairs += pairs[: args.train]
        held_pairs += pairs[args.train : args.train + args.held]
    items = [Response(p.prompt, r) for p in train_pairs for r in (p.chosen, p.rejected) if r]
    cfg = RAHFConfig(
        alpha_pattern=args.alpha_pattern, lr=args.lr, epochs=args.epochs, seed=args.seed
    )
    layers = default_layers(lm.n_layers)
    pattern = activity_pattern(lm, items, layers).direction(lm, "scit_pattern")
    held_items = [Response(p.prompt, p.chosen) for p in held_pairs if p.chosen] + [
        Response(p.prompt, p.rejected) for p in held_pairs
    ]
    costs = NeutralCosts(lm)
    before = {
        "margin": preference_margins(lm, held_pairs),
        "projection": pattern_projections(lm, held_items, pattern),
    }
    ppl_before = costs.perplexity()
    res = train_rahf(lm, items, cfg, progress=True)
    ad = res.adapter
    after = {
        "margin": preference_margins(lm, held_pairs, ad),
        "projection": pattern_projections(lm, held_items, pattern, ad),
    }
    ppl_after, kl = costs.perplexity(ad), costs.kl(ad)
    m = paired_change(before["margin"], after["margin"])
    p = paired_change(before["projection"], after["projection"])
    metrics = {
        "behaviours": args.behaviours,
        "train_pairs": len(train_pairs),
        "train_items": len(items),
        "held_out_pairs": len(held_pairs),
        "layers": layers,
        "config": {"alpha_pattern": cfg.alpha_pattern, "lr": cfg.lr, "epochs": cfg.epochs},
        "rahf_loss": ad.metrics,
        "margin_before": float(before["margin"].mean()),
        "margin_after": float(after["margin"].mean()),
        "margin_change": m,
        "projection_before": float(before["projection"].mean()),
        "projection_after": float(after["projection"].mean()),
        "projection_change": p,
        "neutral_perplexity": [ppl_before, ppl_after],
        "neutral_kl": kl,
        "minutes": (time.perf_counter() - t0) / 60,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ad.save(out / "adapter")
    write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
