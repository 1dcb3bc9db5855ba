"""The default back-end: plain PyTorch hooks on the transformers model.

Only the decoder stack runs (never the LM head), and the forward stops right after the deepest
requested site, so capture is cheaper than a plain forward with ``output_hidden_states=True``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from repe.backends import Sink
from repe.batching import TokenBatch
from repe.hooks import hook_scope, mark
from repe.models import LoadedModel
from repe.sites import Site

# execution order of the sites inside one decoder block
_ORDER = {"resid_pre": 0, "attn_z": 1, "attn_out": 2, "mlp_out": 3, "resid_post": 4}


class _StopForward(Exception):
    pass


def execution_key(site: Site) -> tuple[int, int]:
    return (site.layer, _ORDER[site.kind])


def site_module(lm: LoadedModel, site: Site) -> nn.Module:
    block = lm.layers[site.layer]
    sub = site.hf_hook.submodule
    if not sub:
        return block
    try:
        return block.get_submodule(sub)
    except AttributeError as exc:
        raise ValueError(
            f"site {site.name}: block {site.layer} ({type(block).__name__}) has no submodule {sub!r}"
        ) from exc


def site_device(lm: LoadedModel, site: Site) -> torch.device:
    """The device of the site's activation where a hook of ours sees it: the device of the block it
    belongs to (:meth:`LoadedModel.layer_device`). A forward-pre-hook on a block runs before
    accelerate's own hook moves the block's inputs, so ``blocks.L.hook_resid_pre`` is still where the
    previous block (or, for block 0, the embedding) left it."""
    if site.hf_hook.hook == "pre" and not site.hf_hook.submodule:
        return lm.layer_device(site.layer - 1) if site.layer > 0 else lm.input_device
    return lm.layer_device(site.layer)


def first_tensor(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple | list) else x


def _pre_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args:
        return args[0]
    return kwargs["hidden_states"]


def register_capture(lm: LoadedModel, site: Site, fn: Any) -> torch.utils.hooks.RemovableHandle:
    """Register ``fn(tensor)`` to receive the site's activation ``[B, T, *shape]``."""
    module = site_module(lm, site)
    spec = site.hf_hook
    n_heads = int(getattr(lm.model.config, "num_attention_heads", 1))

    def shape(t: torch.Tensor) -> torch.Tensor:
        if spec.per_head:
            return t.reshape(*t.shape[:-1], n_heads, -1)
        return t

    if spec.hook == "pre":
        return module.register_forward_pre_hook(
            mark(lambda m, a, k: fn(shape(_pre_input(a, k)))), with_kwargs=True
        )
    return module.register_forward_hook(mark(lambda m, a, out: fn(shape(first_tensor(out)))))


class HFBackend:
    name = "hf"

    def __init__(self, stop_early: bool = True) -> None:
        self.stop_early = stop_early

    def run(self, lm: LoadedModel, batch: TokenBatch, sites: list[Site], sink: Sink) -> None:
        deepest = max(sites, key=execution_key)
        with hook_scope() as scope:
            for site in sites:
                scope.add(register_capture(lm, site, scope.gate(lambda t, s=site: sink(s, t))))
            if self.stop_early:
                scope.add(register_capture(lm, deepest, scope.gate(_raise_stop)))
            dev = lm.device
            with torch.inference_mode():
                try:
                    lm.backbone(
                        input_ids=batch.input_ids.to(dev),
                        attention_mask=batch.attention_mask.to(dev),
                        position_ids=batch.position_ids.to(dev),
                        use_cache=False,
                    )
                except _StopForward:
                    pass


def _raise_stop(_t: torch.Tensor) -> None:
    raise _StopForward
