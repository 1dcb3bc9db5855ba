"""Study: how far do CAA vectors move A/B answers on the embedded model, against item-sampling noise?

For each behaviour: a CAA vector (``probes.caa.caa_direction``, letter-balanced mean difference at the
answer letter) from ``--pairs`` training pairs (0 = the whole training split), applied at every token at
each of ``--layers`` with each of ``--coeffs`` (fractions of the residual norm); scored on ``--items``
letter-balanced held-out items (``stratified_sample`` of the test split, seed ``--seed``; capped at the
split's size). Reported per setting: the shift of the mean matching probability from the unsteered
score and its paired standard error over items (stdev of per-item differences / sqrt(n)), and
whether the shift is more than two standard errors from zero in the intended direction. The report
opens with the A/B control (``steering.evaluation.control``): whether the model reads A/B options at all.

``--form cloze`` scores the answers' texts instead of their letters (``steering.evaluation.cloze``; the vector is
then built from answer-text activations): for models that do not read A/B options, as the A/B control
at the top of the report says of the embedded model. The KL column is the cost on 16 neutral texts.

The report (markdown) goes to ``--out`` (default ``studies/reports/caa_effect_size.md``, or
``caa_effect_size_cloze.md`` for the cloze form) and to stdout.

    .venv/bin/python studies/caa_effect_size.py                       # ~10 min on 2 cores
    .venv/bin/python studies/caa_effect_size.py --pairs 0             # every training pair
    .venv/bin/python studies/caa_effect_size.py --form cloze --behaviours refusal sycophancy
    .venv/bin/python studies/caa_effect_size.py --behaviours refusal --items 16 --layers 9
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from probes.caa import caa_direction  # noqa: E402
from probes.cloze import cloze_direction  # noqa: E402
from repe.atomic import write_text  # noqa: E402
from repe.datasets import load_neutral  # noqa: E402
from repe.datasets.caa import caa_split  # noqa: E402
from repe.models import LoadedModel, load_model  # noqa: E402
from steering import SteeringSpec  # noqa: E402
from steering.evaluation.ab import ab_eval_specs, paired_shift, stratified_sample  # noqa: E402
from steering.evaluation.cloze import cloze_eval_specs  # noqa: E402
from steering.evaluation.control import ab_control  # noqa: E402
from steering.evaluation.costs import NeutralCosts  # noqa: E402

BEHAVIOURS = ("myopic-reward", "refusal", "coordinate-other-ais")


def study(args: argparse.Namespace, lm: LoadedModel | None = None) -> str:
    """The report (markdown); ``lm`` defaults to the embedded model."""
    lm = lm if lm is not None else load_model()
    control = ab_control(lm)
    cloze = args.form == "cloze"
    scored = (
        "the answers' texts (cloze form, `steering.evaluation.cloze`: stem as the question, each option's "
        "text as the answer; vector from answer-text activations)"
        if cloze
        else "the answer letters (CAA's A/B; vector at the answer letter, letter-balanced)"
    )
    lines = [
        f"# CAA effect size on the embedded model ({'cloze' if cloze else 'A/B'} form)",
        "",
        f"{control}.",
        "",
        *([f"**Warning**: {control.warning()}.", ""] if control.warning() and not cloze else []),
        f"Scored on {scored}. Pairs per vector: {args.pairs or 'all training pairs'}; layers "
        f"{args.layers}; coefficients {args.coeffs} (fractions of the residual norm, every token "
        f"steered); held-out items: up to {args.items}, letter-balanced, seed {args.seed}; KL on "
        "16 neutral texts.",
        "",
        "| behaviour | items | base | layer | coeff | shift | paired se | > 2 se, intended sign "
        "| KL |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    costs = NeutralCosts(lm, load_neutral()[:16])
    for behaviour in args.behaviours:
        t0 = time.perf_counter()
        build = cloze_direction if cloze else caa_direction
        d = build(lm, behaviour, layers=args.layers, n_pairs=args.pairs or None)
        held_out = caa_split(behaviour, seed=0)[1]
        items = stratified_sample(held_out, min(args.items, len(held_out)), seed=args.seed)
        settings = [(layer, c) for layer in args.layers for c in args.coeffs]
        specs = [None] + [
            SteeringSpec(d, coeff=c, sites=[f"blocks.{layer}.hook_resid_post"], positions="all")
            for layer, c in settings
        ]
        results = (cloze_eval_specs if cloze else ab_eval_specs)(lm, items, specs, batch_size=16)
        base = results[0]
        for (layer, c), res, spec in zip(settings, results[1:], specs[1:], strict=True):
            shift, se = paired_shift(base.item_scores, res.item_scores)
            clear = shift * (1 if c > 0 else -1) > 2 * se
            assert spec is not None
            kl = costs.kl(spec)
            lines.append(
                f"| {behaviour} | {len(items)} | {base.score:.4f} | {layer} | {c:+g} | "
                f"{shift:+.4f} | {se:.4f} | {'yes' if clear else 'no'} | {kl:.4f} |"
            )
        print(f"# {behaviour}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--behaviours", nargs="+", default=list(BEHAVIOURS))
    ap.add_argument("--pairs", type=int, default=64, help="training pairs per vector (0 = all)")
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 9, 12])
    ap.add_argument("--coeffs", type=float, nargs="+", default=[-0.1, 0.1])
    ap.add_argument("--items", type=int, default=96, help="held-out items (capped at the split)")
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument(
        "--form", choices=["ab", "cloze"], default="ab", help="score answer letters or texts"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="default: studies/reports/<form>.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report = study(args)
    if args.out is None:
        name = "caa_effect_size" + ("_cloze" if args.form == "cloze" else "")
        args.out = ROOT / "studies" / "reports" / f"{name}.md"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, report)
    print(report)


if __name__ == "__main__":
    main()
