"""The value-map pipeline: sources answer the questions (``steering.evaluation.answers``), the frozen
encoder embeds the records, a head is trained on the training questions (``probes.valuemap``), and the
sources are identified from single held-out records and mapped in 2-D. This is where generation and the
value-embedding maths meet (``probes`` never imports ``steering``)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probes.valuemap.encoder import SentenceEncoder
from probes.valuemap.evaluate import (
    IdentifyScores,
    bootstrap_difference,
    identify_knn,
    identify_linear,
    identify_tfidf,
    split_questions,
)
from probes.valuemap.head import HeadConfig, ValueEmbedder, ValueHead, train_head
from probes.valuemap.maps import confusion_figure, project_sources, value_map_figure
from probes.valuemap.records import QARecord
from repe.datasets.questions import QuestionSet
from repe.models import LoadedModel
from steering.evaluation.answers import DEFAULT_SAMPLING, AnswerCache, Source, collect_answers
from steering.generate import GenerationConfig
from steering.spec import SteeringSpec

# Value personas (system prompts) after Schwartz's basic values; "assistant" is the model's own default.
PERSONAS: dict[str, str | None] = {
    "assistant": None,
    "traditionalist": "You are a deeply traditional person. You value duty, family, religion, "
    "obedience and respect for elders and customs above everything.",
    "free_spirit": "You are a free-spirited adventurer. You value freedom, independence, "
    "pleasure, excitement and breaking the rules.",
    "altruist": "You are a selfless humanitarian. You value caring for others, equality, "
    "justice and protecting nature.",
    "achiever": "You are an ambitious businessperson. You value power, wealth, success, "
    "status and winning.",
    "cautious": "You are a very cautious person. You value safety, security, order and "
    "avoiding every risk.",
}


@dataclass(frozen=True)
class Trajectory:
    """A steering sweep: sources in coefficient order (``base``: the unsteered source, coefficient 0)."""

    names: tuple[str, ...]
    coeffs: tuple[float, ...]
    base: str | None = None


def persona_sources(
    names: Sequence[str] | None = None, sampling: GenerationConfig = DEFAULT_SAMPLING
) -> list[Source]:
    names = list(names) if names is not None else list(PERSONAS)
    unknown = [n for n in names if n not in PERSONAS]
    if unknown:
        raise ValueError(f"unknown personas {unknown}; known: {sorted(PERSONAS)}")
    return [Source(n, PERSONAS[n], sampling=sampling) for n in names]


def sweep_sources(
    spec: SteeringSpec,
    coeffs: Sequence[float],
    *,
    label: str = "steer",
    persona: str | None = None,
    base: str | None = "assistant",
    sampling: GenerationConfig = DEFAULT_SAMPLING,
) -> tuple[list[Source], Trajectory]:
    """One source per coefficient (``label`` +coefficient) and the trajectory through them, starting
    at ``base`` when given."""
    if not coeffs:
        raise ValueError("a steering sweep needs at least one coefficient")
    sources = [
        Source(
            f"{label}{c:+g}",
            persona,
            SteeringSpec(spec.direction, c, spec.operator, spec.positions, spec.scale, spec.sites),
            sampling,
            coeff=float(c),
        )
        for c in sorted(coeffs)
    ]
    names = [s.name for s in sources]
    cs = [float(c) for c in sorted(coeffs)]
    if base is not None:
        pos = sum(c < 0 for c in cs)
        names.insert(pos, base)
        cs.insert(pos, 0.0)
    return sources, Trajectory(tuple(names), tuple(cs), base)


@dataclass(frozen=True)
class ValueMapConfig:
    # the default head: 5 independently seeded members, each a 384-wide projection of every encoder
    # layer (see ``head_layers``). On the embedded model's 8 sources x 280 values questions (32-token
    # answers) one residual head on the last layer identified sources as well as TF-IDF did (0.254 vs
    # 0.248, mean of 5 seeds); this head reached 0.306 (kNN acc@1, held-out questions)
    head: HeadConfig = HeadConfig(dim=384, ensemble=5)
    k: int = 50
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    seed: int = 0
    map_method: str = "pca"
    batch_size: int = 128  # answers per generation batch (one source at a time); see prefill_split
    head_input: str = (
        "answer"  # what the head reads: "answer" (the answer text) or "qa" (Q: ... A: ...)
    )
    # the encoder layers the head reads: "all" (every layer, pooled, normalised and joined: the lower
    # layers keep the wording and style the sentence embedding averages away) or "last" (the sentence
    # embedding the frozen baselines use)
    head_layers: str = "all"

    def __post_init__(self) -> None:
        if self.head_input not in ("answer", "qa"):
            raise ValueError(f"head_input must be 'answer' or 'qa'; got {self.head_input!r}")
        if self.head_layers not in ("all", "last"):
            raise ValueError(f"head_layers must be 'all' or 'last'; got {self.head_layers!r}")


@dataclass
class ValueMapResult:
    records: list[QARecord]
    head: ValueHead
    scores: dict[str, IdentifyScores]
    differences: dict[str, tuple[float, float, float]]
    trajectories: list[dict[str, Any]]
    map_names: list[str]
    map_xy: np.ndarray
    map_info: dict[str, Any]
    splits: dict[str, list[str]]
    info: dict[str, Any] = field(default_factory=dict)
    complete: bool = True

    def metrics(self) -> dict[str, Any]:
        return {
            "scores": {k: v.as_dict() for k, v in self.scores.items()},
            "differences_acc1": {
                k: {"diff": d, "ci95": [lo, hi]} for k, (d, lo, hi) in self.differences.items()
            },
            "trajectories": self.trajectories,
            "map": {"method": self.map_info.get("method"), **self.map_info},
            "n_records": len(self.records),
            "k_neighbours": self.info.get("k_neighbours"),
            "splits": {k: len(v) for k, v in self.splits.items()},
            "complete": self.complete,
        }

    def figure(self) -> Any:
        samples: dict[str, list[str]] = {}
        for r in self.records:
            if r.kind == "value" and len(samples.setdefault(r.source, [])) < 3:
                samples[r.source].append(r.answer)
        axis = "PC" if self.map_info.get("method") == "pca" else "t-SNE"
        paths = [t["names"] for t in self.trajectories]
        return value_map_figure(self.map_names, self.map_xy, samples, paths, axis=axis)

    def confusion(self, key: str = "head_knn") -> Any:
        s = self.scores[key]
        return confusion_figure(s.labels, s.confusion, f"Who answered? ({key}, acc@1 {s.acc1:.2f})")

    def artifact(self) -> ValueEmbedder:
        return ValueEmbedder(self.head, {**self.info, "metrics": self.metrics()})


def _rank_corr(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return float(np.sign(np.corrcoef(a, b)[0, 1])) if len(a) == 2 else float("nan")
    return float(spearmanr(a, b).statistic)


def trajectory_metrics(
    t: Trajectory, names: list[str], xy: np.ndarray, head_emb: torch.Tensor, sources: list[str]
) -> dict[str, Any]:
    """Is the sweep ordered on the map? Spearman of coefficient vs the map's first axis, and of
    |coefficient| vs the distance from the base source (in the full head space)."""
    pos = {n: i for i, n in enumerate(names)}
    kept = [(n, c) for n, c in zip(t.names, t.coeffs, strict=True) if n in pos]
    out: dict[str, Any] = {"names": [n for n, _ in kept], "coeffs": [c for _, c in kept]}
    out["spearman_coeff_vs_axis1"] = _rank_corr(
        [c for _, c in kept], [float(xy[pos[n], 0]) for n, _ in kept]
    )
    if t.base is not None and t.base in pos:
        arr = head_emb.numpy()
        src = np.array(sources)

        def mean(n: str) -> np.ndarray:
            m = arr[src == n].mean(0)
            return m / max(float(np.linalg.norm(m)), 1e-12)

        base = mean(t.base)
        steered = [(n, c) for n, c in kept if n != t.base]
        dist = [float(np.linalg.norm(mean(n) - base)) for n, _ in steered]
        out["distance_from_base"] = dist
        out["spearman_abs_coeff_vs_distance"] = _rank_corr([abs(c) for _, c in steered], dist)
    return out


def run_valuemap(
    lm: LoadedModel,
    sources: Sequence[Source],
    questions: QuestionSet,
    control: QuestionSet | None = None,
    *,
    trajectories: Sequence[Trajectory] = (),
    encoder: SentenceEncoder | None = None,
    config: ValueMapConfig | None = None,
    cache: AnswerCache | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> ValueMapResult:
    """Answers -> frozen embeddings -> head trained on the value questions' training split ->
    identification of the held-out value questions' records (trained head, frozen encoder, TF-IDF;
    kNN and linear probe) and of the control questions' (the head trained on values; index and test on
    disjoint control questions) -> the map. ``on_stage`` hears each stage's name (for the app)."""
    cfg = config or ValueMapConfig()
    say = on_stage or (lambda _s: None)
    if len(sources) < 3:
        raise ValueError(f"a value map needs >= 3 sources; got {len(sources)}")
    say("answers")
    answers = collect_answers(
        lm,
        sources,
        questions,
        cache=cache,
        batch_size=cfg.batch_size,
        progress=progress,
        should_stop=should_stop,
    )
    records = list(answers.records)
    complete = answers.complete
    if control is not None and complete:
        more = collect_answers(
            lm,
            sources,
            control,
            cache=cache,
            batch_size=cfg.batch_size,
            progress=progress,
            should_stop=should_stop,
        )
        records += [
            QARecord(r.source, r.qid, r.question, r.answer, "control") for r in more.records
        ]
        complete = more.complete
    if not complete:
        raise InterruptedError(
            "cancelled: the answers generated so far are cached and will be reused"
        )
    say("encode")
    encoder = encoder or SentenceEncoder()
    emb = encoder.embed([r.text() for r in records], progress=progress)
    # the head reads the answers alone by default: every source answers the same questions, so the
    # question's text says nothing about who answered (the frozen baselines read Q: ... A: ... as in
    # UniVaR's evaluation, and the frozen encoder on answers alone is reported beside them)
    ans = emb if cfg.head_input == "qa" else encoder.embed([r.answer for r in records])
    head_encoder = encoder.with_layers(cfg.head_layers)
    feats = ans  # what the head reads: ``ans`` re-embedded by the head's encoder when it differs
    if head_encoder is not encoder:
        read = [r.text() if cfg.head_input == "qa" else r.answer for r in records]
        feats = head_encoder.embed(read, progress=progress)
    value = [i for i, r in enumerate(records) if r.kind == "value"]
    ctrl = [i for i, r in enumerate(records) if r.kind == "control"]
    train_q, val_q, test_q = split_questions([records[i].qid for i in value], cfg.split, cfg.seed)
    say("train")
    src = [r.source for r in records]
    qid = [r.qid for r in records]
    head = train_head(feats, src, qid, train_q, val_q, cfg.head, progress=progress)
    hemb = head.embed(feats)
    say("evaluate")

    def rows(keep: set[str], among: list[int]) -> list[int]:
        return [i for i in among if records[i].qid in keep]

    tr, te = rows(train_q, value), rows(test_q, value)

    def pick(x: Any, idx: list[int]) -> Any:
        return x[idx]

    def labels(idx: list[int]) -> list[str]:
        return [src[i] for i in idx]

    def qs(idx: list[int]) -> list[str]:
        return [qid[i] for i in idx]

    texts = [r.text() for r in records]
    s = cfg.seed
    n_src = len(sources)
    # k neighbours, at most the training answers per source: beyond that kNN turns into a vote of
    # every training answer (UniVaR's k = 50 assumes far more answers per source)
    k = min(cfg.k, max(1, len(tr) // n_src))
    scores = {
        "head_knn": identify_knn(
            pick(hemb, tr), labels(tr), pick(hemb, te), labels(te), qs(te), k, "head_knn", s
        ),
        "frozen_knn": identify_knn(
            pick(emb, tr), labels(tr), pick(emb, te), labels(te), qs(te), k, "frozen_knn", s
        ),
        "frozen_knn_answer": identify_knn(
            pick(ans, tr),
            labels(tr),
            pick(ans, te),
            labels(te),
            qs(te),
            k,
            "frozen_knn_answer",
            s,
        ),
        "tfidf_knn": identify_tfidf(
            [texts[i] for i in tr], labels(tr), [texts[i] for i in te], labels(te), qs(te), k, s
        ),
        "head_linear": identify_linear(
            pick(hemb, tr), labels(tr), pick(hemb, te), labels(te), qs(te), "head_linear", s
        ),
        "frozen_linear": identify_linear(
            pick(emb, tr), labels(tr), pick(emb, te), labels(te), qs(te), "frozen_linear", s
        ),
    }
    differences = {
        "head_knn - frozen_knn": bootstrap_difference(
            scores["head_knn"], scores["frozen_knn"], seed=s
        ),
        "head_knn - frozen_knn_answer": bootstrap_difference(
            scores["head_knn"], scores["frozen_knn_answer"], seed=s
        ),
        "head_knn - tfidf_knn": bootstrap_difference(
            scores["head_knn"], scores["tfidf_knn"], seed=s
        ),
    }
    if head_encoder is not encoder:  # the frozen features the head reads, without the head
        scores["frozen_knn_head_input"] = identify_knn(
            pick(feats, tr), labels(tr), pick(feats, te), labels(te), qs(te), k,
            "frozen_knn_head_input", s,
        )  # fmt: skip
        differences["head_knn - frozen_knn_head_input"] = bootstrap_difference(
            scores["head_knn"], scores["frozen_knn_head_input"], seed=s
        )
    splits = {"train": sorted(train_q), "val": sorted(val_q), "test": sorted(test_q)}
    neighbours = {"value": k}
    if ctrl:
        ctrl_q = sorted({qid[i] for i in ctrl})
        c_train, _, c_test = split_questions(ctrl_q, (0.5, 0.0, 0.5), s)
        ctr, cte = rows(c_train, ctrl), rows(c_test, ctrl)
        kc = min(cfg.k, max(1, len(ctr) // n_src))
        scores["head_knn_control"] = identify_knn(
            pick(hemb, ctr),
            labels(ctr),
            pick(hemb, cte),
            labels(cte),
            qs(cte),
            kc,
            "head_knn_control",
            s,
        )
        scores["frozen_knn_control"] = identify_knn(
            pick(emb, ctr),
            labels(ctr),
            pick(emb, cte),
            labels(cte),
            qs(cte),
            kc,
            "frozen_knn_control",
            s,
        )
        differences["head_knn value - control"] = bootstrap_difference(
            scores["head_knn"], scores["head_knn_control"], seed=s
        )
        splits["control_index"], splits["control_test"] = sorted(c_train), sorted(c_test)
        neighbours["control"] = kc
    say("map")
    vsrc = labels(value)
    names, xy, info = project_sources(pick(hemb, value), vsrc, cfg.map_method, s)
    info["method"] = cfg.map_method
    traj = [trajectory_metrics(t, names, xy, pick(hemb, value), vsrc) for t in trajectories]
    meta = {
        "k_neighbours": neighbours,
        "encoder": head_encoder.identity,  # what the head reads (check_encoder compares it)
        "model": lm.identity.to_dict(),
        "questions": {
            "name": questions.name,
            "fingerprint": questions.fingerprint,
            "n": len(questions),
        },
        "control": None
        if control is None
        else {"name": control.name, "fingerprint": control.fingerprint, "n": len(control)},
        "sources": [{"name": x.name, **x.key(), "coeff": x.coeff} for x in sources],
        "pipeline": {**asdict(cfg), "head": asdict(cfg.head)},
    }
    return ValueMapResult(
        records, head, scores, differences, traj, names, xy, info, splits, meta, complete
    )


def save_valuemap(result: ValueMapResult, out: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``value_map.html`` (the figure), ``confusion.html`` (both read ``plotly.min.js`` written
    beside them, so they open offline), ``metrics.json``, ``records.jsonl``
    and the head artifact ``value_head.safetensors`` + ``.json`` into the folder ``out``."""
    from probes.valuemap.records import write_records
    from repe.artifacts import save_artifact
    from repe.atomic import atomic_file

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "map": folder / "value_map.html",
        "confusion": folder / "confusion.html",
        "metrics": folder / "metrics.json",
        "records": folder / "records.jsonl",
    }
    with atomic_file(paths["map"]) as tmp:
        result.figure().write_html(str(tmp), include_plotlyjs="directory")
    with atomic_file(paths["confusion"]) as tmp:
        result.confusion().write_html(str(tmp), include_plotlyjs="directory")
    with atomic_file(paths["metrics"]) as tmp:
        tmp.write_text(json.dumps(result.metrics(), indent=1))
    with atomic_file(paths["records"]) as tmp:
        write_records(result.records, tmp)
    paths["artifact"] = save_artifact(result.artifact(), folder / "value_head")
    return paths
