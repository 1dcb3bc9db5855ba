"""The RAHF page: train a small low-rank adapter from preference pairs (``steering.evaluation.rahf``),
see what it did on held-out pairs beside a steering vector from the same pattern at the same cost,
and toggle it on a prompt to compare the answers with and without it."""

from __future__ import annotations

from typing import Any

import streamlit as st

from app.errors import shown_errors
from app.jobs import cancel_button, progress_bar, show_cancelled
from app.resources import current_model
from app.state import RAHFPanel, get_state
from repe.datasets import load_value_instructions
from repe.datasets.preference import CAA_PREFERRED_MATCHING

ROWS = (
    ("margin", "held-out margin (chosen - rejected log-lik.)"),
    ("projection", "projection on the pattern"),
    ("neutral_perplexity", "perplexity on neutral text"),
    ("facts_auc", "facts AUC (true vs false statements)"),
    ("neutral_kl", "KL from the base model (neutral text)"),
)


def table(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per measurement: the base model, the adapter and (when measured) the vector."""
    base = metrics["base"]
    rows = []
    for key, label in ROWS:
        row: dict[str, Any] = {
            "measure": label,
            "base model": base.get(key, 0.0 if key == "neutral_kl" else None),
        }
        for who in ("adapter", "vector"):
            if who not in metrics:
                continue
            m = metrics[who]
            if key in ("margin", "projection"):
                ch = m[f"{key}_change"]
                row[who] = (
                    f"{m[f'{key}_after']:.3f} (change {ch['mean']:+.3f}, 95% CI {ch['lo']:+.3f} to {ch['hi']:+.3f})"
                )
            else:
                row[who] = m.get(key)
        rows.append(row)
    return rows


def train_ui(lm: Any, panel_key: str = "rahf") -> None:
    from steering.evaluation.rahf import VARIANTS, RAHFRun, run_rahf

    state = get_state()
    with st.form("rahf_form"):
        sources = st.multiselect(
            "Preference pairs (CAA behaviours in cloze form)",
            sorted(CAA_PREFERRED_MATCHING),
            default=["refusal"],
        )
        c1, c2, c3 = st.columns(3)
        variant = c1.selectbox(
            "Pattern",
            VARIANTS,
            help="scit: good vs bad assistant instruction; negative: the model's own answers minus "
            "the rejected ones (D2O-style); vilmo: with vs without a value instruction",
        )
        value = c2.selectbox("Value instruction (vilmo)", sorted(load_value_instructions()))
        epochs = c3.number_input("Epochs", 1, 10, 1)
        c4, c5, c6 = st.columns(3)
        n_train = c4.number_input("Training pairs per behaviour", 2, 400, 8)
        n_held = c5.number_input("Held-out pairs per behaviour", 1, 400, 8)
        alpha_pattern = c6.number_input(
            "alpha_pattern (0: the variant's default)",
            0.0,
            50.0,
            0.0,
            step=0.5,
            help="how far the adapter moves the states along the pattern: 5 for scit and vilmo, "
            "1 for negative (its pooled pattern is about 10x longer)",
        )
        vector = st.checkbox("Also a steering vector from the pattern at the same KL", value=True)
        go = st.form_submit_button("Train adapter")
    if not go:
        return
    if not sources:
        st.error("Pick at least one behaviour.")
        return
    with shown_errors("Training"):
        run = RAHFRun(
            pairs=tuple(f"caa:{s}" for s in sources),
            variant=str(variant),
            value=str(value),
            train=int(n_train),
            held=int(n_held),
            epochs=int(epochs),
            alpha_pattern=float(alpha_pattern) or None,
            compare_vector=bool(vector),
            facts=60,
        )
        cancel_button("training", panel_key)
        report = progress_bar("Reading the pattern…")
        lines: list[str] = []

        def log(text: str) -> None:
            lines.append(text)
            report(0.0, text)

        def on_step(step: int, total: int, loss: float) -> None:
            report(step / total, f"training step {step}/{total}, loss {loss:.3f}")

        adapter, metrics = run_rahf(lm, run, None, progress=False, log=log, on_step=on_step)
        report(1.0, "done")
        state.rahf = RAHFPanel(adapter, metrics)


def compare_ui(lm: Any, panel: RAHFPanel) -> None:
    from steering.generate import GenerationConfig, generate

    st.subheader("Toggle the adapter")
    prompt = st.text_input("Prompt", value=panel.prompt, key="rahf_prompt")
    on = st.toggle("Adapter on", value=panel.on, key="rahf_on")
    tokens = st.slider("New tokens", 8, 96, 32, key="rahf_tokens")
    if st.button("Generate", key="rahf_generate"):
        with shown_errors("Generation"):
            cfg = GenerationConfig(max_new_tokens=int(tokens))
            base = generate(lm, [prompt], None, cfg)[0]
            steered = generate(lm, [prompt], panel.adapter, cfg)[0] if on else None
            panel.prompt, panel.on, panel.outputs = prompt, bool(on), (base, steered)
    if panel.outputs is not None:
        base, steered = panel.outputs
        c1, c2 = st.columns(2)
        c1.markdown("**without the adapter**")
        c1.text(base)
        c2.markdown("**with the adapter**")
        c2.text(steered if steered is not None else "(adapter off)")


def render() -> None:
    st.title("RAHF: preference patterns built into an adapter")
    show_cancelled()
    state = get_state()
    lm = current_model(state.model_path)
    if lm is None:
        return
    st.caption(
        "Reads how the model's hidden states on the same answers differ between a preferred and a "
        "dispreferred condition, trains a rank-8 adapter on the attention q/v projections to move "
        "the model by that pattern, and measures it on held-out pairs. Small settings train in a "
        "minute or two on a CPU."
    )
    train_ui(lm)
    panel = state.rahf
    if panel is None:
        return
    st.subheader("Held-out measurements")
    st.dataframe(table(panel.metrics), hide_index=True)
    tol = panel.metrics.get("tolerance", {})
    ok = panel.metrics["adapter"].get("within_tolerance")
    st.caption(
        f"Capability tolerance: perplexity at most x{tol.get('perplexity_ratio_max')} and facts AUC "
        f"down by at most {tol.get('facts_auc_drop_max')}; the adapter is "
        f"{'within' if ok else 'OUTSIDE'} it."
    )
    compare_ui(lm, panel)
