"""Comparisons on the Steer page: how alike the session's directions are (cosine similarity at one
layer, as a heatmap), and one prompt answered at two coefficients side by side."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import streamlit as st
import torch

from app.errors import shown_errors
from app.state import AppState, SteerSettings
from repe.directions import Direction
from repe.models import LoadedModel


def cosine_matrix(library: dict[str, Direction], site: str) -> tuple[list[str], torch.Tensor]:
    """Names of the directions that have ``site`` and their pairwise cosine similarities there."""
    names = [n for n, d in library.items() if site in d.sites]
    if not names:
        return [], torch.zeros((0, 0), dtype=torch.float64)
    m = torch.stack([library[n][site].double().flatten() for n in names])
    m = m / m.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return names, m @ m.T


def heatmap(names: list[str], sims: torch.Tensor, site: str) -> Any:
    from repe.errors import require

    go = require("plotly.graph_objects", "plots")
    fig = go.Figure(
        go.Heatmap(
            z=sims.tolist(),
            x=names,
            y=names,
            zmin=-1,
            zmax=1,
            colorscale="RdBu",
            text=[[f"{v:.2f}" for v in row] for row in sims.tolist()],
            texttemplate="%{text}",
            colorbar={"title": "cosine"},
        )
    )
    fig.update_layout(
        title=f"Cosine similarity of the directions at {site}",
        height=160 + 40 * len(names),
        template="plotly_white",
    )
    return fig


def similarity_ui(library: dict[str, Direction], layer: int) -> None:
    with st.expander("Compare directions (cosine similarity)"):
        site = f"blocks.{layer}.hook_resid_post"
        names, sims = cosine_matrix(library, site)
        if len(names) < 2:
            st.info(
                f"Fewer than two directions have {site}: run another sweep or upload another "
                "direction to compare."
            )
            return
        st.plotly_chart(heatmap(names, sims, site), key="cosine_heatmap")
        st.caption(
            "1: the same direction; 0: unrelated (orthogonal); -1: opposite. Directions read by "
            "different readers from the same data usually agree closely."
        )


def two_coefficients_ui(
    lm: LoadedModel, state: AppState, library: dict[str, Direction], settings: SteerSettings
) -> None:
    """The current setting at two coefficients, on one prompt, side by side."""
    from app.views.steer import build_spec, display, stream_into

    with st.expander("Two coefficients side by side"):
        c1, c2 = st.columns(2)
        a = c1.number_input("Coefficient A", value=-abs(settings.coeff), step=0.05, key="cmp_a")
        b = c2.number_input("Coefficient B", value=abs(settings.coeff), step=0.05, key="cmp_b")
        if st.button("Compare", key="cmp_go", help="Generate the prompt at both coefficients."):
            with shown_errors("The comparison"):
                out = []
                for coeff, col in ((float(a), c1), (float(b), c2)):
                    spec = build_spec(state, library, replace(settings, coeff=coeff))
                    col.markdown(f"**coefficient {coeff:g}**")
                    box = col.empty()
                    out.append(stream_into(box, lm, settings.prompt, spec, settings.max_new_tokens))
                state.compared = (float(a), float(b), out[0], out[1])
        elif state.compared is not None:
            ca, cb, ta, tb = state.compared
            c1.markdown(f"**coefficient {ca:g}**")
            c1.markdown(display(ta))
            c2.markdown(f"**coefficient {cb:g}**")
            c2.markdown(display(tb))
