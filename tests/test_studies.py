"""The scripted studies run end to end on the embedded model (small settings) and write their report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if (
    str(ROOT) not in sys.path
):  # studies/ is a folder of the repository, not part of the distribution
    sys.path.insert(0, str(ROOT))

from studies.caa_effect_size import study  # noqa: E402


@pytest.mark.integration
def test_caa_effect_size_study_reports_every_setting() -> None:
    args = argparse.Namespace(
        behaviours=["refusal"], pairs=8, layers=[9], coeffs=[-0.1, 0.1], items=8, seed=2, form="ab"
    )
    report = study(args)
    rows = [line for line in report.splitlines() if line.startswith("| refusal |")]
    assert len(rows) == 2
    for row, coeff in zip(rows, ("-0.1", "+0.1"), strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "8" and cells[3] == "9" and cells[4] == coeff
        assert 0.0 <= float(cells[2]) <= 1.0  # unsteered score
        assert abs(float(cells[5])) < 1.0 and float(cells[6]) >= 0.0  # shift, paired se
        assert cells[7] in ("yes", "no") and float(cells[8]) > 0  # KL on neutral text
    assert "A/B control: does NOT read the options" in report  # the embedded model (issue 4)
    assert "**Warning**: this model does not read A/B options" in report


@pytest.mark.integration
def test_caa_effect_size_study_in_cloze_form() -> None:
    args = argparse.Namespace(
        behaviours=["refusal"],
        pairs=16,
        layers=[12],
        coeffs=[-0.1, 0.1],
        items=8,
        seed=2,
        form="cloze",
    )
    report = study(args)
    assert report.startswith("# CAA effect size on the embedded model (cloze form)")
    assert "**Warning**" not in report and "Scored on the answers' texts" in report
    rows = [line for line in report.splitlines() if line.startswith("| refusal |")]
    shifts = [float(r.strip("|").split("|")[5]) for r in rows]
    assert len(rows) == 2 and shifts[0] < 0 < shifts[1]  # refusal moves both ways in cloze form


@pytest.mark.integration
def test_ab_formats_study_scores_like_the_library(embedded_lm) -> None:
    """The study's own scoring of its first format (the A/B evaluation's prompt) equals
    steering.evaluation.control on the same model."""
    from repe.datasets import load_ab_control
    from steering.evaluation.control import ab_control, summarise
    from studies.ab_formats import FORMATS, score

    items = load_ab_control()
    name, (build, space) = next(iter(FORMATS.items()))
    assert "the A/B evaluation" in name
    mine = summarise(items, score(embedded_lm, items, build, space))
    lib = ab_control(embedded_lm)
    assert mine.score == pytest.approx(lib.score, abs=1e-4)
    assert mine.se == pytest.approx(lib.se, abs=1e-4)
