"""Other deployment formats: a plain ``.pt`` for lm-evaluation-harness' steered model, and a JSON steering
spec that records sites, coefficients, positions and operator (vectors inline) so a serving stack can
reproduce the intervention. Both round-trip.

The ``.pt`` file is what lm-evaluation-harness loads (``torch.load(..., weights_only=True)``): a dict
``{hookpoint: {"action", "steering_coefficient", "steering_vector", "bias"}}`` where the hookpoint is a
module name under ``model.base_model`` (``layers.L`` is the output of block L). This project reads it back
with ``weights_only=True`` too; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from repe.atomic import atomic_file
from repe.directions import Direction
from repe.errors import DataFormatError
from repe.models import ModelIdentity
from repe.sites import Site, parse_site
from steering.operators import get_operator
from steering.spec import Condition, SteeringSpec

SPEC_KIND = "steering_spec"
SPEC_VERSION = 1
_LMEVAL_SUFFIX = {"resid_post": "", "attn_out": ".self_attn", "mlp_out": ".mlp"}


def lmeval_hookpoint(site: Site, layers_template: str = "model.layers.{L}") -> str:
    if site.kind not in _LMEVAL_SUFFIX:
        raise ValueError(
            f"lm-evaluation-harness steers module outputs only; {site.name} is not one "
            f"(use blocks.L.hook_resid_post, hook_attn_out or hook_mlp_out)"
        )
    base = layers_template.replace("{L}", str(site.layer))
    base = base.split(".", 1)[1] if base.startswith("model.") else base
    return base + _LMEVAL_SUFFIX[site.kind]


def _site_of_hookpoint(hookpoint: str) -> Site:
    parts = hookpoint.split(".")
    try:
        i = parts.index("layers")
        layer = int(parts[i + 1])
    except (ValueError, IndexError):
        raise DataFormatError(
            f"hookpoint {hookpoint!r} does not name a decoder block (layers.L...)"
        ) from None
    rest = ".".join(parts[i + 2 :])
    kind = {"": "resid_post", "self_attn": "attn_out", "mlp": "mlp_out"}.get(rest)
    if kind is None:
        raise DataFormatError(f"hookpoint {hookpoint!r}: unsupported submodule {rest!r}")
    return Site(layer, kind)


def export_lmeval_pt(spec: SteeringSpec, path: str | os.PathLike[str]) -> Path:
    """Write the spec's vectors for lm-evaluation-harness (``--model steered``, ``steer_path=...``).

    The per-site scale is folded into the vector; ``steering_coefficient`` is the coefficient. Only the
    operators lm-evaluation-harness implements (add, clamp) and positions='all' can be carried."""
    from steering.spec import strength

    if spec.operator not in ("add", "clamp"):
        raise ValueError(
            f"lm-evaluation-harness supports operators add and clamp; got {spec.operator!r}"
        )
    if spec.positions != "all":
        raise ValueError("lm-evaluation-harness steers every position; use positions='all'")
    d = spec.direction
    out: dict[str, Any] = {}
    for name in spec.site_list():
        site = parse_site(name, d.identity.n_layers)
        v = d[name].detach().float().cpu()
        u = v / v.norm().clamp(min=1e-12)
        factor = strength(d, name, spec.scale)
        c = spec.coeff_at(name)
        if spec.operator == "add":
            vec, coeff = u * factor, c
        else:  # clamp: lm-eval sets the projection on the normalised vector to `value`
            vec, coeff = u, c * factor
        if not torch.isfinite(vec).all():
            raise ValueError(f"{name}: vector contains NaN or inf")
        out[lmeval_hookpoint(site)] = {
            "action": spec.operator,
            "steering_coefficient": float(coeff),
            "steering_vector": vec.contiguous(),
            "bias": None,
        }
    with atomic_file(path) as tmp:
        torch.save(out, tmp)
    return Path(path)


def import_lmeval_pt(
    path: str | os.PathLike[str], identity: ModelIdentity, name: str | None = None
) -> tuple[Direction, dict[str, float], str]:
    """Read an lm-evaluation-harness ``.pt`` steering file: (direction of raw vectors, coefficients, action)."""
    try:
        data = torch.load(Path(path), weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise DataFormatError(
            f"{path}: not a readable .pt steering file ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(data, dict) or not data:
        raise DataFormatError(f"{path}: expected a non-empty dict of hookpoint -> settings")
    vectors, coeffs, actions = {}, {}, set()
    for hookpoint, info in data.items():
        if not isinstance(info, dict) or "steering_vector" not in info:
            raise DataFormatError(f"{path}: entry {hookpoint!r} lacks 'steering_vector'")
        try:
            site = _site_of_hookpoint(str(hookpoint))
        except (ValueError, KeyError) as exc:
            raise DataFormatError(
                f"{path}: hookpoint {hookpoint!r} is not understood ({exc})"
            ) from exc
        vec = info["steering_vector"]
        if not isinstance(vec, torch.Tensor) or vec.dim() != 1:
            raise DataFormatError(f"{path}: {hookpoint!r}['steering_vector'] must be a 1-D tensor")
        vectors[site.name] = vec.float()
        try:
            coeffs[site.name] = float(info.get("steering_coefficient", 1.0))
        except (TypeError, ValueError) as exc:
            raise DataFormatError(
                f"{path}: {hookpoint!r}['steering_coefficient'] is not a number"
            ) from exc
        actions.add(str(info.get("action", "add")))
    if len(actions) != 1:
        raise DataFormatError(f"{path}: mixed actions {sorted(actions)} are not supported")
    d = Direction(
        vectors,
        identity,
        name=name or Path(path).stem,
        method="imported_lmeval_pt",
        normalisation="raw",
    )
    return d, coeffs, actions.pop()


def export_spec_json(spec: SteeringSpec, path: str | os.PathLike[str]) -> Path:
    """A self-contained JSON steering spec (vectors inline as float32 values, exact on re-import)."""
    d = spec.direction
    payload = {
        "kind": SPEC_KIND,
        "format_version": SPEC_VERSION,
        "model": d.identity.to_dict(),
        "intervention": spec.to_json(),
        "site_semantics": {
            s: {
                "hf_module": f"model.layers.{parse_site(s).layer}",
                "hook": parse_site(s).hf_hook.hook,
                "submodule": parse_site(s).hf_hook.submodule,
                "llama_cpp_tensor": parse_site(s).llama_cpp_tensor,
            }
            for s in spec.site_list()
        },
        "formula": get_operator(spec.operator).formula,
        "scale_values": {s: _scale(spec, s) for s in spec.site_list()},
        "direction": d.metadata(),
        "vectors": {
            s: [float(x) for x in d[s].detach().float().cpu().tolist()] for s in spec.site_list()
        },
    }
    if spec.condition is not None:  # the condition's unit vector, so the spec re-imports whole
        c = spec.condition
        payload["condition_vector"] = [
            float(x) for x in c.direction.normalized()[c.site].detach().float().cpu().tolist()
        ]
    for s in spec.site_list():
        if not torch.isfinite(d[s]).all():
            raise ValueError(f"{s}: vector contains NaN or inf")
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1, allow_nan=False))
    return Path(path)


def _scale(spec: SteeringSpec, site: str) -> float:
    from steering.spec import strength

    return strength(spec.direction, site, spec.scale)


def import_spec_json(path: str | os.PathLike[str]) -> SteeringSpec:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"steering spec {p} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{p}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("kind") != SPEC_KIND:
        raise DataFormatError(
            f"{p}: not a steering spec (kind {data.get('kind') if isinstance(data, dict) else None!r})"
        )
    if data.get("format_version") != SPEC_VERSION:
        raise DataFormatError(
            f"{p}: steering spec format_version {data.get('format_version')!r} is not supported"
        )

    def need(obj: Any, key: str, where: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise DataFormatError(f"{p}: malformed steering spec: missing {where}{key!r}")
        return obj[key]

    meta = need(data, "direction", "")
    raw_vectors = need(data, "vectors", "")
    iv = need(data, "intervention", "")
    try:
        vectors = {s: torch.tensor(v, dtype=torch.float32) for s, v in raw_vectors.items()}
    except (TypeError, ValueError, AttributeError) as exc:
        raise DataFormatError(f"{p}: malformed steering spec: 'vectors' ({exc})") from exc
    if not isinstance(meta, dict):
        raise DataFormatError(f"{p}: malformed steering spec: 'direction' must be an object")
    meta = {**meta, "sites": sorted(vectors)}
    d = Direction.from_parts(vectors, {"kind": "direction", "format_version": 1, **meta})
    fields = {k: need(iv, k, "intervention.") for k in ("positions", "coeff", "operator", "scale")}
    fields["sites"] = need(iv, "sites", "intervention.")
    try:
        positions = (
            fields["positions"]
            if isinstance(fields["positions"], str)
            else [int(i) for i in fields["positions"]]
        )
        coeff = {str(k): float(v) for k, v in dict(fields["coeff"]).items()}
        sites = [str(s) for s in fields["sites"]]
    except (TypeError, ValueError) as exc:
        raise DataFormatError(f"{p}: malformed steering spec: 'intervention' ({exc})") from exc
    condition = None
    cond = iv.get("condition")
    if cond is not None:
        cvec = need(data, "condition_vector", "")
        csite = str(need(cond, "site", "intervention.condition."))
        try:
            cdir = Direction(
                {csite: torch.tensor(cvec, dtype=torch.float32)},
                d.identity,
                name=str(cond.get("direction", "condition")),
            )
            threshold = float(need(cond, "threshold", "intervention.condition."))
        except (TypeError, ValueError) as exc:
            raise DataFormatError(f"{p}: malformed steering spec: condition ({exc})") from exc
        condition = Condition(cdir, csite, threshold, bool(cond.get("above", True)))
    return SteeringSpec(
        d,
        coeff=coeff,
        operator=str(fields["operator"]),
        positions=positions,
        scale=str(fields["scale"]),
        sites=sites,
        condition=condition,
    )
