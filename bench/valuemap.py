"""Value maps: answer generation speed against transformers' ``generate`` at batch 1, and the whole
pipeline (answers -> encoder -> head -> identification -> map) for N sources x Q questions.

* ``valuemap_generation_vs_hf_bs1``: answers/tokens per second of ``collect_answers`` (batched,
  KV-cached, seeded sampling; what the pipeline runs) over tokens per second of
  ``model.generate`` one prompt at a time, on the same value questions, same sampling settings and
  length, in this run. Target >= 4.
* ``valuemap_pipeline_minutes``: ``run_valuemap`` from an empty answer cache for ``--sources``
  sources (built-in personas, then a steering sweep of a happiness direction at block 12) x
  ``--questions`` value questions (no control set). Target <= 15 (the issue's 8 x 200).

    .venv/bin/python bench/valuemap.py                      # 8 sources x 200 questions
    .venv/bin/python bench/valuemap.py --questions 48       # quicker (the RESULT names the size)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", type=int, default=8)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--gen-prompts", type=int, default=12, help="prompts for the generation ratio")
    ap.add_argument("--skip-pipeline", action="store_true")
    args = ap.parse_args()

    from probes.run import run_probe
    from repe.calibration import calibrate
    from repe.chat import messages
    from repe.datasets import question_set
    from repe.models import load_model
    from steering.evaluation.answers import AnswerCache, Source, collect_answers
    from steering.evaluation.valuemap import PERSONAS, persona_sources, run_valuemap, sweep_sources
    from steering.generate import GenerationConfig
    from steering.spec import SteeringSpec

    lm = load_model()
    tok = lm.tokenizer
    sampling = GenerationConfig(
        max_new_tokens=args.tokens, do_sample=True, temperature=0.7, top_p=0.9, seed=0
    )
    qs = question_set("values", n=args.gen_prompts, seed=1)
    # transformers' generate, one prompt at a time
    hf_tokens, t0 = 0, time.perf_counter()
    for q in qs.questions:
        text = tok.apply_chat_template(messages(q.text), tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        torch.manual_seed(0)
        with torch.inference_mode():
            out = lm.model.generate(
                **ids,
                max_new_tokens=args.tokens,
                do_sample=True,
                temperature=0.7,
                top_p=0.9,
                top_k=0,
                pad_token_id=tok.pad_token_id,
            )
        hf_tokens += out.shape[1] - ids["input_ids"].shape[1]
    hf_tps = hf_tokens / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ans = collect_answers(
            lm, [Source("bench", None, None, sampling)], qs, cache=AnswerCache(tmp), progress=False
        )
        ours_tps = ans.new_tokens / (time.perf_counter() - t0)
    ratio = ours_tps / hf_tps
    print(f"INFO hf_generate_bs1_tokens_per_s {hf_tps:.1f} ({hf_tokens} tokens)")
    print(f"INFO collect_answers_tokens_per_s {ours_tps:.1f} ({ans.new_tokens} tokens)")
    lines = [
        f"RESULT valuemap_generation_vs_hf_bs1 {ratio:.2f} target >= 4 "
        f"{'PASS' if ratio >= 4 else 'FAIL'}"
    ]
    if not args.skip_pipeline:
        n_personas = min(len(PERSONAS), max(3, args.sources - 2))
        sources = persona_sources(list(PERSONAS)[:n_personas], sampling)
        trajectories = []
        if args.sources > n_personas:
            probe_dir = tempfile.TemporaryDirectory(prefix="bench-valuemap-")  # removed at exit
            rep = run_probe(
                lm,
                "emotions/happiness",
                readers=["mean_diff"],
                sites=["blocks.12.hook_resid_post"],
                max_pairs=64,
                out_dir=probe_dir.name,
                figure=False,
                progress=False,
            )
            spec = SteeringSpec(calibrate(lm, rep.direction), 0.0, scale="relative")
            probe_dir.cleanup()
            coeffs = [0.15 * (i + 1) for i in range(args.sources - n_personas)]
            swept, traj = sweep_sources(spec, coeffs, label="happy", sampling=sampling)
            sources += swept
            trajectories.append(traj)
        questions = question_set("values", n=args.questions)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            result = run_valuemap(
                lm,
                sources,
                questions,
                None,
                trajectories=trajectories,
                cache=AnswerCache(tmp),
                progress=True,
            )
            minutes = (time.perf_counter() - t0) / 60
        for name, sc in result.metrics()["scores"].items():
            lo, hi = sc["acc1_ci95"]
            print(f"INFO {name} acc1 {sc['acc1']:.3f} [{lo:.3f}, {hi:.3f}]")
        for name, (d, lo, hi) in result.differences.items():
            print(f"INFO {name} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        print(f"INFO trajectories {result.trajectories}")
        size = f"{len(sources)}x{len(questions)}"
        lines.append(
            f"RESULT valuemap_pipeline_minutes_{size} {minutes:.2f} target <= 15 "
            f"{'PASS' if minutes <= 15 else 'FAIL'}"
        )
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
