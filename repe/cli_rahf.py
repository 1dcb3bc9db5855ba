"""``repe rahf``: train a RAHF adapter from preference pairs and measure it on held-out pairs
(``steering.evaluation.rahf``), or fold a trained adapter into a copy of the weights (``--merge``).

    repe rahf --out rahf_out                                  # SCIT-style on CAA hallucination + refusal
    repe rahf --variant negative --pairs my_pairs.jsonl --out rahf_neg
    repe rahf --variant vilmo --value care --out rahf_care
    repe rahf --adapter rahf_out/adapter --merge merged_model  # a merged Hugging Face folder
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

VARIANTS = ("scit", "negative", "vilmo")  # steering.evaluation.rahf.VARIANTS (no torch at start-up)


def add_parser(
    sub: Any,
    add_model_args: Callable[[argparse.ArgumentParser], None],
    positive_int: Callable[[str], int],
    func: Callable[[argparse.Namespace], int],
) -> None:
    p = sub.add_parser(
        "rahf",
        help="train a RAHF adapter from preference pairs and measure it (or merge one)",
        description=__doc__.split("\n\n")[0],
    )
    add_model_args(p)
    p.add_argument(
        "--pairs",
        default="caa:hallucination,caa:refusal",
        help="comma-separated sources: caa:<behaviour> or a JSONL of prompt/rejected[/chosen]",
    )
    p.add_argument("--variant", choices=VARIANTS, default="scit")
    p.add_argument("--value", default="honesty", help="vilmo: a shipped value instruction")
    p.add_argument("--train", type=positive_int, default=48, help="training pairs per source")
    p.add_argument("--held", type=positive_int, default=60, help="held-out pairs per source")
    p.add_argument("--alpha-pattern", type=float, default=None, help="default: 5 (1 for negative)")
    p.add_argument(
        "--lr", type=float, default=None, help="default: 1e-3 for scit, 5e-4 for the others"
    )
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--rank", type=positive_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--facts", type=int, default=200, help="facts for the AUC check (0: skip)")
    p.add_argument(
        "--no-vector",
        action="store_true",
        help="skip the steering vector from the same pattern at matched KL",
    )
    p.add_argument("--out", default=None, help="folder for adapter, pattern and metrics.json")
    p.add_argument("--adapter", default=None, help="an adapter to merge (skips training)")
    p.add_argument(
        "--merge",
        default=None,
        help="write the model with the adapter folded into its weights to this new folder",
    )
    p.set_defaults(func=func)


def run(args: argparse.Namespace, load: Callable[[argparse.Namespace], Any], flag: Any) -> int:
    from steering.adapter import LowRankAdapter
    from steering.evaluation.rahf import RAHFRun, run_rahf

    if args.adapter is None and args.out is None:
        raise ValueError("give --out (where the trained adapter and metrics go) or --adapter")
    if args.merge is not None:
        m = Path(args.merge)
        if m.exists() and (not m.is_dir() or any(m.iterdir())):
            raise ValueError(f"--merge {args.merge}: exists and is not an empty folder")
    if args.adapter is not None and args.merge is None:
        raise ValueError("--adapter is for merging: give --merge DIR too")
    lm = load(args)
    if args.adapter is not None:
        adapter = flag(f"--adapter {args.adapter}", LowRankAdapter.load, args.adapter, lm)
    else:
        cfg = flag(
            "rahf settings",
            RAHFRun,
            pairs=tuple(s for s in args.pairs.split(",") if s),
            variant=args.variant,
            value=args.value,
            train=args.train,
            held=args.held,
            alpha_pattern=args.alpha_pattern,
            lr=args.lr,
            epochs=args.epochs,
            rank=args.rank,
            seed=args.seed,
            facts=max(0, args.facts),
            compare_vector=not args.no_vector,
        )
        adapter, metrics = run_rahf(lm, cfg, args.out)
        print(json.dumps({k: metrics[k] for k in ("base", "adapter") if k in metrics}, indent=1))
        if "vector" in metrics:
            print(json.dumps({"vector": metrics["vector"]}, indent=1))
        print(f"wrote {Path(args.out) / 'adapter'}, pattern and metrics.json")
    if args.merge is not None:
        merged = adapter.merged(lm)
        merged.model.save_pretrained(args.merge)
        merged.tokenizer.save_pretrained(args.merge)
        print(f"wrote the merged model to {args.merge} (load it with --model {args.merge})")
    return 0
