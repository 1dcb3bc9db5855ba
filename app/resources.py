"""Shared, read-only resources: the model is loaded once per process with ``st.cache_resource``.

Steering never mutates this object's state: it happens inside ``steering.steer(lm, spec)`` within one
session's script run (the active spec lives in a contextvar)."""

from __future__ import annotations

import streamlit as st

from repe.calibration import residual_norms
from repe.models import LoadedModel, load_model
from repe.sites import resid_post_sites
from steering.evaluation.control import ABControl, ab_control


@st.cache_resource(show_spinner="Loading the model…")
def get_model(path: str = "") -> LoadedModel:
    """The model at ``path`` (a local HF folder), or the embedded SmolLM2-135M-Instruct for ""."""
    return load_model(path or None)


def current_model(path: str) -> LoadedModel | None:
    """The session's model, or None after showing the load error."""
    try:
        return get_model(path)
    except Exception as exc:  # noqa: BLE001 - shown to the user, never a traceback
        st.error(f"Could not load the model: {exc}")
        return None


@st.cache_data(show_spinner="Measuring residual-stream norms (once per model)…")
def resid_norms(path: str = "") -> dict[str, float]:
    """Median residual norm of every block's output on neutral text (for ``scale="relative"``);
    read-only data derived from the shared model, so shared between sessions too."""
    lm = get_model(path)
    return residual_norms(lm, resid_post_sites(range(lm.n_layers)))


@st.cache_data(show_spinner="Checking whether the model reads A/B options (once per model)…")
def ab_control_result(path: str = "") -> ABControl:
    """The A/B control (``steering.evaluation.control``) on the unsteered model: does its answer letter depend
    on the options at all? Measured once per model and shared between sessions."""
    return ab_control(get_model(path))
