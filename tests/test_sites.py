"""Pin every row of the site table in repe/sites.py against the back-ends themselves.

Each row is checked on the tiny random model and on the embedded SmolLM2 (integration): HF
``output_hidden_states`` index, HF module hook, TransformerLens hook name, nnsight path, llama.cpp tensor
name; then the parse / resolve errors.
"""

from __future__ import annotations

import nnsight
import pytest
import torch

from repe.backends.hf import HFBackend
from repe.backends.nnsight import get_nnsight_model
from repe.backends.transformer_lens import get_bridge
from repe.batching import TokenBatch, encode, make_batch
from repe.errors import SiteError
from repe.models import LoadedModel
from repe.sites import Site, all_sites, parse_site, resolve_sites

TEXTS = ["The capital of France is Paris, and the river is the Seine.", "Hi there"]
KINDS = ("resid_pre", "attn_z", "attn_out", "mlp_out", "resid_post")


@pytest.fixture(params=["tiny_lm", pytest.param("embedded_lm", marks=pytest.mark.integration)])
def lm(request: pytest.FixtureRequest) -> LoadedModel:
    return request.getfixturevalue(request.param)


def layers_of(lm: LoadedModel) -> list[int]:
    n = lm.n_layers
    return sorted({0, 1, n // 2, n - 2, n - 1})


def batch_of(lm: LoadedModel) -> TokenBatch:
    return make_batch(encode(lm.tokenizer, TEXTS), lm.tokenizer.pad_token_id, "right")


def real(t: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Only the real (non-padding) token rows of a [B, T, ...] tensor."""
    return t[batch.attention_mask.bool()]


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return bool((a - b).abs().max() <= rel * a.abs().max().clamp(min=1e-6))


def hf_capture(lm: LoadedModel, batch: TokenBatch, sites: list[Site]) -> dict[Site, torch.Tensor]:
    out: dict[Site, torch.Tensor] = {}
    HFBackend(stop_early=False).run(lm, batch, sites, lambda s, t: out.__setitem__(s, t.clone()))
    return out


def hidden_states(lm: LoadedModel, batch: TokenBatch) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        out = lm.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            output_hidden_states=True,
            use_cache=False,
        )
    return tuple(h.clone() for h in out.hidden_states)


# ---- HF output_hidden_states index and HF module hooks --------------------------------------------


def test_residual_rows_match_hf_hidden_states(lm: LoadedModel) -> None:
    n = lm.n_layers
    batch = batch_of(lm)
    hs = hidden_states(lm, batch)
    assert len(hs) == n + 1
    sites = [Site(layer, kind) for layer in range(n) for kind in ("resid_pre", "resid_post")]
    acts = hf_capture(lm, batch, sites)
    for site in sites:
        idx = site.hf_hidden_state_index(n)
        if site.kind == "resid_pre":
            assert idx == site.layer
        elif site.layer < n - 1:
            assert idx == site.layer + 1
        else:
            assert idx is None  # the last block's output is only reachable by a module hook
        if idx is not None:
            assert torch.equal(real(acts[site], batch), real(hs[idx], batch)), site.name


def test_last_block_output_is_not_the_last_hidden_state(lm: LoadedModel) -> None:
    """HF applies the final norm to hidden_states[n_layers]; the module hook sees the raw residual."""
    n = lm.n_layers
    batch = batch_of(lm)
    hs = hidden_states(lm, batch)
    last = Site(n - 1, "resid_post")
    raw = real(hf_capture(lm, batch, [last])[last], batch)
    final = real(hs[n], batch)
    assert not close(final, raw, rel=1e-2), (
        "the last block's hook should differ from hidden_states[n]"
    )
    with torch.inference_mode():
        normed = lm.backbone.norm(raw)  # type: ignore[operator]
    assert close(final, normed)


def test_attention_and_mlp_hooks_decompose_the_block(lm: LoadedModel) -> None:
    """The attn_z / attn_out / mlp_out module hooks are the right modules: in a Llama block
    resid_post = resid_pre + attn_out + mlp_out, and o_proj(attn_z) = attn_out."""
    batch = batch_of(lm)
    sites = [Site(layer, kind) for layer in layers_of(lm) for kind in KINDS]
    acts = {s: real(t, batch) for s, t in hf_capture(lm, batch, sites).items()}
    for layer in layers_of(lm):
        a = {kind: acts[Site(layer, kind)] for kind in KINDS}
        assert close(a["resid_post"], a["resid_pre"] + a["attn_out"] + a["mlp_out"]), layer
        z = a["attn_z"]
        assert z.shape[-2:] == (
            lm.model.config.num_attention_heads,
            lm.d_model // lm.model.config.num_attention_heads,
        )
        with torch.inference_mode():
            o = lm.layers[layer].self_attn.o_proj(z.flatten(-2))
        assert close(a["attn_out"], o), layer


# ---- TransformerLens hook names --------------------------------------------------------------------


def test_transformer_lens_names_are_bridge_hook_points(lm: LoadedModel) -> None:
    bridge = get_bridge(lm)
    for site in all_sites(lm.n_layers):
        assert site.transformer_lens_name == site.name
        assert site.transformer_lens_name in bridge.hook_dict, site.name


def test_transformer_lens_cache_matches_hf(lm: LoadedModel) -> None:
    """The bridge's own run_with_cache, under the canonical names, equals the hf module hooks."""
    batch = batch_of(lm)
    sites = [Site(layer, kind) for layer in layers_of(lm) for kind in KINDS]
    ref = hf_capture(lm, batch, sites)
    bridge = get_bridge(lm)
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(
            batch.input_ids,
            names_filter=[s.transformer_lens_name for s in sites],
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            return_type=None,
        )
    for site in sites:
        got = cache[site.transformer_lens_name].reshape(ref[site].shape)
        assert close(real(ref[site], batch), real(got, batch)), site.name


# ---- nnsight paths -----------------------------------------------------------------------------------


def test_nnsight_paths_match_hf(lm: LoadedModel) -> None:
    batch = batch_of(lm)
    sites = [Site(layer, kind) for layer in layers_of(lm) for kind in KINDS]  # execution order
    ref = hf_capture(lm, batch, sites)
    model = get_nnsight_model(lm)
    blocks = lm.layers_template.split(".{L}")[0]
    with torch.inference_mode():
        with model.trace(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ):
            values = nnsight.save([])
            for site in sites:
                sub, which = site.nnsight_path
                envoy = model.get(blocks)[site.layer]
                if sub:
                    envoy = envoy.get(sub)
                values.append(getattr(envoy, which).save())
    for site, value in zip(sites, values, strict=True):
        got = value[0] if isinstance(value, tuple) else value
        assert isinstance(got, torch.Tensor), (site.name, type(value))
        got = got.reshape(ref[site].shape)
        assert close(real(ref[site], batch), real(got, batch)), site.name


# ---- llama.cpp control-vector tensor names ---------------------------------------------------------


def test_llama_cpp_tensor_names(lm: LoadedModel) -> None:
    """The names the table gives. That ``direction.L`` really is block L's output in llama.cpp is
    pinned against llama.cpp's own loader in tests/test_llama_server.py."""
    for site in all_sites(lm.n_layers):
        if site.kind == "resid_post" and site.layer >= 1:
            assert site.llama_cpp_tensor == f"direction.{site.layer}"
        else:
            assert site.llama_cpp_tensor is None, site.name
    assert Site(0, "resid_post").llama_cpp_tensor is None  # llama.cpp rejects direction.0


# ---- parse / resolve errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "blocks.1.hook_resid_mid",
        "resid_post",
        "blocks.x.hook_resid_post",
        "blocks.-1.hook_resid_pre",
        "layers.1.hook_resid_post",
        "",
    ],
)
def test_unknown_site_name(name: str) -> None:
    with pytest.raises(SiteError, match=r"unknown site .*valid forms are"):
        parse_site(name)
    with pytest.raises(SiteError, match="unknown site"):
        resolve_sites([name], 4)


def test_layer_out_of_range() -> None:
    with pytest.raises(SiteError, match=r"out of range: the model has 4 blocks \(layers 0\.\.3\)"):
        parse_site("blocks.4.hook_resid_post", n_layers=4)
    with pytest.raises(SiteError, match="blocks.30.hook_mlp_out' is out of range"):
        resolve_sites(["blocks.0.hook_resid_pre", "blocks.30.hook_mlp_out"], 30)
    with pytest.raises(SiteError, match="out of range"):
        resolve_sites(Site(7, "attn_z"), 4)


def test_empty_site_list() -> None:
    with pytest.raises(SiteError, match="no sites requested"):
        resolve_sites([], 4)


@pytest.mark.parametrize("pattern", ["blocks.*.hook_nothing", "blocks.9*.hook_resid_post", "mlp*"])
def test_glob_matching_nothing(pattern: str) -> None:
    with pytest.raises(
        SiteError, match=rf"site pattern '{pattern.replace('*', '[*]')}' matched no site"
    ):
        resolve_sites(pattern, 4)


def test_predicate_matching_nothing() -> None:
    with pytest.raises(SiteError, match="predicate matched no site"):
        resolve_sites(lambda name: False, 4)


def test_site_errors_are_value_errors() -> None:
    """SiteError is a ValueError, so callers that catch bad arguments generically still see it."""
    with pytest.raises(ValueError):
        parse_site("nonsense")


def test_resolve_sorts_and_deduplicates() -> None:
    sites = resolve_sites(
        ["blocks.2.hook_resid_post", "blocks.0.hook_resid_pre", "blocks.*.hook_resid_post"], 3
    )
    assert [s.name for s in sites] == [
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
        "blocks.2.hook_resid_post",
    ]
