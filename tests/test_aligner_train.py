"""Training Aligner tokens (and, through the same trainer, a low-rank adapter) on the tiny model: SFT
and DPO lower their held-out losses, the base weights stay as they were, early stopping keeps the best
parameters, and the artifact records how it was trained."""

from __future__ import annotations

import json

import pytest
import torch

from repe.responses import Response
from steering.adapter import LowRankAdapter
from steering.aligner import Aligner
from steering.aligner_train import (
    Preference,
    TrainConfig,
    as_preferences,
    train_aligner,
    train_intervention,
)

PROMPTS = [f"Tell me about item {i}." for i in range(16)]


def _sft_data() -> list[Response]:
    return [Response(p, "Ahoy! It is fine.") for p in PROMPTS]


def _dpo_data() -> list[Preference]:
    return [Preference(p, "Ahoy! It is fine.", "No idea at all.") for p in PROMPTS]


def _weights(lm) -> list[torch.Tensor]:
    return [p.detach().clone() for p in lm.model.parameters()]


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_training_lowers_held_out_loss_and_leaves_the_base_alone(tiny_lm, objective):
    data = _sft_data() if objective == "sft" else _dpo_data()
    before = _weights(tiny_lm)
    cfg = TrainConfig(objective=objective, lr=5e-2, epochs=6, batch_size=4, eval_every=2, seed=1)
    al, res = train_aligner(tiny_lm, data, n_tokens=4, start_layer=1, config=cfg, progress=False)
    assert res.best_held_out < res.initial_held_out - 0.05
    assert res.n_held_out == 4 and res.n_train == 12
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(tiny_lm), strict=True))
    assert al.gates.abs().sum() > 0 and not al.tokens.requires_grad
    assert al.method == objective and al.params["n_examples"] == 16
    assert len(al.params["data_fingerprint"]) == 16
    assert al.metrics["best_held_out"] == res.best_held_out
    # the kept parameters are the best held-out ones: re-measuring gives the same loss
    again = train_intervention(
        tiny_lm,
        al,
        al.parameters(),
        data,
        TrainConfig(objective=objective, lr=1e-9, epochs=1, batch_size=4, eval_every=100, seed=1),
        progress=False,
    )
    assert again.initial_held_out == pytest.approx(res.best_held_out, rel=1e-4)


def test_early_stopping_keeps_the_best(tiny_lm):
    # held-out answers that contradict the training answers: learning one makes the other worse
    held = [Response(p, "No idea at all.") for p in PROMPTS[:4]]
    cfg = TrainConfig(lr=5e-2, epochs=20, batch_size=4, eval_every=1, patience=2, seed=0)
    al, res = train_aligner(
        tiny_lm,
        _sft_data(),
        n_tokens=1,
        start_layer=1,
        config=cfg,
        progress=False,
        held_out_data=held,
    )
    assert res.stopped_early and res.steps < 20 * 4 and res.n_held_out == 4
    held = [h["held_out"] for h in res.history]
    assert res.best_held_out == min([res.initial_held_out, *held])
    if res.best_step == 0:  # nothing beat the start: the fresh (zero-gate) Aligner is kept
        assert al.gates.abs().sum() == 0


def test_the_same_trainer_trains_a_lora(tiny_lm):
    ad = LowRankAdapter.init(tiny_lm, [1, 2], rank=2, seed=0)
    cfg = TrainConfig(lr=1e-2, epochs=4, batch_size=4, eval_every=3, seed=0)
    res = train_intervention(tiny_lm, ad, ad.parameters(), _sft_data(), cfg, progress=False)
    assert res.best_held_out < res.initial_held_out
    assert sum(b.abs().sum() for b in ad.b.values()) > 0


def test_progress_callback_and_max_steps(tiny_lm):
    seen = []
    cfg = TrainConfig(lr=1e-2, epochs=5, batch_size=2, max_steps=3, held_out=0.0)
    al = Aligner.init(tiny_lm, 1, start_layer=1)
    res = train_intervention(
        tiny_lm,
        al,
        al.parameters(),
        _sft_data(),
        cfg,
        progress=False,
        on_step=lambda *a: seen.append(a),
    )
    assert res.steps == 3 and [s[0] for s in seen] == [1, 2, 3] and all(s[1] == 3 for s in seen)
    # no held-out split: the summary says so with None, and writes as strict JSON
    summary = res.summary()
    assert summary["initial_held_out"] is None and summary["best_held_out"] is None
    json.dumps(summary, allow_nan=False)


def test_bad_training_input(tiny_lm):
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="ppo")
    with pytest.raises(ValueError, match="at least 2"):
        train_aligner(tiny_lm, _sft_data()[:1], progress=False)
    with pytest.raises(ValueError, match="chosen"):
        as_preferences([("p", "", "r")])
