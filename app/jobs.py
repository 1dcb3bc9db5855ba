"""Long-running actions the user can cancel.

A Cancel button is shown while the action runs. Clicking it makes the browser ask for a rerun;
Streamlit stops the running script at its next call into ``st`` (every long action here reports
progress through ``st``, so that is at most one batch away), and the button's ``on_click`` callback
records the cancellation before the new run starts. Results are stored in the session only when an
action completes, so a cancelled action leaves the page as it was.
"""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

CANCELLED = "repe_cancelled"


def _mark_cancelled(what: str) -> None:
    st.session_state[CANCELLED] = what


def cancel_button(what: str, key: str) -> None:
    """Show "Cancel <what>" for the rest of this script run (call it right before the long action)."""
    st.button(f"Cancel {what}", key=f"cancel_{key}", on_click=_mark_cancelled, args=(what,))


def show_cancelled() -> None:
    """Tell the user that an action was cancelled in the previous run (once)."""
    what = st.session_state.pop(CANCELLED, None)
    if what:
        st.warning(f"Cancelled the {what}; nothing was changed.")


def progress_bar(text: str) -> Callable[[float, str], None]:
    """An ``st.progress`` bar as a ``report(fraction, text)`` callback for library progress hooks."""
    bar = st.progress(0.0, text=text)

    def report(fraction: float, what: str) -> None:
        bar.progress(min(max(fraction, 0.0), 1.0), text=what)

    return report
