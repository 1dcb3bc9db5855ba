"""The cloze-form steering vector of a CAA behaviour, for models that do not read A/B options.

CAA's A/B evaluation asks for a letter. A model that picks its letter without reading the options
(``steering.evaluation.control``; the embedded SmolLM2-135M is one) gives A/B scores at chance whatever a
steering vector does. The cloze form drops the letters: the question's stem is the user turn and each
option's text a candidate assistant answer (``repe.datasets.caa.cloze_items``), scored by
``steering.evaluation.cloze.cloze_eval_specs``.

:func:`cloze_direction` is the matching vector: the mean over training pairs of (matching - other)
residual activations averaged over the answer's tokens (``probes.contrast.mean_difference``), from the
same training split as :func:`probes.caa.caa_direction` (``caa_split``), so held-out questions are never
seen.

>>> d = cloze_direction(lm, "myopic-reward", layers=[6], n_pairs=100)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import cast

import torch

from probes.caa import _layers
from probes.contrast import mean_difference
from repe.batching import Inputs
from repe.calibration import calibrate
from repe.capture import capture
from repe.datasets import CAAItem
from repe.datasets.caa import cloze_pairs, cloze_split
from repe.directions import Direction
from repe.models import LoadedModel

METHOD = "cloze_mean_diff"
_OPTION = re.compile(r"^\s*\(([A-Z])\)\s?(.*)$")


def cloze_direction(
    lm: LoadedModel,
    behaviour_or_items: str | Sequence[CAAItem],
    layers: Sequence[int] | int | None = None,
    n_pairs: int | None = None,
    seed: int = 0,
    *,
    batch_size: int = 16,
    test_frac: float = 0.2,
) -> Direction:
    """Steering vector from the answer texts: mean over pairs of (matching - other) activation at
    ``blocks.L.hook_resid_post``, averaged over the answer's tokens (question in the user turn).

    Args:
        behaviour_or_items: a CAA behaviour (its training split, as :func:`repe.datasets.caa.caa_split`)
            or a list of ``CAAItem`` used as they are.
        n_pairs: use at most this many items, sampled with ``seed`` (default: all).

    Returns a unit-norm Direction (``method="cloze_mean_diff"``) with ``stats[site]`` holding
    ``mean_diff_norm`` and ``resid_norm`` (calibrated strength, :mod:`repe.calibration`).
    """
    if n_pairs is not None and n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1 or None; got {n_pairs!r}")
    layer_list = _layers(lm, layers)
    if isinstance(behaviour_or_items, str):
        behaviour: str | None = behaviour_or_items
        items = cloze_split(behaviour_or_items, seed=seed, test_frac=test_frac)[0]
    else:
        behaviour = None
        items = list(behaviour_or_items)
    if not items:
        raise ValueError("no items to build a cloze vector from")
    dataset = cloze_pairs(items, f"caa/{behaviour or 'items'}[cloze train]")
    if n_pairs is not None and n_pairs < len(dataset):
        dataset = dataset.sample(n_pairs, seed=seed)
    sites = [f"blocks.{layer}.hook_resid_post" for layer in layer_list]
    pos, neg = (
        capture(
            lm,
            cast(Inputs, [getattr(p, side) for p in dataset.pairs]),
            sites,
            positions="assistant_mean",
            batch_size=batch_size,
            progress=False,
        )
        for side in ("positive", "negative")
    )
    vectors: dict[str, torch.Tensor] = {}
    stats: dict[str, dict[str, float]] = {}
    for s in sites:
        diff = mean_difference(pos[s], neg[s])
        norm = float(diff.norm())
        if norm == 0.0:
            raise ValueError(f"the mean difference at {s} is zero: are the two answers identical?")
        vectors[s] = (diff / norm).float()
        stats[s] = {"mean_diff_norm": norm}
    direction = Direction(
        vectors=vectors,
        identity=lm.identity,
        name=f"cloze/{behaviour or dataset.name}",
        method=METHOD,
        params={
            "behaviour": behaviour,
            "layers": layer_list,
            "n_pairs": len(dataset),
            "seed": seed,
            "test_frac": test_frac if behaviour is not None else None,
            "position": "answer_text_mean",
            "sign": "positive = the answer_matching_behavior option's text",
        },
        normalisation="unit",
        dataset_fingerprint=dataset.fingerprint(),
        stats=stats,
    )
    return calibrate(lm, direction)
