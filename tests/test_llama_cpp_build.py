"""The set-up's llama.cpp build: portable flags (never native detection, never AMX or AVX-512), a wheel
cache keyed by those flags, an installed library free of AMX / AVX-512 instructions, and a crash check
that names the wheel and removes it."""

from __future__ import annotations

import importlib.util
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "llama_cpp_build", ROOT / "scripts/llama_cpp_build.py"
)
assert _spec is not None and _spec.loader is not None
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

# a CPU like the one that crashed the native build: it advertises AMX and AVX-512
AMX_CPU = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512_vnni"} | {
    "amx_tile",
    "amx_int8",
    "amx_bf16",
}


def flag_values(args: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in args if a.startswith("-D"))


@pytest.mark.parametrize(
    "machine,cpu",
    [("x86_64", AMX_CPU), ("x86_64", {"sse4_2", "avx"}), ("x86_64", set()), ("aarch64", set())],
)
def test_build_flags_exclude_native_detection_amx_and_avx512(machine, cpu):
    flags = flag_values(build.cmake_args(machine, cpu))
    assert flags["GGML_NATIVE"] == "OFF"
    assert flags.get("GGML_CPU_ALL_VARIANTS", "OFF") == "OFF"
    on = {k for k, v in flags.items() if v == "ON"}
    assert not {k for k in on if "AMX" in k or "AVX512" in k or "VNNI" in k}, on
    assert flags["LLAVA_BUILD"] == "OFF"  # the multimodal library is not built
    if machine == "x86_64":
        for k in ("AMX_TILE", "AMX_INT8", "AMX_BF16", "AVX512"):
            assert flags[f"GGML_{k}"] == "OFF"  # explicit: not left to a default


def test_x86_64_v3_baseline_where_the_cpu_has_it():
    v3 = flag_values(build.cmake_args("x86_64", AMX_CPU))
    assert all(v3[f"GGML_{k}"] == "ON" for k in ("AVX", "AVX2", "FMA", "F16C", "BMI2"))
    v2 = flag_values(build.cmake_args("x86_64", {"sse4_2", "avx"}))  # no AVX2: SSE4.2 only
    assert all(v2[f"GGML_{k}"] == "OFF" for k in ("AVX", "AVX2", "FMA", "F16C", "BMI2"))
    assert v2["GGML_SSE42"] == "ON"


def test_cache_key_changes_with_the_flags():
    a = build.cache_key(["-DGGML_NATIVE=OFF"])
    assert a == build.cache_key(["-DGGML_NATIVE=OFF"])
    assert a != build.cache_key(["-DGGML_NATIVE=ON"])
    assert a.startswith(build.VERSION + "-")


def test_setup_builds_with_these_flags_and_bypasses_pips_cache():
    sh = (ROOT / "scripts/setup.sh").read_text()
    assert 'CMAKE_ARGS="$LLAMA_FLAGS"' in sh
    assert re.search(r"pip.*wheel --no-cache-dir", sh.replace('"${PIP[@]}"', "pip"))
    assert "llama-cpp-python-$LLAMA_KEY" in sh  # the wheel cache folder is keyed by the flags
    assert "$LLAMA check" in sh  # the crash check runs right after installing
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/llama_cpp_build.py"), "flags"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == build.cmake_args()


def test_this_venv_holds_the_build_the_setup_asks_for():
    marker = Path(sys.prefix) / ".llama-cpp-build"
    if not marker.exists():
        pytest.fail(f"{marker} is missing: this environment was not set up by scripts/setup.sh")
    assert marker.read_text().strip() == build.cache_key()


def _library() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.origin is not None
    libs = sorted((Path(spec.origin).parent / "lib").glob("libggml-cpu*.so*"))
    assert libs, "libggml-cpu.so not found in the installed llama_cpp package"
    return libs[0]


def forbidden_instructions(path: Path) -> tuple[list[str], bool, int]:
    """Disassemble ``path``: (AMX or zmm / AVX-512 instructions found, whether ymm / AVX is used,
    length of the disassembly)."""
    text = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    bad = re.findall(r"\b(?:tileloadd\w*|tdpb\w+|ldtilecfg|tilerelease|tilezero)\b|%zmm\d+", text)
    return bad, "%ymm" in text, len(text)


needs_binutils = pytest.mark.skipif(
    shutil.which("objdump") is None or shutil.which("gcc") is None, reason="binutils/gcc missing"
)


@needs_binutils
def test_the_instruction_scan_finds_amx_and_avx512(tmp_path):
    """Positive control for the scan below: an object built with AMX and AVX-512 code is caught."""
    src = tmp_path / "amx.c"
    src.write_text(
        "#include <immintrin.h>\n"
        "void f(const void* c) { _tile_loadconfig(c); _tile_release(); }\n"
        "void g(float* p) { __m512 a = _mm512_loadu_ps(p); _mm512_storeu_ps(p, _mm512_add_ps(a, a)); }\n"
    )
    obj = tmp_path / "amx.o"
    subprocess.run(
        ["gcc", "-O2", "-mamx-tile", "-mavx512f", "-c", str(src), "-o", str(obj)], check=True
    )
    bad, _, _ = forbidden_instructions(obj)
    assert "ldtilecfg" in bad and "tilerelease" in bad and any(b.startswith("%zmm") for b in bad)


@needs_binutils
def test_installed_library_has_no_amx_or_avx512_instructions():
    """The installed CPU back-end holds no AMX tile instruction and no zmm (AVX-512) register, so it
    cannot die with an illegal instruction on a CPU that lacks (or may not use) them."""
    bad, avx, size = forbidden_instructions(_library())
    assert size > 100_000  # really disassembled something
    assert not bad, sorted(set(bad))[:10]
    if build.cmake_args().count("-DGGML_AVX2=ON"):
        assert avx  # the AVX2 baseline is there (x86-64-v3)


def test_installed_build_reports_no_amx():
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    assert "AMX" not in info, info
    assert "AVX512 = 1" not in info, info


def test_crash_check_names_the_wheel_and_removes_it(tmp_path, capsys):
    wheel = tmp_path / f"llama_cpp_python-{build.VERSION}-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"not a real wheel")
    die = [sys.executable, "-c", f"import os; os.kill(os.getpid(), {int(signal.SIGILL)})"]
    assert build.check(wheel, ["-DGGML_NATIVE=ON"], child=die) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "illegal instruction" in err and wheel.name in err and "-DGGML_NATIVE=ON" in err
    assert not wheel.exists()
    # a segfault is a crash too
    wheel.write_bytes(b"x")
    segv = [sys.executable, "-c", f"import os; os.kill(os.getpid(), {int(signal.SIGSEGV)})"]
    assert build.check(wheel, [], child=segv) == 1 and not wheel.exists()
    capsys.readouterr()
    # any other failure (an error message, a user's Ctrl-C or kill) is reported but keeps the wheel
    for child, needle in (
        ([sys.executable, "-c", "raise SystemExit('no model file')"], "exit code 1: no model file"),
        ([sys.executable, "-c", f"import os; os.kill(os.getpid(), {int(signal.SIGTERM)})"], "-15"),
    ):
        wheel.write_bytes(b"x")
        assert build.check(wheel, [], child=child) == 1
        err = capsys.readouterr().err
        assert needle in err and "kept" in err
        assert wheel.exists()


@pytest.mark.integration
def test_crash_check_passes_on_the_installed_build(capsys):
    """The real child: the embedded GGUF model, a ~100-token prompt in one batch, 4 generated tokens."""
    assert build.check(None) == 0
    assert "llama.cpp ok" in capsys.readouterr().out


def test_sdist_download_is_pinned_and_names_only_llama_cpp_python(tmp_path, monkeypatch):
    """The sdist comes through ``pip download --no-binary llama-cpp-python`` (``:all:`` made pip build
    the build requirements from source too: minutes on a fresh machine) and must match the pinned
    SHA-256; a mismatch is one line and leaves nothing in the folder."""
    calls: list[list[str]] = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / build.SDIST).write_bytes(b"not the pinned sdist")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(build.subprocess, "run", fake_pip)
    with pytest.raises(SystemExit, match="SHA-256 .* is not the pinned"):
        build.sdist(tmp_path)
    (cmd,) = calls
    assert cmd[cmd.index("--no-binary") + 1] == "llama-cpp-python"
    assert ":all:" not in cmd
    assert list(tmp_path.iterdir()) == []
    # a file with the pinned digest is accepted and kept
    good = b"pinned"
    monkeypatch.setattr(build, "SDIST_SHA256", __import__("hashlib").sha256(good).hexdigest())

    def good_pip(cmd, **kwargs):
        (Path(cmd[cmd.index("-d") + 1]) / build.SDIST).write_bytes(good)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(build.subprocess, "run", good_pip)
    assert build.sdist(tmp_path).read_bytes() == good
