"""The app's pages by name, so that a button on one page can open another (``st.switch_page`` needs the
page object that ``st.navigation`` was given). ``app.main`` registers them; a page run on its own (as the
AppTest unit tests do) has none registered, and :func:`go_to` then only records the request."""

from __future__ import annotations

from typing import Any

import streamlit as st

PAGES: dict[str, Any] = {}
REQUESTED = "repe_go_to"


def go_to(name: str) -> None:
    """Open page ``name`` (from a callback: on the next run; from the script: now)."""
    st.session_state[REQUESTED] = name


def follow() -> None:
    """Called by ``app.main`` after ``st.navigation``: switch to a requested page, once."""
    name = st.session_state.pop(REQUESTED, None)
    if name is not None and name in PAGES:
        st.switch_page(PAGES[name])
