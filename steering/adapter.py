"""Low-rank adapters as interventions: ``out + (alpha / r) * B(A x)`` on chosen linear modules of chosen
blocks (RAHF trains one on the attention's q and v projections).

The adapter is plain data plus tensors, like a steering vector. ``steer(lm, adapter)`` hooks the target
modules through the Intervention protocol (``module_hooks`` / ``apply_module``), so it acts only inside
its scope and context (two threads, one with the adapter and one without, each get what they get alone),
nests with steering vectors, and leaves no hook behind. Training runs through the same hooks: the
resolved adapter holds the adapter's own ``A`` and ``B`` tensors (no copy when the model is on their
device and dtype), so gradients reach them and the base weights stay frozen. ``merged(lm)`` folds the
adapter into a copy of the weights; ``save``/``load`` use the artifact format (safetensors + JSON).

``B`` starts at zero, so a fresh adapter is the identity; ``A`` starts like peft's LoRA (Kaiming-uniform
with a = sqrt(5)), seeded.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repe.artifacts import check_identity, check_version, load_artifact, register, save_artifact
from repe.errors import DataFormatError
from repe.models import LoadedModel, ModelIdentity, is_offloaded

DEFAULT_TARGETS = ("q_proj", "v_proj")


def _key(layer: int, target: str) -> str:
    return f"blocks.{layer}.attn.{target}"


def _target_module(lm: LoadedModel, layer: int, target: str) -> nn.Linear:
    if not 0 <= layer < lm.n_layers:
        raise ValueError(
            f"adapter layer {layer} is out of range: the model has {lm.n_layers} blocks"
        )
    block = lm.layers[layer]
    attn = getattr(block, "self_attn", None)
    module = getattr(attn, target, None) if attn is not None else None
    if not isinstance(module, nn.Linear):
        names = sorted(n for n, m in (attn or block).named_children() if isinstance(m, nn.Linear))
        raise ValueError(
            f"block {layer} has no linear attention module {target!r}; its linear modules: {names}"
        )
    return module


@dataclass
class ResolvedAdapter:
    """An adapter resolved against one model: the target modules and the factors on their devices."""

    module_hooks: dict[str, nn.Module]
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    scale: float
    sites: list[str] = field(default_factory=list)
    positions: str = "all"
    token_indices: list[int] = field(default_factory=list)
    condition: Any = None

    def find_assistant_starts(self, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        raise ValueError("a low-rank adapter acts at every position")

    def apply(self, h: torch.Tensor, site: str, mask: torch.Tensor | None) -> torch.Tensor:
        return h

    def apply_module(
        self, x: torch.Tensor, out: torch.Tensor, name: str, mask: torch.Tensor | None
    ) -> torch.Tensor:
        a, b = self.a[name], self.b[name]
        delta = (x.to(a.dtype) @ a.T) @ b.T
        new = out + (delta * self.scale).to(out.dtype)
        # the mask comes from the inputs, on the input device: with a device_map not the module's
        return new if mask is None else torch.where(mask.to(out.device).unsqueeze(-1), new, out)


@register("lowrank_adapter")
@dataclass
class LowRankAdapter:
    """``A[name]`` is ``[rank, d_in]``, ``B[name]`` ``[d_out, rank]``, for ``name`` =
    ``blocks.{layer}.attn.{target}``; the update is ``(alpha / rank) * B @ A``."""

    KIND = "lowrank_adapter"
    FORMAT_VERSION = 1

    identity: ModelIdentity
    layers: list[int]
    targets: tuple[str, ...]
    rank: int
    alpha: float
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    name: str = "adapter"
    method: str = "lora"
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def init(
        cls,
        lm: LoadedModel,
        layers: list[int],
        *,
        targets: tuple[str, ...] = DEFAULT_TARGETS,
        rank: int = 8,
        alpha: float = 16.0,
        seed: int = 0,
        name: str = "adapter",
    ) -> LowRankAdapter:
        """A fresh adapter (B = 0: the identity) for ``lm``'s ``targets`` in ``layers``."""
        if rank < 1:
            raise ValueError(f"rank must be >= 1; got {rank}")
        if not layers:
            raise ValueError("an adapter needs at least one layer")
        if not targets:
            raise ValueError("an adapter needs at least one target module")
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite; got {alpha}")
        g = torch.Generator().manual_seed(seed)
        a: dict[str, torch.Tensor] = {}
        b: dict[str, torch.Tensor] = {}
        for layer in sorted(set(layers)):
            for t in targets:
                m = _target_module(lm, layer, t)
                dev = lm.layer_device(layer)  # not m.weight.device: meta when offloaded
                bound = 1.0 / math.sqrt(m.in_features)  # kaiming_uniform(a=sqrt(5)) on [r, d_in]
                w = (torch.rand(rank, m.in_features, generator=g) * 2 - 1) * bound
                a[_key(layer, t)] = w.to(dev, torch.float32)
                b[_key(layer, t)] = torch.zeros(m.out_features, rank, device=dev)
        return cls(lm.identity, sorted(set(layers)), tuple(targets), rank, float(alpha), a, b, name)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def parameters(self) -> list[torch.Tensor]:
        """The trainable tensors (A then B of every module), ready for ``requires_grad_``."""
        return [self.a[k] for k in sorted(self.a)] + [self.b[k] for k in sorted(self.b)]

    # ---- the Intervention protocol ----------------------------------------------------------
    def resolve(self, lm: LoadedModel) -> ResolvedAdapter:
        check_identity(self.identity, lm.identity, what=f"adapter {self.name!r}")
        hooks: dict[str, nn.Module] = {}
        a: dict[str, torch.Tensor] = {}
        b: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            for t in self.targets:
                k = _key(layer, t)
                m = _target_module(lm, layer, t)
                if self.a[k].shape != (self.rank, m.in_features) or self.b[k].shape != (
                    m.out_features,
                    self.rank,
                ):
                    raise ValueError(
                        f"adapter {k}: A {tuple(self.a[k].shape)} and B {tuple(self.b[k].shape)} do "
                        f"not fit {m.in_features} -> {m.out_features} with rank {self.rank}"
                    )
                hooks[k] = m
                dev = lm.layer_device(layer)  # where the block runs (its weights may be offloaded)
                a[k], b[k] = (
                    self.a[k].to(dev),
                    self.b[k].to(dev),
                )  # the same tensors on their device
        return ResolvedAdapter(hooks, a, b, self.scale)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.KIND,
            "name": self.name,
            "layers": self.layers,
            "targets": list(self.targets),
            "rank": self.rank,
            "alpha": self.alpha,
            "method": self.method,
        }

    @property
    def exporters(self) -> tuple[str, ...]:
        """None of the vector formats carries an adapter: it saves as its own artifact (``save``) or
        merges into a copy of the weights (``merged``)."""
        return ()

    # ---- merging ----------------------------------------------------------------------------
    def merged(self, lm: LoadedModel) -> LoadedModel:
        """A copy of ``lm`` with the adapter folded into its weights (``lm`` is left untouched). The copy
        keeps ``lm``'s identity, so directions made for the base model still apply to it."""
        self.resolve(lm)  # the same checks
        if is_offloaded(lm.model):
            raise ValueError(
                f"adapter {self.name!r}: merged() needs the weights in memory, and this model was "
                "loaded with weights offloaded (device_map with 'cpu' or 'disk' entries beside an "
                "accelerator, or 'disk'); apply the adapter with steer(lm, adapter) instead"
            )
        new = LoadedModel(
            copy.deepcopy(lm.model), lm.tokenizer, lm.identity, lm.layers_template, lm.source
        )
        with torch.no_grad():
            for layer in self.layers:
                for t in self.targets:
                    k = _key(layer, t)
                    m = _target_module(new, layer, t)
                    delta = (self.b[k].float() @ self.a[k].float()) * self.scale
                    m.weight += delta.to(m.weight.device, m.weight.dtype)
        return new

    # ---- I/O --------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"{k}.A": v.detach().float() for k, v in self.a.items()}
        out.update({f"{k}.B": v.detach().float() for k, v in self.b.items()})
        return out

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
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> LowRankAdapter:
        check_version(meta, cls.KIND, cls.FORMAT_VERSION)
        try:
            identity = ModelIdentity.from_dict(meta["model"])
            layers = [int(x) for x in meta["layers"]]
            targets = tuple(str(t) for t in meta["targets"])
            rank, alpha = int(meta["rank"]), float(meta["alpha"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataFormatError(f"adapter metadata is missing or malformed: {exc}") from exc
        keys = [_key(layer, t) for layer in layers for t in targets]
        want = sorted([f"{k}.A" for k in keys] + [f"{k}.B" for k in keys])
        if sorted(tensors) != want:
            raise DataFormatError(
                f"adapter tensors {sorted(tensors)} do not match its layers {layers} and targets "
                f"{list(targets)}"
            )
        return cls(
            identity,
            layers,
            targets,
            rank,
            alpha,
            {k: tensors[f"{k}.A"] for k in keys},
            {k: tensors[f"{k}.B"] for k in keys},
            name=meta.get("name", "adapter"),
            method=meta.get("method", "lora"),
            params=meta.get("params", {}),
            metrics=meta.get("metrics", {}),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: LoadedModel | None = None) -> LowRankAdapter:
        obj = load_artifact(path, model)
        if not isinstance(obj, cls):
            raise DataFormatError(f"{path} holds a {type(obj).__name__}, not a LowRankAdapter")
        return obj
