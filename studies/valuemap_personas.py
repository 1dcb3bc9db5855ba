"""Study: whose values? Six system-prompt personas and a two-step happiness steering sweep of the embedded
model answer value questions; the value head (the pipeline's defaults) learns whose answer is whose, and
is scored on held-out questions against the frozen encoder and TF-IDF, and on the non-value control set.

The happiness direction: mean difference at ``blocks.12.hook_resid_post`` from 64 emotion pairs,
calibrated, applied at ``--coeffs`` of the residual norm. Answers: ``--tokens`` new tokens sampled at
temperature 0.7, top-p 0.9, seed 0, cached in ``--cache`` (a rerun reuses them). The report (a Markdown
table), the map, the confusion matrix, the metrics and the head go to ``--out``.

    .venv/bin/python studies/valuemap_personas.py                      # 8 x 280: ~24 min, 5 from cache
    .venv/bin/python studies/valuemap_personas.py --question-seed 7    # the issue-14 acceptance run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from probes.run import run_probe  # noqa: E402
from repe.atomic import write_text  # noqa: E402
from repe.calibration import calibrate  # noqa: E402
from repe.datasets import question_set  # noqa: E402
from repe.models import load_model  # noqa: E402
from steering.evaluation.answers import AnswerCache  # noqa: E402
from steering.evaluation.valuemap import (  # noqa: E402
    PERSONAS,
    ValueMapConfig,
    persona_sources,
    run_valuemap,
    save_valuemap,
    sweep_sources,
)
from steering.generate import GenerationConfig  # noqa: E402
from steering.spec import SteeringSpec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-questions", type=int, default=280)
    ap.add_argument("--question-seed", type=int, default=0, help="which value questions are drawn")
    ap.add_argument("--control", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--coeffs", default="0.15,0.3")
    ap.add_argument("--cache", default=None, help="answer cache (default: the repe cache)")
    ap.add_argument("--out", default="valuemap_personas_out")
    args = ap.parse_args()

    t0 = time.perf_counter()
    lm = load_model()
    sampling = GenerationConfig(
        max_new_tokens=args.tokens, do_sample=True, temperature=0.7, top_p=0.9, seed=0
    )
    sources = persona_sources(list(PERSONAS), sampling)
    with tempfile.TemporaryDirectory() as tmp:
        probe = run_probe(
            lm,
            "emotions/happiness",
            readers=["mean_diff"],
            sites=["blocks.12.hook_resid_post"],
            max_pairs=64,
            out_dir=tmp,
            figure=False,
            progress=False,
        )
    spec = SteeringSpec(calibrate(lm, probe.direction), 0.0, scale="relative")
    coeffs = [float(c) for c in args.coeffs.split(",")]
    swept, trajectory = sweep_sources(spec, coeffs, label="happy", sampling=sampling)
    result = run_valuemap(
        lm,
        sources + swept,
        question_set("values", n=args.n_questions, seed=args.question_seed),
        question_set("control", n=args.control) if args.control else None,
        trajectories=[trajectory],
        cache=AnswerCache(args.cache) if args.cache else AnswerCache(),
        config=ValueMapConfig(),
    )
    out = Path(args.out)
    save_valuemap(result, out)
    lines = [
        f"# Value map: {len(sources) + len(swept)} sources x {args.n_questions} value questions "
        f"(question seed {args.question_seed}), {args.tokens}-token answers",
        "",
        "| score | acc@1 | 95% CI | chance |",
        "| --- | --- | --- | --- |",
    ]
    for name, s in result.scores.items():
        lines.append(
            f"| {name} | {s.acc1:.3f} | [{s.ci1[0]:.3f}, {s.ci1[1]:.3f}] | {s.chance:.3f} |"
        )
    lines += ["", "| difference | point | 95% CI |", "| --- | --- | --- |"]
    for name, (d, lo, hi) in result.differences.items():
        lines.append(f"| {name} | {d:+.3f} | [{lo:+.3f}, {hi:+.3f}] |")
    lines += ["", "Trajectories:", ""]
    lines += [f"- {t}" for t in result.trajectories]
    lines += ["", f"{(time.perf_counter() - t0) / 60:.1f} min"]
    report = "\n".join(lines) + "\n"
    write_text(out / "report.md", report)
    print(report)


if __name__ == "__main__":
    main()
