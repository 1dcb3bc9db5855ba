"""The workbench's Streamlit app: ``streamlit run app/main.py``.

A thin shell: pages read widgets and call repe / probes / steering. The model is shared through
``st.cache_resource``; each session's state is one dataclass (``app.state``)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run app/main.py` puts only app/ on the path
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import nav, workspace  # noqa: E402
from app.state import get_state  # noqa: E402
from app.views import aligner, export, model_data, rahf, read, steer, studies, valuemap  # noqa: E402


def main() -> None:
    st.set_page_config(page_title="repe workbench", layout="wide")
    pages = [
        st.Page(model_data.render, title="Model & data", url_path="model", default=True),
        st.Page(read.render, title="Read", url_path="read"),
        st.Page(steer.render, title="Steer live", url_path="steer"),
        st.Page(export.render, title="Export", url_path="export"),
        st.Page(valuemap.render, title="Value map", url_path="valuemap"),
        st.Page(rahf.render, title="RAHF adapter", url_path="rahf"),
        st.Page(aligner.render, title="Aligner tokens", url_path="aligner"),
        st.Page(studies.render, title="Studies", url_path="studies"),
    ]
    names = ("model", "read", "steer", "export", "valuemap", "rahf", "aligner", "studies")
    nav.PAGES.update(zip(names, pages, strict=True))
    current = st.navigation(pages)
    nav.follow()
    state = get_state()
    for note in state.notes:  # e.g. a part of the workspace that could not be reopened
        st.warning(f"Workspace: {note}")
    state.notes.clear()
    current.run()
    workspace.save(get_state())  # after every complete run: a reload reopens this work


main()
