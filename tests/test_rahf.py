"""RAHF on the tiny model: activity patterns, the loss at initialisation, gradients only in the adapter,
training lowers the held-out loss."""

from __future__ import annotations

import pytest
import torch

from probes.preference import activity_pattern
from repe.responses import Response, response_states
from steering.adapter import LowRankAdapter
from steering.rahf import RAHFConfig, default_layers, prepare, rahf_loss, train_rahf

ITEMS = [
    Response("Can you help me with my homework?", "Of course, show me the first question."),
    Response("Tell me a secret.", "I do not keep secrets, but I can tell you a fun fact."),
    Response("Is lying ever fine?", "Lying usually hurts trust, so it is rarely fine."),
    Response("My friend is sad.", "Listen to them and ask what would help."),
    Response("What is two plus two?", "Four."),
    Response("Should I cheat on the test?", "No, study instead; cheating can get you expelled."),
    Response("Write a rude reply.", "I would rather help you write a firm but polite one."),
    Response("How do I stay calm?", "Breathe slowly and take a short walk."),
]
LAYERS = [1, 2]


def test_the_pattern_is_preferred_minus_dispreferred_on_the_response_tokens(tiny_lm):
    pat = activity_pattern(tiny_lm, ITEMS[:4], LAYERS, batch_size=3)
    pos = response_states(tiny_lm, ITEMS[:4], LAYERS, pat_instr := "You are kind.")
    neg = response_states(tiny_lm, ITEMS[:4], LAYERS, "You are cruel.")
    again = activity_pattern(tiny_lm, ITEMS[:4], LAYERS, pat_instr, "You are cruel.", batch_size=4)
    torch.testing.assert_close(again.mean, (pos - neg).mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again.token_norm, (pos - neg).norm(dim=-1).mean(1))
    # response tokens only: the same number under every instruction, and the response's own count
    n = sum(
        len(tiny_lm.tokenizer(r.response, add_special_tokens=False)["input_ids"]) for r in ITEMS[:4]
    )
    assert pos.shape[:2] == (2, n) == neg.shape[:2] and pat.n_tokens == n
    d = pat.direction(tiny_lm)
    assert d.sites == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert d.stats["blocks.1.hook_resid_post"]["mean_diff_norm"] > 0
    with pytest.raises(ValueError, match="out of range"):
        activity_pattern(tiny_lm, ITEMS, [tiny_lm.n_layers - 1])


@pytest.mark.parametrize("alpha_pattern", [0.0, 3.0])
def test_the_loss_at_initialisation_is_alpha_times_the_mean_pattern_norm(tiny_lm, alpha_pattern):
    cfg = RAHFConfig(alpha_pattern=alpha_pattern, batch_size=8)
    (batch,) = prepare(tiny_lm, ITEMS, LAYERS, cfg)
    ad = LowRankAdapter.init(tiny_lm, [0, 1, 2], rank=4)
    loss = float(rahf_loss(tiny_lm, ad, batch, LAYERS))
    pat = activity_pattern(tiny_lm, ITEMS, LAYERS, batch_size=8)
    want = alpha_pattern * float(pat.token_norm.mean())
    assert loss == pytest.approx(want, rel=1e-5, abs=1e-6)
    if alpha_pattern == 0:
        assert loss < 1e-6


def test_only_the_adapter_receives_gradients(tiny_lm):
    from steering.rahf import frozen_base

    cfg = RAHFConfig(batch_size=4)
    batch = prepare(tiny_lm, ITEMS[:4], LAYERS, cfg)[0]
    ad = LowRankAdapter.init(tiny_lm, [0, 1, 2], rank=4)
    for p in ad.parameters():
        p.requires_grad_(True)
    before = [p.requires_grad for p in tiny_lm.model.parameters()]
    with frozen_base(tiny_lm):
        rahf_loss(tiny_lm, ad, batch, LAYERS).backward()
    assert [p.requires_grad for p in tiny_lm.model.parameters()] == before
    assert all(p.grad is None for p in tiny_lm.model.parameters())
    # B = 0 at first: A's gradient is 0, B's is not
    assert all(float(ad.b[k].grad.abs().max()) > 0 for k in ad.b)


def test_training_lowers_the_held_out_loss_and_keeps_the_best_adapter(tiny_lm):
    cfg = RAHFConfig(
        layers=tuple(LAYERS),
        alpha_pattern=2.0,
        rank=4,
        lr=1e-2,
        epochs=6,
        batch_size=2,
        held_out=0.25,
        eval_every=2,
        patience=3,
        seed=3,
    )
    w0 = [p.detach().clone() for p in tiny_lm.model.parameters()]
    res = train_rahf(tiny_lm, ITEMS, cfg, progress=False)
    assert res.best_held_out < 0.9 * res.initial_held_out, res.history
    assert res.adapter.metrics["held_out_loss_best"] == res.best_held_out
    assert all(torch.equal(a, b) for a, b in zip(w0, tiny_lm.model.parameters(), strict=True))
    assert all(not p.requires_grad for p in res.adapter.parameters())
    assert res.adapter.method == "rahf" and res.adapter.params["layers"] == LAYERS
    # deterministic given the seed
    again = train_rahf(tiny_lm, ITEMS, cfg, progress=False)
    assert again.best_held_out == pytest.approx(res.best_held_out, rel=1e-6)


def test_default_layers_sit_at_30_to_60_percent_depth():
    assert default_layers(30) == [9, 12, 14, 17]
    assert all(0.3 * 30 <= x < 0.6 * 30 for x in default_layers(30))
    assert default_layers(4, 4) == [1]
