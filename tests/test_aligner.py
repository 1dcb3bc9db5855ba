"""Aligner global tokens on tiny random Llamas (with and without grouped-query attention): identity at
zero gates, the parameter count, GQA head mapping against a per-head reference, KV-cache parity,
gradients, save/load, threads, nesting and the unsupported-architecture error."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from transformers import AutoTokenizer, DynamicCache, GPT2Config, GPT2LMHeadModel

from repe.directions import Direction
from repe.errors import DataFormatError
from repe.hooks import leftover_hooks
from repe.kvcache import cache_kwargs
from repe.models import LoadedModel, embedded_model_dir, identity_of, tiny_model
from steering import SteeringSpec, steer
from steering.aligner import Aligner, UnsupportedArchitecture, parameter_count
from steering.hooks import steer as steer_fn


@pytest.fixture(scope="module")
def mha_lm() -> LoadedModel:
    """No grouped-query attention: 4 query heads, 4 key/value heads."""
    return tiny_model(n_kv_heads=4, seed=1)


def _ids(lm: LoadedModel, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _trained_like(lm: LoadedModel, n: int, start: int = 1, seed: int = 0) -> Aligner:
    """An Aligner with nonzero gates (as if trained)."""
    al = Aligner.init(lm, n, start_layer=start, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    al.gates = torch.randn(al.gates.shape, generator=g) * 0.5
    return al


def _logits(lm: LoadedModel, inputs: dict[str, torch.Tensor], intervention=None) -> torch.Tensor:
    with torch.inference_mode():
        if intervention is None:
            return lm.model(**inputs).logits
        with steer(lm, intervention):
            return lm.model(**inputs).logits


@pytest.mark.parametrize("n", [1, 4, 10])
@pytest.mark.parametrize("which", ["gqa", "mha"])
def test_zero_gates_are_the_base_model_bit_for_bit(tiny_lm, mha_lm, n, which):
    lm = tiny_lm if which == "gqa" else mha_lm
    inputs = _ids(lm, ["The cat sat on the mat.", "Hi"])
    base = _logits(lm, inputs)
    al = Aligner.init(lm, n, start_layer=1, seed=3)
    assert torch.equal(_logits(lm, inputs, al), base)
    assert not torch.equal(_logits(lm, inputs, _trained_like(lm, n)), base)  # and it can act


@pytest.mark.parametrize("n,start", [(1, 2), (4, 0), (10, 3)])
def test_parameter_count(tiny_lm, n, start):
    al = Aligner.init(tiny_lm, n, start_layer=start)
    heads = tiny_lm.model.config.num_attention_heads
    want = n * tiny_lm.d_model + heads * (tiny_lm.n_layers - start)
    assert al.n_parameters == want == sum(p.numel() for p in al.parameters())
    assert parameter_count(n, tiny_lm.d_model, heads, tiny_lm.n_layers, start) == want
    # the figure for the embedded model's shape: N=1, d 576, 9 heads, 30 blocks, start 2
    assert parameter_count(1, 576, 9, 30, 2) == 828


def _reference_attn_delta(lm: LoadedModel, al: Aligner, layer: int, x_in: torch.Tensor):
    """What the Aligner adds to ``layer``'s o_proj input, computed head by head with explicit loops:
    query head h reads key/value head h // (n_heads / n_kv_heads)."""
    cfg = lm.model.config
    attn = lm.layers[layer].self_attn
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // n_heads
    b, t, _ = x_in.shape
    pos = torch.arange(t).expand(b, t)
    cos, sin = lm.model.model.rotary_emb(x_in, pos)
    q = attn.q_proj(x_in).view(b, t, n_heads, hd)
    k = attn.k_proj(al.tokens).view(-1, n_kv, hd)
    v = attn.v_proj(al.tokens).view(-1, n_kv, hd)
    out = torch.zeros(b, t, n_heads, hd)
    for h in range(n_heads):
        kv = h // (n_heads // n_kv)
        qh = q[:, :, h]  # [b, t, hd]
        half = hd // 2
        rot = torch.cat((-qh[..., half:], qh[..., :half]), -1)
        qh = qh * cos + rot * sin
        w = (qh @ k[:, kv].T / math.sqrt(hd)).softmax(-1)  # [b, t, N]
        out[:, :, h] = al.gates[layer - al.start_layer, h] * (w @ v[:, kv])
    return out.reshape(b, t, -1)


@pytest.mark.parametrize("path", ["matrix", "elementwise"])
@pytest.mark.parametrize("rope", ["shared", "per_block"])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("which", ["gqa", "mha"])
def test_prefix_attention_matches_a_per_head_reference(
    tiny_lm, mha_lm, n, which, rope, path, monkeypatch
):
    """Both ways of reading the rotary embedding (one hook on the backbone's rotary module, or, for a
    model without one, a hook on each block's attention call) and both ways of applying it (a matrix
    per token for small calls, elementwise otherwise)."""
    import steering.aligner as aligner_mod

    if rope == "per_block":
        monkeypatch.setattr(aligner_mod, "shared_rotary", lambda lm: None)
    monkeypatch.setattr(aligner_mod, "SMALL_CALL", 10_000 if path == "matrix" else 0)
    lm = tiny_lm if which == "gqa" else mha_lm
    al = _trained_like(lm, n, start=1)
    inputs = {"input_ids": lm.tokenizer(["one two three four"], return_tensors="pt")["input_ids"]}
    seen: dict[str, torch.Tensor] = {}
    layer = 1
    attn = lm.layers[layer].self_attn

    def grab_in(_m, args):
        seen.setdefault("norm_out", args[0].detach().clone())

    def grab_o(_m, args):
        seen.setdefault("o_in", args[0].detach().clone())

    h1 = attn.q_proj.register_forward_pre_hook(grab_in)
    with torch.inference_mode():
        lm.model(**inputs)
    h1.remove()
    plain_o: dict[str, torch.Tensor] = {}
    h2 = attn.o_proj.register_forward_pre_hook(
        lambda _m, a: plain_o.setdefault("o", a[0].detach().clone())
    )
    with torch.inference_mode():
        lm.model(**inputs)
    h2.remove()
    h3 = attn.o_proj.register_forward_pre_hook(grab_o)  # registered after steer's: sees its change
    with torch.inference_mode(), steer(lm, al):
        lm.model(**inputs)
    h3.remove()
    with torch.no_grad():
        want = _reference_attn_delta(lm, al, layer, seen["norm_out"])
    torch.testing.assert_close(seen["o_in"] - plain_o["o"], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("which", ["gqa", "mha"])
def test_kv_cache_parity(tiny_lm, mha_lm, n, which):
    """Token by token with the KV cache gives the logits of one full forward pass."""
    lm = tiny_lm if which == "gqa" else mha_lm
    al = _trained_like(lm, n, start=1)
    ids = lm.tokenizer(["Once upon a time there was"], return_tensors="pt")["input_ids"]
    with torch.inference_mode(), steer(lm, al):
        full = lm.model(input_ids=ids).logits
        cache = DynamicCache()
        steps = [lm.model(input_ids=ids[:, :3], **cache_kwargs(lm.model, cache)).logits]
        for i in range(3, ids.shape[1]):
            steps.append(
                lm.model(input_ids=ids[:, i : i + 1], **cache_kwargs(lm.model, cache)).logits
            )
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_generation_with_cache_equals_without(tiny_lm):
    from steering.generate import GenerationConfig, generate

    al = _trained_like(tiny_lm, 4, start=1)
    chats = [[{"role": "user", "content": "Say something"}], [{"role": "user", "content": "Hi"}]]
    cfg = GenerationConfig(max_new_tokens=8)
    a = generate(tiny_lm, chats, al, cfg)
    base = generate(tiny_lm, chats, None, cfg)
    with steer(tiny_lm, al):  # no cache: full forward each step, greedy
        ids = tiny_lm.tokenizer.apply_chat_template(
            chats[0], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        n_prompt = ids.shape[1]
        with torch.inference_mode():
            for _ in range(8):
                nxt = tiny_lm.model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
                ids = torch.cat([ids, nxt[:, None]], 1)
    assert a != base  # the aligner changes what is generated
    # the cached generation's first answer is what uncached greedy decoding gives (up to EOS)
    uncached = tiny_lm.tokenizer.decode(ids[0, n_prompt:], skip_special_tokens=True).strip()
    assert len(a[0].strip()) >= 10 and uncached.startswith(a[0].strip())


def test_only_tokens_and_gates_get_gradients(tiny_lm):
    from steering.rahf import frozen_base as frozen_model

    al = _trained_like(tiny_lm, 4, start=1)
    for p in al.parameters():
        p.requires_grad_(True)
    inputs = _ids(tiny_lm, ["A short training text."])
    flags = [p.requires_grad for p in tiny_lm.model.parameters()]
    with frozen_model(tiny_lm), steer(tiny_lm, al):
        loss = tiny_lm.model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        assert all(p.grad is None for p in tiny_lm.model.parameters())
    assert al.tokens.grad is not None and al.tokens.grad.abs().sum() > 0
    assert al.gates.grad is not None and al.gates.grad.abs().sum() > 0
    assert [p.requires_grad for p in tiny_lm.model.parameters()] == flags  # restored


def test_save_load_round_trip(tiny_lm, mha_lm, tmp_path):
    al = _trained_like(tiny_lm, 4, start=2)
    al.params = {"objective": "sft", "data_fingerprint": "abc"}
    al.metrics = {"held_out_loss": 1.5}
    path = al.save(tmp_path / "al")
    back = Aligner.load(path, tiny_lm)
    assert torch.equal(back.tokens, al.tokens) and torch.equal(back.gates, al.gates)
    assert (back.start_layer, back.n_tokens, back.params, back.metrics) == (
        2,
        4,
        al.params,
        al.metrics,
    )
    inputs = _ids(tiny_lm, ["round trip"])
    assert torch.equal(_logits(tiny_lm, inputs, back), _logits(tiny_lm, inputs, al))
    with pytest.raises(ValueError, match="model"):
        Aligner.load(path, mha_lm)  # made for another model
    (tmp_path / "al.json").write_text("{not json")
    with pytest.raises(DataFormatError):
        Aligner.load(tmp_path / "al")


def test_two_threads_each_get_what_they_get_alone(tiny_lm):
    al = _trained_like(tiny_lm, 4, start=1)
    inputs = _ids(tiny_lm, ["threads share one model"])
    want_on, want_off = _logits(tiny_lm, inputs, al), _logits(tiny_lm, inputs)
    got: dict[str, list[torch.Tensor]] = {"on": [], "off": []}
    barrier = threading.Barrier(2)

    def on() -> None:
        with steer(tiny_lm, al):
            barrier.wait()
            for _ in range(20):
                with torch.inference_mode():
                    got["on"].append(tiny_lm.model(**inputs).logits)

    def off() -> None:
        barrier.wait()
        for _ in range(20):
            with torch.inference_mode():
                got["off"].append(tiny_lm.model(**inputs).logits)

    ts = [threading.Thread(target=on), threading.Thread(target=off)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(got["on"]) == len(got["off"]) == 20
    assert all(torch.allclose(x, want_on, atol=1e-6) for x in got["on"])
    assert all(torch.allclose(x, want_off, atol=1e-6) for x in got["off"])
    assert not leftover_hooks(tiny_lm.model)


def test_nests_with_a_steering_vector(tiny_lm):
    al = _trained_like(tiny_lm, 1, start=1)
    d = Direction({"blocks.2.hook_resid_post": torch.ones(tiny_lm.d_model)}, tiny_lm.identity)
    spec = SteeringSpec(d, 2.0, scale="raw")
    inputs = _ids(tiny_lm, ["nesting"])
    only_al, only_vec = _logits(tiny_lm, inputs, al), _logits(tiny_lm, inputs, spec)
    with torch.inference_mode(), steer_fn(tiny_lm, al), steer_fn(tiny_lm, spec):
        both = tiny_lm.model(**inputs).logits
    assert not torch.allclose(both, only_al) and not torch.allclose(both, only_vec)
    with torch.inference_mode(), steer_fn(tiny_lm, spec), steer_fn(tiny_lm, al):
        both2 = tiny_lm.model(**inputs).logits
    torch.testing.assert_close(both, both2)  # the two act at different places: order is irrelevant
    assert not leftover_hooks(tiny_lm.model)


def test_unsupported_architecture_is_named():
    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    model = GPT2LMHeadModel(cfg).eval()
    lm = LoadedModel(model, tok, identity_of(model, "tiny-gpt2"), "transformer.h.{L}")
    with pytest.raises(UnsupportedArchitecture, match=r"'gpt2'.*no self_attn"):
        Aligner.init(lm, 1, start_layer=0)


def test_bad_inputs(tiny_lm):
    with pytest.raises(ValueError, match="at least one token"):
        Aligner.init(tiny_lm, 0)
    with pytest.raises(ValueError, match="start_layer 9 is out of range"):
        Aligner.init(tiny_lm, 1, start_layer=9)
    al = _trained_like(tiny_lm, 2)
    al.tokens = al.tokens.clone()
    al.tokens[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        with steer(tiny_lm, al):
            pass
    al2 = Aligner.init(tiny_lm, 2)
    al2.gates = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="do not fit"):
        with steer(tiny_lm, al2):
            pass


@pytest.mark.parametrize("n", [1, 4])
def test_padding_is_never_changed(tiny_lm, n):
    """Left padding: the pad positions' states are exactly the base model's (the Aligner adds zero
    there), and the real tokens' logits equal those of the unpadded row."""
    al = _trained_like(tiny_lm, n, start=1)
    tok = tiny_lm.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(
            ["a much longer first row of text here", "short"], return_tensors="pt", padding=True
        )
    finally:
        tok.padding_side = side
    pads = enc["attention_mask"] == 0
    assert pads.any()
    enc["position_ids"] = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)

    def states(intervention=None):
        """Every block's output (own hooks, removed after: output_hidden_states would make
        transformers keep recorder hooks on the shared fixture model)."""
        seen: list[torch.Tensor] = []
        handles = [
            block.register_forward_hook(
                lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out)
            )
            for block in tiny_lm.layers
        ]
        try:
            with torch.inference_mode():
                if intervention is None:
                    logits = tiny_lm.model(**enc).logits
                else:
                    with steer(tiny_lm, intervention):
                        logits = tiny_lm.model(**enc).logits
        finally:
            for h in handles:
                h.remove()
        return seen, logits

    base, _ = states()
    hs, logits = states(al)
    with torch.inference_mode(), steer(tiny_lm, al):
        alone = tiny_lm.model(**tok(["short"], return_tensors="pt")).logits
    assert len(hs) == tiny_lm.n_layers
    for hb, ha in zip(base, hs, strict=True):
        assert torch.equal(hb[pads], ha[pads])
    n_real = int((~pads[1]).sum())
    torch.testing.assert_close(logits[1, -n_real:], alone[0], atol=1e-4, rtol=1e-4)
