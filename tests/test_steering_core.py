"""Steering on the tiny model: exact maths, identities, positions, KV cache, leaks, threads."""

from __future__ import annotations

import threading

import pytest
import torch

from repe import capture
from repe.directions import Direction
from repe.hooks import leftover_hooks
from steering import Condition, SteeringSpec, steer

L = 2
SITE = f"blocks.{L}.hook_resid_post"
TEXTS = ["The weather today is", "Hello", "A long sentence about the history of rivers and"]


def direction(lm, sites=(SITE,), seed=0, name="d") -> Direction:
    g = torch.Generator().manual_seed(seed)
    vecs = {s: torch.randn(lm.d_model, generator=g) for s in sites}
    stats = {s: {"resid_norm": 10.0, "mean_diff_norm": 3.0} for s in sites}
    return Direction(vecs, lm.identity, name=name, stats=stats).normalized()


def batch(lm, texts=TEXTS, side="left"):
    lm.tokenizer.padding_side = side
    return lm.tokenizer(texts, return_tensors="pt", padding=True)


def logits(lm, enc):
    with torch.no_grad():
        return lm.model(**enc).logits


def test_zero_coeff_and_v_minus_v_are_identity(tiny_lm):
    d = direction(tiny_lm)
    enc = batch(tiny_lm)
    base = logits(tiny_lm, enc)
    with steer(tiny_lm, SteeringSpec(d, coeff=0.0)):
        assert torch.equal(logits(tiny_lm, enc), base)
    with steer(tiny_lm, SteeringSpec(d - d, coeff=3.0, scale="raw")):
        assert torch.equal(logits(tiny_lm, enc), base)
    with steer(tiny_lm, SteeringSpec(d, coeff=0.5)):
        assert not torch.allclose(logits(tiny_lm, enc), base)


def test_patched_site_is_orig_plus_cv_and_earlier_sites_untouched(tiny_lm):
    d = direction(tiny_lm)
    sites = [f"blocks.{i}.hook_resid_post" for i in range(4)]
    orig = capture(tiny_lm, TEXTS, sites, positions="all", batch_size=3, padding_side="left")
    with steer(tiny_lm, SteeringSpec(d, coeff=2.5, scale="unit")):
        got = capture(tiny_lm, TEXTS, sites, positions="all", batch_size=3, padding_side="left")
    for i in range(L):
        assert torch.equal(got.rows(sites[i])[0], orig.rows(sites[i])[0])
    assert torch.equal(got.rows(SITE)[0], orig.rows(SITE)[0] + 2.5 * d[SITE])
    assert not torch.allclose(got.rows(sites[3])[0], orig.rows(sites[3])[0])


def test_relative_scale_uses_the_site_norm(tiny_lm):
    d = direction(tiny_lm)
    orig = capture(tiny_lm, TEXTS, SITE)
    with steer(tiny_lm, SteeringSpec(d, coeff=0.1, scale="relative")):
        rel = capture(tiny_lm, TEXTS, SITE)
    with steer(tiny_lm, SteeringSpec(d, coeff=1.0, scale="unit")):
        unit = capture(tiny_lm, TEXTS, SITE)
    # 0.1 of a residual norm of 10 is one unit
    assert torch.allclose(rel[SITE] - orig[SITE], unit[SITE] - orig[SITE], atol=1e-5)
    with steer(tiny_lm, SteeringSpec(d, coeff=1.0, scale="mean_diff")):
        md = capture(tiny_lm, TEXTS, SITE)
    assert torch.allclose(md[SITE] - orig[SITE], 3.0 * d[SITE].expand(3, -1), atol=1e-5)


@pytest.mark.parametrize("op", ["ablate", "ablate_add", "clamp", "add_norm_preserving"])
def test_operators(tiny_lm, op):
    sites = [f"blocks.{i}.hook_resid_post" for i in (1, 2, 3)]
    d = direction(tiny_lm, sites)
    orig = capture(tiny_lm, TEXTS, sites, positions="all")
    with steer(tiny_lm, SteeringSpec(d, coeff=0.3, operator=op, scale="relative")):
        got = capture(tiny_lm, TEXTS, sites, positions="all")
    for s in sites:
        h, o, u = got.rows(s)[0], orig.rows(s)[0], d[s]
        proj = h @ u
        if op == "ablate":
            assert proj.abs().max() < 1e-5
        elif op == "ablate_add":
            assert torch.allclose(proj, torch.full_like(proj, 3.0), atol=1e-4)
        elif op == "clamp":
            assert torch.allclose(proj, torch.full_like(proj, 3.0), atol=1e-4)
        elif s == sites[0]:  # the first steered site is the only one whose input is unchanged
            assert torch.allclose(h.norm(dim=-1), o.norm(dim=-1), rtol=1e-5)
            assert (proj > o @ u).all()


def test_no_hooks_left_also_after_exception(tiny_lm):
    d = direction(tiny_lm)
    with steer(tiny_lm, SteeringSpec(d, coeff=1.0)):
        assert leftover_hooks(tiny_lm.model)
    assert leftover_hooks(tiny_lm.model) == []
    with pytest.raises(RuntimeError, match="boom"), steer(tiny_lm, SteeringSpec(d, coeff=1.0)):
        raise RuntimeError("boom")
    assert leftover_hooks(tiny_lm.model) == []
    # failure half-way through set-up (the second site's module cannot be found) leaves nothing
    two = direction(tiny_lm, sites=(SITE, "blocks.3.hook_resid_post"))
    import steering.hooks as sh

    real_site_module = sh.site_module
    calls = []

    def flaky(lm, site):
        calls.append(site)
        if len(calls) == 2:
            raise ValueError("no such module")
        return real_site_module(lm, site)

    sh.site_module = flaky
    try:
        with (
            pytest.raises(ValueError, match="no such module"),
            steer(tiny_lm, SteeringSpec(two, coeff=1.0)),
        ):
            pass
    finally:
        sh.site_module = real_site_module
    assert len(calls) == 2
    assert leftover_hooks(tiny_lm.model) == []
    zero = Direction({SITE: torch.zeros(64)}, tiny_lm.identity)
    with (
        pytest.raises(ValueError, match="zero"),
        steer(tiny_lm, SteeringSpec(zero, operator="ablate")),
    ):
        pass


def test_nesting_adds_up(tiny_lm):
    a, b = direction(tiny_lm, seed=1, name="a"), direction(tiny_lm, seed=2, name="b")
    orig = capture(tiny_lm, TEXTS, SITE)
    with steer(tiny_lm, SteeringSpec(a, coeff=1.0, scale="unit")):
        with steer(tiny_lm, SteeringSpec(b, coeff=2.0, scale="unit")):
            both = capture(tiny_lm, TEXTS, SITE)
        only_a = capture(tiny_lm, TEXTS, SITE)
    assert torch.allclose(both[SITE], orig[SITE] + a[SITE] + 2 * b[SITE], atol=1e-5)
    assert torch.allclose(only_a[SITE], orig[SITE] + a[SITE], atol=1e-5)


def test_padding_is_never_steered_and_batched_equals_single(tiny_lm):
    d = direction(tiny_lm)
    enc = batch(tiny_lm, side="left")
    with steer(tiny_lm, SteeringSpec(d, coeff=0.5)):
        batched = logits(tiny_lm, enc)
        for i, text in enumerate(TEXTS):
            single = logits(tiny_lm, tiny_lm.tokenizer([text], return_tensors="pt"))
            n = single.shape[1]
            assert torch.allclose(batched[i, -n:], single[0], atol=1e-4)


def test_pad_positions_untouched(tiny_lm):
    d = direction(tiny_lm)
    seen = {}
    h = tiny_lm.layers[L].register_forward_hook(lambda m, a, o: seen.setdefault("h", o.clone()))
    enc = batch(tiny_lm, side="left")
    try:
        logits(tiny_lm, enc)
        base = seen.pop("h")
        with steer(tiny_lm, SteeringSpec(d, coeff=0.5)):
            logits(tiny_lm, enc)
    finally:
        h.remove()
    # our hook is prepended, so the plain hook above sees the steered output
    pad = enc["attention_mask"] == 0
    assert pad.any()
    assert torch.equal(seen["h"][pad], base[pad])
    assert not torch.equal(seen["h"][~pad], base[~pad])


def greedy(lm, enc, n=6, use_cache=True):
    with torch.no_grad():
        return lm.model.generate(
            **enc,
            max_new_tokens=n,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=lm.tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", [0, 2]])
def test_kv_cache_parity(tiny_lm, positions):
    d = direction(tiny_lm)
    enc = batch(tiny_lm, side="left")
    with steer(tiny_lm, SteeringSpec(d, coeff=1.0, positions=positions)) as state:
        state.begin_sequence(attention_mask=enc["attention_mask"])
        a = greedy(tiny_lm, enc, use_cache=True)
    with steer(tiny_lm, SteeringSpec(d, coeff=1.0, positions=positions)) as state:
        state.begin_sequence(attention_mask=enc["attention_mask"])
        b = greedy(tiny_lm, enc, use_cache=False)
    assert torch.equal(a.sequences, b.sequences)
    for la, lb in zip(a.logits, b.logits, strict=True):
        assert torch.allclose(la, lb, atol=1e-3, rtol=1e-4)


def test_prompt_and_generated_positions_split_the_sequence(tiny_lm):
    d = direction(tiny_lm)
    enc = batch(tiny_lm, side="left")
    base = greedy(tiny_lm, enc)
    with steer(tiny_lm, SteeringSpec(d, coeff=2.0, positions="generated")) as state:
        state.begin_sequence(attention_mask=enc["attention_mask"])
        gen_only = greedy(tiny_lm, enc)
    with steer(tiny_lm, SteeringSpec(d, coeff=2.0, positions="prompt")) as state:
        state.begin_sequence(attention_mask=enc["attention_mask"])
        prompt_only = greedy(tiny_lm, enc)
    # steering only generated tokens leaves the first next-token distribution untouched
    assert torch.equal(gen_only.logits[0], base.logits[0])
    assert not torch.equal(prompt_only.logits[0], base.logits[0])


def test_conditional_steering_decides_per_sequence(tiny_lm):
    d = direction(tiny_lm, sites=(SITE,))
    cond_site = "blocks.0.hook_resid_post"
    acts = capture(tiny_lm, TEXTS, cond_site, positions="mean")
    cdir = direction(tiny_lm, sites=(cond_site,), seed=5, name="cond")
    proj = acts[cond_site] @ cdir[cond_site]
    srt = proj.sort().values
    thr = float(srt[1] + srt[2]) / 2  # strictly between two sequences' projections
    expected = proj > thr
    assert 0 < int(expected.sum()) < len(TEXTS)
    enc = batch(tiny_lm, side="right")
    base = logits(tiny_lm, enc)
    spec = SteeringSpec(d, coeff=1.0, condition=Condition(cdir, cond_site, thr, above=True))
    with steer(tiny_lm, spec) as state:
        state.begin_sequence(attention_mask=enc["attention_mask"])
        got = logits(tiny_lm, enc)
    assert state.decisions is not None and state.decisions.tolist() == expected.tolist()
    for i in range(len(TEXTS)):
        assert torch.equal(got[i], base[i]) != bool(expected[i])
    with pytest.raises(ValueError, match="before every steered site"):
        with steer(
            tiny_lm,
            SteeringSpec(
                d,
                coeff=1.0,
                condition=Condition(
                    direction(tiny_lm, sites=("blocks.3.hook_resid_post",)),
                    "blocks.3.hook_resid_post",
                    0.0,
                ),
            ),
        ):
            pass


def test_two_threads_do_not_leak(tiny_lm):
    d = direction(tiny_lm)
    enc = batch(tiny_lm, side="left")
    alone_base = greedy(tiny_lm, enc, n=8).sequences
    with steer(tiny_lm, SteeringSpec(d, coeff=3.0)):
        alone_steered = greedy(tiny_lm, enc, n=8).sequences
    assert not torch.equal(alone_base, alone_steered)
    results: dict[str, list[torch.Tensor]] = {"base": [], "steered": []}
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker(kind: str) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                if kind == "steered":
                    with steer(tiny_lm, SteeringSpec(d, coeff=3.0)):
                        results[kind].append(greedy(tiny_lm, enc, n=8).sequences)
                else:
                    results[kind].append(greedy(tiny_lm, enc, n=8).sequences)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in ("base", "steered")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(s, alone_base) for s in results["base"])
    assert all(torch.equal(s, alone_steered) for s in results["steered"])
    assert leftover_hooks(tiny_lm.model) == []


def test_bad_specs(tiny_lm, embedded_lm):
    d = direction(tiny_lm)
    for kwargs, match in [
        ({"operator": "multiply"}, "operator must be one of"),
        ({"scale": "huge"}, "scale must be one of"),
        ({"positions": "middle"}, "positions must be one of"),
    ]:
        with (
            pytest.raises(ValueError, match=match),
            steer(tiny_lm, SteeringSpec(d, coeff=1.0, **kwargs)),
        ):
            pass
    no_stats = Direction(dict(d.vectors), tiny_lm.identity)
    with (
        pytest.raises(ValueError, match="calibrate"),
        steer(tiny_lm, SteeringSpec(no_stats, coeff=1.0)),
    ):
        pass
    from repe.errors import ArtifactMismatchError

    with pytest.raises(ArtifactMismatchError), steer(embedded_lm, SteeringSpec(d, coeff=1.0)):
        pass


# ---- scope: exactly the forward passes inside the steering, in the context that entered it ----------


def test_interleaved_streams_in_one_thread_each_yield_what_they_yield_alone(tiny_lm):
    """A baseline and a steered stream zipped in one thread: between the steered stream's steps, the
    caller's context is not steered, so the baseline stream is not steered either (and vice versa)."""
    from steering.generate import GenerationConfig, generate_stream

    d = direction(tiny_lm)
    spec = SteeringSpec(d, coeff=3.0)
    cfg = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    prompts = TEXTS[:2]
    alone_base = [s.token_ids for s in generate_stream(tiny_lm, prompts, None, cfg)]
    alone_steered = [s.token_ids for s in generate_stream(tiny_lm, prompts, spec, cfg)]
    assert alone_base != alone_steered
    both = list(
        zip(
            generate_stream(tiny_lm, prompts, spec, cfg),
            generate_stream(tiny_lm, prompts, None, cfg),
            strict=True,
        )
    )
    assert [s.token_ids for s, _ in both] == alone_steered
    assert [b.token_ids for _, b in both] == alone_base
    # a plain forward pass the caller makes between two steered steps is not steered
    enc = batch(tiny_lm)
    base = logits(tiny_lm, enc)
    stream = generate_stream(tiny_lm, prompts, spec, cfg)
    next(stream)
    assert torch.equal(logits(tiny_lm, enc), base)
    stream.close()
    assert leftover_hooks(tiny_lm.model) == []


def test_two_unrelated_batches_in_one_block(tiny_lm):
    """Two batches inside one ``with steer`` (positions='prompt'): each declared one gives what it
    gives alone; an undeclared one is refused with a clear error, never given the other's lengths."""
    d = direction(tiny_lm)
    spec = SteeringSpec(d, coeff=2.0, positions="prompt")
    a = batch(tiny_lm, ["Hello there", "Hi"], side="left")
    b = batch(tiny_lm, ["Hello there you", "Hi"], side="left")  # one token longer
    alone = {}
    for name, enc in (("a", a), ("b", b)):
        with steer(tiny_lm, spec) as state:
            state.begin_sequence(attention_mask=enc["attention_mask"])
            alone[name] = logits(tiny_lm, enc)
    with steer(tiny_lm, spec) as state:
        state.begin_sequence(attention_mask=a["attention_mask"])
        got_a = logits(tiny_lm, a)
        state.begin_sequence(attention_mask=b["attention_mask"])
        got_b = logits(tiny_lm, b)
    assert torch.equal(got_a, alone["a"]) and torch.equal(got_b, alone["b"])
    with steer(tiny_lm, spec) as state:
        state.begin_sequence(attention_mask=a["attention_mask"])
        logits(tiny_lm, a)
        with pytest.raises(ValueError, match="does not continue the declared sequence"):
            logits(tiny_lm, b)
    with steer(tiny_lm, spec), pytest.raises(ValueError, match="begin_sequence"):
        logits(tiny_lm, a)
    with steer(tiny_lm, spec) as state:
        state.begin_sequence(torch.tensor([3, 3, 3]))
        with pytest.raises(ValueError, match="3"):
            logits(tiny_lm, a)
    # 'all' and explicit indices need no declaration
    for positions in ("all", [0, 1]):
        with steer(tiny_lm, SteeringSpec(d, coeff=2.0, positions=positions)):
            logits(tiny_lm, a)
            logits(tiny_lm, b)


@pytest.mark.parametrize("how", ["to_thread", "copy_context", "tasks"])
def test_copied_contexts_never_share_sequence_state(tiny_lm, how):
    """Two contexts copied from the one that entered ``steer`` run at once, each with its own batch
    and its own declared sequence. Threads: a barrier inside the forward pass makes both declare and
    start before either reaches a steered site. asyncio tasks: both declare, then both run. Each gives
    what it gives alone."""
    import asyncio
    import concurrent.futures
    import contextvars

    d = direction(tiny_lm)
    spec = SteeringSpec(d, coeff=2.0, positions="prompt")
    encs = [
        batch(tiny_lm, ["Hello there", "Hi", "One more row"], side="left"),
        batch(tiny_lm, ["A different batch of two", "ok"], side="left"),
    ]
    alone = []
    for enc in encs:
        with steer(tiny_lm, spec) as state:
            state.begin_sequence(attention_mask=enc["attention_mask"])
            alone.append(logits(tiny_lm, enc))
    barrier = threading.Barrier(2, timeout=20)

    def wait(*_):
        barrier.wait()

    def run(state, enc):
        state.begin_sequence(attention_mask=enc["attention_mask"])
        return logits(tiny_lm, enc)

    async def task(state, enc):
        state.begin_sequence(attention_mask=enc["attention_mask"])
        await asyncio.sleep(0.01)  # the other task declares its sequence meanwhile
        return logits(tiny_lm, enc)

    with steer(tiny_lm, spec) as state:
        if how == "tasks":

            async def both_tasks():
                return await asyncio.gather(*(task(state, enc) for enc in encs))

            got = asyncio.run(both_tasks())
        else:
            gate = tiny_lm.layers[0].register_forward_pre_hook(wait)
            try:
                if how == "to_thread":

                    async def both():
                        return await asyncio.gather(
                            *(asyncio.to_thread(run, state, enc) for enc in encs)
                        )

                    got = asyncio.run(both())
                else:
                    with concurrent.futures.ThreadPoolExecutor(2) as pool:
                        futs = [
                            pool.submit(contextvars.copy_context().run, run, state, enc)
                            for enc in encs
                        ]
                        got = [f.result() for f in futs]
            finally:
                gate.remove()
    for g, want in zip(got, alone, strict=True):
        assert torch.equal(g, want)
