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

``backend="nnsight", remote=True`` runs the steered forward on NDIF (see :mod:`repe.remote`). A remote
trace body ships as source with the values it reads, and NDIF does not have this package: the local
``nnsight`` path's steering functions (closures over ``apply_operator`` and a ``ResolvedSteering``)
would be pickled by reference to ``steering`` modules and fail to load there. The remote body instead
applies each built-in operator in one affine form, written with torch operations on tensors that
travel in the request (per site: unit direction, whether to project it out, the vector to add,
whether to restore the norm, and the ``[B, T]`` token mask), and saves only the logits.
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
from repe.remote import (
    Keep,
    OnHost,
    RemoteError,
    RemoteJob,
    RemoteRequest,
    check_remote,
    refuse_weightless,
    remote_backend,
)
from repe.sites import Site, parse_site
from steering.hooks import SeqState, TokenInfo, apply_operator, position_mask, steer
from steering.operators import op_ablate, op_ablate_add, op_add, op_add_norm_preserving, op_clamp
from steering.spec import ResolvedSteering, SteeringSpec, resolve

BackendName = Literal["hf", "transformer_lens", "nnsight"]
BACKENDS: tuple[str, ...] = ("hf", "transformer_lens", "nnsight")
# a steering function for one site: the site's activation [B, T, d] -> the steered activation
SiteFn = Callable[[torch.Tensor], torch.Tensor]
# one operator of a remote run, as the trace body applies it (every tensor on the CPU, sent along):
# (unit direction u [d], project u out first, vector to add [d], restore |h|, token mask [B, T])
RemoteOp = tuple[torch.Tensor, bool, torch.Tensor, bool, torch.Tensor]
# one steered site of a remote run: (envoy path, "input" or "output", its operators in order)
RemoteStep = tuple[str, str, list[RemoteOp]]


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


def _check(
    lm: LoadedModel, spec: SteeringSpec | None, backend: str, remote: bool = False
) -> ResolvedSteering | None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if remote:
        if backend != "nnsight":
            raise ValueError(
                "remote=True runs on NDIF through nnsight: pass backend='nnsight' "
                f"(got backend={backend!r})"
            )
        check_remote(lm)  # the API key first: nothing is built without one
    else:
        refuse_weightless(lm)
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
    # a remote run's tensors travel in the request: built on the CPU (the model may have no weights)
    return resolve(OnHost.of(lm) if remote else lm, spec)


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


# the built-in operators in the remote body's affine form, keyed by the operator's function (a
# custom operator, or a built-in name rebound to another function, has no form and is refused)
def _form_add(
    delta: torch.Tensor, u: torch.Tensor, value: float
) -> tuple[bool, torch.Tensor, bool]:
    return False, delta, False


def _form_add_norm_preserving(
    delta: torch.Tensor, u: torch.Tensor, value: float
) -> tuple[bool, torch.Tensor, bool]:
    return False, delta, True


def _form_ablate(
    delta: torch.Tensor, u: torch.Tensor, value: float
) -> tuple[bool, torch.Tensor, bool]:
    return True, torch.zeros_like(u), False


def _form_ablate_add(
    delta: torch.Tensor, u: torch.Tensor, value: float
) -> tuple[bool, torch.Tensor, bool]:
    return True, delta, False


def _form_clamp(
    delta: torch.Tensor, u: torch.Tensor, value: float
) -> tuple[bool, torch.Tensor, bool]:
    return True, value * u, False


_REMOTE_FORMS: dict[Callable[..., torch.Tensor], Callable[..., tuple[bool, torch.Tensor, bool]]] = {
    op_add: _form_add,
    op_add_norm_preserving: _form_add_norm_preserving,
    op_ablate: _form_ablate,
    op_ablate_add: _form_ablate_add,
    op_clamp: _form_clamp,
}


def _remote_steps(
    lm: LoadedModel, resolved: ResolvedSteering | None, batch: TokenBatch
) -> list[RemoteStep]:
    """The steering of a remote run as plain data and CPU tensors, one step per steered site in
    execution order (repeated sites once, their operators in order)."""
    from repe.backends.nnsight import envoy_path

    if resolved is None:
        return []
    form = _REMOTE_FORMS.get(resolved.operator.fn)
    if form is None:
        raise NotImplementedError(
            f"operator {resolved.operator.name!r} cannot run remotely: NDIF runs only the torch "
            f"operations sent in the request, written for the built-in operators "
            f"('add', 'add_norm_preserving', 'ablate', 'ablate_add', 'clamp')"
        )
    cpu = torch.device("cpu")
    real = batch.attention_mask.to(cpu).bool()
    mask = token_mask(
        resolved, real, batch.position_ids.to(cpu), None, batch.input_ids.to(cpu)
    ).cpu()
    named = sorted(((parse_site(n), n) for n in resolved.sites), key=lambda x: execution_key(x[0]))
    steps: list[RemoteStep] = []
    for site in dict.fromkeys(s for s, _ in named):  # execution order, repeated sites once
        path, where = envoy_path(lm, site).rsplit(".", 1)
        ops: list[RemoteOp] = []
        for s, name in named:
            if s != site:
                continue
            u = resolved.units[name].detach().to(cpu)
            project, shift, renorm = form(
                resolved.deltas[name].detach().to(cpu), u, resolved.clamp_values[name]
            )
            ops.append((u, project, shift.to(cpu), renorm, mask))
        steps.append((path, where, ops))
    return steps


def _last_rows(batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(len(batch.lengths))
    last = torch.tensor([o + n - 1 for o, n in zip(batch.offsets, batch.lengths, strict=True)])
    return rows, last


def _trace_remote(
    lm: LoadedModel,
    resolved: ResolvedSteering | None,
    batch: TokenBatch,
    last_only: bool,
    make_backend: Callable[[Any], Any],
) -> Any:
    """Build (and, depending on the backend, send) the remote trace of a steered forward; returns
    the nnsight backend used. The body reads only ``model``, ``steps``, ``select`` and ``torch``."""
    from repe.backends.nnsight import _MODELS

    model, lock = _MODELS.get(lm)
    steps = _remote_steps(lm, resolved, batch)
    for module_path in dict.fromkeys(step[0] for step in steps):
        try:
            model.get(module_path)
        except AttributeError as exc:
            raise RepeError(
                f"no module at nnsight path {module_path!r} in {type(lm.model).__name__}; check "
                f"layers_template"
            ) from exc
    select = _last_rows(batch) if last_only else None  # the server keeps only these logits
    with lock, torch.inference_mode():
        backend = make_backend(model)
        with model.trace(
            input_ids=batch.input_ids.cpu(),
            attention_mask=batch.attention_mask.cpu(),
            position_ids=batch.position_ids.cpu(),
            use_cache=False,
            backend=backend,
        ):
            for path, where, ops in steps:  # a trace must touch modules in execution order
                envoy = model.get(path)
                value = envoy.input if where == "input" else envoy.output
                h = value[0] if isinstance(value, tuple) else value
                for unit, project, shift, renorm, mask in ops:
                    u = unit.to(h.device, h.dtype)
                    new = h - (h @ u).unsqueeze(-1) * u if project else h
                    new = new + shift.to(h.device, h.dtype)
                    if renorm:
                        norm = new.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                        new = new * (h.norm(dim=-1, keepdim=True) / norm)
                    h = torch.where(mask.to(h.device).unsqueeze(-1), new, h)
                if isinstance(value, tuple):
                    h = (h, *value[1:])
                if where == "input":
                    envoy.input = h
                else:
                    envoy.output = h
            logits = model.output["logits"]
            if select is not None:
                logits = logits[select[0].to(logits.device), select[1].to(logits.device)]
            logits = logits.save()
    return backend


def _remote_logits(result: Any) -> torch.Tensor:
    if not isinstance(result, dict) or not isinstance(result.get("logits"), torch.Tensor):
        raise RemoteError(f"NDIF sent back no logits (got {type(result).__name__})")
    return result["logits"]


def _finish(
    batch: TokenBatch, logits: torch.Tensor, last_only: bool, gathered: bool
) -> torch.Tensor:
    if gathered:  # a remote run kept only each row's last real token
        return logits
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


def submit_steered_logits(
    lm: LoadedModel,
    spec: SteeringSpec | None,
    inputs: Inputs | TokenBatch,
    padding_side: Literal["left", "right"] = "left",
    last_only: bool = False,
) -> RemoteJob[torch.Tensor]:
    """``steered_logits(..., backend="nnsight", remote=True)`` without waiting: the job is posted
    to NDIF now; the returned :class:`repe.remote.RemoteJob` polls it (``status()``) and
    ``result()`` gives the logits ``steered_logits`` would have returned."""
    resolved = _check(lm, spec, "nnsight", remote=True)
    batch = _as_batch(lm, inputs, padding_side)
    job = _trace_remote(
        lm, resolved, batch, last_only, lambda m: remote_backend(lm, m, blocking=False)
    )

    def finish(results: list[dict[str, Any]]) -> torch.Tensor:
        return _finish(batch, _remote_logits(results[0]), last_only, last_only)

    return RemoteJob([job], finish)


def steered_logits_request(
    lm: LoadedModel,
    spec: SteeringSpec | None,
    inputs: Inputs | TokenBatch,
    padding_side: Literal["left", "right"] = "left",
    last_only: bool = False,
) -> RemoteRequest:
    """The request ``steered_logits(..., backend="nnsight", remote=True)`` would send to NDIF,
    built and not sent (:class:`repe.remote.RemoteRequest`: nnsight's serialised trace)."""
    resolved = _check(lm, spec, "nnsight", remote=True)
    batch = _as_batch(lm, inputs, padding_side)
    dry = _trace_remote(
        lm, resolved, batch, last_only, lambda m: remote_backend(lm, m, dry_run=True)
    )
    built: RemoteRequest = dry.built
    return built


def steered_logits(
    lm: LoadedModel,
    spec: SteeringSpec | None,
    inputs: Inputs | TokenBatch,
    backend: BackendName | str = "hf",
    padding_side: Literal["left", "right"] = "left",
    last_only: bool = False,
    *,
    remote: bool = False,
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

    ``remote=True`` (with ``backend="nnsight"``) runs the forward on NDIF: the model must be named
    by a hub id NDIF serves, the API key is read from ``NDIF_API_KEY`` (see :mod:`repe.remote`), the
    built-in operators are supported, and only the logits (with ``last_only``, only each row's last
    one) come back. :func:`submit_steered_logits` is the same without waiting.
    """
    resolved = _check(lm, spec, backend, remote)
    batch = _as_batch(lm, inputs, padding_side)
    if remote:
        kept = _trace_remote(lm, resolved, batch, last_only, lambda m: Keep(remote_backend(lm, m)))
        return _finish(batch, _remote_logits(kept.result), last_only, last_only)
    if backend == "hf":
        logits = _run_hf(lm, spec, batch)
    elif backend == "transformer_lens":
        logits = _run_transformer_lens(lm, resolved, batch)
    else:
        logits = _run_nnsight(lm, resolved, batch)
    return _finish(batch, logits, last_only, False)
