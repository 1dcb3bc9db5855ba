"""The kinds of step a study can run. Each is a thin shell over the library: it reads its settings,
calls ``repe`` / ``probes`` / ``steering``, and returns metrics, per-sample rows, figures and tables.

A kind declares its keys (:class:`studies.spec.Param`), whether it uses the model, the fingerprints of
the data it reads (part of its cache key) and a version (raise it when its results would change).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from studies.runner import StepContext, StepOutput
from studies.spec import Param


@dataclass(frozen=True)
class StepKind:
    name: str
    params: dict[str, Param]
    run: Callable[[StepContext], StepOutput]
    doc: str = ""
    version: int = 1
    uses_model: bool = True
    data: Callable[[dict[str, Any]], dict[str, str]] | None = None
    validate: Callable[[dict[str, Any]], tuple[str, str] | None] | None = None


KINDS: dict[str, StepKind] = {}


def kind(
    name: str,
    params: dict[str, Param],
    *,
    doc: str,
    version: int = 1,
    uses_model: bool = True,
    data: Callable[[dict[str, Any]], dict[str, str]] | None = None,
    validate: Callable[[dict[str, Any]], tuple[str, str] | None] | None = None,
) -> Callable[[Callable[[StepContext], StepOutput]], Callable[[StepContext], StepOutput]]:
    def register(fn: Callable[[StepContext], StepOutput]) -> Callable[[StepContext], StepOutput]:
        KINDS[name] = StepKind(name, params, fn, doc, version, uses_model, data, validate)
        return fn

    return register


# ---- helpers ----------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


_FAMILY_FOLDER = {
    "facts": "repe_emotions_facts",
    "emotions": "repe_emotions_facts",
    "caa": "caa",
    "persona": "anthropic_persona",
    "ethics": "ethics",
    "moralchoice": "moralchoice",
}


def _concept_data(params: dict[str, Any]) -> dict[str, str]:
    from repe.datasets._paths import data_path

    if params.get("data"):
        p = Path(params["data"])
        return {params["data"]: _file_digest(str(p.resolve())) if p.exists() else "missing"}
    concept = params["concept"]
    folder = _FAMILY_FOLDER.get(concept.split("/")[0], concept.split("/")[0])
    return {concept: _file_digest(str(data_path(folder)))}


def _shipped(*folders: str) -> Callable[[dict[str, Any]], dict[str, str]]:
    def data(params: dict[str, Any]) -> dict[str, str]:
        from repe.datasets._paths import data_path

        return {f: _file_digest(str(data_path(f))) for f in folders}

    return data


def _concept_check(params: dict[str, Any]) -> tuple[str, str] | None:
    if bool(params["concept"]) == bool(params["data"]):
        return (
            "concept",
            "give exactly one of 'concept' (a shipped concept) and 'data' (a pairs file)",
        )
    if params["concept"]:
        from repe.datasets import list_concepts

        if params["concept"] not in list_concepts():
            return (
                "concept",
                f"unknown concept {params['concept']!r}; `repe probe --list` names them",
            )
    return None


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _fraction(v: float) -> str | None:
    return None if 0.0 < v < 1.0 else "must be strictly between 0 and 1"


def _ci(x: Any) -> str:
    return f"[{x[0]:.3f}, {x[1]:.3f}]" if x else ""


def _md(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.3f}"
        return "" if v is None else str(v)

    out = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    out += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def _load_dataset(ctx: StepContext) -> Any:
    from repe.datasets import load_concept, load_pairs_file

    p = ctx.params
    if p["data"]:
        ds = load_pairs_file(p["data"])
    else:
        ds = load_concept(p["concept"], chat=p["chat"], tokenizer=ctx.lm.tokenizer)
    if p["n_pairs"] and p["n_pairs"] < len(ds):
        ds = ds.sample(p["n_pairs"], seed=ctx.seed)
    return ds


# ---- probe: a layer sweep of readers, held out ------------------------------------------------------
PROBE_PARAMS = {
    "concept": Param("str", "", doc="a shipped concept (repe.datasets.list_concepts())"),
    "data": Param("str", "", doc="or a contrast-pairs file (JSONL/CSV)"),
    "chat": Param("bool", True),
    "n_pairs": Param("int", 0, doc="sample this many pairs (0: all)"),
    "sites": Param("str|list[str]", "blocks.*.hook_resid_post"),
    "readers": Param(
        "list[str]",
        ["mean_diff", "pca_diff", "lat", "logistic", "random"],
        choices=("mean_diff", "pca_diff", "pca", "lat", "logistic", "random"),
    ),
    "positions": Param("str", "last"),
    "train_frac": Param("float", 0.7, check=_fraction),
    "batch_size": Param("int", 16, check=_positive),
    "n_boot": Param("int", 1000),
}


@kind(
    "probe",
    PROBE_PARAMS,
    doc="layer sweep of readers on contrast pairs, scored on held-out pairs with bootstrap CIs; "
    "saves the best reader's direction and each held-out pair's projection",
    data=_concept_data,
    validate=_concept_check,
)
def probe_step(ctx: StepContext) -> StepOutput:
    from probes.sweep import probe_dataset
    from repe.capture import capture

    p = ctx.params
    lm = ctx.lm
    ds = _load_dataset(ctx)
    res = probe_dataset(
        lm,
        ds,
        p["sites"],
        p["readers"],
        positions=p["positions"],
        train_frac=p["train_frac"],
        seed=ctx.seed,
        batch_size=p["batch_size"],
        n_boot=p["n_boot"],
        progress=ctx.progress,
    )
    best = res.best()
    reader_best = {r: res.best(r) for r in res.readers if r != "random"}
    direction = res.to_direction(best.reader, best.site, name=ds.name)
    direction.save(ctx.artifacts / "direction")
    # per held-out pair: its projections at the best site
    test = [ds.pairs[i] for i in res.test_idx]
    kw = {"positions": p["positions"], "batch_size": p["batch_size"], "progress": False}
    pos = capture(lm, [q.positive for q in test], [best.site], **kw)
    neg = capture(lm, [q.negative for q in test], [best.site], **kw)
    vec = direction[best.site].detach().double().reshape(-1)
    sp = (pos.rows(best.site)[0].double().reshape(len(test), -1) @ vec).tolist()
    sn = (neg.rows(best.site)[0].double().reshape(len(test), -1) @ vec).tolist()
    samples = [
        {
            "pair": int(i),
            "positive": _text(q.positive),
            "negative": _text(q.negative),
            "score_positive": a,
            "score_negative": b,
            "correct": a > b,
        }
        for i, q, a, b in zip(res.test_idx, test, sp, sn, strict=True)
    ]
    rows = res.rows()
    metrics = {
        "dataset": ds.name,
        "dataset_fingerprint": ds.fingerprint(),
        "n_pairs": len(ds),
        "n_train": len(res.train_idx),
        "n_test": len(res.test_idx),
        "best": {"reader": best.reader, "site": best.site, "layer": best.layer, **best.metrics()},
        "by_reader": {
            r: {"site": s.site, "layer": s.layer, **s.metrics()} for r, s in reader_best.items()
        },
        "held_out_pair_accuracy_at_best": sum(s["correct"] for s in samples) / max(1, len(samples)),
        "table": rows,
    }
    summary = (
        f"{ds.name}: {len(ds)} pairs ({len(res.train_idx)} train, {len(res.test_idx)} held out). "
        f"Best: {best.reader} at {best.site}, held-out accuracy {best.accuracy:.3f} "
        f"{_ci(best.accuracy_ci)}, AUROC {best.auroc:.3f} {_ci(best.auroc_ci)}."
    )
    warn = []
    if len(res.test_idx) < 10:
        warn.append(f"{ds.name}: only {len(res.test_idx)} held-out pairs; the intervals are wide")
    table = _md(
        [
            {
                "reader": r,
                "best layer": s.layer,
                "accuracy": s.accuracy,
                "95% CI": _ci(s.accuracy_ci),
                "AUROC": s.auroc,
                "AUROC CI": _ci(s.auroc_ci),
                "Cohen's d": s.cohens_d,
            }
            for r, s in [
                *reader_best.items(),
                *([("random", res.best("random"))] if "random" in res.readers else []),
            ]
        ],
        ["reader", "best layer", "accuracy", "95% CI", "AUROC", "AUROC CI", "Cohen's d"],
    )
    return StepOutput(
        metrics=metrics,
        samples=samples,
        figures={"layers": _layer_figure(rows, ds.name)},
        tables=[(f"Held-out scores by reader ({ds.name})", table)],
        summary=summary,
        warnings=warn,
        data={ds.name: ds.fingerprint()},
    )


def _text(side: Any) -> str:
    if isinstance(side, str):
        return side[:300]
    return " | ".join(f"{m['role']}: {m['content']}" for m in side)[:300]


def _layer_figure(rows: list[dict[str, Any]], title: str) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for reader in dict.fromkeys(r["reader"] for r in rows):
        rr = sorted((r for r in rows if r["reader"] == reader), key=lambda r: r["layer"])
        x = [r["layer"] for r in rr]
        fig.add_scatter(x=x, y=[r["accuracy"] for r in rr], mode="lines+markers", name=reader)
        if all(r["accuracy_lo"] is not None for r in rr):
            fig.add_scatter(
                x=x + x[::-1],
                y=[r["accuracy_hi"] for r in rr] + [r["accuracy_lo"] for r in rr][::-1],
                fill="toself",
                opacity=0.15,
                line={"width": 0},
                showlegend=False,
                hoverinfo="skip",
                name=f"{reader} 95% CI",
            )
    fig.update_layout(
        title=f"Held-out accuracy by layer: {title}",
        xaxis_title="block",
        yaxis_title="held-out accuracy",
        yaxis_range=[0, 1.02],
        height=420,
    )
    return fig


# ---- scan: token-level projections onto a direction --------------------------------------------------
@kind(
    "scan",
    {
        "direction": Param("str", ref=True, doc="the probe step whose direction to scan with"),
        "texts": Param(
            "list[str]", [], doc="texts to scan (default: shipped true and false facts)"
        ),
        "n_facts": Param("int", 4, doc="with no texts: this many true and this many false facts"),
        "site": Param("str", "", doc="default: the direction's best site"),
    },
    doc="per-token projections of texts onto a probe's direction (RepE token scan)",
    data=_shipped("repe_emotions_facts"),
)
def scan_step(ctx: StepContext) -> StepOutput:
    import statistics

    from probes.scan import colour_scale, scan, scan_html
    from repe.datasets import load_facts
    from repe.directions import Direction

    p = ctx.params
    lm = ctx.lm
    d = Direction.load(ctx.input(p["direction"]).artifact("direction.json"), model=lm)
    if p["texts"]:
        texts = [(t, None) for t in p["texts"]]
    else:
        facts = load_facts()
        true = [f.text for f in facts if f.label][: p["n_facts"]]
        false = [f.text for f in facts if not f.label][: p["n_facts"]]
        texts = [(t, True) for t in true] + [(t, False) for t in false]
    results = [scan(lm, t, d, p["site"] or None) for t, _ in texts]
    vmax = colour_scale([v for r in results for v in r.values[1:]])
    samples = []
    html = []
    for k, ((_, label), r) in enumerate(zip(texts, results, strict=True)):
        for i, (tok, v) in enumerate(r):
            samples.append({"text": k, "label": label, "token_index": i, "token": tok, "score": v})
        html.append(
            (
                f"text {k + 1}" + ("" if label is None else f" ({'true' if label else 'false'})"),
                scan_html(r, vmax=vmax),
            )
        )
    means = {k: statistics.fmean(r.values[1:] or r.values) for k, r in enumerate(results)}
    metrics: dict[str, Any] = {"site": results[0].site, "n_texts": len(texts), "mean_score": means}
    if any(lab is not None for _, lab in texts):
        t_mean = [means[k] for k, (_, lab) in enumerate(texts) if lab]
        f_mean = [means[k] for k, (_, lab) in enumerate(texts) if lab is False]
        metrics["true_mean"] = statistics.fmean(t_mean)
        metrics["false_mean"] = statistics.fmean(f_mean)
    return StepOutput(
        metrics=metrics,
        samples=samples,
        html=html,
        summary=f"token scan of {len(texts)} texts at {results[0].site} (first token left out of the colour scale)",
    )
