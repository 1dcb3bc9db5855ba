"""The Intervention protocol: one way for anything to change a running model.

An *intervention* is plain data plus tensors (a steering vector spec, an ablation, a conditional gate,
and later learned prefix tokens or low-rank adapters). ``steer(lm, intervention)`` asks it to
``resolve`` against a loaded model, which checks that it was made for that model (identity and sizes)
and returns a :class:`Resolved`: the canonical sites it hooks, which tokens it acts on (``positions``,
an optional ``condition``) and ``apply(h, site, mask)``, the new activation at a site. ``steer``
registers the hooks, gates them by its context variables (so an intervention acts on exactly the
forward passes in its scope, never in another thread, session or copied context), declares and tracks
sequences, and removes every hook on exit. Interventions nest: each ``steer`` adds its own hooks.

An intervention also says how it serialises (``to_json``) and which exporters can carry it
(``exporters``: llama.cpp control vectors carry only additive residual vectors at every position).
:class:`steering.spec.SteeringSpec` is the first implementation; the tests add a trivial second one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from repe.models import LoadedModel


@runtime_checkable
class Resolved(Protocol):
    """An intervention resolved against one model: tensors on the model's device, ready to apply."""

    sites: list[str]  # canonical site names it hooks
    positions: str  # "all", "prompt", "generated", "assistant" or "index"
    token_indices: list[int]  # for positions == "index"
    condition: Any  # a steering.spec.ResolvedCondition, or None

    def find_assistant_starts(self, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """``[B]`` real-token index where each row's assistant turn starts (positions='assistant')."""
        ...

    def apply(self, h: torch.Tensor, site: str, mask: torch.Tensor | None) -> torch.Tensor:
        """The new activation ``[B, T, ...]`` at ``site``; tokens outside ``mask`` (``[B, T]`` bool,
        None = every token) must keep ``h``."""
        ...


class ResolvedModules(Resolved, Protocol):
    """A resolved intervention that also changes whole modules' outputs from their inputs (a low-rank
    adapter on attention projections): ``steer`` hooks every module in ``module_hooks`` and replaces its
    output with ``apply_module(x, out, name, mask)``, gated and scoped like every other hook. An
    intervention that has no such modules leaves ``module_hooks`` out."""

    module_hooks: dict[str, torch.nn.Module]

    def apply_module(
        self, x: torch.Tensor, out: torch.Tensor, name: str, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The module's new output ``[B, T, d_out]`` from its input ``x``; tokens outside ``mask`` keep
        ``out``."""
        ...


@dataclass(frozen=True)
class TorchHook:
    """A hook on any module, for interventions that extend a computation inside a block (Aligner's
    prefix attention reads the queries and adds to the attention's output). ``steer`` registers it with
    keyword arguments, gated and scoped like every other hook, and passes the current call's token mask:

    - ``kind="pre"``: ``fn(module, args, kwargs, mask)`` returns None or the new ``(args, kwargs)``;
    - ``kind="post"``: ``fn(module, args, kwargs, output, mask)`` returns None or the new output.

    A resolved intervention lists them in ``torch_hooks``; one that has none leaves it out."""

    module: torch.nn.Module
    kind: Literal["pre", "post"]
    fn: Callable[..., Any]


@runtime_checkable
class Intervention(Protocol):
    """Anything ``steer()`` can apply."""

    def resolve(self, lm: LoadedModel) -> Resolved:
        """Check the intervention against ``lm`` (identity, sizes, sites) and build its tensors."""
        ...

    def to_json(self) -> dict[str, Any]:
        """The serialisable description (tensors separately, as artifacts)."""
        ...

    @property
    def exporters(self) -> tuple[str, ...]:
        """The export formats (``steering.export.FORMATS``) that can carry this intervention."""
        ...


def as_resolved(lm: LoadedModel, intervention: Any) -> Resolved:
    """Resolve ``intervention`` against ``lm``, with a clear error for anything that is not one."""
    from steering.spec import SteeringSpec

    if type(intervention) is SteeringSpec:  # the common case: skip the protocol's attribute checks
        return intervention.resolve(lm)
    if not isinstance(intervention, Intervention):
        raise TypeError(
            f"steer() needs an Intervention (an object with resolve(lm), to_json() and exporters, "
            f"such as SteeringSpec); got {type(intervention).__name__}"
        )
    resolved = intervention.resolve(lm)
    if not isinstance(resolved, Resolved):
        raise TypeError(f"{type(intervention).__name__}.resolve() did not return a Resolved")
    return resolved
