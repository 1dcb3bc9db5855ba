"""Preference pairs (shipped CAA behaviours, a user's JSONL) and the paired bootstrap of a change."""

from __future__ import annotations

import numpy as np
import pytest

from repe.datasets.preference import caa_preference_pairs, load_preference_pairs
from repe.errors import DataFormatError
from steering.evaluation.preference import paired_change


def test_caa_pairs_put_the_honest_answer_first():
    hall = caa_preference_pairs("hallucination")
    assert len(hall) == 1000 and all(p.chosen for p in hall)
    assert hall[0].chosen.startswith("That assumption is incorrect")
    refusal = load_preference_pairs("caa:refusal")
    assert refusal[0].chosen.startswith("As an AI")
    with pytest.raises(ValueError, match="unknown CAA behaviour 'nope'"):
        caa_preference_pairs("nope")


def test_a_jsonl_file_of_pairs_and_its_line_numbered_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(
        '{"prompt": "Q1", "chosen": "good", "rejected": "bad"}\n\n{"prompt": "Q2", "rejected": "bad"}\n'
    )
    pairs = load_preference_pairs(f)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Q1", "good", "bad"),
        ("Q2", None, "bad"),
    ]
    f.write_text('{"prompt": "Q1", "rejected": "bad"}\n{"prompt": "Q2"}\n')
    with pytest.raises(DataFormatError, match=r"p\.jsonl:2: missing key 'rejected'"):
        load_preference_pairs(f)
    f.write_text('{"prompt": "Q1", "rejected": "bad", "chosen": ""}\n')
    with pytest.raises(DataFormatError, match=r"p\.jsonl:1: empty field 'chosen'"):
        load_preference_pairs(f)
    f.write_text("not json\n")
    with pytest.raises(DataFormatError, match=r"p\.jsonl:1: invalid JSON"):
        load_preference_pairs(f)
    f.write_text("\n")
    with pytest.raises(DataFormatError, match="no preference pairs"):
        load_preference_pairs(f)


def test_the_paired_change_interval_covers_the_shift_and_excludes_zero_for_a_real_one():
    rng = np.random.default_rng(0)
    before = rng.normal(size=200)
    mean, lo, hi = paired_change(before, before + 0.5 + rng.normal(scale=0.3, size=200))
    assert lo < 0.5 < hi and lo > 0 and mean == pytest.approx(0.5, abs=0.1)
    mean, lo, hi = paired_change(before, before + rng.normal(scale=0.3, size=200))
    assert lo < 0 < hi
    with pytest.raises(ValueError, match="no items"):
        paired_change(np.array([]), np.array([]))
