"""Exporters: where steering vectors go to be served.

=============  =========================================================================
format         file
=============  =========================================================================
safetensors    the native artifact (``name.safetensors`` + ``name.json``)
gguf           llama.cpp control vector (``--control-vector`` / ``--control-vector-scaled``)
pt             lm-evaluation-harness steered model (``--model steered``, ``steer_path=``)
spec           JSON steering spec: sites, coefficients, positions, operator, vectors inline
=============  =========================================================================
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from repe.directions import Direction
from steering.export.formats import (
    export_lmeval_pt,
    export_spec_json,
    import_lmeval_pt,
    import_spec_json,
)
from steering.export.gguf import export_gguf, import_gguf, read_gguf
from steering.spec import SteeringSpec, strength

FORMATS = ("safetensors", "gguf", "pt", "spec")


def serving_direction(direction: Direction, scale: str = "relative") -> Direction:
    """Raw vectors such that adding ``c * vector`` equals this project's steering at coefficient ``c``
    in ``scale`` units (the per-site scale folded in)."""
    vecs = {}
    for s in direction.sites:
        v = direction[s].float()
        vecs[s] = v / v.norm().clamp(min=1e-12) * strength(direction, s, scale)
    return replace(
        direction,
        vectors=vecs,
        normalisation="raw",
        params={**direction.params, "serving_scale": scale},
    )


def llama_cpp_command(
    gguf_path: str | os.PathLike[str],
    model_path: str,
    coeff: float | None,
    layers: list[int],
    program: str = "llama-server",
) -> str:
    """The llama.cpp command line that applies an exported control vector (llama.cpp's current syntax:
    ``--control-vector-scaled FNAME:SCALE``)."""
    if coeff is not None and ":" in str(gguf_path):
        raise ValueError(
            f"llama.cpp splits --control-vector-scaled at ':'; rename {gguf_path} (no ':' in the path)"
        )
    cv = (
        f"--control-vector {gguf_path}"
        if coeff is None
        else f"--control-vector-scaled {gguf_path}:{coeff:g}"
    )
    rng = f" --control-vector-layer-range {min(layers)} {max(layers)}" if layers else ""
    return f"{program} -m {model_path} {cv}{rng}"


def export(
    spec: SteeringSpec,
    path: str | os.PathLike[str],
    fmt: str,
    *,
    fold_coeff: bool = False,
) -> Path:
    """Export a steering spec (direction + coefficient + scale + operator) in ``fmt``.

    For ``gguf`` the scale is always folded into the vectors; the coefficient too when ``fold_coeff``
    (otherwise pass it to llama.cpp with ``--control-vector-scaled``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}; got {fmt!r}")
    if fmt == "safetensors":
        d = spec.direction
        if isinstance(spec.coeff, int | float):
            d = replace(d, recommended_coeff=float(spec.coeff))
        return d.save(path)
    if fmt == "gguf":
        if spec.operator != "add" or spec.positions != "all":
            raise ValueError(
                "llama.cpp control vectors add a vector at every position: only operator='add' with "
                "positions='all' can be exported to GGUF"
            )
        d = serving_direction(spec.direction.select(spec.site_list()), spec.scale)
        coeff = {s: spec.coeff_at(s) for s in d.sites} if fold_coeff else None
        return export_gguf(d, path, coeff=coeff)
    if fmt == "pt":
        return export_lmeval_pt(spec, path)
    return export_spec_json(spec, path)


__all__ = [
    "FORMATS",
    "export",
    "export_gguf",
    "export_lmeval_pt",
    "export_spec_json",
    "import_gguf",
    "import_lmeval_pt",
    "import_spec_json",
    "llama_cpp_command",
    "read_gguf",
    "serving_direction",
]
