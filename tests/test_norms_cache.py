"""Residual norms for the relative scale are measured once per model and site and kept on disk
(``repe.calibration.cached_residual_norms``): the app's first steer no longer waits for all 30 sites,
and a new session or a restart never measures a site twice."""

from __future__ import annotations

from pathlib import Path

import pytest

import repe.calibration as calibration
from repe.calibration import cached_residual_norms, norms_cache_file, residual_norms
from repe.models import LoadedModel


def test_measured_once_per_site_and_equal_to_calibration(
    tiny_lm: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REPE_CACHE", str(tmp_path))
    measured: list[list[str]] = []
    real = calibration.residual_norms

    def spy(lm: LoadedModel, sites: list[str], texts: object = None) -> dict[str, float]:
        measured.append(list(sites))
        return real(lm, sites, texts)  # type: ignore[arg-type]

    monkeypatch.setattr(calibration, "residual_norms", spy)
    a, b = "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"
    first = cached_residual_norms(tiny_lm, [a])
    assert measured == [[a]]
    assert first == residual_norms(tiny_lm, [a])  # what calibrate() writes
    assert cached_residual_norms(tiny_lm, [a]) == first and measured == [[a]], "no re-measure"
    both = cached_residual_norms(tiny_lm, [a, b])
    assert measured == [[a], [b]], "only the new site runs the model"
    assert both[a] == first[a]
    f = norms_cache_file(tiny_lm)
    assert f.is_file() and f.parent == tmp_path / "norms"
    f.write_text("{not json", encoding="utf-8")  # a damaged cache is measured again
    assert cached_residual_norms(tiny_lm, [a]) == first
    assert measured[-1] == [a]


def test_other_texts_have_their_own_cache(
    tiny_lm: LoadedModel, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("REPE_CACHE", str(tmp_path))
    assert norms_cache_file(tiny_lm) != norms_cache_file(tiny_lm, ["a custom text", "another"])
