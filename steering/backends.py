"""Steered logits through every back-end: the same spec through ``hf``, ``transformer_lens`` and
``nnsight`` gives the same logits.

* ``hf`` runs ``lm.model`` inside :func:`steering.hooks.steer` (the reference).
* ``transformer_lens`` applies the resolved operator at the canonical hook names through the cached
  ``TransformerBridge``'s own hook mechanism (``bridge.hooks(fwd_hooks=...)``, removed on exit).
* ``nnsight`` replaces the site's value inside the trace (``envoy.output = ...`` / ``envoy.input = ...``
  at ``Site.nnsight_path``); interventions live only as long as the trace.

All three see the same token batch (``repe.batching.encode`` + ``make_batch``), reuse :func:`resolve`
and the operator functions, and select tokens with the same position logic as the ``hf`` hooks
(:func:`token_mask`), so padding is never steered. The ``transformer_lens`` and ``nnsight`` back-ends
run on views of the model that share its weights (see :mod:`repe.backends.transformer_lens`);
``lm.model`` itself never carries their hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal

import torch

from repe.backends.hf import execution_key, first_tensor
from repe.batching import Inputs, TokenBatch, encode, make_batch
from repe.errors import RepeError
from repe.models import LoadedModel
from repe.sites import Site, parse_site
from steering.hooks import SeqState, TokenInfo, apply_operator, position_mask, steer
from steering.spec import ResolvedSteering, SteeringSpec, resolve

BackendName = Literal["hf", "transformer_lens", "nnsight"]
BACKENDS: tuple[str, ...] = ("hf", "transformer_lens", "nnsight")
# a steering function for one site: the site's activation [B, T, d] -> the steered activation
SiteFn = Callable[[torch.Tensor], torch.Tensor]


def token_mask(
    resolved: ResolvedSteering,
    real_mask: torch.Tensor,
    pos: torch.Tensor,
    prompt_lengths: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, T]`` bool of the tokens a steering acts on in one forward pass (never padding).

    ``real_mask`` is ``[B, T]`` (False on padding), ``pos`` the ``[B, T]`` index of each token among
    its row's real tokens, ``prompt_lengths`` ``[B]`` real prompt tokens (default: every real token of
    this call is prompt), ``input_ids`` is needed for ``positions='assistant'``. This is the same code
    the ``hf`` hooks run (conditional gating aside), so every back-end selects the same tokens.
    """
    real = real_mask.bool()
    seq = SeqState(prompt_lengths) if prompt_lengths is not None else None
    mask, _ = position_mask(resolved, seq, TokenInfo(pos=pos.long(), real=real, ids=input_ids))
    return real.clone() if mask is None else mask


def _check(lm: LoadedModel, spec: SteeringSpec | None, backend: str) -> ResolvedSteering | None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if spec is None:
        return None
    if spec.positions == "generated":
        raise ValueError(
            "positions='generated' steers only tokens produced by generation; steered_logits runs "
            "one forward pass over the inputs, where no token is generated. Use positions='all' "
            "(or 'prompt', which here means every real token) or steering.generate"
        )
    if spec.condition is not None and backend != "hf":
        raise NotImplementedError(
            f"conditional steering (SteeringSpec.condition) is implemented for backend='hf' only; "
            f"got backend={backend!r}"
        )
    return resolve(lm, spec)


def _as_batch(
    lm: LoadedModel, inputs: Inputs | TokenBatch, padding_side: Literal["left", "right"]
) -> TokenBatch:
    if isinstance(inputs, TokenBatch):
        return inputs
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")
    pad_id = lm.tokenizer.pad_token_id
    return make_batch(encode(lm.tokenizer, inputs), int(pad_id), padding_side)


def _site_fns(
    resolved: ResolvedSteering, batch: TokenBatch, device: torch.device
) -> list[tuple[Site, SiteFn]]:
    """One function per steered site (repeated sites repeat), in execution order."""
    real = batch.attention_mask.to(device).bool()
    mask = token_mask(
        resolved, real, batch.position_ids.to(device), None, batch.input_ids.to(device)
    )
    out: list[tuple[Site, SiteFn]] = []
    for name in resolved.sites:

        def fn(h: torch.Tensor, name: str = name) -> torch.Tensor:
            return apply_operator(h, resolved, mask, name)

        out.append((parse_site(name), fn))
    return sorted(out, key=lambda item: execution_key(item[0]))


def _run_hf(lm: LoadedModel, spec: SteeringSpec | None, batch: TokenBatch) -> torch.Tensor:
    dev = lm.device
    ctx = steer(lm, spec) if spec is not None else contextlib.nullcontext()
    with torch.inference_mode(), ctx as state:
        if state is not None:
            state.begin_batch(batch)  # the whole input is the prompt
        out = lm.model(
            input_ids=batch.input_ids.to(dev),
            attention_mask=batch.attention_mask.to(dev),
            position_ids=batch.position_ids.to(dev),
            use_cache=False,
        )
    return out.logits


def _run_transformer_lens(
    lm: LoadedModel, resolved: ResolvedSteering | None, batch: TokenBatch
) -> torch.Tensor:
    from repe.backends.transformer_lens import _BRIDGES, _hook_name

    bridge, lock = _BRIDGES.get(lm)
    dev = lm.device
    with lock, torch.inference_mode():
        fwd_hooks: list[tuple[str, Any]] = []
        if resolved is not None:
            for site, fn in _site_fns(resolved, batch, dev):

                def hook(act: torch.Tensor, *, hook: Any, fn: SiteFn = fn) -> torch.Tensor:
                    return fn(act)

                fwd_hooks.append((_hook_name(bridge, site), hook))
        with bridge.hooks(fwd_hooks=fwd_hooks):
            return bridge(
                batch.input_ids.to(dev),
                return_type="logits",
                attention_mask=batch.attention_mask.to(dev),
                position_ids=batch.position_ids.to(dev),
                use_cache=False,
            )


def _run_nnsight(
    lm: LoadedModel, resolved: ResolvedSteering | None, batch: TokenBatch
) -> torch.Tensor:
    from repe.backends.nnsight import _MODELS, envoy_path

    model, lock = _MODELS.get(lm)
    dev = lm.device
    steps: list[tuple[Any, str, list[SiteFn]]] = []  # (envoy, "input"/"output", fns) in order
    if resolved is not None:
        fns = _site_fns(resolved, batch, dev)
        for site in dict.fromkeys(s for s, _ in fns):  # execution order, repeated sites once
            path, where = envoy_path(lm, site).rsplit(".", 1)
            try:
                envoy = model.get(path)
            except AttributeError as exc:
                raise RepeError(
                    f"site {site.name}: no module at nnsight path {path!r} in "
                    f"{type(lm.model).__name__}; check layers_template or use backend='hf'"
                ) from exc
            steps.append((envoy, where, [f for s, f in fns if s == site]))
    with lock, torch.inference_mode():
        with model.trace(
            input_ids=batch.input_ids.to(dev),
            attention_mask=batch.attention_mask.to(dev),
            position_ids=batch.position_ids.to(dev),
            use_cache=False,
        ):
            for envoy, where, site_fns in steps:  # a trace must touch modules in execution order
                if where == "input":
                    h = envoy.input
                    for f in site_fns:
                        h = f(h)
                    envoy.input = h
                else:
                    value = envoy.output
                    h = first_tensor(value)
                    for f in site_fns:
                        h = f(h)
                    envoy.output = (h, *value[1:]) if isinstance(value, tuple) else h
            out = model.output.save()
    return out["logits"]


def steered_logits(
    lm: LoadedModel,
    spec: SteeringSpec | None,
    inputs: Inputs | TokenBatch,
    backend: BackendName | str = "hf",
    padding_side: Literal["left", "right"] = "left",
    last_only: bool = False,
) -> torch.Tensor:
    """Logits of ``inputs`` with ``spec`` applied (``None``: unsteered) through ``backend``.

    ``inputs`` are texts or chat conversations (tokenised with :func:`repe.batching.encode` and padded
    on ``padding_side``) or a ready :class:`~repe.batching.TokenBatch`. Returns ``[B, T, vocab]``
    with zeros at padded positions (a padded query attends to nothing, and back-ends disagree on what
    it computes; padding is never steered), or with ``last_only=True`` the logits at each row's last
    real token, ``[B, vocab]``.

    Positions: ``all``, explicit real-token indices, ``prompt`` (every real token: there is no
    generation here) and ``assistant`` (chat inputs); ``generated`` is refused. Conditional steering
    is ``hf`` only. No hook or intervention outlives the call, also when it raises.
    """
    resolved = _check(lm, spec, backend)
    batch = _as_batch(lm, inputs, padding_side)
    if backend == "hf":
        logits = _run_hf(lm, spec, batch)
    elif backend == "transformer_lens":
        logits = _run_transformer_lens(lm, resolved, batch)
    else:
        logits = _run_nnsight(lm, resolved, batch)
    # padded positions attend to nothing; back-ends disagree on what such a row computes
    real = batch.attention_mask.to(logits.device).bool().unsqueeze(-1)
    logits = logits.masked_fill(~real, 0.0)
    if not last_only:
        return logits
    last = torch.tensor(
        [off + n - 1 for off, n in zip(batch.offsets, batch.lengths, strict=True)],
        device=logits.device,
    )
    return logits[torch.arange(logits.shape[0], device=logits.device), last]
