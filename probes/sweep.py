"""Layer sweeps: fit every reader at every site on training pairs, score it on held-out pairs.

For each (reader, site) the held-out numbers are the accuracy of the reader's classifier (threshold
fitted on the training pairs), the AUROC of the projections (positives vs negatives), the pair accuracy
(positive side projects higher than its own negative side) and Cohen's d, with seeded bootstrap 95%
confidence intervals over held-out pairs for accuracy and AUROC. The best site is the one with the
highest held-out AUROC (ties broken by accuracy, pair accuracy, then Cohen's d).

>>> result = probe_dataset(lm, load_concept("facts/honesty", tokenizer=lm.tokenizer))
>>> print(result.table())
>>> honesty = result.to_direction("mean_diff")       # a repe.directions.Direction
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.base import clone
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from probes.contrast import cohens_d, mean_difference
from probes.readers import Reader, make_reader
from repe.activations import ActivationSet
from repe.atomic import atomic_file, write_text
from repe.capture import DEFAULT_SITES, capture
from repe.datasets import ContrastDataset
from repe.directions import Direction
from repe.models import LoadedModel, ModelIdentity
from repe.positions import PositionSpec
from repe.sites import SiteSpec, parse_site

DEFAULT_READERS: tuple[str, ...] = ("mean_diff", "pca_diff", "lat", "logistic", "random")
"""Readers a sweep runs when none are named (``pca_center`` spans the same axis as ``pca_diff`` on
paired data, so it is left out by default)."""

ReaderSpec = str | Reader
CI = tuple[float, float]

__all__ = [
    "DEFAULT_READERS",
    "SiteScore",
    "SweepResult",
    "probe_dataset",
    "resolve_readers",
    "sweep",
]


@dataclass(frozen=True)
class SiteScore:
    """Held-out scores of one reader at one site (CIs are bootstrap 95% intervals, None if n_boot=0)."""

    reader: str
    site: str
    layer: int
    accuracy: float
    accuracy_ci: CI | None
    auroc: float
    auroc_ci: CI | None
    pair_accuracy: float
    cohens_d: float
    train_accuracy: float
    n_train: int
    n_test: int

    @property
    def rank_key(self) -> tuple[float, float, float, float]:
        """What "best" means: held-out AUROC, then accuracy, pair accuracy, Cohen's d."""
        return (self.auroc, self.accuracy, self.pair_accuracy, self.cohens_d)

    def metrics(self) -> dict[str, Any]:
        """JSON-ready metrics (CIs as [low, high] lists)."""
        return {
            "accuracy": self.accuracy,
            "accuracy_ci": list(self.accuracy_ci) if self.accuracy_ci else None,
            "auroc": self.auroc,
            "auroc_ci": list(self.auroc_ci) if self.auroc_ci else None,
            "pair_accuracy": self.pair_accuracy,
            "cohens_d": self.cohens_d,
            "train_accuracy": self.train_accuracy,
            "n_train": self.n_train,
            "n_test": self.n_test,
        }

    def row(self) -> dict[str, Any]:
        """One flat row of the tidy table."""
        lo_a, hi_a = self.accuracy_ci if self.accuracy_ci else (None, None)
        lo_r, hi_r = self.auroc_ci if self.auroc_ci else (None, None)
        return {
            "reader": self.reader,
            "site": self.site,
            "layer": self.layer,
            "accuracy": self.accuracy,
            "accuracy_lo": lo_a,
            "accuracy_hi": hi_a,
            "auroc": self.auroc,
            "auroc_lo": lo_r,
            "auroc_hi": hi_r,
            "pair_accuracy": self.pair_accuracy,
            "cohens_d": self.cohens_d,
            "train_accuracy": self.train_accuracy,
            "n_train": self.n_train,
            "n_test": self.n_test,
        }


@dataclass
class SweepResult:
    """Everything a sweep produced: scores, fitted readers, per-site stats and provenance."""

    scores: list[SiteScore]
    fitted: dict[str, dict[str, Reader]]
    sites: list[str]
    identity: ModelIdentity
    dataset_fingerprint: str
    stats: dict[str, dict[str, float]]
    site_shapes: dict[str, tuple[int, ...]]
    train_idx: list[int]
    test_idx: list[int]
    params: dict[str, Any] = field(default_factory=dict)

    # ---- lookup -----------------------------------------------------------------------------
    @property
    def readers(self) -> list[str]:
        return list(self.fitted)

    def _check_reader(self, reader: str) -> None:
        if reader not in self.fitted:
            raise ValueError(
                f"reader {reader!r} was not part of this sweep; readers: {', '.join(self.fitted)}"
            )

    def score(self, reader: str, site: str) -> SiteScore:
        self._check_reader(reader)
        for s in self.scores:
            if s.reader == reader and s.site == site:
                return s
        raise ValueError(f"site {site!r} was not swept; sites: {self.sites}")

    def reader_scores(self, reader: str) -> list[SiteScore]:
        """Scores of one reader, in site order."""
        self._check_reader(reader)
        return [s for s in self.scores if s.reader == reader]

    def best(self, reader: str | None = None) -> SiteScore:
        """The best (reader, site) by held-out AUROC, then accuracy. Without ``reader``, over all
        readers except baselines (unless only baselines ran); earlier readers and sites win ties."""
        if reader is not None:
            pool = self.reader_scores(reader)
        else:
            pool = [s for s in self.scores if not self.fitted[s.reader][s.site].baseline]
            pool = pool or list(self.scores)
        best = pool[0]
        for s in pool[1:]:
            if s.rank_key > best.rank_key:
                best = s
        return best

    def best_site(self, reader: str | None = None) -> str:
        return self.best(reader).site

    @property
    def best_reader(self) -> str:
        return self.best().reader

    # ---- tables -----------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """The tidy table: one dict per (reader, site)."""
        return [s.row() for s in self.scores]

    def table(self, reader: str | None = None) -> str:
        """A text table. Without ``reader``: one line per site, ``AUROC/accuracy`` for every reader.
        With ``reader``: that reader's scores with their 95% intervals."""
        if reader is not None:
            return _long_table(self.reader_scores(reader), self.best(reader))
        return _wide_table(self)

    def write_csv(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        rows = self.rows()
        with atomic_file(p) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return p

    def to_json(self) -> dict[str, Any]:
        best = self.best()
        return {
            "kind": "probe_sweep",
            "format_version": 1,
            "model": self.identity.to_dict(),
            "dataset_fingerprint": self.dataset_fingerprint,
            "params": self.params,
            "sites": self.sites,
            "readers": self.readers,
            "best": {"reader": best.reader, "site": best.site, **best.metrics()},
            "best_per_reader": {r: self.best_site(r) for r in self.readers},
            "stats": self.stats,
            "rows": self.rows(),
        }

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        return write_text(path, json.dumps(self.to_json(), indent=1))

    # ---- artifacts --------------------------------------------------------------------------
    def to_direction(
        self,
        reader: str,
        sites: str | Sequence[str] | None = None,
        *,
        name: str | None = None,
    ) -> Direction:
        """The fitted directions of ``reader`` as a :class:`repe.directions.Direction`.

        ``sites``: None for every swept site, ``"best"`` for the reader's best site only, or site
        name(s). ``best_site`` is the reader's best site among those included. Per site, ``metrics``
        holds the held-out scores and ``stats`` the class-mean-difference norm, the mean activation norm
        and the reader's threshold (projection above it = concept present).
        """
        self._check_reader(reader)
        if sites is None:
            chosen = list(self.sites)
        elif sites == "best":
            chosen = [self.best_site(reader)]
        else:
            chosen = [sites] if isinstance(sites, str) else list(sites)
            missing = [s for s in chosen if s not in self.sites]
            if missing or not chosen:
                raise ValueError(
                    f"sites must be None, 'best' or swept site names; {missing or chosen!r} "
                    f"not among {self.sites}"
                )
        fitted = self.fitted[reader]
        scores = {s.site: s for s in self.reader_scores(reader)}
        vectors = {
            s: fitted[s].direction_.detach().clone().reshape(self.site_shapes[s]) for s in chosen
        }
        best = max((scores[s] for s in chosen), key=lambda sc: sc.rank_key)
        stats = {s: {**self.stats[s], "threshold": float(fitted[s].threshold_)} for s in chosen}
        reader_params = _jsonable(fitted[chosen[0]].get_params())
        return Direction(
            vectors=vectors,
            identity=self.identity,
            name=name or reader,
            method=reader,
            params={"reader": reader, "reader_params": reader_params, **self.params},
            normalisation="unit",
            dataset_fingerprint=self.dataset_fingerprint,
            metrics={s: scores[s].metrics() for s in chosen},
            stats=stats,
            best_site=best.site,
        )


# ---- the sweep -------------------------------------------------------------------------------
def resolve_readers(readers: Sequence[ReaderSpec] | ReaderSpec) -> dict[str, Reader]:
    """Names or reader instances -> ``{name: unfitted reader}`` (names must be unique)."""
    items: Sequence[ReaderSpec] = [readers] if isinstance(readers, str | Reader) else list(readers)
    if not items:
        raise ValueError("readers is empty: name at least one reader")
    out: dict[str, Reader] = {}
    for item in items:
        if isinstance(item, str):
            reader = make_reader(item)
        elif isinstance(item, Reader):
            reader = item
        else:
            raise TypeError(
                f"readers must hold reader names or Reader instances; got {type(item).__name__}"
            )
        if reader.name in out:
            raise ValueError(f"reader {reader.name!r} appears twice in readers")
        out[reader.name] = reader
    return out


def _indices(idx: Sequence[int] | torch.Tensor | np.ndarray, name: str, n: int) -> list[int]:
    values = [int(i) for i in (idx.tolist() if hasattr(idx, "tolist") else idx)]
    bad = [i for i in values if not 0 <= i < n]
    if bad:
        raise ValueError(f"{name} holds indices out of range 0..{n - 1}: {bad[:5]}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} holds repeated indices")
    return values


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return repr(x)


def _auroc_rows(sp: np.ndarray, sn: np.ndarray) -> np.ndarray:
    """AUROC of each row of positive scores ``sp`` [B, m] against ``sn`` [B, m] (Mann-Whitney U)."""
    m_pos, m_neg = sp.shape[1], sn.shape[1]
    ranks = rankdata(np.concatenate([sp, sn], axis=1), axis=1)
    u = ranks[:, :m_pos].sum(axis=1) - m_pos * (m_pos + 1) / 2.0
    return np.asarray(u / (m_pos * m_neg), dtype=np.float64)


def _ci(values: np.ndarray) -> CI:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return (float(lo), float(hi))


def _score_site(
    reader: Reader,
    P: torch.Tensor,
    N: torch.Tensor,
    tr: torch.Tensor,
    te: torch.Tensor,
    boot: np.ndarray | None,
) -> tuple[float, CI | None, float, CI | None, float, float, float]:
    sp = reader.decision_function(P[te]).numpy()
    sn = reader.decision_function(N[te]).numpy()
    hit_p, hit_n = (sp > 0).astype(np.float64), (sn <= 0).astype(np.float64)
    m = len(sp)
    accuracy = float((hit_p.sum() + hit_n.sum()) / (2 * m))
    y = np.concatenate([np.ones(m), np.zeros(m)])
    auroc = float(roc_auc_score(y, np.concatenate([sp, sn])))
    acc_ci = auroc_ci = None
    if boot is not None:
        acc_ci = _ci((hit_p[boot].mean(axis=1) + hit_n[boot].mean(axis=1)) / 2.0)
        auroc_ci = _ci(_auroc_rows(sp[boot], sn[boot]))
    pair_acc = float((sp > sn).mean())
    train_acc = reader.score(P[tr], N[tr])
    return accuracy, acc_ci, auroc, auroc_ci, pair_acc, cohens_d(sp, sn), train_acc


def sweep(
    pos: ActivationSet,
    neg: ActivationSet,
    train_idx: Sequence[int] | torch.Tensor | np.ndarray,
    test_idx: Sequence[int] | torch.Tensor | np.ndarray,
    readers: Sequence[ReaderSpec] | ReaderSpec = DEFAULT_READERS,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    sites: Sequence[str] | None = None,
    dataset_fingerprint: str | None = None,
    params: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    on_site: Callable[[int, int], None] | None = None,
) -> SweepResult:
    """Fit every reader at every site on the training pairs and score it on the held-out pairs.

    Args:
        pos, neg: activation sets of the positive and negative sides (row ``i`` of each is pair ``i``;
            same sites, one row per example).
        train_idx, test_idx: disjoint pair indices (e.g. from ``ContrastDataset.split``).
        readers: reader names (``make_reader``) or unfitted Reader instances.
        n_boot: bootstrap resamples of the held-out pairs for the 95% intervals (0: no intervals).
        seed: seeds the bootstrap (the same resamples serve every reader and site).
        sites: a subset of the captured sites (default: all).
        dataset_fingerprint: recorded in the directions (default: a hash of both sets' fingerprints).
        params: extra provenance recorded in the result and its directions.
        progress: show a progress bar over sites (default: off).
        on_site: called as ``on_site(sites_done, n_sites)`` after each site (a UI's progress bar;
            raising from it stops the sweep).
    """
    if pos.sites != neg.sites:
        raise ValueError(f"pos and neg must hold the same sites; got {pos.sites} and {neg.sites}")
    if len(pos) != len(neg):
        raise ValueError(
            f"pos and neg must hold the same number of examples (one per pair); got {len(pos)} "
            f"and {len(neg)}"
        )
    if pos.identity != neg.identity:
        raise ValueError("pos and neg were captured on different models")
    if not pos.meta.one_row or not neg.meta.one_row:
        raise ValueError(
            f"readers need one row per example; positions={pos.meta.positions!r} gives several "
            "(capture with positions='last', 'mean' or 'assistant_mean')"
        )
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise ValueError(f"n_boot must be an integer >= 0; got {n_boot!r}")
    n = len(pos)
    tr_list = _indices(train_idx, "train_idx", n)
    te_list = _indices(test_idx, "test_idx", n)
    if len(tr_list) < 2:
        raise ValueError(f"train_idx needs at least 2 pairs; got {len(tr_list)}")
    if not te_list:
        raise ValueError("test_idx is empty: a sweep scores on held-out pairs")
    overlap = sorted(set(tr_list) & set(te_list))
    if overlap:
        raise ValueError(
            f"train_idx and test_idx overlap (pairs {overlap[:5]}); held-out pairs must be unseen"
        )
    site_list = list(sites) if sites is not None else pos.sites
    unknown = [s for s in site_list if s not in pos.sites]
    if unknown or not site_list:
        raise ValueError(f"sites {unknown or site_list!r} not among the captured {pos.sites}")
    prototypes = resolve_readers(readers)
    tr, te = torch.tensor(tr_list), torch.tensor(te_list)
    boot = None
    if n_boot > 0:
        boot = np.random.default_rng(seed).integers(0, len(te_list), size=(n_boot, len(te_list)))

    fitted: dict[str, dict[str, Reader]] = {name: {} for name in prototypes}
    by_site: dict[str, list[SiteScore]] = {}
    stats: dict[str, dict[str, float]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    # small problems: one thread is faster here, and immune to oversubscribed cores
    with threadpool_limits(limits=1):
        for i_site, site in enumerate(
            tqdm(site_list, desc="sweep", unit="site", disable=not progress), 1
        ):
            raw_p, raw_n = pos[site], neg[site]
            shapes[site] = tuple(raw_p.shape[1:])
            P = raw_p.detach().to("cpu", torch.float64).flatten(1)
            N = raw_n.detach().to("cpu", torch.float64).flatten(1)
            stats[site] = {
                "mean_diff_norm": float(mean_difference(P[tr], N[tr]).norm()),
                # the contrast data's own activation norm; not the calibrated "resid_norm" that
                # scale="relative" uses (only repe.calibration writes that)
                "contrast_norm": float(torch.cat([P, N]).norm(dim=1).mean()),
            }
            layer = parse_site(site).layer
            by_site[site] = []
            for name, proto in prototypes.items():
                reader = clone(proto).fit(P[tr], N[tr])
                fitted[name][site] = reader
                acc, acc_ci, auroc, auroc_ci, pair_acc, d, train_acc = _score_site(
                    reader, P, N, tr, te, boot
                )
                by_site[site].append(
                    SiteScore(
                        reader=name,
                        site=site,
                        layer=layer,
                        accuracy=acc,
                        accuracy_ci=acc_ci,
                        auroc=auroc,
                        auroc_ci=auroc_ci,
                        pair_accuracy=pair_acc,
                        cohens_d=d,
                        train_accuracy=train_acc,
                        n_train=len(tr_list),
                        n_test=len(te_list),
                    )
                )
            if on_site is not None:
                on_site(i_site, len(site_list))
    scores = [
        s for name in prototypes for site in site_list for s in by_site[site] if s.reader == name
    ]
    fp = (
        dataset_fingerprint
        or hashlib.sha256(f"{pos.fingerprint}:{neg.fingerprint}".encode()).hexdigest()[:16]
    )
    all_params: dict[str, Any] = {
        "positions": pos.meta.positions,
        "n_boot": n_boot,
        "seed": seed,
        "n_train": len(tr_list),
        "n_test": len(te_list),
        **_jsonable(dict(params or {})),
    }
    return SweepResult(
        scores=scores,
        fitted=fitted,
        sites=site_list,
        identity=pos.identity,
        dataset_fingerprint=fp,
        stats=stats,
        site_shapes=shapes,
        train_idx=tr_list,
        test_idx=te_list,
        params=all_params,
    )


_INDEX_KEY = "__probe_index__"


def split_indices(
    dataset: ContrastDataset, train_frac: float = 0.7, seed: int = 0
) -> tuple[list[int], list[int]]:
    """``dataset.split`` as pair indices (so pairs sharing ``meta["group"]`` stay on one side)."""
    tagged = ContrastDataset(
        dataset.name,
        [replace(p, meta={**p.meta, _INDEX_KEY: i}) for i, p in enumerate(dataset.pairs)],
        source=dataset.source,
        meta=dict(dataset.meta),
    )
    train, test = tagged.split(train_frac, seed)
    return (
        [int(p.meta[_INDEX_KEY]) for p in train.pairs],
        [int(p.meta[_INDEX_KEY]) for p in test.pairs],
    )


def probe_dataset(
    lm: LoadedModel,
    dataset: ContrastDataset,
    sites: SiteSpec = DEFAULT_SITES,
    readers: Sequence[ReaderSpec] | ReaderSpec = DEFAULT_READERS,
    *,
    positions: PositionSpec = "last",
    train_frac: float = 0.7,
    seed: int = 0,
    batch_size: int = 16,
    n_boot: int = 1000,
    progress: bool | None = None,
    backend: str = "hf",
    max_length: int | None = None,
    threads: int | None = None,
) -> SweepResult:
    """Capture both sides of ``dataset`` at ``sites`` and sweep ``readers`` over them.

    The split is ``dataset.split(train_frac, seed)``, so pairs that share a group (e.g. the token
    prefixes of one statement) never straddle train and test. ``threads`` caps the BLAS / OpenMP
    threads of the capture's forward passes (None: the libraries' defaults); on cores shared with
    other work, 1 avoids oversubscription and is often faster. The sweep itself always uses one.
    """
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads must be None or an integer >= 1; got {threads!r}")
    if len(dataset) < 3:
        raise ValueError(
            f"dataset {dataset.name!r} has {len(dataset)} pair(s); a probe needs at least 3 "
            "(2 to train, 1 to test)"
        )
    train_idx, test_idx = split_indices(dataset, train_frac, seed)
    kw: dict[str, Any] = {
        "positions": positions,
        "batch_size": batch_size,
        "backend": backend,
        "progress": progress,
        "max_length": max_length,
    }
    limit = threadpool_limits(limits=threads) if threads is not None else contextlib.nullcontext()
    with limit:
        pos = capture(lm, dataset.positives(), sites, **kw)
        neg = capture(lm, dataset.negatives(), sites, **kw)
    return sweep(
        pos,
        neg,
        train_idx,
        test_idx,
        readers,
        n_boot=n_boot,
        seed=seed,
        dataset_fingerprint=dataset.fingerprint(),
        params={
            "dataset": dataset.name,
            "n_pairs": len(dataset),
            "train_frac": train_frac,
            "split_seed": seed,
        },
        progress=progress,
    )


# ---- text tables -----------------------------------------------------------------------------
def _fmt_ci(ci: CI | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _long_table(scores: list[SiteScore], best: SiteScore) -> str:
    head = (
        f"{'site':28s} {'auroc':>6s} {'95% CI':>16s} {'acc':>6s} {'95% CI':>16s} "
        f"{'pair':>6s} {'d':>6s} {'train':>6s}"
    )
    lines = [f"reader: {best.reader}", head]
    for s in scores:
        mark = "  <- best" if s is best else ""
        lines.append(
            f"{s.site:28s} {s.auroc:6.3f} {_fmt_ci(s.auroc_ci):>16s} {s.accuracy:6.3f} "
            f"{_fmt_ci(s.accuracy_ci):>16s} {s.pair_accuracy:6.3f} {s.cohens_d:6.2f} "
            f"{s.train_accuracy:6.3f}{mark}"
        )
    return "\n".join(lines)


def _wide_table(result: SweepResult) -> str:
    readers = result.readers
    width = max(11, *(len(r) for r in readers))
    best = result.best()
    lines = [
        "held-out AUROC/accuracy per site (best marked *)",
        f"{'site':28s} " + " ".join(f"{r:>{width}s}" for r in readers),
    ]
    for site in result.sites:
        cells = []
        for r in readers:
            s = result.score(r, site)
            mark = "*" if s is best else " "
            cells.append(f"{f'{s.auroc:.3f}/{s.accuracy:.3f}{mark}':>{width}s}")
        lines.append(f"{site:28s} " + " ".join(cells))
    ci = f" AUROC CI {_fmt_ci(best.auroc_ci)}" if best.auroc_ci else ""
    lines.append(
        f"best: {best.reader} at {best.site}: AUROC {best.auroc:.3f}{ci}, accuracy "
        f"{best.accuracy:.3f} {_fmt_ci(best.accuracy_ci)} (n_train={best.n_train}, "
        f"n_test={best.n_test})"
    )
    return "\n".join(lines)
