"""The Studies page, driven headless with ``streamlit.testing.v1.AppTest`` on real runs of a tiny study
(the study runner on the tiny model): the page lists the runs, opens one (provenance, warnings,
steps, figures, metrics, the report), compares two, lists the built-in studies with their command,
says so when the folder is missing or empty, and a damaged run is one line of error while the rest
still shows. The page reads run folders with plain JSON; a test checks that it reads them as the
runner does (``studies.runner.list_runs`` / ``flat_metrics`` / ``diff_runs``)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # app/ is a folder of the repository, not part of the distribution
    sys.path.insert(0, str(ROOT))

from app import studyruns  # noqa: E402

TIMEOUT = 60
RUN_COLUMNS = [
    "study",
    "run id",
    "status",
    "started",
    "commit",
    "total time (s)",
    "steps",
    "computed",
    "cached",
]
# tests/test_study_runner.py's study: two probes and a scan on the tiny model
STUDY = """\
[study]
name = "tiny_demo"
description = "two probes and a scan on the tiny model"
model = "tiny"
seed = 3

[[steps]]
id = "honesty"
kind = "probe"
concept = "facts/honesty"
n_pairs = 24
readers = ["mean_diff", "logistic"]
n_boot = 50

[[steps]]
id = "scan"
kind = "scan"
direction = "honesty"
n_facts = 2

[[steps]]
id = "happy"
kind = "probe"
concept = "emotions/happiness"
n_pairs = 16
readers = ["mean_diff"]
n_boot = 50
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three runs in one folder: ``first`` (every step computed), ``same`` (the same study again:
    every step from the cache, identical metrics) and ``changed`` (the happiness probe on 14 pairs:
    only that step recomputed)."""
    from studies.runner import run_study
    from studies.spec import loads

    out = tmp_path_factory.mktemp("study-runs")
    text = STUDY.replace("seed = 3", f'seed = 3\noutput = "{out}"')
    first = run_study(loads(text, "tiny.toml"), progress=False)
    same = run_study(loads(text, "tiny.toml"), progress=False)
    changed = run_study(
        loads(text.replace("n_pairs = 16", "n_pairs = 14"), "tiny.toml"), progress=False
    )
    assert (first.computed, same.cached, changed.computed) == (
        ["honesty", "scan", "happy"],
        ["honesty", "scan", "happy"],
        ["happy"],
    )
    return {
        "root": out,
        "first": str(first.run_dir),
        "same": str(same.run_dir),
        "changed": str(changed.run_dir),
    }


def page() -> AppTest:
    script = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom app.views import studies\nstudies.render()\n"
    return AppTest.from_string(script, default_timeout=TIMEOUT)


def opened(root: Path | str, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv(studyruns.RUNS_ENV, str(root))
    at = page().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def widget(items: object, label: str) -> Any:
    return next(w for w in items if w.label == label)  # type: ignore[attr-defined]


def texts(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown] + [c.value for c in at.caption]


def record(run_dir: str) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "record.json").read_text(encoding="utf-8"))


def test_the_page_reads_runs_as_the_runner_does(runs: dict[str, Any]) -> None:
    from studies import runner, spec

    found = studyruns.find_runs(runs["root"])
    assert found.exists and found.broken == []
    assert [r["_dir"] for r in found.runs] == [r["_dir"] for r in runner.list_runs(runs["root"])]
    metrics = json.loads((Path(runs["first"]) / "metrics.json").read_text(encoding="utf-8"))
    assert studyruns.flat_metrics(metrics) == runner.flat_metrics(metrics)
    assert len(studyruns.flat_metrics(metrics)) > 50
    for a, b in (("first", "changed"), ("first", "same")):
        assert studyruns.diff_runs(runs[a], runs[b]) == runner.diff_runs(runs[a], runs[b])
    assert [r["study"] for r in studyruns.builtin_studies()] == list(spec.builtin_studies())


def test_the_app_lists_the_studies_page(runs: dict[str, Any], monkeypatch) -> None:
    from app import nav

    monkeypatch.setenv(studyruns.RUNS_ENV, str(runs["root"]))
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=TIMEOUT)
    at.session_state[nav.REQUESTED] = "studies"  # open it the way a page button does
    at.run()
    no_errors(at)
    assert nav.PAGES["studies"].title == "Studies"
    assert [t.value for t in at.title] == ["Studies"]


def test_the_page_lists_the_runs_newest_first(runs: dict[str, Any], monkeypatch) -> None:
    at = opened(runs["root"], monkeypatch)
    no_errors(at)
    assert widget(at.text_input, "Runs folder").value == str(runs["root"])
    assert f"3 runs in `{runs['root']}`" in texts(at)
    assert any("This page only reads them" in c for c in texts(at))
    table = at.dataframe[0].value
    assert list(table.columns) == RUN_COLUMNS
    from studies.runner import list_runs

    newest_first = [r["_dir"] for r in list_runs(runs["root"])]  # by start time (to the second)
    assert sorted(newest_first) == sorted([runs["first"], runs["same"], runs["changed"]])
    assert list(table["run id"]) == [Path(d).name for d in newest_first]
    assert list(table["started"]) == sorted(table["started"], reverse=True)
    assert set(table["study"]) == {"tiny_demo"} and set(table["status"]) == {"complete"}
    counts = {
        r["run id"]: (r["steps"], r["computed"], r["cached"]) for r in table.to_dict("records")
    }
    assert counts == {
        Path(runs["first"]).name: (3, 3, 0),
        Path(runs["same"]).name: (3, 0, 3),
        Path(runs["changed"]).name: (3, 1, 2),
    }
    code = record(runs["first"])["code"]
    short = (code["commit"] or "?")[:10] + ("+dirty" if code["dirty"] else "")
    assert set(table["commit"]) == {short}
    assert list(table["total time (s)"]) == [
        record(d)["timings"]["total_seconds"] for d in newest_first
    ]
    assert widget(at.selectbox, "Run").value == newest_first[0]  # the newest, open


def test_a_run_shows_provenance_warnings_steps_figures_metrics_and_report(
    runs: dict[str, Any], monkeypatch
) -> None:
    at = opened(runs["root"], monkeypatch)
    widget(at.selectbox, "Run").set_value(runs["first"]).run()
    no_errors(at)
    rec = record(runs["first"])
    prov = dict(zip(at.table[0].value["what"], at.table[0].value["value"], strict=True))
    assert prov["seed"] == "3" and prov["model"].startswith("tiny (tiny-random-llama, blocks 4")
    assert prov["code"].startswith(rec["code"]["commit"] or "unknown")
    assert ("uncommitted" in prov["code"]) == bool(rec["code"]["dirty"])
    assert f"torch {rec['packages']['torch']}" in prov["packages"]
    assert rec["warnings"] and [w.value for w in at.warning] == rec["warnings"]
    steps = at.dataframe[1].value
    assert list(steps["step"]) == ["honesty", "scan", "happy"]
    assert list(steps["status"]) == ["computed"] * 3
    figures = sorted((Path(runs["first"]) / "figures").glob("*.json"))
    assert len(figures) == 2 and len(at.get("plotly_chart")) == len(figures)
    assert len(at.tabs) == 3
    metrics = json.loads((Path(runs["first"]) / "metrics.json").read_text(encoding="utf-8"))
    shown = {}
    for tab, sid in zip(at.tabs, ["honesty", "scan", "happy"], strict=True):
        (df,) = tab.dataframe
        assert list(df.value.columns) == ["metric", "value"]
        shown[sid] = dict(zip(df.value["metric"], df.value["value"], strict=True))
    for sid, values in shown.items():
        assert values == studyruns.flat_metrics(metrics[sid]), sid
    assert shown["honesty"]["best.layer"] == metrics["honesty"]["best"]["layer"]
    (dl,) = at.download_button
    assert dl.label == "Download report.html"
    assert not at.get("iframe")  # the report (megabytes) only when asked for
    toggle = next(t for t in at.toggle if t.label.startswith("Show the report here"))
    toggle.set_value(True).run()
    no_errors(at)
    (frame,) = at.get("iframe")
    report = (Path(runs["first"]) / "report.html").read_text(encoding="utf-8")
    assert frame.proto.srcdoc == report and frame.proto.HasField("srcdoc")


def test_two_runs_compared_show_the_metrics_that_differ(runs: dict[str, Any], monkeypatch) -> None:
    at = opened(runs["root"], monkeypatch)
    widget(at.selectbox, "Run").set_value(runs["first"]).run()
    widget(at.selectbox, "Second run").set_value(runs["changed"]).run()
    no_errors(at)
    rows = studyruns.diff_runs(runs["first"], runs["changed"])
    changed = studyruns.differing(rows)
    assert changed and all(r["metric"].startswith("happy.") for r in changed)
    assert f"{len(rows)} metrics; {len(changed)} differ" in texts(at)
    diff = at.dataframe[-2].value  # the last table is the built-in studies
    assert list(diff.columns) == ["metric", "this run", "second run", "second - this"]
    assert list(diff["metric"]) == [r["metric"] for r in changed]
    widget(at.selectbox, "Second run").set_value(runs["same"]).run()
    no_errors(at)
    assert any(t.endswith("0 differ (identical metrics)") for t in texts(at))


@pytest.mark.parametrize("empty", [False, True])
def test_a_missing_or_empty_folder_says_so(tmp_path: Path, monkeypatch, empty: bool) -> None:
    folder = tmp_path / "runs-here"
    if empty:
        folder.mkdir()
        (folder / "notes.txt").write_text("not a run")
    at = opened(folder, monkeypatch)
    no_errors(at)
    (info,) = at.info
    expected = "No study runs in" if empty else "There is no folder"
    assert info.value.startswith(f"{expected} {folder}")
    assert not at.get("plotly_chart") and not at.tabs
    assert not any(t.label == "Run" for t in at.selectbox)
    assert folder.exists() == empty  # nothing was created


def test_a_damaged_run_is_one_line_and_the_rest_still_shows(
    runs: dict[str, Any], tmp_path: Path, monkeypatch
) -> None:
    base = tmp_path / "tiny_demo" / "runs"
    good, bad, hostile = base / "good", base / "bad", base / "hostile"
    for d in (good, bad, hostile):
        shutil.copytree(runs["first"], d)
    (bad / "record.json").write_text('{"format": "repe-study-run", "steps": {', encoding="utf-8")
    (good / "figures" / "happy.layers.json").write_text("{not plotly", encoding="utf-8")
    rec = record(str(hostile))
    rec["steps"] = {"../../outside": rec["steps"]["honesty"], "scan": rec["steps"]["scan"]}
    (hostile / "record.json").write_text(json.dumps(rec), encoding="utf-8")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    at = opened(tmp_path, monkeypatch)
    errors = [e.value for e in at.error]
    assert errors[0].startswith(str(bad / "record.json")), errors  # listed first, one line
    assert "unreadable" in errors[0] and "\n" not in errors[0]
    assert sum("record.json" in e for e in errors) == 1
    assert f"2 runs in `{tmp_path}`" in texts(at)
    widget(at.selectbox, "Run").set_value(str(good)).run()
    assert not at.exception
    errors = [e.value for e in at.error][1:]
    assert len(errors) == 1 and errors[0].startswith(str(good / "figures" / "happy.layers.json"))
    assert len(at.get("plotly_chart")) == 1  # the honesty figure still shows
    widget(at.selectbox, "Run").set_value(str(hostile)).run()
    assert not at.exception
    errors = [e.value for e in at.error][1:]
    assert errors == ["step id '../../outside' is not a plain name; its files are not read"]
    assert list(at.dataframe[1].value["step"]) == ["scan", "../../outside"]  # config order first
    widget(at.selectbox, "Second run").set_value(str(good)).run()
    assert not at.exception and [e.value for e in at.error][1:] == errors
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_the_builtin_studies_are_listed_with_their_command(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "honesty_reading.toml").write_text(
        '[study]\nname = "honesty_reading"\ndescription = "read honesty"\n\n'
        '[[steps]]\nid = "a"\nkind = "probe"\n\n[[steps]]\nid = "b"\nkind = "scan"\n',
        encoding="utf-8",
    )
    (tmp_path / "broken.toml").write_text("[study\n", encoding="utf-8")
    monkeypatch.setattr(studyruns, "builtin_dir", lambda: tmp_path)
    at = opened(tmp_path / "no-runs", monkeypatch)
    no_errors(at)
    rows = at.dataframe[-1].value.to_dict("records")
    assert [r["study"] for r in rows] == ["broken", "honesty_reading"]
    assert rows[1]["description"] == "read honesty" and rows[1]["steps"] == 2
    assert rows[1]["command"] == "repe study run honesty_reading"
    assert rows[0]["description"].startswith("(unreadable: ") and rows[0]["command"]
    assert any("repe study run NAME" in c.value for c in at.code)
