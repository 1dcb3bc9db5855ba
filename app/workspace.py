"""A session's work on disk, so that a page reload (or a restart of the app) loses nothing.

Each browser session gets a workspace folder ``<root>/<id>`` and carries its id in the page address
(``?ws=<id>``); a reload, or the same address opened later, reopens it. The root is ``REPE_WORKSPACE``
(``repe app --workspace DIR`` sets it), else ``~/repe-workspace``; the Model & data page shows the folder.
What it holds (each part rewritten, atomically, only when it changed)::

    settings.json        the model, the sweep's concept, the Steer page's setting, the uploaded
                         directions' file names
    sweep/               the last Read sweep (probes.sweep_store)
    acts_pos/ acts_neg/  its activations (for the PCA scatter)
    directions/          the uploaded direction artifacts (safetensors + json)
    valuemap/            the Value map page's last run (steering.evaluation.valuemap.save_valuemap:
                         map and confusion HTML, metrics, records, the head artifact); written
                         only: a reload does not reopen it (the library has no loader for it)
    rahf/                the RAHF page's adapter (artifact) and its metrics.json; a reload reopens
                         them
    aligner/             the Aligner page's Aligner (artifact ``aligner``) and its result.json; a
                         reload reopens them

A damaged part is left out with a warning; the rest still loads.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import streamlit as st

from app.names import inside, safe_name
from app.state import AppState, SteerSettings
from repe.atomic import write_text

PARAM = "ws"
_ID = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")


def root() -> Path:
    return Path(os.environ.get("REPE_WORKSPACE") or Path.home() / "repe-workspace")


def new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def valid_id(value: Any) -> bool:
    return isinstance(value, str) and bool(_ID.match(value))


def folder(state: AppState) -> Path:
    return inside(root(), state.workspace)


def attach(state: AppState) -> list[str]:
    """Give a new session its workspace: the one named in the address if it exists (loaded into
    ``state``), else a new one. Returns warnings about parts that could not be loaded."""
    wanted = st.query_params.get(PARAM)
    warnings: list[str] = []
    if valid_id(wanted) and (root() / str(wanted)).is_dir():
        state.workspace = str(wanted)
        warnings = load(state)
    else:
        state.workspace = new_id()
    return warnings


def _settings(state: AppState, direction_files: dict[str, str]) -> dict[str, Any]:
    return {
        "model_path": state.model_path,
        "sweep_concept": state.sweep_concept,
        "steer": asdict(state.steer),
        "directions": direction_files,
    }


def save(state: AppState) -> None:
    """Write what changed since the last save."""
    if not state.workspace:
        return
    from probes.sweep_store import save_sweep

    base = folder(state)
    has_work = (
        state.sweep is not None
        or state.directions
        or state.steer.direction_names
        or state.valuemap is not None
        or state.rahf is not None
        or state.aligner is not None
    )
    if not has_work and not base.is_dir():
        return  # a session that has done nothing yet leaves no folder behind
    saved = state.saved
    if state.sweep is not None and saved.get("sweep") != id(state.sweep):
        save_sweep(state.sweep, base / "sweep")
        for side, acts in (("acts_pos", state.acts_pos), ("acts_neg", state.acts_neg)):
            if acts is not None:
                acts.save(base / side, overwrite=True)
        saved["sweep"] = id(state.sweep)
    files = {name: safe_name(name, default="direction") for name in state.directions}
    for name, d in state.directions.items():
        if saved.get(f"direction:{name}") != id(d):
            d.save(inside(base / "directions", files[name]))
            saved[f"direction:{name}"] = id(d)
    if state.valuemap is not None and saved.get("valuemap") != id(state.valuemap):
        from steering.evaluation.valuemap import save_valuemap

        try:
            save_valuemap(state.valuemap.result, base / "valuemap")
        except Exception as exc:  # noqa: BLE001 - the page already shows the result; say, once
            state.notes.append(f"the value map could not be written to the workspace ({exc})")
        saved["valuemap"] = id(state.valuemap)
    if state.rahf is not None and saved.get("rahf") != id(state.rahf.adapter):
        state.rahf.adapter.save(base / "rahf" / "adapter")
        write_text(base / "rahf" / "metrics.json", json.dumps(state.rahf.metrics, indent=1))
        saved["rahf"] = id(state.rahf.adapter)
    if state.aligner is not None and saved.get("aligner") != id(state.aligner.aligner):
        state.aligner.aligner.save(base / "aligner" / "aligner")
        write_text(base / "aligner" / "result.json", json.dumps(state.aligner.result, indent=1))
        saved["aligner"] = id(state.aligner.aligner)
    text = json.dumps(_settings(state, files), indent=1, sort_keys=True)
    if saved.get("settings") != text:
        write_text(base / "settings.json", text)
        saved["settings"] = text


def load(state: AppState) -> list[str]:
    """Fill ``state`` from its workspace folder; returns one warning per part that failed."""
    from probes.sweep_store import load_sweep
    from repe.activations import ActivationSet
    from repe.directions import Direction

    base = folder(state)
    warnings: list[str] = []
    settings: dict[str, Any] = {}
    try:
        settings = json.loads((base / "settings.json").read_text(encoding="utf-8"))
        state.model_path = str(settings.get("model_path", ""))
        state.sweep_concept = str(settings.get("sweep_concept", ""))
        known = {f.name for f in fields(SteerSettings)}
        state.steer = SteerSettings(
            **{k: v for k, v in dict(settings.get("steer", {})).items() if k in known}
        )
    except FileNotFoundError:
        pass
    except (ValueError, TypeError, AttributeError) as exc:
        warnings.append(f"settings.json could not be read ({exc}); default settings are used")
    if (base / "sweep").is_dir():
        try:
            state.sweep = load_sweep(base / "sweep")
            state.saved["sweep"] = id(state.sweep)
            if (base / "acts_pos").is_dir() and (base / "acts_neg").is_dir():
                state.acts_pos = ActivationSet.load(base / "acts_pos")
                state.acts_neg = ActivationSet.load(base / "acts_neg")
        except Exception as exc:  # noqa: BLE001 - one damaged part must not lose the others
            state.sweep = state.acts_pos = state.acts_neg = None
            warnings.append(f"the stored sweep could not be read ({exc})")
    if (base / "rahf").is_dir():
        try:
            from app.state import RAHFPanel
            from steering.adapter import LowRankAdapter

            ad = LowRankAdapter.load(base / "rahf" / "adapter")
            metrics = json.loads((base / "rahf" / "metrics.json").read_text(encoding="utf-8"))
            state.rahf = RAHFPanel(ad, metrics)
            state.saved["rahf"] = id(ad)
        except Exception as exc:  # noqa: BLE001 - as above
            warnings.append(f"the RAHF adapter could not be read ({exc})")
    if (base / "aligner").is_dir():
        try:
            from app.state import AlignerPanel
            from steering.aligner import Aligner

            al = Aligner.load(base / "aligner" / "aligner")
            result = json.loads((base / "aligner" / "result.json").read_text(encoding="utf-8"))
            state.aligner = AlignerPanel(al, result)
            state.saved["aligner"] = id(al)
        except Exception as exc:  # noqa: BLE001 - as above
            warnings.append(f"the Aligner could not be read ({exc})")
    for name, file in dict(settings.get("directions", {})).items():
        try:
            d = Direction.load(inside(base / "directions", safe_name(str(file))))
            state.directions[str(name)] = d
            state.saved[f"direction:{name}"] = id(d)
        except Exception as exc:  # noqa: BLE001 - as above
            warnings.append(f"direction {name!r} could not be read ({exc})")
    return warnings
