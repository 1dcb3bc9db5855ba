"""Page 4 — Export: the current steering setting as safetensors, GGUF (llama.cpp), .pt and JSON."""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from pathlib import Path

import streamlit as st

from app.errors import shown_errors
from app.names import inside, safe_name
from app.state import AppState, get_state
from repe.directions import Direction
from repe.sites import parse_site
from steering.export import export, llama_cpp_command
from steering.spec import SteeringSpec

FILES = {
    "safetensors": ("safetensors (+ json), zipped", "application/zip", ".zip"),
    "gguf": ("GGUF control vector", "application/octet-stream", ".gguf"),
    "pt": ("lm-eval-harness .pt", "application/octet-stream", ".pt"),
    "spec": ("JSON steering spec", "application/json", ".json"),
}


def zip_pair(folder: Path) -> bytes:
    """The artifact pair in ``folder`` (``.safetensors`` + ``.json``), zipped; anything else is refused,
    so a download is never an empty or partial zip."""
    members = sorted(folder.iterdir())
    if {f.suffix for f in members} != {".safetensors", ".json"} or len(members) != 2:
        raise RuntimeError(f"expected an artifact pair, found {[f.name for f in members]}")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in members:
            zf.write(f, f.name)
    return buf.getvalue()


def export_bytes(spec: SteeringSpec, fmt: str, name: str, fold_coeff: bool = False) -> bytes:
    """Run the library exporter into a temporary folder and return the file's bytes (zip of the
    safetensors + json pair for ``safetensors``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = export(spec, inside(tmp, name), fmt, fold_coeff=fold_coeff)
        if fmt != "safetensors":
            return Path(out).read_bytes()
        return zip_pair(Path(tmp))


def direction_zip(direction: Direction, name: str) -> bytes:
    """A direction's artifact pair (``name.safetensors`` + ``name.json``), zipped."""
    with tempfile.TemporaryDirectory() as tmp:
        direction.save(inside(tmp, name))
        return zip_pair(Path(tmp))


def restored_spec(state: AppState) -> SteeringSpec | None:
    """The session's saved Steer setting as a spec (None when its directions are gone)."""
    from app.resources import current_model
    from app.views.steer import available_directions, build_spec

    library = available_directions(state)
    if not all(n in library for n in state.steer.direction_names):
        return None
    if current_model(state.model_path) is None:
        return None
    with shown_errors("Rebuilding the saved steering setting"):
        state.spec = build_spec(state, library, state.steer)
    return state.spec if isinstance(state.spec, SteeringSpec) else None


def render() -> None:
    state = get_state()
    st.header("Export")
    spec = state.spec
    if not isinstance(spec, SteeringSpec) and state.steer.direction_names:
        spec = restored_spec(state)  # e.g. after a reload: the saved setting, built again
    if not isinstance(spec, SteeringSpec):
        st.info("Choose a steering setting on the Steer page first; it is exported from here.")
        return
    st.json(spec.to_json())
    typed = st.text_input(
        "File name (no extension)",
        "steering",
        help="Letters, digits, '.', '_' and '-'; anything else is replaced.",
    )
    name = safe_name(typed)
    if name != typed.strip():
        st.caption(f"Saved as `{name}` (letters, digits, `.`, `_` and `-` only; no folders).")
    fold = st.checkbox(
        "Fold the coefficient into the GGUF vectors",
        value=False,
        help="Write c*v into the file (llama.cpp then loads it at scale 1) instead of v with the "
        "coefficient given on llama.cpp's command line.",
    )
    key = (json.dumps(spec.to_json(), sort_keys=True), name, fold)
    # nothing is written while the user types: the exporters run on the button only
    if st.button("Prepare the files", type="primary"):
        files: dict[str, bytes | str] = {}
        for fmt, (label, _mime, _ext) in FILES.items():
            try:
                files[fmt] = export_bytes(spec, fmt, name, fold_coeff=fold)
            except Exception as exc:  # noqa: BLE001 - e.g. GGUF refuses ablation or block 0
                files[fmt] = f"{label}: cannot export this setting: {exc}"
        state.exports = (key, files)
    made, files = state.exports
    if not files:
        return
    if made != key:
        st.info("The setting, the name or the folding changed: prepare the files again.")
        return
    for fmt, (label, mime, ext) in FILES.items():
        data = files[fmt]
        if isinstance(data, str):
            st.error(data)
            continue
        st.download_button(f"Download {label}", data, f"{name}{ext}", mime, key=f"dl_{fmt}")
        if fmt == "gguf":
            layers = [parse_site(s).layer for s in spec.site_list()]
            coeff = None if fold else float(spec.coeff_at(spec.site_list()[0]))
            st.code(
                llama_cpp_command(f"{name}.gguf", "model.gguf", coeff, layers),
                "bash",
                wrap_lines=True,
            )
