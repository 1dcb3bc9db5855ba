"""The Streamlit app, driven headless with ``streamlit.testing.v1.AppTest`` (small settings)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # app/ is a folder of the repository, not part of the distribution
    sys.path.insert(0, str(ROOT))

from app.state import STATE_KEY, AppState, SteerSettings  # noqa: E402
from app.views.model_data import preview_rows, read_upload  # noqa: E402
from app.views.steer import display  # noqa: E402
from repe.errors import DataFormatError  # noqa: E402
from steering.spec import SteeringSpec  # noqa: E402

TIMEOUT = 300
PROMPT = "Tell me about your weekend."  # the Steer page's default prompt


def page(view: str, state: AppState | None = None) -> AppTest:
    """An AppTest running one page's ``render()``, optionally seeded with a session state."""
    script = (
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        f"from app.views import {view}\n{view}.render()\n"
    )
    at = AppTest.from_string(script, default_timeout=TIMEOUT)
    if state is not None:
        at.session_state[STATE_KEY] = state
    return at


def fresh(state: AppState) -> AppState:
    """A copy of the swept state with no generations cached."""
    return replace(state, baseline={}, steered_text="", spec=None)


def steer_button(at: AppTest) -> object:
    """The Steer page's form button that applies the setting."""
    return next(b for b in at.button if b.label == "Steer")


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


# ---- unit: uploads (no model) -------------------------------------------------------------------
def test_upload_csv_and_jsonl_parse() -> None:
    csv = b"positive,negative,label\nI am honest,I lie,a\nTruth,Falsehood,b\n"
    ds = read_upload("mine.csv", csv)
    assert len(ds) == 2 and ds.name == "mine"
    assert preview_rows(ds)[0] == {"label": "a", "positive": "I am honest", "negative": "I lie"}
    jsonl = b'{"positive": "yes", "negative": "no"}\n{"positive": "up", "negative": "down"}\n'
    assert len(read_upload("x.jsonl", jsonl)) == 2


@pytest.mark.parametrize(
    ("name", "data", "needle"),
    [
        ("bad.csv", b"pos,neg\na,b\n", "positive"),
        ("bad.jsonl", b'{"positive": "a", "negative": "b"}\nnot json\n', "2"),
        ("bad.txt", b"positive,negative\na,b\n", "unsupported"),
    ],
)
def test_upload_malformed_says_why(name: str, data: bytes, needle: str) -> None:
    with pytest.raises(DataFormatError, match=needle):
        read_upload(name, data)


# ---- pages on the embedded model -----------------------------------------------------------------
@pytest.mark.integration
def test_main_and_model_page() -> None:
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=TIMEOUT).run()
    no_errors(at)
    assert at.header[0].value == "Model & data"
    assert at.table, "the model summary table is shown"
    assert len(at.dataframe) >= 1
    assert at.radio[0].value.startswith("embedded")


@pytest.mark.integration
def test_model_page_bad_folder_is_an_error_not_a_traceback() -> None:
    at = page("model_data").run()
    at.radio[0].set_value("local folder").run()
    at.text_input[0].set_value("/nonexistent/model").run()
    assert not at.exception
    assert any("Could not load the model" in e.value for e in at.error)


@pytest.fixture(scope="module")
def swept() -> AppState:
    """The Read page after a small sweep (8 pairs, 4 layers, 2 readers, no bootstrap)."""
    at = page("read").run()
    no_errors(at)
    sliders = {s.label: s for s in at.slider}
    sliders["Max pairs (for speed)"].set_value(8)
    sliders["Layers"].set_value((10, 13))
    at.select_slider[0].set_value(0)
    at.button[0].click().run()
    no_errors(at)
    assert len(at.get("plotly_chart")) == 2, "sweep figure and PCA scatter"
    assert any("<span" in m.value for m in at.markdown), "the coloured token scan"
    state = at.session_state[STATE_KEY]
    assert state.sweep is not None and len(state.sweep.sites) == 4
    return state


@pytest.mark.integration
def test_read_page_sweep_scatter_scan(swept: AppState) -> None:
    assert set(swept.sweep.readers) == {"mean_diff", "logistic"}
    at = page("read", fresh(swept)).run()
    no_errors(at)
    at.selectbox[-1].set_value("logistic").run()  # scan with another reader
    no_errors(at)
    assert len(at.get("plotly_chart")) == 2


@pytest.mark.integration
def test_steer_page_coeff_changes_steered_not_baseline(swept: AppState) -> None:
    state = fresh(swept)
    state.steer = SteerSettings(coeff=0.0, max_new_tokens=8)  # small generations from the start
    at = page("steer", state).run()
    no_errors(at)
    assert at.multiselect[0].value, "a direction from the sweep is preselected"
    assert {"Operator", "Scale"} <= {s.label for s in at.selectbox}
    st0 = at.session_state[STATE_KEY]
    base0, steered0 = dict(st0.baseline), st0.steered_text
    assert list(base0) == [(PROMPT, 8)]
    assert steered0 == base0[(PROMPT, 8)], "coefficient 0 steers like nothing"
    coeff = next(s for s in at.slider if s.label.startswith("Coefficient"))
    coeff.set_value(0.5).run()
    no_errors(at)
    assert at.session_state[STATE_KEY].steered_text == steered0, "a slider alone starts nothing"
    coeff = next(s for s in at.slider if s.label.startswith("Coefficient"))
    coeff.set_value(0.5)
    steer_button(at).click().run()  # the form sends its widgets' values with the button
    no_errors(at)
    st1 = at.session_state[STATE_KEY]
    assert st1.baseline == base0, "the baseline does not move"
    assert st1.steered_text != steered0, "the steered answer does"
    shown = [m.value for m in at.markdown]
    assert display(base0[(PROMPT, 8)]) in shown and display(st1.steered_text) in shown, (
        "both answers side by side"
    )
    assert isinstance(st1.spec, SteeringSpec) and st1.spec.coeff == 0.5
    # the embedded model does not read A/B options: the page defaults to scoring answer texts
    assert at.radio(key="eval_form").value == "answer texts (cloze)"
    assert at.slider(key="eval_items").label == "Cloze items"
    at.radio(key="eval_form").set_value("A/B letters").run()
    assert at.slider(key="eval_items").label == "A/B items"
    at.slider(key="eval_items").set_value(4)
    at.slider(key="eval_texts").set_value(2)
    next(b for b in at.button if b.label == "Measure").click().run()
    no_errors(at)
    metrics = {m.label: m.value for m in at.metric}
    assert set(metrics) == {
        "A/B matching (base)",
        "A/B matching (steered)",
        "KL from base (nats/token)",
    }
    assert float(metrics["KL from base (nats/token)"]) > 0
    assert any("paired standard error over 4 items" in c.value for c in at.caption)
    # the embedded model picks A/B letters without reading the options: the page says what that means
    assert any("does not read A/B options" in w.value for w in at.warning)
    # scored on the answers' texts instead (cloze form): its own labels, no letter warning
    at.radio(key="eval_form").set_value("answer texts (cloze)")
    next(b for b in at.button if b.label == "Measure").click().run()
    no_errors(at)
    metrics = {m.label: m.value for m in at.metric}
    assert {"Cloze matching (base)", "Cloze matching (steered)"} <= set(metrics)
    assert any(c.value.startswith("Cloze shift") for c in at.caption)
    assert not any("does not read A/B options" in w.value for w in at.warning)
    assert at.session_state[STATE_KEY].steered_text == st1.steered_text, "no regeneration"


@pytest.mark.integration
def test_steer_page_coefficient_sweep_marks_and_applies_the_recommendation(
    swept: AppState,
) -> None:
    state = fresh(swept)
    state.steer = SteerSettings(coeff=0.0, max_new_tokens=4)
    at = page("steer", state).run()
    no_errors(at)
    assert len(at.get("plotly_chart")) == 2, (
        "the layer profile and the cosine heatmap, no sweep yet"
    )
    assert at.radio(key="sweep_form").value == "answer texts (cloze)"
    at.radio(key="sweep_form").set_value("A/B letters").run()
    at.text_input(key="sweep_coeffs").set_value("-0.5, 0.5, 1.0")
    at.slider(key="sweep_items").set_value(4)
    at.slider(key="sweep_texts").set_value(2)
    at.number_input[-1].set_value(10.0)  # KL budget: generous, so the best positive row is chosen
    next(b for b in at.button if b.label == "Run coefficient sweep").click().run()
    no_errors(at)
    report = at.session_state[STATE_KEY].coeff_sweep
    assert report is not None and report.coeffs == [-0.5, 0.0, 0.5, 1.0]
    assert report.layers == at.session_state[STATE_KEY].steer.layers
    assert len(at.get("plotly_chart")) == 3, "layer profile, cosine heatmap and the sweep curve"
    assert report.control is not None and not report.control.reads_choices
    assert any("does not read A/B options" in w.value for w in at.warning)
    rec = report.recommended
    if rec is None:  # the library found no positive shift: the page must say so
        assert not any(r.coeff > 0 and r.shift > 0 for r in report.rows)
        assert any("No setting moved" in i.value for i in at.info)
        return
    assert any(f"coefficient {rec.coeff:g}" in s.value for s in at.success)
    next(b for b in at.button if b.label == "Use the recommended setting").click().run()
    no_errors(at)
    coeff = next(s for s in at.slider if s.label.startswith("Coefficient"))
    assert coeff.value == rec.coeff
    assert at.session_state[STATE_KEY].spec.coeff == rec.coeff


def test_shift_caption_says_whether_the_shift_is_beyond_noise() -> None:
    from app.views.steer import shift_caption

    assert "beyond" in shift_caption([0.5, 0.5, 0.5, 0.5], [0.6, 0.61, 0.59, 0.6])
    assert "within" in shift_caption([0.5, 0.5, 0.5, 0.5], [0.7, 0.3, 0.62, 0.4])
    assert "+0.1000 ± 0.0041" in shift_caption([0.5] * 4, [0.6, 0.61, 0.59, 0.6])
    assert "no standard error" in shift_caption([0.5], [0.6])


def test_steer_page_bad_coefficients_are_a_message() -> None:
    from app.views.steer import parse_coeffs

    assert parse_coeffs("0.5, -0.5 0.25") == [-0.5, 0.25, 0.5]
    with pytest.raises(ValueError, match="numbers separated by commas"):
        parse_coeffs("0.5, lots")
    with pytest.raises(ValueError, match="at least one"):
        parse_coeffs(" , ")


@pytest.mark.integration
def test_export_page_download_buttons(swept: AppState) -> None:
    state = fresh(swept)
    site = swept.sweep.sites[-1]
    state.spec = SteeringSpec(swept.sweep.to_direction("mean_diff", [site]), 4.0, scale="unit")
    at = page("export", state).run()
    no_errors(at)
    # typing a name writes nothing: the files are made on the button only
    at.text_input[0].set_value("mine").run()
    no_errors(at)
    assert not at.get("download_button") and at.session_state[STATE_KEY].exports[1] == {}
    next(b for b in at.button if b.label == "Prepare the files").click().run()
    no_errors(at)
    assert len(at.get("download_button")) == 4
    assert any(
        "llama-server" in c.value and "--control-vector-scaled mine.gguf:4" in c.value
        for c in at.code
    )
    import io
    import zipfile

    zipped = at.session_state[STATE_KEY].exports[1]["safetensors"]
    assert sorted(zipfile.ZipFile(io.BytesIO(zipped)).namelist()) == [
        "mine.json",
        "mine.safetensors",
    ]
    at.text_input[0].set_value("other").run()  # a new name: the prepared files no longer match
    assert not at.get("download_button")
    assert any("prepare the files again" in i.value for i in at.info)


@pytest.mark.integration
def test_export_page_refuses_gguf_for_ablation(swept: AppState) -> None:
    state = fresh(swept)
    direction = swept.sweep.to_direction("mean_diff", [swept.sweep.sites[-1]])
    state.spec = SteeringSpec(direction, 0.0, operator="ablate", scale="unit")
    at = page("export", state).run()
    next(b for b in at.button if b.label == "Prepare the files").click().run()
    assert not at.exception
    keys = {b.key for b in at.get("download_button")}
    assert {"dl_safetensors", "dl_spec"} <= keys and "dl_gguf" not in keys
    assert any(e.value.startswith("GGUF") and "operator='add'" in e.value for e in at.error)


class _Upload:
    """What ``st.file_uploader`` hands back: a name and the bytes."""

    def __init__(self, path: Path) -> None:
        self.name, self._data = path.name, path.read_bytes()

    def getvalue(self) -> bytes:
        return self._data


@pytest.mark.integration
def test_uploaded_artifacts_load_and_steer_page_lists_them(swept: AppState, tmp_path: Path) -> None:
    from app.resources import get_model
    from app.views.steer import available_directions, load_uploaded_artifacts

    swept.sweep.to_direction("mean_diff").save(tmp_path / "honest")
    files = [_Upload(tmp_path / "honest.safetensors"), _Upload(tmp_path / "honest.json")]
    loaded = load_uploaded_artifacts(get_model(""), files)
    assert list(loaded) == ["uploaded:honest"]
    with pytest.raises(ValueError, match="honest.json"):
        load_uploaded_artifacts(get_model(""), files[:1])
    state = fresh(swept)
    state.directions = loaded
    assert "uploaded:honest" in available_directions(state)


@pytest.mark.integration
def test_steer_page_defaults_to_the_directions_best_site(swept: AppState) -> None:
    """The same default site as repe steer / repe export: the direction's best site."""
    import torch

    from app.resources import get_model
    from repe.directions import Direction

    lm = get_model("")
    g = torch.Generator().manual_seed(0)
    sites = [f"blocks.{i}.hook_resid_post" for i in (10, 11, 12, 13)]
    mine = Direction(
        {s: torch.randn(lm.d_model, generator=g) for s in sites},
        lm.identity,
        name="mine",
        best_site="blocks.10.hook_resid_post",
    ).normalized()
    state = fresh(swept)
    state.directions = {"mine": mine}
    state.steer = SteerSettings(["mine"], [1.0], coeff=0.0, max_new_tokens=4)
    at = page("steer", state).run()
    no_errors(at)
    layers = next(m for m in at.multiselect if m.label == "Layers")
    assert layers.value == [10]


# ---- Read flows into Steer (issue 13) ---------------------------------------------------------------
@pytest.mark.integration
def test_read_page_says_what_its_scores_rest_on(swept: AppState) -> None:
    """8 pairs leave 2-3 held out: the figures say so, with a warning; the scan uses the best reader;
    the best direction downloads as an artifact pair."""
    import io
    import zipfile

    best = swept.sweep.best()
    at = page("read", fresh(swept)).run()
    no_errors(at)
    success = at.success[0].value
    assert f"on {best.n_test} held-out pairs" in success and best.reader in success
    assert "no interval: bootstrap resamples = 0" in success  # the fixture swept with 0 resamples
    assert best.n_test < 10
    assert any(w.value.startswith(f"Only {best.n_test} held-out pairs") for w in at.warning)
    scan_reader = next(s for s in at.selectbox if s.label == "Direction (reader)")
    assert scan_reader.value == best.reader
    dl = at.get("download_button")
    assert len(dl) == 1
    # the download's bytes: the page builds them with direction_zip; check that helper's output
    from app.views.export import direction_zip

    name = f"{swept.sweep_concept}_{best.reader}".replace("/", "_")
    data = direction_zip(swept.sweep.to_direction(best.reader, name=name), "d")
    assert sorted(zipfile.ZipFile(io.BytesIO(data)).namelist()) == ["d.json", "d.safetensors"]


@pytest.mark.integration
def test_steer_defaults_to_reads_best_reader_and_layer(swept: AppState) -> None:
    best = swept.sweep.best()
    state = fresh(swept)
    state.steer = SteerSettings(coeff=0.0, max_new_tokens=4)
    at = page("steer", state).run()
    no_errors(at)
    assert at.multiselect[0].value == [f"{swept.sweep_concept}:{best.reader}"]
    layers = next(m for m in at.multiselect if m.label == "Layers")
    assert layers.value == [best.layer]
    assert len(at.get("plotly_chart")) == 2, (
        "the score by layer beside the layer picker, the heatmap"
    )


@pytest.mark.integration
def test_steer_with_this_on_read_sets_the_steer_page(swept: AppState) -> None:
    state = fresh(swept)
    state.steer = SteerSettings(["x"], [1.0], layers=[3], coeff=0.0, max_new_tokens=4)
    at = page("read", state).run()
    no_errors(at)
    next(b for b in at.button if b.label == "Steer with this").click().run()
    no_errors(at)
    best = swept.sweep.best()
    steer = at.session_state[STATE_KEY].steer
    assert steer.direction_names == [f"{swept.sweep_concept}:{best.reader}"]
    assert steer.layers == [best.layer]


def test_small_sample_warning_threshold() -> None:
    from app.views.read import small_sample_warning

    assert small_sample_warning(10) is None
    w = small_sample_warning(2)
    assert w is not None and "5 values" in w and "steps of 0.25" in w


def test_sweep_figure_names_its_form_and_axes() -> None:
    from steering.evaluation.sweep import SweepReport, SweepRow, sweep_figure

    rows = [
        SweepRow(3, "blocks.3.hook_resid_post", c, 0.5 + c / 10, c / 10, 0.5, abs(c) / 10, 9.0, 0.9)
        for c in (-1.0, 0.0, 1.0)
    ]
    for form, word in (("cloze", "cloze"), ("ab", "A/B")):
        report = SweepReport(
            "b", rows, 0.05, "relative", "add", "all", 8, 0.5, 9.0, None, form=form
        )
        fig = sweep_figure(report)
        titles = [a.text for a in fig.layout.annotations]
        assert any(word in t for t in titles), titles
        assert word in fig.layout.yaxis.title.text
        assert fig.layout.yaxis2.title.text == "KL (nats/token)"
        assert any("KL budget 0.05" in t for t in titles)


@pytest.mark.integration
def test_steer_page_shows_the_settings_kl_and_warns_over_budget(swept: AppState) -> None:
    from app.resources import get_model
    from repe.datasets import load_neutral
    from steering.evaluation.costs import kl_from_base

    state = fresh(swept)
    state.steer = SteerSettings(max_new_tokens=4)  # the page's default coefficient, 0.25 relative
    at = page("steer", state).run()
    no_errors(at)
    st1 = at.session_state[STATE_KEY]
    kl = kl_from_base(get_model(""), st1.spec, load_neutral()[:4])
    assert st1.setting_kl[1] == pytest.approx(kl)
    over = [w.value for w in at.warning if "over the default budget" in w.value]
    within = [c.value for c in at.caption if "within the default budget" in c.value]
    if kl > 0.1:
        assert len(over) == 1 and f"{kl:.3f} nats/token" in over[0] and not within
    else:
        assert len(within) == 1 and not over
    coeff = next(s for s in at.slider if s.label.startswith("Coefficient"))
    coeff.set_value(0.0)
    steer_button(at).click().run()
    no_errors(at)
    assert any("KL from the unsteered model at this setting: 0.000" in c.value for c in at.caption)


# ---- a reload loses nothing (app.workspace) ---------------------------------------------------------
def main_app() -> AppTest:
    return AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=TIMEOUT)


@pytest.mark.integration
def test_a_reload_reopens_the_sessions_work(swept: AppState, tmp_path: Path, monkeypatch) -> None:
    """A session's sweep, uploaded directions and Steer setting are on disk after each run; a new
    session opened with the same ``?ws=`` address (what a reload is) gets them back, and the Export
    page rebuilds the saved setting."""
    import os

    from app import workspace

    monkeypatch.setenv("REPE_WORKSPACE", str(tmp_path))
    state = fresh(swept)
    best = swept.sweep.best()
    name = f"{swept.sweep_concept}:{best.reader}"
    state.directions = {"uploaded:mine": swept.sweep.to_direction("mean_diff")}
    state.steer = SteerSettings([name], [1.0], layers=[best.layer], coeff=0.3, max_new_tokens=4)
    at = main_app()
    at.session_state[STATE_KEY] = state
    at.run()
    no_errors(at)
    ws = at.session_state[STATE_KEY].workspace
    assert workspace.valid_id(ws) and at.query_params[workspace.PARAM] in (ws, [ws])
    folder = tmp_path / ws
    assert sorted(os.listdir(folder)) == [
        "acts_neg",
        "acts_pos",
        "directions",
        "settings.json",
        "sweep",
    ]

    again = main_app()  # the reload: a new session, the same address
    again.query_params[workspace.PARAM] = ws
    again.run()
    no_errors(again)
    back = again.session_state[STATE_KEY]
    assert back.workspace == ws
    assert back.sweep is not None and back.sweep.rows() == swept.sweep.rows()
    assert back.steer == state.steer
    assert list(back.directions) == ["uploaded:mine"]
    assert back.acts_pos is not None and len(back.acts_pos) == len(swept.acts_pos)

    # the Export page of the reopened session builds the saved setting (no "choose a setting first")
    export = page("export", back).run()
    no_errors(export)
    assert not any("Choose a steering setting" in i.value for i in export.info)
    assert export.session_state[STATE_KEY].spec.coeff == 0.3

    # a damaged part is left out with a warning; the rest still loads
    (folder / "sweep" / "sweep.json").write_text("{broken", encoding="utf-8")
    third = main_app()
    third.query_params[workspace.PARAM] = ws
    third.run()
    assert not third.exception
    assert any("stored sweep could not be read" in w.value for w in third.warning)
    assert third.session_state[STATE_KEY].steer == state.steer


@pytest.mark.integration
def test_a_session_that_did_nothing_leaves_no_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("REPE_WORKSPACE", str(tmp_path))
    at = main_app().run()  # the Model & data page, nothing swept, uploaded or steered
    no_errors(at)
    assert at.session_state[STATE_KEY].workspace
    assert list(tmp_path.iterdir()) == []


def test_workspace_ids_from_the_address_are_checked(tmp_path: Path, monkeypatch) -> None:
    from app import workspace

    assert workspace.valid_id(workspace.new_id())
    for bad in ("../x", "/abs", "20261130-101010-abcde", "", None, "20261130-101010-abcdef/.."):
        assert not workspace.valid_id(bad)


@pytest.mark.integration
def test_steer_page_compares_directions_and_two_coefficients(swept: AppState) -> None:
    from app.views.compare import cosine_matrix
    from app.views.steer import available_directions

    state = fresh(swept)
    state.steer = SteerSettings(coeff=0.0, max_new_tokens=4)
    at = page("steer", state).run()
    no_errors(at)
    library = available_directions(at.session_state[STATE_KEY])
    site = f"blocks.{at.session_state[STATE_KEY].steer.layers[0]}.hook_resid_post"
    names, sims = cosine_matrix(library, site)
    assert len(names) == 2 and sims.shape == (2, 2)
    assert torch.allclose(sims.diagonal(), torch.ones(2, dtype=sims.dtype))
    assert torch.allclose(sims, sims.T)
    a, b = library[names[0]][site].double(), library[names[1]][site].double()
    assert float(sims[0, 1]) == pytest.approx(float(a @ b / (a.norm() * b.norm())))
    at.number_input(key="cmp_a").set_value(0.0)
    at.number_input(key="cmp_b").set_value(1.0)
    next(b for b in at.button if b.label == "Compare").click().run()
    no_errors(at)
    ca, cb, ta, tb = at.session_state[STATE_KEY].compared
    assert (ca, cb) == (0.0, 1.0)
    assert ta == at.session_state[STATE_KEY].baseline[(PROMPT, 4)], "coefficient 0 is the baseline"
    shown = [m.value for m in at.markdown]
    assert "**coefficient 0**" in shown and "**coefficient 1**" in shown
