"""A study's report.html opens in the real browser (headless Chromium): self-contained (no network),
its plotly figures render, its tables and warnings show, no script error; a screenshot goes to
``test-artifacts/study_report.png``."""

from __future__ import annotations

import os
from pathlib import Path

import playwright.sync_api as sync_api
import pytest

from studies.runner import run_study
from studies.spec import loads

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("REPE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

STUDY = """\
[study]
name = "report_demo"
description = "a probe and a token scan on the tiny model"
model = "tiny"
seed = 1
output = "{out}"

[[steps]]
id = "honesty"
kind = "probe"
concept = "facts/honesty"
n_pairs = 16
readers = ["mean_diff", "logistic"]
n_boot = 50

[[steps]]
id = "scan"
kind = "scan"
direction = "honesty"
n_facts = 1
"""


@pytest.mark.integration
def test_the_report_opens_in_a_real_browser(tmp_path: Path) -> None:
    res = run_study(loads(STUDY.format(out=tmp_path), "report_demo.toml"), progress=False)
    report = res.run_dir / "report.html"
    ARTIFACTS.mkdir(exist_ok=True)
    errors: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(report.as_uri())
            page.wait_for_selector("#fig-honesty-layers .main-svg", timeout=60_000)
            assert page.title() == "report_demo: study report"
            assert page.locator("h2#step-honesty").count() == 1
            assert page.locator("h2#step-scan").count() == 1
            # the layer figure drew one trace per reader (plus the CI bands)
            traces = page.locator("#fig-honesty-layers .scatterlayer .trace").count()
            assert traces >= 2
            assert page.get_by_text("Held-out scores by reader").count() >= 1
            assert page.locator(".repe-scan span[title]").count() > 3  # the token scan
            assert page.get_by_text("complete").first.is_visible()
            page.screenshot(path=str(ARTIFACTS / "study_report.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert all(u.startswith("file://") or u.startswith("data:") for u in requests), requests
