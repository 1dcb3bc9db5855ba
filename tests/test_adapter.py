"""Low-rank adapters through the Intervention protocol: identity at B = 0, scoping (no hook left, two
threads), KV-cache parity, nesting with steering vectors, save/load, merging into a copy of the weights."""

from __future__ import annotations

import threading

import pytest
import torch

from repe.artifacts import ArtifactMismatchError
from repe.hooks import leftover_hooks
from repe.models import tiny_model
from steering import LowRankAdapter, SteeringSpec, steer
from steering.generate import GenerationConfig, generate, generate_stream

PROMPTS = ["Tell me about the sea.", "Hi!", "What should I cook tonight with rice and beans?"]


def ids(lm) -> torch.Tensor:
    return lm.tokenizer(["The sea is wide and deep and cold"], return_tensors="pt")["input_ids"]


def logits(lm, x) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=x).logits


def trained_like(lm, seed=1, layers=(1, 2)) -> LowRankAdapter:
    """An adapter with a non-zero B (as after training)."""
    ad = LowRankAdapter.init(lm, list(layers), rank=4, alpha=8.0, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    for k in ad.b:
        ad.b[k] = torch.randn(ad.b[k].shape, generator=g) * 0.5
    return ad


def test_a_fresh_adapter_is_the_identity_bit_for_bit(tiny_lm):
    ad = LowRankAdapter.init(tiny_lm, [0, 1, 2, 3])
    assert all(float(b.abs().max()) == 0 for b in ad.b.values())
    assert all(float(a.abs().max()) > 0 for a in ad.a.values())
    x = ids(tiny_lm)
    base = logits(tiny_lm, x)
    with steer(tiny_lm, ad):
        assert torch.equal(logits(tiny_lm, x), base)


def test_an_adapter_acts_only_in_its_scope_and_leaves_no_hook(tiny_lm):
    ad = trained_like(tiny_lm)
    x = ids(tiny_lm)
    base = logits(tiny_lm, x)
    with steer(tiny_lm, ad):
        inside = logits(tiny_lm, x)
        assert leftover_hooks(tiny_lm.model)
    assert (inside - base).abs().max() > 1e-3
    assert leftover_hooks(tiny_lm.model) == []
    assert torch.equal(logits(tiny_lm, x), base)
    with pytest.raises(RuntimeError, match="boom"), steer(tiny_lm, ad):
        raise RuntimeError("boom")
    assert leftover_hooks(tiny_lm.model) == []


def test_the_adapter_is_the_low_rank_update_of_its_modules(tiny_lm):
    """The hooked q/v outputs equal x W^T + (alpha/r) x A^T B^T, computed by hand."""
    ad = trained_like(tiny_lm, layers=(2,))
    q = tiny_lm.layers[2].self_attn.q_proj
    seen = {}
    h = q.register_forward_hook(lambda m, a, out: seen.update(x=a[0], out=out))
    try:
        with steer(tiny_lm, ad):
            logits(tiny_lm, ids(tiny_lm))
    finally:
        h.remove()
    x = seen["x"]
    k = "blocks.2.attn.q_proj"
    want = x @ q.weight.T + (ad.alpha / ad.rank) * (x @ ad.a[k].T) @ ad.b[k].T
    torch.testing.assert_close(seen["out"], want, atol=1e-5, rtol=1e-5)


def test_kv_cached_generation_matches_a_full_forward_under_the_adapter(tiny_lm):
    ad = trained_like(tiny_lm)
    cfg = GenerationConfig(max_new_tokens=5, stop_at_eos=False)
    steps = list(generate_stream(tiny_lm, PROMPTS[:1], ad, cfg))
    from repe.chat import chat_prompt

    prompt = tiny_lm.tokenizer(
        chat_prompt(tiny_lm.tokenizer, PROMPTS[0]), add_special_tokens=False
    )["input_ids"]
    full = torch.tensor([prompt + [s.token_ids[0] for s in steps]])
    with steer(tiny_lm, ad):
        ref = logits(tiny_lm, full)[0]
    plain = logits(tiny_lm, full)[0]
    for i, s in enumerate(steps):
        torch.testing.assert_close(s.logits[0], ref[len(prompt) - 1 + i], atol=1e-4, rtol=1e-4)
        assert (s.logits[0] - plain[len(prompt) - 1 + i]).abs().max() > 1e-3
    # a batch (shared-prefix prefill) gives each row what it gets alone
    cfg6 = GenerationConfig(max_new_tokens=6)
    assert generate(tiny_lm, PROMPTS, ad, cfg6)[1] == generate(tiny_lm, PROMPTS[1:2], ad, cfg6)[0]


def test_two_threads_with_and_without_the_adapter_get_what_they_get_alone(tiny_lm):
    ad = trained_like(tiny_lm)
    x = ids(tiny_lm)
    alone_plain = logits(tiny_lm, x)
    with steer(tiny_lm, ad):
        alone_adapted = logits(tiny_lm, x)
    got: dict[str, list[torch.Tensor]] = {"plain": [], "adapted": []}
    start = threading.Barrier(2)

    def plain() -> None:
        start.wait()
        for _ in range(20):
            got["plain"].append(logits(tiny_lm, x))

    def adapted() -> None:
        start.wait()
        with steer(tiny_lm, ad):
            for _ in range(20):
                got["adapted"].append(logits(tiny_lm, x))

    threads = [threading.Thread(target=plain), threading.Thread(target=adapted)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got["plain"]) == len(got["adapted"]) == 20
    assert all(torch.allclose(y, alone_plain, atol=1e-6) for y in got["plain"])
    assert all(torch.allclose(y, alone_adapted, atol=1e-6) for y in got["adapted"])


def test_an_adapter_nests_with_a_steering_vector(tiny_lm):
    from repe.directions import Direction

    ad = trained_like(tiny_lm)
    d = Direction({"blocks.2.hook_resid_post": torch.ones(tiny_lm.d_model)}, tiny_lm.identity)
    spec = SteeringSpec(d, 1.0, scale="raw")
    x = ids(tiny_lm)
    with steer(tiny_lm, ad):
        a = logits(tiny_lm, x)
        with steer(tiny_lm, spec):
            both = logits(tiny_lm, x)
    with steer(tiny_lm, spec):
        s = logits(tiny_lm, x)
        with steer(tiny_lm, ad):
            both2 = logits(tiny_lm, x)
    torch.testing.assert_close(both, both2)
    assert (both - a).abs().max() > 1e-3 and (both - s).abs().max() > 1e-3


def test_save_load_round_trip_and_refusals(tiny_lm, tmp_path):
    ad = trained_like(tiny_lm)
    ad.save(tmp_path / "ad")
    back = LowRankAdapter.load(tmp_path / "ad", tiny_lm)
    assert back.layers == ad.layers and back.targets == ad.targets and back.rank == ad.rank
    x = ids(tiny_lm)
    with steer(tiny_lm, ad):
        want = logits(tiny_lm, x)
    with steer(tiny_lm, back):
        assert torch.equal(logits(tiny_lm, x), want)
    other = tiny_model(seed=5, d_model=32)
    with pytest.raises(ArtifactMismatchError, match="d_model"):
        LowRankAdapter.load(tmp_path / "ad", other)
    with pytest.raises(ArtifactMismatchError):
        with steer(other, ad):
            pass
    assert leftover_hooks(other.model) == []


def test_bad_adapter_settings_say_what_is_wrong(tiny_lm):
    with pytest.raises(ValueError, match="out of range"):
        LowRankAdapter.init(tiny_lm, [7])
    with pytest.raises(ValueError, match="no linear attention module 'w_proj'.*q_proj"):
        LowRankAdapter.init(tiny_lm, [1], targets=("w_proj",))
    with pytest.raises(ValueError, match="rank"):
        LowRankAdapter.init(tiny_lm, [1], rank=0)
    ad = trained_like(tiny_lm)
    ad.b["blocks.1.attn.q_proj"] = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="do not fit"):
        ad.resolve(tiny_lm)


def test_merging_gives_the_hooked_adapters_logits_and_leaves_the_model_alone(tiny_lm):
    ad = trained_like(tiny_lm)
    x = ids(tiny_lm)
    base = logits(tiny_lm, x)
    with steer(tiny_lm, ad):
        hooked = logits(tiny_lm, x)
    merged = ad.merged(tiny_lm)
    torch.testing.assert_close(logits(merged, x), hooked, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits(tiny_lm, x), base)
    assert merged.model is not tiny_lm.model and leftover_hooks(merged.model) == []


def test_gradients_reach_the_adapter_through_the_hooks(tiny_lm):
    ad = trained_like(tiny_lm)
    for t in ad.parameters():
        t.requires_grad_(True)
    with steer(tiny_lm, ad):
        out = tiny_lm.model(input_ids=ids(tiny_lm)).logits
    out.pow(2).mean().backward()
    assert all(t.grad is not None and float(t.grad.abs().max()) > 0 for t in ad.parameters())
    tiny_lm.model.zero_grad(set_to_none=True)
