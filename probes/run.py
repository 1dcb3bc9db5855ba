"""One call from a concept name (or a pairs file) to a saved direction, a sweep table and a figure.

>>> report = run_probe(lm, "honesty", out_dir="out/honesty")
>>> print(report.text())
>>> report.paths["direction"]          # out/honesty/honesty.safetensors (+ .json)
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from probes.sweep import DEFAULT_READERS, ReaderSpec, SiteScore, SweepResult, probe_dataset
from repe.atomic import atomic_file
from repe.capture import DEFAULT_SITES
from repe.datasets import ContrastDataset, list_concepts, load_concept, load_pairs_file
from repe.datasets.core import DatasetNotFoundError
from repe.directions import Direction
from repe.errors import MissingExtraError
from repe.models import LoadedModel
from repe.positions import PositionSpec
from repe.sites import SiteSpec

__all__ = ["CONCEPT_ALIASES", "ProbeReport", "resolve_concept", "run_probe"]

CONCEPT_ALIASES: dict[str, str] = {"honesty": "facts/honesty"}
"""Short names for shipped concepts; a name that is the last part of exactly one concept (e.g.
``sycophancy`` for ``caa/sycophancy``) is accepted too."""


def resolve_concept(concept: str) -> str:
    """A concept name or alias -> the ``load_concept`` name (errors list the valid names)."""
    names = list_concepts()
    if concept in names:
        return concept
    if concept in CONCEPT_ALIASES:
        return CONCEPT_ALIASES[concept]
    matches = [n for n in names if n.rsplit("/", 1)[-1] == concept]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise DatasetNotFoundError(
            f"concept {concept!r} is ambiguous: it could be {', '.join(matches)}; name one of them"
        )
    raise DatasetNotFoundError(
        f"unknown concept {concept!r}; aliases: {', '.join(sorted(CONCEPT_ALIASES))}; "
        f"concepts: {', '.join(names)}"
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "direction"


@dataclass
class ProbeReport:
    """What ``run_probe`` did: the sweep, the chosen reader and site, the saved files."""

    result: SweepResult
    direction: Direction
    dataset: str
    n_pairs: int
    seconds: float
    paths: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> SiteScore:
        return self.result.best()

    @property
    def reader(self) -> str:
        return self.best.reader

    @property
    def best_site(self) -> str:
        return self.best.site

    def text(self) -> str:
        """A printable summary: the per-site table of every reader, the choice, the files."""
        b = self.best
        lines = [
            f"probe: {self.dataset} ({self.n_pairs} pairs: {b.n_train} train / {b.n_test} held out) "
            f"on {self.result.identity.name}, {self.seconds:.1f}s",
            "",
            self.result.table(),
            "",
            self.result.table(b.reader),
            "",
            f"direction: {self.direction.name} ({b.reader}), best site {b.site}",
        ]
        lines += [f"  {k}: {v}" for k, v in self.paths.items()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()


def run_probe(
    lm: LoadedModel,
    concept: str | None = None,
    data_file: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] = "probe_out",
    readers: Sequence[ReaderSpec] = DEFAULT_READERS,
    *,
    sites: SiteSpec = DEFAULT_SITES,
    positions: PositionSpec = "last",
    max_pairs: int | None = 300,
    train_frac: float = 0.7,
    seed: int = 0,
    n_boot: int = 1000,
    batch_size: int = 16,
    chat: bool = True,
    name: str | None = None,
    progress: bool | None = None,
    figure: bool = True,
    threads: int | None = None,
) -> ProbeReport:
    """Build a contrast dataset, sweep the readers over the sites, and save the results in ``out_dir``.

    Args:
        concept: a shipped concept (``repe.datasets.list_concepts()``) or alias (``honesty``).
        data_file: a user pairs file (CSV / JSONL / JSON, see ``repe.datasets.load_pairs_file``);
            give exactly one of ``concept`` and ``data_file``.
        readers: reader names or Reader instances; the saved direction is the one of the reader with
            the best held-out AUROC (baselines such as ``random`` are never chosen unless alone).
        max_pairs: sample at most this many pairs (seeded; None keeps all).
        chat: build shipped concepts as chat conversations (True) or plain texts.
        name: the direction's file name (default: the concept's last part or the file's stem).
        figure: write ``sweep.html`` (needs the 'plots' extra; skipped with a note if missing).
        threads: cap the threads of the capture (see ``probe_dataset``; None: library defaults).

    Writes ``<name>.safetensors`` + ``<name>.json`` (the direction, every swept site, best site
    marked), ``sweep.json``, ``sweep.csv`` and ``sweep.html`` (self-contained, works offline).
    """
    t0 = time.perf_counter()
    if (concept is None) == (data_file is None):
        raise ValueError(
            f"give exactly one of concept and data_file; got concept={concept!r}, "
            f"data_file={data_file!r}"
        )
    if max_pairs is not None and (isinstance(max_pairs, bool) or max_pairs < 3):
        raise ValueError(f"max_pairs must be None or at least 3; got {max_pairs!r}")
    dataset: ContrastDataset
    if data_file is not None:
        dataset = load_pairs_file(Path(data_file))
        default_name = Path(data_file).stem
    else:
        full = resolve_concept(str(concept))
        dataset = load_concept(full, chat=chat, tokenizer=lm.tokenizer)
        default_name = full.rsplit("/", 1)[-1]
    if max_pairs is not None and len(dataset) > max_pairs:
        dataset = dataset.sample(max_pairs, seed=seed)
    result = probe_dataset(
        lm,
        dataset,
        sites,
        readers,
        positions=positions,
        train_frac=train_frac,
        seed=seed,
        batch_size=batch_size,
        n_boot=n_boot,
        progress=progress,
        threads=threads,
    )
    best = result.best()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = _slug(name or default_name)
    direction = result.to_direction(best.reader, name=stem)
    paths: dict[str, Path] = {}
    paths["direction"] = direction.save(out / stem)
    paths["direction_json"] = out / f"{stem}.json"
    paths["table_json"] = result.write_json(out / "sweep.json")
    paths["table_csv"] = result.write_csv(out / "sweep.csv")
    notes: list[str] = []
    if figure:
        try:
            from probes.plots import sweep_figure

            fig = sweep_figure(result)
            html_path = out / "sweep.html"
            with atomic_file(html_path) as tmp:
                fig.write_html(str(tmp), include_plotlyjs=True)
            paths["figure"] = html_path
        except MissingExtraError as exc:
            notes.append(f"no figure written: {exc}")
    return ProbeReport(
        result=result,
        direction=direction,
        dataset=dataset.name,
        n_pairs=len(dataset),
        seconds=time.perf_counter() - t0,
        paths=paths,
        notes=notes,
    )
