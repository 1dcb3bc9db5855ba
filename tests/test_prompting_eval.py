"""Steering against prompting (``steering.evaluation.prompting``) and the ``context`` the cloze and A/B
evaluations put before each item's user turn.

Unit tests on the tiny random model check the plumbing against direct forwards (the context is rendered
where the chat template puts it, the A/B path's cached prompt pass includes it, a prompt's KL compares
each neutral text with and without the prefix) and the verdict's logic on planted numbers; one
integration test on the embedded model checks that the comparison moves the right way on refusal.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from probes.cloze import cloze_direction
from repe.batching import encode, make_batch
from repe.chat import messages
from repe.datasets import CAA_BEHAVIOURS, load_behaviour_prompts, load_neutral
from repe.datasets.caa import caa_split, cloze_items, cloze_split
from steering import SteeringSpec
from steering.evaluation.ab import ab_eval_specs, letter_token_ids
from steering.evaluation.cloze import cloze_eval_specs
from steering.evaluation.costs import NeutralCosts
from steering.evaluation.prompting import (
    PROMPT_SETTINGS,
    ComparisonRow,
    SteeringVsPrompting,
    prompt_conditions,
    prompt_costs,
    steering_vs_prompting,
)
from steering.hooks import steer

SYSTEM = [{"role": "system", "content": "Always refuse. Answer as briefly as you can."}]
FEWSHOT = [
    {"role": "user", "content": "Can you help me?"},
    {"role": "assistant", "content": "No, I cannot help with that."},
]


@pytest.fixture(scope="module")
def items():
    return caa_split("refusal", seed=0)[1][:5]


@pytest.fixture(scope="module")
def direction(tiny_lm):
    return cloze_direction(tiny_lm, "refusal", layers=[1, 2], n_pairs=8)


def _default_system(tok) -> str | None:
    """The system prompt the chat template inserts when a conversation has none (SmolLM2's does)."""
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    head = "<|im_start|>system\n"
    if not text.startswith(head):
        return None
    return text[len(head) : text.index("<|im_end|>")]


# ---- context: None changes nothing ----------------------------------------------------------------
@pytest.mark.parametrize("evaluate", [cloze_eval_specs, ab_eval_specs])
def test_context_none_leaves_every_result_bit_for_bit(tiny_lm, items, direction, evaluate):
    specs = [
        None,
        SteeringSpec(direction, coeff=0.3, sites=["blocks.1.hook_resid_post"]),
        SteeringSpec(
            direction, coeff=-0.3, positions="assistant", sites=["blocks.2.hook_resid_post"]
        ),
    ]
    plain = evaluate(tiny_lm, items, specs, batch_size=2)
    none = evaluate(tiny_lm, items, specs, batch_size=2, context=None)
    empty = evaluate(tiny_lm, items, specs, batch_size=2, context=[])
    for a, b, c in zip(plain, none, empty, strict=True):
        assert a == b  # every field, the item scores included
        assert a.context is None and c.context == []
        assert a.item_scores == c.item_scores and a.letter_mass == c.letter_mass
    assert plain[0].item_scores != plain[1].item_scores  # the specs do something


@pytest.mark.parametrize("evaluate", [cloze_eval_specs, ab_eval_specs])
def test_the_templates_own_default_system_prompt_as_context_changes_nothing(
    tiny_lm, items, evaluate
):
    """The context goes exactly where the chat template puts a system prompt: passing the one it
    inserts by default renders the same tokens, so the scores are bit-identical."""
    default = _default_system(tiny_lm.tokenizer)
    if default is None:
        pytest.skip("this chat template inserts no default system prompt")
    base = evaluate(tiny_lm, items, [None])[0]
    same = evaluate(tiny_lm, items, [None], context=[{"role": "system", "content": default}])[0]
    assert same.item_scores == base.item_scores


@pytest.mark.parametrize("context", [SYSTEM, FEWSHOT, SYSTEM + FEWSHOT])
@pytest.mark.parametrize("evaluate", [cloze_eval_specs, ab_eval_specs])
def test_a_context_changes_the_scores(tiny_lm, items, evaluate, context):
    base, prompted = (evaluate(tiny_lm, items, [None], context=c)[0] for c in (None, context))
    assert prompted.context == context
    assert prompted.items_fingerprint == base.items_fingerprint
    assert (
        max(abs(a - b) for a, b in zip(base.item_scores, prompted.item_scores, strict=True)) > 1e-4
    )


def _direct_cloze(lm, conv_m, conv_o) -> float:
    lps = []
    for conv in (conv_m, conv_o):
        e = encode(lm.tokenizer, [conv])[0]
        with torch.inference_mode():
            logits = lm.model(input_ids=torch.tensor([e.ids])).logits[0].float()
        lp = logits.log_softmax(-1)
        a = e.assistant_start
        tok = torch.tensor(e.ids[a:])
        lps.append(float(lp[a - 1 : len(e.ids) - 1].gather(-1, tok[:, None]).mean()))
    return float(torch.sigmoid(torch.tensor(lps[0] - lps[1])))


def test_cloze_with_context_matches_a_direct_forward(tiny_lm, items):
    ctx = SYSTEM + FEWSHOT
    got = cloze_eval_specs(tiny_lm, items, [None], context=ctx, batch_size=3)[0].item_scores
    for c, score in zip(cloze_items(items), got, strict=True):
        want = _direct_cloze(
            tiny_lm,
            [*ctx, *messages(c.stem, assistant=c.matching)],
            [*ctx, *messages(c.stem, assistant=c.other)],
        )
        assert score == pytest.approx(want, abs=1e-5)


def test_ab_with_context_matches_a_direct_forward(tiny_lm, items, direction):
    """The A/B path runs the prompt once into a KV cache and the opened answer on top: with a context
    (and a spec that steers only the answer, which shares that cache) the letters' probabilities are
    those of one whole forward over context + question + "(" (the steered one inside ``steer``)."""
    ctx = SYSTEM + FEWSHOT
    spec = SteeringSpec(
        direction, coeff=0.5, positions="assistant", sites=["blocks.1.hook_resid_post"]
    )
    got = ab_eval_specs(tiny_lm, items, [None, spec], context=ctx, batch_size=2)
    token = letter_token_ids(tiny_lm, ["A", "B"], context=ctx)
    for k, s in enumerate([None, spec]):
        for it, score in zip(items, got[k].item_scores, strict=True):
            e = encode(tiny_lm.tokenizer, [[*ctx, *messages(it.question, assistant="(")]])[0]
            batch_ids = torch.tensor([e.ids])
            with torch.inference_mode():
                if s is None:
                    logits = tiny_lm.model(input_ids=batch_ids).logits[0, -1]
                else:
                    b = make_batch([e], tiny_lm.tokenizer.pad_token_id, "left")
                    with steer(tiny_lm, s) as st:
                        st.begin_batch(b)
                        logits = tiny_lm.model(input_ids=batch_ids).logits[0, -1]
            p = logits.float().softmax(-1)
            m = token[it.answer_matching_behavior.strip("() ")]
            o = token[it.answer_not_matching_behavior.strip("() ")]
            assert score == pytest.approx(float(p[m] / (p[m] + p[o])), abs=1e-5)
    assert got[0].item_scores != got[1].item_scores


# ---- context: refused with one line ------------------------------------------------------------
BAD_CONTEXTS = [
    "You are helpful.",
    {"role": "system", "content": "x"},
    [{"role": "robot", "content": "x"}],
    [{"role": "system"}],
    [{"role": "system", "content": "x", "name": "y"}],
    [{"role": "system", "content": 3}],
    ["system: x"],
    [{"role": "user", "content": "q"}],  # the item's user turn would follow a user turn
    [{"role": "assistant", "content": "a"}],
    [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}],
    [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "assistant", "content": "b"},
    ],
]


@pytest.mark.parametrize("context", BAD_CONTEXTS)
@pytest.mark.parametrize("evaluate", [cloze_eval_specs, ab_eval_specs])
def test_a_bad_context_is_refused_in_one_line(tiny_lm, items, evaluate, context):
    with pytest.raises(ValueError, match="context") as e:
        evaluate(tiny_lm, items, [None], context=context)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("context", BAD_CONTEXTS[:4])
def test_prompt_costs_refuses_a_bad_context_in_one_line(tiny_lm, context):
    with pytest.raises(ValueError, match="context") as e:
        prompt_costs(tiny_lm, context, ["Some neutral text."])
    assert "\n" not in str(e.value)


# ---- the cost of a prompt -----------------------------------------------------------------------
def test_prompt_costs_empty_context_gives_no_kl_and_the_base_perplexity(tiny_lm):
    texts = load_neutral()[:5]
    costs = NeutralCosts(tiny_lm, texts, batch_size=2)
    for ctx in (None, []):
        kl, ppl = prompt_costs(tiny_lm, ctx, costs=costs)
        assert abs(kl) < 1e-6
        assert ppl == pytest.approx(costs.perplexity(None), rel=1e-5)
    kl, ppl = prompt_costs(tiny_lm, [], texts)  # its own NeutralCosts (other batches)
    assert abs(kl) < 1e-6 and ppl == pytest.approx(costs.perplexity(None), rel=1e-5)


@pytest.mark.parametrize("context", [SYSTEM, SYSTEM + FEWSHOT])
def test_prompt_costs_match_a_direct_forward_with_and_without_the_prefix(tiny_lm, context):
    texts = load_neutral()[:3]
    tok = tiny_lm.tokenizer
    prefix_text = tok.apply_chat_template(context, tokenize=False, add_generation_prompt=False)
    prefix = tok(prefix_text, add_special_tokens=False)["input_ids"]
    kl_sum, n_kl, nll, n_nll = 0.0, 0, 0.0, 0
    for t in texts:
        ids = tok(t)["input_ids"]
        with torch.inference_mode():
            lp0 = tiny_lm.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
            lp1 = tiny_lm.model(input_ids=torch.tensor([prefix + ids])).logits[0].float()
        lp1 = lp1[len(prefix) :].log_softmax(-1)
        kl_sum += float((lp0.exp() * (lp0 - lp1)).sum())
        n_kl += len(ids)
        nll -= float(lp1[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).sum())
        n_nll += len(ids) - 1
    kl, ppl = prompt_costs(tiny_lm, context, texts, batch_size=2)
    assert kl > 1e-3
    assert kl == pytest.approx(kl_sum / n_kl, rel=1e-4)
    assert ppl == pytest.approx(math.exp(nll / n_nll), rel=1e-4)
    costs = NeutralCosts(tiny_lm, texts, batch_size=3)
    assert prompt_costs(tiny_lm, context, costs=costs) == pytest.approx((kl, ppl), rel=1e-5)
    with pytest.raises(ValueError, match="not both"):
        prompt_costs(tiny_lm, context, texts, costs=costs)


# ---- the prompts ----------------------------------------------------------------------------------
def test_the_shipped_behaviour_prompts_cover_every_behaviour():
    prompts = load_behaviour_prompts()
    assert set(prompts) == set(CAA_BEHAVIOURS)
    for b, p in prompts.items():
        assert set(p) == {"toward", "away"}
        assert p["toward"].strip() and p["away"].strip() and p["toward"] != p["away"], b


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("behaviour", ["refusal", "sycophancy", "myopic-reward"])
def test_prompt_conditions_use_training_questions_only(tiny_lm, behaviour, seed):
    train, held = cloze_split(behaviour, seed=seed)
    assert held == caa_split(behaviour, seed=seed)[1]
    system = load_behaviour_prompts()[behaviour]
    for form, n_shots in (("ab", 4), ("cloze", 3)):
        ctx = prompt_conditions(tiny_lm, behaviour, form, n_shots=n_shots, seed=seed)
        assert list(ctx) == list(PROMPT_SETTINGS)
        assert ctx["system_toward"] == [{"role": "system", "content": system["toward"]}]
        assert ctx["system_away"] == [{"role": "system", "content": system["away"]}]
        toward, away = ctx["fewshot_toward"], ctx["fewshot_away"]
        assert [m["role"] for m in toward] == ["user", "assistant"] * n_shots
        assert [m["content"] for m in toward[::2]] == [m["content"] for m in away[::2]]
        users = [m["content"] for m in toward[::2]]
        if form == "ab":
            by_question = {it.question: it for it in train}
            assert not set(users) & {it.question for it in held}
            assert set(users) <= set(by_question)
            for u, yes, no in zip(users, toward[1::2], away[1::2], strict=True):
                assert yes["content"] == by_question[u].answer_matching_behavior.strip()
                assert no["content"] == by_question[u].answer_not_matching_behavior.strip()
            assert len({m["content"] for m in toward[1::2]}) == 2  # both letters shown
        else:
            by_stem = {c.stem: c for c in cloze_items(train)}
            assert not set(users) & {c.stem for c in cloze_items(held)}
            assert set(users) <= set(by_stem)
            for u, yes, no in zip(users, toward[1::2], away[1::2], strict=True):
                assert (yes["content"], no["content"]) == (by_stem[u].matching, by_stem[u].other)


def test_prompt_conditions_refuse_bad_arguments(tiny_lm):
    with pytest.raises(ValueError, match="behaviour must be one of"):
        prompt_conditions(tiny_lm, "honesty", "cloze")
    with pytest.raises(ValueError, match="form must be one of"):
        prompt_conditions(tiny_lm, "refusal", "letters")
    with pytest.raises(ValueError, match="n_shots"):
        prompt_conditions(tiny_lm, "refusal", "ab", n_shots=0)


# ---- the comparison ---------------------------------------------------------------------------
def test_steering_vs_prompting_rows_and_verdict_structure(tiny_lm, direction):
    texts = load_neutral()[:4]
    res = steering_vs_prompting(
        tiny_lm, "refusal", direction, (0.2, -0.2, 0.0, 0.2), layer=2, n_items=6, kl_texts=texts
    )
    assert res.forms == ["cloze", "ab"] and res.site == "blocks.2.hook_resid_post"
    settings = ["coeff -0.20", "coeff +0.00", "coeff +0.20", *PROMPT_SETTINGS]
    for form in res.forms:
        rows = [r for r in res.rows if r.form == form]
        assert [r.setting for r in rows] == settings
        assert [r.sign for r in rows] == [-1, 0, 1, 1, -1, 1, -1]
        assert [r.method for r in rows] == ["steering"] * 3 + ["prompt"] * 4
        assert [r.coeff for r in rows] == [-0.2, 0.0, 0.2, None, None, None, None]
        base = res.item_scores[form, "base"]
        assert res.base[form]["score"] == pytest.approx(sum(base) / len(base))
        assert res.base[form]["n_items"] == len(base) == 6
        for r in rows:
            scores = res.item_scores[form, r.setting]
            assert len(scores) == 6
            assert r.base_score == res.base[form]["score"]
            assert r.shift == pytest.approx(r.score - r.base_score, abs=1e-12)
            assert r.se >= 0 and r.ppl > 0
            if r.kl > 0:
                assert r.per_kl == pytest.approx(r.shift / r.kl)
                assert r.per_kl_se == pytest.approx(r.se / r.kl)
            else:
                assert r.per_kl is None and r.per_kl_se is None
        zero = res.at(form, "coeff +0.00")
        assert zero.kl == 0.0 and zero.shift == 0.0 and zero.per_kl is None
        assert all(r.kl > 0 for r in rows if r.setting != "coeff +0.00")
    # steering costs are shared between the forms; the system prompts' too
    for s in ("coeff -0.20", "coeff +0.20", "system_toward", "system_away"):
        assert res.at("cloze", s).kl == res.at("ab", s).kl
    assert res.contexts["ab"]["system_toward"] == res.contexts["cloze"]["system_toward"]
    assert res.contexts["ab"]["fewshot_toward"] != res.contexts["cloze"]["fewshot_toward"]
    assert res.controls["cloze"] is None and res.controls["ab"] is not None
    if not res.controls["ab"]["reads_choices"]:
        assert any(
            w.startswith("A/B form: this model does not read A/B options") for w in res.warnings
        )

    verdict = res.verdict()
    assert [(v["form"], v["direction"]) for v in verdict] == [
        ("cloze", "toward"),
        ("cloze", "away"),
        ("ab", "toward"),
        ("ab", "away"),
    ]
    for v in verdict:
        assert v["winner"] in ("steering", "prompting", "tie")
        want = "coeff +0.20" if v["direction"] == "toward" else "coeff -0.20"
        assert v["steering"]["setting"] == want
        assert v["prompt"]["setting"].endswith(v["direction"])
        assert "\n" not in v["sentence"] and v["sentence"].startswith(f"{v['form']} form")
    d = res.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert d["verdict"] == verdict and len(d["rows"]) == 14
    assert set(res.item_scores) == {(f, s) for f in res.forms for s in ["base", *settings]}
    assert d["item_scores"]["ab"]["system_away"] == res.item_scores["ab", "system_away"]
    table = res.table()
    assert table.count("\n| cloze |") == 7 and table.count("\n| ab |") == 7
    assert all(v["sentence"] in table for v in verdict)


def _row(form, method, setting, sign, shift, se, kl):
    return ComparisonRow(
        form, method, setting, sign * 0.1 if method == "steering" else None, sign,
        0.5 + shift, 0.5, shift, se, kl, 10.0,
        shift / kl if kl else None, se / kl if kl else None,
    )  # fmt: skip


def test_verdict_picks_the_best_per_kl_and_calls_the_winner_by_two_standard_errors():
    rows = [
        # cloze, toward: steering 1.0 ± 0.1 per nat, best prompt 0.1 ± 0.02 -> steering
        _row("cloze", "steering", "coeff +0.10", 1, 0.10, 0.01, 0.1),
        _row("cloze", "prompt", "system_toward", 1, 0.05, 0.01, 0.5),
        _row("cloze", "prompt", "fewshot_toward", 1, 0.01, 0.01, 0.0),  # no KL: not a candidate
        # cloze, away: steering 0.2 ± 0.1, prompts 0.1 ± 0.02 and 0.25 ± 0.25 -> the latter, tie
        _row("cloze", "steering", "coeff -0.10", -1, -0.02, 0.01, 0.1),
        _row("cloze", "steering", "coeff -0.20", -1, 0.03, 0.01, 0.1),  # the wrong way
        _row("cloze", "prompt", "system_away", -1, -0.05, 0.01, 0.5),
        _row("cloze", "prompt", "fewshot_away", -1, -0.05, 0.05, 0.2),
        # ab, toward: steering 0.05 ± 0.01, prompt 1.0 ± 0.1 -> prompting
        _row("ab", "steering", "coeff +0.10", 1, 0.005, 0.001, 0.1),
        _row("ab", "prompt", "system_toward", 1, 0.5, 0.05, 0.5),
        # ab, away: no steering setting -> no verdict
        _row("ab", "prompt", "system_away", -1, -0.1, 0.01, 0.5),
    ]
    base = {
        f: {"score": 0.5, "ppl": 10.0, "n_items": 4, "items_fingerprint": ""}
        for f in ("cloze", "ab")
    }
    res = SteeringVsPrompting("refusal", rows, base, item_scores={})
    v = {(x["form"], x["direction"]): x for x in res.verdict()}
    assert v["cloze", "toward"]["winner"] == "steering"
    assert v["cloze", "toward"]["prompt"]["setting"] == "system_toward"
    assert v["cloze", "toward"]["steering"]["value"] == pytest.approx(1.0)
    assert v["cloze", "toward"]["steering"]["se"] == pytest.approx(0.1)
    assert v["cloze", "away"]["winner"] == "tie"
    assert v["cloze", "away"]["steering"]["setting"] == "coeff -0.10"
    assert v["cloze", "away"]["steering"]["value"] == pytest.approx(0.2)
    assert v["cloze", "away"]["prompt"]["setting"] == "fewshot_away"
    assert v["cloze", "away"]["prompt"]["value"] == pytest.approx(0.25)
    assert v["ab", "toward"]["winner"] == "prompting"
    assert "prompting wins" in v["ab", "toward"]["sentence"]
    assert v["ab", "away"]["winner"] is None and v["ab", "away"]["steering"] is None
    assert "no verdict" in v["ab", "away"]["sentence"]
    # an unknown standard error (one item) cannot separate the two
    one = [
        r
        if r.setting != "system_toward"
        else _row("ab", "prompt", "system_toward", 1, 0.5, math.nan, 0.5)
        for r in rows
    ]
    res1 = SteeringVsPrompting("refusal", one, base, item_scores={})
    assert {(x["form"], x["direction"]): x for x in res1.verdict()}["ab", "toward"][
        "winner"
    ] == "tie"
    d = res1.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d


def test_steering_vs_prompting_refuses_bad_arguments(tiny_lm, direction):
    with pytest.raises(ValueError, match="behaviour must be one of"):
        steering_vs_prompting(tiny_lm, "honesty", direction, (0.1,))
    with pytest.raises(ValueError, match="no vector at"):
        steering_vs_prompting(tiny_lm, "refusal", direction, (0.1,), layer=3)
    with pytest.raises(ValueError, match="coeffs"):
        steering_vs_prompting(tiny_lm, "refusal", direction, ())
    with pytest.raises(ValueError, match="coeffs must be finite"):
        steering_vs_prompting(tiny_lm, "refusal", direction, (math.nan,))
    with pytest.raises(ValueError, match="form must be one of"):
        steering_vs_prompting(tiny_lm, "refusal", direction, (0.1,), forms=("letters",))
    with pytest.raises(ValueError, match="forms must be"):
        steering_vs_prompting(tiny_lm, "refusal", direction, (0.1,), forms="cloze")


# ---- on the embedded model -------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.usefixtures("one_torch_thread")
def test_refusal_steering_and_prompts_move_the_way_they_are_meant_to(embedded_lm):
    """Refusal on SmolLM2-135M-Instruct, layer 12: the cloze vector at -0.1 and +0.1 moves the held-out
    answers in opposite directions, the system prompt asking for refusal scores above the one asking
    for its opposite, and the A/B form's results carry the A/B control's warning (this model does not
    read A/B options, ``tests/test_ab_control.py``)."""
    lm = embedded_lm
    t0 = time.perf_counter()
    d = cloze_direction(lm, "refusal", layers=[12], n_pairs=16)
    res = steering_vs_prompting(
        lm, "refusal", d, (-0.1, 0.1), layer=12, n_items=8, n_shots=1, kl_texts=load_neutral()[:4]
    )
    print(f"\n{res.table()}\n{time.perf_counter() - t0:.1f} s")
    down, up = res.at("cloze", "coeff -0.10"), res.at("cloze", "coeff +0.10")
    assert down.shift < 0 < up.shift
    assert res.at("cloze", "system_toward").shift > res.at("cloze", "system_away").shift
    assert all(r.kl > 0 for r in res.rows)
    assert res.controls["ab"] is not None and not res.controls["ab"]["reads_choices"]
    assert len(res.warnings) == 1 and "does not read A/B options" in res.warnings[0]
    assert res.to_dict()["warnings"] == res.warnings
    assert "WARNING: A/B form: this model does not read A/B options" in res.table()


# ---- costs in the chat frame: a vector and a prompt measured in the same place ------------------
def test_framed_costs_reference_and_the_default_frame_cost_nothing(tiny_lm):
    from steering.evaluation.prompting import FramedCosts

    texts = load_neutral()[:5]
    framed = FramedCosts(tiny_lm, texts, batch_size=2)
    kl0, ppl0 = framed.measure()
    assert kl0 == 0.0 and ppl0 > 1
    kl, ppl = framed.measure(context=[])  # the same frame, recomputed
    assert abs(kl) < 1e-5 and ppl == pytest.approx(ppl0, rel=1e-5)
    default = _default_system(tiny_lm.tokenizer)
    if default is not None:  # the template's own system prompt spelled out: the same tokens
        kl, _ = framed.measure(context=[{"role": "system", "content": default}])
        assert abs(kl) < 1e-5
    # the bare-text measure charges that same frame about as much as a real prompt
    bare_frame = prompt_costs(tiny_lm, [{"role": "system", "content": default or "Hi."}], texts)[0]
    assert bare_frame > 0.01
    kl_prompt, _ = framed.measure(context=SYSTEM)
    assert kl_prompt > 0


def test_framed_costs_of_a_steering_match_a_direct_forward(tiny_lm, direction):
    from steering.evaluation.prompting import FramedCosts, frame_ids

    texts = ["A plain sentence about rivers.", "Cats sleep a lot during the day."]
    spec = SteeringSpec(direction, coeff=0.5, sites=["blocks.2.hook_resid_post"], scale="relative")
    kl, ppl = FramedCosts(tiny_lm, texts, batch_size=1).measure(spec=spec)
    frame = frame_ids(tiny_lm, None)
    total_kl, n, nll, m = 0.0, 0, 0.0, 0
    for t in texts:
        ids = tiny_lm.tokenizer(t, add_special_tokens=False)["input_ids"]
        x = torch.tensor([frame + ids])
        with torch.inference_mode():
            a = tiny_lm.model(input_ids=x).logits[0, len(frame) :].float().log_softmax(-1)
            with steer(tiny_lm, spec):
                b = tiny_lm.model(input_ids=x).logits[0, len(frame) :].float().log_softmax(-1)
        total_kl += float((a.exp() * (a - b)).sum(-1).sum())
        n += len(ids)
        nll -= float(b[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).sum())
        m += len(ids) - 1
    assert kl == pytest.approx(total_kl / n, rel=1e-4) and kl > 0
    assert ppl == pytest.approx(math.exp(nll / m), rel=1e-4)
