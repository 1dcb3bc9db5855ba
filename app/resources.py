"""Shared, read-only resources: the model is loaded once per process with ``st.cache_resource``.

Steering never mutates this object's state: it happens inside ``steering.steer(lm, spec)`` within one
session's script run (the active spec lives in a contextvar)."""

from __future__ import annotations

import os

import streamlit as st

from probes.valuemap.encoder import SentenceEncoder
from repe.calibration import cached_residual_norms, calibration_texts, stored_norms
from repe.models import LoadedModel, load_model
from steering.evaluation.answers import AnswerCache
from steering.evaluation.control import ABControl, ab_control

ANSWER_CACHE_ENV = "REPE_ANSWER_CACHE"


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


def resid_norms(path: str, sites: tuple[str, ...]) -> dict[str, float]:
    """Median residual norm at ``sites`` on neutral text (for ``scale="relative"``), measured once
    per model and site and kept on disk (``repe.calibration.cached_residual_norms``), so a new
    session, a reload or a restart of the app never measures the same site twice. A first
    measurement says what it waits for."""
    lm = get_model(path)
    known = stored_norms(lm)  # one read of the disk cache on the usual path (all sites known)
    if set(sites) <= set(known):
        return {s: known[s] for s in sites}
    layers = ", ".join(s.split(".")[1] for s in sites)
    with st.spinner(
        f"Measuring the residual-stream norm at block {layers} on "
        f"{len(calibration_texts())} neutral texts, once per model (it sets what coefficient 0.1 "
        "means in the relative scale)…"
    ):
        return cached_residual_norms(lm, list(sites))


@st.cache_data(show_spinner="Checking whether the model reads A/B options (once per model)…")
def ab_control_result(path: str = "") -> ABControl:
    """The A/B control (``steering.evaluation.control``) on the unsteered model: does its answer letter depend
    on the options at all? Measured once per model and shared between sessions."""
    return ab_control(get_model(path))


@st.cache_resource(show_spinner="Loading the sentence encoder…")
def get_encoder() -> SentenceEncoder:
    """The value map's frozen sentence encoder (all-MiniLM-L6-v2), loaded once per process."""
    return SentenceEncoder()


def answer_cache() -> AnswerCache:
    """Where the Value map page keeps generated answers: ``REPE_ANSWER_CACHE`` when set (the tests
    point it at a scratch folder), else the library's default (``~/.cache/repe/answers``)."""
    return AnswerCache(os.environ.get(ANSWER_CACHE_ENV) or None)
