"""Per-session state: one typed dataclass under one ``st.session_state`` key.

Nothing here is shared between browser sessions; the model itself is shared through
``app.resources.get_model`` (``st.cache_resource``) and never carries steering state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from probes.sweep import SweepResult
from repe.activations import ActivationSet
from repe.datasets import ContrastDataset
from repe.directions import Direction
from steering.evaluation.sweep import SweepReport
from steering.evaluation.valuemap import ValueMapResult

STATE_KEY = "repe_app"


@dataclass
class SteerSettings:
    """The steering setting the user last chose (what the Export page writes out)."""

    direction_names: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    operator: str = "add"
    layers: list[int] = field(default_factory=list)
    coeff: float = 0.25  # in the default scale's units
    scale: str = "relative"
    prompt: str = "Tell me about your weekend."
    max_new_tokens: int = 32


@dataclass
class ValueMapRun:
    """The Value map page's last completed run: the result, what it was made from (a one-line
    summary per setting) and its two downloads, prepared once when the run ends."""

    result: ValueMapResult
    settings: dict[str, str]
    head_zip: bytes
    metrics_json: bytes
    seconds: float = 0.0


@dataclass
class RAHFPanel:
    """The RAHF page's last trained adapter, its held-out metrics and the last comparison."""

    adapter: Any  # steering.adapter.LowRankAdapter
    metrics: dict[str, Any]
    prompt: str = "How do I pick a lock?"
    on: bool = True
    outputs: tuple[str, str | None] | None = None  # (without, with the adapter)


@dataclass
class AlignerPanel:
    """The Aligner page's last trained Aligner, its held-out result (``run_aligner``'s dict without
    the ``"artifact"`` key) and the last comparison."""

    aligner: Any  # steering.aligner.Aligner
    result: dict[str, Any]
    prompt: str = "How do I make a good cup of tea?"
    on: bool = True
    outputs: tuple[str, str | None] | None = None  # (without, with the Aligner)


@dataclass
class AppState:
    model_path: str = ""  # "" = the embedded model
    uploaded: ContrastDataset | None = None
    sweep: SweepResult | None = None
    sweep_concept: str = ""
    acts_pos: ActivationSet | None = None
    acts_neg: ActivationSet | None = None
    directions: dict[str, Direction] = field(default_factory=dict)  # uploaded artifacts
    upload_key: tuple[str, ...] = ()  # the uploaded files `directions` was last loaded from
    steer: SteerSettings = field(default_factory=SteerSettings)
    spec: Any = None  # the last steering.SteeringSpec built on the Steer page
    baseline: dict[tuple[str, int], str] = field(default_factory=dict)  # (prompt, tokens) -> text
    steered_text: str = ""
    steered_key: tuple[Any, ...] = ()  # the setting steered_text was generated with
    coeff_sweep: SweepReport | None = None  # the Steer page's last coefficient sweep
    setting_kl: tuple[tuple[Any, ...], float] = ((), 0.0)  # (steered_key, KL of that setting)
    # the Export page's files, prepared on its button: (what they were made from, format -> bytes
    # or the error message)
    exports: tuple[Any, dict[str, Any]] = ((), {})
    compared: tuple[float, float, str, str] | None = None  # two coefficients side by side
    workspace: str = ""  # this session's workspace id (app.workspace), carried in the address
    saved: dict[str, Any] = field(default_factory=dict)  # what app.workspace last wrote
    notes: list[str] = field(default_factory=list)  # warnings to show once (e.g. from a reload)
    # the last sweep's directions, built once per sweep: (the SweepResult they came from, by name)
    sweep_directions: tuple[Any, dict[str, Direction]] = (None, {})
    valuemap: ValueMapRun | None = None  # the Value map page's last completed run
    rahf: RAHFPanel | None = None  # the RAHF page's last trained adapter
    aligner: AlignerPanel | None = None  # the Aligner page's last trained Aligner


def get_state() -> AppState:
    """This session's state (created on first use, from its workspace when the address names one),
    with its workspace id kept in the address so that a reload finds it again."""
    from app import workspace

    state = st.session_state.get(STATE_KEY)
    if not isinstance(state, AppState):  # new, or a stale object after a code reload
        state = st.session_state[STATE_KEY] = AppState()
    if not state.workspace:
        state.notes.extend(workspace.attach(state))
    if st.query_params.get(workspace.PARAM) != state.workspace:
        st.query_params[workspace.PARAM] = state.workspace
    return state
