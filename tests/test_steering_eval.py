"""Measuring steering on the tiny model: CAA vectors, A/B evaluation, KL / perplexity, the sweep.

Exact invariants only: coefficient 0 and ``v - v`` change nothing (bit for bit), KL grows with the
coefficient, perplexity matches an independent computation, the answer-letter tokens decode right.
"""

from __future__ import annotations

import math

import pytest
import torch

from probes.caa import (
    _capture_letter_pairs,
    answer_positions,
    caa_direction,
    letter_balanced_weights,
)
from repe import capture
from repe.batching import encode
from repe.chat import messages, render
from repe.datasets import CAAItem, ContrastDataset, ContrastPair, load_caa, load_caa_items
from repe.datasets.caa import answer_letter, caa_split
from repe.directions import Direction
from repe.hooks import leftover_hooks
from steering import SteeringSpec, steer
from steering.evaluation.ab import ab_eval, ab_eval_specs, letter_token_ids, stratified_sample
from steering.evaluation.costs import NeutralCosts, kl_from_base, perplexity
from steering.evaluation.sweep import SweepRow, coeff_layer_sweep, recommend, sweep_figure

BEHAVIOUR = "corrigible-neutral-HHH"  # the shortest CAA prompts
SITE = "blocks.2.hook_resid_post"
TEXTS = ["The train to the coast leaves at nine.", "Rivers carry sand", "A cup of tea."]


# small forwards on a shared, busy machine run many times faster on one thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rand_direction(lm, sites=(SITE,), seed=0, name="r") -> Direction:
    g = torch.Generator().manual_seed(seed)
    vecs = {s: torch.randn(lm.d_model, generator=g) for s in sites}
    stats = {s: {"resid_norm": 10.0} for s in sites}
    return Direction(vecs, lm.identity, name=name, stats=stats).normalized()


@pytest.fixture(scope="module")
def items() -> list[CAAItem]:
    return caa_split(BEHAVIOUR, seed=0)[1][:12]


# ---- letters and positions -------------------------------------------------------------------
def test_letter_token_ids_decode_to_the_letters(tiny_lm):
    ids = letter_token_ids(tiny_lm, "ABCD")
    assert {k: tiny_lm.tokenizer.decode([v]) for k, v in ids.items()} == {k: k for k in "ABCD"}
    # and they are the tokens that follow "(" in a rendered CAA answer
    item = load_caa_items(BEHAVIOUR)[0]
    for letter in "AB":
        enc = encode(tiny_lm.tokenizer, [messages(item.question, assistant="(" + letter)])[0]
        assert enc.ids[-1] == ids[letter]
        assert tiny_lm.tokenizer.decode(enc.ids[-2:]) == "(" + letter


def test_answer_letter_parses_and_refuses():
    assert answer_letter("(A)") == "A"
    assert answer_letter(" (B) ") == "B"
    for bad in ("(Yes)", "A", "(a)", "(AB)"):
        with pytest.raises(ValueError, match="capital letter in parentheses"):
            answer_letter(bad)


def test_answer_positions_find_the_letter_under_the_chat_template(tiny_lm):
    ds = load_caa(BEHAVIOUR)
    pairs = [ds[i] for i in range(6)]
    for side in ("positive", "negative"):
        sides = [getattr(p, side) for p in pairs]
        at = answer_positions(tiny_lm, sides)
        for s, a in zip(sides, at, strict=True):
            ids = encode(tiny_lm.tokenizer, [s])[0].ids
            assert a.index == len(ids) - 1  # "(A" ends the rendered chat
            assert tiny_lm.tokenizer.decode([ids[a.index]]) == a.letter
            assert a.letter in "AB"
        if side == "positive":
            assert [a.letter for a in at] == [p.label for p in pairs]
    # text mode: "...\n\nAnswer: (A"
    text = load_caa(BEHAVIOUR, chat=False)[0].positive
    (a,) = answer_positions(tiny_lm, [text])
    assert tiny_lm.tokenizer.decode([encode(tiny_lm.tokenizer, [text])[0].ids[a.index]]) == a.letter


@pytest.mark.parametrize("answer", ["(Yes", "Yes", "(1", "(Ab"])
def test_position_check_refuses_an_answer_that_is_not_a_letter(tiny_lm, answer):
    ds = ContrastDataset(
        "bad",
        [ContrastPair(messages("Pick one.", assistant=answer), messages("Pick.", assistant="(B"))],
    )
    with pytest.raises(ValueError, match="capital letter in parentheses"):
        caa_direction(tiny_lm, ds, layers=[1])


def test_position_check_refuses_a_token_that_does_not_decode_to_the_letter(tiny_lm, monkeypatch):
    tok = tiny_lm.tokenizer
    real = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, **kw: "(A" if len(ids) == 1 else real(ids, **kw))
    with pytest.raises(ValueError, match="decodes to '\\(A', not the answer letter 'A'"):
        answer_positions(tiny_lm, [messages("Pick one.", assistant="(A")])


# ---- the CAA vector ------------------------------------------------------------------------
def test_caa_split_is_disjoint_by_question_and_deterministic():
    train, test = caa_split(BEHAVIOUR, seed=0)
    items = load_caa_items(BEHAVIOUR)
    train_q = {p.positive[-2]["content"] for p in train}
    test_q = {it.question for it in test}
    assert not train_q & test_q
    assert train_q | test_q == {it.question for it in items}
    assert len(test) == round(0.2 * len(items))
    again = caa_split(BEHAVIOUR, seed=0)
    assert again[0].fingerprint() == train.fingerprint() and again[1] == test
    assert caa_split(BEHAVIOUR, seed=1)[1] != test
    with pytest.raises(ValueError, match="test_frac"):
        caa_split(BEHAVIOUR, test_frac=1.0)


def test_letter_pairs_fast_path_matches_capture_at_the_last_token(tiny_lm):
    ds = load_caa(BEHAVIOUR)
    pairs = [ds[i] for i in range(5)]
    pos_sides, neg_sides = [p.positive for p in pairs], [p.negative for p in pairs]
    sites = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    ids = [encode(tiny_lm.tokenizer, [p, n]) for p, n in zip(pos_sides, neg_sides, strict=True)]
    fast_pos, fast_neg = _capture_letter_pairs(
        tiny_lm, [e[0].ids for e in ids], [e[1].ids for e in ids], sites, batch_size=3
    )
    ref_pos = capture(tiny_lm, pos_sides, sites, positions="last", batch_size=2)
    ref_neg = capture(tiny_lm, neg_sides, sites, positions="last", batch_size=2)
    for s in sites:
        scale = float(ref_pos[s].abs().max())
        assert torch.allclose(fast_pos[s], ref_pos[s], atol=1e-4 * scale, rtol=0)
        assert torch.allclose(fast_neg[s], ref_neg[s], atol=1e-4 * scale, rtol=0)
    assert not leftover_hooks(tiny_lm.model)


def test_caa_direction_is_the_letter_balanced_mean_difference(tiny_lm):
    train, _ = caa_split(BEHAVIOUR, seed=0)
    d = caa_direction(tiny_lm, BEHAVIOUR, layers=[1, 3], n_pairs=12, seed=0)
    used = train.sample(12, seed=0)
    assert d.method == "caa_mean_diff" and d.normalisation == "unit"
    assert d.dataset_fingerprint == used.fingerprint()
    assert d.params["layers"] == [1, 3] and d.params["n_pairs"] == 12
    assert d.sites == ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    # independent: capture the last token of both sides, weight by letter order, subtract
    pos = capture(tiny_lm, used.positives(), d.sites, positions="last")
    neg = capture(tiny_lm, used.negatives(), d.sites, positions="last")
    w, dropped = letter_balanced_weights([(p.label, "B" if p.label == "A" else "A") for p in used])
    assert dropped == 0
    for s in d.sites:
        md = (w.float() @ (pos[s] - neg[s])).float()
        assert math.isclose(float(d[s].norm()), 1.0, rel_tol=1e-5)
        assert math.isclose(d.stats[s]["mean_diff_norm"], float(md.norm()), rel_tol=1e-3)
        assert float(d[s] @ md / md.norm()) > 0.9999  # sign: positive = matching the behaviour
        assert d.stats[s]["resid_norm"] > 0
    plain = caa_direction(tiny_lm, BEHAVIOUR, layers=[1], n_pairs=12, balance_letters=False)
    md = (pos[d.sites[0]] - neg[d.sites[0]]).mean(0)
    assert float(plain[d.sites[0]] @ md / md.norm()) > 0.9999


def test_caa_direction_reads_the_letter_when_it_is_not_the_last_token(tiny_lm):
    # closed answers "(A)" and different prompts on the two sides: the general capture path
    qs = ["Pick one: (A) tea (B) coffee", "Choose: (A) sea (B) land", "Which? (A) up (B) down"]
    pairs = [
        ContrastPair(
            messages(q, assistant=f"({a})"), messages(q + " Be brief.", assistant=f"({b})")
        )
        for q, (a, b) in zip(qs, ["AB", "BA", "AB"], strict=True)
    ]
    ds = ContrastDataset("closed", pairs)
    d = caa_direction(tiny_lm, ds, layers=[2], balance_letters=False)
    assert d.name == "caa/closed" and d.params["behaviour"] is None
    at = answer_positions(tiny_lm, ds.positives())
    assert all(a.index == a.n_tokens - 2 for a in at)  # the letter, before ")"
    pos = capture(tiny_lm, ds.positives(), SITE, positions=-2)
    neg = capture(tiny_lm, ds.negatives(), SITE, positions=-2)
    md = (pos[SITE] - neg[SITE]).mean(0)
    assert math.isclose(d.stats[SITE]["mean_diff_norm"], float(md.norm()), rel_tol=1e-4)
    assert float(d[SITE] @ md / md.norm()) > 0.9999


def test_letter_balanced_weights_cancel_the_letters():
    letters = [("A", "B")] * 3 + [("B", "A")] * 1 + [("C", "A")] + [("D", "D")]
    w, dropped = letter_balanced_weights(letters)
    assert dropped == 1 and math.isclose(float(w.sum()), 1.0)
    assert math.isclose(float(w[:3].sum()), float(w[3]))  # the two orders weigh the same
    assert float(w[4]) == 0.0 and float(w[5]) > 0
    with pytest.raises(ValueError, match="balance_letters"):
        letter_balanced_weights([("A", "B")] * 2)


def test_caa_direction_refuses_bad_arguments(tiny_lm):
    with pytest.raises(ValueError, match=r"layers must be block indices in \[0, 3\]"):
        caa_direction(tiny_lm, BEHAVIOUR, layers=[4])
    with pytest.raises(ValueError, match="n_pairs"):
        caa_direction(tiny_lm, BEHAVIOUR, layers=[1], n_pairs=0)
    with pytest.raises(ValueError, match="behaviour_or_dataset"):
        caa_direction(tiny_lm, 3, layers=[1])  # type: ignore[arg-type]


# ---- A/B evaluation ------------------------------------------------------------------------
def test_ab_score_is_a_probability_and_coeff_zero_is_exact(tiny_lm, items):
    d = rand_direction(tiny_lm)
    for positions in ("assistant", "all"):
        base, zero, vmv, moved = ab_eval_specs(
            tiny_lm,
            items,
            [
                None,
                SteeringSpec(d, coeff=0.0, positions=positions),
                SteeringSpec(d - d, coeff=3.0, scale="raw", positions=positions),
                SteeringSpec(d, coeff=2.0, positions=positions),
            ],
            batch_size=5,
        )
        assert 0.0 <= base.score <= 1.0 and all(0.0 <= s <= 1.0 for s in base.item_scores)
        assert 0.0 < base.letter_mass <= 1.0 and base.n_items == len(items)
        assert zero.item_scores == base.item_scores and zero.score == base.score
        assert vmv.item_scores == base.item_scores
        assert moved.item_scores != base.item_scores
    single = ab_eval(tiny_lm, items, SteeringSpec(d, coeff=0.0), batch_size=5)
    assert single.score == ab_eval(tiny_lm, items, batch_size=5).score
    assert not leftover_hooks(tiny_lm.model)


def test_ab_score_is_the_renormalised_letter_probability(tiny_lm, items):
    """Independent check: one prompt at a time, a full forward under steer, p(m) / (p(A) + p(B))."""
    d = rand_direction(tiny_lm)
    spec = SteeringSpec(d, coeff=1.0, positions="assistant")
    got = ab_eval(tiny_lm, items[:5], spec, batch_size=4)  # shared prompt pass + KV cache
    got_all = ab_eval(tiny_lm, items[:5], SteeringSpec(d, coeff=1.0), batch_size=4)
    tok = tiny_lm.tokenizer
    a_id, b_id = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    for k, it in enumerate(items[:5]):
        text = render(tok, messages(it.question, assistant="(")).text
        enc = tok(text, add_special_tokens=False, return_tensors="pt")
        ref = {}
        for name, s in (("assistant", spec), ("all", SteeringSpec(d, coeff=1.0))):
            with steer(tiny_lm, s) as state, torch.no_grad():
                state.begin_sequence(attention_mask=enc["attention_mask"])
                p = tiny_lm.model(**enc).logits[0, -1].softmax(-1)
            pa, pb = float(p[a_id]), float(p[b_id])
            ref[name] = (pa if it.answer_matching_behavior == "(A)" else pb) / (pa + pb)
        assert math.isclose(got.item_scores[k], ref["assistant"], abs_tol=1e-5)
        assert math.isclose(got_all.item_scores[k], ref["all"], abs_tol=1e-5)


def test_ab_eval_does_not_depend_on_batching(tiny_lm, items):
    spec = SteeringSpec(rand_direction(tiny_lm), coeff=1.0, positions="assistant")
    one = ab_eval(tiny_lm, items, spec, batch_size=1)
    many = ab_eval(tiny_lm, items, spec, batch_size=7)
    assert all(
        math.isclose(a, b, abs_tol=1e-5)
        for a, b in zip(one.item_scores, many.item_scores, strict=True)
    )


def test_balanced_score_averages_within_each_matching_letter(tiny_lm, items):
    res = ab_eval(tiny_lm, items, batch_size=6)
    groups = {}
    for it, x in zip(items, res.item_scores, strict=True):
        groups.setdefault(it.answer_matching_behavior, []).append(x)
    assert len(groups) == 2
    expected = sum(sum(v) / len(v) for v in groups.values()) / 2
    assert math.isclose(res.balanced_score, expected, rel_tol=1e-12)
    even = stratified_sample(caa_split(BEHAVIOUR)[1], 8, seed=0)  # 4 A-matching, 4 B-matching
    assert sum(it.answer_matching_behavior == "(A)" for it in even) == 4
    res = ab_eval(tiny_lm, even, batch_size=8)
    assert math.isclose(res.score, res.balanced_score, rel_tol=1e-12)


def test_stratified_sample_spreads_over_the_letters():
    a = [CAAItem(f"a{i}", "(A)", "(B)") for i in range(10)]
    b = [CAAItem(f"b{i}", "(B)", "(A)") for i in range(3)]
    pool = a[:5] + b + a[5:]
    got = stratified_sample(pool, 6, seed=0)
    assert sum(it.answer_matching_behavior == "(A)" for it in got) == 3
    assert [pool.index(it) for it in got] == sorted(pool.index(it) for it in got)
    assert stratified_sample(pool, 6, seed=0) == got != stratified_sample(pool, 6, seed=1)
    assert sum(it in b for it in stratified_sample(pool, 9, seed=0)) == 3  # B runs out: A fills up
    with pytest.raises(ValueError, match="n must be between 1"):
        stratified_sample(pool, 0)


def test_ab_eval_uses_the_held_out_split(tiny_lm):
    res = ab_eval(tiny_lm, BEHAVIOUR, n_items=6, batch_size=6)
    test_q = {it.question for it in caa_split(BEHAVIOUR, seed=0)[1]}
    assert res.n_items == 6 and res.behaviour == BEHAVIOUR
    sampled = ab_eval(
        tiny_lm, [it for it in caa_split(BEHAVIOUR)[1] if it.question in test_q], n_items=6
    )
    assert sampled.items_fingerprint == res.items_fingerprint


def test_ab_eval_refuses_bad_items(tiny_lm, items):
    bad = CAAItem("Yes or no?", "(Yes)", "(No)")
    with pytest.raises(
        ValueError, match="item 0: answer_matching_behavior must be a capital letter"
    ):
        ab_eval(tiny_lm, [bad])
    with pytest.raises(ValueError, match="n_items"):
        ab_eval(tiny_lm, items, n_items=0)
    with pytest.raises(ValueError, match="list of CAAItem"):
        ab_eval(tiny_lm, ["question?"])  # type: ignore[list-item]


# ---- the cost ------------------------------------------------------------------------------
def test_kl_is_zero_for_no_change_and_grows_with_the_coefficient(tiny_lm):
    d = rand_direction(tiny_lm)
    costs = NeutralCosts(tiny_lm, TEXTS)
    assert costs.kl(SteeringSpec(d, coeff=0.0)) == 0.0
    assert costs.kl(SteeringSpec(d - d, coeff=5.0, scale="raw")) == 0.0
    assert kl_from_base(tiny_lm, SteeringSpec(d, coeff=0.0), TEXTS) == 0.0
    for sign in (1.0, -1.0):
        kls = [costs.kl(SteeringSpec(d, coeff=sign * c)) for c in (0.1, 0.3, 1.0, 3.0)]
        assert kls[0] > 0 and all(a < b for a, b in zip(kls, kls[1:], strict=False)), kls
    # the assistant-only spec costs on neutral text what steering every token costs
    assert costs.kl(SteeringSpec(d, coeff=0.5, positions="assistant")) == costs.kl(
        SteeringSpec(d, coeff=0.5)
    )
    assert not leftover_hooks(tiny_lm.model)


def test_perplexity_is_exp_of_the_mean_token_nll(tiny_lm):
    tok = tiny_lm.tokenizer
    nll, n = 0.0, 0
    for t in TEXTS:  # one text at a time, a plain forward, no padding
        ids = tok(t, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = tiny_lm.model(input_ids=ids).logits[0, :-1].double()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        n += ids.shape[1] - 1
    expected = math.exp(nll / n)
    assert math.isclose(perplexity(tiny_lm, TEXTS), expected, rel_tol=1e-5)
    assert math.isclose(perplexity(tiny_lm, TEXTS, batch_size=1), expected, rel_tol=1e-5)
    d = rand_direction(tiny_lm)
    assert perplexity(tiny_lm, TEXTS, SteeringSpec(d, coeff=0.0)) == perplexity(tiny_lm, TEXTS)
    assert perplexity(tiny_lm, TEXTS, SteeringSpec(d, coeff=3.0)) != perplexity(tiny_lm, TEXTS)
    kl, ppl = NeutralCosts(tiny_lm, TEXTS).measure(None)
    assert kl == 0.0 and math.isclose(ppl, expected, rel_tol=1e-5)


# ---- the sweep -----------------------------------------------------------------------------
def row(layer, coeff, shift, kl):
    site = f"blocks.{layer}.hook_resid_post"
    return SweepRow(layer, site, coeff, 0.5 + shift, shift, 0.5 + shift, kl, 10.0, 0.5)


def test_recommend_takes_the_largest_shift_within_the_budget():
    rows = [
        row(1, 0.0, 0.0, 0.0),
        row(1, 0.1, 0.05, 0.02),
        row(1, 0.2, 0.10, 0.08),
        row(1, 0.4, 0.30, 0.50),  # the strongest, over budget
        row(2, 0.2, 0.12, 0.09),
        row(2, -0.2, 0.40, 0.01),  # negative coefficient: never recommended
    ]
    assert recommend(rows, kl_budget=0.1) == rows[4]
    assert recommend(rows, kl_budget=0.085) == rows[2]
    assert recommend(rows, kl_budget=1.0) == rows[3]
    assert recommend(rows, kl_budget=0.01) is None


def test_sweep_recommendation_respects_the_kl_budget(tiny_lm, items):
    d = rand_direction(tiny_lm, sites=("blocks.1.hook_resid_post", SITE))
    coeffs = [-1.0, 0.5, 1.0, 2.0]
    loose = coeff_layer_sweep(
        tiny_lm, items, [1, 2], coeffs, kl_budget=1e9, direction=d, kl_texts=TEXTS, n_items=8
    )
    assert loose.coeffs == [-1.0, 0.0, 0.5, 1.0, 2.0] and loose.layers == [1, 2]
    for layer in (1, 2):
        at = loose.at(layer)
        zero = next(r for r in at if r.coeff == 0.0)
        assert zero.kl == 0.0 and zero.shift == 0.0 and zero.score == loose.base_score
        assert all(math.isclose(r.shift, r.score - zero.score) for r in at)
        pos = [r.kl for r in at if r.coeff > 0]
        assert pos == sorted(pos) and pos[0] > 0
    best = max(
        (r for r in loose.rows if r.coeff > 0 and r.shift > 0), key=lambda r: r.shift, default=None
    )
    assert loose.recommended == best
    assert best is not None  # the seeded random model has one
    # a budget just under the best row's KL must pick something cheaper (or nothing)
    tight = coeff_layer_sweep(
        tiny_lm,
        items,
        [1, 2],
        coeffs,
        kl_budget=best.kl * 0.999,
        direction=d,
        kl_texts=TEXTS,
        n_items=8,
    )
    assert tight.recommended != best
    assert tight.recommended is None or tight.recommended.kl <= tight.kl_budget
    for r in loose.rows:  # the paired standard error of each shift, against coefficient 0
        assert r.se >= 0.0 and (r.se == 0.0) == (r.coeff == 0.0)
    none = coeff_layer_sweep(
        tiny_lm,
        items,
        [1],
        [0.5],
        kl_budget=0.0,
        direction=d,
        kl_texts=TEXTS,
        n_items=8,
        control=loose.control or False,
    )
    assert none.control is loose.control  # a control result passed in is kept, not re-measured
    assert none.recommended is None and "no recommendation" in none.table()
    with pytest.raises(ValueError, match="recommends no setting"):
        none.apply_to(d)


def test_sweep_report_annotates_the_direction_and_plots(tiny_lm, items, tmp_path):
    d = rand_direction(tiny_lm, sites=("blocks.1.hook_resid_post", SITE))
    report = coeff_layer_sweep(
        tiny_lm,
        items,
        [1, 2],
        [-2.0, 2.0, 4.0],
        kl_budget=1e9,
        direction=d,
        kl_texts=TEXTS,
        n_items=8,
    )
    report.rows.append(
        row(2, 9.0, 1.0, 0.0)
    )  # plant a recommendation whatever the random model does
    report.recommended = recommend(report.rows, report.kl_budget)
    tuned = report.apply_to(d)
    assert tuned.recommended_coeff == 9.0 and tuned.best_site == SITE
    assert tuned.metrics["sweep"]["recommended"]["coeff"] == 9.0
    assert d.recommended_coeff is None  # a copy
    loaded = Direction.load(tuned.save(tmp_path / "tuned"))
    assert loaded.metrics["sweep"]["rows"] == tuned.metrics["sweep"]["rows"]
    starred = [line for line in report.table().splitlines() if line.endswith(" *")]
    assert len(starred) == 1 and starred[0].split()[:2] == ["2", "9"]
    # the A/B control ran on the same model and is reported with the sweep
    assert report.control is not None and report.control.n_items == 64
    assert tuned.metrics["sweep"]["control"] == report.control.to_dict()
    assert str(report.control) in report.table()
    assert ("WARNING: this model does not read A/B options" in report.table()) == (
        not report.control.reads_choices
    )
    pytest.importorskip("plotly")
    fig = sweep_figure(report)
    names = [t.name for t in fig.data]
    assert "layer 1" in names
    ab_layer1 = next(t for t in fig.data if t.name == "layer 1" and t.error_y.array is not None)
    assert list(ab_layer1.error_y.array) == [2 * r.se for r in report.at(1)]
    stars = [t for t in fig.data if t.name.startswith("recommended")]
    assert [(t.x[0], t.y[0]) for t in stars] == [(9.0, report.recommended.score), (9.0, 0.0)]


def test_sweep_refuses_bad_arguments(tiny_lm, items):
    d = rand_direction(tiny_lm)
    with pytest.raises(ValueError, match="no vector at"):
        coeff_layer_sweep(tiny_lm, items, [1], [0.1], direction=d)
    with pytest.raises(ValueError, match="direction is required"):
        coeff_layer_sweep(tiny_lm, items, [2], [0.1])
    with pytest.raises(ValueError, match="scale must be one of"):
        coeff_layer_sweep(tiny_lm, items, [2], [0.1], direction=d, scale="big")
    with pytest.raises(ValueError, match=r"layers must be block indices in \[0, 3\]"):
        coeff_layer_sweep(tiny_lm, items, [9], [0.1], direction=d)


def test_sweep_reports_progress_and_stops_when_the_callback_raises(tiny_lm, items):
    d = rand_direction(tiny_lm, sites=("blocks.1.hook_resid_post", SITE))
    seen: list[tuple[float, str]] = []
    report = coeff_layer_sweep(
        tiny_lm,
        items,
        [1, 2],
        [0.5, 1.0],
        direction=d,
        kl_texts=TEXTS,
        n_items=8,
        batch_size=4,
        progress=lambda f, what: seen.append((f, what)),
    )
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] > 0
    assert {"A/B answers", "A/B control", "KL and perplexity on neutral text"} <= {
        w for _, w in seen
    }
    # 2 batches x 5 specs (base + 2 layers x 2 coeffs) A/B passes, 16 batches of the 64 control
    # items, then 4 cost measurements, then done
    assert len(seen) == 2 * 5 + 16 + 4 + 1
    assert len(report.rows) == 2 * 3

    class Stop(Exception):
        pass

    def stop_after_three(f: float, what: str) -> None:
        if len(seen) >= 3:
            raise Stop
        seen.append((f, what))

    seen.clear()
    with pytest.raises(Stop):
        coeff_layer_sweep(
            tiny_lm, items, [1], [0.5], direction=d, kl_texts=TEXTS, n_items=8,
            progress=stop_after_three,
        )  # fmt: skip
    assert len(seen) == 3
