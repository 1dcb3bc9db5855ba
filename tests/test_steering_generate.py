"""Generation: our streaming loop vs transformers' generate, batching, seeds, calibration."""

from __future__ import annotations

import contextlib

import pytest
import torch

from repe.batching import Encoded, encode, make_batch
from repe.calibration import calibrate, residual_norms
from repe.directions import Direction
from steering import SteeringSpec, steer
from steering.generate import GenerationConfig, as_chats, compare, generate, generate_stream

PROMPTS = ["Tell me about the sea.", "Hi!", "What should I cook tonight with rice and beans?"]
SITE = "blocks.2.hook_resid_post"


def direction(lm, seed=0) -> Direction:
    g = torch.Generator().manual_seed(seed)
    d = Direction({SITE: torch.randn(lm.d_model, generator=g)}, lm.identity, name="r").normalized()
    return calibrate(lm, d)


def hf_greedy(lm, prompts, n):
    from repe.chat import chat_prompt

    out = []
    for p in prompts:
        enc = lm.tokenizer(
            chat_prompt(lm.tokenizer, p), return_tensors="pt", add_special_tokens=False
        )
        with torch.no_grad():
            seq = lm.model.generate(
                **enc, max_new_tokens=n, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id
            )
        toks = seq[0, enc["input_ids"].shape[1] :].tolist()
        eos = lm.tokenizer.eos_token_id
        if eos in toks:
            toks = toks[: toks.index(eos) + 1]
        out.append(lm.tokenizer.decode(toks, skip_special_tokens=True))
    return out


@pytest.mark.parametrize("steered", [False, True])
def test_matches_transformers_generate_one_by_one(tiny_lm, steered):
    d = direction(tiny_lm)
    spec = SteeringSpec(d, coeff=0.5) if steered else None
    cfg = GenerationConfig(max_new_tokens=10)
    ours = generate(tiny_lm, PROMPTS, spec, cfg)  # one left-padded batch
    if spec is None:
        ref = hf_greedy(tiny_lm, PROMPTS, 10)
    else:
        with steer(tiny_lm, spec):
            ref = hf_greedy(tiny_lm, PROMPTS, 10)
    assert ours == ref


def test_steering_changes_text_and_zero_does_not(tiny_lm):
    d = direction(tiny_lm)
    cfg = GenerationConfig(max_new_tokens=12)
    base = generate(tiny_lm, PROMPTS, None, cfg)
    assert generate(tiny_lm, PROMPTS, SteeringSpec(d, coeff=0.0), cfg) == base
    assert generate(tiny_lm, PROMPTS, SteeringSpec(d, coeff=2.0), cfg) != base
    rows = compare(tiny_lm, PROMPTS, SteeringSpec(d, coeff=2.0), cfg)
    assert [r.baseline for r in rows] == base and rows[0].prompt == PROMPTS[0]


def test_stream_yields_token_by_token(tiny_lm):
    steps = list(
        generate_stream(
            tiny_lm, PROMPTS[:2], None, GenerationConfig(max_new_tokens=5, stop_at_eos=False)
        )
    )
    assert [s.index for s in steps] == list(range(5))
    assert all(len(s.token_ids) == 2 for s in steps)
    assert all(steps[i].texts[0].startswith(steps[i - 1].texts[0][:1]) for i in range(1, 5))


def test_sampling_is_seeded(tiny_lm):
    a = generate(tiny_lm, PROMPTS, None, GenerationConfig(max_new_tokens=8, do_sample=True, seed=1))
    b = generate(tiny_lm, PROMPTS, None, GenerationConfig(max_new_tokens=8, do_sample=True, seed=1))
    c = generate(tiny_lm, PROMPTS, None, GenerationConfig(max_new_tokens=8, do_sample=True, seed=2))
    assert a == b and a != c


def test_assistant_positions_in_generation(tiny_lm):
    d = direction(tiny_lm)
    cfg = GenerationConfig(max_new_tokens=6)
    gen_only = generate(tiny_lm, PROMPTS, SteeringSpec(d, coeff=2.0, positions="generated"), cfg)
    asst = generate(tiny_lm, PROMPTS, SteeringSpec(d, coeff=2.0, positions="assistant"), cfg)
    # with a generation prompt, the assistant turn starts exactly where generation starts
    assert asst == gen_only


def test_bad_configs(tiny_lm):
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="single string"):
        generate(tiny_lm, "hello")


def test_residual_norms_skip_the_first_token(tiny_lm):
    norms = residual_norms(tiny_lm, [SITE, "blocks.0.hook_resid_pre"])
    assert norms[SITE] > 0 and norms["blocks.0.hook_resid_pre"] > 0
    d = direction(tiny_lm)
    assert d.stats[SITE]["resid_norm"] == pytest.approx(norms[SITE])


def no_cache_reference(lm, prompts, generated, spec):
    """Logits of prompt + generated tokens in one forward pass without a KV cache, steered (when
    ``spec`` is given) from a sequence start declared with the real prompt lengths; ``[B, T, V]`` and
    the padded row offsets."""
    enc = encode(lm.tokenizer, as_chats(prompts))
    full = make_batch(
        [Encoded(e.ids + g, e.assistant_start) for e, g in zip(enc, generated, strict=True)],
        lm.tokenizer.pad_token_id,
        "left",
    )
    starts = [e.assistant_start for e in enc]
    ctx = steer(lm, spec) if spec is not None else contextlib.nullcontext()
    with ctx as state, torch.no_grad():
        if state is not None:
            state.begin_sequence(torch.tensor([len(e.ids) for e in enc]), torch.tensor(starts))
        logits = lm.model(
            input_ids=full.input_ids,
            attention_mask=full.attention_mask,
            position_ids=full.position_ids,
            use_cache=False,
        ).logits
    return logits, full.offsets, [len(e.ids) for e in enc]


@pytest.mark.parametrize("positions", ["generated", "assistant"])
def test_cached_generation_steers_exactly_the_generated_tokens(tiny_lm, positions):
    """Steering must see the KV cache under whatever name the installed transformers passes it: step 0
    (the prompt pass) equals the unsteered logits; every later step equals a no-cache forward of the
    same tokens steered from the first generated token on, and differs from the unsteered one."""
    d = direction(tiny_lm)
    spec = SteeringSpec(d, coeff=4.0, positions=positions)
    cfg = GenerationConfig(max_new_tokens=6, stop_at_eos=False)
    steps = list(generate_stream(tiny_lm, PROMPTS, spec, cfg))
    base0 = next(generate_stream(tiny_lm, PROMPTS, None, cfg)).logits
    torch.testing.assert_close(steps[0].logits, base0, atol=1e-5, rtol=1e-5)
    generated = [[s.token_ids[b] for s in steps] for b in range(len(PROMPTS))]
    steered, offsets, plens = no_cache_reference(tiny_lm, PROMPTS, generated, spec)
    plain, _, _ = no_cache_reference(tiny_lm, PROMPTS, generated, None)
    for i, s in enumerate(steps):
        for b in range(len(PROMPTS)):
            at = offsets[b] + plens[b] - 1 + i  # the position whose logits picked token i
            torch.testing.assert_close(s.logits[b], steered[b, at], atol=1e-4, rtol=1e-4)
            if i == 0:
                torch.testing.assert_close(s.logits[b], plain[b, at], atol=1e-5, rtol=1e-5)
            else:
                assert (s.logits[b] - plain[b, at]).abs().max() > 1e-2, (i, b)


def test_steering_sees_the_cache_when_called_with_ids_only(tiny_lm):
    """A caller's own cached loop, the model given only input_ids and the cache (no mask, no position
    ids): the steered positions come from the cache length, so the prompt is untouched and every
    generated token is steered."""
    from transformers import DynamicCache

    from repe.kvcache import cache_kwargs

    d = direction(tiny_lm)
    spec = SteeringSpec(d, coeff=4.0, positions="generated")
    enc = encode(tiny_lm.tokenizer, as_chats(PROMPTS[:1]))
    ids = torch.tensor([enc[0].ids])
    out, toks = [], []
    with steer(tiny_lm, spec) as state, torch.no_grad():
        state.begin_sequence(torch.tensor([ids.shape[1]]))
        cache = DynamicCache()
        step = ids
        for _ in range(5):
            logits = tiny_lm.model(input_ids=step, **cache_kwargs(tiny_lm.model, cache)).logits
            out.append(logits[0, -1])
            step = logits[:, -1].argmax(-1, keepdim=True)
            toks.append(int(step))
    steered, offsets, plens = no_cache_reference(tiny_lm, PROMPTS[:1], [toks], spec)
    plain, _, _ = no_cache_reference(tiny_lm, PROMPTS[:1], [toks], None)
    for i, lg in enumerate(out):
        at = plens[0] - 1 + i
        torch.testing.assert_close(lg, steered[0, at], atol=1e-4, rtol=1e-4)
        assert (i == 0) == bool(torch.allclose(lg, plain[0, at], atol=1e-5, rtol=1e-5)), i


def test_cache_argument_name_follows_the_installed_transformers(tiny_lm):
    import inspect

    from repe.kvcache import cache_from_kwargs, cache_kwargs

    for module in (tiny_lm.model, tiny_lm.backbone):
        kw = cache_kwargs(module, "C")
        (name,) = (k for k in kw if k != "use_cache")
        assert name in inspect.signature(module.forward).parameters
    assert cache_from_kwargs({"cache": "A"}) == "A"
    assert cache_from_kwargs({"past_key_values": "B"}) == "B"
    assert cache_from_kwargs({"past_key_values": None}) is None


def test_top_p_sampling_draws_from_the_nucleus_with_its_probabilities() -> None:
    from steering.generate import _pick

    torch.manual_seed(0)
    logits = torch.randn(1, 1000) * 3
    cfg = GenerationConfig(do_sample=True, top_p=0.9, temperature=0.7)
    p = (logits[0] / 0.7).softmax(-1)
    sp, si = p.sort(descending=True)
    keep = sp.cumsum(0) - sp < 0.9
    ref = torch.zeros(1000)
    ref[si[keep]] = sp[keep] / sp[keep].sum()
    for rows in (None, [torch.Generator().manual_seed(1)]):
        g = torch.Generator().manual_seed(0)
        counts = torch.zeros(1000)
        for _ in range(4000):
            counts[_pick(logits, cfg, g, rows)] += 1
        assert counts[ref == 0].sum() == 0  # never outside the nucleus
        assert (counts / 4000 - ref).abs().max() < 0.02
    # a flat distribution: the nucleus is wider than the top 512 tokens (the full-sort path)
    flat = torch.zeros(1, 1000)
    drawn = {int(_pick(flat, cfg, torch.Generator().manual_seed(i))) for i in range(300)}
    assert max(drawn) > 512 or len(drawn) > 250


SYSTEM = "You are a careful assistant who answers every question in plain words."
QUESTIONS = [
    "Why?",
    "Is it ever right to break a promise to a friend?",
    "What matters most in life?",
    "Should people always obey the law, even a law they think is unjust and harmful to others?",
    "Money or time?",
    "How should we treat strangers?",
    "Is tradition worth keeping when it no longer makes sense to the young?",
    "Hi",
    "What do you owe your parents?",
]


def _prefill_calls(lm, prompts, spec, cfg, split, monkeypatch, seeds=None):
    """Every step of a generation, and the (batch, width) of each model call before the first step."""
    import steering.generate as G

    if not split:
        monkeypatch.setattr(G, "_splittable", lambda lm, spec: False)
    calls = []
    handle = lm.model.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        stream = generate_stream(lm, prompts, spec, cfg, seeds=seeds)
        first = next(stream)
        prefill = list(calls)
        steps = [first, *stream]
    finally:
        handle.remove()
        monkeypatch.undo()
    return steps, prefill


@pytest.mark.parametrize("positions", [None, "all", (1, 3, 30)])
def test_split_prefill_computes_what_one_padded_batch_computes(tiny_lm, positions, monkeypatch):
    """A batch's shared prefix (template + system prompt) runs once and its own tokens run in length
    buckets; every step's logits and every sampled token equal those of one left-padded call, unsteered
    and under steering that acts token by token (every position, or given token indices that fall in
    the prefix and in a row's own tokens)."""
    import steering.generate as G
    from repe.chat import messages

    prompts = [messages(q, system=SYSTEM) for q in QUESTIONS]
    spec = None if positions is None else SteeringSpec(direction(tiny_lm), 3.0, positions=positions)
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.0, stop_at_eos=False)
    seeds = list(range(10, 10 + len(prompts)))
    monkeypatch.setattr(G, "PREFILL_TOKENS", 40)
    split, calls = _prefill_calls(tiny_lm, prompts, spec, cfg, True, monkeypatch, seeds)
    plain, plain_calls = _prefill_calls(tiny_lm, prompts, spec, cfg, False, monkeypatch, seeds)
    rows = [e.ids for e in encode(tiny_lm.tokenizer, prompts)]
    shared = G._common_prefix(rows)
    assert shared > 20 and calls[0] == (1, shared)  # the template and system prompt, once
    assert len(calls) > 3 and sum(b for b, _ in calls[1:]) == len(prompts)  # several buckets
    assert sum(b * t for b, t in calls) < 0.6 * sum(b * t for b, t in plain_calls)
    assert plain_calls == [(len(prompts), max(map(len, rows)))]
    assert len(split) == len(plain) == 6
    for a, b in zip(split, plain, strict=True):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
        assert a.token_ids == b.token_ids
    assert split[-1].texts == plain[-1].texts
    if spec is not None:  # the steering acted: it changes what the unsteered split run computes
        base, _ = _prefill_calls(tiny_lm, prompts, None, cfg, True, monkeypatch, seeds)
        assert (base[0].logits - split[0].logits).abs().max() > 1e-3


@pytest.mark.parametrize("positions", ["generated", "assistant", "prompt"])
def test_steering_that_counts_the_sequence_prefills_in_one_call(tiny_lm, positions, monkeypatch):
    """Positions that count the declared sequence's tokens need the whole prompt in one call: such
    steering keeps the single left-padded prefill (and its results are checked against a no-cache
    forward in test_cached_generation_steers_exactly_the_generated_tokens)."""
    from repe.chat import messages

    prompts = [messages(q, system=SYSTEM) for q in QUESTIONS[:4]]
    spec = SteeringSpec(direction(tiny_lm), 3.0, positions=positions)
    _, calls = _prefill_calls(
        tiny_lm, prompts, spec, GenerationConfig(max_new_tokens=2), True, monkeypatch
    )
    assert len(calls) == 1 and calls[0][0] == 4


def test_split_prefill_falls_back_for_a_cache_it_cannot_edit(tiny_lm, monkeypatch):
    """A cache that is not a plain DynamicCache (sliding windows, quantised): one left-padded call."""
    import steering.generate as G
    from repe.chat import messages

    prompts = [messages(q, system=SYSTEM) for q in QUESTIONS[:4]]
    cfg = GenerationConfig(max_new_tokens=4)
    want = generate(tiny_lm, prompts, None, cfg)
    monkeypatch.setattr(G, "dynamic_layers", lambda cache: None)
    calls = []
    handle = tiny_lm.model.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        assert generate(tiny_lm, prompts, None, cfg) == want
    finally:
        handle.remove()
    assert calls[1][0] == 4  # the prefix call, then the whole batch at once
