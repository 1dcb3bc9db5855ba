"""Page 5 — Value map: sources (the model under value personas, optionally steered at several
coefficients) answer value questions; a head trained on the answers' sentence embeddings tells which
source gave a held-out answer, and the sources are mapped in 2-D (``steering.evaluation.valuemap``)."""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import streamlit as st

from app.errors import shown_errors
from app.jobs import cancel_button, progress_bar, show_cancelled
from app.names import inside, safe_name
from app.resources import answer_cache, current_model, get_encoder
from app.state import AppState, SteerSettings, ValueMapRun, get_state
from app.views.export import zip_pair
from app.views.steer import available_directions, build_spec, parse_coeffs
from repe.artifacts import save_artifact
from repe.datasets import list_question_sets, load_questions, question_set
from repe.datasets.questions import QuestionSet
from repe.directions import Direction
from repe.errors import DataFormatError
from repe.models import LoadedModel
from repe.sites import parse_site
from steering.defaults import default_sites
from steering.evaluation.answers import DEFAULT_SAMPLING, AnswerCache, Source
from steering.evaluation.valuemap import (
    PERSONAS,
    Trajectory,
    ValueMapConfig,
    ValueMapResult,
    persona_sources,
    run_valuemap,
    sweep_sources,
)
from steering.generate import GenerationConfig

NO_SWEEP = "(no steering sweep)"
DEFAULT_PERSONAS = ["assistant", "traditionalist", "free_spirit", "altruist"]
BASE = "assistant"  # the unsteered persona: a steering sweep's coefficient 0
BATCH = 8  # answers per generation batch: each batch is a point where Cancel stops the run
MIN_HELD_OUT = 10  # below this many held-out questions the scores say little
VALUE_SETS = [n for n in list_question_sets() if n != "control"]
MAP_METHODS = {"PCA": "pca", "t-SNE": "tsne"}

HELP = {
    "personas": "A source is one way of answering the questions: here the model under a "
    "system-prompt persona (assistant: the model's own default, no system prompt). Every source "
    "answers every question; the map places sources whose answers hold similar values close "
    "together.",
    "direction": "Add a steering sweep: the assistant steered with this direction (from the Read "
    "page's sweep or an artifact uploaded on Steer live), one more source per coefficient, drawn "
    "on the map as a trajectory through coefficient 0 (the assistant persona).",
    "layer": "The block whose output (the residual stream, blocks.L.hook_resid_post) is steered; "
    "the default is the direction's best layer.",
    "coeffs": "Steering coefficients in the relative scale (0.1 = 10% of the typical residual-stream "
    "norm at the layer), separated by commas; each is one more source. Leave 0 out: the assistant "
    "persona is the unsteered point.",
    "question_set": "The value questions every source answers: ValueBench inventory items, "
    "MoralChoice dilemmas, Anthropic persona statements, or 'values', a balanced mix of the three.",
    "n_questions": "How many value questions (sampled evenly across the set's groups). 20% of them "
    "are held out: the scores rest on those alone, so about 50 questions give 10 held-out ones.",
    "upload": "Your own value questions instead of a shipped set: JSONL objects with 'question' "
    "(and an optional 'id'), or a CSV with a 'question' column (and an optional 'id').",
    "control": "The control set: general-knowledge and how-to questions with no values in them. "
    "If the sources are told apart as well on these as on the value questions, the head has learnt "
    "style (length, tone), not values.",
    "n_control": "How many control questions; half index the kNN, the other half are scored.",
    "tokens": "New tokens per answer (sampled at temperature 0.7, top-p 0.9). Longer answers say "
    "more about values and take longer to generate.",
    "seed": "Seeds the question sample, the answers' sampling, the train / validation / test split "
    "of the questions and the head's training.",
    "k": "kNN acc@1 scores a held-out answer by the votes of its k most similar training answers "
    "(UniVaR uses 50). It is capped at the training answers per source, so small runs use fewer.",
    "map": "How the sources' mean embeddings are drawn in 2-D: PCA (the two directions of most "
    "variance; distances are meaningful) or t-SNE (neighbourhoods kept, distances not).",
    "run": "Generate every source's answers (kept in the answer cache: a rerun of the same setting, "
    "or one cancelled part-way, reuses them), embed them with the frozen sentence encoder, train the "
    "value head on 60% of the questions and score who answered the held-out 20%.",
    "confusion": "Which scores' confusion matrix to show: rows are the true sources of the "
    "held-out answers, columns the sources they were attributed to.",
}
COLUMN_HELP = {
    "acc@1 [95% CI]": "kNN acc@1: the share of held-out answers whose true source is ranked first "
    "(for kNN: gets the most votes among the k nearest training answers; for the linear probe: the "
    "highest score). 95% bootstrap interval over held-out questions.",
    "acc@3": "The true source among the three ranked highest (always 1 with three sources).",
    "F1": "F1 averaged over sources, weighted by their number of held-out answers.",
    "chance": "acc@1 of guessing: 1 / number of sources.",
    "questions": "Held-out questions the row rests on.",
    "answers": "Held-out answers scored (one per source per question).",
}
LABELS = {  # the library's score keys; a key not named here is shown as it is
    "head_knn": "trained head, kNN",
    "frozen_knn": "frozen encoder (Q + A), kNN",
    "frozen_knn_answer": "frozen encoder (answer alone), kNN",
    "tfidf_knn": "TF-IDF words (Q + A), kNN",
    "head_linear": "trained head, linear probe",
    "frozen_linear": "frozen encoder (Q + A), linear probe",
    "head_knn_control": "trained head, kNN, control questions",
    "frozen_knn_control": "frozen encoder, kNN, control questions",
}
STAGES = {  # run_valuemap's stages: (progress fraction, what the user is told)
    "answers": (0.0, "Generating the answers…"),
    "encode": (0.80, "Embedding the answers with the sentence encoder…"),
    "train": (0.85, "Training the value head on the training questions…"),
    "evaluate": (0.93, "Telling who answered the held-out questions…"),
    "map": (0.97, "Drawing the map…"),
}


@dataclass(frozen=True)
class ValueMapRequest:
    """What the user asks for (plain values read from the widgets)."""

    personas: list[str]
    direction: str = ""  # "" = no steering sweep
    layer: int | None = None
    coeffs: str = ""  # as typed
    question_set: str = "values"
    n_questions: int = 24
    upload: tuple[str, bytes] | None = None  # the user's question file: (name, contents)
    control: bool = False
    n_control: int = 12
    max_new_tokens: int = 32
    seed: int = 0
    k: int = 50
    map_method: str = "pca"


@dataclass
class Plan:
    """What ``run_valuemap`` is called with."""

    sources: list[Source]
    trajectories: list[Trajectory]
    questions: QuestionSet
    control: QuestionSet | None
    config: ValueMapConfig
    summary: dict[str, str]


def sweep_ui(library: dict[str, Direction]) -> tuple[str, int | None, str]:
    """The optional steering sweep: direction name ("" for none), layer and coefficients text."""
    if not library:
        st.caption(
            "Steering sweep: none available. Run a sweep on the Read page or upload a direction "
            "artifact on Steer live to add one."
        )
        return "", None, ""
    c1, c2, c3 = st.columns([2, 1, 2])
    name = c1.selectbox(
        "Steering sweep", [NO_SWEEP, *library], key="vm_direction", help=HELP["direction"]
    )
    if name == NO_SWEEP:
        return "", None, ""
    direction = library[str(name)]
    layers = sorted(parse_site(s).layer for s in direction.sites if s.endswith("hook_resid_post"))
    if not layers:
        st.warning(f"{name} has no residual-stream layer to steer.")
        return "", None, ""
    best, _ = default_sites(direction)
    suggested = [parse_site(s).layer for s in best.sites if s in direction.sites]
    default = suggested[0] if len(suggested) == 1 and suggested[0] in layers else layers[0]
    layer = c2.selectbox(
        "Layer", layers, index=layers.index(default), key="vm_layer", help=HELP["layer"]
    )
    coeffs = c3.text_input(
        "Coefficients (relative scale)", "0.1, 0.2, 0.3", key="vm_coeffs", help=HELP["coeffs"]
    )
    return str(name), int(layer), str(coeffs)


def request_ui(library: dict[str, Direction]) -> tuple[ValueMapRequest, bool]:
    """The value map the user asks for, and whether they pressed Generate and train."""
    personas = st.multiselect(
        "Personas (sources)", list(PERSONAS), default=DEFAULT_PERSONAS, help=HELP["personas"]
    )
    with st.expander("What each persona is told"):
        for name, prompt in PERSONAS.items():
            st.markdown(f"**{name}**: {prompt or '(no system prompt: the model as it is)'}")
    direction, layer, coeffs = sweep_ui(library)
    c1, c2, c3 = st.columns(3)
    qset = c1.selectbox(
        "Value questions",
        VALUE_SETS,
        index=VALUE_SETS.index("values") if "values" in VALUE_SETS else 0,
        help=HELP["question_set"],
    )
    n_questions = c2.number_input(
        "Number of value questions", 6, 5000, 24, help=HELP["n_questions"]
    )
    upload = c3.file_uploader(
        "Or your own questions (JSONL / CSV)", type=["jsonl", "csv"], help=HELP["upload"]
    )
    c1, c2 = st.columns(2)
    control = c1.checkbox("Add the control set", value=False, help=HELP["control"])
    n_control = c2.number_input(
        "Number of control questions", 4, 500, 12, disabled=not control, help=HELP["n_control"]
    )
    c1, c2, c3, c4 = st.columns(4)
    tokens = c1.number_input("Answer length (new tokens)", 4, 256, 32, help=HELP["tokens"])
    seed = c2.number_input("Seed", 0, 2**31 - 1, 0, help=HELP["seed"])
    k = c3.number_input("Neighbours (k)", 1, 500, 50, help=HELP["k"])
    method = c4.radio("Map", list(MAP_METHODS), horizontal=True, help=HELP["map"])
    request = ValueMapRequest(
        personas=list(personas),
        direction=direction,
        layer=layer,
        coeffs=coeffs,
        question_set=str(qset),
        n_questions=int(n_questions),
        upload=(upload.name, upload.getvalue()) if upload is not None else None,
        control=bool(control),
        n_control=int(n_control),
        max_new_tokens=int(tokens),
        seed=int(seed),
        k=int(k),
        map_method=MAP_METHODS[str(method)],
    )
    return request, st.button("Generate and train", type="primary", help=HELP["run"])


def sweep_coeffs(text: str) -> list[float]:
    """The sweep's coefficients (sorted, distinct, non-zero), or a one-line ValueError."""
    coeffs = parse_coeffs(text)
    if 0.0 in coeffs:
        raise ValueError(
            "leave 0 out of the coefficients: the assistant persona is the unsteered point"
        )
    return coeffs


def check_request(request: ValueMapRequest) -> list[float]:
    """The request's sweep coefficients ([] without a sweep); a one-line ValueError for a request
    that cannot make a value map."""
    if not request.personas:
        raise ValueError("choose at least one persona")
    coeffs = sweep_coeffs(request.coeffs) if request.direction else []
    n = len(request.personas) + len(coeffs)
    if n < 3:
        raise ValueError(
            f"a value map needs at least 3 sources (personas + sweep coefficients); this setting "
            f"has {n}"
        )
    return coeffs


def load_question_file(name: str, data: bytes) -> QuestionSet:
    """The user's question file through the library loader (a temporary copy named like the
    upload, so question ids read ``<name>/<line>``); errors name the upload, not the copy."""
    clean = Path(safe_name(name, default="questions"))
    with tempfile.TemporaryDirectory() as tmp:
        path = inside(tmp, clean.name)
        path.write_bytes(data)
        try:
            return load_questions(path)
        except DataFormatError as exc:
            raise DataFormatError(str(exc).replace(str(path), clean.name)) from None


def sampling_for(request: ValueMapRequest) -> GenerationConfig:
    return replace(DEFAULT_SAMPLING, max_new_tokens=request.max_new_tokens, seed=request.seed)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def make_plan(state: AppState, library: dict[str, Direction], request: ValueMapRequest) -> Plan:
    """The sources, question sets and configuration for ``run_valuemap`` (a ValueError for a bad
    request, before anything is generated)."""
    coeffs = check_request(request)
    sampling = sampling_for(request)
    sources = persona_sources(request.personas, sampling)
    trajectories: list[Trajectory] = []
    summary = {"sources": ", ".join(request.personas)}
    if request.direction:
        if request.direction not in library or request.layer is None:
            raise ValueError(f"direction {request.direction!r} is no longer available")
        setting = SteerSettings(
            direction_names=[request.direction],
            weights=[1.0],
            layers=[request.layer],
            coeff=coeffs[0],
            scale="relative",
        )
        spec = build_spec(state, library, setting)
        short = request.direction.rsplit(":", 1)[-1]
        steered, trajectory = sweep_sources(
            spec,
            coeffs,
            label=f"{short}@L{request.layer}",
            base=BASE if BASE in request.personas else None,
            sampling=sampling,
        )
        sources += steered
        trajectories.append(trajectory)
        summary["sweep"] = (
            f"{request.direction} at layer {request.layer}, relative coefficients "
            f"{', '.join(f'{c:g}' for c in coeffs)}"
        )
    if request.upload is not None:
        full = load_question_file(*request.upload)
        what = f"your file {full.name}"
    else:
        full = question_set(request.question_set)
        what = f"the {request.question_set} set"
    questions = full.sample(request.n_questions, request.seed)
    if len(questions) < 3:
        raise ValueError(
            f"a value map needs at least 3 value questions; {what} has {len(questions)}"
        )
    summary["questions"] = f"{plural(len(questions), 'value question')} from {what}"
    control = None
    if request.control:
        control = question_set("control", request.n_control, request.seed)
        summary["control"] = plural(len(control), "control question")
    summary["answers"] = (
        f"{request.max_new_tokens} new tokens, sampled at temperature {sampling.temperature:g}, "
        f"top-p {sampling.top_p:g}; seed {request.seed}"
    )
    config = ValueMapConfig(
        k=request.k, seed=request.seed, map_method=request.map_method, batch_size=BATCH
    )
    return Plan(sources, trajectories, questions, control, config, summary)


def planned_batches(
    lm: LoadedModel, sources: Sequence[Source], sets: Sequence[QuestionSet], cache: AnswerCache
) -> tuple[int, int]:
    """Generation batches still to run and answers already in the cache (never generated again)."""
    batches = cached = 0
    for questions in sets:
        for source in sources:
            done = cache.load(cache.path(lm, source, questions))
            missing = sum(q.qid not in done for q in questions.questions)
            batches += math.ceil(missing / BATCH)
            cached += len(questions) - missing
    return batches, cached


def finite(value: Any) -> Any:
    """``value`` with NaN / inf floats as None (strict JSON; a rank correlation over fewer than
    three points is NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def head_zip(result: ValueMapResult) -> bytes:
    """The value head artifact (``value_head.safetensors`` + ``value_head.json``), zipped."""
    with tempfile.TemporaryDirectory() as tmp:
        save_artifact(result.artifact(), inside(tmp, "value_head"))
        return zip_pair(Path(tmp))


def run_job(
    lm: LoadedModel, state: AppState, library: dict[str, Direction], request: ValueMapRequest
) -> None:
    """Generate, embed, train and score, telling the stage (and the generation batch) as it goes;
    each report is a point where Cancel stops the run. The result goes into the session state only
    at the end; answers generated before a cancel stay in the answer cache."""
    report = progress_bar("Preparing the sources and questions…")
    plan = make_plan(state, library, request)
    cache = answer_cache()
    sets = [plan.questions] + ([plan.control] if plan.control is not None else [])
    total, cached = planned_batches(lm, plan.sources, sets, cache)
    n_sources = len(plan.sources)
    batch = 0

    def should_stop() -> bool:
        nonlocal batch
        batch += 1
        report(
            0.8 * (batch - 1) / max(total, 1),
            f"Generating the answers of {plural(n_sources, 'source')}: batch {batch} of {total} "
            f"(up to {BATCH} answers each)",
        )
        return False

    def on_stage(stage: str) -> None:
        fraction, text = STAGES.get(stage, (0.0, f"{stage}…"))
        if stage == "answers" and cached:
            text += f" ({plural(cached, 'answer')} already in the cache)"
        report(fraction, text)

    encoder = get_encoder()
    started = time.monotonic()
    result = run_valuemap(
        lm,
        plan.sources,
        plan.questions,
        plan.control,
        trajectories=plan.trajectories,
        encoder=encoder,
        config=plan.config,
        cache=cache,
        progress=False,
        should_stop=should_stop,
        on_stage=on_stage,
    )
    report(1.0, "Preparing the downloads…")
    metrics_json = json.dumps(finite(result.metrics()), indent=1).encode()
    state.valuemap = ValueMapRun(
        result, plan.summary, head_zip(result), metrics_json, time.monotonic() - started
    )
    report(1.0, "Done")


def fmt(value: Any, digits: int = 2) -> str:
    """A number for the tables ("n/a" for None / NaN)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def metrics_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per identification method: acc@1 with its interval, acc@3, F1, chance, and what the
    row rests on."""
    rows = []
    for key, s in metrics["scores"].items():
        lo, hi = s["acc1_ci95"]
        rows.append(
            {
                "method": LABELS.get(key, key),
                "acc@1 [95% CI]": f"{fmt(s['acc1'])} [{fmt(lo)}, {fmt(hi)}]",
                "acc@3": fmt(s["acc3"]),
                "F1": fmt(s["f1_weighted"]),
                "chance": fmt(s["chance"]),
                "questions": int(s["n_questions"]),
                "answers": int(s["n_records"]),
            }
        )
    return rows


def knn_note(result: ValueMapResult) -> str | None:
    """When the pipeline used fewer neighbours than asked (k is capped at the training answers per
    source)."""
    asked = int(result.info.get("pipeline", {}).get("k", 0))
    used = (result.info.get("k_neighbours") or {}).get("value")
    if not asked or used is None or used >= asked:
        return None
    return (
        f"kNN used k = {used}, not {asked}: k is capped at the training answers per source "
        "(beyond that every training answer would vote)."
    )


def held_out_caption(metrics: dict[str, Any]) -> str:
    """How many held-out questions (and answers) the scores rest on."""
    value = metrics["scores"]["head_knn"]
    splits = metrics["splits"]
    text = (
        f"The value rows rest on {plural(int(value['n_questions']), 'held-out value question')} "
        f"({plural(int(value['n_records']), 'answer')}, one per source), which the head never saw; "
        f"it was trained on {splits.get('train', 0)} questions and stopped early on "
        f"{splits.get('val', 0)}. Intervals: 95% bootstrap over the held-out questions."
    )
    control = metrics["scores"].get("head_knn_control")
    if control is not None:
        text += (
            f" The control rows rest on {plural(int(control['n_questions']), 'control question')} "
            f"({plural(int(control['n_records']), 'answer')}), scored against the answers to "
            f"{splits.get('control_index', 0)} other control questions."
        )
    return text


def small_sample_warning(n_questions: int) -> str | None:
    if n_questions >= MIN_HELD_OUT:
        return None
    return (
        f"Only {plural(n_questions, 'held-out question')}: these scores say little (a single "
        f"question moves acc@1 by {1 / max(n_questions, 1):.0%}). Use at least "
        f"{MIN_HELD_OUT * 5} value questions for {MIN_HELD_OUT} held-out ones before reading "
        "anything into them."
    )


def difference_rows(metrics: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for name, d in metrics["differences_acc1"].items():
        lo, hi = d["ci95"]
        verdict = "yes" if lo > 0 or hi < 0 else "no"
        out.append(
            {
                "comparison (acc@1)": name.replace("_", " "),
                "difference [95% CI]": f"{d['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]",
                "interval excludes 0": verdict,
            }
        )
    return out


def trajectory_rows(trajectory: dict[str, Any]) -> list[dict[str, Any]]:
    """The sweep's points in coefficient order with their distance from the unsteered source."""
    names, coeffs = trajectory["names"], trajectory["coeffs"]
    dist = iter(trajectory.get("distance_from_base", []))
    base = "distance_from_base" in trajectory
    rows = []
    for name, coeff in zip(names, coeffs, strict=True):
        row: dict[str, Any] = {"source": name, "coefficient": f"{coeff:g}"}
        if base:
            row["distance from the unsteered source"] = (
                "0 (base)" if coeff == 0.0 else fmt(next(dist, None), 3)
            )
        rows.append(row)
    return rows


def trajectory_caption(trajectory: dict[str, Any]) -> str:
    text = (
        "Spearman correlation of the coefficient with the map's first axis: "
        f"{fmt(trajectory.get('spearman_coeff_vs_axis1'))}"
    )
    if "spearman_abs_coeff_vs_distance" in trajectory:
        text += (
            "; of |coefficient| with the distance from the unsteered source (in the head's full "
            f"space): {fmt(trajectory['spearman_abs_coeff_vs_distance'])}"
        )
    return text + ". 1: the sweep moves steadily along it; n/a: too few points."


def show_result(run: ValueMapRun) -> None:
    result = run.result
    metrics = result.metrics()
    value = metrics["scores"]["head_knn"]
    lo, hi = value["acc1_ci95"]
    st.success(
        f"Who answered? The trained head's kNN acc@1 is {fmt(value['acc1'])} [{fmt(lo)}, {fmt(hi)}] "
        f"on {plural(int(value['n_questions']), 'held-out question')} "
        f"({plural(int(value['n_records']), 'answer')}); chance is {fmt(value['chance'])}."
    )
    small = small_sample_warning(int(value["n_questions"]))
    if small:
        st.warning(small)
    st.caption(
        "; ".join(f"{k}: {v}" for k, v in run.settings.items()) + f"; took {run.seconds:.0f} s"
    )
    st.plotly_chart(result.figure(), key="value_map")
    st.caption(
        "Each point is a source's mean answer embedding in the trained head's space; hover for "
        "sample answers. A line with arrows is the steering sweep in coefficient order."
    )
    st.subheader("Who answered?")
    st.dataframe(
        metrics_rows(metrics),
        hide_index=True,
        key="vm_metrics",
        column_config={k: st.column_config.Column(k, help=v) for k, v in COLUMN_HELP.items()},
    )
    st.caption(held_out_caption(metrics))
    note = knn_note(result)
    if note:
        st.caption(note)
    st.dataframe(difference_rows(metrics), hide_index=True, key="vm_differences")
    keys = list(result.scores)
    key = st.selectbox(
        "Confusion matrix of",
        keys,
        index=keys.index("head_knn"),
        format_func=lambda k: LABELS.get(k, k),
        help=HELP["confusion"],
    )
    st.plotly_chart(result.confusion(str(key)), key="vm_confusion")
    for i, trajectory in enumerate(metrics["trajectories"]):
        st.subheader("Steering sweep")
        st.dataframe(trajectory_rows(trajectory), hide_index=True, key=f"vm_trajectory_{i}")
        st.caption(trajectory_caption(trajectory))
    c1, c2 = st.columns(2)
    c1.download_button(
        "Download the value head (safetensors + json, zipped)",
        run.head_zip,
        "value_head.zip",
        "application/zip",
        key="dl_value_head",
        help="The trained head (probes.valuemap.head.ValueEmbedder) with what it was trained on "
        "and its metrics; repe.artifacts.load_artifact reads it.",
    )
    c2.download_button(
        "Download the metrics (JSON)",
        run.metrics_json,
        "value_map_metrics.json",
        "application/json",
        key="dl_value_metrics",
        help="Every score with its interval, the paired differences, the trajectory numbers and "
        "the question splits.",
    )


def render() -> None:
    state = get_state()
    st.header("Value map")
    st.caption(
        "Which values do the model's answers carry? Each source answers the same questions; a "
        "head trained on the answers' sentence embeddings learns to tell the sources apart, is "
        "scored on questions it never saw, and maps the sources in 2-D."
    )
    lm = current_model(state.model_path)
    if lm is None:
        return
    library = available_directions(state)
    request, run = request_ui(library)
    show_cancelled()
    if run:
        cancel = st.empty()
        with cancel:
            cancel_button("value map", "valuemap")
        with shown_errors("The value map"):
            run_job(lm, state, library, request)
        cancel.empty()  # the run is over: a click now would cancel nothing
    if state.valuemap is None:
        st.info("Choose the sources and questions, then press Generate and train.")
        return
    show_result(state.valuemap)
