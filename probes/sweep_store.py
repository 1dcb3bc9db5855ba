"""A layer sweep on disk and back: the scores, the fitted readers' directions and thresholds, and the
provenance, so that a sweep survives a restart (the app's workspace keeps one per session).

Layout of the folder (written beside itself and swapped in, never half-written)::

    sweep.json          scores, sites, identity, stats, split, params, and each reader's type, params
                        and fitted scalars per site
    readers.safetensors the fitted unit directions, one tensor per (reader, site)

>>> save_sweep(result, "work/honesty-sweep")
>>> again = load_sweep("work/honesty-sweep")   # same scores, same directions, same thresholds
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from probes.readers import READERS, Reader
from probes.sweep import SiteScore, SweepResult, _jsonable
from repe.atomic import replace_dir, temp_dir_beside
from repe.errors import DataFormatError
from repe.models import ModelIdentity

KIND = "probe_sweep_store"
FORMAT_VERSION = 1
_FITTED = ("threshold_", "mean_pos_", "mean_neg_", "sign_flipped_", "n_features_in_", "n_pairs_")


def _key(reader: str, site: str) -> str:
    return f"{reader}::{site}"


def save_sweep(result: SweepResult, folder: str | os.PathLike[str]) -> Path:
    """Write ``result`` to ``folder`` (replacing a sweep stored there before, atomically)."""
    target = Path(folder)
    built = temp_dir_beside(target)
    try:
        tensors: dict[str, torch.Tensor] = {}
        readers: dict[str, Any] = {}
        for name, by_site in result.fitted.items():
            first = next(iter(by_site.values()))
            readers[name] = {
                "type": type(first).name,
                "params": _jsonable(first.get_params()),
                "fitted": {
                    site: {a: _jsonable(getattr(r, a)) for a in _FITTED}
                    for site, r in by_site.items()
                },
            }
            for site, r in by_site.items():
                tensors[_key(name, site)] = r.direction_.detach().float().contiguous()
        meta = {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "scores": [s.row() for s in result.scores],
            "sites": result.sites,
            "model": result.identity.to_dict(),
            "dataset_fingerprint": result.dataset_fingerprint,
            "stats": result.stats,
            "site_shapes": {k: list(v) for k, v in result.site_shapes.items()},
            "train_idx": list(result.train_idx),
            "test_idx": list(result.test_idx),
            "params": _jsonable(result.params),
            "readers": readers,
        }
        save_file(tensors, str(built / "readers.safetensors"))
        (built / "sweep.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        return replace_dir(built, target)
    except BaseException:
        import shutil

        shutil.rmtree(built, ignore_errors=True)
        raise


def _score(row: dict[str, Any]) -> SiteScore:
    def ci(lo: Any, hi: Any) -> tuple[float, float] | None:
        return None if lo is None or hi is None else (float(lo), float(hi))

    return SiteScore(
        reader=str(row["reader"]),
        site=str(row["site"]),
        layer=int(row["layer"]),
        accuracy=float(row["accuracy"]),
        accuracy_ci=ci(row["accuracy_lo"], row["accuracy_hi"]),
        auroc=float(row["auroc"]),
        auroc_ci=ci(row["auroc_lo"], row["auroc_hi"]),
        pair_accuracy=float(row["pair_accuracy"]),
        cohens_d=float(row["cohens_d"]),
        train_accuracy=float(row["train_accuracy"]),
        n_train=int(row["n_train"]),
        n_test=int(row["n_test"]),
    )


def load_sweep(folder: str | os.PathLike[str]) -> SweepResult:
    """Read a sweep written by :func:`save_sweep`; a damaged or foreign folder is a
    :class:`repe.errors.DataFormatError` naming what is wrong."""
    folder = Path(folder)
    meta_path, tensor_path = folder / "sweep.json", folder / "readers.safetensors"
    if not meta_path.is_file() or not tensor_path.is_file():
        raise DataFormatError(f"{folder} holds no stored sweep (sweep.json + readers.safetensors)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        tensors = load_file(str(tensor_path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a format error
        raise DataFormatError(f"{folder}: cannot read the stored sweep ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise DataFormatError(f"{meta_path}: not a stored sweep (kind is not {KIND!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataFormatError(
            f"{meta_path}: format_version {meta.get('format_version')!r} is not supported "
            f"(this version reads {FORMAT_VERSION})"
        )
    try:
        fitted: dict[str, dict[str, Reader]] = {}
        for name, info in meta["readers"].items():
            cls = READERS[info["type"]]
            fitted[name] = {}
            for site, scalars in info["fitted"].items():
                r = cls(**info["params"])
                r.direction_ = tensors[_key(name, site)]
                for a in _FITTED:
                    setattr(r, a, scalars[a])
                fitted[name][site] = r
        return SweepResult(
            scores=[_score(row) for row in meta["scores"]],
            fitted=fitted,
            sites=list(meta["sites"]),
            identity=ModelIdentity.from_dict(meta["model"]),
            dataset_fingerprint=str(meta["dataset_fingerprint"]),
            stats={k: dict(v) for k, v in meta["stats"].items()},
            site_shapes={k: tuple(v) for k, v in meta["site_shapes"].items()},
            train_idx=list(meta["train_idx"]),
            test_idx=list(meta["test_idx"]),
            params=dict(meta["params"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataFormatError(f"{meta_path}: malformed stored sweep ({exc!r})") from exc
