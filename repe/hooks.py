"""Hooks this workbench registers: one gate that scopes them to a context, and bookkeeping so that
leaks can be detected.

:func:`hook_scope` is the only gating helper: capture, CAA's letter-pair capture and ``steer()`` register
their hooks through a :class:`HookScope`, whose gated hooks act only for forward passes run inside it.

transformers itself keeps hooks on some modules (output recorders), so "no hooks at all" is the wrong
test; every hook registered here carries a marker instead, and :func:`leftover_hooks` lists marked ones.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

from torch import nn
from torch.utils.hooks import RemovableHandle

F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__repe_hook__"


def mark(fn: F) -> F:
    """Tag a hook function as ours."""
    setattr(fn, _MARK, True)
    return fn


def leftover_hooks(model: nn.Module) -> list[str]:
    """Names of modules that still carry a hook registered by this workbench (empty when clean)."""
    out = []
    for name, module in model.named_modules():
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        if any(getattr(h, _MARK, False) for h in hooks):
            out.append(name or "<root>")
    return out


# ---- one gate for every hook this workbench registers ---------------------------------------------
# Hooks sit on modules shared by every thread and task; each scope's hooks act only for forward passes
# run in a context where that scope is open (the context that entered it, and contexts copied from it
# while it was open). Capture, CAA's letter-pair capture and steering all gate through this.
_OPEN: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "repe_hook_scopes", default=frozenset()
)
_SCOPE_IDS = itertools.count(1)


class HookScope:
    """The hooks of one scope: :meth:`gate` wraps a hook so that it runs only inside the scope,
    :meth:`add` keeps a handle for removal when the scope closes."""

    def __init__(self) -> None:
        self.key = next(_SCOPE_IDS)
        self._handles: list[RemovableHandle] = []

    def active(self) -> bool:
        """Whether the current context is inside this scope."""
        return self.key in _OPEN.get()

    def gate(self, fn: F) -> F:
        """``fn`` run only for calls made inside this scope (returns None elsewhere), marked as ours."""

        key = self.key

        def gated(*args: Any, **kwargs: Any) -> Any:  # no functools.wraps: steer() toggles cheaply
            if key in _OPEN.get():
                return fn(*args, **kwargs)
            return None

        return mark(cast(F, gated))

    def add(self, handle: RemovableHandle) -> RemovableHandle:
        self._handles.append(handle)
        return handle


@contextlib.contextmanager
def hook_scope() -> Iterator[HookScope]:
    """Open a scope in this context; on exit (also after an exception) remove every hook added to it
    and close it."""
    scope = HookScope()
    token = _OPEN.set(_OPEN.get() | {scope.key})
    try:
        yield scope
    finally:
        for h in reversed(scope._handles):
            h.remove()
        scope._handles.clear()
        _OPEN.reset(token)
