"""llama-cpp-python for this project: portable build flags, the wheel cache key, and a crash check.

llama.cpp's default build (``GGML_NATIVE``) compiles for the build machine's own CPU. On a virtual machine
whose CPU *advertises* AMX but does not let a process execute it, that build dies with "Illegal
instruction" as soon as a batch reaches the AMX kernels. So the set-up builds for a portable baseline
(x86-64-v3: AVX2, FMA, F16C, BMI2; no AVX-512, no AMX) and checks the installed build in a child process
before any test runs.

Used by ``scripts/setup.sh``:

    python scripts/llama_cpp_build.py version        # the llama-cpp-python version the project builds
    python scripts/llama_cpp_build.py flags          # the CMAKE_ARGS for this machine's architecture
    python scripts/llama_cpp_build.py key            # cache key: version + hash of the flags
    python scripts/llama_cpp_build.py check WHEEL    # load the embedded GGUF, run ~100 tokens + generate
    python scripts/llama_cpp_build.py sdist DIR      # the pinned sdist in DIR (downloaded once, verified)
    python scripts/llama_cpp_build.py server DIR     # build llama-server from that sdist, once; its path

llama.cpp's own ``llama-server`` is the deployment client for exported control vectors. It is built from
the llama.cpp source vendored in the same pinned sdist (no other download), with the same portable CPU
flags, as one static binary cached under ``DIR/llama-server-<key>/``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

VERSION = "0.3.36"
# SHA-256 of the pinned sdist as PyPI serves it: checked after every download (change with VERSION)
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

# Parts of llama-cpp-python / llama.cpp the project never uses (the multimodal library, tools, tests,
# examples, the server): off, to cut the build time.
_SKIP = [
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
]


def _x86_64(v3: bool) -> list[str]:
    """x86-64-v3 (AVX2, FMA, F16C, BMI2) and nothing above it, or SSE4.2 only (``v3=False``, for an
    x86-64 CPU without the v3 extensions). Native detection off, so the build machine's CPU does not
    matter; no AVX-512, no AMX."""
    on = "ON" if v3 else "OFF"
    return [
        "-DGGML_NATIVE=OFF",
        "-DGGML_CPU_ALL_VARIANTS=OFF",
        "-DGGML_BACKEND_DL=OFF",
        "-DGGML_SSE42=ON",
        *(f"-DGGML_{f}={on}" for f in ("AVX", "AVX2", "BMI2", "FMA", "F16C")),
        *(f"-DGGML_{f}=OFF" for f in ("AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI")),
        *(f"-DGGML_{f}=OFF" for f in ("AVX512_BF16", "AMX_TILE", "AMX_INT8", "AMX_BF16")),
    ]


_V3_CPU_FLAGS = {"avx", "avx2", "fma", "f16c", "bmi2"}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The feature flags the CPU advertises (``/proc/cpuinfo``); empty where that file does not exist."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cmake_args(machine: str | None = None, flags: set[str] | None = None) -> list[str]:
    """The CMake arguments for a portable llama.cpp build on ``machine`` (``platform.machine()``)."""
    machine = (machine or platform.machine()).lower()
    if machine in {"x86_64", "amd64"}:
        have = cpu_flags() if flags is None else flags
        base = _x86_64(v3=not have or _V3_CPU_FLAGS <= have)
    else:  # aarch64 and others: the compiler's default baseline for the architecture
        base = ["-DGGML_NATIVE=OFF", "-DGGML_CPU_ALL_VARIANTS=OFF", "-DGGML_BACKEND_DL=OFF"]
    return [*base, *_SKIP]


def cache_key(args: Sequence[str] | None = None) -> str:
    """``<version>-<hash of the build flags>``: a wheel built with other flags never matches."""
    args = cmake_args() if args is None else list(args)
    digest = hashlib.sha256(" ".join([VERSION, platform.machine(), *args]).encode()).hexdigest()
    return f"{VERSION}-{digest[:12]}"


# The child: load the embedded GGUF model, evaluate a prompt of about 100 tokens in one batch (the path
# that reaches the matrix kernels; a few tokens one at a time do not), then generate a few tokens.
_CHILD = r"""
import llama_cpp
from repe.models import embedded_gguf_path
llm = llama_cpp.Llama(model_path=str(embedded_gguf_path()), n_ctx=512, n_batch=512, n_threads=2,
                      verbose=False, seed=0)
text = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
ids = llm.tokenize(text.encode())
assert len(ids) >= 90, len(ids)
llm.eval(ids)
out = llm(text, max_tokens=4, temperature=0.0)
assert out["choices"][0]["text"] is not None
print(f"llama.cpp ok: {len(ids)}-token prompt evaluated, 4 tokens generated")
"""


# the process died of a crash signal (SIGILL, SIGSEGV, SIGBUS, SIGABRT, SIGFPE), as a negative return
# code or as a shell's 128 + signal: the build is broken on this machine. Anything else (an error
# message, a timeout, a user's Ctrl-C) says nothing about the wheel, which is kept.
CRASHES = {-4, -11, -7, -6, -8, 132, 139, 135, 134, 136}


def check(
    wheel: str | Path | None,
    args: Sequence[str] | None = None,
    child: Sequence[str] | None = None,
    timeout: float = 300.0,
) -> int:
    """Run the installed llama-cpp-python on a ~100-token prompt in a child process.

    On a crash (an illegal instruction is exit code 132, or -4 as a signal), print one line naming the
    wheel and its build flags, delete the cached ``wheel`` so the next set-up rebuilds, and return 1.
    Any other failure is reported the same way but keeps the wheel."""
    args = cmake_args() if args is None else list(args)
    argv = list(child) if child is not None else [sys.executable, "-c", _CHILD]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        rc, tail = -1, f"timed out after {timeout:.0f} s"
    if rc == 0:
        print(proc.stdout.strip())
        return 0
    crashed = rc in CRASHES
    what = "illegal instruction" if rc in (132, -4) else f"exit code {rc}"
    name = Path(wheel).name if wheel else "llama-cpp-python"
    detail = f": {tail}" if tail and not crashed else ""
    verdict = (
        "does not run on this CPU; the cached wheel was removed"
        if crashed
        else "failed its check (the wheel is kept: this is not a crash)"
    )
    print(
        f"llama.cpp check failed ({what}{detail}): wheel {name} built with "
        f"CMAKE_ARGS='{' '.join(args)}' {verdict}",
        file=sys.stderr,
    )
    if wheel and crashed:
        Path(wheel).unlink(missing_ok=True)
    return 1


SDIST = f"llama_cpp_python-{VERSION}.tar.gz"


def sdist(folder: str | Path) -> Path:
    """The pinned llama-cpp-python sdist in ``folder``, downloaded once through pip (from the package
    index, whose hashes pip checks). ``--no-binary`` names only this package: ``:all:`` would also make
    pip build the sdist's build requirements (scikit-build-core and its dependencies) from source just to
    read its metadata, which took minutes on a fresh machine."""
    folder = Path(folder)
    target = folder / SDIST
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q"]
            + [
                "--no-deps",
                "--no-binary",
                "llama-cpp-python",
                f"llama-cpp-python=={VERSION}",
                "-d",
                tmp,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        got = hashlib.sha256((Path(tmp) / SDIST).read_bytes()).hexdigest()
        if got != SDIST_SHA256:
            raise SystemExit(f"{SDIST}: SHA-256 {got} is not the pinned {SDIST_SHA256}")
        os.replace(Path(tmp) / SDIST, target)
    return target


def server_args() -> list[str]:
    """CMake arguments for llama-server: the portable CPU flags of the Python build, the server and
    its tools on, no web UI (it would be downloaded), no curl / OpenSSL, one static binary."""
    base = [a for a in cmake_args() if not a.startswith(("-DLLAMA_BUILD_", "-DLLAVA_BUILD"))]
    return [
        *base,
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DCMAKE_BUILD_TYPE=Release",
    ]


def server_path(folder: str | Path) -> Path:
    return Path(folder) / f"llama-server-{cache_key(server_args())}" / "llama-server"


def build_server(folder: str | Path) -> Path:
    """``llama-server`` built from the sdist's vendored llama.cpp (once; cached by its flags)."""
    target = server_path(folder)
    if target.is_file():
        return target
    print("building llama.cpp's llama-server (once, a few minutes)", file=sys.stderr)
    src = sdist(folder)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(src) as tf:
            tf.extractall(tmp, filter="data")
        root = Path(tmp) / src.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
        build = Path(tmp) / "build"
        subprocess.run(
            ["cmake", "-S", str(root), "-B", str(build), *server_args()],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        subprocess.run(
            [
                "cmake",
                "--build",
                str(build),
                "--target",
                "llama-server",
                "-j",
                str(os.cpu_count() or 2),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        built = next(build.rglob("llama-server"))
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_name(".llama-server.tmp")
        shutil.copy2(built, staged)
        os.replace(staged, target)
    return target


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] not in {"version", "flags", "key", "check", "sdist", "server"}:
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "version":
        print(VERSION)
    elif argv[0] == "flags":
        print(" ".join(cmake_args()))
    elif argv[0] == "key":
        print(cache_key())
    elif argv[0] in ("sdist", "server"):
        if len(argv) < 2:
            print(f"usage: llama_cpp_build.py {argv[0]} DIR", file=sys.stderr)
            return 2
        print(sdist(argv[1]) if argv[0] == "sdist" else build_server(argv[1]))
    else:
        return check(argv[1] if len(argv) > 1 else None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
