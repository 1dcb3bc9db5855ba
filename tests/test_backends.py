"""The transformer_lens and nnsight back-ends: parity with hf, no hooks left behind, no side effects.

Parity is relative, ``|a - b| <= 1e-4 * max|a|`` per site (residual values reach ~1e4 on SmolLM2).
"""

from __future__ import annotations

import sys
import threading

import pytest
import torch

import repe
from repe.backends import Backend, get_backend
from repe.backends.nnsight import NNsightBackend, get_nnsight_model
from repe.backends.transformer_lens import (
    TransformerLensBackend,
    get_bridge,
    shared_weights_view,
)
from repe.batching import TokenBatch, encode, make_batch
from repe.errors import MissingExtraError
from repe.models import LoadedModel, tiny_model
from repe.sites import Site, resolve_sites

BACKENDS = ["transformer_lens", "nnsight"]
KINDS = ("resid_pre", "attn_z", "attn_out", "mlp_out", "resid_post")
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "Paris is the capital of France and home to the Louvre museum.",
    "One two three",
    "Water boils at one hundred degrees Celsius at sea level.",
]
EMBEDDED_TEXTS = ["Honesty matters.", "Hi", "The capital of France is Paris."]


def sites_at(layers: list[int]) -> list[str]:
    return [Site(layer, kind).name for layer in layers for kind in KINDS]


TINY_SITES = sites_at([0, 2, 3])  # the tiny model has 4 blocks: first, middle, last
EMBEDDED_SITES = sites_at([0, 29]) + ["blocks.12.hook_resid_post"]
EMBEDDED_CONFIGS = [("left", "all"), ("right", "last"), ("left", "last"), ("right", "all")]


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp(min=1e-6))


def assert_same(ref: repe.ActivationSet, got: repe.ActivationSet, what: str) -> None:
    assert got.sites == ref.sites
    for site in ref.sites:
        a, a_off = ref.rows(site)
        b, b_off = got.rows(site)
        assert torch.equal(a_off, b_off), (what, site)
        assert a.shape == b.shape, (what, site, a.shape, b.shape)
        assert max_rel_diff(a, b) <= 1e-4, (what, site, max_rel_diff(a, b))


def hook_snapshot(model: torch.nn.Module) -> dict[str, tuple[list[int], list[int]]]:
    return {
        name: (list(m._forward_hooks), list(m._forward_pre_hooks))
        for name, m in model.named_modules()
    }


def assert_no_hooks(model: torch.nn.Module) -> None:
    left = {n: h for n, h in hook_snapshot(model).items() if h[0] or h[1]}
    assert left == {}, f"hooks left on {sorted(left)}"


def one_batch(lm: LoadedModel, texts: list[str], side: str = "right") -> TokenBatch:
    return make_batch(encode(lm.tokenizer, texts), lm.tokenizer.pad_token_id, side)  # type: ignore[arg-type]


@pytest.fixture
def fresh_lm(tiny_lm: LoadedModel) -> LoadedModel:
    """A tiny model of its own, for tests that change or instrument it (the tokenizer is shared)."""
    return tiny_model(tokenizer=tiny_lm.tokenizer, seed=1)


# ---- parity with hf ---------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["all", "last"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_tiny(tiny_lm: LoadedModel, backend: str, padding_side: str, positions: str) -> None:
    kw = {"positions": positions, "batch_size": 3, "padding_side": padding_side}
    ref = repe.capture(tiny_lm, TEXTS, TINY_SITES, backend="hf", **kw)
    got = repe.capture(tiny_lm, TEXTS, TINY_SITES, backend=backend, **kw)
    assert got.meta.backend == backend
    assert_same(ref, got, f"{backend} {padding_side} {positions}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_batch_equals_unpadded(tiny_lm: LoadedModel, backend: str) -> None:
    alone = repe.capture(tiny_lm, TEXTS, TINY_SITES, positions="all", batch_size=1, backend=backend)
    padded = repe.capture(
        tiny_lm,
        TEXTS,
        TINY_SITES,
        positions="all",
        batch_size=5,
        padding_side="left",
        backend=backend,
    )
    assert_same(alone, padded, backend)


@pytest.fixture(scope="module")
def embedded_refs(embedded_lm: LoadedModel) -> dict[tuple[str, str], repe.ActivationSet]:
    """hf reference captures; one padded batch of three texts of different lengths each."""
    return {
        (side, pos): repe.capture(
            embedded_lm,
            EMBEDDED_TEXTS,
            EMBEDDED_SITES,
            positions=pos,
            batch_size=3,
            padding_side=side,
        )
        for side, pos in EMBEDDED_CONFIGS
    }


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_embedded(
    embedded_lm: LoadedModel,
    embedded_refs: dict[tuple[str, str], repe.ActivationSet],
    backend: str,
) -> None:
    for (side, pos), ref in embedded_refs.items():
        got = repe.capture(
            embedded_lm,
            EMBEDDED_TEXTS,
            EMBEDDED_SITES,
            positions=pos,
            batch_size=3,
            padding_side=side,
            backend=backend,
        )
        assert_same(ref, got, f"{backend} {side} {pos}")


# ---- hooks ----------------------------------------------------------------------------------------


class SinkFailure(RuntimeError):
    pass


def failing_sink(site: Site, acts: torch.Tensor) -> None:
    raise SinkFailure(f"sink failed at {site.name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_hooks_left(tiny_lm: LoadedModel, backend: str) -> None:
    before = hook_snapshot(tiny_lm.model)
    repe.capture(tiny_lm, TEXTS, TINY_SITES, backend=backend, batch_size=2)
    assert hook_snapshot(tiny_lm.model) == before
    assert_no_hooks(tiny_lm.model)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_hooks_left_after_sink_raises(tiny_lm: LoadedModel, backend: str) -> None:
    be = get_backend(backend)
    sites = resolve_sites(TINY_SITES, tiny_lm.n_layers)
    batch = one_batch(tiny_lm, TEXTS[:3])
    before = hook_snapshot(tiny_lm.model)
    bridge = get_bridge(tiny_lm)  # the bridge keeps hooks of its own on its view: none may be added
    bridge_before = hook_snapshot(bridge)
    with pytest.raises(SinkFailure, match="sink failed at blocks.0"):
        be.run(tiny_lm, batch, sites, failing_sink)
    assert hook_snapshot(tiny_lm.model) == before
    assert_no_hooks(tiny_lm.model)
    assert hook_snapshot(bridge) == bridge_before
    assert [n for n, hp in bridge.hook_dict.items() if hp._forward_hooks] == []
    # and the back-end still works afterwards
    ref = repe.capture(tiny_lm, TEXTS, TINY_SITES, backend="hf", batch_size=3)
    assert_same(
        ref, repe.capture(tiny_lm, TEXTS, TINY_SITES, backend=backend, batch_size=3), backend
    )


# ---- the shared model is left alone ----------------------------------------------------------------


def model_state(lm: LoadedModel) -> tuple[object, ...]:
    m = lm.model
    return (
        list(m.state_dict()),
        [(n, type(x).__name__) for n, x in m.named_modules()],
        [n for n, x in m.named_modules() if "forward" in vars(x)],  # instance-level patches
        m.config._attn_implementation,
        lm.tokenizer.padding_side,
        lm.tokenizer.pad_token,
    )


def test_booting_leaves_the_model_alone(fresh_lm: LoadedModel) -> None:
    """TransformerBridge rewires the module tree and forces eager attention, nnsight instruments every
    module: both work on a view that shares the weights, so hf numbers are bit-identical after."""
    sites = TINY_SITES
    state = model_state(fresh_lm)
    before = repe.capture(
        fresh_lm, TEXTS, sites, positions="all", batch_size=5, padding_side="left"
    )
    for backend in BACKENDS:
        repe.capture(fresh_lm, TEXTS, sites, backend=backend)
    assert model_state(fresh_lm) == state
    after = repe.capture(fresh_lm, TEXTS, sites, positions="all", batch_size=5, padding_side="left")
    for site in sites:
        assert torch.equal(before.rows(site)[0], after.rows(site)[0]), site
    assert get_bridge(fresh_lm).original_model is not fresh_lm.model


def test_view_shares_weights(fresh_lm: LoadedModel) -> None:
    view = shared_weights_view(fresh_lm.model)
    assert view is not fresh_lm.model
    assert view.config is not fresh_lm.model.config
    pairs = zip(fresh_lm.model.named_parameters(), view.named_parameters(), strict=True)
    assert all(a is b for (_, a), (_, b) in pairs)
    bufs = zip(fresh_lm.model.buffers(), view.buffers(), strict=True)
    assert all(a is b for a, b in bufs)
    mods = zip(fresh_lm.model.modules(), view.modules(), strict=True)
    assert all(a is not b for a, b in mods)


def test_in_place_weight_edits_are_seen(fresh_lm: LoadedModel) -> None:
    for backend in BACKENDS:  # build the cached bridge / nnsight model first
        repe.capture(fresh_lm, TEXTS[:2], "blocks.0.hook_resid_post", backend=backend)
    with torch.no_grad():
        fresh_lm.layers[1].mlp.down_proj.weight.mul_(3.0)
    ref = repe.capture(fresh_lm, TEXTS, TINY_SITES, batch_size=3)
    for backend in BACKENDS:
        assert_same(
            ref, repe.capture(fresh_lm, TEXTS, TINY_SITES, batch_size=3, backend=backend), backend
        )


def test_cache_rebuilt_when_tensors_are_replaced(fresh_lm: LoadedModel) -> None:
    bridge, ns = get_bridge(fresh_lm), get_nnsight_model(fresh_lm)
    assert get_bridge(fresh_lm) is bridge and get_nnsight_model(fresh_lm) is ns
    layer = fresh_lm.layers[2].mlp.up_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach() * 2.0, requires_grad=False)
    assert get_bridge(fresh_lm) is not bridge and get_nnsight_model(fresh_lm) is not ns
    ref = repe.capture(fresh_lm, TEXTS, TINY_SITES, batch_size=3)
    for backend in BACKENDS:
        assert_same(
            ref, repe.capture(fresh_lm, TEXTS, TINY_SITES, batch_size=3, backend=backend), backend
        )


def test_model_instrumented_by_nnsight_still_bridges(fresh_lm: LoadedModel) -> None:
    """A user may wrap lm.model with nnsight themselves; the view must not inherit its controllers."""
    import nnsight

    nnsight.TransformersModel(fresh_lm.model, tokenizer=fresh_lm.tokenizer, task="text-generation")
    fresh_lm.tokenizer.padding_side = "right"  # the pipeline set it on the shared tokenizer
    assert any("forward" in vars(m) for m in fresh_lm.model.modules())
    view = shared_weights_view(fresh_lm.model)
    assert not any("forward" in vars(m) or "__nnsight__" in vars(m) for m in view.modules())
    ref = repe.capture(fresh_lm, TEXTS, TINY_SITES, batch_size=3)
    got = repe.capture(fresh_lm, TEXTS, TINY_SITES, batch_size=3, backend="transformer_lens")
    assert_same(ref, got, "transformer_lens over an nnsight-instrumented model")


# ---- construction and errors ----------------------------------------------------------------------


def test_backends_satisfy_the_protocol() -> None:
    for name, cls in (("transformer_lens", TransformerLensBackend), ("nnsight", NNsightBackend)):
        be = get_backend(name)
        assert isinstance(be, cls) and be.name == name
        assert isinstance(be, Backend)


def test_nnsight_remote_flag_reaches_the_trace(
    tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``remote=True`` hands the trace to nnsight's ``RemoteBackend`` (NDIF), configured from the
    environment (tests/test_nnsight_remote.py runs whole requests against a fake NDIF)."""
    import dataclasses

    import nnsight.modeling.huggingface as hf_models
    from nnsight.intervention.backends.remote import RemoteBackend

    assert NNsightBackend().remote is False
    hub_lm = dataclasses.replace(tiny_lm, source="test-org/tiny")  # as if loaded by its hub id
    monkeypatch.setenv("NDIF_API_KEY", "key-123")
    monkeypatch.setitem(hf_models._ID_CACHE, "test-org/tiny", "test-org/tiny")
    model = get_nnsight_model(hub_lm)
    seen: dict[str, object] = {}

    class Refused(Exception):
        pass

    def spy(self: object, *args: object, **kwargs: object) -> object:
        seen.update(kwargs)
        raise Refused

    monkeypatch.setattr(type(model), "trace", spy)
    with pytest.raises(Refused):
        NNsightBackend(remote=True).run(
            hub_lm, one_batch(hub_lm, TEXTS[:2]), [Site(0, "resid_post")], failing_sink
        )
    backend = getattr(seen["backend"], "inner", None)
    assert isinstance(backend, RemoteBackend) and backend.blocking
    assert backend.api_key == "key-123"
    assert '"repo_id": "test-org/tiny"' in backend.model_key
    assert {"input_ids", "attention_mask", "position_ids"} <= set(seen)


@pytest.mark.parametrize(
    ("backend", "module"), [("transformer_lens", "transformer_lens"), ("nnsight", "nnsight")]
)
def test_missing_extra_names_it(
    fresh_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch, backend: str, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtraError, match=r"install the 'backends' extra"):
        repe.capture(fresh_lm, TEXTS[:1], "blocks.0.hook_resid_post", backend=backend)


@pytest.mark.parametrize("backend", [TransformerLensBackend, NNsightBackend])
def test_running_to_the_end_gives_the_same_numbers(tiny_lm: LoadedModel, backend: type) -> None:
    sites = resolve_sites(["blocks.0.attn.hook_z", "blocks.1.hook_resid_post"], tiny_lm.n_layers)
    batch = one_batch(tiny_lm, TEXTS[:3], "left")
    got: dict[bool, dict[str, torch.Tensor]] = {True: {}, False: {}}
    for stop in (True, False):
        backend(stop_early=stop).run(
            tiny_lm, batch, sites, lambda s, t, d=got[stop]: d.__setitem__(s.name, t.clone())
        )
    for site in sites:
        assert torch.equal(got[True][site.name], got[False][site.name]), site.name
    assert got[True]["blocks.0.attn.hook_z"].shape == (3, batch.input_ids.shape[1], 4, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_captures_do_not_mix(tiny_lm: LoadedModel, backend: str) -> None:
    """Runs on one model are serialised (hook points and the trace are shared state of the cached
    bridge / nnsight model), so two threads never receive each other's activations."""
    sites = ["blocks.0.hook_resid_post", "blocks.3.hook_resid_post"]
    jobs = [[TEXTS[0]] * 4, [TEXTS[1]] * 4]
    refs = [repe.capture(tiny_lm, texts, sites, batch_size=1) for texts in jobs]
    errors: list[str] = []

    def work(texts: list[str], ref: repe.ActivationSet) -> None:
        try:
            for _ in range(3):
                got = repe.capture(tiny_lm, texts, sites, batch_size=1, backend=backend)
                for s in sites:
                    if got[s].shape != ref[s].shape or max_rel_diff(ref[s], got[s]) > 1e-4:
                        errors.append(f"{s} differs")
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=job) for job in zip(jobs, refs, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
