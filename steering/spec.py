"""What to steer with: a direction, coefficients, an operator, positions, a scale and an optional
condition. A :class:`SteeringSpec` is plain data (it serialises to the JSON steering spec); ``resolve``
turns it into tensors on the model's device.

Scales give the coefficient a meaning that holds across layers, readers and models:

* ``relative`` (default): ``coeff`` is a fraction of the typical residual-stream norm at the site,
  measured on neutral text by :func:`repe.calibration.calibrate` (``stats[site]["resid_norm"]``;
  nothing else writes that statistic).
* ``unit``: ``coeff`` multiplies the unit direction (repeng's convention).
* ``mean_diff``: ``coeff`` multiplies the raw class-mean difference (CAA / steering-vectors' convention).
* ``raw``: ``coeff`` multiplies the stored vector as it is.

Weights: a weighted combination of fitted directions (``0.5 * a + 2 * b``) steers with its weights in
every scale (see :func:`strength`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from repe.backends.hf import site_device
from repe.directions import Direction
from repe.models import LoadedModel
from repe.sites import Site, parse_site
from steering.operators import Operator, get_operator

SCALES = ("relative", "unit", "mean_diff", "raw")
POSITIONS = ("all", "prompt", "generated", "assistant")


@dataclass(frozen=True)
class Condition:
    """Steer a sequence only when its prompt's mean projection on ``direction`` at ``site`` passes
    ``threshold`` (``above=True``: projection > threshold), decided per sequence (CAST)."""

    direction: Direction
    site: str
    threshold: float
    above: bool = True


@dataclass(frozen=True)
class SteeringSpec:
    direction: Direction
    coeff: float | Mapping[str, float] = 0.0
    operator: str = "add"
    positions: str | Sequence[int] = "all"
    scale: str = "relative"
    sites: Sequence[str] | None = None  # default: every site of the direction
    condition: Condition | None = None

    def site_list(self) -> list[str]:
        return list(self.sites) if self.sites is not None else self.direction.sites

    # ---- the Intervention protocol (steering.intervention) --------------------------------------
    def resolve(self, lm: LoadedModel) -> ResolvedSteering:
        """Check the spec against the model and build the per-site tensors on its device."""
        return resolve(lm, self)

    @property
    def exporters(self) -> tuple[str, ...]:
        """llama.cpp (gguf) carries additive vectors at every position; lm-eval (pt) add and clamp at
        every position; the JSON spec and safetensors carry everything but a condition's tensors (JSON
        carries those too)."""
        plain = (
            isinstance(self.positions, str) and self.positions == "all" and self.condition is None
        )
        out = ["safetensors", "spec"]
        if plain and self.operator == "add":
            out.append("gguf")
        if plain and self.operator in ("add", "clamp"):
            out.append("pt")
        return tuple(out)

    def coeff_at(self, site: str) -> float:
        if isinstance(self.coeff, Mapping):
            if site not in self.coeff:
                raise ValueError(f"coeff mapping has no entry for site {site!r}")
            return float(self.coeff[site])
        return float(self.coeff)

    def to_json(self) -> dict[str, Any]:
        """The serving-stack view: sites, coefficients, positions, operator, scale (vectors separate)."""
        return {
            "direction": self.direction.name,
            "sites": self.site_list(),
            "coeff": {s: self.coeff_at(s) for s in self.site_list()},
            "operator": self.operator,
            "positions": self.positions
            if isinstance(self.positions, str)
            else list(self.positions),
            "scale": self.scale,
            "condition": None
            if self.condition is None
            else {
                "direction": self.condition.direction.name,
                "site": self.condition.site,
                "threshold": self.condition.threshold,
                "above": self.condition.above,
            },
        }


def scale_factor(direction: Direction, site: str, scale: str, norm: float | None = None) -> float:
    """Multiplier that turns a coefficient in ``scale`` units into a length along the unit direction
    (``norm``: the stored vector's norm when the caller has it already, for ``scale="raw"``)."""
    if scale == "unit":
        return 1.0
    if scale == "raw":
        return float(direction[site].float().norm()) if norm is None else norm
    key = {"relative": "resid_norm", "mean_diff": "mean_diff_norm"}.get(scale)
    if key is None:
        raise ValueError(f"scale must be one of {SCALES}; got {scale!r}")
    stats = direction.stats.get(site, {})
    if key not in stats:
        hint = (
            "run repe.calibration.calibrate(lm, direction) once to measure it"
            if key == "resid_norm"
            else "fit the direction with a reader that records it, or use scale='unit'"
        )
        raise ValueError(
            f"scale={scale!r} needs stats[{site!r}][{key!r}] in direction {direction.name!r}; {hint}"
        )
    return float(stats[key])


KEEPS_WEIGHT = ("unit", "weighted")


def strength(direction: Direction, site: str, scale: str, norm: float | None = None) -> float:
    """Length of the steering vector at ``site`` per unit of coefficient: ``coeff * strength`` is how far
    the activation moves along the unit direction.

    A direction fitted by a reader is a unit vector per site (``normalisation="unit"``); a weighted
    combination of such directions (``0.5 * a + 2 * b``, ``normalisation="weighted"``) keeps its
    weights: its length at a site (``|0.5 u_a + 2 u_b|``) multiplies the strength in every scale, so
    ``0.5 * d`` steers half as hard as ``d``. A direction of any other length (imported raw vectors,
    ``normalisation="raw"``) counts as its unit direction, except in ``scale="raw"``, where the stored
    vector is used as it is."""
    f = scale_factor(direction, site, scale, norm)
    if scale != "raw" and direction.normalisation in KEEPS_WEIGHT:
        n = float(direction[site].float().norm()) if norm is None else norm
        if abs(n - 1.0) >= 1e-6:  # a unit vector stays exactly unit
            f *= n
    return f


@dataclass(frozen=True)
class ResolvedCondition:
    site: Site
    unit: torch.Tensor
    threshold: float
    above: bool


@dataclass
class ResolvedSteering:
    sites: list[str]
    deltas: dict[str, torch.Tensor]
    units: dict[str, torch.Tensor]
    clamp_values: dict[str, float]
    operator: Operator
    positions: str  # all / prompt / generated / assistant / index
    token_indices: list[int] = field(default_factory=list)
    condition: ResolvedCondition | None = None
    assistant_marker: list[int] = field(default_factory=list)

    def clamp_value(self, site: str) -> float:
        return self.clamp_values[site]

    def apply(
        self, h: Float[Tensor, "b t d"], site: str, mask: Bool[Tensor, "b t"] | None
    ) -> Float[Tensor, "b t d"]:
        """The operator at ``site``: ``[B, T, d]`` steered activation; tokens outside ``mask`` keep ``h``.
        The vectors are on the site's device already (``.to`` is then free); the mask comes from the
        model's inputs, on the input device, which differs from a block's when blocks are spread."""
        delta = self.deltas[site].to(h.device, h.dtype)
        u = self.units[site].to(h.device, h.dtype)
        new = self.operator.fn(h, delta, u, self.clamp_values[site])
        return new if mask is None else torch.where(mask.to(h.device).unsqueeze(-1), new, h)

    def find_assistant_starts(
        self, ids: Int[Tensor, "b t"], real: Bool[Tensor, "b t"]
    ) -> Int[Tensor, " b"]:
        """Real-token index right after the last assistant-turn marker of each row."""
        m = self.assistant_marker
        out = []
        for row, mask in zip(ids.tolist(), real.tolist(), strict=True):
            toks = [t for t, keep in zip(row, mask, strict=True) if keep]
            start = -1
            for i in range(len(toks) - len(m), -1, -1):
                if toks[i : i + len(m)] == m:
                    start = i + len(m)
                    break
            if start < 0:
                raise ValueError(
                    "positions='assistant' needs chat prompts that contain an assistant turn "
                    "(rendered with the chat template)"
                )
            out.append(start)
        return torch.tensor(out, dtype=torch.long)


def _assistant_marker(lm: LoadedModel) -> list[int]:
    tok = lm.tokenizer
    if getattr(tok, "chat_template", None) is None:
        return []
    conv = [{"role": "user", "content": "x"}]
    with_gen = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    without = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
    marker = with_gen[len(without) :] if with_gen.startswith(without) else ""
    return list(tok(marker, add_special_tokens=False)["input_ids"]) if marker else []


def _execution_key(site: Site) -> tuple[int, int]:
    from repe.backends.hf import execution_key

    return execution_key(site)


def _site_tensors(
    lm: LoadedModel, spec: SteeringSpec, sites: list[str], op: Operator
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """Per-site steering vector (``c * scale * u``), unit direction and clamp value, each on the device
    of the site's activation (the block it hooks, :func:`repe.backends.hf.site_device`: with a
    ``device_map`` the blocks sit on several devices). The maths runs once on the stacked vectors (a
    handful of tensor ops, not a handful per site): switching steering on costs well under a
    millisecond even with every layer steered."""
    dtype = lm.dtype
    devices: dict[str, torch.device] = {}
    deltas: dict[str, torch.Tensor] = {}
    units: dict[str, torch.Tensor] = {}
    clamps: dict[str, float] = {}
    groups: dict[tuple[int, ...], list[str]] = {}
    for name in sites:
        groups.setdefault(tuple(spec.direction[name].shape), []).append(name)
    for names in groups.values():
        vs = torch.stack([spec.direction[n] for n in names]).float()
        flat = vs.flatten(1)
        if not bool(torch.isfinite(flat).all()):
            bad = [n for n, row in zip(names, flat, strict=True) if not torch.isfinite(row).all()]
            raise ValueError(f"direction {spec.direction.name!r} has NaN/inf at {bad[0]}")
        norms = flat.norm(dim=1)
        norm_list = norms.tolist()
        if op.name not in ("add", "add_norm_preserving"):
            for n, norm in zip(names, norm_list, strict=True):
                if norm == 0.0:
                    raise ValueError(f"direction {spec.direction.name!r} is zero at {n}")
        # a unit vector is used as it is, so a patched site equals orig + c*v bit for bit
        column = (-1, *([1] * (vs.dim() - 1)))  # one value per stacked vector
        is_unit = ((norms - 1.0).abs() < 1e-6).view(column)
        us = torch.where(is_unit, vs, vs / norms.clamp(min=1e-12).view(column))
        lengths = []
        for n, norm in zip(names, norm_list, strict=True):
            c = spec.coeff_at(n)
            lengths.append(c * strength(spec.direction, n, spec.scale, norm) if c else 0.0)
        lens = torch.tensor(lengths, dtype=us.dtype).view(column)
        for n in names:
            if n not in devices:
                devices[n] = site_device(lm, parse_site(n))
        # one copy of the stacked vectors per device (one in all unless a device_map spreads blocks)
        scaled = us * lens
        moved = {
            dev: (scaled.to(dev, dtype).unbind(0), us.to(dev, dtype).unbind(0))
            for dev in dict.fromkeys(devices[n] for n in names)
        }
        for i, (n, length) in enumerate(zip(names, lengths, strict=True)):
            ds, uns = moved[devices[n]]
            deltas[n], units[n], clamps[n] = ds[i], uns[i], length
    return deltas, units, clamps


def resolve(lm: LoadedModel, spec: SteeringSpec) -> ResolvedSteering:
    """Check the spec against the model and build the per-site tensors on their sites' devices."""
    spec.direction.check_compatible(lm)
    op = get_operator(spec.operator)
    if spec.scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}; got {spec.scale!r}")
    sites = spec.site_list()
    if not sites:
        raise ValueError("no sites to steer")
    for name in sites:
        site = parse_site(name, lm.n_layers)
        if not site.is_residual and site.kind != "attn_out" and site.kind != "mlp_out":
            raise ValueError(f"cannot steer {name}: steer residual, attn_out or mlp_out sites")
    deltas, units, clamps = _site_tensors(lm, spec, sites, op)
    positions: str
    token_indices: list[int] = []
    if isinstance(spec.positions, str):
        if spec.positions not in POSITIONS:
            raise ValueError(
                f"positions must be one of {POSITIONS} or a list of token indices; got {spec.positions!r}"
            )
        positions = spec.positions
    else:
        token_indices = [int(i) for i in spec.positions]
        if not token_indices or any(i < 0 for i in token_indices):
            raise ValueError(
                f"explicit positions must be non-negative token indices; got {list(spec.positions)!r}"
            )
        positions = "index"
    cond = None
    if spec.condition is not None:
        c_site = parse_site(spec.condition.site, lm.n_layers)
        spec.condition.direction.check_compatible(lm)
        first = min((parse_site(s) for s in sites), key=_execution_key)
        if _execution_key(c_site) >= _execution_key(first):
            raise ValueError(
                f"the condition site {c_site.name} must come before every steered site "
                f"(the first steered site is {first.name})"
            )
        cv = spec.condition.direction[c_site.name].float()
        cond = ResolvedCondition(
            c_site,
            (cv / cv.norm().clamp(min=1e-12)).to(site_device(lm, c_site)),
            spec.condition.threshold,
            spec.condition.above,
        )
    marker = _assistant_marker(lm) if positions == "assistant" else []
    if positions == "assistant" and not marker:
        raise ValueError("positions='assistant' needs a tokenizer with a chat template")
    return ResolvedSteering(
        sites, deltas, units, clamps, op, positions, token_indices, cond, marker
    )
