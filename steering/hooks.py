"""The steering context manager: hooks gated by a context variable.

``with steer(lm, spec):`` registers hooks (prepended, so anything that reads the same site sees the
steered values) and removes every one of them on exit, also after an exception, also when set-up fails
half-way. The hooks act only for forward passes run in the context (thread / asyncio task) that
entered the ``with`` block: the steering state lives in a :class:`contextvars.ContextVar`, never on the
shared model object, so two threads on one model never steer each other.

Positions are decided per token from what the model is called with (``attention_mask``,
``position_ids``, the KV cache length), so results are the same with and without the KV cache, and
padding is never steered.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from repe.backends.hf import first_tensor, site_module
from repe.hooks import mark
from repe.kvcache import cache_length
from repe.models import LoadedModel
from repe.sites import Site, parse_site
from steering.spec import ResolvedSteering, SteeringSpec, resolve

_ACTIVE: contextvars.ContextVar[dict[int, SteerState] | None] = contextvars.ContextVar(
    "repe_steering_active", default=None
)
_IDS = itertools.count(1)


@dataclass
class TokenInfo:
    """The tokens of the current forward call: real-token position, real mask, prompt mask."""

    pos: torch.Tensor  # [B, T] index among the row's real tokens
    real: torch.Tensor  # [B, T] bool, False on padding
    ids: torch.Tensor | None  # [B, T] token ids when called with input_ids


@dataclass
class SteerState:
    """Per-context state of one active steering (lives in the context variable, not on the model)."""

    resolved: ResolvedSteering
    prompt_lengths: torch.Tensor | None = None  # [B] real prompt tokens
    assistant_starts: torch.Tensor | None = None  # [B] real-token index of the assistant turn
    decisions: torch.Tensor | None = None  # [B] bool, conditional steering
    info: TokenInfo | None = None
    mask: torch.Tensor | None = None  # [B, T] tokens of the current call to steer; None = all
    last_shape: tuple[int, int] | None = None  # (B, T) of the last call that had no KV cache
    explicit: bool = False  # begin_sequence() was called: the next prefill must not reset

    def begin_sequence(
        self,
        prompt_lengths: torch.Tensor | None = None,
        assistant_starts: torch.Tensor | None = None,
    ) -> None:
        """Start a new generation: forget prompt lengths and conditional decisions."""
        self.prompt_lengths = prompt_lengths
        self.assistant_starts = assistant_starts
        self.decisions = None
        self.last_shape = None
        self.explicit = True

    def observe_call(self, b: int, t: int, past_len: int) -> None:
        """Detect a new sequence: a call without KV cache that does not extend the last one by a token
        (generation without cache re-runs the whole sequence, one token longer each step)."""
        if past_len == 0:
            extends = self.last_shape is not None and self.last_shape == (b, t - 1)
            if not extends and not self.explicit:
                self.prompt_lengths = None
                self.assistant_starts = None
                self.decisions = None
            self.explicit = False
            self.last_shape = (b, t)


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


def _active_state(key: int) -> SteerState | None:
    active = _ACTIVE.get()
    return None if active is None else active.get(key)


def position_mask(state: SteerState, info: TokenInfo) -> torch.Tensor | None:
    """[B, T] bool of tokens to steer, or None meaning 'every token' (fast path)."""
    r = state.resolved
    policy = r.positions
    mask: torch.Tensor | None
    if policy == "all":
        mask = None if bool(info.real.all()) else info.real
    else:
        if state.prompt_lengths is None:
            # first call of a sequence: the prompt is what the model sees first
            state.prompt_lengths = info.real.sum(-1)
            if policy == "assistant" and state.assistant_starts is None:
                if info.ids is None:
                    raise ValueError("positions='assistant' needs the model called with input_ids")
                state.assistant_starts = r.find_assistant_starts(info.ids, info.real)
        plen = state.prompt_lengths.to(info.pos.device).unsqueeze(-1)
        if policy == "prompt":
            mask = info.pos < plen
        elif policy == "generated":
            mask = info.pos >= plen
        elif policy == "assistant":
            assert state.assistant_starts is not None
            mask = info.pos >= state.assistant_starts.to(info.pos.device).unsqueeze(-1)
        else:  # explicit token indices (non-negative, among real tokens)
            idx = torch.tensor(r.token_indices, device=info.pos.device)
            mask = (info.pos.unsqueeze(-1) == idx).any(-1)
        mask = mask & info.real
    if state.decisions is not None:
        gate = state.decisions.to(info.real.device).unsqueeze(-1)
        mask = gate & (info.real if mask is None else mask)
    return mask


def apply_operator(h: torch.Tensor, state: SteerState, site: str) -> torch.Tensor:
    r = state.resolved
    mask = state.mask
    delta = r.deltas[site].to(h.dtype)
    u = r.units[site].to(h.dtype)
    fn = r.operator.fn
    if mask is None:
        return fn(h, delta, u, r.clamp_value(site))
    new = fn(h, delta, u, r.clamp_value(site))
    return torch.where(mask.unsqueeze(-1), new, h)


def _decide(state: SteerState, h: torch.Tensor, info: TokenInfo) -> None:
    """Conditional steering: decide per sequence from the prompt's mean activation at the condition site."""
    cond = state.resolved.condition
    assert cond is not None
    real = info.real.unsqueeze(-1).to(h.dtype)
    mean = (h * real).sum(1) / real.sum(1).clamp(min=1)
    proj = mean.float() @ cond.unit.to(h.device).float()
    state.decisions = proj > cond.threshold if cond.above else proj < cond.threshold


@contextlib.contextmanager
def steer(lm: LoadedModel, spec: SteeringSpec) -> Iterator[SteerState]:
    """Apply a steering spec to ``lm`` for forward passes run inside the ``with`` block (this context)."""
    resolved = resolve(lm, spec)
    key = next(_IDS)
    state = SteerState(resolved)
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def pre_backbone(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        st = _active_state(key)
        if st is None:
            return
        info = _token_info(args, kwargs)
        b, t = info.real.shape
        st.observe_call(b, t, cache_length(kwargs))
        st.info = info
        if st.resolved.condition is not None and st.decisions is None:
            st.mask = None  # decided at the condition site, before any steered site runs
        else:
            st.mask = position_mask(st, info)

    def make_post(site: str) -> Any:
        def hook(_m: Any, _a: Any, out: Any) -> Any:
            st = _active_state(key)
            if st is None:
                return None
            h = first_tensor(out)
            new = apply_operator(h, st, site)
            if isinstance(out, tuple):
                return (new, *out[1:])
            return new

        return mark(hook)

    def make_pre(site: str) -> Any:
        def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            st = _active_state(key)
            if st is None:
                return None
            if args:
                return ((apply_operator(args[0], st, site), *args[1:]), kwargs)
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = apply_operator(kwargs["hidden_states"], st, site)
            return (args, kwargs)

        return mark(hook)

    def make_condition(site: Site) -> Any:
        def hook(h: torch.Tensor) -> None:
            st = _active_state(key)
            if st is None or st.decisions is not None or st.info is None:
                return
            _decide(st, h, st.info)
            st.mask = position_mask(st, st.info)

        return hook

    token = _ACTIVE.set({**(_ACTIVE.get() or {}), key: state})
    try:
        handles.append(
            lm.backbone.register_forward_pre_hook(
                mark(pre_backbone), with_kwargs=True, prepend=True
            )
        )
        if resolved.condition is not None:
            from repe.backends.hf import register_capture

            handles.append(
                register_capture(
                    lm, resolved.condition.site, mark(make_condition(resolved.condition.site))
                )
            )
        for name in resolved.sites:
            site = parse_site(name)
            module = site_module(lm, site)
            if site.hf_hook.hook == "pre":
                handles.append(
                    module.register_forward_pre_hook(make_pre(name), with_kwargs=True, prepend=True)
                )
            else:
                handles.append(module.register_forward_hook(make_post(name), prepend=True))
        yield state
    finally:
        for h in handles:
            h.remove()
        _ACTIVE.reset(token)
