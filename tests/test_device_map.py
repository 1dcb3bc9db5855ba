"""Big models on several devices: ``load_model(device_map=..., max_memory=..., offload_folder=...)``.

A tiny random Llama is saved to a folder and loaded plainly and three dispatched ways (accelerate's
hooks on its modules): a hand-written map that sends the tied embeddings and every other block to disk,
``device_map="auto"`` under a CPU memory limit that leaves the embeddings in memory and offloads the
later blocks, and everything on disk. Offloaded weights sit on ``meta`` between forward passes, so
``next(model.parameters()).device`` is not where anything runs. Everything the workbench does to a
running model (capture, every steering operator, conditions, generation, adapters, Aligner tokens, an
evaluation) must give the plain model's numbers, leave accelerate's hooks and offloading in place and
leave no hook of ours behind; the model identity must not change.

This machine has one device, the CPU; what a multi-GPU map adds (each block on its own device) is
pinned by unit tests that pretend a block runs on ``meta``: the tensors for that block must go there,
and tensors made from the inputs (masks) must follow the activation to its device.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from repe.capture import capture
from repe.datasets import CAAItem
from repe.directions import Direction
from repe.hooks import leftover_hooks
from repe.models import LoadedModel, identity_of, is_offloaded, load_model
from repe.responses import Response, batch_inputs, hidden_on_responses
from steering import Condition, LowRankAdapter, SteeringSpec, steer
from steering.aligner import Aligner
from steering.backends import steered_logits
from steering.evaluation.cloze import cloze_eval_specs
from steering.evaluation.costs import NeutralCosts
from steering.generate import GenerationConfig, generate
from steering.hooks import TokenInfo, decide
from steering.operators import OPERATORS
from steering.spec import resolve

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = [
    "The weather today is",
    "Hi",
    "A long sentence about the history of rivers and the people who lived by them",
]
PROMPTS = ["Tell me about rivers.", "Hello!"]
# every steerable kind, on blocks kept in memory (0, 2) and offloaded (1, 3), the last block included
SITES = [
    "blocks.0.hook_resid_post",
    "blocks.1.hook_resid_pre",
    "blocks.1.hook_attn_out",
    "blocks.2.hook_mlp_out",
    "blocks.3.hook_resid_pre",
    "blocks.3.hook_resid_post",
]
CAPTURE_SITES = [
    "blocks.*.hook_resid_pre",
    "blocks.*.hook_resid_post",
    "blocks.*.attn.hook_z",
    "blocks.*.hook_attn_out",
    "blocks.*.hook_mlp_out",
]
CPU = torch.device("cpu")
META = torch.device("meta")

# the tied embeddings and blocks 1 and 3 on disk, the rest in memory
MIXED = {
    "model.embed_tokens": "disk",
    "lm_head": "disk",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.layers.3": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
}


# ---- the models ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tiny_lm: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    model: Any = tiny_lm.model
    model.save_pretrained(path)
    tiny_lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def plain(folder: Path) -> LoadedModel:
    return load_model(folder)


def _load(folder: Path, how: str) -> LoadedModel:
    off = folder.parent / f"{folder.name}-offload-{how}"
    if how == "mixed":
        return load_model(folder, device_map=MIXED, offload_folder=off)
    if how == "disk":
        return load_model(folder, device_map={"": "disk"}, offload_folder=off)
    # "auto": room for the embeddings (tied: one tensor) and about one block, the rest to disk
    hf: Any = load_model(folder).model
    emb = hf.get_input_embeddings().weight
    limit = int(emb.numel() * emb.element_size() * 1.03)
    return load_model(folder, device_map="auto", max_memory={"cpu": limit}, offload_folder=off)


@pytest.fixture(scope="module", params=["mixed", "auto", "disk"])
def offloaded(request: pytest.FixtureRequest, folder: Path) -> LoadedModel:
    return _load(folder, request.param)


def _offloaded_modules(lm: LoadedModel) -> set[str]:
    return {
        name
        for name, m in lm.model.named_modules()
        if any(getattr(h, "offload", False) for h in _hooks(m))
    }


def _hooks(m: torch.nn.Module) -> list[Any]:
    hook = getattr(m, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", None) or [hook])


def assert_intact(lm: LoadedModel) -> None:
    """accelerate's hooks are all there and its offloaded weights are out of memory again; no hook of
    ours is left."""
    assert leftover_hooks(lm.model) == []
    mods = dict(lm.model.named_modules())
    weights = [p for name in _offloaded_modules(lm) for p in mods[name].parameters(recurse=False)]
    assert weights, "nothing is offloaded"
    assert all(p.device == META for p in weights), "offloaded weights were pulled into memory"


def direction(lm: LoadedModel, sites: list[str] = SITES, seed: int = 0) -> Direction:
    g = torch.Generator().manual_seed(seed)
    vecs = {s: torch.randn(lm.d_model, generator=g) for s in sites}
    stats = {s: {"resid_norm": 10.0} for s in sites}
    return Direction(vecs, lm.identity, name="d", stats=stats).normalized()


def _inputs(lm: LoadedModel) -> dict[str, torch.Tensor]:
    enc = lm.tokenizer(TEXTS, return_tensors="pt", padding=True)
    return {k: enc[k].to(lm.device) for k in ("input_ids", "attention_mask")}


def _logits(lm: LoadedModel, intervention: Any = None) -> torch.Tensor:
    with torch.inference_mode():
        if intervention is None:
            return lm.model(**_inputs(lm)).logits
        with steer(lm, intervention):
            return lm.model(**_inputs(lm)).logits


# ---- loading -------------------------------------------------------------------------------------
def test_blocks_are_offloaded_and_inputs_go_where_the_embedding_runs(
    offloaded: LoadedModel,
) -> None:
    hf: Any = offloaded.model
    values = set(hf.hf_device_map.values())
    assert "disk" in values
    assert any(p.device == META for p in offloaded.model.parameters())
    assert offloaded.input_device == CPU and offloaded.device == CPU  # not meta
    assert [offloaded.layer_device(i) for i in range(offloaded.n_layers)] == [CPU] * 4
    assert is_offloaded(offloaded.model)
    assert_intact(offloaded)


def test_identity_is_the_plain_loads_and_artifacts_travel(
    tiny_lm: LoadedModel, plain: LoadedModel, offloaded: LoadedModel, tmp_path: Path
) -> None:
    assert offloaded.identity.weights_hash is not None
    assert offloaded.identity == plain.identity
    assert plain.identity.weights_hash == tiny_lm.identity.weights_hash
    direction(plain).save(tmp_path / "d")
    Direction.load(tmp_path / "d", offloaded)  # made on one load, accepted by the other
    assert_intact(offloaded)


def test_identity_reads_offloaded_weights_from_any_offload_store(
    plain: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights offloaded to accelerate's own files (not slices of the checkpoint's safetensors, e.g.
    from a .bin checkpoint or CPU offload beside a GPU) are read through its weights map."""
    lm = _load(Path(plain.source), "mixed")
    mods = dict(lm.model.named_modules())
    plain_mods = dict(plain.model.named_modules())
    for name in _offloaded_modules(lm):
        if not list(mods[name].parameters(recurse=False)):
            continue
        (hook,) = _hooks(mods[name])
        own = {k: v.clone() for k, v in plain_mods[name].named_parameters(recurse=False)}
        monkeypatch.setattr(hook, "weights_map", own)  # a plain mapping: no index, no files
    assert identity_of(lm.model, lm.identity.name) == plain.identity
    monkeypatch.undo()
    del mods["model.layers.1.self_attn.q_proj"]._hf_hook  # a meta weight, nowhere to read it
    assert identity_of(lm.model, "x").weights_hash is None


def test_placement_arguments_that_cannot_work_say_so(folder: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        load_model(folder, device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="max_memory= needs a device_map"):
        load_model(folder, max_memory={"cpu": "1GiB"})
    with pytest.raises(ValueError, match="offload_folder= needs a device_map"):
        load_model(folder, offload_folder=folder / "off")
    with pytest.raises(ValueError, match="only shapes an automatic device_map"):
        load_model(folder, device_map=MIXED, max_memory={"cpu": "1GiB"})
    with pytest.raises(ValueError, match="must be bytes"):
        load_model(folder, device_map="auto", max_memory={"cpu": -5})
    with pytest.raises(ValueError, match="pass offload_folder="):
        load_model(folder, device_map=MIXED)
    with pytest.raises(ValueError, match="device_map must be one of"):
        load_model(folder, device_map={})
    split = {**MIXED, "lm_head": "cpu"}  # the tied output embedding apart from the input one
    with pytest.raises(ValueError, match="tie_word_embeddings.*'model.embed_tokens' and 'lm_head'"):
        load_model(folder, device_map=split, offload_folder=folder / "off")
    partial = {"model.embed_tokens": "cpu", "model.layers": "disk", "lm_head": "cpu"}  # no norm
    with pytest.raises(ValueError, match="with device_map=.*model.norm"):  # transformers' refusal
        load_model(folder, device_map=partial, offload_folder=folder / "off")


# ---- capture and steering --------------------------------------------------------------------------
def test_capture_gives_the_plain_models_activations(
    plain: LoadedModel, offloaded: LoadedModel
) -> None:
    want = capture(plain, TEXTS, CAPTURE_SITES, positions="all")
    got = capture(offloaded, TEXTS, CAPTURE_SITES, positions="all")
    assert want.sites == got.sites and len(want.sites) == 20
    for site in want.sites:
        (g_rows, g_off), (w_rows, w_off) = got.rows(site), want.rows(site)
        assert torch.equal(g_off, w_off) and torch.equal(g_rows, w_rows), site
    assert_intact(offloaded)


def test_every_operator_steers_like_on_the_plain_model(
    plain: LoadedModel, offloaded: LoadedModel
) -> None:
    base = steered_logits(plain, None, TEXTS)
    assert torch.equal(steered_logits(offloaded, None, TEXTS), base)
    for op in OPERATORS:
        for positions in ("all", (0, 2), "prompt"):
            spec = SteeringSpec(direction(plain), coeff=0.5, operator=op, positions=positions)
            want = steered_logits(plain, spec, TEXTS)
            assert (want - base).abs().max() > 0.1, (op, positions)
            got = steered_logits(offloaded, spec, TEXTS)
            assert torch.equal(got, want), (op, positions)
    assert_intact(offloaded)


def test_conditional_steering_decides_like_on_the_plain_model(
    plain: LoadedModel, offloaded: LoadedModel
) -> None:
    cond_site = "blocks.1.hook_resid_post"  # an offloaded block
    proj = (
        capture(plain, TEXTS, cond_site, positions="mean")[cond_site]
        @ direction(plain, [cond_site], seed=5)[cond_site]
    )
    srt = proj.sort().values
    thr = float(srt[0] + srt[1]) / 2  # some sequences pass, some do not
    sites = ["blocks.2.hook_resid_post", "blocks.3.hook_mlp_out"]
    cond = Condition(direction(plain, [cond_site], seed=5), cond_site, thr, above=True)
    spec = SteeringSpec(direction(plain, sites), coeff=1.0, sites=sites, condition=cond)
    out = {}
    for name, lm in (("plain", plain), ("offloaded", offloaded)):
        inputs = _inputs(lm)
        with torch.inference_mode(), steer(lm, spec) as state:
            state.begin_sequence(attention_mask=inputs["attention_mask"])
            out[name] = (lm.model(**inputs).logits, state.decisions)
    decided, want = out["offloaded"][1], out["plain"][1]
    assert want is not None and decided is not None and 0 < int(want.sum()) < len(TEXTS)
    assert torch.equal(decided, want)
    assert torch.equal(out["offloaded"][0], out["plain"][0])
    assert_intact(offloaded)


def test_generation_gives_the_same_tokens(plain: LoadedModel, offloaded: LoadedModel) -> None:
    cfg = GenerationConfig(max_new_tokens=5)
    sampled = GenerationConfig(max_new_tokens=5, do_sample=True, seed=3)
    d = direction(plain)
    for spec, config in (
        (None, cfg),
        (SteeringSpec(d, coeff=0.8), cfg),
        (SteeringSpec(d, coeff=0.8, positions="generated"), cfg),
        (SteeringSpec(d, coeff=0.8, operator="ablate_add", positions="assistant"), sampled),
    ):
        want = generate(plain, PROMPTS, spec, config)
        assert generate(offloaded, PROMPTS, spec, config) == want, spec
    assert_intact(offloaded)


# ---- learned interventions -----------------------------------------------------------------------
def _adapter(lm: LoadedModel) -> LowRankAdapter:
    ad = LowRankAdapter.init(lm, [0, 1, 3], rank=4, alpha=8.0, seed=1)
    g = torch.Generator().manual_seed(2)
    for k in sorted(ad.b):
        ad.b[k] = (torch.randn(ad.b[k].shape, generator=g) * 0.5).to(ad.b[k].device)
    return ad


def test_an_adapter_applies_and_trains_like_on_the_plain_model(
    plain: LoadedModel, offloaded: LoadedModel
) -> None:
    fresh = LowRankAdapter.init(offloaded, [0, 1, 3], rank=4, alpha=8.0, seed=1)  # made on it
    ref = LowRankAdapter.init(plain, [0, 1, 3], rank=4, alpha=8.0, seed=1)
    for k in ref.a:
        assert fresh.a[k].device == CPU and torch.equal(fresh.a[k], ref.a[k])
    ad = _adapter(plain)
    base = _logits(plain)
    want = _logits(plain, ad)
    assert (want - base).abs().max() > 0.1
    assert torch.equal(_logits(offloaded, ad), want)
    # gradients reach the adapter through offloaded blocks as through plain ones
    grads = []
    for lm in (plain, offloaded):
        for p in ad.parameters():
            p.grad = None
            p.requires_grad_(True)
        with steer(lm, ad):
            lm.model(**_inputs(lm)).logits.float().square().mean().backward()
        grads.append([p.grad.clone() for p in ad.parameters()])  # type: ignore[union-attr]
        for p in ad.parameters():
            p.requires_grad_(False)
            p.grad = None
    for g_plain, g_off in zip(*grads, strict=True):
        assert g_plain.abs().sum() > 0
        torch.testing.assert_close(g_off, g_plain, rtol=1e-5, atol=1e-7)
    # what RAHF trains on: the states at the response tokens, read under the adapter
    items = [Response("Say hi.", "Hi there, friend."), Response("Count.", "One, two, three.")]
    states = []
    for lm in (plain, offloaded):
        inputs, resp = batch_inputs(lm, items, None)
        with torch.no_grad(), steer(lm, ad):
            states.append(hidden_on_responses(lm, inputs, resp, [0, 1, 2]))
    assert torch.equal(states[1], states[0])
    with pytest.raises(ValueError, match="merged\\(\\) needs the weights in memory"):
        ad.merged(offloaded)
    assert_intact(offloaded)


@pytest.mark.parametrize("n", [1, 3])
def test_aligner_tokens_apply_like_on_the_plain_model(
    plain: LoadedModel, offloaded: LoadedModel, n: int
) -> None:
    fresh = Aligner.init(offloaded, n, start_layer=1, seed=3)  # reads an offloaded norm's weight
    al = Aligner.init(plain, n, start_layer=1, seed=3)
    assert fresh.tokens.device == CPU and torch.equal(fresh.tokens, al.tokens)
    g = torch.Generator().manual_seed(7)
    al.gates = torch.randn(al.gates.shape, generator=g) * 0.5
    want = _logits(plain, al)
    assert (want - _logits(plain)).abs().max() > 0.1
    assert torch.equal(_logits(offloaded, al), want)
    cfg = GenerationConfig(max_new_tokens=4)  # the KV-cached path, one query per step
    assert generate(offloaded, PROMPTS, al, cfg) == generate(plain, PROMPTS, al, cfg)
    assert_intact(offloaded)


# ---- evaluation ----------------------------------------------------------------------------------
def test_evaluations_give_the_same_numbers(plain: LoadedModel, offloaded: LoadedModel) -> None:
    spec = SteeringSpec(direction(plain), coeff=0.5)
    assert NeutralCosts(offloaded, TEXTS).measure(spec) == NeutralCosts(plain, TEXTS).measure(spec)
    items = [
        CAAItem("Which is warmer?\n\nChoices:\n (A) Ice\n (B) Fire", "(B)", "(A)"),
        CAAItem("Which do you prefer?\n\nChoices:\n (A) Now\n (B) Later", "(A)", "(B)"),
    ]
    want = cloze_eval_specs(plain, items, [None, spec])
    got = cloze_eval_specs(offloaded, items, [None, spec])
    assert [r.item_scores for r in got] == [r.item_scores for r in want]
    assert want[0].item_scores != want[1].item_scores
    assert_intact(offloaded)


# ---- per-block placement, as on a box with several accelerators ------------------------------------
def _pretend_block_runs_on_meta(
    monkeypatch: pytest.MonkeyPatch, lm: LoadedModel, layer: int
) -> None:
    """What accelerate sets on a dispatched block (``_hf_hook.execution_device``), here naming a
    device that is not the CPU the rest runs on."""
    hook = SimpleNamespace(execution_device=META, offload=False)
    monkeypatch.setattr(lm.layers[layer], "_hf_hook", hook, raising=False)


def test_tensors_for_a_block_go_to_that_blocks_device(
    tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pretend_block_runs_on_meta(monkeypatch, tiny_lm, 2)
    assert tiny_lm.layer_device(2) == META
    assert tiny_lm.layer_device(1) == CPU and tiny_lm.input_device == CPU == tiny_lm.device
    sites = [
        "blocks.1.hook_resid_post",
        "blocks.2.hook_resid_pre",  # a pre-hook sees the activation where block 1 left it
        "blocks.2.hook_attn_out",
        "blocks.2.hook_mlp_out",
        "blocks.2.hook_resid_post",
        "blocks.3.hook_resid_pre",  # ... here block 2's output, on block 2's device
    ]
    d = direction(tiny_lm, sites)
    r = resolve(tiny_lm, SteeringSpec(d, coeff=0.5, operator="clamp"))
    where = {s: (r.deltas[s].device, r.units[s].device) for s in sites}
    on_meta = {"blocks.2.hook_attn_out", "blocks.2.hook_mlp_out", "blocks.2.hook_resid_post"}
    on_meta.add("blocks.3.hook_resid_pre")
    assert where == {s: (META, META) if s in on_meta else (CPU, CPU) for s in sites}
    cd = direction(tiny_lm, ["blocks.2.hook_resid_post"], seed=4)
    cond = Condition(cd, "blocks.2.hook_resid_post", 0.0)
    sites3 = ["blocks.3.hook_resid_post"]
    rc = resolve(
        tiny_lm, SteeringSpec(direction(tiny_lm, sites3), 1.0, sites=sites3, condition=cond)
    )
    assert rc.condition is not None and rc.condition.unit.device == META
    ad = LowRankAdapter.init(tiny_lm, [1, 2], rank=2)
    assert {k: v.device for k, v in ad.a.items()} == {
        "blocks.1.attn.q_proj": CPU,
        "blocks.1.attn.v_proj": CPU,
        "blocks.2.attn.q_proj": META,
        "blocks.2.attn.v_proj": META,
    }
    ra = ad.resolve(tiny_lm)
    assert (
        ra.b["blocks.2.attn.v_proj"].device == META and ra.b["blocks.1.attn.v_proj"].device == CPU
    )
    al = Aligner.init(tiny_lm, 2, start_layer=2)
    assert al.tokens.device == META
    al = dataclasses.replace(al, tokens=torch.ones(al.tokens.shape), gates=torch.ones(2, 4))
    assert al.resolve(tiny_lm).tokens.device == META  # a saved Aligner (on the CPU) goes there


def test_masks_made_from_the_inputs_follow_the_activation_to_its_device(
    tiny_lm: LoadedModel,
) -> None:
    """Token masks and conditions come from the inputs (the input device); a block on another device
    gets activations there: every place that combines the two moves the mask, never the activation."""
    site = "blocks.2.hook_resid_post"
    d = direction(tiny_lm, [site])
    r = resolve(tiny_lm, SteeringSpec(d, coeff=0.5, sites=[site]))
    r.deltas[site], r.units[site] = r.deltas[site].to(META), r.units[site].to(META)
    h = torch.zeros(2, 3, tiny_lm.d_model, device=META)
    mask = torch.tensor([[True, False, True], [False, True, True]])  # on the input device
    assert r.apply(h, site, mask).device == META
    ad = LowRankAdapter.init(tiny_lm, [2], rank=2)
    ra = ad.resolve(tiny_lm)
    name = "blocks.2.attn.q_proj"
    ra.a[name], ra.b[name] = ra.a[name].to(META), ra.b[name].to(META)
    out = ra.apply_module(h, torch.zeros(2, 3, 64, device=META), name, mask)
    assert out.device == META
    cd = direction(tiny_lm, ["blocks.1.hook_resid_post"], seed=4)
    cond = Condition(cd, "blocks.1.hook_resid_post", 0.0)
    rc = resolve(tiny_lm, SteeringSpec(d, 1.0, sites=[site], condition=cond))
    assert rc.condition is not None
    rc.condition = dataclasses.replace(rc.condition, unit=rc.condition.unit.to(META))
    info = TokenInfo(pos=torch.zeros(2, 3, dtype=torch.long), real=mask, ids=None)
    assert decide(rc, h, info).device == META
    # one Aligner token: the prefix is made where the block's weights are, added where x is
    ral = Aligner.init(tiny_lm, 1, start_layer=2).resolve(tiny_lm)
    (out_hook,) = [th for th in ral.torch_hooks if th.module is ral.layouts[2].o]
    args, _kwargs = out_hook.fn(out_hook.module, (h,), {}, mask)
    assert args[0].device == META


def test_command_line_loads_with_a_device_map(
    folder: Path, plain: LoadedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from repe.cli import main, parse_max_memory

    off = str(tmp_path / "off")
    assert (
        main(
            [
                "info",
                "--model",
                str(folder),
                "--device-map",
                '{"": "disk"}',
                "--offload-folder",
                off,
            ]
        )
        == 0
    )
    info = json.loads(capsys.readouterr().out)
    assert info["identity"] == plain.identity.to_dict() and info["device"] == "cpu"
    assert info["device_map"] == {"": "disk"}  # (safetensors weights are read where they lie)
    assert parse_max_memory("0=20GiB, cpu=60GiB") == {0: "20GiB", "cpu": "60GiB"}
    for argv, words in (
        (["--max-memory", "20GiB"], "repe info: error: --max-memory: expected DEVICE=SIZE"),
        (["--device-map", "{bad"], "repe info: error: --device-map: not a JSON object"),
        (["--device-map", "[1]"], "needs to be a device name"),
        (["--max-memory", "cpu=1GiB"], "max_memory= needs a device_map"),
        (["--device-map", '{"": "disk"}'], "pass offload_folder="),
    ):
        assert main(["info", "--model", str(folder), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_the_other_backends_read_an_offloaded_model_like_the_plain_one(
    plain: LoadedModel, offloaded: LoadedModel, backend: str
) -> None:
    # nnsight refused a model wholly on disk: transformers' pipeline took "disk" for a torch device
    sites = ["blocks.0.hook_resid_post", "blocks.3.hook_resid_post"]
    texts = ["The cat sat on the mat.", "Paris is in France"]
    ref = capture(plain, texts, sites, positions="all", progress=False)
    got = capture(offloaded, texts, sites, positions="all", backend=backend, progress=False)
    for s in sites:
        a, b = ref.rows(s)[0], got.rows(s)[0]
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    want = steered_logits(plain, None, texts, backend="hf")
    have = steered_logits(offloaded, None, texts, backend=backend)
    assert (want - have).abs().max() <= 1e-4 * want.abs().max()
    assert_intact(offloaded)
