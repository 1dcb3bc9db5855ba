"""The KV cache argument, whatever the installed transformers calls it.

transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache`` (the old name still works
but warns). Code that *reads* the cache from a forward call's keyword arguments (a pre-hook) must accept
both names: a caller may use either, and a model's inner call uses the new one. Code that *passes* the
cache uses the name the model's ``forward`` declares, so it never trips the deprecation warning.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

NAMES = ("cache", "past_key_values")


def cache_from_kwargs(kwargs: dict[str, Any]) -> Any:
    """The KV cache a forward call was given (under either name), or None."""
    for name in NAMES:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def cache_length(kwargs: dict[str, Any]) -> int:
    """How many positions the KV cache of a forward call already holds (0 without a cache)."""
    cache = cache_from_kwargs(kwargs)
    return int(cache.get_seq_length()) if cache is not None else 0


_NAME_FOR: dict[type, str] = {}


def _name_for(cls: type[torch.nn.Module]) -> str:
    name = _NAME_FOR.get(cls)
    if name is None:
        params = inspect.signature(cls.forward).parameters
        name = next((n for n in NAMES if n in params), "past_key_values")
        _NAME_FOR[cls] = name
    return name


def cache_kwargs(module: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache, "use_cache": True}`` with the name ``module.forward`` declares."""
    return {_name_for(type(module)): cache, "use_cache": True}


def crop_cache(cache: Any, length: int) -> None:
    """Drop every cached token after the first ``length`` (``crop(-n)`` drops the last n tokens)."""
    extra = int(cache.get_seq_length()) - length
    if extra > 0:
        cache.crop(-extra)


def dynamic_layers(cache: Any) -> list[Any] | None:
    """The per-layer ``(keys, values)`` holders of a plain full-attention ``DynamicCache`` (tensors
    ``[B, heads, T, head_dim]``), or None for any other cache (sliding windows, quantised, an older
    transformers): code that edits caches by hand uses this to fall back to the ordinary path."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover - transformers < 4.56
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return list(layers)


def cache_from_tensors(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A ``DynamicCache`` holding ``kv[i] = (keys, values)`` for layer ``i``."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache
