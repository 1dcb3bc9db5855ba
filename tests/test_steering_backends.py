"""Steered logits through every back-end: hf, transformer_lens and nnsight give the same numbers.

Parity is relative, ``|a - b| <= 1e-4 * max|a|`` (see ARCHITECTURE.md); padded positions are zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from repe.backends.nnsight import get_nnsight_model
from repe.backends.transformer_lens import get_bridge
from repe.directions import Direction
from repe.hooks import leftover_hooks
from repe.models import LoadedModel
from steering import Condition, SteeringSpec
from steering.backends import steered_logits, token_mask
from steering.operators import OPERATORS, Operator
from steering.spec import resolve

OTHERS = ["transformer_lens", "nnsight"]
ALL = ["hf", *OTHERS]
OPS = ["add", "add_norm_preserving", "ablate", "ablate_add", "clamp"]
TEXTS = [
    "The weather today is",
    "Hi",
    "A long sentence about the history of rivers and the people who lived by them",
]
# one site of every steerable kind, the last block's output included (HF's final-norm trap)
SITES = [
    "blocks.1.hook_resid_pre",
    "blocks.1.hook_attn_out",
    "blocks.2.hook_mlp_out",
    "blocks.3.hook_resid_post",
]
LAST = "blocks.3.hook_resid_post"


def direction(lm: LoadedModel, sites: Sequence[str] = SITES, seed: int = 0) -> Direction:
    g = torch.Generator().manual_seed(seed)
    vecs = {s: torch.randn(lm.d_model, generator=g) for s in sites}
    stats = {s: {"resid_norm": 10.0} for s in sites}
    return Direction(vecs, lm.identity, name="d", stats=stats).normalized()


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp(min=1e-6))


def real_mask(lm: LoadedModel, texts: Sequence[str] = TEXTS) -> torch.Tensor:
    lengths = [len(lm.tokenizer(t)["input_ids"]) for t in texts]
    t_max = max(lengths)
    return torch.tensor([[i >= t_max - n for i in range(t_max)] for n in lengths])


def snapshot(model: torch.nn.Module) -> dict[str, tuple[list[int], list[int]]]:
    return {
        name: (list(m._forward_hooks), list(m._forward_pre_hooks))
        for name, m in model.named_modules()
    }


# ---- parity ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tiny_lm: LoadedModel) -> torch.Tensor:
    """Unsteered hf logits of TEXTS."""
    return steered_logits(tiny_lm, None, TEXTS)


@pytest.mark.parametrize("positions", ["all", (0, 2)], ids=["all", "idx0,2"])
@pytest.mark.parametrize("op", OPS)
def test_every_backend_gives_the_same_logits(
    tiny_lm: LoadedModel,
    base: torch.Tensor,
    op: str,
    positions: str | tuple[int, ...],
) -> None:
    spec = SteeringSpec(direction(tiny_lm), coeff=0.5, operator=op, positions=positions)
    ref = steered_logits(tiny_lm, spec, TEXTS)
    assert ref.shape == (3, real_mask(tiny_lm).shape[1], tiny_lm.identity.vocab_size)
    assert (ref - base).abs().max() > 0.1, "steering changed nothing"
    for backend in OTHERS:
        got = steered_logits(tiny_lm, spec, TEXTS, backend=backend)
        diff = max_rel_diff(ref, got)
        assert diff <= 1e-4, (backend, op, positions, diff)


@pytest.mark.parametrize("backend", ALL)
def test_zero_coeff_is_the_unsteered_model(
    tiny_lm: LoadedModel, base: torch.Tensor, backend: str
) -> None:
    d = direction(tiny_lm)
    unsteered = steered_logits(tiny_lm, None, TEXTS, backend=backend)
    assert max_rel_diff(base, unsteered) <= 1e-4  # the back-ends agree unsteered too
    zero = steered_logits(tiny_lm, SteeringSpec(d, coeff=0.0), TEXTS, backend=backend)
    assert torch.equal(zero, unsteered)
    zero_np = SteeringSpec(d, coeff=0.0, operator="add_norm_preserving")
    zero_np_logits = steered_logits(tiny_lm, zero_np, TEXTS, backend=backend)
    assert max_rel_diff(unsteered, zero_np_logits) <= 1e-6
    steered = steered_logits(tiny_lm, SteeringSpec(d, coeff=0.5), TEXTS, backend=backend)
    assert (steered - unsteered).abs().max() > 0.1


@pytest.mark.parametrize("backend", ALL)
def test_only_the_selected_real_tokens_are_steered(tiny_lm: LoadedModel, backend: str) -> None:
    """At the last block's output, steering token t changes the logits of token t only."""
    d = direction(tiny_lm, [LAST])
    base = steered_logits(tiny_lm, None, TEXTS, backend=backend)
    real = real_mask(tiny_lm)
    index = (real.long().cumsum(-1) - 1).masked_fill(~real, -1)
    for positions, expected in (
        ((0, 2), (index == 0) | (index == 2)),
        ("all", real),
        ("prompt", real),  # no generation here: every real token is prompt
    ):
        spec = SteeringSpec(d, coeff=0.5, positions=positions, sites=[LAST])
        got = steered_logits(tiny_lm, spec, TEXTS, backend=backend)
        changed = (got - base).abs().amax(-1) > 1e-3
        assert torch.equal(changed, expected), (positions, changed)
        assert torch.equal(got[~real], torch.zeros_like(got[~real]))  # padding stays zero


@pytest.mark.parametrize("backend", ALL)
def test_last_position_logits_do_not_depend_on_padding_side(
    tiny_lm: LoadedModel, backend: str
) -> None:
    spec = SteeringSpec(direction(tiny_lm), coeff=0.5, operator="ablate_add", positions=[0, 2])
    ref = steered_logits(tiny_lm, spec, TEXTS, last_only=True)
    full = steered_logits(tiny_lm, spec, TEXTS, backend=backend)
    left = steered_logits(tiny_lm, spec, TEXTS, backend=backend, last_only=True)
    right = steered_logits(
        tiny_lm, spec, TEXTS, backend=backend, padding_side="right", last_only=True
    )
    assert ref.shape == (3, tiny_lm.identity.vocab_size)
    assert torch.equal(left, full[:, -1])
    assert max_rel_diff(ref, left) <= 1e-4
    assert max_rel_diff(ref, right) <= 1e-4


def test_chat_inputs_and_assistant_positions(tiny_lm: LoadedModel) -> None:
    chats = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}],
        [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris"},
        ],
    ]
    spec = SteeringSpec(direction(tiny_lm), coeff=0.5, operator="clamp", positions="assistant")
    ref = steered_logits(tiny_lm, spec, chats)
    assert (ref - steered_logits(tiny_lm, None, chats)).abs().max() > 0.1
    for backend in OTHERS:
        assert max_rel_diff(ref, steered_logits(tiny_lm, spec, chats, backend=backend)) <= 1e-4


def test_token_mask_matches_the_hf_rules(tiny_lm: LoadedModel) -> None:
    real = torch.tensor([[False, True, True, True], [True, True, True, True]])
    pos = (real.long().cumsum(-1) - 1).clamp(min=0)
    d = direction(tiny_lm)
    r_all = resolve(tiny_lm, SteeringSpec(d, coeff=1.0))
    assert torch.equal(token_mask(r_all, real, pos), real)
    r_idx = resolve(tiny_lm, SteeringSpec(d, coeff=1.0, positions=[0, 2]))
    expected = torch.tensor([[False, True, False, True], [True, False, True, False]])
    assert torch.equal(token_mask(r_idx, real, pos), expected)
    r_gen = resolve(tiny_lm, SteeringSpec(d, coeff=1.0, positions="generated"))
    plen = torch.tensor([2, 3])
    assert torch.equal(
        token_mask(r_gen, real, pos, plen), torch.tensor([[False, False, False, True]] * 2)
    )


# ---- errors -----------------------------------------------------------------------------------------


def test_errors_are_clear(tiny_lm: LoadedModel) -> None:
    d = direction(tiny_lm)
    with pytest.raises(ValueError, match="generated"):
        steered_logits(tiny_lm, SteeringSpec(d, coeff=1.0, positions="generated"), TEXTS)
    with pytest.raises(ValueError, match="backend must be one of"):
        steered_logits(tiny_lm, SteeringSpec(d, coeff=1.0), TEXTS, backend="vllm")
    cond = Condition(
        direction(tiny_lm, ["blocks.0.hook_resid_post"]), "blocks.0.hook_resid_post", 0.0
    )
    spec = SteeringSpec(d, coeff=1.0, condition=cond)
    assert steered_logits(tiny_lm, spec, TEXTS).shape[0] == 3  # hf supports it
    for backend in OTHERS:
        with pytest.raises(NotImplementedError, match="backend='hf'"):
            steered_logits(tiny_lm, spec, TEXTS, backend=backend)


# ---- nothing left behind ----------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def _boom(h: torch.Tensor, delta: torch.Tensor, u: torch.Tensor, value: float) -> torch.Tensor:
    raise Boom("operator failed")


@pytest.mark.parametrize("backend", ALL)
def test_no_hooks_or_interventions_left(
    tiny_lm: LoadedModel, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = steered_logits(tiny_lm, None, TEXTS, backend=backend)
    bridge, ns_module = get_bridge(tiny_lm), get_nnsight_model(tiny_lm)._module
    models = {"lm.model": tiny_lm.model, "bridge": bridge, "nnsight": ns_module}
    before = {k: snapshot(m) for k, m in models.items()}
    d = direction(tiny_lm)
    steered_logits(tiny_lm, SteeringSpec(d, coeff=0.5, positions=[0, 2]), TEXTS, backend=backend)
    monkeypatch.setitem(OPERATORS, "boom", Operator("boom", _boom, "boom"))
    with pytest.raises(Boom, match="operator failed"):
        steered_logits(tiny_lm, SteeringSpec(d, coeff=0.5, operator="boom"), TEXTS, backend=backend)
    assert {k: snapshot(m) for k, m in models.items()} == before
    assert leftover_hooks(tiny_lm.model) == []
    assert [n for n, hp in bridge.hook_dict.items() if hp._forward_hooks] == []
    assert torch.equal(steered_logits(tiny_lm, None, TEXTS, backend=backend), base)


# ---- the embedded model -----------------------------------------------------------------------------


@pytest.mark.integration
def test_embedded_parity(embedded_lm: LoadedModel) -> None:
    sites = ["blocks.12.hook_resid_post", "blocks.20.hook_resid_post"]
    g = torch.Generator().manual_seed(0)
    vecs = {s: torch.randn(embedded_lm.d_model, generator=g) for s in sites}
    d = Direction(vecs, embedded_lm.identity, name="random").normalized()
    texts = ["Honesty matters.", "Hi", "The capital of France is Paris, and the river is the"]
    base = steered_logits(embedded_lm, None, texts)
    for op in ("add", "ablate"):
        spec = SteeringSpec(d, coeff=8.0, operator=op, scale="unit")
        ref = steered_logits(embedded_lm, spec, texts)
        assert (ref - base).abs().max() > 1e-2, op
        for backend in OTHERS:
            diff = max_rel_diff(ref, steered_logits(embedded_lm, spec, texts, backend=backend))
            assert diff <= 1e-4, (op, backend, diff)
