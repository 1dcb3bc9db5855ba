"""The Studies page: the runs that ``repe study run`` wrote (``OUTPUT/NAME/runs/<run id>/``), read
from their folders (``app.studyruns``): a table of runs, one run's provenance, warnings, steps,
figures and metrics, its ``report.html`` (download, or shown in the page), two runs compared metric by
metric, and the built-in studies with the command that runs each. The page runs nothing itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import plotly.io as pio
import streamlit as st
import streamlit.components.v1 as components

from app.studyruns import (
    RunList,
    RunReadError,
    builtin_studies,
    default_root,
    diff_runs,
    differing,
    figure_files,
    find_runs,
    metric_rows,
    provenance,
    read_metrics,
    run_rows,
    step_info,
    step_rows,
)

REPORT_HEIGHT = 900  # pixels of the embedded report (it scrolls inside)


def label(rec: dict[str, Any], root: Path) -> str:
    """A run as its folder below the runs folder (``NAME/runs/<run id>``: unique, unlike a copied
    record's own run id) and its status."""
    run_dir = Path(rec["_dir"])
    where = run_dir.relative_to(root) if run_dir.is_relative_to(root) else run_dir
    return f"{where} · {rec.get('status')}"


def runs_ui() -> RunList:
    """The runs folder and the table of its runs."""
    root = st.text_input(
        "Runs folder",
        value=default_root(),
        key="studies_root",
        help="Where `repe study run` wrote its runs (a study's `output`, default `study-runs` in "
        "the folder it was started from); REPE_STUDY_RUNS sets this default. Every "
        "`.../runs/<run id>/record.json` below it is listed.",
    )
    st.button("Read the folder again", key="studies_reload", help="e.g. while a study runs")
    found = find_runs(root.strip())
    if not found.exists:
        st.info(
            f"There is no folder {found.root}. Run a study first (`repe study run NAME`, below), "
            "or type the folder its runs went to."
        )
        return found
    for line in found.broken:
        st.error(line)
    if not found.runs:
        st.info(f"No study runs in {found.root} (no `.../runs/<run id>/record.json` below it).")
        return found
    st.write(f"{len(found.runs)} run{'s' if len(found.runs) != 1 else ''} in `{found.root}`")
    st.dataframe(run_rows(found.runs), hide_index=True)
    return found


def status_ui(rec: dict[str, Any]) -> None:
    status, error = rec.get("status"), rec.get("error")
    if status == "complete":
        return
    if status == "running":
        st.info(
            "Still running (or stopped without closing its record): the steps so far are shown."
        )
    else:
        st.warning(
            f"This run is {status}" + (f": {error}" if error else "") + ". Running the study again "
            "resumes it (finished steps come from the cache)."
        )


def step_ui(run_dir: Path, step_id: str, metrics: dict[str, Any]) -> None:
    """One step: its summary and tables, its figures, its numeric metrics."""
    try:
        info = step_info(run_dir, step_id)
    except RunReadError as exc:
        st.error(str(exc))
        return
    if info.get("summary"):
        st.write(str(info["summary"]))
    for item in info.get("tables") or []:
        if isinstance(item, (list, tuple)) and len(item) == 2:
            st.markdown(f"**{item[0]}**\n\n{item[1]}")
    for name, path in figure_files(run_dir, step_id, info.get("figures") or ()):
        try:
            fig = pio.from_json(path.read_text(encoding="utf-8"))
        except Exception as exc:  # noqa: BLE001 - one bad figure is one line; the rest still show
            st.error(f"{path}: unreadable figure ({' '.join(str(exc).split())[:200]})")
            continue
        st.plotly_chart(fig, key=f"studies_fig:{step_id}:{name}")
    rows = metric_rows(metrics.get(step_id, {}))
    if rows:
        st.markdown(f"**Metrics** ({len(rows)} numbers)")
        st.dataframe(rows, hide_index=True)
    else:
        st.caption("No numeric metrics for this step.")
    if info.get("n_samples"):
        st.caption(f"{info['n_samples']} per-sample rows in `samples/{step_id}.jsonl`.")
    if info.get("html"):
        st.caption("This step has more in the report (below).")


def embed(page: str) -> None:
    """A whole HTML page in a fixed-height frame that scrolls inside (``st.iframe`` where this
    Streamlit has it: it deprecates ``components.v1.html``)."""
    frame = getattr(st, "iframe", None)
    if frame is not None:
        frame(page, height=REPORT_HEIGHT)
    else:
        components.html(page, height=REPORT_HEIGHT, scrolling=True)


def report_ui(run_dir: Path, rec: dict[str, Any]) -> None:
    path = run_dir / "report.html"
    if not path.is_file():
        st.info("This run has no report.html yet: the runner writes it when the run ends.")
        return
    data = path.read_bytes()
    run_id = run_dir.name
    st.download_button(
        "Download report.html",
        data,
        f"{rec.get('study')}-{run_id}.html",
        "text/html",
        key="studies_report_download",
        help="One self-contained file (plotly inlined): opens in any browser, without the app.",
    )
    if st.toggle(
        f"Show the report here ({len(data) / 1e6:.1f} MB)",
        value=False,
        key="studies_report_show",
    ):
        embed(data.decode("utf-8", errors="replace"))


def run_ui(rec: dict[str, Any]) -> None:
    """One run: status, provenance, warnings, steps, per-step figures and metrics, the report."""
    run_dir = Path(rec["_dir"])
    st.subheader(f"{rec.get('study')}: run {run_dir.name}")
    if rec.get("description"):
        st.caption(str(rec["description"]))
    status_ui(rec)
    st.table(provenance(rec))
    for w in rec.get("warnings") or []:
        st.warning(str(w))
    st.markdown("**Steps**")
    rows = step_rows(rec)
    if not rows:
        st.info("The record lists no steps.")
        return
    st.dataframe(rows, hide_index=True)
    try:
        metrics = read_metrics(run_dir)
    except RunReadError as exc:
        st.error(str(exc))
        metrics = {}
    ids = [str(r["step"]) for r in rows]
    for tab, step_id in zip(st.tabs(ids), ids, strict=True):
        with tab:
            step_ui(run_dir, step_id, metrics)
    st.markdown("**Report**")
    report_ui(run_dir, rec)


def compare_ui(rec: dict[str, Any], runs: list[dict[str, Any]], root: Path) -> None:
    st.subheader("Compare with another run")
    others = {r["_dir"]: r for r in runs if r["_dir"] != rec["_dir"]}
    if not others:
        st.caption("Only one run here: nothing to compare with.")
        return
    other = st.selectbox(
        "Second run",
        list(others),
        index=None,
        format_func=lambda d: label(others[d], root),
        placeholder="Pick a run to compare with",
        key="studies_compare",
    )
    if other is None:
        return
    try:
        rows = diff_runs(rec["_dir"], other)
    except RunReadError as exc:
        st.error(str(exc))
        return
    changed = differing(rows)
    st.write(
        f"{len(rows)} metrics; {len(changed)} differ"
        + (" (identical metrics)" if rows and not changed else "")
    )
    if changed:
        st.dataframe(
            [
                {
                    "metric": r["metric"],
                    "this run": r["a"],
                    "second run": r["b"],
                    "second - this": r["delta"],
                }
                for r in changed
            ],
            hide_index=True,
        )


def builtin_ui() -> None:
    st.subheader("Built-in studies")
    st.caption(
        "Run one from a terminal; its runs then appear above (in `study-runs` under the folder "
        "you started it from, unless the study's `output` says otherwise). Finished steps are "
        "cached, and an interrupted run resumes where it stopped."
    )
    rows = builtin_studies()
    if rows:
        st.dataframe(rows, hide_index=True)
    else:
        st.caption("No built-in study files found.")
    st.code(
        "repe study run NAME            # or a path to your own study TOML\nrepe study list", "bash"
    )


def render() -> None:
    st.title("Studies")
    st.caption(
        "The runs that `repe study run` wrote: what each was made with, its steps, figures, metrics "
        "and report. This page only reads them: studies take minutes, so the command line runs them."
    )
    found = runs_ui()
    if found.runs:
        by_dir = {r["_dir"]: r for r in found.runs}
        chosen = st.selectbox(
            "Run",
            [r["_dir"] for r in found.runs],
            format_func=lambda d: label(by_dir[d], found.root),
            key="studies_run",
        )
        if chosen is not None and chosen in by_dir:
            run_ui(by_dir[chosen])
            compare_ui(by_dir[chosen], found.runs, found.root)
    builtin_ui()
