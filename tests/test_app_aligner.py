"""The Aligner page, driven headless with ``streamlit.testing.v1.AppTest`` on the embedded model, in a
tiny setting (the form task, N = 1, 8 training and 4 held-out questions, one epoch, no vector or LoRA):
train, read the table, toggle the Aligner on a prompt, download its spec, and find the Aligner again
after a reload (the workspace)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # app/ is a folder of the repository, not part of the distribution
    sys.path.insert(0, str(ROOT))

from app.state import STATE_KEY, AppState  # noqa: E402

TIMEOUT = 600
SUCCESS = "held-out success (answer opens with the phrase)"
COLUMNS = ["model", "parameters", SUCCESS, "KL on neutral text", "perplexity ratio"]


def page(state: AppState | None = None) -> AppTest:
    script = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom app.views import aligner\naligner.render()\n"
    at = AppTest.from_string(script, default_timeout=TIMEOUT)
    if state is not None:
        at.session_state[STATE_KEY] = state
    return at


def widget(items: object, label: str) -> object:
    return next(w for w in items if w.label == label)  # type: ignore[attr-defined]


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_the_table_has_one_row_per_model_with_change_and_interval() -> None:
    from app.views.aligner import table

    change = {"mean": 0.5, "lo": 0.25, "hi": 0.75}
    result = {
        "metric": "success",
        "base": {"neutral_perplexity": 12.0, "success": 0.0},
        "aligner": {
            "parameters": 828,
            "success": 0.5,
            "success_change": change,
            "neutral_kl": 0.01,
            "perplexity_ratio": 1.02,
        },
        "lora": {
            "parameters": 122880,
            "success": 1.0,
            "success_change": {"mean": 1.0, "lo": 1.0, "hi": 1.0},
            "neutral_kl": 0.2,
            "perplexity_ratio": 1.5,
        },
    }
    rows = table(result)
    assert [r["model"] for r in rows] == ["base model", "Aligner", "LoRA"]
    assert list(rows[0]) == COLUMNS
    assert rows[0]["parameters"] == 0 and rows[0][SUCCESS] == "0.000"
    assert rows[0]["KL on neutral text"] == 0.0 and rows[0]["perplexity ratio"] == 1.0
    assert rows[1]["parameters"] == 828
    assert rows[1][SUCCESS] == "0.500 (change +0.500, 95% CI +0.250 to +0.750)"
    assert rows[2]["parameters"] == 122880 and rows[2]["perplexity ratio"] == 1.5
    margin = table({**result, "metric": "margin", "base": {"margin": -0.25}})
    assert list(margin[0])[2] == "held-out margin (chosen - rejected log-lik.)"
    assert len(margin) == 3 and margin[1]["held-out margin (chosen - rejected log-lik.)"] is None


@pytest.fixture(scope="module")
def trained() -> AppState:
    at = page().run()
    no_errors(at)
    assert at.title[0].value == "Aligner: a few global tokens that align form and values"
    widget(at.selectbox, "Task").set_value("form")  # type: ignore[attr-defined]
    widget(at.selectbox, "N tokens").set_value(1)  # type: ignore[attr-defined]
    widget(at.number_input, "Training size").set_value(8)  # type: ignore[attr-defined]
    widget(at.number_input, "Held-out size").set_value(4)  # type: ignore[attr-defined]
    widget(at.number_input, "Epochs").set_value(1)  # type: ignore[attr-defined]
    assert not widget(at.checkbox, "Also a steering vector").value  # type: ignore[attr-defined]
    assert not widget(at.checkbox, "Also a LoRA").value  # type: ignore[attr-defined]
    next(b for b in at.button if b.label == "Train Aligner").click().run()
    no_errors(at)
    state = at.session_state[STATE_KEY]
    assert state.aligner is not None
    return state


@pytest.mark.integration
def test_the_page_trains_an_aligner_and_shows_base_and_aligner(trained: AppState) -> None:
    panel = trained.aligner
    r = panel.result
    assert "artifact" not in r and "vector" not in r and "lora" not in r
    assert r["metric"] == "success"
    assert (r["run"]["task"], r["run"]["n_tokens"], r["run"]["start_layer"]) == ("form", 1, 2)
    assert (r["run"]["train"], r["run"]["held"], r["run"]["epochs"]) == (8, 4, 1)
    assert r["aligner"]["training"]["steps"] >= 1
    assert panel.aligner.n_parameters == 828 == r["aligner"]["parameters"]
    assert float(panel.aligner.gates.abs().max()) > 0  # trained: the gates left zero
    at = page(trained).run()
    no_errors(at)
    (df,) = at.dataframe
    assert list(df.value.columns) == COLUMNS
    assert list(df.value["model"]) == ["base model", "Aligner"]
    assert list(df.value["parameters"]) == [0, 828]
    base, al = df.value.to_dict("records")
    assert base[SUCCESS] == f"{r['base']['success']:.3f}"
    assert base["KL on neutral text"] == 0.0 and base["perplexity ratio"] == 1.0
    ch = r["aligner"]["success_change"]
    assert al[SUCCESS] == (
        f"{r['aligner']['success']:.3f} (change {ch['mean']:+.3f}, 95% CI {ch['lo']:+.3f} to "
        f"{ch['hi']:+.3f})"
    )
    assert al["KL on neutral text"] == pytest.approx(r["aligner"]["neutral_kl"])
    assert al["KL on neutral text"] > 0
    (dl,) = at.download_button
    assert dl.label == "Download the Aligner spec (JSON)"
    assert any(
        "llama.cpp's control-vector format cannot carry an Aligner" in c.value for c in at.caption
    )


@pytest.mark.integration
def test_the_spec_download_is_the_aligners_json(trained: AppState, tmp_path: Path) -> None:
    import torch

    from app.views.aligner import spec_json
    from steering.aligner import Aligner

    al = trained.aligner.aligner
    data = spec_json(al)
    spec = json.loads(data)
    assert spec["kind"] == "repe-aligner-spec" and spec["params"]["task"] == "form"
    assert spec["aligner"]["n_parameters"] == 828 and spec["blocks"][0] == 2
    (tmp_path / "spec.json").write_bytes(data)
    back = Aligner.from_spec(tmp_path / "spec.json")
    assert torch.equal(back.tokens, al.tokens.detach().float().cpu())
    assert torch.equal(back.gates, al.gates.detach().float().cpu())


@pytest.mark.integration
def test_toggling_the_aligner_compares_with_and_without(trained: AppState) -> None:
    from app.resources import get_model
    from steering.generate import GenerationConfig, generate

    at = page(trained).run()
    widget(at.slider, "New tokens").set_value(8)  # type: ignore[attr-defined]
    next(b for b in at.button if b.label == "Generate").click().run()
    no_errors(at)
    panel = at.session_state[STATE_KEY].aligner
    lm = get_model("")
    cfg = GenerationConfig(max_new_tokens=8)
    base = generate(lm, [panel.prompt], None, cfg)[0]
    on = generate(lm, [panel.prompt], panel.aligner, cfg)[0]
    assert panel.outputs == (base, on)
    assert base.strip() and on.strip()
    shown = [t.value for t in at.text]
    assert base in shown and on in shown
    at.toggle[0].set_value(False)
    next(b for b in at.button if b.label == "Generate").click().run()
    no_errors(at)
    assert at.session_state[STATE_KEY].aligner.outputs == (base, None)
    assert any(t.value == "(Aligner off)" for t in at.text)


@pytest.mark.integration
def test_a_reload_reopens_the_aligner(trained: AppState, tmp_path: Path, monkeypatch) -> None:
    import torch

    from app import workspace
    from app.state import AppState

    monkeypatch.setenv("REPE_WORKSPACE", str(tmp_path))
    state = AppState(workspace=workspace.new_id(), aligner=trained.aligner)
    workspace.save(state)
    assert (tmp_path / state.workspace / "aligner" / "result.json").is_file()
    back = AppState(workspace=state.workspace)
    assert workspace.load(back) == []
    assert back.aligner is not None and back.aligner.result == trained.aligner.result
    assert back.aligner.aligner.n_parameters == 828
    assert torch.equal(back.aligner.aligner.tokens, trained.aligner.aligner.tokens.float().cpu())
    assert torch.equal(back.aligner.aligner.gates, trained.aligner.aligner.gates.float().cpu())
    (tmp_path / state.workspace / "aligner" / "result.json").write_text("{broken")
    again = AppState(workspace=state.workspace)
    warnings = workspace.load(again)
    assert again.aligner is None and any("Aligner could not be read" in w for w in warnings)
