"""Every room holds what its name says, checked on the import graph (parsed, nothing imported):

* ``repe`` (the core) depends on no other package of the workbench (the command line, ``cli.py`` and
  ``cli_*.py``, excepted: it is the front door to all of them, and imports them lazily);
* ``probes`` (readers) never imports ``steering`` or ``app``;
* ``app`` (a shell) never imports ``studies`` (another shell): the Studies page reads run folders as
  files;
* ``steering``'s own modules and its exporters change a running model: they read no data sets and build no
  vectors (no ``repe.datasets``, no ``probes``, no ``steering.evaluation``); measuring behaviour lives in the
  ``steering.evaluation`` sub-package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set[str]:
    """Every module named by an import anywhere in the file (also inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def offending(files: list[Path], banned: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for f in files:
        hit = sorted(m for m in imports(f) if any(m == b or m.startswith(b + ".") for b in banned))
        if hit:
            bad[str(f.relative_to(ROOT))] = hit
    return bad


def py(folder: str, recursive: bool = True) -> list[Path]:
    base = ROOT / folder
    return sorted(base.rglob("*.py") if recursive else base.glob("*.py"))


def test_the_core_depends_on_no_other_package() -> None:
    cli = ("cli.py", "__main__.py")  # and its per-command modules, cli_<command>.py
    files = [f for f in py("repe") if f.name not in cli and not f.name.startswith("cli_")]
    assert offending(files, ("probes", "steering", "app", "studies")) == {}


def test_readers_never_import_steering() -> None:
    assert offending(py("probes"), ("steering", "app", "studies")) == {}


def test_the_app_never_imports_studies() -> None:
    assert offending(py("app"), ("studies",)) == {}


def test_steering_proper_reads_no_data_and_builds_no_vectors() -> None:
    files = py("steering", recursive=False) + py("steering/export")
    assert offending(files, ("repe.datasets", "probes", "steering.evaluation", "app")) == {}


@pytest.mark.parametrize(
    "module",
    ["probes.caa", "probes.cloze", "probes.contrast", "probes.separation", "repe.calibration"],
)
def test_moved_modules_exist_where_the_layout_says(module: str) -> None:
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file()


def test_the_evaluation_sub_package_holds_the_evaluations() -> None:
    names = {f.stem for f in py("steering/evaluation")}
    assert {"ab", "cloze", "control", "costs", "sweep"} <= names
