"""Page 4 — Export: the current steering setting as safetensors, GGUF (llama.cpp), .pt and JSON."""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

import streamlit as st

from app.names import inside, safe_name
from app.state import get_state
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


def export_bytes(spec: SteeringSpec, fmt: str, name: str, fold_coeff: bool = False) -> bytes:
    """Run the library exporter into a temporary folder and return the file's bytes (zip of the
    safetensors + json pair for ``safetensors``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = export(spec, inside(tmp, name), fmt, fold_coeff=fold_coeff)
        if fmt != "safetensors":
            return Path(out).read_bytes()
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for f in sorted(Path(tmp).iterdir()):
                zf.write(f, f.name)
        return buf.getvalue()


def direction_zip(direction: Direction, name: str) -> bytes:
    """A direction's artifact pair (``name.safetensors`` + ``name.json``), zipped."""
    with tempfile.TemporaryDirectory() as tmp:
        direction.save(inside(tmp, name))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for f in sorted(Path(tmp).iterdir()):
                zf.write(f, f.name)
        return buf.getvalue()


def render() -> None:
    state = get_state()
    st.header("Export")
    spec = state.spec
    if not isinstance(spec, SteeringSpec):
        st.info("Choose a steering setting on the Steer page first; it is exported from here.")
        return
    st.json(spec.to_json())
    typed = st.text_input("File name (no extension)", "steering")
    name = safe_name(typed)
    if name != typed.strip():
        st.caption(f"Saved as `{name}` (letters, digits, `.`, `_` and `-` only; no folders).")
    fold = st.checkbox("Fold the coefficient into the GGUF vectors", value=False)
    for fmt, (label, mime, ext) in FILES.items():
        try:
            data = export_bytes(spec, fmt, name, fold_coeff=fold)
        except Exception as exc:  # noqa: BLE001 - e.g. GGUF refuses ablation or block 0
            st.error(f"{label}: cannot export this setting: {exc}")
            continue
        st.download_button(f"Download {label}", data, f"{name}{ext}", mime, key=f"dl_{fmt}")
        if fmt == "gguf":
            layers = [parse_site(s).layer for s in spec.site_list()]
            coeff = None if fold else float(spec.coeff_at(spec.site_list()[0]))
            st.code(llama_cpp_command(f"{name}.gguf", "model.gguf", coeff, layers), "bash")
