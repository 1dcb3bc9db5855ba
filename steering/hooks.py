"""The steering context manager: hooks gated by context variables.

``with steer(lm, spec):`` registers hooks (prepended, so anything that reads the same site sees the
steered values) and removes every one of them on exit, also after an exception, also when set-up fails
half-way. The hooks act only for forward passes run in the context (thread / asyncio task) that
entered the ``with`` block: which steerings are on, the state of the current sequence and the state of
the current forward call all live in :class:`contextvars.ContextVar` s, never on the shared model object,
and every write replaces the context's value (copy on write) instead of changing a shared object. So
two threads on one model never steer each other, and two contexts copied from one (``asyncio.to_thread``,
``contextvars.copy_context().run``, a thread pool) never share per-sequence state.

Sequence boundaries are declared, never guessed from tensor shapes: ``state.begin_sequence(...)`` says
where a batch's prompts end (and where their assistant turns start). Positions ``prompt``,
``generated`` and ``assistant`` and conditional steering need it (the library's own generation and
evaluation declare every sequence); ``all`` and explicit token indices need nothing. Within a declared
sequence, each forward call must continue it (the KV cache holds exactly the tokens seen so far, or,
without a cache, the call re-runs them plus new ones); anything else is a new sequence that was not
declared, and is refused with a clear error.

Positions are decided per token from what the model is called with (``attention_mask``,
``position_ids``, the KV cache length), so results are the same with and without the KV cache, and
padding is never steered.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from repe.backends.hf import first_tensor, site_module
from repe.batching import TokenBatch
from repe.hooks import hook_scope
from repe.kvcache import cache_length
from repe.models import LoadedModel
from repe.sites import parse_site
from steering.intervention import Intervention, Resolved, TorchHook, as_resolved

_V = TypeVar("_V")
# (which steerings are on in this context is the hook scope's business: repe.hooks.hook_scope)
# the declared sequence of each steering in this context
_SEQ: contextvars.ContextVar[dict[int, SeqState] | None] = contextvars.ContextVar(
    "repe_steering_sequence", default=None
)
# the forward call in progress of each steering in this context
_CALL: contextvars.ContextVar[dict[int, CallState] | None] = contextvars.ContextVar(
    "repe_steering_call", default=None
)


def _put(var: contextvars.ContextVar[dict[int, _V] | None], key: int, value: _V | None) -> None:
    """Copy-on-write update of a per-context mapping: a copied context never sees this write."""
    cur = dict(var.get() or {})
    if value is None:
        cur.pop(key, None)
    else:
        cur[key] = value
    var.set(cur)


@dataclass
class TokenInfo:
    """The tokens of the current forward call: real-token position, real mask, prompt mask."""

    pos: Int[Tensor, "b t"]  # index among the row's real tokens
    real: Bool[Tensor, "b t"]  # False on padding
    ids: Int[Tensor, "b t"] | None  # token ids when called with input_ids


@dataclass(frozen=True)
class SeqState:
    """One declared sequence (a batch of prompts and what is generated after them). Immutable: an
    update is a new object written to the context."""

    prompt_lengths: torch.Tensor | None = None  # [B] real prompt tokens
    assistant_starts: torch.Tensor | None = None  # [B] real-token index of the assistant turn
    decisions: torch.Tensor | None = None  # [B] bool, conditional steering
    seen: int = 0  # tokens seen so far (KV cache + this call's columns) after the last call
    last_ids: torch.Tensor | None = None  # [B, T] ids of the last call without a KV cache


@dataclass(frozen=True)
class CallState:
    """The forward call in progress: its tokens and which of them to steer (None = every token)."""

    info: TokenInfo
    mask: torch.Tensor | None


def needs_sequence(r: Resolved) -> bool:
    """Whether this steering needs declared sequence boundaries (``begin_sequence``)."""
    return r.positions in ("prompt", "generated", "assistant") or r.condition is not None


class SteerState:
    """The handle ``steer()`` yields: declares sequences and shows the current one's state. Every read
    and write goes to the *calling* context."""

    def __init__(self, resolved: Resolved, key: int) -> None:
        self.resolved = resolved
        self.key = key
        self._last: SeqState | None = None

    def begin_sequence(
        self,
        prompt_lengths: torch.Tensor | None = None,
        assistant_starts: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        """Start a new sequence in this context: ``prompt_lengths`` ``[B]`` real prompt tokens per row
        (or ``attention_mask`` ``[B, T]`` of the prompt batch, whose row sums are those lengths), and
        optionally ``assistant_starts`` ``[B]`` (real-token index where each assistant turn begins;
        found from the token ids at the first call when not given). Forgets conditional decisions."""
        if attention_mask is not None:
            if prompt_lengths is not None:
                raise ValueError("begin_sequence: give prompt_lengths or attention_mask, not both")
            prompt_lengths = attention_mask.long().sum(-1)
        if prompt_lengths is not None:
            prompt_lengths = torch.as_tensor(prompt_lengths).long().reshape(-1)
        _put(_SEQ, self.key, SeqState(prompt_lengths, assistant_starts))

    def begin_batch(self, batch: TokenBatch) -> None:
        """``begin_sequence`` for a :class:`repe.batching.TokenBatch` of prompts (its real lengths and,
        where every row has one, its assistant-turn starts)."""
        starts = batch.assistant_starts
        self.begin_sequence(
            torch.tensor(batch.lengths),
            torch.tensor([int(s) for s in starts])  # type: ignore[arg-type]
            if all(s is not None for s in starts)
            else None,
        )

    @property
    def sequence(self) -> SeqState | None:
        seqs = _SEQ.get()
        seq = seqs.get(self.key) if seqs else None
        return seq if seq is not None else self._last

    @property
    def prompt_lengths(self) -> torch.Tensor | None:
        seq = self.sequence
        return None if seq is None else seq.prompt_lengths

    @property
    def decisions(self) -> torch.Tensor | None:
        seq = self.sequence
        return None if seq is None else seq.decisions

    def _close(self) -> None:
        seqs = _SEQ.get()
        self._last = seqs.get(self.key) if seqs else None


def _token_info(args: tuple[Any, ...], kwargs: dict[str, Any]) -> TokenInfo:
    ids = kwargs.get("input_ids")
    if ids is None and args:
        ids = args[0]
    emb = kwargs.get("inputs_embeds")
    ref = ids if ids is not None else emb
    if ref is None:
        raise ValueError("steering: the model was called without input_ids or inputs_embeds")
    b, t = ref.shape[0], ref.shape[1]
    dev = ref.device
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        real = mask[:, -t:].to(dev).bool()
    else:
        real = torch.ones((b, t), dtype=torch.bool, device=dev)
    pos = kwargs.get("position_ids")
    if not isinstance(pos, torch.Tensor):
        past_len = cache_length(kwargs)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            full = (mask.long().cumsum(-1) - 1).clamp(min=0)
            pos = full[:, -t:].to(dev)
        else:
            pos = (torch.arange(t, device=dev) + past_len).expand(b, t)
    return TokenInfo(pos=pos.to(dev).long().expand(b, t), real=real, ids=ids)


def position_mask(
    r: Resolved, seq: SeqState | None, info: TokenInfo
) -> tuple[torch.Tensor | None, SeqState | None]:
    """``[B, T]`` bool of tokens to steer (None meaning 'every token', the fast path), and the sequence
    state updated by this call (assistant starts found at its first call)."""
    policy = r.positions
    mask: torch.Tensor | None
    if policy == "all":
        mask = None if bool(info.real.all()) else info.real
    elif policy == "index":  # explicit token indices (non-negative, among real tokens)
        idx = torch.tensor(r.token_indices, device=info.pos.device)
        mask = (info.pos.unsqueeze(-1) == idx).any(-1) & info.real
    else:
        if seq is None or seq.prompt_lengths is None:
            seq = SeqState(info.real.sum(-1), None if seq is None else seq.assistant_starts)
        if policy == "assistant" and seq.assistant_starts is None:
            if info.ids is None:
                raise ValueError("positions='assistant' needs the model called with input_ids")
            seq = dataclasses.replace(
                seq, assistant_starts=r.find_assistant_starts(info.ids, info.real)
            )
        assert seq.prompt_lengths is not None
        plen = seq.prompt_lengths.to(info.pos.device).unsqueeze(-1)
        if policy == "prompt":
            mask = info.pos < plen
        elif policy == "generated":
            mask = info.pos >= plen
        else:
            assert seq.assistant_starts is not None
            mask = info.pos >= seq.assistant_starts.to(info.pos.device).unsqueeze(-1)
        mask = mask & info.real
    if seq is not None and seq.decisions is not None:
        gate = seq.decisions.to(info.real.device).unsqueeze(-1)
        mask = gate & (info.real if mask is None else mask)
    return mask, seq


def apply_operator(
    h: torch.Tensor, r: Resolved, mask: torch.Tensor | None, site: str
) -> torch.Tensor:
    """The intervention's activation at ``site``; tokens outside ``mask`` keep ``h``."""
    return r.apply(h, site, mask)


def decide(r: Resolved, h: Float[Tensor, "b t d"], info: TokenInfo) -> Bool[Tensor, " b"]:
    """Conditional steering: ``[B]`` bool per sequence from its prompt's mean activation at the
    condition site."""
    cond = r.condition
    assert cond is not None
    real = info.real.unsqueeze(-1).to(h.device, h.dtype)  # the input's device may not be the site's
    mean = (h * real).sum(1) / real.sum(1).clamp(min=1)
    proj = mean.float() @ cond.unit.to(h.device).float()
    return proj > cond.threshold if cond.above else proj < cond.threshold


_UNDECLARED = (
    "steering with positions={what} needs declared sequence boundaries: call "
    "state.begin_sequence(prompt_lengths=... or attention_mask=...) on the object `with steer(...) as "
    "state` gives, before each new batch (steering.generate and steering.evaluation do this for you)"
)


def _continue(r: Resolved, seq: SeqState | None, info: TokenInfo, past: int) -> SeqState:
    """Check that this forward call belongs to the declared sequence and account for its tokens."""
    what = "condition" if r.condition is not None and r.positions == "all" else repr(r.positions)
    if seq is None:
        raise ValueError(_UNDECLARED.format(what=what))
    b, t = info.real.shape
    if seq.prompt_lengths is not None and seq.prompt_lengths.shape[0] != b:
        raise ValueError(
            f"steering: this forward call has {b} rows but the declared sequence has "
            f"{seq.prompt_lengths.shape[0]}; call state.begin_sequence(...) for the new batch"
        )
    if seq.seen:
        if past:
            ok = past == seq.seen  # the KV cache holds exactly what this sequence has seen
        else:  # without a cache the call re-runs the sequence so far, plus new tokens
            prev = seq.last_ids
            ok = (
                t > seq.seen
                and prev is not None
                and info.ids is not None
                and torch.equal(info.ids[:, : prev.shape[1]].to(prev.device), prev)
            )
        if not ok:
            raise ValueError(
                "steering: a forward call that does not continue the declared sequence (a new "
                "batch?); " + _UNDECLARED.format(what=what).split(": ", 1)[1]
            )
    last = info.ids if not past and info.ids is not None else seq.last_ids
    return dataclasses.replace(seq, seen=past + t, last_ids=last)


@contextlib.contextmanager
def steer(lm: LoadedModel, spec: Intervention) -> Iterator[SteerState]:
    """Apply an intervention (a :class:`SteeringSpec`, or anything implementing
    :class:`steering.intervention.Intervention`) to ``lm`` for the forward passes run inside the
    ``with`` block, in this context."""
    resolved = as_resolved(lm, spec)
    needs = needs_sequence(resolved)
    with hook_scope() as scope:  # every hook below acts only for forward passes inside this scope
        key = scope.key
        state = SteerState(resolved, key)

        def call_state() -> CallState | None:
            calls = _CALL.get()
            return calls.get(key) if calls else None

        def pre_backbone(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            info = _token_info(args, kwargs)
            seq: SeqState | None = None
            if needs:
                seqs = _SEQ.get()
                seq = _continue(
                    resolved, seqs.get(key) if seqs else None, info, cache_length(kwargs)
                )
            if resolved.condition is not None and seq is not None and seq.decisions is None:
                mask = None  # decided at the condition site, before any steered site runs
            else:
                mask, seq = position_mask(resolved, seq, info)
            if seq is not None:
                _put(_SEQ, key, seq)
            _put(_CALL, key, CallState(info, mask))

        def make_post(site: str) -> Any:
            def hook(_m: Any, _a: Any, out: Any) -> Any:
                call = call_state()
                if call is None:
                    return None
                h = first_tensor(out)
                new = resolved.apply(h, site, call.mask)
                if isinstance(out, tuple):
                    return (new, *out[1:])
                return new

            return scope.gate(hook)

        def make_pre(site: str) -> Any:
            def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                call = call_state()
                if call is None:
                    return None
                if args:
                    return ((resolved.apply(args[0], site, call.mask), *args[1:]), kwargs)
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = resolved.apply(kwargs["hidden_states"], site, call.mask)
                return (args, kwargs)

            return scope.gate(hook)

        def make_module_hook(name: str) -> Any:
            def hook(_m: Any, args: tuple[Any, ...], out: Any) -> Any:
                call = call_state()
                if call is None or not args:
                    return None
                return resolved.apply_module(args[0], out, name, call.mask)  # type: ignore[attr-defined]

            return scope.gate(hook)

        def make_torch_hook(th: TorchHook) -> Any:
            if th.kind == "pre":

                def pre(m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                    call = call_state()
                    return None if call is None else th.fn(m, args, kwargs, call.mask)

                return scope.gate(pre)

            def post(m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
                call = call_state()
                return None if call is None else th.fn(m, args, kwargs, out, call.mask)

            return scope.gate(post)

        def condition_hook(h: torch.Tensor) -> None:
            call = call_state()
            seqs = _SEQ.get()
            seq = seqs.get(key) if seqs else None
            if call is None or seq is None or seq.decisions is not None:
                return
            seq = dataclasses.replace(seq, decisions=decide(resolved, h, call.info))
            mask, seq = position_mask(resolved, seq, call.info)
            assert seq is not None
            _put(_SEQ, key, seq)
            _put(_CALL, key, CallState(call.info, mask))

        try:
            scope.add(
                lm.backbone.register_forward_pre_hook(
                    scope.gate(pre_backbone), with_kwargs=True, prepend=True
                )
            )
            if resolved.condition is not None:
                from repe.backends.hf import register_capture

                scope.add(register_capture(lm, resolved.condition.site, scope.gate(condition_hook)))
            for name in resolved.sites:
                site = parse_site(name)
                module = site_module(lm, site)
                if site.hf_hook.hook == "pre":
                    scope.add(
                        module.register_forward_pre_hook(
                            make_pre(name), with_kwargs=True, prepend=True
                        )
                    )
                else:
                    scope.add(module.register_forward_hook(make_post(name), prepend=True))
            # interventions that change a module's output from its input (low-rank adapters) name
            # the modules: ``module_hooks`` maps a name to the module, ``apply_module`` gives the output
            for name, module in (getattr(resolved, "module_hooks", None) or {}).items():
                scope.add(module.register_forward_hook(make_module_hook(name), prepend=True))
            # interventions that extend a computation inside a block (Aligner) bring their own hooks
            for th in getattr(resolved, "torch_hooks", None) or ():
                if th.kind == "pre":
                    scope.add(
                        th.module.register_forward_pre_hook(
                            make_torch_hook(th), with_kwargs=True, prepend=True
                        )
                    )
                elif th.kind == "post":
                    scope.add(
                        th.module.register_forward_hook(
                            make_torch_hook(th), with_kwargs=True, prepend=True
                        )
                    )
                else:
                    raise ValueError(f"TorchHook kind must be 'pre' or 'post'; got {th.kind!r}")
            yield state
        finally:
            state._close()
            _put(_SEQ, key, None)
            _put(_CALL, key, None)
