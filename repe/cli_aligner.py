"""``repe aligner``: train Aligner global tokens on a ready task or your own data and measure them
(``steering.evaluation.aligner``), evaluate a saved one, or export one for a serving stack.

    repe aligner train --task form --out aligner_form          # N=1, SFT: open answers with a phrase
    repe aligner train --task value --n-tokens 10 --out al_v   # DPO on CAA refusal + hallucination
    repe aligner train --data my_chats.jsonl --out al_mine     # your own {"prompt", "response"} lines
    repe aligner eval --aligner aligner_form/aligner --task form
    repe aligner export --aligner aligner_form/aligner --output aligner_spec.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

TASKS = ("form", "value", "facts")  # steering.evaluation.aligner.TASKS (no torch at start-up)
LLAMA_CPP_NOTE = (
    "llama.cpp's control-vector format (GGUF) adds one vector per layer to the residual stream; it "
    "cannot carry an Aligner, which adds an attention over its prefix tokens inside every block from "
    "its start layer. Export the JSON/safetensors spec (--format spec) and apply it with a serving "
    "stack that can hook attention (this workbench's steer(), a patched attention)."
)


def add_parser(
    sub: Any,
    add_model_args: Callable[[argparse.ArgumentParser], None],
    positive_int: Callable[[str], int],
    func: Callable[[argparse.Namespace], int],
) -> None:
    p = sub.add_parser(
        "aligner",
        help="train, evaluate or export Aligner global tokens (a few hundred parameters)",
        description=__doc__.split("\n\n")[0],
    )
    acts = p.add_subparsers(dest="aligner_cmd", required=True, metavar="{train,eval,export}")

    t = acts.add_parser("train", help="train an Aligner and compare it with a vector and a LoRA")
    add_model_args(t)
    t.add_argument("--task", choices=TASKS, default="form")
    t.add_argument(
        "--data",
        default=None,
        help="your own JSONL instead of a task: prompt/response (SFT) or prompt/chosen/rejected (DPO)",
    )
    t.add_argument("--n-tokens", type=positive_int, default=1, help="N: 1, 4 or 10 in the paper")
    t.add_argument("--start-layer", type=int, default=2)
    t.add_argument("--train", type=positive_int, default=48)
    t.add_argument("--held", type=positive_int, default=48)
    t.add_argument(
        "--epochs", type=positive_int, default=None, help="default: the task's (form 3, value 2)"
    )
    t.add_argument("--lr", type=float, default=None, help="default: the task's (1e-2)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-vector", action="store_true", help="skip the steering-vector comparison")
    t.add_argument("--no-lora", action="store_true", help="skip the LoRA comparison")
    t.add_argument("--out", required=True, help="folder for aligner.safetensors/.json, result.json")
    t.set_defaults(func=func)

    e = acts.add_parser("eval", help="measure a saved Aligner on a ready task's held-out data")
    add_model_args(e)
    e.add_argument("--aligner", required=True, help="a saved Aligner (path without extension)")
    e.add_argument("--task", choices=TASKS, default="form")
    e.add_argument("--held", type=positive_int, default=48)
    e.add_argument("--train", type=positive_int, default=48, help="the split used in training")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=func)

    x = acts.add_parser("export", help="write an Aligner as a JSON/safetensors spec for serving")
    x.add_argument("--aligner", required=True)
    x.add_argument("--format", choices=("spec", "gguf"), default="spec")
    x.add_argument("--output", required=True, help="the spec's JSON file (tensors beside it)")
    x.set_defaults(func=func)


def _own_data(path: str) -> tuple[list[Any], str]:
    from repe.datasets.io import iter_jsonl, require_keys
    from repe.responses import Response
    from steering.aligner_train import Preference

    rows: list[Any] = []
    kind = ""
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        this = "dpo" if "chosen" in obj or "rejected" in obj else "sft"
        if kind and this != kind:
            raise ValueError(f"{where}: mixes prompt/response lines with preference pairs")
        kind = this
        if this == "dpo":
            require_keys(obj, ("prompt", "chosen", "rejected"), where)
            rows.append(Preference(obj["prompt"], obj["chosen"], obj["rejected"]))
        else:
            require_keys(obj, ("prompt", "response"), where)
            rows.append(Response(obj["prompt"], obj["response"]))
    if len(rows) < 2:
        raise ValueError(f"{path}: needs at least 2 examples; got {len(rows)}")
    return rows, kind


def run(args: argparse.Namespace, load: Callable[[argparse.Namespace], Any], flag: Any) -> int:
    if args.aligner_cmd == "export":
        return _export(args, flag)
    from steering.aligner import Aligner
    from steering.evaluation.aligner import AlignerRun, run_aligner

    own = _own_data(args.data) if args.aligner_cmd == "train" and args.data else None
    lm = load(args)  # after the data are checked: a bad file fails before the model loads
    if args.aligner_cmd == "eval":
        al = flag(f"--aligner {args.aligner}", Aligner.load, args.aligner, lm)
        return _eval(lm, al, args, flag)
    if own is not None:
        from steering.aligner_train import TrainConfig, train_aligner

        data, kind = own
        cfg = TrainConfig(
            objective=kind, lr=args.lr or 1e-2, epochs=args.epochs or 3, seed=args.seed
        )
        al, res = train_aligner(
            lm, data, n_tokens=args.n_tokens, start_layer=args.start_layer, config=cfg
        )
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        al.save(out / "aligner")
        print(json.dumps({"parameters": al.n_parameters, **res.summary()}, indent=1))
        print(f"wrote {out / 'aligner'}.safetensors/.json")
        return 0
    cfg_run = flag(
        "aligner settings",
        AlignerRun,
        task=args.task,
        n_tokens=args.n_tokens,
        start_layer=args.start_layer,
        train=args.train,
        held=args.held,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        compare_vector=not args.no_vector,
        compare_lora=not args.no_lora,
    )
    r = run_aligner(lm, cfg_run, args.out)
    r.pop("artifact")
    print(json.dumps({k: r[k] for k in ("base", "aligner", "vector", "lora") if k in r}, indent=1))
    print(f"wrote {Path(args.out) / 'aligner'}.safetensors/.json and result.json")
    return 0


def _eval(lm: Any, al: Any, args: argparse.Namespace, flag: Any) -> int:
    from steering.evaluation import aligner as ev
    from steering.evaluation.preference import paired_change, preference_margins

    run = flag(
        "aligner settings",
        ev.AlignerRun,
        task=args.task,
        train=args.train,
        held=args.held,
        seed=args.seed,
    )
    if args.task == "form":
        _, held = ev.form_split(run)
        before, after = ev.form_success(lm, held), ev.form_success(lm, held, al)
    elif args.task == "value":
        _, pairs = ev.value_split(run)
        before, after = preference_margins(lm, pairs), preference_margins(lm, pairs, al)
    else:
        _, qs, answers, _ = ev.facts_data()
        before, after = ev.recall(lm, qs, answers), ev.recall(lm, qs, answers, al)
    mean, lo, hi = paired_change(before, after)
    metric = {"form": "success", "value": "margin", "facts": "recall"}[args.task]
    print(
        f"{metric}: base {before.mean():.3f}, Aligner {after.mean():.3f}; change {mean:+.3f} "
        f"[{lo:+.3f}, {hi:+.3f}] (95% bootstrap, {len(before)} held-out items)"
    )
    return 0


def _export(args: argparse.Namespace, flag: Any) -> int:
    from steering.aligner import Aligner

    if args.format == "gguf":
        raise ValueError(LLAMA_CPP_NOTE)
    al = flag(f"--aligner {args.aligner}", Aligner.load, args.aligner)
    written = al.export_spec(args.output)
    print(f"wrote {', '.join(str(p) for p in written)}")
    print(LLAMA_CPP_NOTE.split("; ")[0] + "; this spec is for stacks that can hook attention.")
    return 0
