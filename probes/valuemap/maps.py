"""The value map: each source's mean embedding projected to 2-D (PCA, or t-SNE), drawn as a plotly
scatter; a steering sweep (one direction at several coefficients) is drawn as a trajectory, and
hovering a point shows sample answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

METHODS = ("pca", "tsne")


def source_means(emb: Tensor, sources: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Sources (first-seen order) and their mean embeddings, re-normalised to unit length."""
    names = list(dict.fromkeys(sources))
    arr = emb.detach().float().cpu().numpy() if isinstance(emb, Tensor) else np.asarray(emb)
    idx = np.array([names.index(s) for s in sources])
    means = np.stack([arr[idx == i].mean(0) for i in range(len(names))])
    means /= np.linalg.norm(means, axis=1, keepdims=True).clip(1e-12)
    return names, means


def project_sources(
    emb: Tensor, sources: Sequence[str], method: str = "pca", seed: int = 0
) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """Names, ``[S, 2]`` map coordinates and what the projection kept (PCA's explained variance)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    names, means = source_means(emb, sources)
    if len(names) < 3:
        raise ValueError(f"a value map needs >= 3 sources; got {len(names)}")
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed)
        xy = pca.fit_transform(means)
        return names, xy, {"explained_variance_ratio": pca.explained_variance_ratio_.tolist()}
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(1, (len(names) - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca")
    return names, tsne.fit_transform(means), {"perplexity": perplexity}


def _wrap(text: str, width: int = 70, limit: int = 300) -> str:
    text = text[:limit] + ("…" if len(text) > limit else "")
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    return "<br>".join(lines)


def value_map_figure(
    names: Sequence[str],
    xy: np.ndarray,
    samples: dict[str, list[str]] | None = None,
    trajectories: Sequence[Sequence[str]] = (),
    title: str = "Value map",
    axis: str = "PC",
) -> Any:
    """The plotly figure: one labelled point per source, hover = up to three sample answers; each
    trajectory (source names in coefficient order) is a line with arrows through its points."""
    import plotly.graph_objects as go

    pos = {n: xy[i] for i, n in enumerate(names)}
    fig = go.Figure()
    for t, path in enumerate(trajectories):
        pts = np.array([pos[n] for n in path if n in pos])
        if len(pts) < 2:
            continue
        fig.add_trace(
            go.Scatter(
                x=pts[:, 0],
                y=pts[:, 1],
                mode="lines+markers",
                marker={"symbol": "arrow", "angleref": "previous", "size": 14},
                line={"dash": "dot", "width": 2},
                name=f"steering sweep {t + 1}" if len(trajectories) > 1 else "steering sweep",
                hoverinfo="skip",
            )
        )
    hover = [
        f"<b>{n}</b><br>" + "<br>—<br>".join(_wrap(s) for s in (samples or {}).get(n, [])[:3])
        for n in names
    ]
    fig.add_trace(
        go.Scatter(
            x=xy[:, 0],
            y=xy[:, 1],
            mode="markers+text",
            text=list(names),
            textposition="top center",
            hovertext=hover,
            hoverinfo="text",
            marker={"size": 12},
            name="sources",
        )
    )
    fig.update_layout(
        title=title,
        xaxis_title=f"{axis} 1",
        yaxis_title=f"{axis} 2",
        height=520,
        margin={"l": 40, "r": 20, "t": 50, "b": 40},
        showlegend=bool(trajectories),
    )
    return fig


def confusion_figure(labels: Sequence[str], confusion: Sequence[Sequence[int]], title: str) -> Any:
    """Rows: the true source; columns: the identified one (counts)."""
    import plotly.graph_objects as go

    fig = go.Figure(
        go.Heatmap(
            z=[list(row) for row in confusion],
            x=list(labels),
            y=list(labels),
            colorscale="Blues",
            text=confusion,
            texttemplate="%{text}",
        )
    )
    fig.update_layout(
        title=title,
        xaxis_title="identified source",
        yaxis_title="true source",
        yaxis_autorange="reversed",
        height=480,
    )
    return fig
