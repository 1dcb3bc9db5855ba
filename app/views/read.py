"""Page 2 — Read: a layer sweep with a progress bar, accuracy/AUROC by layer, a PCA scatter, a token
scan of any text."""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from app.errors import shown_errors
from app.jobs import cancel_button, progress_bar, show_cancelled
from app.names import safe_name
from app.nav import go_to
from app.resources import current_model
from app.state import AppState, get_state
from app.views.export import direction_zip
from probes.plots import pca_scatter, sweep_figure
from probes.readers import reader_names
from probes.scan import scan, scan_html
from probes.sweep import SiteScore, split_indices, sweep
from repe.capture import capture
from repe.datasets import ContrastDataset, list_concepts, load_concept
from repe.models import LoadedModel
from repe.sites import resid_post_sites

UPLOADED = "(uploaded pairs)"


@dataclass(frozen=True)
class SweepRequest:
    concept: str
    readers: list[str]
    max_pairs: int
    layers: list[int]
    n_boot: int


def sweep_ui(lm: LoadedModel, has_upload: bool) -> tuple[SweepRequest, bool]:
    """The sweep the user asks for, and whether they pressed Run."""
    concepts = ([UPLOADED] if has_upload else []) + list_concepts()
    default = concepts.index("facts/honesty") if "facts/honesty" in concepts else 0
    concept = st.selectbox(
        "Concept",
        concepts,
        index=default,
        help="A set of contrast pairs: the same context with and without the concept.",
    )
    readers = st.multiselect(
        "Readers",
        reader_names(),
        default=["mean_diff", "logistic"],
        help="How a direction is read from the pairs. mean_diff: difference of the class means "
        "(CAA); pca_diff / pca_center: first principal component of the pair differences / of the "
        "centred activations; lat: RepE's LAT (PCA of random pair differences); logistic: a "
        "regularised linear classifier; random: a random direction (the chance baseline).",
    )
    c1, c2, c3 = st.columns(3)
    max_pairs = c1.slider(
        "Max pairs (for speed)",
        6,
        400,
        48,
        step=2,
        help="Pairs sampled from the concept set; 30% of them are held out for the scores.",
    )
    lo, hi = c2.slider(
        "Layers",
        0,
        lm.n_layers - 1,
        (0, lm.n_layers - 1),
        help="Blocks to read; each is read at its output, the residual stream "
        "(blocks.L.hook_resid_post).",
    )
    step = c3.number_input("Every n-th layer", 1, lm.n_layers, 1, help="Skip layers for speed.")
    n_boot = st.select_slider(
        "Bootstrap resamples (95% intervals)",
        [0, 100, 200, 500, 1000],
        200,
        help="Resampling the held-out pairs gives each score a 95% interval; 0 skips it.",
    )
    request = SweepRequest(concept, readers, max_pairs, list(range(lo, hi + 1, int(step))), n_boot)
    return request, st.button("Run sweep", type="primary")


def dataset_for(lm: LoadedModel, state: AppState, request: SweepRequest) -> ContrastDataset:
    if request.concept == UPLOADED and state.uploaded is not None:
        ds = state.uploaded
    else:
        ds = load_concept(request.concept, tokenizer=lm.tokenizer)
    return ds.sample(request.max_pairs) if len(ds) > request.max_pairs else ds


def run_sweep(lm: LoadedModel, state: AppState, request: SweepRequest) -> None:
    """Capture both sides and sweep, reporting progress after every batch and site (each report is a
    point where Cancel stops the run); the result goes into the session state only at the end."""
    if not request.readers:
        raise ValueError("choose at least one reader")
    report = progress_bar("Loading the pairs…")
    ds = dataset_for(lm, state, request)
    sites = resid_post_sites(request.layers)
    sides = {}
    for k, (side, texts) in enumerate((("positive", ds.positives()), ("negative", ds.negatives()))):

        def on_batch(done: int, total: int, k: int = k, side: str = side) -> None:
            report(0.05 + 0.4 * (k + done / total), f"Capturing the {side} side: {done}/{total}")

        report(0.05 + 0.4 * k, f"Capturing the {side} side of {len(ds)} pairs…")
        sides[side] = capture(
            lm, texts, sites, positions="last", batch_size=8, progress=False, on_batch=on_batch
        )
    pos, neg = sides["positive"], sides["negative"]
    report(0.85, "Fitting and scoring the readers…")
    train_idx, test_idx = split_indices(ds)
    result = sweep(
        pos,
        neg,
        train_idx,
        test_idx,
        request.readers,
        n_boot=request.n_boot,
        dataset_fingerprint=ds.fingerprint(),
        params={"dataset": ds.name, "n_pairs": len(ds), "train_frac": 0.7, "split_seed": 0},
        on_site=lambda i, n: report(0.85 + 0.15 * i / n, f"Fitting and scoring: site {i}/{n}"),
    )
    report(1.0, "Done")
    state.sweep, state.sweep_concept = result, ds.name
    state.acts_pos, state.acts_neg = pos, neg


MIN_HELD_OUT = 10  # below this many held-out pairs the scores say little


def best_message(concept: str, best: SiteScore) -> str:
    """The sweep's best reader and site, with how many held-out pairs the figures rest on and their
    95% intervals (or why there are none)."""

    def ci(interval: tuple[float, float] | None) -> str:
        return f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""

    no_ci = "" if best.auroc_ci else "; no interval: bootstrap resamples = 0"
    return (
        f"{concept}: best {best.reader} at {best.site} — AUROC {best.auroc:.3f}{ci(best.auroc_ci)}, "
        f"accuracy {best.accuracy:.3f}{ci(best.accuracy_ci)} on {best.n_test} held-out pairs "
        f"({best.n_train} for training{no_ci})"
    )


def small_sample_warning(n_test: int) -> str | None:
    """A warning when the held-out set is too small for its scores to mean much."""
    if n_test >= MIN_HELD_OUT:
        return None
    return (
        f"Only {n_test} held-out pair{'s' if n_test != 1 else ''}: AUROC can take only "
        f"{n_test * n_test + 1} values (steps of {1 / max(n_test * n_test, 1):.3g}) and a perfect "
        f"score happens by chance easily. Raise 'Max pairs' (at least {MIN_HELD_OUT} held-out "
        f"pairs, i.e. about {int(MIN_HELD_OUT / 0.3) + 1} pairs in all) before reading anything "
        "into these scores."
    )


def steer_with(state: AppState, direction_name: str, layer: int) -> None:
    """Button callback: make this direction and layer the Steer page's setting and go there."""
    state.steer.direction_names = [direction_name]
    state.steer.weights = [1.0]
    state.steer.layers = [layer]
    go_to("steer")


def render() -> None:
    state = get_state()
    st.header("Read")
    lm = current_model(state.model_path)
    if lm is None:
        return
    request, run = sweep_ui(lm, state.uploaded is not None)
    show_cancelled()
    if run:
        cancel_button("sweep", "read_sweep")
        with shown_errors("The sweep"):
            run_sweep(lm, state, request)
    result = state.sweep
    if result is None:
        st.info("Run a sweep to see the scores by layer.")
        return
    best = result.best()
    st.success(best_message(state.sweep_concept, best))
    small = small_sample_warning(best.n_test)
    if small:
        st.warning(small)
    c1, c2 = st.columns(2)
    c1.button(
        "Steer with this",
        type="primary",
        on_click=steer_with,
        args=(state, f"{state.sweep_concept}:{best.reader}", best.layer),
        help="Open Steer live with this reader's direction at its best layer.",
    )
    name = safe_name(f"{state.sweep_concept}_{best.reader}")
    c2.download_button(
        f"Download the {best.reader} direction (safetensors + json, zipped)",
        direction_zip(result.to_direction(best.reader, name=name), name),
        f"{name}.zip",
        "application/zip",
        key="dl_read_direction",
        help="The artifact pair repe steer / repe export and the Steer page's upload read.",
    )
    metric = st.radio(
        "Metric",
        ["auroc", "accuracy"],
        horizontal=True,
        help="AUROC: how well the projection ranks held-out positives above negatives (0.5 = "
        "chance). Accuracy: held-out pairs on the right side of the reader's threshold.",
    )
    st.plotly_chart(sweep_figure(result, metric))
    with st.expander("Table"):
        st.dataframe(result.rows())

    st.subheader("PCA of the two sides")
    site = st.selectbox("Site", result.sites, index=result.sites.index(best.site))
    if state.acts_pos is not None and state.acts_neg is not None:
        with shown_errors("The PCA scatter"):
            st.plotly_chart(pca_scatter(state.acts_pos, state.acts_neg, site))

    st.subheader("Token scan")
    reader = st.selectbox(
        "Direction (reader)",
        result.readers,
        index=result.readers.index(best.reader),
        help="Which fitted reader's direction to scan with (default: the sweep's best).",
    )
    text = st.text_area("Text to scan", "I told my friend the truth about what happened.")
    if text.strip():
        with shown_errors("The scan"):
            direction = result.to_direction(reader, [site])
            scanned = scan(lm, text, direction, site, center="threshold")
            st.markdown(scan_html(scanned), unsafe_allow_html=True)
            st.caption(f"{reader} at {site}: green = concept present, red = absent")
