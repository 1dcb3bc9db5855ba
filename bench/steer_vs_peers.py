"""Steering quality against peer libraries: how far a CAA vector moves A/B answers per unit of side
effect (KL on neutral text), for this project, repeng and steering-vectors.

Same data for all three: for each behaviour, a fixed sample of ``--pairs`` training pairs of
``repe.datasets.caa.caa_split`` (held-out questions never enter training). A pair is the question with the
assistant turn opened as ``"(A"`` vs ``"(B"``; the peers get exactly the strings ``repe.chat.render``
makes of them (the script proves they tokenise to the same ids as repe's encoding, and that the answer
letter is the last token), so every library reads at the answer-letter token, as CAA does:

1. ours: ``probes.caa.caa_direction`` (its default ``balance_letters=True``: the mean difference
   weights the pairs so that both letter orders, matching A / other B and the reverse, count equally;
   the residual stream at the letter token carries the letter's identity, ~100 in norm here against a
   behaviour difference of a few units, and a plain mean over an unbalanced sample keeps part of it);
2. repeng: ``ControlVector.train`` with its default ``method="pca_diff"``, reading the last token.
   pca_diff is not a mean: sklearn's PCA centres the per-pair differences before taking the first
   component, so the consistent part of the difference (the mean, which CAA keeps) is removed and the
   vector is the direction along which the differences vary most (sign-aligned by repeng);
3. steering-vectors: ``train_steering_vector`` with its default ``mean_aggregator`` and
   ``read_token_index=-1`` (the letter): the plain CAA mean difference. As a check, ours with
   ``balance_letters=False`` is computed too: it must equal steering-vectors' vector (cosine ~1).

Same site: block ``--layer`` (default 11). repe ``blocks.11.hook_resid_post`` = HF
``hidden_states[12]`` = repeng ``hidden_layers=[11]`` / ``ControlModel(model, [11])`` = steering-vectors
``layers=[11], layer_type="decoder_block"``; ``bench/peers_common.check_site_alignment`` checks the
reading side numerically, and the conversion check below the writing side.

Same measuring code: every vector is applied through this project's ``hf`` steering. The peers' vectors
are converted into a repe Direction at that site with ``scale="raw"``, so ``coeff`` is each library's
own coefficient (repeng: the ``set_control`` coefficient times its unit vector; steering-vectors: the
``multiplier`` times its raw mean difference; ours: ``scale="relative"``, a fraction of the residual
norm). The script checks that the peers' own application (``ControlModel.set_control``,
``SteeringVector.apply``) and the converted Direction give the same logits. Positions: every token
(``--positions all``, what both peers' own application does), the same for all three.

Measured, per library and per sign of the coefficient:

* cost: ``steering.evaluation.costs.kl_from_base`` on the neutral texts (mean KL(base || steered) per token);
* effect: ``steering.evaluation.ab.ab_eval`` on ``--items`` held-out A/B items of the behaviour (the
  behaviour's test split): the shift of the mean matching probability from the unsteered score, counted
  in the intended direction (a ``+`` coefficient should raise it, ``-`` lower it).

Score (the RESULT): **A/B shift per nat of KL at a fixed KL budget** ``B = --kl-budget``. For each
library and sign, the coefficient (in the library's own units) is searched so that its KL is B within
10% (KL grows ~c^2, so a few secant steps in log-log; at most 5 KL evaluations); the A/B shift is
measured there and carried to exactly B by linear interpolation in sqrt(KL) through the origin
(``shift * sqrt(B / KL)``: a vector of length c moves logits ~c and KL ~c^2, so the shift is close to
linear in sqrt(KL) at small KL). The two signs are averaged and divided by B. A library's score is the
mean over behaviours; the RESULT is ours / the best peer's. The shifts are small on this model (a few
points of probability), so the script also bootstraps the held-out items (paired: every library is
measured on the same items) and prints a 90% interval of ours - the best peer.

Cloze form (``--form cloze``): the embedded model does not read A/B options (``steering.evaluation.control``), so
its A/B shifts are noise for every library. In cloze form the training pairs are the question's stem
with each option's *text* as the assistant's answer (``repe.datasets.caa.cloze_pairs``); the peers read
the last token of those texts, ours is ``probes.cloze.cloze_direction`` (mean over the answer's
tokens), and the effect is ``steering.evaluation.cloze.cloze_eval_specs`` (the matching answer text's share of
likelihood) on the held-out items. RESULT ``steer_cloze_shift_per_kl_vs_best_peer``.

Behaviours: ``refusal`` and ``myopic-reward`` by default (prompts ~90 tokens; sycophancy's are ~190,
twice the cost on 2 shared cores; ``--behaviours sycophancy refusal`` runs it). The embedded model is
small, and its A/B answers move by a few points at most: the numbers compare vectors, not the model.

    bash bench/setup_peers.sh                               # once
    .venv-peers/bin/python bench/steer_vs_peers.py          # full run (< 10 minutes)
    .venv-peers/bin/python bench/steer_vs_peers.py --quick  # smoke test
    .venv-peers/bin/python bench/steer_vs_peers.py --form cloze   # answer texts (< 10 minutes)
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # repeng's progress bars

import argparse  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from peers_common import (  # noqa: E402
    as_texts,
    check_same_tokens,
    check_site_alignment,
    require_peers,
    versions,
)
from steer_common import direction_from_vectors, result, site  # noqa: E402

from probes.caa import answer_positions, caa_direction  # noqa: E402
from probes.cloze import cloze_direction  # noqa: E402
from repe import load_model  # noqa: E402
from repe.datasets import ContrastDataset  # noqa: E402
from repe.datasets.caa import caa_split, cloze_pairs, cloze_split  # noqa: E402
from repe.directions import Direction  # noqa: E402
from repe.models import LoadedModel  # noqa: E402
from steering.evaluation.ab import ab_eval_specs  # noqa: E402
from steering.evaluation.cloze import cloze_eval_specs  # noqa: E402
from steering.evaluation.costs import NeutralCosts  # noqa: E402
from steering.hooks import steer  # noqa: E402
from steering.spec import SteeringSpec  # noqa: E402

BEHAVIOURS = ("refusal", "myopic-reward")
OURS, REPENG, SV = "ours", "repeng pca_diff", "s-v mean"
LIBS = (OURS, REPENG, SV)
PEERS = (REPENG, SV)
BATCH = 16
START = 0.15  # first guess of a coefficient, as a fraction of the residual norm at the site
KL_TOL = 1.1  # the searched coefficient's KL is within this factor of the budget
KL_TRIES = 5


@dataclass
class Vector:
    """One library's vector as a repe Direction plus the unit its coefficients are counted in."""

    lib: str
    direction: Direction
    scale: str  # "relative" for ours, "raw" for the peers
    unit: str  # how the library names its coefficient
    start: float  # first guess of a coefficient (its own units)
    fit_s: float = 0.0

    def spec(self, coeff: float, positions: str) -> SteeringSpec:
        return SteeringSpec(self.direction, coeff, positions=positions, scale=self.scale)


@dataclass
class Point:
    """One library, one sign: the coefficient found for the budget, its KL and the A/B shift there."""

    coeff: float
    kl: float
    n_kl: int  # KL evaluations the search used
    shift: float = float("nan")  # measured, in the intended direction
    at_budget: float = float("nan")  # carried to KL = budget
    items: list[float] = field(default_factory=list)  # per held-out item, carried to KL = budget


# ---- training (each library's own call, on the same pairs) --------------------------------------
def train_all(
    lm: LoadedModel,
    train: ContrastDataset,
    layer: int,
    form: str = "ab",
    items: list[Any] | None = None,
) -> tuple[dict[str, Vector], dict[str, Any]]:
    """Each library's vector (as a repe Direction), and the peers' native objects plus ours without
    letter balancing (for the checks). In cloze form the pairs end in the answers' texts and ours is
    :func:`probes.cloze.cloze_direction` (mean over the answer's tokens); the peers read the last
    token as always."""
    from repeng import ControlVector, DatasetEntry
    from steering_vectors import train_steering_vector

    tok = lm.tokenizer
    pos_sides, neg_sides = list(train.positives()), list(train.negatives())
    pos, neg = as_texts(tok, pos_sides), as_texts(tok, neg_sides)
    check_same_tokens(tok, pos_sides, pos)
    check_same_tokens(tok, neg_sides, neg)
    for sides in (pos_sides, neg_sides) if form == "ab" else ():  # the peers read index -1
        for p in answer_positions(lm, sides):
            if p.index != p.n_tokens - 1:
                raise AssertionError("the answer letter is not the last token of a training text")
    s = site(layer)

    t0 = time.perf_counter()
    if form == "ab":
        ours = caa_direction(lm, train, layers=[layer], batch_size=BATCH)
    else:
        ours = cloze_direction(lm, items or [], layers=[layer], batch_size=BATCH)
    t_ours = time.perf_counter() - t0
    resid = ours.stats[s]["resid_norm"]

    t0 = time.perf_counter()
    entries = [DatasetEntry(positive=p, negative=n) for p, n in zip(pos, neg, strict=True)]
    cv = ControlVector.train(
        lm.model, tok, entries, hidden_layers=[layer], batch_size=BATCH, method="pca_diff"
    )
    t_rep = time.perf_counter() - t0

    t0 = time.perf_counter()
    sv = train_steering_vector(
        lm.model,
        tok,
        list(zip(pos, neg, strict=True)),
        layers=[layer],
        layer_type="decoder_block",
        read_token_index=-1,
        batch_size=BATCH,
    )
    t_sv = time.perf_counter() - t0

    plain = (
        caa_direction(lm, train, layers=[layer], batch_size=BATCH, balance_letters=False)
        if form == "ab"
        else None
    )
    rep_dir = direction_from_vectors(lm, {layer: cv.directions[layer]}, "repeng", "pca_diff")
    sv_dir = direction_from_vectors(lm, {layer: sv.layer_activations[layer]}, "s-v", "mean")
    sv_norm = float(sv_dir[s].norm())
    vectors = {
        OURS: Vector(OURS, ours, "relative", "fraction of resid norm", START, t_ours),
        REPENG: Vector(REPENG, rep_dir, "raw", "set_control coeff", START * resid, t_rep),
        SV: Vector(SV, sv_dir, "raw", "multiplier", START * resid / sv_norm, t_sv),
    }
    return vectors, {REPENG: cv, SV: sv, "ours unbalanced": plain}


def check_conversion(
    lm: LoadedModel,
    vectors: dict[str, Vector],
    native: dict[str, Any],
    prompts: list[Any],
    layer: int,
) -> float:
    """The peers' own application and ours (converted Direction, scale='raw', every token) give the
    same logits; return the largest relative difference."""
    from repeng import ControlModel

    from repe.batching import encode, make_batch

    batch = make_batch(encode(lm.tokenizer, prompts), int(lm.tokenizer.pad_token_id), "right")
    ids, mask, pos = batch.input_ids, batch.attention_mask, batch.position_ids
    real = mask.bool()
    # explicit position_ids [B, T]: under transformers 5 the decoder layers otherwise get [1, T], and
    # repeng's ControlModule (which reshapes them to the batch) fails for a batch larger than 1

    def ours(vec: Vector, coeff: float) -> torch.Tensor:
        with torch.inference_mode(), steer(lm, vec.spec(coeff, "all")):
            return lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[real]

    worst = 0.0
    c_rep = vectors[REPENG].start
    cm = ControlModel(copy.deepcopy(lm.model), [layer])  # repeng mutates the model it wraps
    cm.set_control(native[REPENG], c_rep)
    with torch.inference_mode():
        theirs = cm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[real]
    a = ours(vectors[REPENG], c_rep)
    worst = max(worst, float((a - theirs).abs().max() / theirs.abs().max()))
    del cm
    c_sv = vectors[SV].start
    with torch.inference_mode(), native[SV].apply(lm.model, multiplier=c_sv):
        theirs = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[real]
    a = ours(vectors[SV], c_sv)
    worst = max(worst, float((a - theirs).abs().max() / theirs.abs().max()))
    if worst > 1e-4:
        raise AssertionError(
            f"converted peer vectors steer differently from the peers ({worst:.2e})"
        )
    return worst


# ---- the measurement --------------------------------------------------------------------------
def coeff_for_kl(
    costs: NeutralCosts, vec: Vector, sign: int, budget: float, positions: str
) -> Point:
    """Search a coefficient ``sign * c`` (library units) whose KL on neutral text is ``budget``."""
    c = vec.start
    kl = costs.kl(vec.spec(sign * c, positions))
    n = 1
    while n < KL_TRIES and abs(math.log(max(kl, 1e-12) / budget)) > math.log(KL_TOL):
        c *= min(max(math.sqrt(budget / max(kl, 1e-12)), 0.25), 4.0)
        kl = costs.kl(vec.spec(sign * c, positions))
        n += 1
    return Point(sign * c, kl, n)


def measure(
    lm: LoadedModel,
    behaviour: str,
    vectors: dict[str, Vector],
    costs: NeutralCosts,
    args: argparse.Namespace,
) -> tuple[float, dict[str, dict[int, Point]]]:
    points = {
        lib: {
            sign: coeff_for_kl(costs, vectors[lib], sign, args.kl_budget, args.positions)
            for sign in (1, -1)
        }
        for lib in LIBS
    }
    order = [(lib, sign) for lib in LIBS for sign in (1, -1)]
    specs: list[SteeringSpec | None] = [None] + [
        vectors[lib].spec(points[lib][sign].coeff, args.positions) for lib, sign in order
    ]
    evaluate = ab_eval_specs if args.form == "ab" else cloze_eval_specs
    results = evaluate(lm, behaviour, specs, n_items=args.items, batch_size=BATCH)
    base = results[0].score
    for (lib, sign), r in zip(order, results[1:], strict=True):
        p = points[lib][sign]
        carry = math.sqrt(args.kl_budget / p.kl)
        p.shift = sign * (r.score - base)
        p.at_budget = p.shift * carry
        p.items = [
            sign * (a - b) * carry
            for a, b in zip(r.item_scores, results[0].item_scores, strict=True)
        ]
    return base, points


def bootstrap(
    per_behaviour: list[dict[str, dict[int, Point]]], budget: float, n: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Resample the held-out items of every behaviour (the same resample for all libraries: they are
    measured on the same items) and recompute ours - the best peer's score. Returns the 5th and 95th
    percentiles of that margin and the fraction of resamples in which ours is ahead."""
    rng = random.Random(seed)
    margins = []
    for _ in range(n):
        sums = dict.fromkeys(LIBS, 0.0)
        for points in per_behaviour:
            m = len(points[OURS][1].items)
            idx = [rng.randrange(m) for _ in range(m)]
            for lib in LIBS:
                for sign in (1, -1):
                    it = points[lib][sign].items
                    sums[lib] += sum(it[i] for i in idx) / m / 2 / budget
        means = {lib: v / len(per_behaviour) for lib, v in sums.items()}
        margins.append(means[OURS] - max(means[p] for p in PEERS))
    q = statistics.quantiles(margins, n=20)
    return q[0], q[-1], sum(x > 0 for x in margins) / n


def score(points: dict[int, Point], budget: float) -> float:
    """Mean over the two signs of the intended-direction shift at KL = budget, per nat of KL."""
    return (points[1].at_budget + points[-1].at_budget) / 2 / budget


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one behaviour, few pairs and items")
    ap.add_argument("--behaviours", nargs="+", default=list(BEHAVIOURS))
    ap.add_argument("--layer", type=int, default=11, help="decoder block (not the last one)")
    ap.add_argument("--pairs", type=int, default=32, help="training pairs per behaviour")
    ap.add_argument("--items", type=int, default=40, help="held-out A/B items per behaviour")
    ap.add_argument("--kl-budget", type=float, default=0.1, help="KL budget B (nats/token)")
    ap.add_argument("--positions", default="all", help="steered positions, the same for all")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 shared cores)")
    ap.add_argument(
        "--form",
        choices=["ab", "cloze"],
        default="ab",
        help="score answer letters (CAA's A/B) or answer texts (cloze; pairs end in the texts)",
    )
    args = ap.parse_args()
    if args.quick:
        args.behaviours, args.pairs, args.items = args.behaviours[:1], 12, 16
    require_peers()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    print("# versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    lm = load_model()
    if not 0 <= args.layer < lm.n_layers - 1:
        raise SystemExit(
            f"--layer must be in [0, {lm.n_layers - 2}]: the last block's HF hidden state has the "
            "final norm applied, so repeng would read a different site there"
        )
    what = "A/B" if args.form == "ab" else "cloze"
    costs = NeutralCosts(lm)
    costs.base()
    print(
        f"# block {args.layer} ({site(args.layer)}), {args.pairs} training pairs and {args.items} "
        f"held-out {what} items per behaviour, positions={args.positions!r}, KL on {costs.n_tokens} "
        f"neutral tokens, KL budget {args.kl_budget} nats/token; torch threads "
        f"{torch.get_num_threads()}",
        flush=True,
    )
    scores: dict[str, list[float]] = {lib: [] for lib in LIBS}
    measured: list[dict[str, dict[int, Point]]] = []
    for behaviour in args.behaviours:
        t_b = time.perf_counter()
        if args.form == "ab":
            train, _test = caa_split(behaviour, seed=0)
            train = train.sample(args.pairs, seed=0)
        else:
            items = random.Random(0).sample(cloze_split(behaviour, seed=0)[0], args.pairs)
            train = cloze_pairs(items, f"caa/{behaviour}[cloze train]")
        tok = lm.tokenizer
        worst = check_site_alignment(
            lm,
            as_texts(tok, train.positives()[:4]),
            as_texts(tok, train.negatives()[:4]),
            [args.layer],
        )
        vectors, native = train_all(
            lm, train, args.layer, args.form, items if args.form == "cloze" else None
        )
        conv = check_conversion(lm, vectors, native, list(train.positives()[:4]), args.layer)
        s = site(args.layer)
        unit = {lib: vectors[lib].direction[s].float() for lib in LIBS}
        if native["ours unbalanced"] is not None:
            unit["plain"] = native["ours unbalanced"][s].float()
        unit = {k: v / v.norm() for k, v in unit.items()}
        letters = [p.label for p in train.pairs]
        print(
            f"\n## {behaviour} ({args.form} form): {len(train)} training pairs"
            + (f" (matching letter A in {letters.count('A')})" if args.form == "ab" else "")
            + f"; site alignment (reading) max rel diff {worst:.1e}; "
            f"peers' own application vs converted Direction (writing): logits rel diff {conv:.1e}"
        )
        plain = (
            f"cos(ours balance_letters=False, s-v) {float(unit['plain'] @ unit[SV]):+.6f}; "
            if "plain" in unit
            else ""
        )
        print(
            f"# cos(ours, repeng) {float(unit[OURS] @ unit[REPENG]):+.4f}, cos(ours, s-v) "
            f"{float(unit[OURS] @ unit[SV]):+.4f}, {plain}train seconds: "
            + ", ".join(f"{lib} {vectors[lib].fit_s:.1f}" for lib in LIBS),
            flush=True,
        )
        base, points = measure(lm, behaviour, vectors, costs, args)
        measured.append(points)
        print(f"# unsteered {what} matching probability {base:.4f} ({args.items} held-out items)")
        print(
            f"{'library':<16} {'coefficient unit':<23} {'coeff':>9} {'KL':>7} {'(evals)':>7} "
            f"{'shift':>8} {'at B':>8}"
        )
        for lib in LIBS:
            for sign in (1, -1):
                p = points[lib][sign]
                print(
                    f"{lib:<16} {vectors[lib].unit:<23} {p.coeff:>+9.4g} {p.kl:>7.4f} {p.n_kl:>7} "
                    f"{p.shift:>+8.4f} {p.at_budget:>+8.4f}"
                )
        for lib in LIBS:
            sc = score(points[lib], args.kl_budget)
            scores[lib].append(sc)
            print(f"INFO {args.form}_shift_per_kl[{behaviour}][{lib}] {sc:+.4f}")
        print(f"# {behaviour}: {time.perf_counter() - t_b:.0f}s", flush=True)

    means = {lib: sum(v) / len(v) for lib, v in scores.items()}
    print(f"\n## {what} shift per nat of KL at KL = {args.kl_budget}, mean over behaviours")
    for lib in LIBS:
        print(f"INFO {args.form}_shift_per_kl[{lib}] {means[lib]:+.4f}")
    best = max(PEERS, key=lambda p: means[p])
    lo, hi, ahead = bootstrap(measured, args.kl_budget)
    print(
        f"INFO {args.form}_shift_per_kl_margin_vs_best_peer {means[OURS] - means[best]:+.4f} ({best}; "
        f"items bootstrap: 90% interval {lo:+.4f} to {hi:+.4f}, ours ahead in {ahead:.0%})"
    )
    print(f"# best peer: {best}; total runtime {time.perf_counter() - t_start:.0f}s")
    if means[best] <= 0:
        print(
            f"# the best peer moves A/B answers the wrong way on average ({means[best]:+.4f}): the "
            "ratio is reported as +inf when ours moves them the right way, -inf otherwise"
        )
        ratio = math.inf if means[OURS] > 0 else -math.inf
    else:
        ratio = means[OURS] / means[best]
    name = "ab" if args.form == "ab" else "cloze"
    result(f"steer_{name}_shift_per_kl_vs_best_peer", ratio, ">=", 1.0, ".3f")


if __name__ == "__main__":
    main()
