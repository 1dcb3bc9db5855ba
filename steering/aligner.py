"""Aligner-style global tokens (Zhou et al., "Aligner: One Global Token is Worth Millions of Parameters
When Aligning Large Language Models"): ``N`` learnable vectors in the residual space, shared by every
block from ``start_layer`` on.

In each such block, the block's own frozen ``k_proj`` and ``v_proj`` turn the shared tokens into ``N``
prefix keys and values (no position encoding, no norm; grouped-query attention repeats them per query
head like the model's own keys). Every query (after its rotary embedding, as the attention uses it)
attends to them in a *separate* softmax over the ``N`` prefix tokens, and the result, scaled by a gate
per head (initialised to zero), is added to the attention's output before ``o_proj``. With all gates at
zero the model is the base model, bit for bit. Trainable: the tokens (``N x d_model``) and the gates
(``n_heads`` per block from ``start_layer``), so ``N * d + n_heads * (n_layers - start_layer)``
parameters (828 for ``N = 1`` on SmolLM2-135M with the paper's start layer 2).

It is an intervention like any other: ``steer(lm, aligner)`` applies it through hooks (no module
surgery), only in that scope and context, nested with steering vectors or adapters, and training runs
through the same hooks (``steering.aligner_train``). The prefix is not part of the KV cache: each new
token's query meets the prefix in its own softmax, so generation with the cache gives what a full
forward pass gives.

Llama-family attention only (``llama``, ``mistral``): ``self_attn`` with ``q_proj``, ``k_proj``,
``v_proj`` and ``o_proj`` linear modules and rotary position embeddings passed to the attention.
Anything else is refused with an error that names what is missing.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from repe.artifacts import check_identity, check_version, load_artifact, register, save_artifact
from repe.errors import DataFormatError
from repe.models import LoadedModel, ModelIdentity, weights_in_memory
from steering.intervention import TorchHook

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SPEC_KIND = "repe-aligner-spec"
SPEC_FORMULA = (
    "for every block L in blocks, with h the block's attention input after its norm: "
    "K = k_proj(tokens), V = v_proj(tokens) (no norm, no position), repeated per query head as the "
    "model repeats its key/value heads; q = rotary(q_proj(h)) per head; "
    "out_head += gates[L - start_layer, head] * softmax(q . K / sqrt(head_dim)) V, "
    "a softmax over the prefix tokens only, added to the o_proj input"
)
DEFAULT_START_LAYER = 2  # the paper's choice


class UnsupportedArchitecture(ValueError):
    """The model's attention is not one the Aligner hooks know how to extend."""


@dataclass(frozen=True)
class AttentionLayout:
    """One block's attention as the Aligner sees it."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    attn: nn.Module
    n_heads: int
    n_kv_heads: int
    head_dim: int


def attention_layout(lm: LoadedModel, layer: int) -> AttentionLayout:
    """Block ``layer``'s attention modules and head shapes, or :class:`UnsupportedArchitecture` naming
    what is missing."""
    cfg: Any = lm.model.config
    model_type = getattr(cfg, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitecture(
            f"the Aligner supports Llama-family attention ({', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"this model is {model_type!r}"
            + _missing(lm.layers[layer] if 0 <= layer < lm.n_layers else None)
        )
    block = lm.layers[layer]
    missing = _missing(block)
    if missing:
        raise UnsupportedArchitecture(f"the Aligner cannot hook block {layer}{missing}")
    attn: Any = block.self_attn
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    if (
        q.out_features != n_heads * head_dim
        or k.out_features != n_kv * head_dim
        or v.out_features != n_kv * head_dim
        or o.in_features != n_heads * head_dim
        or n_heads % n_kv
    ):
        raise UnsupportedArchitecture(
            f"block {layer}'s attention projections do not match {n_heads} query heads, {n_kv} "
            f"key/value heads of size {head_dim}"
        )
    return AttentionLayout(q, k, v, o, attn, n_heads, n_kv, head_dim)


def _missing(block: nn.Module | None) -> str:
    """': it has no ...' for the attention parts a block lacks ('' when it has them all)."""
    if block is None:
        return ""
    attn = getattr(block, "self_attn", None)
    if attn is None:
        kids = sorted(n for n, _ in block.named_children())
        return f": its blocks have no self_attn module (children: {kids})"
    lacking = [
        n
        for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        if not isinstance(getattr(attn, n, None), nn.Linear)
    ]
    return f": its self_attn has no linear {', '.join(lacking)}" if lacking else ""


def shared_rotary(lm: LoadedModel) -> nn.Module | None:
    """The backbone's one rotary-embedding module (its output, ``(cos, sin)``, is what every block's
    attention receives), or None: then each block's attention call is read instead."""
    rotary = getattr(lm.backbone, "rotary_emb", None)
    return rotary if isinstance(rotary, nn.Module) else None


def parameter_count(n_tokens: int, d_model: int, n_heads: int, n_layers: int, start: int) -> int:
    """``N * d + n_heads * (n_layers - start)``."""
    return n_tokens * d_model + n_heads * (n_layers - start)


SMALL_CALL = 64  # rows x tokens at or under which the rotation is one matmul (decoding)


def _rope_factors(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What the output hooks need of the rotary embedding, once per forward call: ``(cos', sin')``
    ``[B, T, 1, head_dim]`` float32 such that ``q * cos' + q.roll(head_dim // 2, -1) * sin'`` is the
    rotary embedding of ``q`` ``[B, T, H, head_dim]`` divided by sqrt(head_dim) (attention's scale):
    Llama's ``rotate_half(q) = cat(-q2, q1)`` is the rolled ``q`` with its first half negated, so the
    sign and the scale go into the factors. For small calls (decoding one token per row) also the same
    map as matrices ``[B*T, head_dim, head_dim]`` (``q @ R``): one matmul per block instead of three
    elementwise operations."""
    cos, sin = cos.float().unsqueeze(2), sin.float().unsqueeze(2)
    d = sin.shape[-1]
    scale = torch.full((d,), d**-0.5, device=sin.device)
    scale[: d // 2] *= -1
    cos, sin = cos * d**-0.5, sin * scale
    b, t = cos.shape[0], cos.shape[1]
    if b * t > SMALL_CALL:
        return cos, sin
    c, sn = cos.reshape(b * t, d), sin.reshape(b * t, d)
    rot = torch.diag_embed(c) + torch.diag_embed(sn).roll(-(d // 2), dims=-2)
    return cos, sin, rot


class _Stash(threading.local):
    """Per-thread values carried from one hook to the next within a block's forward call."""

    def __init__(self) -> None:
        self.q: dict[int, torch.Tensor] = {}
        self.rope: dict[int, tuple[torch.Tensor, ...]] = {}


@dataclass
class ResolvedAligner:
    """An Aligner resolved against one model: its hooks, and its tensors on the device of its first
    block (each block's prefix keys and values are made on that block's device)."""

    tokens: torch.Tensor  # [N, d]
    gates: torch.Tensor  # [n_blocks, n_heads]
    layouts: dict[int, AttentionLayout]
    start: int
    torch_hooks: list[TorchHook] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    positions: str = "all"
    token_indices: list[int] = field(default_factory=list)
    condition: Any = None

    rotary: nn.Module | None = None  # the model's shared rotary-embedding module, when it has one

    def __post_init__(self) -> None:
        self._stash = _Stash()
        self._kv_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        n = self.tokens.shape[0]
        if n > 1 and self.rotary is not None:  # one hook reads (cos, sin) for every block
            self.torch_hooks.append(TorchHook(self.rotary, "post", self._shared_rope_hook))
        for layer, lay in self.layouts.items():
            if n > 1:  # with one prefix token its softmax is 1 whatever the query: no query needed
                if self.rotary is None:
                    self.torch_hooks.append(TorchHook(lay.attn, "pre", self._rope_hook(layer)))
                self.torch_hooks.append(TorchHook(lay.q, "post", self._query_hook(layer)))
            self.torch_hooks.append(TorchHook(lay.o, "pre", self._output_hook(layer)))

    def find_assistant_starts(self, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        raise ValueError("the Aligner acts at every position")

    def apply(self, h: torch.Tensor, site: str, mask: torch.Tensor | None) -> torch.Tensor:
        return h

    # ---- hooks ----------------------------------------------------------------------------
    def _rope_hook(self, layer: int) -> Any:
        def fn(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], mask: Any) -> None:
            pe = kwargs.get("position_embeddings")
            if pe is None and len(args) > 1 and isinstance(args[1], tuple):
                pe = args[1]
            if pe is None:
                raise UnsupportedArchitecture(
                    f"block {layer}'s attention was called without position_embeddings (cos, sin): "
                    "this transformers version's Llama attention is not supported"
                )
            self._stash.rope[layer] = _rope_factors(*pe)

        return fn

    def _shared_rope_hook(self, _m: Any, _a: Any, _k: Any, out: Any, mask: Any) -> None:
        self._stash.rope[-1] = _rope_factors(*out)

    def _query_hook(self, layer: int) -> Any:
        def fn(_m: Any, _args: Any, _kwargs: Any, out: torch.Tensor, mask: Any) -> None:
            self._stash.q[layer] = out

        return fn

    def _prefix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix at ``layer`` as the output hook uses it (float32): keys ``[H, N, head_dim]``
        and values ``[H, N, head_dim]`` already times the gates.
        Cached unless the tokens or gates are being trained."""
        grad = torch.is_grad_enabled() and (self.tokens.requires_grad or self.gates.requires_grad)
        if not grad and layer in self._kv_cache:
            return self._kv_cache[layer]
        lay = self.layouts[layer]
        n = self.tokens.shape[0]
        # k_proj / v_proj are read outside their own forward: offloaded weights are brought in
        # (accelerate moves them in only for a module's forward), and the tokens go to the block
        with weights_in_memory(lay.k), weights_in_memory(lay.v):
            w = lay.k.weight
            t = self.tokens.to(w.device, w.dtype)
            k = F.linear(t, w, lay.k.bias).float().view(n, lay.n_kv_heads, lay.head_dim)
            v = F.linear(t, lay.v.weight, lay.v.bias).float().view(n, lay.n_kv_heads, lay.head_dim)
        group = lay.n_heads // lay.n_kv_heads
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, N, hd]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        gate = self.gates[layer - self.start].to(v.device).float()
        v = v * gate.view(-1, 1, 1)
        if not grad:
            self._kv_cache[layer] = (k, v)
        return k, v

    def _output_hook(self, layer: int) -> Any:
        lay = self.layouts[layer]
        h, hd = lay.n_heads, lay.head_dim

        def fn(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], mask: Any) -> Any:
            x = args[0] if args else kwargs["input"]
            b, t, _ = x.shape
            k, v = self._prefix(layer)
            if k.device != x.device:  # the prefix is made where the block's weights are
                k, v = k.to(x.device), v.to(x.device)
            # the mask comes from the inputs (the input device): 1 = act, 0 = keep x
            keep = None if mask is None else mask.to(x.device, torch.float32)  # [B, T]
            if k.shape[1] == 1:  # one prefix token: its softmax weight is 1 for every query
                o = v.reshape(1, 1, h * hd)
                if keep is not None:
                    o = o * keep.unsqueeze(-1)
                new = x + (o if o.dtype == x.dtype else o.to(x.dtype))
            else:
                q = self._stash.q.pop(layer).view(b, t, h, hd)
                rope = self._stash.rope.pop(layer, None) or self._stash.rope[-1]
                if rope[0].device != q.device:  # the shared rotary module's output, another device
                    rope = tuple(r.to(q.device) for r in rope)
                if q.dtype != torch.float32:
                    q = q.float()
                if (
                    len(rope) == 3 and rope[2].shape[0] == b * t
                ):  # small call: q @ R, [BT, H, 1, hd]
                    q = torch.matmul(q.view(b * t, h, hd), rope[2]).unsqueeze(2)
                    p = torch.matmul(q, k.transpose(1, 2)).softmax(-1)  # [BT, H, 1, N]
                    if keep is not None:
                        p = p * keep.view(b * t, 1, 1, 1)
                    o = torch.matmul(p, v).view(b, t, h * hd)
                    new = x + (o if o.dtype == x.dtype else o.to(x.dtype))
                else:
                    cos, sin = rope[0], rope[1]
                    # the rotary embedding and 1/sqrt(head_dim), folded into cos and sin
                    q = torch.addcmul(q * cos, q.roll(hd // 2, -1), sin).transpose(1, 2)
                    # a softmax over the prefix tokens only (no mask: every query sees all of them)
                    p = torch.matmul(q, k.transpose(1, 2)).softmax(-1)  # [B, H, T, N]
                    if keep is not None:  # tokens outside the mask get nothing added (x + 0)
                        p = p * keep.view(b, 1, t, 1)
                    o = torch.matmul(p, v).transpose(1, 2)  # [B, T, H, hd], strided
                    if o.dtype != x.dtype:
                        o = o.to(x.dtype)
                    new = (x.reshape(b, t, h, hd) + o).reshape(b, t, h * hd)
            if args:
                return ((new, *args[1:]), kwargs)
            return (args, {**kwargs, "input": new})

        return fn


@register("aligner")
@dataclass
class Aligner:
    """``tokens`` ``[N, d_model]``; ``gates`` ``[n_layers - start_layer, n_heads]`` (row ``i`` is block
    ``start_layer + i``)."""

    KIND = "aligner"
    FORMAT_VERSION = 1

    identity: ModelIdentity
    start_layer: int
    tokens: torch.Tensor
    gates: torch.Tensor
    name: str = "aligner"
    method: str = "untrained"
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    attention: dict[str, Any] = field(
        default_factory=dict
    )  # model_type, heads, kv heads, head size

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_parameters(self) -> int:
        return self.tokens.numel() + self.gates.numel()

    @classmethod
    def init(
        cls,
        lm: LoadedModel,
        n_tokens: int = 1,
        *,
        start_layer: int = DEFAULT_START_LAYER,
        seed: int = 0,
        name: str = "aligner",
    ) -> Aligner:
        """Fresh tokens (seeded, at the scale of what the block's projections normally read: the
        input norm's mean weight) and zero gates, so a fresh Aligner is the base model."""
        if n_tokens < 1:
            raise ValueError(f"an Aligner needs at least one token; got {n_tokens}")
        if not 0 <= start_layer < lm.n_layers:
            raise ValueError(
                f"start_layer {start_layer} is out of range: the model has {lm.n_layers} blocks"
            )
        layouts = [attention_layout(lm, layer) for layer in range(start_layer, lm.n_layers)]
        norm = getattr(lm.layers[start_layer], "input_layernorm", None)
        scale = 1.0
        if isinstance(norm, nn.Module):
            with weights_in_memory(norm):  # offloaded weights are on meta outside a forward
                w = getattr(norm, "weight", None)
                if isinstance(w, torch.Tensor):
                    scale = float(w.detach().float().abs().mean())
        g = torch.Generator().manual_seed(seed)
        dev = lm.layer_device(start_layer)  # not the weights' device: meta when offloaded
        tokens = (torch.randn(n_tokens, lm.d_model, generator=g) * scale).to(dev)
        gates = torch.zeros(len(layouts), layouts[0].n_heads, device=dev)
        lay = layouts[0]
        attention = {
            "model_type": getattr(lm.model.config, "model_type", "?"),
            "n_heads": lay.n_heads,
            "n_kv_heads": lay.n_kv_heads,
            "head_dim": lay.head_dim,
        }
        return cls(lm.identity, start_layer, tokens, gates, name, attention=attention)

    def parameters(self) -> list[torch.Tensor]:
        """The trainable tensors: the tokens and the gates."""
        return [self.tokens, self.gates]

    # ---- the Intervention protocol ----------------------------------------------------------
    def resolve(self, lm: LoadedModel) -> ResolvedAligner:
        check_identity(self.identity, lm.identity, what=f"Aligner {self.name!r}")
        if not 0 <= self.start_layer < lm.n_layers:
            raise ValueError(
                f"Aligner {self.name!r} starts at block {self.start_layer}; the model has "
                f"{lm.n_layers}"
            )
        layouts = {
            layer: attention_layout(lm, layer) for layer in range(self.start_layer, lm.n_layers)
        }
        n_heads = layouts[self.start_layer].n_heads
        want = (lm.n_layers - self.start_layer, n_heads)
        if (
            tuple(self.tokens.shape) != (self.n_tokens, lm.d_model)
            or tuple(self.gates.shape) != want
        ):
            raise ValueError(
                f"Aligner {self.name!r}: tokens {tuple(self.tokens.shape)} and gates "
                f"{tuple(self.gates.shape)} do not fit d_model {lm.d_model} and {want[0]} blocks x "
                f"{n_heads} heads"
            )
        if not (torch.isfinite(self.tokens).all() and torch.isfinite(self.gates).all()):
            raise ValueError(f"Aligner {self.name!r} holds NaN or infinite values")
        dev = lm.layer_device(self.start_layer)  # each block's prefix is made on its own device
        return ResolvedAligner(
            self.tokens.to(dev),
            self.gates.to(dev),
            layouts,
            self.start_layer,
            rotary=shared_rotary(lm),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.KIND,
            "name": self.name,
            "n_tokens": self.n_tokens,
            "start_layer": self.start_layer,
            "n_parameters": self.n_parameters,
            "method": self.method,
            "attention": self.attention,
        }

    @property
    def exporters(self) -> tuple[str, ...]:
        """Only the JSON/safetensors spec (``steering.export``'s ``aligner`` format): llama.cpp's
        control vectors add one vector per layer to the residual stream and cannot carry an extra
        attention over prefix tokens."""
        return ()

    # ---- I/O --------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens.detach().float(), "gates": self.gates.detach().float()}

    def metadata(self) -> dict[str, Any]:
        return {
            **self.to_json(),
            "model": self.identity.to_dict(),
            "hidden_size": self.identity.d_model,
            "params": self.params,
            "metrics": self.metrics,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        return save_artifact(self, path)

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Aligner:
        check_version(meta, cls.KIND, cls.FORMAT_VERSION)
        try:
            identity = ModelIdentity.from_dict(meta["model"])
            start = int(meta["start_layer"])
            n = int(meta["n_tokens"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataFormatError(f"Aligner metadata is missing or malformed: {exc}") from exc
        if sorted(tensors) != ["gates", "tokens"]:
            raise DataFormatError(
                f"Aligner tensors must be 'tokens' and 'gates'; got {sorted(tensors)}"
            )
        tokens, gates = tensors["tokens"], tensors["gates"]
        if tokens.dim() != 2 or tokens.shape != (n, identity.d_model) or gates.dim() != 2:
            raise DataFormatError(
                f"Aligner tensors: tokens {tuple(tokens.shape)} (want ({n}, {identity.d_model})), "
                f"gates {tuple(gates.shape)}"
            )
        if gates.shape[0] != identity.n_layers - start:
            raise DataFormatError(
                f"Aligner gates have {gates.shape[0]} rows; blocks {start}..{identity.n_layers - 1} "
                f"need {identity.n_layers - start}"
            )
        return cls(
            identity,
            start,
            tokens,
            gates,
            name=meta.get("name", "aligner"),
            method=meta.get("method", "untrained"),
            params=meta.get("params", {}),
            metrics=meta.get("metrics", {}),
            attention=meta.get("attention", {}),
        )

    # ---- export for serving stacks ------------------------------------------------------------
    def export_spec(self, path: str | os.PathLike[str]) -> list[Path]:
        """A self-contained JSON spec for serving stacks (what to compute, where, and the tensors
        inline as float32 values) and the same tensors as ``<stem>.safetensors`` beside it."""
        from safetensors.torch import save as st_save

        from repe.atomic import write_bytes, write_text

        target = Path(path)
        if target.suffix != ".json":
            target = target.with_suffix(".json")
        blocks = list(range(self.start_layer, self.identity.n_layers))
        payload = {
            "kind": SPEC_KIND,
            "format_version": self.FORMAT_VERSION,
            "model": self.identity.to_dict(),
            "aligner": self.to_json(),
            "attention": self.attention,
            "blocks": blocks,
            "formula": SPEC_FORMULA,
            "hooks": {
                "keys_values": "model.layers.{L}.self_attn.k_proj / v_proj weights applied to tokens",
                "queries": "model.layers.{L}.self_attn.q_proj output, rotary embedding applied",
                "add_to": "input of model.layers.{L}.self_attn.o_proj",
            },
            "params": self.params,
            "metrics": self.metrics,
            "tokens": self.tokens.detach().float().cpu().tolist(),
            "gates": self.gates.detach().float().cpu().tolist(),
            "tensors_file": target.with_suffix(".safetensors").name,
        }
        tensors = {k: v.contiguous().cpu() for k, v in self.tensors().items()}
        st = write_bytes(target.with_suffix(".safetensors"), st_save(tensors))
        js = write_text(target, json.dumps(payload))
        return [js, st]

    @classmethod
    def from_spec(cls, path: str | os.PathLike[str]) -> Aligner:
        """Read back a spec written by :meth:`export_spec` (its inline tensors)."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataFormatError(f"{path}: not a readable JSON Aligner spec ({exc})") from exc
        if not isinstance(d, dict) or d.get("kind") != SPEC_KIND:
            raise DataFormatError(f"{path}: not an Aligner spec (kind {SPEC_KIND!r})")
        meta = {
            **d["aligner"],
            "model": d["model"],
            "params": d.get("params", {}),
            "metrics": d.get("metrics", {}),
            "format_version": d["format_version"],
        }
        tensors = {
            "tokens": torch.tensor(d["tokens"], dtype=torch.float32),
            "gates": torch.tensor(d["gates"], dtype=torch.float32),
        }
        return cls.from_parts(tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: LoadedModel | None = None) -> Aligner:
        obj = load_artifact(path, model)
        if not isinstance(obj, cls):
            raise DataFormatError(f"{path} holds a {type(obj).__name__}, not an Aligner")
        return obj
