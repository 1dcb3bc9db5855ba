"""GGUF control vectors for llama.cpp: export, and import of files written by us, repeng or llama.cpp.

A control vector is a GGUF file with ``general.architecture = controlvector``,
``controlvector.model_hint`` (the model family, e.g. ``llama``), ``controlvector.layer_count`` and one
F32 1-D tensor ``direction.N`` per block N >= 1 (llama.cpp rejects ``direction.0``). llama.cpp adds
``scale * direction.N`` to the output of decoder block N, which is ``blocks.N.hook_resid_post``.

Extra metadata travels in ``repe.*`` keys that llama.cpp ignores, so a re-import loses nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repe.atomic import atomic_file
from repe.directions import Direction
from repe.errors import DataFormatError
from repe.models import ModelIdentity
from repe.sites import Site, parse_site

ARCH = "controlvector"
META_KEY = "repe.metadata"
VERSION_KEY = "repe.format_version"
GGUF_FORMAT_VERSION = 1

_HINTS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "GPT2LMHeadModel": "gpt2",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "PhiForCausalLM": "phi2",
    "Phi3ForCausalLM": "phi3",
}


def model_hint(identity: ModelIdentity) -> str:
    return _HINTS.get(identity.architecture, identity.architecture.lower())


def gguf_vectors(
    direction: Direction, coeff: float | Mapping[str, float] | None = None
) -> dict[int, np.ndarray]:
    """The tensors to write: block -> F32 vector (coefficient folded in when given). Validates all."""
    out: dict[int, np.ndarray] = {}
    for name in direction.sites:
        site: Site = parse_site(name, direction.identity.n_layers)
        if site.kind != "resid_post":
            raise ValueError(
                f"cannot export {name} to a llama.cpp control vector: llama.cpp adds vectors to block "
                f"outputs only (blocks.N.hook_resid_post)"
            )
        if site.llama_cpp_tensor is None:
            raise ValueError(
                f"cannot export {name}: llama.cpp rejects direction.0, so block 0 cannot be carried; "
                f"drop it with direction.select([...])"
            )
        c = 1.0 if coeff is None else float(coeff[name] if isinstance(coeff, Mapping) else coeff)
        v = direction[name].detach().to("cpu", torch.float64) * c
        arr = v.to(torch.float32).numpy()
        if arr.ndim != 1 or arr.shape[0] != direction.identity.d_model:
            raise ValueError(
                f"{name}: vector of shape {arr.shape} does not match the hidden size "
                f"{direction.identity.d_model}"
            )
        if not np.isfinite(arr).all():
            raise ValueError(f"{name}: vector contains NaN or inf (after folding coefficient {c})")
        out[site.layer] = np.ascontiguousarray(arr, dtype=np.float32)
    return out


def export_gguf(
    direction: Direction,
    path: str | os.PathLike[str],
    *,
    coeff: float | Mapping[str, float] | None = None,
    hint: str | None = None,
) -> Path:
    """Write ``direction`` as a llama.cpp control vector.

    The vectors are written as stored (use a scaled copy, e.g. from :func:`steering.export.serving_direction`,
    to bake a scale in); ``coeff`` folds a coefficient in, otherwise pass the strength to llama.cpp with
    ``--control-vector-scaled FILE COEFF``.
    """
    import gguf

    path = Path(path)
    vectors = gguf_vectors(direction, coeff)
    meta: dict[str, Any] = {
        "kind": "direction",
        "direction": direction.metadata(),
        "folded_coeff": None
        if coeff is None
        else (dict(coeff) if isinstance(coeff, Mapping) else coeff),
    }
    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), ARCH)
        w.add_string(f"{ARCH}.model_hint", hint or model_hint(direction.identity))
        w.add_uint32(f"{ARCH}.layer_count", len(vectors))
        w.add_uint32(VERSION_KEY, GGUF_FORMAT_VERSION)
        w.add_string(META_KEY, json.dumps(meta, sort_keys=True))
        for layer in sorted(vectors):
            w.add_tensor(f"direction.{layer}", vectors[layer])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def _field_str(reader: Any, key: str) -> str | None:
    f = reader.fields.get(key)
    if f is None or not f.data:
        return None
    return bytes(f.parts[f.data[0]]).decode("utf-8")


def read_gguf(path: str | os.PathLike[str]) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
    """Read a control vector file: block -> F32 vector, plus its key/value metadata."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"control vector file {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... on corrupt files
        raise DataFormatError(
            f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})"
        ) from exc
    arch = _field_str(reader, "general.architecture")
    if arch != ARCH:
        raise DataFormatError(
            f"{path}: general.architecture is {arch!r}, not a control vector ({ARCH!r})"
        )
    vectors: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        if not t.name.startswith("direction."):
            continue
        try:
            layer = int(t.name.split(".", 1)[1])
        except ValueError:
            raise DataFormatError(f"{path}: bad tensor name {t.name!r}") from None
        if layer < 1:
            raise DataFormatError(f"{path}: {t.name} is invalid (llama.cpp starts at direction.1)")
        arr = np.asarray(t.data)
        if arr.dtype != np.float32:
            raise DataFormatError(f"{path}: {t.name} has dtype {arr.dtype}, expected F32")
        vectors[layer] = np.array(arr.reshape(-1), dtype=np.float32)
    if not vectors:
        raise DataFormatError(f"{path}: no direction.N tensors")
    sizes = {v.shape[0] for v in vectors.values()}
    if len(sizes) != 1:
        raise DataFormatError(f"{path}: direction tensors have different lengths {sorted(sizes)}")
    meta: dict[str, Any] = {"model_hint": _field_str(reader, f"{ARCH}.model_hint")}
    raw = _field_str(reader, META_KEY)
    if raw is not None:
        try:
            meta["repe"] = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path}: {META_KEY} is not valid JSON ({exc})") from exc
    return vectors, meta


def import_gguf(
    path: str | os.PathLike[str], identity: ModelIdentity | None = None, name: str | None = None
) -> Direction:
    """A control vector file as a Direction at ``blocks.N.hook_resid_post`` (raw vectors, as stored).

    Files written by this project carry their full metadata and need no ``identity``; for files written
    by repeng or llama.cpp, pass the target model's identity (e.g. ``lm.identity``); the hidden size is
    checked against it.
    """
    vectors, meta = read_gguf(path)
    d_model = next(iter(vectors.values())).shape[0]
    repe_meta = meta.get("repe", {})
    own = repe_meta.get("direction") if isinstance(repe_meta, dict) else None
    if own is not None and (not isinstance(own, dict) or "model" not in own):
        raise DataFormatError(f"{path}: {META_KEY} has no 'direction.model' (the model identity)")
    if own is not None:
        try:
            ident = ModelIdentity.from_dict(own["model"])
        except DataFormatError as exc:
            raise DataFormatError(f"{path}: {META_KEY} direction.model: {exc}") from exc
        if identity is not None and identity.mismatches(ident):
            from repe.artifacts import check_identity

            check_identity(ident, identity, what=f"control vector {path}")
    elif identity is None:
        raise ValueError(
            f"{path} was not written by this project; pass identity=lm.identity of the model it is for"
        )
    else:
        ident = identity
    if d_model != ident.d_model:
        raise DataFormatError(
            f"{path}: vectors have length {d_model} but the model's hidden size is {ident.d_model}"
        )
    if max(vectors) >= ident.n_layers:
        raise DataFormatError(
            f"{path}: direction.{max(vectors)} is beyond the model's {ident.n_layers} blocks"
        )
    tensors = {
        Site(layer, "resid_post").name: torch.from_numpy(v.copy()) for layer, v in vectors.items()
    }
    if own is not None:
        folded = repe_meta.get("folded_coeff")
        try:
            d = Direction.from_parts(tensors, {"kind": "direction", "format_version": 1, **own})
        except DataFormatError as exc:
            raise DataFormatError(f"{path}: {META_KEY}: {exc}") from exc
        if folded is not None:
            d = Direction(
                vectors=d.vectors,
                identity=d.identity,
                name=d.name,
                method=d.method,
                params={**d.params, "folded_coeff": folded},
                normalisation="raw",
                sign=d.sign,
                dataset_fingerprint=d.dataset_fingerprint,
                metrics=d.metrics,
                stats=d.stats,
                best_site=d.best_site,
                recommended_coeff=None,
            )
        return d
    return Direction(
        vectors=tensors,
        identity=ident,
        name=name or Path(path).stem,
        method="imported_gguf",
        params={"source": str(path), "model_hint": meta.get("model_hint")},
        normalisation="raw",
    )
