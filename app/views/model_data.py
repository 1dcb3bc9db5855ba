"""Page 1 — Model & data: the loaded model, its sites, the shipped concept sets, uploaded pairs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import streamlit as st

from app import workspace
from app.names import inside, safe_name
from app.resources import current_model
from app.state import get_state
from repe.datasets import ContrastDataset, list_concepts, load_pairs_file
from repe.models import LoadedModel
from repe.sites import all_sites

PREVIEW_ROWS = 10


def model_ui(current: str) -> str:
    """The model folder the user asks for ("" = the embedded model)."""
    source = st.radio(
        "Model",
        ["embedded SmolLM2-135M-Instruct", "local folder"],
        index=1 if current else 0,
        horizontal=True,
    )
    if source == "local folder":
        return st.text_input("Folder holding config.json and weights", value=current).strip()
    return ""


def model_summary(lm: LoadedModel) -> dict[str, str]:
    ident = lm.identity
    return {
        "name": ident.name,
        "blocks": str(lm.n_layers),
        "hidden size": str(lm.d_model),
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "source": str(lm.source),
    }


def read_upload(name: str, data: bytes) -> ContrastDataset:
    """Parse an uploaded pairs file with the library loader (through a temporary file)."""
    clean = Path(safe_name(name, default="upload"))
    with tempfile.TemporaryDirectory() as tmp:
        path = inside(tmp, f"upload{clean.suffix.lower()}")
        path.write_bytes(data)
        return load_pairs_file(path, name=clean.stem)


def preview_rows(ds: ContrastDataset, n: int = PREVIEW_ROWS) -> list[dict[str, str]]:
    return [
        {"label": p.label or "", "positive": str(p.positive), "negative": str(p.negative)}
        for p in list(ds)[:n]
    ]


def render() -> None:
    state = get_state()
    st.header("Model & data")
    st.caption(
        f"This session's work (sweeps, directions, settings) is kept in `{workspace.folder(state)}`; "
        "reloading the page, or opening this address later, reopens it."
    )
    path = model_ui(state.model_path)
    if path != state.model_path:
        state.model_path = path
        state.sweep = None
        state.acts_pos = state.acts_neg = None
        state.spec = None
        state.baseline.clear()
        state.steered_key = ()
    lm = current_model(state.model_path)
    if lm is not None:
        st.subheader("Loaded model")
        st.table(model_summary(lm))
        with st.expander(f"Sites ({lm.n_layers} blocks)"):
            st.dataframe({"site": [s.name for s in all_sites(lm.n_layers)]})

    st.subheader("Shipped concept sets")
    st.dataframe({"concept": list_concepts()})

    st.subheader("Your contrast pairs")
    st.caption(
        "CSV with columns positive, negative (optional label), or JSON lines with those keys."
    )
    upload = st.file_uploader("Pairs file", type=["csv", "jsonl", "json"])
    if upload is not None:
        try:
            state.uploaded = read_upload(upload.name, upload.getvalue())
        except Exception as exc:  # noqa: BLE001 - malformed files are the user's to fix
            state.uploaded = None
            st.error(f"Could not read {upload.name}: {exc}")
    if state.uploaded is not None:
        st.success(f"{state.uploaded.name}: {len(state.uploaded)} pairs (usable on the Read page)")
        st.dataframe(preview_rows(state.uploaded))
