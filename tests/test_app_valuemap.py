"""The Value map page, driven headless with ``streamlit.testing.v1.AppTest``. Generation on the embedded
model is slow on a CPU, so the runs are tiny (3 sources, 6 value questions, 8 new tokens) and the answer
cache is a scratch folder (``REPE_ANSWER_CACHE``), so every run really generates."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # app/ is a folder of the repository, not part of the distribution
    sys.path.insert(0, str(ROOT))

from app.resources import ANSWER_CACHE_ENV  # noqa: E402
from app.state import STATE_KEY, AppState  # noqa: E402
from app.views.valuemap import (  # noqa: E402
    ValueMapRequest,
    check_request,
    load_question_file,
)
from repe.errors import DataFormatError  # noqa: E402

TIMEOUT = 300
TINY = ["assistant", "traditionalist", "free_spirit"]
LAYER = 12


def page(state: AppState | None = None) -> AppTest:
    """An AppTest running the Value map page's ``render()``, optionally seeded with a session state."""
    script = (
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from app.views import valuemap\nvaluemap.render()\n"
    )
    at = AppTest.from_string(script, default_timeout=TIMEOUT)
    if state is not None:
        at.session_state[STATE_KEY] = state
    return at


def widget(items: object, label: str) -> object:
    return next(w for w in items if w.label == label)  # type: ignore[attr-defined]


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def tiny(at: AppTest, personas: list[str], questions: int = 6, tokens: int = 8) -> AppTest:
    """Set the page's widgets to a tiny setting (no control set: its default)."""
    widget(at.multiselect, "Personas (sources)").set_value(personas)  # type: ignore[attr-defined]
    widget(at.number_input, "Number of value questions").set_value(questions)  # type: ignore[attr-defined]
    widget(at.number_input, "Answer length (new tokens)").set_value(tokens)  # type: ignore[attr-defined]
    assert widget(at.checkbox, "Add the control set").value is False  # type: ignore[attr-defined]
    return at


def generate(at: AppTest) -> AppTest:
    return widget(at.button, "Generate and train").click().run()  # type: ignore[attr-defined, no-any-return]


@pytest.fixture(autouse=True)
def scratch_answer_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "answers"
    monkeypatch.setenv(ANSWER_CACHE_ENV, str(folder))
    return folder


@pytest.fixture(scope="module")
def with_direction() -> AppState:
    """A session holding one uploaded direction (a seeded random unit vector at block 12) for the
    steering sweep."""
    from app.resources import get_model
    from repe.directions import Direction

    lm = get_model("")  # the same cached model the pages use
    v = torch.nn.functional.normalize(
        torch.randn(lm.identity.d_model, generator=torch.Generator().manual_seed(3)), dim=0
    )
    d = Direction({f"blocks.{LAYER}.hook_resid_post": v}, lm.identity, name="plus")
    return AppState(directions={"uploaded:plus": d})


# ---- unit: no model --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (ValueMapRequest(personas=[]), "choose at least one persona"),
        (ValueMapRequest(personas=TINY[:2]), "at least 3 sources"),
        (ValueMapRequest(TINY[:1], direction="d", layer=1, coeffs="0.1, x"), "must be numbers"),
        (ValueMapRequest(TINY[:2], direction="d", layer=1, coeffs="0, 0.2"), "leave 0 out"),
    ],
)
def test_check_request_says_what_is_wrong(request_: ValueMapRequest, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        check_request(request_)


def test_check_request_counts_sweep_coefficients_as_sources() -> None:
    assert check_request(ValueMapRequest(TINY[:1], direction="d", layer=1, coeffs="-0.1 0.1")) == [
        -0.1,
        0.1,
    ]
    assert check_request(ValueMapRequest(TINY, coeffs="not read without a direction")) == []


def test_question_file_upload_and_its_errors_name_the_upload() -> None:
    qs = load_question_file(
        "mine.jsonl", b'{"question": "Is honesty best?"}\n{"question": "Why?"}\n'
    )
    assert qs.name == "mine" and qs.ids() == ["mine/1", "mine/2"]
    with pytest.raises(DataFormatError) as err:
        load_question_file("mine.jsonl", b'{"question": "a"}\nnot json\n')
    message = str(err.value)
    assert message.startswith("mine.jsonl:2:") and "\n" not in message, message
    assert "/tmp" not in message


# ---- the page on the embedded model ------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.usefixtures("one_torch_thread")
def test_value_map_page_renders() -> None:
    at = page().run()
    no_errors(at)
    assert at.header[0].value == "Value map"
    assert widget(at.multiselect, "Personas (sources)").value == [  # type: ignore[attr-defined]
        "assistant",
        "traditionalist",
        "free_spirit",
        "altruist",
    ]
    assert widget(at.number_input, "Number of value questions").value == 24  # type: ignore[attr-defined]
    assert widget(at.number_input, "Answer length (new tokens)").value == 32  # type: ignore[attr-defined]
    assert any("Generate and train" in i.value for i in at.info)
    assert any("none available" in c.value for c in at.caption), "no direction: no sweep offered"
    for w in [*at.multiselect, *at.number_input, *at.checkbox, *at.selectbox, *at.button]:
        assert w.help, f"{w.label!r} has no help text"


@pytest.mark.integration
@pytest.mark.usefixtures("one_torch_thread")
def test_tiny_value_map_shows_map_confusion_and_metrics(scratch_answer_cache: Path) -> None:
    at = generate(tiny(page().run(), TINY))
    no_errors(at)
    state = at.session_state[STATE_KEY]
    assert state.valuemap is not None
    assert len(at.get("plotly_chart")) == 2, "the value map and the confusion matrix"
    table = at.dataframe[0].value
    assert list(table.columns) == [
        "method",
        "acc@1 [95% CI]",
        "acc@3",
        "F1",
        "chance",
        "questions",
        "answers",
    ]
    assert "trained head, kNN" in set(table["method"])
    assert set(table["chance"]) == {"0.33"}
    # 6 questions -> 1 held out (3 answers): the captions say so and warn
    captions = " ".join(c.value for c in at.caption)
    assert "rest on 1 held-out value question (3 answers, one per source)" in captions
    assert "kNN used k = 4, not 50" in captions  # 4 training questions: 4 answers per source
    assert any("Only 1 held-out question" in w.value for w in at.warning)
    assert "held-out question" in at.success[0].value
    assert len(at.get("download_button")) == 2
    metrics = json.loads(state.valuemap.metrics_json)
    assert set(metrics["scores"]) >= {"head_knn", "frozen_knn", "tfidf_knn"}
    assert state.valuemap.head_zip[:2] == b"PK"
    assert list(scratch_answer_cache.glob("*.jsonl")), "the answers went to the scratch cache"
    # another method's confusion matrix
    widget(at.selectbox, "Confusion matrix of").set_value("tfidf_knn").run()  # type: ignore[attr-defined]
    no_errors(at)
    assert len(at.get("plotly_chart")) == 2


@pytest.mark.integration
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(
    ("personas", "coeffs", "needle"),
    [
        ([], None, "choose at least one persona"),
        (TINY[:2], None, "at least 3 sources"),
        (TINY, "0.1, lots", "coefficients must be numbers separated by commas"),
    ],
)
def test_bad_input_is_a_one_line_error(
    with_direction: AppState, personas: list[str], coeffs: str | None, needle: str
) -> None:
    at = tiny(page(AppState(directions=dict(with_direction.directions))).run(), personas)
    if coeffs is not None:
        widget(at.selectbox, "Steering sweep").set_value("uploaded:plus").run()  # type: ignore[attr-defined]
        widget(at.text_input, "Coefficients (relative scale)").set_value(coeffs)  # type: ignore[attr-defined]
    generate(at)
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1
    message = at.error[0].value
    assert message.startswith("The value map failed: ") and needle in message, message
    assert "\n" not in message and "Traceback" not in message
    assert at.session_state[STATE_KEY].valuemap is None
    assert not at.get("plotly_chart")


@pytest.mark.integration
@pytest.mark.usefixtures("one_torch_thread")
def test_a_steering_sweep_is_a_trajectory_on_the_map_with_the_control_set(
    with_direction: AppState,
) -> None:
    at = page(AppState(directions=dict(with_direction.directions))).run()
    tiny(at, ["assistant", "altruist"])
    widget(at.checkbox, "Add the control set").check().run()  # type: ignore[attr-defined]
    widget(at.number_input, "Number of control questions").set_value(4)  # type: ignore[attr-defined]
    widget(at.selectbox, "Steering sweep").set_value("uploaded:plus").run()  # type: ignore[attr-defined]
    assert widget(at.selectbox, "Layer").value == LAYER  # type: ignore[attr-defined]
    widget(at.text_input, "Coefficients (relative scale)").set_value("0.5, 1")  # type: ignore[attr-defined]
    generate(at)
    no_errors(at)
    run = at.session_state[STATE_KEY].valuemap
    assert run is not None and "uploaded:plus at layer 12" in run.settings["sweep"]
    points = at.dataframe[-1].value
    assert list(points["source"]) == ["assistant", "plus@L12+0.5", "plus@L12+1"]
    assert list(points["distance from the unsteered source"])[0] == "0 (base)"
    assert any("Spearman correlation of the coefficient" in c.value for c in at.caption)
    # the control set: half of its 4 questions index the kNN, the other half are scored
    assert "trained head, kNN, control questions" in set(at.dataframe[0].value["method"])
    captions = " ".join(c.value for c in at.caption)
    assert "control rows rest on 2 control questions (8 answers)" in captions
    assert "4 control questions" in run.settings["control"]
    (trajectory,) = json.loads(run.metrics_json)["trajectories"]
    assert trajectory["coeffs"] == [0.0, 0.5, 1.0]
