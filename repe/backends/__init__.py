"""Capture back-ends. Each one runs a token batch through the model and hands the activations of the
requested sites, ``[batch, pos, *site_shape]``, to a sink. All back-ends give the same numbers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from repe.batching import TokenBatch
from repe.models import LoadedModel
from repe.sites import Site

Sink = Callable[[Site, torch.Tensor], None]


@runtime_checkable
class Backend(Protocol):
    name: str

    def run(self, lm: LoadedModel, batch: TokenBatch, sites: list[Site], sink: Sink) -> None: ...


BACKENDS = ("hf", "transformer_lens", "nnsight")


def get_backend(name: str, *, remote: bool = False) -> Backend:
    """Return the back-end called ``name`` (``hf``, ``transformer_lens`` or ``nnsight``).

    ``remote=True`` (NDIF, through nnsight's remote execution) exists for ``nnsight`` only."""
    if remote and name != "nnsight":
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
        raise ValueError(
            f"remote=True runs on NDIF through nnsight: pass backend='nnsight' (got backend={name!r})"
        )
    if name == "hf":
        from repe.backends.hf import HFBackend

        return HFBackend()
    if name == "transformer_lens":
        from repe.backends.transformer_lens import TransformerLensBackend

        return TransformerLensBackend()
    if name == "nnsight":
        from repe.backends.nnsight import NNsightBackend

        return NNsightBackend(remote=remote)
    raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
