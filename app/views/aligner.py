"""The Aligner page: train a few global tokens (``steering.aligner``) on a ready task
(``steering.evaluation.aligner``), see what they did on held-out data beside the base model, a
steering vector and a LoRA of the same task with their parameter counts, toggle them on a prompt to
compare the answers with and without, and download their spec."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import streamlit as st

from app.errors import shown_errors
from app.jobs import cancel_button, progress_bar, show_cancelled
from app.resources import current_model
from app.state import AlignerPanel, get_state

TASKS = {
    "form": "form: always open with a fixed phrase (SFT on the model's own answers)",
    "value": "value: prefer the honest / harmless answer (DPO on CAA refusal and hallucination pairs)",
}
N_TOKENS = (1, 4, 10)
MODELS = (
    ("base", "base model"),
    ("aligner", "Aligner"),
    ("vector", "steering vector"),
    ("lora", "LoRA"),
)
METRIC_LABELS = {
    "success": "held-out success (answer opens with the phrase)",
    "margin": "held-out margin (chosen - rejected log-lik.)",
    "recall": "held-out recall",
}


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model: the base model, the Aligner and (when trained) the vector and the LoRA."""
    metric = result["metric"]
    label = metric_label(metric)
    rows = []
    for key, name in MODELS:
        if key not in result:
            continue
        m = result[key]
        value = m.get(metric)
        ch = m.get(f"{metric}_change")
        if value is None:
            shown = None
        elif ch is None:
            shown = f"{value:.3f}"
        else:
            shown = (
                f"{value:.3f} (change {ch['mean']:+.3f}, 95% CI {ch['lo']:+.3f} to {ch['hi']:+.3f})"
            )
        rows.append(
            {
                "model": name,
                "parameters": int(m.get("parameters", 0)),
                label: shown,
                "KL on neutral text": m.get("neutral_kl", 0.0 if key == "base" else None),
                "perplexity ratio": m.get("perplexity_ratio", 1.0 if key == "base" else None),
            }
        )
    return rows


def spec_json(aligner: Any) -> bytes:
    """The Aligner's self-contained JSON spec (``Aligner.export_spec``), as bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        files = aligner.export_spec(Path(tmp) / "aligner.json")
        return Path(files[0]).read_bytes()


def train_ui(lm: Any, panel_key: str = "aligner") -> None:
    from steering.evaluation.aligner import AlignerRun, run_aligner

    state = get_state()
    with st.form("aligner_form"):
        c1, c2, c3 = st.columns(3)
        task = c1.selectbox("Task", list(TASKS), format_func=lambda k: TASKS[k])
        n_tokens = c2.selectbox(
            "N tokens",
            N_TOKENS,
            help="how many global tokens: N x d_model parameters, plus one gate per head and block",
        )
        start = c3.number_input(
            "Start layer",
            0,
            lm.n_layers - 1,
            2,
            help="the first block whose attention reads the tokens (the paper's choice: 2)",
        )
        c4, c5, c6 = st.columns(3)
        n_train = c4.number_input(
            "Training size",
            2,
            400,
            16,
            help="form: training questions; value: preference pairs per source (2 sources)",
        )
        n_held = c5.number_input(
            "Held-out size",
            1,
            400,
            8,
            help="form: held-out questions; value: held-out pairs per source",
        )
        epochs = c6.number_input("Epochs", 1, 10, 2)
        vector = st.checkbox(
            "Also a steering vector",
            value=False,
            help="a mean-difference vector for the same task (form: the best of coefficients 1-8 "
            "on training questions; value: KL on neutral text matched to the Aligner's)",
        )
        lora = st.checkbox(
            "Also a LoRA",
            value=False,
            help="a rank-8 adapter on the attention q/v projections of every block, trained on the "
            "same data (slower)",
        )
        go = st.form_submit_button("Train Aligner")
    if not go:
        return
    with shown_errors("Training"):
        run = AlignerRun(
            task=str(task),
            n_tokens=int(n_tokens),
            start_layer=int(start),
            train=int(n_train),
            held=int(n_held),
            epochs=int(epochs),
            compare_vector=bool(vector),
            compare_lora=bool(lora),
        )
        cancel_button("training", panel_key)
        report = progress_bar("Measuring the base model…")
        lines: list[str] = []

        def log(text: str) -> None:
            lines.append(text)
            report(0.0, text)

        def on_step(step: int, total: int, loss: float) -> None:
            report(step / total, f"training step {step}/{total}, loss {loss:.3f}")

        result = run_aligner(lm, run, None, progress=False, log=log, on_step=on_step)
        report(1.0, "done")
        aligner = result.pop("artifact")
        state.aligner = AlignerPanel(aligner, result)


def compare_ui(lm: Any, panel: AlignerPanel) -> None:
    from steering.generate import GenerationConfig, generate

    st.subheader("Toggle the Aligner")
    prompt = st.text_input("Prompt", value=panel.prompt, key="aligner_prompt")
    on = st.toggle("Aligner on", value=panel.on, key="aligner_on")
    tokens = st.slider("New tokens", 8, 96, 32, key="aligner_tokens")
    if st.button("Generate", key="aligner_generate"):
        with shown_errors("Generation"):
            cfg = GenerationConfig(max_new_tokens=int(tokens))
            base = generate(lm, [prompt], None, cfg)[0]
            steered = generate(lm, [prompt], panel.aligner, cfg)[0] if on else None
            panel.prompt, panel.on, panel.outputs = prompt, bool(on), (base, steered)
    if panel.outputs is not None:
        base, steered = panel.outputs
        c1, c2 = st.columns(2)
        c1.markdown("**without the Aligner**")
        c1.text(base)
        c2.markdown("**with the Aligner**")
        c2.text(steered if steered is not None else "(Aligner off)")


def download_ui(panel: AlignerPanel) -> None:
    with shown_errors("Preparing the spec"):
        st.download_button(
            "Download the Aligner spec (JSON)",
            spec_json(panel.aligner),
            f"{panel.aligner.name}.json",
            "application/json",
            key="dl_aligner_spec",
            help="What to compute and where (hooks, formula) with the tokens and gates inline; "
            "steering.aligner.Aligner.from_spec reads it back.",
        )
    st.caption(
        "llama.cpp's control-vector format cannot carry an Aligner: a control vector adds one "
        "vector per layer to the residual stream, while the Aligner adds an attention over its "
        "prefix tokens in every block from the start layer on. The spec says what a serving stack "
        "must compute instead."
    )


def render() -> None:
    st.title("Aligner: a few global tokens that align form and values")
    show_cancelled()
    state = get_state()
    lm = current_model(state.model_path)
    if lm is None:
        return
    st.caption(
        "Trains N learnable tokens that every block from the start layer on reads through its own "
        "key and value projections, in a separate softmax, scaled by a gate per head (zero at the "
        "start, so an untrained Aligner is the base model). N = 1 on the embedded model is 828 "
        "parameters. Small settings train in about a minute on a CPU."
    )
    train_ui(lm)
    panel = state.aligner
    if panel is None:
        return
    st.subheader("Held-out measurements")
    st.dataframe(table(panel.result), hide_index=True)
    st.caption(
        "Parameters: what each model trains on top of the base model. Change: paired against the "
        "base model on the same held-out items, with a bootstrap 95% interval. KL and perplexity "
        "ratio: on neutral text, against the base model."
    )
    compare_ui(lm, panel)
    download_ui(panel)
