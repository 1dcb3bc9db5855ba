"""Page 3 — Steer live: combine directions, choose operator / layers / coefficient, and compare the
baseline and steered answers, streamed token by token."""

from __future__ import annotations

import tempfile
from contextlib import closing
from dataclasses import astuple
from pathlib import Path
from typing import Any

import streamlit as st

from app.errors import shown_errors
from app.jobs import cancel_button, progress_bar, show_cancelled
from app.names import inside, safe_name
from app.resources import ab_control_result, current_model, resid_norms
from app.state import AppState, SteerSettings, get_state
from app.views.compare import similarity_ui, two_coefficients_ui
from probes.plots import sweep_figure as sweep_figure_probe
from repe.calibration import is_calibrated, with_norms
from repe.datasets import list_concepts, load_neutral
from repe.directions import Direction
from repe.models import LoadedModel
from repe.sites import parse_site, resid_post_sites
from steering import OPERATORS, SteeringSpec
from steering.defaults import default_sites
from steering.evaluation.ab import ab_eval_specs, paired_shift
from steering.evaluation.cloze import cloze_eval_specs
from steering.evaluation.costs import kl_from_base
from steering.evaluation.sweep import SweepReport, SweepRow, coeff_layer_sweep, sweep_figure
from steering.generate import GenerationConfig, generate_stream
from steering.spec import SCALES

COEFF_RANGE = {"relative": (-2.0, 2.0, 0.25, 0.05)}
OTHER_COEFF_RANGE = (-40.0, 40.0, 8.0, 0.5)
# how a CAA question is scored: its answer letter (CAA's A/B) or its answers' texts (steering.evaluation.cloze)
FORMS = {"A/B letters": "ab", "answer texts (cloze)": "cloze"}


WHAT = {"ab": "A/B", "cloze": "Cloze"}  # each form's name in labels and messages


def default_form(model_path: str) -> str:
    """What the A/B control says works: ``"cloze"`` when the model does not read A/B options."""
    return "ab" if ab_control_result(model_path).reads_choices else "cloze"


def form_choice(key: str, model_path: str) -> str:
    """A radio for the scoring form (default: what the A/B control says works for this model);
    returns ``"ab"`` or ``"cloze"``."""
    labels = list(FORMS)
    label = st.radio(
        "Score",
        labels,
        index=list(FORMS.values()).index(default_form(model_path)),
        key=key,
        horizontal=True,
        help="A/B letters: CAA's evaluation, p(matching letter). Answer texts (cloze): the stem as "
        "the question and each option's text as the answer, for models that do not read A/B "
        "options. The default is what the A/B control (does the answer letter depend on the "
        "options at all?) says works for this model.",
    )
    return FORMS[str(label)]


def control_warning(model_path: str) -> None:
    """Warn, in A/B form, when the model does not read A/B options (steering.evaluation.control)."""
    warning = ab_control_result(model_path).warning()
    if warning:
        st.warning(
            f"A/B control: {warning[0].upper()}{warning[1:]}. Score the answer texts (cloze) "
            "instead."
        )


def available_directions(state: AppState) -> dict[str, Direction]:
    """Directions from the last sweep (one per reader, every swept site) and uploaded artifacts.
    The sweep's directions are built once per sweep (not on every rerun: a slider change should go
    straight to generation)."""
    out: dict[str, Direction] = {}
    if state.sweep is not None:
        if state.sweep_directions[0] is not state.sweep:
            built = {
                f"{state.sweep_concept}:{reader}": state.sweep.to_direction(
                    reader, name=f"{state.sweep_concept}_{reader}"
                )
                for reader in state.sweep.readers
            }
            state.sweep_directions = (state.sweep, built)
        out.update(state.sweep_directions[1])
    out.update(state.directions)
    return out


def load_uploaded_artifacts(lm: LoadedModel, files: list[Any]) -> dict[str, Direction]:
    """Pair ``name.safetensors`` with ``name.json`` and load each with the library loader."""
    by_stem: dict[str, dict[str, bytes]] = {}
    for f in files:
        p = Path(safe_name(f.name, default="upload"))
        by_stem.setdefault(p.stem, {})[p.suffix.lower()] = f.getvalue()
    out: dict[str, Direction] = {}
    for stem, parts in by_stem.items():
        missing = {".safetensors", ".json"} - set(parts)
        if missing:
            raise ValueError(f"artifact {stem!r} needs both {stem}.safetensors and {stem}.json")
        with tempfile.TemporaryDirectory() as tmp:
            for suffix, data in parts.items():
                inside(tmp, f"{stem}{suffix}").write_bytes(data)
            out[f"uploaded:{stem}"] = Direction.load(inside(tmp, stem), lm)
    return out


def preferred_direction(state: AppState, names: list[str]) -> list[str]:
    """The default direction: the Read page's best reader, when there is a sweep."""
    if state.sweep is not None:
        best = f"{state.sweep_concept}:{state.sweep.best().reader}"
        if best in names:
            return [best]
    return names[:1]


def direction_ui(names: list[str], current: SteerSettings, preferred: list[str]) -> list[str]:
    """The directions to combine (their weights are set with the rest of the setting)."""
    default = [n for n in current.direction_names if n in names] or preferred
    return list(
        st.multiselect(
            "Directions (combined with weights)",
            names,
            default=default,
            help="Directions from the Read page's sweep (concept:reader) or uploaded artifacts. "
            "Several are added up with the weights below.",
        )
    )


HELP = {
    "operator": "How the direction changes the activations at each chosen layer: add c*v (add), "
    "add and keep the norm (add_norm_preserving), remove the direction (ablate), remove then add "
    "(ablate_add) or pin the projection to a value (clamp).",
    "scale": "The unit of the coefficient. relative: a fraction of the typical residual-stream norm "
    "at the layer (0.1 = 10%), measured once per model on neutral text; unit: multiples of the unit "
    "direction; raw: the stored vector as it is.",
    "layers": "Blocks whose output (the residual stream after block L, site "
    "blocks.L.hook_resid_post) is steered. The default is the direction's best layer; the plot "
    "shows how well each layer reads the concept.",
    "coeff": "Strength and sign: positive pushes toward the concept, negative away from it.",
}


def setting_ui(
    layers: list[int],
    current: SteerSettings,
    names: list[str],
    suggested: list[int] | None = None,
    profile: Any = None,
) -> SteerSettings:
    """Operator and scale (each change applies at once), then, in one form applied with the Steer
    button, the directions' weights, layers, coefficient, prompt and length: moving a slider no longer
    starts a generation per tick. ``suggested``: the layers steered by default (the direction's best
    site, as ``repe steer`` and ``repe export`` use); ``profile``: a small figure of the sweep's score
    by layer, shown beside the layer picker."""
    c1, c2 = st.columns(2)
    ops = sorted(OPERATORS)
    operator = c1.selectbox(
        "Operator", ops, index=ops.index(current.operator), help=HELP["operator"]
    )
    scale = c2.selectbox(
        "Scale", list(SCALES), index=list(SCALES).index(current.scale), help=HELP["scale"]
    )
    mid = layers[len(layers) // 2]
    default_layers = (
        [layer for layer in current.layers if layer in layers]
        or [layer for layer in suggested or [] if layer in layers]
        or [mid]
    )
    old_weights = dict(zip(current.direction_names, current.weights, strict=False))
    with st.form("steer_setting", border=False):
        weights = [
            float(
                st.number_input(
                    f"weight of {name}",
                    -5.0,
                    5.0,
                    float(old_weights.get(name, 1.0)),
                    0.1,
                    key=f"w{i}",
                    help="Each direction counts as its unit vector (except in the raw scale); "
                    "weight 0.5 steers half as hard as 1.",
                )
            )
            for i, name in enumerate(names)
        ]
        if profile is not None:
            left, right = st.columns([2, 3])
            chosen = left.multiselect("Layers", layers, default=default_layers, help=HELP["layers"])
            right.plotly_chart(profile, key="layer_profile")
        else:
            chosen = st.multiselect("Layers", layers, default=default_layers, help=HELP["layers"])
        lo, hi, default, step = COEFF_RANGE.get(scale, OTHER_COEFF_RANGE)
        if scale == current.scale and lo <= current.coeff <= hi:
            default = current.coeff
        coeff = st.slider(
            f"Coefficient ({scale} units)",
            lo,
            hi,
            default,
            step,
            key=f"coeff_{scale}",
            help=HELP["coeff"],
        )
        prompt = st.text_input(
            "Prompt", current.prompt, help="The user turn (chat template applied)."
        )
        tokens = st.slider("New tokens", 4, 128, current.max_new_tokens, help="Greedy decoding.")
        st.form_submit_button(
            "Steer", type="primary", help="Generate the steered answer with this setting."
        )
    return SteerSettings(
        list(names),
        weights,
        operator,
        sorted(chosen),
        float(coeff),
        scale,
        prompt,
        int(tokens),
    )


def layer_profile(state: AppState, name: str) -> Any:
    """The sweep's held-out AUROC by layer for the reader behind direction ``name`` (None when the
    direction did not come from the sweep)."""
    if state.sweep is None or not name.startswith(f"{state.sweep_concept}:"):
        return None
    reader = name.split(":", 1)[1]
    if reader not in state.sweep.readers:
        return None
    return sweep_figure_probe(state.sweep, "auroc", readers=[reader], height=230)


def build_spec(state: AppState, library: dict[str, Direction], s: SteerSettings) -> SteeringSpec:
    """The weighted sum of the chosen directions at the chosen layers, as a SteeringSpec. Each
    direction counts as its unit vector (except in the raw scale), so the weights set the strength:
    weight 0.5 steers half as hard as weight 1 (see ``steering.spec.strength``)."""
    if not s.direction_names:
        raise ValueError("choose at least one direction")
    if not s.layers:
        raise ValueError("choose at least one layer")
    sites = resid_post_sites(s.layers)

    def unit_part(name: str) -> Direction:
        d = library[name].select(sites)
        return d if s.scale == "raw" or d.normalisation == "unit" else d.normalized()

    parts = [w * unit_part(n) for n, w in zip(s.direction_names, s.weights, strict=True)]
    combined = parts[0]
    for part in parts[1:]:
        combined = combined + part
    if len(parts) == 1 and s.weights[0] == 1.0:
        combined = library[s.direction_names[0]].select(sites)
    if s.scale == "relative" and not is_calibrated(combined):
        # the same calibration as repe.calibration (same texts, same statistic), measured once per
        # model for every site and cached; a direction that carries its calibration keeps it
        combined = with_norms(combined, resid_norms(state.model_path, tuple(sites)))
    return SteeringSpec(combined, coeff=s.coeff, operator=s.operator, scale=s.scale)


KL_BUDGET = 0.1  # nats/token: the coefficient sweep's default budget
KL_TEXTS = 4  # neutral texts the page's KL note is measured on


def kl_note(lm: LoadedModel, state: AppState, spec: SteeringSpec) -> None:
    """What the current setting costs: KL from the unsteered model on a few neutral texts (measured
    once per setting, after the answers are shown), with a warning above the default budget."""
    if state.setting_kl[0] != state.steered_key:
        kl = kl_from_base(lm, spec, load_neutral()[:KL_TEXTS])
        state.setting_kl = (state.steered_key, kl)
    kl = state.setting_kl[1]
    text = (
        f"KL from the unsteered model at this setting: {kl:.3f} nats/token "
        f"(on {KL_TEXTS} neutral texts)"
    )
    if kl > KL_BUDGET:
        st.warning(
            f"{text}: over the default budget of {KL_BUDGET:g}. This setting changes the model's "
            "next-token distributions a lot; lower the coefficient (or run the coefficient sweep "
            "below for the strongest setting within budget)."
        )
    else:
        st.caption(f"{text}, within the default budget of {KL_BUDGET:g}.")


def display(text: str) -> str:
    """Answer text for markdown (a whitespace-only answer is shown quoted, so it stays visible)."""
    return text if text.strip() else f"`{text!r}`"


def stream_into(placeholder: Any, lm: LoadedModel, prompt: str, spec: Any, tokens: int) -> str:
    """Stream one answer token by token into ``placeholder``; the final text."""
    text = ""
    config = GenerationConfig(max_new_tokens=tokens)
    # closing(): a rerun that interrupts the stream (StopException / RerunException raised in this
    # loop) closes the generator at once, so its ``with steer(...)`` exits before anything else runs.
    with closing(generate_stream(lm, [prompt], spec, config)) as steps:
        for step in steps:
            text = step.texts[0]
            placeholder.markdown(display(text) + " ▌")
    placeholder.markdown(display(text))
    return text


def behaviours() -> list[str]:
    return [c.removeprefix("caa/") for c in list_concepts() if c.startswith("caa/")]


def evaluation_ui(lm: LoadedModel, spec: SteeringSpec, model_path: str) -> None:
    """CAA A/B shift and KL cost of the current setting."""
    with st.expander("Behaviour shift (CAA questions) and KL cost of this setting"):
        names = behaviours()
        if not names:
            st.info("No CAA behaviours are shipped.")
            return
        behaviour = st.selectbox("CAA behaviour", names, key="eval_behaviour")
        form = form_choice("eval_form", model_path)
        n_items = st.slider(
            f"{WHAT[form]} items",
            4,
            100,
            16,
            key="eval_items",
            help="Held-out CAA questions (never used to build a vector).",
        )
        n_texts = st.slider(
            "Neutral texts for the KL", 2, len(load_neutral()), 16, key="eval_texts"
        )
        if st.button("Measure"):
            cancel_button("measurement", "measure")
            with shown_errors("The evaluation"):
                report = progress_bar(f"{WHAT[form]} answers…")
                evaluate = ab_eval_specs if form == "ab" else cloze_eval_specs
                base, steered = evaluate(
                    lm,
                    behaviour,
                    [None, spec],
                    n_items=n_items,
                    progress=lambda d, n: report(
                        0.8 * d / n, f"{WHAT[form]} answers: {d}/{n} passes"
                    ),
                )
                report(0.8, "KL on neutral text…")
                kl = kl_from_base(lm, spec, load_neutral()[:n_texts])
                report(1.0, "Done")
                c1, c2, c3 = st.columns(3)
                what = WHAT[form]
                c1.metric(f"{what} matching (base)", f"{base.score:.3f}")
                c2.metric(
                    f"{what} matching (steered)",
                    f"{steered.score:.3f}",
                    f"{steered.score - base.score:+.3f}",
                )
                c3.metric("KL from base (nats/token)", f"{kl:.4f}")
                st.caption(shift_caption(base.item_scores, steered.item_scores, what))
                if form == "ab":
                    control_warning(model_path)


def shift_caption(base: list[float], steered: list[float], what: str = "A/B") -> str:
    """The A/B shift with its paired standard error over items, and whether it stands out of the
    item-sampling noise (on small models CAA shifts are often smaller than that noise)."""
    shift, se = paired_shift(base, steered)
    if len(base) < 2:
        return f"{what} shift {shift:+.4f} (one item: no standard error)"
    verdict = "beyond" if abs(shift) > 2 * se else "within"
    return (
        f"{what} shift {shift:+.4f} ± {se:.4f} (paired standard error over {len(base)} items): "
        f"{verdict} two standard errors of item-sampling noise"
    )


def parse_coeffs(text: str) -> list[float]:
    """``"-0.5, 0.25 0.5"`` -> [-0.5, 0.25, 0.5], with a clear error for anything else."""
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(
            f"coefficients must be numbers separated by commas; got {text!r}"
        ) from None
    if not values:
        raise ValueError("give at least one coefficient")
    return sorted(set(values))


def use_recommended(state: AppState, row: SweepRow, scale: str) -> None:
    """Button callback: put the recommended layer and coefficient into the steering widgets."""
    state.steer.layers = [row.layer]
    state.steer.coeff = row.coeff
    lo, hi, _default, _step = COEFF_RANGE.get(scale, OTHER_COEFF_RANGE)
    st.session_state[f"coeff_{scale}"] = min(max(row.coeff, lo), hi)


def coeff_sweep_ui(
    lm: LoadedModel, state: AppState, spec: SteeringSpec, settings: SteerSettings
) -> None:
    """Sweep the coefficient at the chosen layers: A/B shift against KL, the recommended point
    marked (the strongest setting whose KL stays under the budget)."""
    with st.expander("Coefficient sweep", expanded=state.coeff_sweep is not None):
        names = behaviours()
        if not names:
            st.info("No CAA behaviours are shipped.")
            return
        behaviour = st.selectbox("CAA behaviour", names, key="sweep_behaviour")
        form = form_choice("sweep_form", state.model_path)
        default = "-0.5, -0.25, 0.25, 0.5" if settings.scale == "relative" else "-8, -4, 4, 8"
        text = st.text_input(f"Coefficients ({settings.scale} units)", default, key="sweep_coeffs")
        c1, c2, c3 = st.columns(3)
        budget = c1.number_input(
            "KL budget (nats/token)",
            0.001,
            10.0,
            KL_BUDGET,
            0.01,
            format="%.3f",
            help="KL: how far the steered model's next-token distributions move from the "
            "unsteered model's on neutral text (0 = unchanged). The recommendation is the "
            "strongest setting within this budget.",
        )
        n_items = c2.slider(
            f"{WHAT[form]} items",
            4,
            100,
            16,
            key="sweep_items",
            help="Held-out CAA questions (never used to build a vector).",
        )
        n_texts = c3.slider("Neutral texts", 2, len(load_neutral()), 8, key="sweep_texts")
        if st.button("Run coefficient sweep"):
            cancel_button("coefficient sweep", "coeff_sweep")
            with shown_errors("The coefficient sweep"):
                state.coeff_sweep = coeff_layer_sweep(
                    lm,
                    behaviour,
                    settings.layers,
                    parse_coeffs(text),
                    kl_budget=float(budget),
                    n_items=n_items,
                    direction=spec.direction,
                    scale=settings.scale,
                    operator=settings.operator,
                    kl_texts=load_neutral()[:n_texts],
                    progress=progress_bar("Coefficient sweep…"),
                    control=ab_control_result(state.model_path) if form == "ab" else False,
                    form=form,
                )
        report: SweepReport | None = state.coeff_sweep
        if report is None:
            return
        st.plotly_chart(sweep_figure(report))
        if report.form == "ab":
            control_warning(state.model_path)
        rec = report.recommended
        if rec is None:
            st.info(
                f"No setting moved the {WHAT[report.form]} scores toward {report.behaviour} "
                f"within the KL budget of {report.kl_budget:g}."
            )
        else:
            noise = "" if rec.beyond_noise else "; within two standard errors of zero"
            st.success(
                f"Recommended: layer {rec.layer}, coefficient {rec.coeff:g} "
                f"({WHAT[report.form]} shift {rec.shift:+.3f} ± "
                f"{rec.se:.3f}{noise}, KL {rec.kl:.4f})"
            )
            st.button(
                "Use the recommended setting",
                on_click=use_recommended,
                args=(state, rec, report.scale),
            )


def render() -> None:
    state = get_state()
    st.header("Steer live")
    lm = current_model(state.model_path)
    if lm is None:
        return
    files = st.file_uploader(
        "Direction artifacts (name.safetensors + name.json)",
        type=["safetensors", "json"],
        accept_multiple_files=True,
    )
    if files:
        # loaded once per set of uploaded files, not on every rerun
        upload_key = tuple(getattr(f, "file_id", f.name) for f in files)
        if upload_key != state.upload_key:
            with shown_errors("Loading the artifacts"):
                state.directions.update(load_uploaded_artifacts(lm, files))
                state.upload_key = upload_key
    library = available_directions(state)
    if not library:
        st.info("Run a sweep on the Read page or upload a direction artifact to steer with.")
        return
    names = direction_ui(list(library), state.steer, preferred_direction(state, list(library)))
    common = set.intersection(*(set(library[n].sites) for n in names)) if names else set()
    layers = sorted(parse_site(s).layer for s in common if s.endswith("hook_resid_post"))
    if not layers:
        st.warning("The chosen directions share no residual-stream layer.")
        return
    show_cancelled()
    first, _ = default_sites(library[names[0]])  # the same default as repe steer / repe export
    suggested = [parse_site(s).layer for s in first.sites if s.endswith("hook_resid_post")]
    settings = setting_ui(
        layers,
        state.steer,
        names,
        suggested if len(suggested) == 1 else None,
        layer_profile(state, names[0]),
    )
    state.steer = settings
    prompt, tokens = settings.prompt, settings.max_new_tokens
    if not prompt.strip():
        return
    spec = None
    with shown_errors("Building the steering setting"):
        spec = build_spec(state, library, settings)
    if spec is None:
        return
    state.spec = spec
    left, right = st.columns(2)
    left.markdown("**Baseline**")
    right.markdown(
        f"**Steered** ({settings.operator}, coeff {settings.coeff:g}, layers {settings.layers})"
    )
    # keyed containers (CSS classes st-key-baseline_answer / st-key-steered_answer) for browser tests
    base_box = left.container(key="baseline_answer").empty()
    steer_box = right.container(key="steered_answer").empty()
    with shown_errors("Generation"):
        # the steered answer first (what the user changed), then the baseline (cached per prompt)
        key = (prompt, tokens)
        if key in state.baseline:
            base_box.markdown(display(state.baseline[key]))
        else:
            base_box.caption("(after the steered answer)")
        steered_key = (state.model_path, id(state.sweep), id(state.directions), *astuple(settings))
        if steered_key == state.steered_key:
            steer_box.markdown(display(state.steered_text))
        else:
            state.steered_key = ()
            state.steered_text = stream_into(steer_box, lm, prompt, spec, tokens)
            state.steered_key = steered_key
        if key not in state.baseline:
            state.baseline[key] = stream_into(base_box, lm, prompt, None, tokens)
    if state.steered_key:
        with shown_errors("Measuring the setting's KL"):
            kl_note(lm, state, spec)
    two_coefficients_ui(lm, state, library, settings)
    similarity_ui(library, settings.layers[0])
    evaluation_ui(lm, spec, state.model_path)
    coeff_sweep_ui(lm, state, spec, settings)
