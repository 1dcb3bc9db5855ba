"""App latency: the first visit to Steer live, and from applying a new setting to the first steered
token on screen, each against a plain generation in the same run.

First visit: a fresh repe cache (only the de-quantised model linked in, so the residual norm the relative
scale needs is measured during the visit); from uploading a direction on Steer live to the complete
steered answer (32 tokens), against a plain ``generate`` of 32 tokens in this process.
RESULT app_first_steer_seconds_vs_plain_generate, target <= 2.

Then the setting loop (below); the setting's widgets sit in a form applied with the Steer button, so
the user's action is the click.

The real app (``python -m repe app``, the README's main command) runs in its own process on the embedded
model; headless Chromium (Debian's ``chromium``, driven by Playwright) opens the Steer page, uploads a
direction artifact (a random unit direction at block 12) and waits for the first baseline and steered
answers. Then, ``--reps`` times, it presses an arrow key on the coefficient slider (the coefficient
moves by one step, alternately up and down, so every press is a new setting), clicks Steer, and the
page itself records, with ``performance.now()``:

* ``key``: the click on the Steer button (the user's action);
* ``first``: the first moment the steered answer box shows streamed text (the "▌" cursor that
  ``stream_into`` draws while tokens arrive) — the first steered token on screen.

The app figure is the median of ``first - key`` (ms). The floor, measured in this process on the same
model and prompt (chat template, greedy), interleaved with the app measurements:

* ``generate_stream`` with no steering, time to its first step (the library's own streaming loop: the
  path the app uses, without the app);
* ``model.generate(max_new_tokens=1)`` on the rendered prompt (HF's plain generate call).

RESULT app_slider_to_first_token_vs_plain_ttft: app median / the smaller of the two floor medians
(the stricter reading); target <= 1.3. The loop runs twice:

* own core (the RESULT line, when this process may use 2 CPUs or more): the app server on one CPU,
  this process and Chromium on the others. The app then has what the plain floor has, a core that
  nothing else computes on, so the ratio is the app's own cost (Streamlit's rerun, the websocket,
  the page's work, steering).
* shared cores (an INFO line): everything on all CPUs. On a 2-core machine Chromium's renderer and
  compositor threads redraw the rerun while the first forward pass runs, and the generating thread
  waits in the run queue for tens of ms (measured from /proc/<pid>/task/<tid>/schedstat); that is the
  machine, not the app, and this figure shows how much.
The server and this process each run torch with ``--threads`` threads (default 1: on 2 shared cores
a second OpenMP thread mostly spins).

    .venv/bin/python bench/app_latency.py             # full run (~5 minutes)
    .venv/bin/python bench/app_latency.py --reps 5    # quicker
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET = 1.3
FIRST_TARGET = 2.0
LAYER = 12
CHROMIUM = os.environ.get("REPE_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]
PROMPT = "Tell me about your weekend."  # the Steer page's default prompt

TIMING_JS = """
() => {
  window.__lat = {key: 0, first: 0};
  document.addEventListener('click', (e) => {
    if (e.target.closest('button') && e.target.closest('button').innerText.trim() === 'Steer')
      window.__lat = {key: performance.now(), first: 0};
  }, true);
  new MutationObserver(() => {
    const lat = window.__lat;
    if (!lat.key || lat.first) return;
    const box = document.querySelector('.st-key-steered_answer');
    if (box && box.innerText.includes('\u258c')) lat.first = performance.now();
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    port: int, threads: int, extra_env: dict[str, str] | None = None, cpus: set[int] | None = None
) -> subprocess.Popen[bytes]:
    """The app server; ``cpus``: the CPUs it may run on (None: all of this process's)."""
    workspace = tempfile.mkdtemp(prefix="repe-bench-workspace-")
    atexit.register(shutil.rmtree, workspace, True)
    env = {
        **os.environ,
        # the servers' session workspaces go to a scratch folder, not the user's ~/repe-workspace
        "REPE_WORKSPACE": workspace,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(threads),
        "TQDM_DISABLE": "1",
        **(extra_env or {}),
    }
    cmd = [sys.executable, "-m", "repe", "app", "--port", str(port), "--address", "127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, "--headless"],
        cwd=ROOT,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2):
                return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the app server did not come up") from None
            time.sleep(0.3)


def wait_idle(page: object, timeout_ms: int = 120_000) -> None:
    page.wait_for_timeout(300)  # type: ignore[attr-defined]
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout_ms
    )


class Floor:
    """Plain time to first token on the same prompt, in this process."""

    def __init__(self) -> None:
        from repe.chat import messages
        from repe.models import load_model

        self.lm = load_model()
        self.chat = [messages(PROMPT)]
        tok = self.lm.tokenizer
        text = tok.apply_chat_template(self.chat[0], tokenize=False, add_generation_prompt=True)
        self.ids = tok(text, return_tensors="pt", add_special_tokens=False)
        self.stream_ms: list[float] = []
        self.hf_ms: list[float] = []

    def measure(self) -> None:
        from steering.generate import GenerationConfig, generate_stream

        t0 = time.perf_counter()
        gen = generate_stream(self.lm, [PROMPT], None, GenerationConfig(max_new_tokens=8))
        next(gen)
        self.stream_ms.append((time.perf_counter() - t0) * 1e3)
        gen.close()
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.lm.model.generate(
                **self.ids,
                max_new_tokens=1,
                do_sample=False,
                pad_token_id=self.lm.tokenizer.pad_token_id,
            )
        self.hf_ms.append((time.perf_counter() - t0) * 1e3)


def write_direction(folder: Path) -> Path:
    from repe.directions import Direction
    from repe.models import load_model

    lm = load_model()
    v = torch.randn(lm.identity.d_model, generator=torch.Generator().manual_seed(3))
    d = Direction({f"blocks.{LAYER}.hook_resid_post": v / v.norm()}, lm.identity, name="probe")
    return d.save(folder / "probe")


def first_visit(threads: int, direction: Path, sync_api: object) -> tuple[float, float]:
    """Seconds from uploading a direction on a first visit to Steer live (a fresh repe cache: the
    de-quantised model is linked in, nothing else, so the residual norms are measured in this visit)
    until the steered answer is complete, and a plain generation of the same length here."""
    from repe.models import cache_root, load_model
    from steering.generate import GenerationConfig, generate

    lm = load_model()
    plain = []
    for _ in range(3):
        t0 = time.perf_counter()
        generate(lm, [PROMPT], None, GenerationConfig(max_new_tokens=32))
        plain.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as cache:
        (Path(cache) / "models").symlink_to(cache_root() / "models", target_is_directory=True)
        port = free_port()
        server = start_server(port, threads, {"REPE_CACHE": cache})
        try:
            with sync_api.sync_playwright() as pw:  # type: ignore[attr-defined]
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1200})
                page.goto(f"http://127.0.0.1:{port}/")  # Model & data: loads the model
                page.get_by_text("Model & data").first.wait_for(timeout=120_000)
                wait_idle(page)
                page.goto(f"http://127.0.0.1:{port}/steer")
                page.get_by_text("upload a direction artifact", exact=False).wait_for(
                    timeout=120_000
                )
                wait_idle(page)
                files = [str(direction.with_suffix(s)) for s in (".safetensors", ".json")]
                t0 = time.perf_counter()
                page.locator("input[type='file']").first.set_input_files(files)
                page.wait_for_function(
                    "() => { const b = document.querySelector('.st-key-steered_answer');"
                    " const t = b ? b.innerText.trim() : '';"
                    " return t.length > 0 && !t.includes('\u258c'); }",
                    timeout=300_000,
                    polling=50,
                )
                took = time.perf_counter() - t0
                assert page.locator("[data-testid='stException']").count() == 0
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=20)
    return took, statistics.median(plain)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import playwright.sync_api as sync_api

    with tempfile.TemporaryDirectory() as tmp:
        first_s, plain_s = first_visit(args.threads, write_direction(Path(tmp)), sync_api)
    first_ratio = first_s / plain_s
    print(f"INFO app_first_steer_seconds {first_s:.2f} (upload to complete steered answer)")
    print(f"INFO plain_generate_32_tokens_seconds {plain_s:.2f}")
    floor = Floor()
    for _ in range(3):
        floor.measure()  # warm-up
    mine = sorted(os.sched_getaffinity(0))
    pinned = None
    if len(mine) >= 2:
        # the app server on a core of its own, this process and the browser on the others: the
        # app gets what the plain generation below gets (a core nobody else is computing on)
        server_cpus, others = {mine[0]}, set(mine[1:])
        os.sched_setaffinity(0, others)
        try:
            pinned = setting_loop(args, floor, sync_api, server_cpus)
        finally:
            os.sched_setaffinity(0, set(mine))
    shared = setting_loop(args, floor, sync_api, None)
    print(
        f"RESULT app_first_steer_seconds_vs_plain_generate {first_ratio:.3f} target <= "
        f"{FIRST_TARGET:g} {'PASS' if first_ratio <= FIRST_TARGET else 'FAIL'}"
    )
    if pinned is None:
        print("INFO one CPU only: the server shares it with the browser (no own-core figure)")
    ratio = pinned if pinned is not None else shared
    print(f"INFO app_slider_to_first_token_vs_plain_ttft_shared_cores {shared:.3f}")
    print(
        f"RESULT app_slider_to_first_token_vs_plain_ttft {ratio:.3f} target <= {TARGET:g} "
        f"{'PASS' if ratio <= TARGET else 'FAIL'}"
    )


def setting_loop(
    args: argparse.Namespace, floor: Floor, sync_api: object, server_cpus: set[int] | None
) -> float:
    """Steer clicks against the plain time to first token; the ratio of the medians."""
    where = "own core" if server_cpus else "shared cores"
    floor.stream_ms.clear()
    floor.hf_ms.clear()
    port = free_port()
    server = start_server(port, args.threads, cpus=server_cpus)
    app_ms: list[float] = []
    try:
        with tempfile.TemporaryDirectory() as tmp, sync_api.sync_playwright() as pw:
            saved = write_direction(Path(tmp))
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            page.goto(f"http://127.0.0.1:{port}/steer")
            page.get_by_text("upload a direction artifact", exact=False).wait_for(timeout=120_000)
            wait_idle(page)
            files = [str(saved.with_suffix(".safetensors")), str(saved.with_suffix(".json"))]
            page.locator("input[type='file']").first.set_input_files(files)
            page.locator(".st-key-steered_answer").wait_for(timeout=120_000)
            wait_idle(page)
            tokens = page.get_by_role("slider", name="New tokens").first
            tokens.focus()
            tokens.press("Home")  # 4 new tokens: each run ends soon after its first token
            wait_idle(page)
            page.evaluate(TIMING_JS)
            coeff = page.get_by_role("slider", name="Coefficient (relative units)").first
            button = page.get_by_role("button", name="Steer", exact=True)
            for i in range(args.reps + 2):
                coeff.focus()
                coeff.press("ArrowRight" if i % 2 == 0 else "ArrowLeft")
                button.click()  # the setting's form applies on the Steer button
                page.wait_for_function("() => window.__lat.first > 0", timeout=60_000)
                lat = page.evaluate("() => window.__lat")
                wait_idle(page)
                if i >= 2:  # the first two are warm-up
                    app_ms.append(lat["first"] - lat["key"])
                floor.measure()
                print(
                    f"# {where} rep {i}: app {lat['first'] - lat['key']:.1f} ms, plain stream "
                    f"{floor.stream_ms[-1]:.1f} ms, HF generate {floor.hf_ms[-1]:.1f} ms",
                    flush=True,
                )
            assert page.locator("[data-testid='stException']").count() == 0
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)
    app = statistics.median(app_ms)
    stream = statistics.median(floor.stream_ms[2:])
    hf = statistics.median(floor.hf_ms[2:])
    print(
        f"INFO [{where}] app_slider_to_first_steered_token_ms {app:.1f} (median of {len(app_ms)})"
    )
    print(f"INFO [{where}] plain_generate_stream_ttft_ms {stream:.1f}")
    print(f"INFO [{where}] plain_hf_generate_ttft_ms {hf:.1f}")
    return app / min(stream, hf)


if __name__ == "__main__":
    main()
