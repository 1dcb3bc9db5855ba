"""Calibrated strength: measure the typical residual-stream norm at each site on neutral text, once,
and store it in the direction's ``stats`` so that ``coeff=0.1`` means 10% of that norm everywhere."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from repe.atomic import write_text
from repe.capture import capture
from repe.datasets.neutral import load_neutral
from repe.directions import Direction
from repe.models import LoadedModel

CALIBRATION_TEXTS = 20  # the first 20 shipped neutral texts (~330 tokens)


def calibration_texts() -> list[str]:
    """The neutral texts calibration measures on by default: the first :data:`CALIBRATION_TEXTS` of
    ``repe.datasets.load_neutral()``. All 40 move the medians by under 2% (SmolLM2, blocks 2-25) and
    take 2.3x as long, which a first steer in the app would wait for."""
    return load_neutral()[:CALIBRATION_TEXTS]


def residual_norms(
    lm: LoadedModel, sites: Sequence[str], texts: Sequence[str] | None = None, batch_size: int = 16
) -> dict[str, float]:
    """Median L2 norm of the activation per token at each site over neutral text (default:
    :func:`calibration_texts`).

    The first token of every text is left out: many models park huge "attention sink" activations there,
    which says nothing about the norm a steering vector competes with."""
    texts = list(texts) if texts is not None else calibration_texts()
    acts = capture(lm, texts, list(sites), positions="all", batch_size=batch_size, progress=False)
    out = {}
    for site in acts.sites:
        rows, offsets = acts.rows(site)
        keep = torch.ones(rows.shape[0], dtype=torch.bool)
        keep[offsets[:-1]] = False
        norms = rows[keep].flatten(1).norm(dim=-1)
        out[site] = float(norms.median())
    return out


STATISTIC = "median per-token L2 norm, first token of each text left out"


def calibration_source(texts: Sequence[str] | None = None) -> str:
    """What a calibrated ``resid_norm`` was measured on: the statistic and the text set's fingerprint."""
    from repe.batching import fingerprint

    which = "neutral" if texts is None else "custom"
    return (
        f"{STATISTIC}; {which} texts {fingerprint(list(texts) if texts else calibration_texts())}"
    )


def with_norms(
    direction: Direction, norms: dict[str, float], texts: Sequence[str] | None = None
) -> Direction:
    """A copy of ``direction`` carrying calibrated ``resid_norm`` values per site, and their source in
    ``params["calibration"]``."""
    stats = {s: {**direction.stats.get(s, {}), "resid_norm": norms[s]} for s in direction.sites}
    params = {**direction.params, "calibration": calibration_source(texts)}
    return replace(direction, stats=stats, params=params)


def calibrate(
    lm: LoadedModel, direction: Direction, texts: Sequence[str] | None = None
) -> Direction:
    """A copy of ``direction`` with ``stats[site]["resid_norm"]`` measured on ``lm``: the median per-token
    norm of the activation at the site over neutral text (``texts``), recorded with its source. This is
    the only statistic ``scale="relative"`` uses, and only this function writes it."""
    direction.check_compatible(lm)
    return with_norms(direction, residual_norms(lm, direction.sites, texts), texts)


def is_calibrated(direction: Direction) -> bool:
    """True when every site of ``direction`` carries a ``resid_norm`` written by :func:`calibrate`
    (a value without its source, e.g. from an older probe sweep, does not count)."""
    source = str(direction.params.get("calibration", ""))
    return source.startswith(STATISTIC) and all(
        "resid_norm" in direction.stats.get(s, {}) for s in direction.sites
    )


def norms_cache_file(lm: LoadedModel, texts: Sequence[str] | None = None) -> Path:
    """Where :func:`cached_residual_norms` keeps one model's norms: named by the model's identity
    (config and weights hashes), its dtype and the calibration source (statistic and texts)."""
    from repe.models import cache_root

    key = json.dumps(
        [lm.identity.to_dict(), str(lm.dtype), calibration_source(texts)], sort_keys=True
    )
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]
    return cache_root() / "norms" / f"{digest}.json"


def stored_norms(lm: LoadedModel, texts: Sequence[str] | None = None) -> dict[str, float]:
    """The norms :func:`cached_residual_norms` has kept on disk for this model (empty when none, or
    when the file is damaged: it is then measured again and rewritten)."""
    path = norms_cache_file(lm, texts)
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
        return {str(k): float(v) for k, v in loaded.items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def cached_residual_norms(
    lm: LoadedModel, sites: Sequence[str], texts: Sequence[str] | None = None
) -> dict[str, float]:
    """:func:`residual_norms` at ``sites``, measured once per model and kept on disk (in the repe
    cache folder, ``REPE_CACHE``); only sites not measured before run the model. The values are
    those :func:`calibrate` writes (same texts, same statistic)."""
    path = norms_cache_file(lm, texts)
    known = stored_norms(lm, texts)
    missing = [s for s in sites if s not in known]
    if missing:
        known.update(residual_norms(lm, missing, texts))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(known, indent=1, sort_keys=True))
    return {s: known[s] for s in sites}
