"""Direction: per-site vectors with their provenance, algebra, and safetensors + JSON I/O.

A Direction is what readers (``probes``) produce and what writers (``steering``) consume. Its sign is
calibrated: a positive projection means the concept is present. ``0.5 * honesty - sycophancy`` is a
Direction too, provided both were made on the same model and sites.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from repe.artifacts import check_identity, check_version, load_artifact, register, save_artifact
from repe.errors import ArtifactMismatchError, DataFormatError
from repe.models import LoadedModel, ModelIdentity
from repe.sites import parse_site

SIGN_CONVENTION = "positive projection = concept present"


@register("direction")
@dataclass(frozen=True)
class Direction:
    """Per-site vectors (``{site: tensor[*site_shape]}``) plus what they are and where they came from.

    ``normalisation`` is ``"unit"`` when every vector has norm 1 (readers' output), ``"weighted"`` for a
    weighted combination of unit directions (``0.5 * a + b``: the weights set the steering strength, see
    :func:`steering.spec.strength`) and ``"raw"`` otherwise.
    ``stats`` holds per-site numbers that give a coefficient meaning (e.g. ``resid_norm``: the typical
    residual-stream norm on neutral text; ``mean_diff_norm``: the raw contrast size).
    """

    vectors: dict[str, torch.Tensor]
    identity: ModelIdentity
    name: str = "direction"
    method: str = "manual"
    params: dict[str, Any] = field(default_factory=dict)
    normalisation: str = "unit"
    sign: str = SIGN_CONVENTION
    dataset_fingerprint: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    best_site: str | None = None
    recommended_coeff: float | None = None

    KIND = "direction"
    FORMAT_VERSION = 1

    def __post_init__(self) -> None:
        if not self.vectors:
            raise ValueError("a Direction needs at least one site vector")
        for site, v in self.vectors.items():
            s = parse_site(site, self.identity.n_layers)
            if not isinstance(v, torch.Tensor) or v.dim() < 1:
                raise ValueError(f"vector for {site} must be a tensor; got {type(v).__name__}")
            if s.is_residual and v.shape != (self.identity.d_model,):
                raise ArtifactMismatchError(
                    f"vector for {site} has shape {tuple(v.shape)}; the model's hidden size is "
                    f"{self.identity.d_model}"
                )
            if not torch.isfinite(v).all():
                raise ValueError(f"vector for {site} contains NaN or inf")

    # ---- access -----------------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        return sorted(self.vectors, key=lambda s: (parse_site(s).layer, s))

    def __getitem__(self, site: str) -> torch.Tensor:
        try:
            return self.vectors[site]
        except KeyError:
            raise KeyError(
                f"direction {self.name!r} has no vector at {site!r}; sites: {self.sites}"
            ) from None

    def select(self, sites: Iterable[str] | str) -> Direction:
        """A copy restricted to some sites."""
        names = [sites] if isinstance(sites, str) else list(sites)
        unknown = [n for n in names if n not in self.vectors]
        if unknown:
            raise ValueError(
                f"{self.name!r} has no vector at {', '.join(unknown)}; its sites: "
                f"{', '.join(self.sites)}"
            )
        if not names:
            raise ValueError("select() needs at least one site")
        return replace(
            self,
            vectors={s: self[s] for s in names},
            best_site=self.best_site if self.best_site in names else None,
        )

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Direction:
        """A copy with every vector moved/cast (the original is untouched)."""
        return replace(
            self,
            vectors={k: v.to(device=device, dtype=dtype).clone() for k, v in self.vectors.items()},
        )

    def normalized(self) -> Direction:
        return replace(
            self,
            vectors={k: v / v.norm().clamp(min=1e-12) for k, v in self.vectors.items()},
            normalisation="unit",
        )

    def check_compatible(self, lm: LoadedModel) -> None:
        check_identity(self.identity, lm.identity, what=f"direction {self.name!r}")

    # ---- algebra ----------------------------------------------------------------------------
    def _combine(self, other: Direction, sign: float, op: str) -> Direction:
        if not isinstance(other, Direction):
            return NotImplemented
        diffs = self.identity.mismatches(other.identity)
        if diffs:
            raise ArtifactMismatchError(
                f"cannot combine {self.name!r} and {other.name!r}: made on different models ({'; '.join(diffs)})"
            )
        if set(self.vectors) != set(other.vectors):
            raise ArtifactMismatchError(
                f"cannot combine {self.name!r} and {other.name!r}: their sites differ "
                f"({sorted(set(self.vectors) ^ set(other.vectors))})"
            )
        vecs = {
            k: self.vectors[k] + sign * other.vectors[k].to(self.vectors[k]) for k in self.vectors
        }
        return Direction(
            vectors=vecs,
            identity=self.identity,
            name=f"({self.name} {op} {other.name})",
            method="algebra",
            params={
                "expression": f"({self.name} {op} {other.name})",
                "operands": [self.name, other.name],
            },
            normalisation="weighted"
            if self.normalisation in ("unit", "weighted")
            and other.normalisation in ("unit", "weighted")
            else "raw",
            stats=self.stats,
        )

    def __add__(self, other: Direction) -> Direction:
        return self._combine(other, 1.0, "+")

    def __sub__(self, other: Direction) -> Direction:
        return self._combine(other, -1.0, "-")

    def __mul__(self, c: float) -> Direction:
        if not isinstance(c, int | float):
            return NotImplemented
        return replace(
            self,
            vectors={k: v * float(c) for k, v in self.vectors.items()},
            name=f"{c:g}*{self.name}",
            method="algebra",
            params={"expression": f"{c:g}*{self.name}", "operands": [self.name]},
            normalisation=self.normalisation
            if c == 1
            else ("weighted" if self.normalisation in ("unit", "weighted") else "raw"),
            recommended_coeff=None,
        )

    __rmul__ = __mul__

    def __neg__(self) -> Direction:
        return self * -1.0

    # ---- I/O --------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.float() for k, v in self.vectors.items()}

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.identity.to_dict(),
            "hidden_size": self.identity.d_model,
            "sites": self.sites,
            "method": self.method,
            "params": self.params,
            "sign": self.sign,
            "normalisation": self.normalisation,
            "dataset_fingerprint": self.dataset_fingerprint,
            "metrics": self.metrics,
            "stats": self.stats,
            "best_site": self.best_site,
            "recommended_coeff": self.recommended_coeff,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path.safetensors`` + ``path.json``."""
        return save_artifact(self, path)

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Direction:
        check_version(meta, cls.KIND, cls.FORMAT_VERSION)
        try:
            identity = ModelIdentity.from_dict(meta["model"])
            sites = list(meta["sites"])
        except (KeyError, TypeError) as exc:
            raise DataFormatError(f"direction metadata is missing {exc}") from exc
        if sorted(sites) != sorted(tensors):
            raise DataFormatError(
                f"direction metadata lists sites {sites} but the tensors are {sorted(tensors)}"
            )
        return cls(
            vectors=dict(tensors),
            identity=identity,
            name=meta.get("name", "direction"),
            method=meta.get("method", "unknown"),
            params=meta.get("params", {}),
            normalisation=meta.get("normalisation", "raw"),
            sign=meta.get("sign", SIGN_CONVENTION),
            dataset_fingerprint=meta.get("dataset_fingerprint"),
            metrics=meta.get("metrics", {}),
            stats=meta.get("stats", {}),
            best_site=meta.get("best_site"),
            recommended_coeff=meta.get("recommended_coeff"),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: LoadedModel | None = None) -> Direction:
        """Load a saved direction; with ``model``, refuse it if it was made for another model."""
        obj = load_artifact(path, model)
        if not isinstance(obj, cls):
            raise DataFormatError(f"{path} holds a {type(obj).__name__}, not a Direction")
        return obj
