"""Steering operators: how a direction changes the activations at a site.

Each operator maps the selected rows ``h`` (``[N, d]``) to new rows, given the site's steering vector
``delta`` (already scaled by the coefficient) and its unit direction ``u``. They are pure functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

# the rows an operator changes ([..., d]: any leading axes) and a site's vector ([d])
Rows = Float[Tensor, "*rows d"]
Vec = Float[Tensor, " d"]
OperatorFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def op_add(h: Rows, delta: Vec, u: Vec, value: float) -> Rows:
    """``h + c*v``."""
    return h + delta


def op_add_norm_preserving(h: Rows, delta: Vec, u: Vec, value: float) -> Rows:
    """``h + c*v``, rescaled back to the norm of ``h`` (per row)."""
    out = h + delta
    return out * (h.norm(dim=-1, keepdim=True) / out.norm(dim=-1, keepdim=True).clamp(min=1e-12))


def op_ablate(h: Rows, delta: Vec, u: Vec, value: float) -> Rows:
    """Project the direction out: ``h - (h.u) u`` (the coefficient is ignored)."""
    return h - (h @ u).unsqueeze(-1) * u


def op_ablate_add(h: Rows, delta: Vec, u: Vec, value: float) -> Rows:
    """Project the direction out, then add ``c*v``."""
    return h - (h @ u).unsqueeze(-1) * u + delta


def op_clamp(h: Rows, delta: Vec, u: Vec, value: float) -> Rows:
    """Set the projection on ``u`` to ``value`` (in the site's own units): ``h + (value - h.u) u``."""
    return h + (value - h @ u).unsqueeze(-1) * u


@dataclass(frozen=True)
class Operator:
    """An operator and its properties: whether coefficient 0 leaves the model unchanged, which export
    formats can carry it (at positions='all'), and its formula (written into the JSON spec)."""

    name: str
    fn: OperatorFn
    formula: str
    uses_coeff: bool = True
    identity_at_zero: bool = False
    exporters: tuple[str, ...] = ("safetensors", "spec")


OPERATORS: dict[str, Operator] = {
    "add": Operator(
        "add",
        op_add,
        "h + coeff * scale[site] * unit(v)",
        identity_at_zero=True,
        exporters=("safetensors", "spec", "gguf", "pt"),
    ),
    "add_norm_preserving": Operator(
        "add_norm_preserving",
        op_add_norm_preserving,
        "(h + coeff*scale*u) * |h| / |h + coeff*scale*u|",
        identity_at_zero=True,
    ),
    "ablate": Operator("ablate", op_ablate, "h - (h.u) u", uses_coeff=False),
    "ablate_add": Operator("ablate_add", op_ablate_add, "h - (h.u) u + coeff*scale*u"),
    "clamp": Operator(
        "clamp",
        op_clamp,
        "h + (coeff*scale - h.u) u",
        exporters=("safetensors", "spec", "pt"),
    ),
}


def get_operator(name: str) -> Operator:
    try:
        return OPERATORS[name]
    except KeyError:
        raise ValueError(f"operator must be one of {sorted(OPERATORS)}; got {name!r}") from None
