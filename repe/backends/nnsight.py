"""The ``nnsight`` back-end: an nnsight model over the loaded HF model, read through envoy paths.

Sites are read at ``Site.nnsight_path`` (relative to the decoder block named by ``lm.layers_template``),
in execution order, and the run stops right after the deepest one. Values are ``.save()``-d and handed
to the sink after the trace, which is what makes ``remote=True`` (NDIF) possible: a remote trace body
cannot call back into local code. The body reads only the model, a list of path strings, a flag and
``nnsight`` itself, so the request holds nothing of this package (see :mod:`repe.remote`); the one
value saved is the list of site values, so nothing else (not the logits) comes back.

nnsight instruments every module it wraps (an instance-level ``forward`` controller, left in place for
the module's lifetime) and its pipeline adjusts the tokenizer, so it wraps
:func:`~repe.backends.transformer_lens.shared_weights_view` of the model, which shares every parameter
and buffer tensor, and a private copy of the tokenizer. ``lm.model`` itself is never modified.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch

from repe.backends import Sink
from repe.backends.hf import execution_key, first_tensor
from repe.backends.transformer_lens import ViewCache, shared_weights_view
from repe.batching import TokenBatch
from repe.errors import RepeError, require
from repe.models import LoadedModel
from repe.remote import Keep, RemoteError, is_weightless, remote_backend
from repe.sites import Site


def _wrap(lm: LoadedModel) -> Any:
    nnsight = require("nnsight", "backends")
    tokenizer = copy.deepcopy(lm.tokenizer)
    view = shared_weights_view(lm.model)
    placed = getattr(view, "hf_device_map", None)
    if isinstance(placed, dict) and "disk" in placed.values():
        # transformers' pipeline takes its device from the map's first entry, and "disk" is no torch
        # device: on the view (never on lm.model) offloaded modules read as where inputs go
        setattr(  # noqa: B010 (an attribute transformers sets on the model, not a declared one)
            view,
            "hf_device_map",
            {k: (str(lm.input_device) if v == "disk" else v) for k, v in placed.items()},
        )
    # a model held without weights (for NDIF) stays on meta: the pipeline would move it otherwise
    where = {"device": "meta"} if is_weightless(lm) else {}
    try:
        # nnsight >= 0.8 names the class TransformersModel and deprecates LanguageModel
        transformers_model = nnsight.TransformersModel
    except AttributeError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            old = nnsight.LanguageModel(view, tokenizer=tokenizer, **where)
            return _inputs_to(old, lm) if not where else old
    model = transformers_model(view, tokenizer=tokenizer, task="text-generation", **where)
    return _inputs_to(model, lm) if not where else model


def _inputs_to(model: Any, lm: LoadedModel) -> Any:
    """nnsight moves a trace's input tensors to its model's ``device``, the first parameter's; with
    offloaded weights that is ``meta``. The inputs belong where the embedding runs (accelerate moves
    them on from there), so this model's ``device`` says so."""
    first = next(lm.model.parameters(), None)
    if first is None or first.device.type != "meta":
        return model
    dev = lm.input_device
    cls = type(model)
    model.__class__ = type(cls.__name__, (cls,), {"device": property(lambda self: dev)})
    return model


_MODELS = ViewCache(_wrap)


def get_nnsight_model(lm: LoadedModel) -> Any:
    """The nnsight model wrapping ``lm`` (built once per model object, then cached)."""
    return _MODELS.get(lm)[0]


def envoy_path(lm: LoadedModel, site: Site) -> str:
    """Dotted nnsight path of a site's value, e.g. ``model.layers.3.self_attn.o_proj.input``."""
    sub, which = site.nnsight_path
    block = lm.layers_template.format(L=site.layer)
    return ".".join(p for p in (block, sub, which) if p)


Rows = tuple[torch.Tensor, torch.Tensor]


class NNsightBackend:
    """Capture through nnsight. ``remote=True`` runs the trace on NDIF (the model must be one it
    serves, named by its hub id; the API key comes from ``NDIF_API_KEY``, see :mod:`repe.remote`).

    Given ``rows`` (batch and position index of the tokens a capture keeps), the trace itself gathers
    those tokens and the sink receives ``[N, *site_shape]``: a remote run sends back only them."""

    name = "nnsight"

    def __init__(self, remote: bool = False, stop_early: bool = True) -> None:
        self.remote = remote
        self.stop_early = stop_early

    @property
    def gathers_rows(self) -> bool:
        """Whether capture should pass ``rows`` (it does for a remote run)."""
        return self.remote

    def run(
        self,
        lm: LoadedModel,
        batch: TokenBatch,
        sites: list[Site],
        sink: Sink,
        rows: Rows | None = None,
    ) -> None:
        if not self.remote:
            saved, _ = self._trace(lm, batch, sites, rows, None)
            assert saved is not None
            self.deliver(lm, sites, saved, sink)
            return
        _, kept = self._trace(lm, batch, sites, rows, lambda m: Keep(remote_backend(lm, m)))
        result = kept.result
        if not isinstance(result, dict) or not isinstance(result.get("saved"), list):
            raise RemoteError(f"NDIF sent back no activations (got {type(result).__name__})")
        self.deliver(lm, sites, result["saved"], sink)

    def submit(
        self, lm: LoadedModel, batch: TokenBatch, sites: list[Site], rows: Rows | None = None
    ) -> Any:
        """Post the remote trace of one batch without waiting: nnsight's ``RemoteBackend`` in
        non-blocking mode, holding the job id NDIF assigned (see ``repe.remote.RemoteJob``)."""
        _, backend = self._trace(
            lm, batch, sites, rows, lambda m: remote_backend(lm, m, blocking=False)
        )
        return backend

    def request(
        self, lm: LoadedModel, batch: TokenBatch, sites: list[Site], rows: Rows | None = None
    ) -> Any:
        """The :class:`repe.remote.RemoteRequest` a remote run of one batch would send (not sent)."""
        _, dry = self._trace(lm, batch, sites, rows, lambda m: remote_backend(lm, m, dry_run=True))
        return dry.built

    @staticmethod
    def deliver(lm: LoadedModel, sites: list[Site], saved: list[Any], sink: Sink) -> None:
        """Hand the values a trace saved (in execution order) to the sink, per-head sites split."""
        config: Any = lm.model.config
        n_heads = int(config.num_attention_heads)
        ordered = sorted(sites, key=execution_key)
        if len(saved) != len(ordered):
            raise RepeError(f"the trace saved {len(saved)} values for {len(ordered)} sites")
        for site, value in zip(ordered, saved, strict=True):
            act = first_tensor(value)
            if site.hf_hook.per_head:
                act = act.reshape(*act.shape[:-1], n_heads, -1)
            sink(site, act)

    def _trace(
        self,
        lm: LoadedModel,
        batch: TokenBatch,
        sites: list[Site],
        rows: Rows | None,
        make_backend: Callable[[Any], Any] | None,
    ) -> tuple[list[Any] | None, Any]:
        """Run the trace that saves ``sites``: locally (``make_backend`` None; returns the saved
        list) or through the nnsight backend ``make_backend(model)`` builds (returned as well)."""
        nnsight = require("nnsight", "backends")
        model, lock = _MODELS.get(lm)
        ordered = sorted(sites, key=execution_key)  # a trace must read values in execution order
        paths = [envoy_path(lm, site) for site in ordered]
        for site, where in zip(ordered, paths, strict=True):
            try:
                model.get(where.rsplit(".", 1)[0])
            except AttributeError as exc:
                raise RepeError(
                    f"site {site.name}: no module at nnsight path {where!r} in "
                    f"{type(lm.model).__name__}; check layers_template or use backend='hf'"
                ) from exc
        # a remote run's inputs travel in the request from the CPU (the model may be on meta here)
        dev = lm.device if make_backend is None else torch.device("cpu")
        # plain locals only: a remote body ships with the values it reads, and ``self`` (a class of
        # this package, which NDIF does not have) must not be one of them
        stop_early = self.stop_early
        keep = None if rows is None else (rows[0].cpu(), rows[1].cpu())
        with lock, torch.inference_mode():
            backend = None if make_backend is None else make_backend(model)
            with model.trace(
                input_ids=batch.input_ids.to(dev),
                attention_mask=batch.attention_mask.to(dev),
                position_ids=batch.position_ids.to(dev),
                use_cache=False,
                backend=backend,
            ) as tracer:
                # one saved value, the list: its items are not marked, or the loop variable
                # holding the last one would be sent back too
                saved = nnsight.save([])
                for path in paths:
                    value = model.get(path)
                    if keep is not None:  # only the kept tokens: [N, ...]
                        value = value[0] if isinstance(value, tuple) else value
                        value = value[keep[0].to(value.device), keep[1].to(value.device)]
                    saved.append(value)
                if stop_early:
                    tracer.stop()
        return (saved if backend is None else None), backend
