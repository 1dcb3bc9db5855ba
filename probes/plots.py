"""Plot builders for sweeps and activations. They return plotly figures; plotly is the 'plots' extra.

>>> fig = sweep_figure(result)                 # held-out AUROC by layer, one line per reader, 95% bands
>>> fig.write_html("sweep.html", include_plotlyjs=True)
"""

from __future__ import annotations

from typing import Any

import torch

from probes.sweep import SweepResult
from repe.activations import ActivationSet
from repe.errors import require

METRICS = ("auroc", "accuracy", "pair_accuracy", "cohens_d", "train_accuracy")
_CI_OF = {"auroc": "auroc_ci", "accuracy": "accuracy_ci"}
_LABEL = {
    "auroc": "held-out AUROC",
    "accuracy": "held-out accuracy",
    "pair_accuracy": "held-out pair accuracy",
    "cohens_d": "held-out Cohen's d",
    "train_accuracy": "training accuracy",
}
_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
)


def _go() -> Any:
    require("plotly", "plots")
    return require("plotly.graph_objects", "plots")


def _rgba(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def sweep_figure(
    result: SweepResult,
    metric: str = "auroc",
    readers: list[str] | None = None,
    height: int | None = None,
) -> Any:
    """Score by layer, one line per reader, with the bootstrap 95% interval as a shaded band.

    ``metric``: one of auroc, accuracy, pair_accuracy, cohens_d, train_accuracy (bands for the
    first two). When the sweep spans more than one kind of site, the x axis lists site names.
    ``readers``: only these (default: all); ``height``: in pixels (default: plotly's).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")
    for r in readers or []:
        if r not in result.readers:
            raise ValueError(f"reader {r!r} is not in this sweep; it has {result.readers}")
    go = _go()
    kinds = {s.split(".", 2)[2] for s in result.sites}
    by_layer = len(kinds) == 1
    fig = go.Figure()
    for i, reader in enumerate(result.readers):
        if readers is not None and reader not in readers:
            continue
        colour = _COLOURS[i % len(_COLOURS)]
        scores = result.reader_scores(reader)
        x = [s.layer if by_layer else s.site for s in scores]
        y = [float(getattr(s, metric)) for s in scores]
        ci_attr = _CI_OF.get(metric)
        cis = [getattr(s, ci_attr) for s in scores] if ci_attr else []
        if cis and all(c is not None for c in cis):
            lo = [c[0] for c in cis]
            hi = [c[1] for c in cis]
            fig.add_trace(
                go.Scatter(
                    x=x + x[::-1],
                    y=hi + lo[::-1],
                    fill="toself",
                    fillcolor=_rgba(colour, 0.15),
                    line={"width": 0},
                    hoverinfo="skip",
                    showlegend=False,
                    legendgroup=reader,
                    name=f"{reader} 95% CI",
                )
            )
        custom = [[s.site] for s in scores]
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="lines+markers",
                name=reader,
                legendgroup=reader,
                line={"color": colour},
                customdata=custom,
                hovertemplate=(
                    "%{customdata[0]}<br>"
                    + _LABEL[metric]
                    + " %{y:.3f}<extra>"
                    + reader
                    + "</extra>"
                ),
            )
        )
        best = result.best(reader)
        fig.add_trace(
            go.Scatter(
                x=[best.layer if by_layer else best.site],
                y=[float(getattr(best, metric))],
                mode="markers",
                marker={"symbol": "star", "size": 13, "color": colour},
                legendgroup=reader,
                showlegend=False,
                hovertemplate=f"best {reader}: {best.site}<extra></extra>",
            )
        )
    if metric in ("auroc", "accuracy", "pair_accuracy", "train_accuracy"):
        fig.add_hline(y=0.5, line_dash="dot", line_color="grey", annotation_text="chance")
    name = result.params.get("dataset", "")
    fig.update_layout(
        title=f"{_LABEL[metric]} by {'layer' if by_layer else 'site'}"
        + (f" ({name})" if name else ""),
        xaxis_title="layer" if by_layer else "site",
        yaxis_title=_LABEL[metric],
        template="plotly_white",
        hovermode="closest",
        legend_title="reader",
    )
    if height is not None:
        fig.update_layout(height=height, margin={"l": 40, "r": 10, "t": 40, "b": 30})
    return fig


def _site_matrix(acts: ActivationSet | torch.Tensor, site: str, name: str) -> torch.Tensor:
    if isinstance(acts, ActivationSet):
        t = acts[site]
    elif isinstance(acts, torch.Tensor):
        t = acts
    else:
        raise TypeError(f"{name} must be an ActivationSet or a tensor; got {type(acts).__name__}")
    if t.dim() < 2:
        raise ValueError(f"{name} must hold one row per example; got shape {tuple(t.shape)}")
    return t.detach().to("cpu", torch.float64).flatten(1)


def pca_scatter(
    acts_pos: ActivationSet | torch.Tensor,
    acts_neg: ActivationSet | torch.Tensor,
    site: str,
    *,
    title: str | None = None,
) -> Any:
    """The two sides' activations at ``site`` on their first two principal components (fitted on
    both sides together), coloured by label."""
    go = _go()
    P = _site_matrix(acts_pos, site, "acts_pos")
    N = _site_matrix(acts_neg, site, "acts_neg")
    if P.shape[1] != N.shape[1]:
        raise ValueError(
            f"acts_pos and acts_neg have different widths at {site}: {P.shape[1]} and {N.shape[1]}"
        )
    X = torch.cat([P, N])
    if X.shape[0] < 2:
        raise ValueError("pca_scatter needs at least two examples")
    Xc = X - X.mean(0, keepdim=True)
    _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
    k = min(2, Vh.shape[0])
    Z = Xc @ Vh[:k].T
    if k == 1:
        Z = torch.cat([Z, torch.zeros_like(Z)], dim=1)
    var = (S**2) / (S**2).sum().clamp(min=1e-300)
    fig = go.Figure()
    for label, rows, colour in (
        ("positive", Z[: len(P)], "#1a9641"),
        ("negative", Z[len(P) :], "#d7191c"),
    ):
        fig.add_trace(
            go.Scatter(
                x=rows[:, 0].tolist(),
                y=rows[:, 1].tolist(),
                mode="markers",
                name=label,
                marker={"color": colour, "size": 7, "opacity": 0.75},
                customdata=list(range(len(rows))),
                hovertemplate=label + " #%{customdata}<extra></extra>",
            )
        )
    pc = [
        f"PC{i + 1} ({100 * float(var[i]):.1f}%)" if i < len(var) else f"PC{i + 1}" for i in (0, 1)
    ]
    fig.update_layout(
        title=title or f"PCA of activations at {site}",
        xaxis_title=pc[0],
        yaxis_title=pc[1],
        template="plotly_white",
        legend_title="label",
    )
    return fig
