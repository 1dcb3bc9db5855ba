#!/usr/bin/env bash
# Moves requirements-lock.txt forward (README: "Moving the lock forward"): sets up a fresh virtual
# environment with the newest versions the package's ranges allow (torch stays at the pinned CPU build),
# writes them as the new lock, runs every quality gate there, and restores the old lock if anything fails.
#   scripts/relock.sh [VENV]       (default .venv-relock; removed and recreated)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-relock}"
LOCK=requirements-lock.txt
cp "$LOCK" "$LOCK.previous"
restore() { mv -f "$LOCK.previous" "$LOCK"; echo "relock failed: $LOCK left as it was" >&2; }
trap 'restore' ERR
rm -rf "$VENV"
REPE_LOCK= bash scripts/setup.sh "$VENV"
{
  echo "# The versions the tests last passed with; scripts/setup.sh installs with '-c $LOCK'."
  echo "# Written by scripts/relock.sh on $(date -u +%Y-%m-%d) with Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())')."
  echo "# llama-cpp-python is pinned in scripts/llama_cpp_build.py (built from source, not listed here)."
  "$VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check \
    | grep -v -i -E '^(llama[-_]cpp[-_]python)|( @ )' | LC_ALL=C sort -f
} >"$LOCK.new"
mv -f "$LOCK.new" "$LOCK"
REPE_VENV="$VENV" ./dev test
trap - ERR
rm -f "$LOCK.previous"
echo "$LOCK moved forward; review 'git diff $LOCK' and commit it"
