"""RAHF's other patterns and its measurements, on the tiny model: patterns of type (b) (a setting or
another model), pooled negative-only patterns, value instructions, the margin / projection / facts
measurements, the steering vector at matched KL, and ``repe rahf`` (its errors and its merge)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from probes.preference import Condition, activity_pattern, pooled_pattern
from repe.datasets import load_value_instructions
from repe.datasets.preference import PreferencePair
from repe.directions import Direction
from repe.models import LoadedModel
from repe.responses import Response, batch_inputs, response_states
from steering.adapter import LowRankAdapter
from steering.evaluation.costs import NeutralCosts
from steering.evaluation.preference import (
    facts_auc,
    pattern_projections,
    preference_margins,
    response_logprobs,
    text_logprobs,
)
from steering.evaluation.rahf import RAHFRun, matched_vector, split_pairs
from steering.rahf import RAHFConfig, own_answers, prepare, rahf_loss, setting
from steering.spec import SteeringSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ITEMS = [
    Response("Can you help me with my homework?", "Of course, show me the first question."),
    Response("Tell me a secret.", "I do not keep secrets, but I can tell you a fun fact."),
    Response("Is lying ever fine?", "Lying usually hurts trust, so it is rarely fine."),
    Response("My friend is sad.", "Listen to them and ask what would help."),
]
LAYERS = [1, 2]


def _live_adapter(lm: LoadedModel, seed: int = 1) -> LowRankAdapter:
    ad = LowRankAdapter.init(lm, [0, 1, 2], rank=4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for k in ad.b:
        ad.b[k] = torch.randn(ad.b[k].shape, generator=g) * 0.5
    return ad


def test_a_pattern_between_two_settings_is_their_state_difference(tiny_lm):
    ad = _live_adapter(tiny_lm)
    on = setting(ad, label="adapter on")
    pat = activity_pattern(tiny_lm, ITEMS, LAYERS, on, None, batch_size=3)
    from steering.hooks import steer

    with steer(tiny_lm, ad):
        pos = response_states(tiny_lm, ITEMS, LAYERS, None)
    neg = response_states(tiny_lm, ITEMS, LAYERS, None)
    torch.testing.assert_close(pat.mean, (pos - neg).mean(1), atol=1e-5, rtol=1e-5)
    assert float(pat.mean.norm()) > 1e-3
    assert pat.conditions == ("adapter on", "the model as it is")
    assert pat.direction(tiny_lm).params["preferred"] == "adapter on"
    # the setting is gone after the read: a pattern of the model against itself is zero
    same = activity_pattern(tiny_lm, ITEMS, LAYERS, None, None)
    assert float(same.mean.abs().max()) == 0.0
    # an adapter at zero (B = 0) changes nothing
    zero = activity_pattern(
        tiny_lm, ITEMS, LAYERS, setting(LowRankAdapter.init(tiny_lm, [0, 1])), None
    )
    assert float(zero.mean.abs().max()) == 0.0


def test_a_pattern_between_two_models_checks_they_read_alike(tiny_lm):
    from repe.models import tiny_model

    twin = LoadedModel(copy.deepcopy(tiny_lm.model), tiny_lm.tokenizer, tiny_lm.identity)
    with torch.no_grad():
        twin.layers[0].mlp.down_proj.weight.mul_(1.5)
    pat = activity_pattern(tiny_lm, ITEMS, LAYERS, Condition(model=twin), None)
    assert float(pat.mean.norm()) > 1e-4
    assert "model" in pat.conditions[0]
    wide = tiny_model(d_model=32, n_heads=2, n_kv_heads=1)
    with pytest.raises(ValueError, match="differ in shape"):
        activity_pattern(tiny_lm, ITEMS, LAYERS, Condition(model=wide), None)
    with pytest.raises(TypeError, match="a condition is"):
        activity_pattern(tiny_lm, ITEMS, LAYERS, 3, None)  # type: ignore[arg-type]


def test_a_pooled_pattern_is_a_difference_of_means_and_sets_the_initial_loss(tiny_lm):
    own, rej = ITEMS[:2], ITEMS[2:]
    pat = pooled_pattern(tiny_lm, own, rej, LAYERS, batch_size=1)
    a = response_states(tiny_lm, own, LAYERS, None).mean(1)
    b = response_states(tiny_lm, rej, LAYERS, None).mean(1)
    torch.testing.assert_close(pat.mean, a - b, atol=1e-5, rtol=1e-5)
    assert pat.kind == "pooled"
    cfg = RAHFConfig(alpha_pattern=2.0, batch_size=4)
    (batch,) = prepare(tiny_lm, ITEMS, LAYERS, cfg, pooled=pat.mean)
    ad = LowRankAdapter.init(tiny_lm, [0, 1, 2], rank=4)
    loss = float(rahf_loss(tiny_lm, ad, batch, LAYERS))
    assert loss == pytest.approx(2.0 * float(pat.mean.norm(dim=-1).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="one vector per target block"):
        prepare(tiny_lm, ITEMS, LAYERS, cfg, pooled=pat.mean[:1])
    with pytest.raises(ValueError, match="needs preferred and dispreferred"):
        pooled_pattern(tiny_lm, own, [], LAYERS)


def test_a_value_instruction_contrast_uses_the_shipped_instructions(tiny_lm):
    values = load_value_instructions()
    assert {"honesty", "harmlessness", "care", "fairness"} <= set(values)
    pat = activity_pattern(tiny_lm, ITEMS, LAYERS, values["care"], None)
    pos = response_states(tiny_lm, ITEMS, LAYERS, values["care"])
    neg = response_states(tiny_lm, ITEMS, LAYERS, None)
    torch.testing.assert_close(pat.mean, (pos - neg).mean(1), atol=1e-5, rtol=1e-5)
    cfg = RAHFConfig(preferred=values["care"], dispreferred=Condition(label="plain"))
    described = cfg.describe()
    assert described["preferred"].startswith("instruction 'Above all, care")
    assert described["dispreferred"] == "plain"
    json.dumps(described)


def test_own_answers_are_the_models_greedy_continuations(tiny_lm):
    from steering.generate import GenerationConfig, generate

    prompts = ["Say hello.", "Name a colour."]
    got = own_answers(tiny_lm, prompts, max_new_tokens=5, batch_size=1)
    want = generate(tiny_lm, prompts, None, GenerationConfig(max_new_tokens=5))
    assert [r.prompt for r in got] == [p for p, w in zip(prompts, want, strict=True) if w.strip()]
    assert [r.response for r in got] == [w.strip() for w in want if w.strip()]


def test_margins_are_chosen_minus_rejected_log_likelihoods(tiny_lm):
    pairs = [PreferencePair(it.prompt, "No.", it.response) for it in ITEMS[:3]]
    m = preference_margins(tiny_lm, pairs, batch_size=2)
    inputs, resp = batch_inputs(tiny_lm, [ITEMS[0]], None)
    with torch.no_grad():
        lp = tiny_lm.model(**inputs).logits.log_softmax(-1)
    ids = inputs["input_ids"]
    own = float(lp[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)[resp[0, 1:]].sum())
    assert response_logprobs(tiny_lm, [ITEMS[0]])[0] == pytest.approx(own, rel=1e-4)
    no = response_logprobs(tiny_lm, [Response(ITEMS[0].prompt, "No.")])[0]
    assert m[0] == pytest.approx(own - no, rel=1e-4, abs=1e-4)
    assert m.shape == (3,)
    with pytest.raises(ValueError, match="chosen answer"):
        preference_margins(tiny_lm, [PreferencePair("q", "bad")])


def test_a_vector_along_the_direction_raises_its_projection_by_its_length(tiny_lm):
    v = torch.randn(tiny_lm.d_model, generator=torch.Generator().manual_seed(3))
    d = Direction({"blocks.2.hook_resid_post": v}, tiny_lm.identity, normalisation="raw")
    base = pattern_projections(tiny_lm, ITEMS, d)
    spec = SteeringSpec(d, coeff=0.5, scale="raw")
    up = pattern_projections(tiny_lm, ITEMS, d, spec, batch_size=3)
    np.testing.assert_allclose(up - base, 0.5 * float(v.norm()), rtol=1e-4)
    zero = pattern_projections(tiny_lm, ITEMS, d, LowRankAdapter.init(tiny_lm, [0, 1]))
    np.testing.assert_array_equal(zero, base)
    last = Direction({f"blocks.{tiny_lm.n_layers - 1}.hook_resid_post": v}, tiny_lm.identity)
    with pytest.raises(ValueError, match="residual outputs"):
        pattern_projections(tiny_lm, ITEMS, last)


def test_text_logprobs_and_the_facts_auc(tiny_lm):
    texts = ["The sky is blue.", "Water is wet and cold today."]
    got = text_logprobs(tiny_lm, texts)
    ids = tiny_lm.tokenizer(texts[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        lp = tiny_lm.model(input_ids=ids).logits.log_softmax(-1)
    want = float(lp[0, :-1].gather(-1, ids[0, 1:, None]).mean())
    assert got[1] == pytest.approx(want, rel=1e-4)
    auc = facts_auc(tiny_lm, n=20)
    assert 0.0 <= auc <= 1.0
    assert facts_auc(tiny_lm, n=20) == auc  # seeded


def test_the_matched_vector_costs_what_the_adapter_costs(tiny_lm):
    ad = _live_adapter(tiny_lm, seed=2)
    costs = NeutralCosts(tiny_lm, ["The cat sat on the mat today.", "Rain fell on the town."])
    target = costs.kl(ad)
    assert target > 1e-4
    d = Direction(
        {"blocks.1.hook_resid_post": torch.ones(tiny_lm.d_model)},
        tiny_lm.identity,
        normalisation="raw",
    )
    spec, kl = matched_vector(tiny_lm, d, costs, target)
    assert kl == pytest.approx(target, rel=0.02)
    assert spec.coeff_at("blocks.1.hook_resid_post") > 0


def test_split_pairs_is_seeded_and_keeps_train_and_held_out_apart(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(
        "\n".join(
            json.dumps({"prompt": f"q{i}", "rejected": "bad", "chosen": "good"}) for i in range(12)
        )
    )
    run = RAHFRun(pairs=(str(f),), train=5, held=4)
    tr, he = split_pairs(run)
    assert len(tr) == 5 and len(he) == 4
    assert not {p.prompt for p in tr} & {p.prompt for p in he}
    assert split_pairs(run) == (tr, he)
    assert split_pairs(RAHFRun(pairs=(str(f),), train=5, held=4, seed=1)) != (tr, he)
    with pytest.raises(ValueError, match="need more than"):
        split_pairs(RAHFRun(pairs=(str(f),), train=12, held=4))
    with pytest.raises(ValueError, match="variant"):
        RAHFRun(variant="nope")
    assert RAHFRun().learning_rate == 1e-3  # the measured SCIT default
    assert RAHFRun(variant="negative").learning_rate == 5e-4
    assert RAHFRun(lr=2e-4).learning_rate == 2e-4
    assert RAHFRun().pattern_alpha == 5.0 and RAHFRun(variant="negative").pattern_alpha == 1.0
    assert RAHFRun(variant="negative", alpha_pattern=3.0).pattern_alpha == 3.0
    with pytest.raises(ValueError, match="lr must be > 0"):
        RAHFRun(lr=0.0)


def test_scit_tuning_ties_each_instruction_to_its_responses(tiny_lm):
    from steering.rahf import SCITConfig, scit_tune

    good = [Response(it.prompt, "Yes, gladly.") for it in ITEMS]
    bad = [Response(it.prompt, "No, go away.") for it in ITEMS]
    cfg = SCITConfig(preferred="Be kind.", dispreferred="Be rude.", lr=1e-2, epochs=6)
    before = [p.detach().clone() for p in tiny_lm.model.parameters()]
    flags = [p.requires_grad for p in tiny_lm.model.parameters()]

    def gap(intervention, instr):
        a = response_logprobs(tiny_lm, good, intervention, instruction=instr)
        b = response_logprobs(tiny_lm, bad, intervention, instruction=instr)
        return float(np.mean(a - b))

    ad = scit_tune(tiny_lm, good, bad, cfg, progress=False)
    # the instructions now pull apart: kind favours the kind answer more than rude does
    base_split = gap(None, "Be kind.") - gap(None, "Be rude.")
    tuned_split = gap(ad, "Be kind.") - gap(ad, "Be rude.")
    assert tuned_split > base_split + 1.0
    assert all(torch.equal(p, q) for p, q in zip(before, tiny_lm.model.parameters(), strict=True))
    assert all(not p.requires_grad for p in ad.parameters())
    assert [p.requires_grad for p in tiny_lm.model.parameters()] == flags
    assert ad.layers == list(range(tiny_lm.n_layers)) and ad.method == "scit"
    with pytest.raises(ValueError, match="two different instructions"):
        SCITConfig(preferred="x", dispreferred="x")


def test_repe_rahf_refuses_bad_flags_in_one_line(tmp_path, capsys):
    from repe.cli import main

    assert main(["rahf"]) == 2
    assert "give --out" in capsys.readouterr().err
    assert main(["rahf", "--adapter", str(tmp_path / "a")]) == 2
    assert "--merge" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert main(["rahf", "--out", str(tmp_path / "o"), "--merge", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert "not an empty folder" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert main(["rahf", "--variant", "nope", "--out", str(tmp_path / "o")]) == 2


def test_repe_rahf_merge_writes_a_model_that_equals_the_hooked_adapter(tiny_lm, tmp_path, capsys):
    from repe.cli import main
    from repe.models import load_model
    from steering.hooks import steer

    src = tmp_path / "tiny"
    tiny_lm.model.save_pretrained(src)
    tiny_lm.tokenizer.save_pretrained(src)
    lm = load_model(src)
    ad = _live_adapter(lm, seed=4)
    ad.save(tmp_path / "ad")
    out = tmp_path / "merged"
    assert (
        main(["rahf", "--model", str(src), "--adapter", str(tmp_path / "ad"), "--merge", str(out)])
        == 0
    )
    assert "merged model" in capsys.readouterr().out
    merged = load_model(out)
    ids = lm.tokenizer("The adapter is folded in.", return_tensors="pt")["input_ids"]
    with torch.no_grad(), steer(lm, ad):
        hooked = lm.model(input_ids=ids).logits
    with torch.no_grad():
        folded = merged.model(input_ids=ids).logits
        plain = lm.model(input_ids=ids).logits
    torch.testing.assert_close(folded, hooked, atol=1e-4, rtol=1e-4)
    assert float((folded - plain).abs().max()) > 1e-3


def test_a_negative_only_run_trains_on_its_pooled_pattern(tiny_lm, tmp_path, monkeypatch):
    """The run trains the adapter toward the pattern it measures: a pooled pattern for negative-only
    runs (the first version trained them on the instruction pattern instead; seen failing)."""
    import steering.evaluation.rahf as R

    f = tmp_path / "pairs.jsonl"
    rows = [
        {
            "prompt": f"Question {i}: is it fine?",
            "rejected": f"Sure, do bad thing {i}.",
            "chosen": "No.",
        }
        for i in range(9)
    ]
    f.write_text("\n".join(json.dumps(x) for x in rows))
    run = RAHFRun(
        pairs=(str(f),),
        variant="negative",
        train=6,
        held=3,
        epochs=1,
        facts=0,
        compare_vector=False,
        answer_tokens=6,
    )
    seen = {}
    real = R.train_rahf

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "train_rahf", spy)
    ad, m = R.run_rahf(tiny_lm, run, tmp_path / "out", progress=False, log=lambda _: None)
    assert seen["pooled"] is not None
    assert tuple(seen["pooled"].shape) == (len(m["layers"]), tiny_lm.d_model)
    assert ad.params["pattern"] == "pooled" and m["pattern"]["kind"] == "pooled"
    assert m["held_out_pairs"] == 3 and "vector" not in m
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["held_out_pairs"] == 3
