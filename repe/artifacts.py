"""Artifact I/O: every fitted thing saves as ``name.safetensors`` (tensors) + ``name.json`` (metadata).

The JSON carries ``kind`` and ``format_version``; loading dispatches on ``kind`` through a registry that
lists the valid kinds when it refuses one. No pickle anywhere.

The pair appears together or not at all. Both files are written under temporary names first (a failure
there leaves nothing behind and the previous artifact untouched). The JSON records the SHA-256 of its
tensors file. The previous tensors file is kept as ``name.safetensors.prev`` (a hard link) while the new
one is renamed into place; renaming the JSON is the commit point; then ``.prev`` is removed. A crash
between the two renames leaves the old JSON, the new tensors and the old tensors in ``.prev``: loading sees
that the JSON's hash matches ``.prev``, puts it back, and loads the previous artifact intact. A pair whose
hash matches neither is refused with a clear error, never loaded mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from repe.atomic import atomic_file
from repe.errors import ArtifactMismatchError, DataFormatError
from repe.models import LoadedModel, ModelIdentity


@runtime_checkable
class Artifact(Protocol):
    KIND: str
    FORMAT_VERSION: int

    def tensors(self) -> dict[str, torch.Tensor]: ...

    def metadata(self) -> dict[str, Any]: ...


A = TypeVar("A")
_REGISTRY: dict[str, Callable[[dict[str, torch.Tensor], dict[str, Any]], Any]] = {}


def register(kind: str) -> Callable[[type[A]], type[A]]:
    """Class decorator: the class's ``from_parts(tensors, meta)`` builds it from a saved artifact."""

    def deco(cls: type[A]) -> type[A]:
        _REGISTRY[kind] = cls.from_parts  # type: ignore[attr-defined]
        return cls

    return deco


def artifact_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``foo``, ``foo.json`` or ``foo.safetensors`` -> (foo.safetensors, foo.json)."""
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_artifact(obj: Artifact, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as safetensors + JSON next to each other; returns the .safetensors path."""
    st_path, json_path = artifact_paths(path)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"kind": obj.KIND, "format_version": obj.FORMAT_VERSION, **obj.metadata()}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in obj.tensors().items()}
    for k, v in tensors.items():
        if not torch.isfinite(v).all():
            raise ValueError(f"refusing to save {obj.KIND}: tensor {k!r} contains NaN or inf")
    prev = st_path.with_name(st_path.name + ".prev")
    with atomic_file(
        json_path
    ) as tmp_json:  # leaving this block renames the JSON: the commit point
        fd, name = tempfile.mkstemp(prefix=f".{st_path.name}.", suffix=".tmp", dir=st_path.parent)
        os.close(fd)
        tmp_st = Path(name)
        try:
            save_file(tensors, str(tmp_st), metadata={"kind": obj.KIND})
            meta["tensors_sha256"] = _sha256(tmp_st)
            tmp_json.write_text(json.dumps(meta, indent=1, sort_keys=True))
            prev.unlink(missing_ok=True)
            if st_path.exists() and json_path.exists():
                try:  # the previous pair stays loadable until the JSON is renamed
                    os.link(st_path, prev)
                except OSError:
                    shutil.copy2(st_path, prev)
            os.replace(tmp_st, st_path)
        finally:
            tmp_st.unlink(missing_ok=True)
    prev.unlink(missing_ok=True)
    return st_path


def read_artifact(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    st_path, json_path = artifact_paths(path)
    for p in (st_path, json_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"artifact file {p} is missing (an artifact is a .safetensors + .json pair)"
            )
    try:
        meta = json.loads(json_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{json_path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or "kind" not in meta or "format_version" not in meta:
        raise DataFormatError(f"{json_path}: missing 'kind' or 'format_version'")
    want = meta.get("tensors_sha256")
    if want is not None and _sha256(st_path) != want:
        prev = st_path.with_name(st_path.name + ".prev")
        if prev.is_file() and _sha256(prev) == want:
            os.replace(prev, st_path)  # a save was interrupted before its commit: roll back
        else:
            raise DataFormatError(
                f"{st_path} does not belong to {json_path.name} (its SHA-256 differs from the one "
                "the JSON records): the pair comes from two different saves"
            )
    try:
        tensors = load_file(str(st_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataFormatError(f"{st_path}: not a readable safetensors file ({exc})") from exc
    return tensors, meta


def load_artifact(path: str | os.PathLike[str], model: LoadedModel | None = None) -> Any:
    """Load any registered artifact; with ``model``, refuse one made for a different model."""
    tensors, meta = read_artifact(path)
    kind = meta["kind"]
    if kind not in _REGISTRY:
        raise DataFormatError(
            f"{path}: unknown artifact kind {kind!r}; valid kinds: {sorted(_REGISTRY)}"
        )
    obj = _REGISTRY[kind](tensors, meta)
    if model is not None:
        check_identity(
            ModelIdentity.from_dict(meta["model"]), model.identity, what=f"{kind} {path}"
        )
    return obj


def check_identity(made_for: ModelIdentity, target: ModelIdentity, what: str = "artifact") -> None:
    """Raise ArtifactMismatchError naming every difference between two model identities."""
    diffs = made_for.mismatches(target)
    if diffs:
        raise ArtifactMismatchError(
            f"{what} was made for model {made_for.name!r} and does not fit {target.name!r}: "
            + "; ".join(diffs)
        )


def check_version(meta: dict[str, Any], kind: str, supported: int) -> None:
    if meta.get("kind") != kind:
        raise DataFormatError(f"expected an artifact of kind {kind!r}; got {meta.get('kind')!r}")
    if meta.get("format_version") != supported:
        raise DataFormatError(
            f"{kind} format_version {meta.get('format_version')!r} is not supported "
            f"(this version reads {supported})"
        )
