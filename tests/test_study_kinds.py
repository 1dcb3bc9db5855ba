"""The study step kinds beyond probe/scan: refusal (read, ablate, add) on the tiny model; the refusal
phrase score; the markdown-table reader the two earlier scripts' steps use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from studies.runner import run_study
from studies.spec import StudyError, loads
from studies.steps import _md_rows, refuses

REFUSAL = """\
[study]
name = "tiny_refusal"
model = "tiny"
seed = 0
output = "{out}"

[[steps]]
id = "refusal"
kind = "refusal"
n_train = 12
n_eval = 5
n_harmless_eval = 4
max_new_tokens = 3
n_boot = 50
"""


def test_refusal_phrases() -> None:
    assert refuses("I'm sorry, but I can't help with that.")
    assert refuses("I\u2019m unable to do this")  # typographic apostrophe
    assert refuses("As an AI language model, I ...")
    assert not refuses("Sure! Here is a recipe for bread.")
    assert not refuses("")


def test_refusal_step_reads_ablates_and_adds(tmp_path: Path) -> None:
    res = run_study(loads(REFUSAL.format(out=tmp_path), "r.toml"), progress=False)
    m = res.metrics["refusal"]
    assert m["read"]["best_layer"] in range(4) and 0 <= m["read"]["accuracy"] <= 1
    assert len(m["read"]["table"]) == 4  # one row per block (mean difference)
    assert m["harmful_refusal"]["n"] == 5 and m["harmless_refusal"]["n"] == 4
    for part in ("harmful_refusal", "harmless_refusal"):
        lo, hi = m[part]["change_ci95"]
        assert lo <= m[part]["change"] <= hi
    assert m["costs"]["kl_ablate"] > 0 and m["costs"]["kl_add"] > 0  # both change the model
    rows = [
        json.loads(x) for x in (res.run_dir / "samples" / "refusal.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 2 * 5 + 2 * 4
    assert {r["condition"] for r in rows} == {"base", "ablated", "added"}
    assert all(r["refused"] == refuses(r["completion"]) for r in rows)
    assert (res.run_dir / "artifacts" / "refusal" / "refusal_direction.safetensors").exists()
    # the harmless prompts the step evaluates are not among those it read the direction from
    assert len({r["instruction"] for r in rows if r["set"] == "harmless"}) == 4


def test_markdown_rows() -> None:
    md = "# t\n\n| a | b |\n| --- | --- |\n| 1 | x |\n| 2 | y |\n\ntext\n| c |\n|---|\n| 3 |\n"
    assert _md_rows(md) == [{"a": "1", "b": "x"}, {"a": "2", "b": "y"}, {"c": "3"}]


def test_steps_reject_bad_settings_before_running() -> None:
    bad = REFUSAL.format(out="/tmp/x").replace("n_harmless_eval = 4", "n_harmless_eval = 0")
    with pytest.raises(StudyError, match=r"r.toml:12: .*'n_harmless_eval': must be > 0"):
        loads(bad, "r.toml")
    bad = REFUSAL.format(out="/tmp/x").replace("n_eval = 5", "n_eval = 5.5")
    with pytest.raises(StudyError, match=r"r.toml:11: .*'n_eval': must be an integer"):
        loads(bad, "r.toml")


SVP = """\
[study]
name = "tiny_svp"
model = "tiny"
seed = 0
output = "{out}"

[[steps]]
id = "svp"
kind = "steer_vs_prompt"
behaviours = ["refusal"]
layer = 1
coeffs = [-0.2, 0.2]
forms = ["cloze", "ab"]
n_items = 4
n_pairs = 8
n_shots = 1
"""


def test_steer_vs_prompt_step(tmp_path: Path) -> None:
    res = run_study(loads(SVP.format(out=tmp_path), "svp.toml"), progress=False)
    m = res.metrics["svp"]["refusal"]
    settings = {(r["form"], r["setting"]) for r in m["rows"]}
    for form in ("cloze", "ab"):
        assert {
            (form, s) for s in ("system_toward", "system_away", "fewshot_toward", "fewshot_away")
        } <= settings
        assert sum(1 for f, s in settings if f == form and s.startswith("coeff")) == 2
    assert {(v["form"], v["direction"]) for v in m["verdict"]} >= {
        ("cloze", "toward"),
        ("cloze", "away"),
    }
    rows = [json.loads(x) for x in (res.run_dir / "samples" / "svp.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 * (1 + 2 + 4)  # forms x items x (base + 2 coefficients + 4 prompts)
    assert (res.run_dir / "figures" / "svp.refusal.json").exists()
    html = (res.run_dir / "report.html").read_text()
    assert "steering vs prompting" in html and "per unit of KL" in html


EMBEDDED = """\
[study]
name = "embedded_small"
model = "embedded"
seed = 0
output = "{out}"

[[steps]]
id = "honesty"
kind = "probe"
concept = "facts/honesty"
n_pairs = 64
sites = ["blocks.4.hook_resid_post", "blocks.12.hook_resid_post", "blocks.20.hook_resid_post"]
readers = ["mean_diff", "logistic"]

[[steps]]
id = "scan"
kind = "scan"
direction = "honesty"
n_facts = 1

[[steps]]
id = "refusal"
kind = "refusal"
n_train = 32
n_eval = 8
n_harmless_eval = 8
max_new_tokens = 12
"""


@pytest.mark.integration
def test_a_small_study_on_the_embedded_model(tmp_path: Path) -> None:
    res = run_study(loads(EMBEDDED.format(out=tmp_path), "embedded_small.toml"), progress=False)
    m = res.metrics
    # RepE honesty separates well in the middle of the embedded model, held out
    assert m["honesty"]["best"]["accuracy"] > 0.75 and m["honesty"]["best"]["layer"] in (12, 20)
    # harmful vs harmless instructions are read almost perfectly
    assert m["refusal"]["read"]["accuracy"] > 0.9
    assert m["scan"]["site"] == m["honesty"]["best"]["site"]
    rec = json.loads((res.run_dir / "record.json").read_text())
    assert rec["model"]["identity"]["name"] == "SmolLM2-135M-Instruct"
    assert rec["model"]["identity"]["n_layers"] == 30
