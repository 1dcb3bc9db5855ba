"""One RAHF run, from preference pairs to figures: read the pattern, train the adapter, measure it on
held-out pairs, and set beside it a plain steering vector built from the same pattern at the same
cost (matched KL on neutral text). The command line (``repe rahf``), the study
(``studies/rahf_embedded.py``) and the app's RAHF panel all run this.

Three variants:

* ``scit`` — RAHF's SCIT: first an adapter is instruction-tuned so that the model gives the chosen
  answers under a good assistant instruction and the rejected ones under a bad one (``scit_tune``);
  then the same (prompt, response), chosen and rejected alike, is read by that tuned model under the
  two instructions (per-token differences). ``scit_epochs=0`` skips the tuning and reads the base
  model under the two instructions (a small model's instructions alone may carry no preference).
* ``negative`` — D2O-style negative-only data: the model's own greedy answers to the training prompts
  minus the human-dispreferred answers, pooled (mean minus mean) because the two responses differ.
* ``vilmo`` — a value-instruction contrast: the same (prompt, response) read with and without one of
  the shipped value instructions (``repe.datasets.load_value_instructions``).

Measured before and after, on held-out pairs only: the chosen-vs-rejected log-likelihood margin, the
projection of response-token states on the pattern direction, perplexity and KL on neutral text, and
the facts AUC (``facts_auc``), each change with a paired bootstrap interval where it is per item.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from probes.preference import ActivityPattern, activity_pattern, pooled_pattern
from repe.atomic import write_text
from repe.datasets.preference import PreferencePair, load_preference_pairs, load_value_instructions
from repe.directions import Direction
from repe.models import LoadedModel
from repe.responses import BAD_INSTRUCTION, GOOD_INSTRUCTION, CondLike, Response
from steering.adapter import LowRankAdapter
from steering.evaluation.costs import NeutralCosts
from steering.evaluation.preference import (
    facts_auc,
    paired_change,
    pattern_projections,
    preference_margins,
)
from steering.rahf import (
    RAHFConfig,
    SCITConfig,
    default_layers,
    own_answers,
    scit_tune,
    setting,
    train_rahf,
)
from steering.spec import SteeringSpec

VARIANTS = ("scit", "negative", "vilmo")
# the learning rates the study measured (studies/rahf_embedded.py; README): SCIT's held-out loss still
# fell at the end of 3 epochs at 5e-4, and its margin rose only at 1e-3
DEFAULT_LR = {"scit": 1e-3, "negative": 5e-4, "vilmo": 5e-4}
# a pooled pattern (difference of two responses' mean states) is about 10x longer than a per-token
# pattern of the same response under two conditions (embedded model: 10.6-20.2 vs 0.7-3.5 per block);
# at RAHF's 5 the negative-only adapter raised perplexity x1.57
DEFAULT_ALPHA_PATTERN = {"scit": 5.0, "negative": 1.0, "vilmo": 5.0}


@dataclass(frozen=True)
class RAHFRun:
    pairs: tuple[str, ...] = ("caa:hallucination", "caa:refusal")  # sources (caa:x or JSONL)
    variant: str = "scit"
    value: str = "honesty"  # vilmo: which shipped value instruction
    train: int = 48  # training pairs per source
    held: int = 60  # held-out pairs per source
    alpha_pattern: float | None = None  # None: DEFAULT_ALPHA_PATTERN of the variant
    lr: float | None = None  # None: DEFAULT_LR of the variant
    epochs: int = 3
    rank: int = 8
    seed: int = 0
    answer_tokens: int = 40  # negative: length of the model's own answers
    scit_epochs: int = 2  # scit: epochs of contrastive instruction tuning (0: none)
    compare_vector: bool = True  # a steering vector from the pattern at matched KL
    facts: int = 200  # facts for the AUC check (0: skip)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}; got {self.variant!r}")
        if self.train < 2 or self.held < 1:
            raise ValueError("need at least 2 training and 1 held-out pair per source")
        if not self.pairs:
            raise ValueError("give at least one source of preference pairs")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")

    @property
    def pattern_alpha(self) -> float:
        a = self.alpha_pattern
        return a if a is not None else DEFAULT_ALPHA_PATTERN[self.variant]

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.variant]


def split_pairs(run: RAHFRun) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Per source, a seeded shuffle: the first ``train`` pairs train, the next ``held`` are held out."""
    rng = random.Random(run.seed)
    train, held = [], []
    for src in run.pairs:
        pairs = load_preference_pairs(src)
        rng.shuffle(pairs)
        if len(pairs) < run.train + 1:
            raise ValueError(f"{src}: {len(pairs)} pairs; need more than --train {run.train}")
        train += pairs[: run.train]
        held += pairs[run.train : run.train + run.held]
    return train, held


def _responses(pairs: Sequence[PreferencePair]) -> list[Response]:
    return [Response(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected) if r]


def read_pattern(
    lm: LoadedModel,
    run: RAHFRun,
    train: Sequence[PreferencePair],
    layers: list[int],
    progress: bool,
) -> tuple[ActivityPattern, list[Response], RAHFConfig]:
    """The variant's pattern, the responses the adapter trains on and the training config."""
    base = RAHFConfig(
        alpha_pattern=run.pattern_alpha,
        lr=run.learning_rate,
        epochs=run.epochs,
        rank=run.rank,
        seed=run.seed,
        layers=tuple(layers),
    )
    if run.variant == "scit":
        items = _responses(train)
        pos: CondLike = GOOD_INSTRUCTION
        neg: CondLike = BAD_INSTRUCTION
        if run.scit_epochs > 0:
            chosen = [Response(p.prompt, p.chosen) for p in train if p.chosen]
            rejected = [Response(p.prompt, p.rejected) for p in train if p.chosen]
            if not chosen:
                raise ValueError("the scit variant needs pairs with a chosen answer")
            tuned = scit_tune(
                lm,
                chosen,
                rejected,
                SCITConfig(epochs=run.scit_epochs, seed=run.seed),
                progress=progress,
            )
            pos = setting(tuned, GOOD_INSTRUCTION, "SCIT-tuned, good instruction")
            neg = setting(tuned, BAD_INSTRUCTION, "SCIT-tuned, bad instruction")
        pattern = activity_pattern(lm, items, layers, pos, neg)
        cfg = RAHFConfig(**{**asdict(base), "preferred": pos, "dispreferred": neg})
        return pattern, items, cfg
    if run.variant == "vilmo":
        values = load_value_instructions()
        if run.value not in values:
            raise ValueError(f"unknown value {run.value!r}; shipped: {sorted(values)}")
        instr = values[run.value]
        items = _responses(train)
        pattern = activity_pattern(lm, items, layers, instr, None)
        cfg = RAHFConfig(**{**asdict(base), "preferred": instr, "dispreferred": None})
        return pattern, items, cfg
    prompts = list(dict.fromkeys(p.prompt for p in train))
    own = own_answers(lm, prompts, max_new_tokens=run.answer_tokens, progress=progress)
    rejected = [Response(p.prompt, p.rejected) for p in train]
    if not own:
        raise ValueError("the model gave no non-empty answer to the training prompts")
    pattern = pooled_pattern(lm, own, rejected, layers)
    return pattern, own + rejected, base


def matched_vector(
    lm: LoadedModel,
    direction: Direction,
    costs: NeutralCosts,
    kl_target: float,
    *,
    iters: int = 12,
) -> tuple[SteeringSpec, float]:
    """A raw-scale additive spec along ``direction`` (all its sites, every position) whose neutral KL
    matches ``kl_target`` (bisection on the coefficient's size; the sign is the pattern's own)."""
    lo, hi = 0.0, 1.0
    while costs.kl(SteeringSpec(direction, coeff=hi, scale="raw")) < kl_target and hi < 1e3:
        lo, hi = hi, hi * 2
    for _ in range(iters):
        mid = (lo + hi) / 2
        if costs.kl(SteeringSpec(direction, coeff=mid, scale="raw")) < kl_target:
            lo = mid
        else:
            hi = mid
    spec = SteeringSpec(direction, coeff=(lo + hi) / 2, scale="raw")
    return spec, costs.kl(spec)


def _measure(
    lm: LoadedModel,
    intervention: Any,
    held: Sequence[PreferencePair],
    held_items: Sequence[Response],
    direction: Direction,
    costs: NeutralCosts,
    facts: int,
) -> dict[str, Any]:
    kl, ppl = costs.measure(intervention)
    out: dict[str, Any] = {
        "margin": preference_margins(lm, held, intervention),
        "projection": pattern_projections(lm, held_items, direction, intervention),
        "neutral_kl": kl,
        "neutral_perplexity": ppl,
    }
    if facts:
        out["facts_auc"] = facts_auc(lm, intervention, n=facts, seed=0)
    return out


def _summary(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("margin", "projection"):
        out[f"{key}_before"] = float(np.mean(before[key]))
        out[f"{key}_after"] = float(np.mean(after[key]))
        out[f"{key}_change"] = dict(
            zip(("mean", "lo", "hi"), paired_change(before[key], after[key]), strict=True)
        )
    for key in ("neutral_kl", "neutral_perplexity", "facts_auc"):
        if key in after:
            out[key] = after[key]
    if "facts_auc" in after:
        out["facts_auc_change"] = after["facts_auc"] - before["facts_auc"]
    out["perplexity_ratio"] = after["neutral_perplexity"] / before["neutral_perplexity"]
    return out


# what "the capability check stays within tolerance" means, stated once
TOLERANCE = {"perplexity_ratio_max": 1.10, "facts_auc_drop_max": 0.05}


def within_tolerance(s: dict[str, Any]) -> bool:
    ok = s["perplexity_ratio"] <= TOLERANCE["perplexity_ratio_max"]
    if "facts_auc_change" in s:
        ok = ok and s["facts_auc_change"] >= -TOLERANCE["facts_auc_drop_max"]
    return bool(ok)


def run_rahf(
    lm: LoadedModel,
    run: RAHFRun,
    out: str | Path | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, int, float], None] | None = None,
) -> tuple[LowRankAdapter, dict[str, Any]]:
    """Train and measure one RAHF adapter; with ``out``, write ``adapter`` (artifact), ``pattern``
    (the pattern's direction) and ``metrics.json`` there. ``log`` gets one line per stage and
    ``on_step`` each training step (see ``train_rahf``)."""
    t0 = time.perf_counter()
    train, held = split_pairs(run)
    held = [p for p in held if p.chosen is not None]
    if not held:
        raise ValueError("the held-out pairs need chosen answers to measure the margin")
    layers = default_layers(lm.n_layers)
    log(f"{run.variant}: {len(train)} training pairs, {len(held)} held out; target blocks {layers}")
    pattern, items, cfg = read_pattern(lm, run, train, layers, progress)
    direction = pattern.direction(lm, f"rahf_{run.variant}_pattern")
    held_items = _responses(held)
    costs = NeutralCosts(lm)
    log("measuring the base model on held-out pairs")
    before = _measure(lm, None, held, held_items, direction, costs, run.facts)
    log(f"training: {len(items)} responses, {run.epochs} epochs")
    res = train_rahf(
        lm,
        items,
        cfg,
        progress=progress,
        name=f"rahf_{run.variant}",
        on_step=on_step,
        pooled=pattern.mean if pattern.kind == "pooled" else None,
    )
    ad = res.adapter
    log("measuring the adapter")
    after = _measure(lm, ad, held, held_items, direction, costs, run.facts)
    metrics: dict[str, Any] = {
        "run": {
            **asdict(run),
            "pairs": list(run.pairs),
            "lr": run.learning_rate,
            "alpha_pattern": run.pattern_alpha,
        },
        "layers": layers,
        "train_pairs": len(train),
        "train_items": len(items),
        "held_out_pairs": len(held),
        "pattern": {
            "kind": pattern.kind,
            "n_tokens": pattern.n_tokens,
            "mean_diff_norm": [float(x) for x in pattern.mean.norm(dim=-1)],
        },
        "training": {**ad.metrics, "stopped_early": res.stopped_early},
        "base": {
            "margin": float(np.mean(before["margin"])),
            "projection": float(np.mean(before["projection"])),
            "neutral_perplexity": before["neutral_perplexity"],
            **({"facts_auc": before["facts_auc"]} if "facts_auc" in before else {}),
        },
        "adapter": _summary(before, after),
        "tolerance": TOLERANCE,
    }
    metrics["adapter"]["within_tolerance"] = within_tolerance(metrics["adapter"])
    if run.compare_vector and after["neutral_kl"] > 0 and math.isfinite(after["neutral_kl"]):
        log("a steering vector from the same pattern at matched KL")
        spec, kl = matched_vector(lm, direction, costs, after["neutral_kl"])
        vec = _measure(lm, spec, held, held_items, direction, costs, run.facts)
        metrics["vector"] = {
            **_summary(before, vec),
            "coeff": float(spec.coeff_at(spec.site_list()[0])),
        }
        metrics["vector"]["within_tolerance"] = within_tolerance(metrics["vector"])
    metrics["minutes"] = (time.perf_counter() - t0) / 60
    ad.metrics = {**ad.metrics, "held_out": metrics["adapter"]}
    if out is not None:
        o = Path(out)
        o.mkdir(parents=True, exist_ok=True)
        ad.save(o / "adapter")
        direction.save(o / "pattern")
        write_text(o / "metrics.json", json.dumps(metrics, indent=1))
    return ad, metrics
