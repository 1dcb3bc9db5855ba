"""Activation sets: captured tensors plus the metadata that says what they are.

Per site, rows are stored flat (``[rows, *site_shape]``) with ``offsets`` (``[n + 1]``) saying which rows
belong to which example, so ragged policies (all tokens, assistant turn) and one-row policies share one
layout. A set lives in memory or on disk as safetensors shards plus ``meta.json``; a disk-backed set reads a
shard only when asked.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from repe.atomic import replace_dir, temp_dir_beside
from repe.models import ModelIdentity

FORMAT_VERSION = 1
KIND = "activation_set"
_OFFSETS = "__offsets__"


@dataclass
class ActivationMeta:
    identity: ModelIdentity
    sites: list[str]
    positions: str
    one_row: bool
    fingerprint: str
    n: int
    backend: str
    padding_side: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "model": self.identity.to_dict(),
            "sites": self.sites,
            "positions": self.positions,
            "one_row": self.one_row,
            "dataset_fingerprint": self.fingerprint,
            "n": self.n,
            "backend": self.backend,
            "padding_side": self.padding_side,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ActivationMeta:
        if d.get("kind") != KIND:
            raise ValueError(f"not an activation set: kind is {d.get('kind')!r}, expected {KIND!r}")
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"activation set format_version {d.get('format_version')!r} is not supported "
                f"(this version reads {FORMAT_VERSION})"
            )
        return cls(
            identity=ModelIdentity.from_dict(d["model"]),
            sites=list(d["sites"]),
            positions=d["positions"],
            one_row=bool(d["one_row"]),
            fingerprint=d["dataset_fingerprint"],
            n=int(d["n"]),
            backend=d["backend"],
            padding_side=d["padding_side"],
            extra=d.get("extra", {}),
        )


@dataclass
class Shard:
    """A contiguous run of examples: per-site flat rows and local offsets."""

    data: dict[str, torch.Tensor]
    offsets: torch.Tensor  # [k + 1], starting at 0

    @property
    def n(self) -> int:
        return int(self.offsets.numel() - 1)


class ActivationSet:
    """Captured activations. ``acts[site]`` is ``[n, *site_shape]`` for one-row position policies."""

    def __init__(
        self,
        meta: ActivationMeta,
        shards: list[Shard] | None = None,
        directory: Path | None = None,
        shard_files: list[str] | None = None,
    ) -> None:
        self.meta = meta
        self._shards = shards
        self._dir = directory
        self._files = shard_files or []
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- metadata ---------------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        return list(self.meta.sites)

    @property
    def identity(self) -> ModelIdentity:
        return self.meta.identity

    @property
    def fingerprint(self) -> str:
        return self.meta.fingerprint

    def __len__(self) -> int:
        return self.meta.n

    def __repr__(self) -> str:
        where = f"on disk at {self._dir}" if self._shards is None else "in memory"
        return (
            f"ActivationSet(n={self.meta.n}, sites={len(self.meta.sites)}, "
            f"positions={self.meta.positions!r}, {where})"
        )

    # ---- access -----------------------------------------------------------------------------
    def iter_shards(self) -> Iterator[Shard]:
        if self._shards is not None:
            yield from self._shards
            return
        assert self._dir is not None
        for name in self._files:
            t = load_file(str(self._dir / name))
            offsets = t.pop(_OFFSETS)
            yield Shard(t, offsets)

    def rows(self, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        """All rows of a site, flat, and the ``[n + 1]`` offsets of each example's rows."""
        if site not in self.meta.sites:
            raise KeyError(f"site {site!r} was not captured; captured sites: {self.meta.sites}")
        if site not in self._cache:
            parts, offs, base = [], [torch.zeros(1, dtype=torch.long)], 0
            for sh in self.iter_shards():
                parts.append(sh.data[site])
                offs.append(sh.offsets[1:] + base)
                base += int(sh.offsets[-1])
            self._cache[site] = (torch.cat(parts), torch.cat(offs))
        return self._cache[site]

    def __getitem__(self, site: str) -> torch.Tensor:
        if not self.meta.one_row:
            raise ValueError(
                f"positions={self.meta.positions!r} gives a varying number of rows per example; "
                f"use .rows(site) (flat rows + offsets) or .example(site, i)"
            )
        return self.rows(site)[0]

    def example(self, site: str, i: int) -> torch.Tensor:
        data, offsets = self.rows(site)
        return data[int(offsets[i]) : int(offsets[i + 1])]

    def stack(self, sites: list[str] | None = None) -> torch.Tensor:
        """``[n, n_sites, *site_shape]`` for one-row policies."""
        return torch.stack([self[s] for s in (sites or self.sites)], dim=1)

    # ---- I/O --------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the set to ``directory`` (built beside it, then renamed into place). An existing
        activation set there is replaced only with ``overwrite=True``; anything else is never touched;
        a set is never saved onto its own folder."""
        directory = Path(directory)
        if self._dir is not None and directory.resolve() == self._dir.resolve():
            raise ValueError(f"refusing to save the activation set in {directory} onto itself")
        writer = ShardWriter(directory, self.meta, overwrite=overwrite)
        try:
            for sh in self.iter_shards():
                writer.write(sh)
        except BaseException:
            writer.abort()
            raise
        return writer.close().directory_path

    @property
    def directory_path(self) -> Path:
        if self._dir is None:
            raise ValueError("this activation set lives in memory")
        return self._dir

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ActivationSet:
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{directory} is not a complete activation set (no meta.json; an interrupted capture?)"
            )
        d = json.loads(meta_path.read_text())
        return cls(ActivationMeta.from_json(d), None, directory, list(d["shards"]))


def is_activation_set(directory: Path) -> bool:
    return (directory / "meta.json").is_file() or any(directory.glob("shard_*.safetensors"))


class ShardWriter:
    """Writes shards as they come into a temporary folder beside ``directory``; ``close()`` writes
    ``meta.json`` and renames the folder into place, ``abort()`` removes it. So an interrupted capture
    leaves nothing at ``directory`` and a previous set there survives until the new one is complete."""

    def __init__(self, directory: Path, meta: ActivationMeta, *, overwrite: bool = False) -> None:
        self.target = directory
        self.meta = meta
        self.files: list[str] = []
        if directory.exists():
            if not directory.is_dir():
                raise FileExistsError(
                    f"{directory} exists and is not a folder; refusing to overwrite"
                )
            if any(directory.iterdir()):
                if not is_activation_set(directory):
                    raise FileExistsError(
                        f"{directory} exists and is not an activation set; refusing to overwrite"
                    )
                if not overwrite:
                    raise FileExistsError(
                        f"{directory} already holds an activation set; pass overwrite=True "
                        "(repe capture --overwrite) to replace it"
                    )
        self.directory = temp_dir_beside(directory)

    def write(self, shard: Shard) -> None:
        name = f"shard_{len(self.files):05d}.safetensors"
        tensors = {k: v.contiguous() for k, v in shard.data.items()}
        tensors[_OFFSETS] = shard.offsets.contiguous()
        save_file(tensors, str(self.directory / name))
        self.files.append(name)

    def close(self) -> ActivationSet:
        d = self.meta.to_json()
        d["shards"] = self.files
        try:
            (self.directory / "meta.json").write_text(json.dumps(d, indent=1))
            replace_dir(self.directory, self.target)
        except BaseException:
            self.abort()
            raise
        return ActivationSet(self.meta, None, self.target, list(self.files))

    def abort(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
