"""The RAHF page, driven headless with ``streamlit.testing.v1.AppTest`` on the embedded model, in a tiny
setting (4 training and 4 held-out refusal pairs, one epoch): train, read the held-out table, toggle the
adapter on a prompt, and find the adapter again after a reload (the workspace)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # app/ is a folder of the repository, not part of the distribution
    sys.path.insert(0, str(ROOT))

from app.state import STATE_KEY, AppState  # noqa: E402

TIMEOUT = 600


def page(state: AppState | None = None) -> AppTest:
    script = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom app.views import rahf\nrahf.render()\n"
    at = AppTest.from_string(script, default_timeout=TIMEOUT)
    if state is not None:
        at.session_state[STATE_KEY] = state
    return at


def widget(items: object, label: str) -> object:
    return next(w for w in items if w.label == label)  # type: ignore[attr-defined]


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


@pytest.fixture(scope="module")
def trained() -> AppState:
    at = page().run()
    no_errors(at)
    widget(at.multiselect, "Preference pairs (CAA behaviours in cloze form)").set_value(["refusal"])  # type: ignore[attr-defined]
    widget(at.number_input, "Training pairs per behaviour").set_value(4)  # type: ignore[attr-defined]
    widget(at.number_input, "Held-out pairs per behaviour").set_value(4)  # type: ignore[attr-defined]
    next(b for b in at.button if b.label == "Train adapter").click().run()
    no_errors(at)
    state = at.session_state[STATE_KEY]
    assert state.rahf is not None
    return state


@pytest.mark.integration
def test_the_page_trains_an_adapter_and_shows_adapter_and_vector(trained: AppState) -> None:
    m = trained.rahf.metrics
    assert m["train_pairs"] == 4 and m["held_out_pairs"] == 4
    assert m["training"]["steps"] >= 1
    assert any(float(b.abs().max()) > 0 for b in trained.rahf.adapter.b.values())
    # the vector was matched to the adapter's cost
    assert m["vector"]["neutral_kl"] == pytest.approx(m["adapter"]["neutral_kl"], rel=0.05)
    at = page(trained).run()
    no_errors(at)
    (df,) = at.dataframe
    assert list(df.value.columns) == ["measure", "base model", "adapter", "vector"]
    assert len(df.value) == 5


@pytest.mark.integration
def test_toggling_the_adapter_compares_with_and_without(trained: AppState) -> None:
    from app.resources import get_model
    from steering.generate import GenerationConfig, generate

    at = page(trained).run()
    widget(at.slider, "New tokens").set_value(8)  # type: ignore[attr-defined]
    next(b for b in at.button if b.label == "Generate").click().run()
    no_errors(at)
    panel = at.session_state[STATE_KEY].rahf
    lm = get_model("")
    cfg = GenerationConfig(max_new_tokens=8)
    base = generate(lm, [panel.prompt], None, cfg)[0]
    on = generate(lm, [panel.prompt], panel.adapter, cfg)[0]
    assert panel.outputs == (base, on)
    at.toggle[0].set_value(False)
    next(b for b in at.button if b.label == "Generate").click().run()
    no_errors(at)
    assert at.session_state[STATE_KEY].rahf.outputs == (base, None)
    assert any(t.value == "(adapter off)" for t in at.text)


@pytest.mark.integration
def test_a_reload_reopens_the_adapter(trained: AppState, tmp_path: Path, monkeypatch) -> None:
    import torch

    from app import workspace
    from app.state import AppState

    monkeypatch.setenv("REPE_WORKSPACE", str(tmp_path))
    state = AppState(workspace=workspace.new_id(), rahf=trained.rahf)
    workspace.save(state)
    assert (tmp_path / state.workspace / "rahf" / "metrics.json").is_file()
    back = AppState(workspace=state.workspace)
    assert workspace.load(back) == []
    assert back.rahf is not None and back.rahf.metrics == trained.rahf.metrics
    for k, b in trained.rahf.adapter.b.items():
        assert torch.equal(back.rahf.adapter.b[k], b.float())
    (tmp_path / state.workspace / "rahf" / "metrics.json").write_text("{broken")
    again = AppState(workspace=state.workspace)
    warnings = workspace.load(again)
    assert again.rahf is None and any("RAHF adapter could not be read" in w for w in warnings)
