"""Steering overhead: generation throughput steered vs unsteered, and the cost of switching steering.

On the embedded model (SmolLM2-135M-Instruct, 30 blocks): greedy generation of 64 new tokens (batch 1,
chat prompts, a different prompt each round; EOS is ignored so every run makes exactly 64 tokens) with a
steering vector (a random unit direction times 4, added at every token) at one block (12) and at all 30
blocks, as a tokens/s ratio steered / unsteered measured in the same run:

* ours, our loop (the RESULT lines): ``steering.generate`` (own KV-cache loop) with the spec vs the same
  loop without. The three generations (unsteered, one block, 30 blocks) run *in lockstep*: step i of
  each is timed back to back, order rotated every step, each generation in its own
  ``contextvars.Context`` (the steering state is a context variable). The RESULT ratio is the median,
  over every step of every round, of t(unsteered step i) / t(steered step i) (per-token time ratio =
  tokens/s ratio; the median is robust to a step hit by the scheduler); the ratio of whole generations'
  times (prefill + 64 tokens), median over rounds, is shown next to it. On 2 shared cores whole
  generations timed one after the other drift by +-10%, far above the ~0.5% being measured;
* ours, HF generate: ``model.generate`` inside ``with steer(lm, spec):`` vs plain ``model.generate``
  (what the peers use), whole generations interleaved (order rotated each round), median of per-round
  ratios: INFO;
* repeng: ``ControlModel(model, layers)`` + ``set_control``, then ``ControlModel.generate``, vs the same
  ControlModel after ``reset()`` (on a copy of the model: repeng mutates the model it wraps): INFO;
* steering-vectors: ``with SteeringVector.apply(model, multiplier=1):`` + ``model.generate`` vs plain
  ``model.generate``: INFO;
* transformer_lens and nnsight back-ends (no generation path): INFO ratios of the forward-pass logits
  time of ``steering.backends.steered_logits`` on a 4 x 64-token batch, steered vs unsteered, in a child
  process run with the project's main environment (``.venv``: the peer environment lacks both).

Times are CPU time of the process (``time.process_time``; wall clock is shown too): it does not count
the time other processes hold the shared cores. torch runs 1 thread (``--threads``): on 2 cores shared
with other work one thread measured several times faster than two (OpenMP workers spin against other
processes). The hook path is single-threaded Python either way.

Switching cost: enter + exit of ``with steer(lm, spec):`` (1 and 30 sites), median of 300, in ms, and
repeng's switch over the same 30 layers (``set_control`` + ``reset``) measured interleaved in the same
run; RESULT ``steer_toggle_vs_repeng`` is ours / repeng's (target <= 1).

If a RESULT misses its target (or with ``--profile``), the hook path is profiled: each piece a steered
decode step adds, and the toggle's parts, timed in isolation.

    bash bench/setup_peers.sh                                # once
    .venv-peers/bin/python bench/steer_overhead.py           # full run (< 10 minutes)
    .venv-peers/bin/python bench/steer_overhead.py --quick   # smoke test
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import contextvars  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from steer_common import (  # noqa: E402
    Timings,
    interleaved,
    median_ms,
    random_unit,
    result,
    site,
)

from repe import load_model  # noqa: E402
from repe.batching import TokenBatch, encode, make_batch  # noqa: E402
from repe.chat import messages  # noqa: E402
from repe.directions import Direction  # noqa: E402
from repe.models import LoadedModel  # noqa: E402
from steering.generate import GenerationConfig, generate, generate_stream  # noqa: E402
from steering.hooks import steer  # noqa: E402
from steering.spec import SteeringSpec  # noqa: E402

PROMPTS = (
    "Give me three tips for staying focused while studying.",
    "Explain to a child why the sky is blue.",
    "Write a short poem about autumn leaves.",
    "What should I pack for a weekend hiking trip?",
    "Describe how a bicycle works in a few sentences.",
)
ONE_LAYER = 12
COEFF = 4.0  # along a unit direction; the residual norm at block 12 is ~140
NEW_TOKENS = 64
TARGET_RATIO = 0.99


def steering_direction(lm: LoadedModel) -> Direction:
    vecs = {site(L): random_unit(lm.d_model, seed=L) for L in range(lm.n_layers)}
    return Direction(vectors=vecs, identity=lm.identity, name="random", method="random")


def chat_batch(lm: LoadedModel, prompts: list[str]) -> TokenBatch:
    enc = encode(lm.tokenizer, [messages(p) for p in prompts])
    return make_batch(enc, int(lm.tokenizer.pad_token_id), "left")


def hf_generate(model: Any, lm: LoadedModel, batch: TokenBatch) -> list[list[int]]:
    """Greedy ``generate`` of exactly NEW_TOKENS tokens (the same call for every library)."""
    with torch.inference_mode():
        out = model.generate(
            input_ids=batch.input_ids.to(lm.device),
            attention_mask=batch.attention_mask.to(lm.device),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
    return out[:, batch.input_ids.shape[1] :].tolist()


# ---- the switching cost -----------------------------------------------------------------------
def toggle_ms(lm: LoadedModel, spec: SteeringSpec, reps: int) -> float:
    def once() -> None:
        with steer(lm, spec):
            pass

    return median_ms(once, reps)


def repeng_toggle_ms(lm: LoadedModel, direction: Direction, reps: int) -> float:
    """repeng's switch over every layer: ``set_control(vector, 1.0)`` then ``reset()`` on a
    ``ControlModel`` wrapping a copy of the model (repeng mutates the model it wraps)."""
    from repeng import ControlModel, ControlVector

    layers = list(range(lm.n_layers))
    cm = ControlModel(copy.deepcopy(lm.model), layers)
    cv = ControlVector(
        model_type=lm.model.config.model_type,
        directions={L: (COEFF * direction[site(L)]).numpy() for L in layers},
    )

    def once() -> None:
        cm.set_control(cv, 1.0)
        cm.reset()

    return median_ms(once, reps)


def toggle_breakdown(lm: LoadedModel, spec: SteeringSpec, reps: int) -> dict[str, float]:
    """Where enter + exit spends its time: ``resolve`` vs registering / removing the hooks."""
    from repe.sites import parse_site
    from steering.spec import resolve

    r = resolve(lm, spec)
    modules = [lm.layers[parse_site(s).layer] for s in r.sites]

    def hooks_only() -> None:
        hs = [
            lm.backbone.register_forward_pre_hook(lambda *a: None, with_kwargs=True, prepend=True)
        ]
        hs += [m.register_forward_hook(lambda *a: None, prepend=True) for m in modules]
        for h in hs:
            h.remove()

    def parse_only() -> None:
        for s in r.sites:
            parse_site(s, lm.n_layers)

    vecs = [spec.direction[s] for s in r.sites]
    dev, dtype = lm.device, lm.dtype

    def tensor_checks() -> None:
        for v in vecs:
            f = v.float()
            bool(torch.isfinite(f).all())
            float(f.norm())
            f.to(dev, dtype)
            f.to(dev, dtype)

    return {
        "resolve": median_ms(lambda: resolve(lm, spec), reps),
        "  per-site isfinite().all() + norm() + 2x .to() (x sites)": median_ms(tensor_checks, reps),
        "  spec.site_list() (Direction.sites sorts via parse_site)": median_ms(
            spec.site_list, reps
        ),
        "  lm.device + lm.dtype (next(model.parameters()))": median_ms(
            lambda: (lm.device, lm.dtype), reps
        ),
        "register+remove hooks": median_ms(hooks_only, reps),
        "parse_site x sites": median_ms(parse_only, reps),
        "check_compatible": median_ms(lambda: spec.direction.check_compatible(lm), reps),
    }


# ---- generation throughput --------------------------------------------------------------------
class Gen:
    """The generation jobs of every library, on one prompt batch chosen per round."""

    def __init__(self, lm: LoadedModel, direction: Direction, batch_size: int) -> None:
        from repeng import ControlModel, ControlVector
        from steering_vectors import SteeringVector

        self.lm = lm
        self.batch_size = batch_size
        self.prompts: list[str] = list(PROMPTS[:batch_size])
        self.batch = chat_batch(lm, self.prompts)
        self.cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
        layers = {"one": [ONE_LAYER], "all": list(range(lm.n_layers))}
        self.specs = {
            k: SteeringSpec(direction.select([site(L) for L in ls]), COEFF, scale="unit")
            for k, ls in layers.items()
        }
        vecs = {k: {L: COEFF * direction[site(L)] for L in ls} for k, ls in layers.items()}
        self.sv = {k: SteeringVector(v, "decoder_block") for k, v in vecs.items()}
        # repeng mutates the model it wraps: each ControlModel gets its own copy (shared nothing)
        self.cm = {k: ControlModel(copy.deepcopy(lm.model), ls) for k, ls in layers.items()}
        self.cv = {
            k: ControlVector(
                model_type=lm.model.config.model_type,
                directions={L: t.numpy() for L, t in v.items()},
            )
            for k, v in vecs.items()
        }

    def set_round(self, r: int) -> None:
        n = self.batch_size
        self.prompts = [PROMPTS[(r + i) % len(PROMPTS)] for i in range(n)]
        self.batch = chat_batch(self.lm, self.prompts)

    # ours
    def ours(self, which: str | None) -> list[str]:
        spec = None if which is None else self.specs[which]
        return generate(self.lm, self.prompts, spec, self.cfg)

    def ours_hf(self, which: str | None) -> list[list[int]]:
        ctx = steer(self.lm, self.specs[which]) if which else contextlib.nullcontext()
        with ctx:
            return hf_generate(self.lm.model, self.lm, self.batch)

    # peers
    def steering_vectors(self, which: str) -> list[list[int]]:
        with self.sv[which].apply(self.lm.model, multiplier=1.0):
            return hf_generate(self.lm.model, self.lm, self.batch)

    def repeng(self, which: str, steered: bool) -> list[list[int]]:
        cm = self.cm[which]
        if steered:
            cm.set_control(self.cv[which], 1.0)
        else:
            cm.reset()
        try:
            return hf_generate(cm, self.lm, self.batch)
        finally:
            cm.reset()

    def ours_jobs(self) -> dict[str, Any]:
        return {
            "ours_loop base": lambda: self.ours(None),
            "hf_generate base": lambda: self.ours_hf(None),
            "hf_generate+steer one": lambda: self.ours_hf("one"),
            "hf_generate+steer all": lambda: self.ours_hf("all"),
        }

    def peer_jobs(self) -> dict[str, Any]:
        return {
            "hf_generate base": lambda: self.ours_hf(None),
            "s-v one": lambda: self.steering_vectors("one"),
            "s-v all": lambda: self.steering_vectors("all"),
            "repeng base one": lambda: self.repeng("one", False),
            "repeng one": lambda: self.repeng("one", True),
            "repeng base all": lambda: self.repeng("all", False),
            "repeng all": lambda: self.repeng("all", True),
        }


def run_rounds(
    gen: Gen, jobs: dict[str, Any], rounds: int, deadline: float, min_rounds: int
) -> Timings:
    """Interleaved rounds; the prompt changes each round (every job of a round sees the same one)."""
    return interleaved(jobs, rounds, deadline, min_rounds, before_round=gen.set_round)


def lockstep(
    lm: LoadedModel,
    prompts: list[str],
    specs: dict[str, SteeringSpec | None],
    cfg: GenerationConfig,
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[str]]]:
    """Run one ``steering.generate`` generation per spec *in lockstep*: step i of every generation is
    timed back to back (order rotated each step), so drifts of a shared machine hit all of them alike.

    Each generation runs in its own ``contextvars.Context`` (the steering state is a context variable,
    and a suspended generator would otherwise leave it set for the others). Returns the CPU and wall
    seconds of every step of each generation (prefill + one per new token) and the texts."""
    gens = {k: generate_stream(lm, prompts, spec, cfg) for k, spec in specs.items()}
    ctxs = {k: contextvars.copy_context() for k in specs}
    cpu: dict[str, list[float]] = {k: [] for k in specs}
    wall: dict[str, list[float]] = {k: [] for k in specs}
    texts: dict[str, list[str]] = {}
    names = list(specs)
    with torch.inference_mode():  # generate_stream enters it too; nesting out of order is harmless
        for step in range(cfg.max_new_tokens):
            for k in names[step % len(names) :] + names[: step % len(names)]:
                c0, t0 = time.process_time(), time.perf_counter()
                texts[k] = ctxs[k].run(next, gens[k]).texts
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
        for k in names:  # finish each generator in its own context (exits its steering)
            ctxs[k].run(lambda g: [None for _ in g], gens[k])
    return cpu, wall, texts


@dataclass
class Lockstep:
    """Per-round, per-step times of lockstep generations."""

    cpu: dict[str, list[list[float]]]
    wall: dict[str, list[list[float]]]

    def totals(self) -> Timings:
        return Timings(
            {k: [sum(r) for r in v] for k, v in self.wall.items()},
            {k: [sum(r) for r in v] for k, v in self.cpu.items()},
        )

    def step_ratio(self, base: str, other: str, clock: str = "cpu") -> tuple[float, float, float]:
        """Median and IQR over every (round, step) of t_base / t_other for the same step index."""
        t = self.cpu if clock == "cpu" else self.wall
        r = sorted(
            b / o
            for rb, ro in zip(t[base], t[other], strict=True)
            for b, o in zip(rb, ro, strict=True)
            if o > 0
        )
        q = statistics.quantiles(r, n=4)
        return statistics.median(r), q[0], q[2]


def run_lockstep(
    lm: LoadedModel,
    batch_size: int,
    specs: dict[str, SteeringSpec | None],
    rounds: int,
    deadline: float,
    min_rounds: int,
) -> Lockstep:
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    out = Lockstep({k: [] for k in specs}, {k: [] for k in specs})
    r = 0
    while r < rounds and (r < min_rounds or time.perf_counter() < deadline):
        prompts = [PROMPTS[(r + i) % len(PROMPTS)] for i in range(batch_size)]
        gc.collect()
        cpu, wall, _texts = lockstep(lm, prompts, specs, cfg)
        for k in specs:
            out.cpu[k].append(cpu[k])
            out.wall[k].append(wall[k])
        r += 1
    return out


def report_lockstep(ls: Lockstep, other: str, label: str) -> float:
    """The tokens/s ratio of a lockstep run: the median over every (round, step) of the paired step
    time ratio (the figure used: robust to a step hit by the scheduler), and the ratio of whole
    generations' times, median over rounds; both CPU time."""
    med, lo, hi = ls.step_ratio("base", other)
    tot = ls.totals()
    n_steps = sum(len(r) for r in ls.cpu["base"])
    print(
        f"INFO {label}_tps_ratio {med:.4f} (CPU time, median of {n_steps} paired steps, IQR "
        f"{lo:.3f}-{hi:.3f}; whole generations: {tot.paired_ratio('base', other):.4f}, IQR "
        f"{tot.spread('base', other)[0]:.3f}-{tot.spread('base', other)[1]:.3f}, wall clock "
        f"{tot.paired_ratio('base', other, 'wall'):.4f}; {tot.rounds(other)} rounds; unsteered "
        f"{NEW_TOKENS / tot.median('base'):.1f} tok per CPU-s)",
        flush=True,
    )
    return med


def report_ratio(t: Timings, base: str, other: str, label: str) -> float:
    """Print the CPU-time ratio (the figure used) and the wall-clock one; return the CPU one."""
    ratio = t.paired_ratio(base, other, "cpu")
    lo, hi = t.spread(base, other, "cpu")
    wall = t.paired_ratio(base, other, "wall")
    wlo, whi = t.spread(base, other, "wall")
    n = NEW_TOKENS
    print(
        f"INFO {label} {ratio:.4f} (CPU time; IQR {lo:.3f}-{hi:.3f}; wall clock {wall:.3f}, IQR "
        f"{wlo:.3f}-{whi:.3f}; {t.rounds(other)} rounds; unsteered "
        f"{n / t.median(base, 'cpu'):.1f} tok per CPU-s, {n / t.median(base, 'wall'):.1f} tok/s wall)",
        flush=True,
    )
    return ratio


# ---- transformer_lens / nnsight (child process in .venv) --------------------------------------
def backends_child(seconds: float, threads: int) -> None:
    """Run in ``.venv``: forward-pass logits time of every back-end, steered vs unsteered."""
    torch.set_num_threads(threads)
    from repe.datasets import load_neutral
    from steering.backends import steered_logits

    lm = load_model()
    direction = steering_direction(lm)
    text = " ".join(load_neutral())
    ids = lm.tokenizer(text)["input_ids"]
    rows = torch.tensor([ids[i * 64 : (i + 1) * 64] for i in range(4)])
    batch = TokenBatch(
        input_ids=rows,
        attention_mask=torch.ones_like(rows),
        position_ids=torch.arange(64).expand(4, 64).clone(),
        offsets=[0] * 4,
        lengths=[64] * 4,
        assistant_starts=[None] * 4,
    )
    specs = {
        "base": None,
        "one": SteeringSpec(direction.select([site(ONE_LAYER)]), COEFF, scale="unit"),
        "all": SteeringSpec(direction, COEFF, scale="unit"),
    }
    out: dict[str, Any] = {}
    jobs: dict[str, Any] = {}
    ref = steered_logits(lm, specs["all"], batch, backend="hf")
    for backend in ("hf", "transformer_lens", "nnsight"):
        try:
            got = steered_logits(lm, specs["all"], batch, backend=backend)  # boots the back-end
            out[backend] = {"rel_diff_vs_hf": float((got - ref).abs().max() / ref.abs().max())}
        except Exception as exc:  # reported by the parent, not hidden
            out[backend] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        for k, s in specs.items():
            jobs[f"{backend} {k}"] = lambda s=s, b=backend: steered_logits(lm, s, batch, backend=b)
    t = interleaved(jobs, 30, deadline=time.perf_counter() + seconds, min_rounds=2)
    for backend, d in out.items():
        if "error" in d:
            continue
        d["one"] = t.paired_ratio(f"{backend} base", f"{backend} one", "cpu")
        d["all"] = t.paired_ratio(f"{backend} base", f"{backend} all", "cpu")
        d["one_wall"] = t.paired_ratio(f"{backend} base", f"{backend} one", "wall")
        d["all_wall"] = t.paired_ratio(f"{backend} base", f"{backend} all", "wall")
        d["base_ms"] = 1e3 * t.median(f"{backend} base", "wall")
        d["rounds"] = t.rounds(f"{backend} base")
    print("CHILD_JSON " + json.dumps(out), flush=True)


def run_backends(seconds: float, threads: int) -> dict[str, Any] | None:
    py = ROOT / ".venv" / "bin" / "python"
    if not py.exists():
        print(f"INFO backends: {py} not found; transformer_lens / nnsight ratios skipped")
        return None
    cmd = [
        str(py),
        str(Path(__file__)),
        "--child-backends",
        f"{seconds:.0f}",
        "--threads",
        str(threads),
    ]
    boot = 75.0  # loading the model and booting the TransformerBridge and nnsight (loaded machine)
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=seconds + boot,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
    except subprocess.TimeoutExpired:
        print("INFO backends: child process timed out; transformer_lens / nnsight ratios skipped")
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("CHILD_JSON "):
            return json.loads(line[len("CHILD_JSON ") :])
    print(f"INFO backends: child failed (rc {proc.returncode}): {proc.stderr.strip()[-400:]}")
    return None


# ---- profile of the hook path -----------------------------------------------------------------
def profile_hooks(lm: LoadedModel, gen: Gen, step_ms: float, reps: int) -> None:
    """Time each piece a steered decode step adds, in isolation (microseconds per call)."""
    from transformers import DynamicCache

    from repe.kvcache import cache_kwargs
    from steering import hooks as H

    batch = gen.batch
    dev = lm.device
    cache: Any = DynamicCache()
    with torch.inference_mode():
        lm.model(
            input_ids=batch.input_ids.to(dev),
            attention_mask=batch.attention_mask.to(dev),
            position_ids=batch.position_ids.to(dev),
            **cache_kwargs(lm.model, cache),
        )
    b, t = batch.input_ids.shape
    kwargs = {
        "input_ids": torch.ones((b, 1), dtype=torch.long),
        "attention_mask": torch.ones((b, t + 1), dtype=torch.long),
        "position_ids": batch.position_ids[:, -1:] + 1,
        **cache_kwargs(lm.backbone, cache),
    }
    h = torch.randn(b, 1, lm.d_model)

    def us(fn: Any) -> float:
        return 1e3 * median_ms(fn, reps, warmup=50)

    rows: list[tuple[str, float, int]] = []
    spec = gen.specs["all"]
    with torch.inference_mode(), steer(lm, spec) as state:
        pre = next(iter(lm.backbone._forward_pre_hooks.values()))
        layer = lm.layers[ONE_LAYER]
        post = next(iter(layer._forward_hooks.values()))
        info = H._token_info((), kwargs)
        rows.append(("pre_backbone hook (whole)", us(lambda: pre(lm.backbone, (), kwargs)), 1))
        rows.append(("  _token_info", us(lambda: H._token_info((), kwargs)), 1))
        rows.append(("  cache.get_seq_length()", us(lambda: cache.get_seq_length()), 1))
        rows.append(
            (
                "  position_mask (bool(real.all()))",
                us(lambda: H.position_mask(state.resolved, None, info)),
                1,
            )
        )
        rows.append(("site hook (whole)", us(lambda: post(layer, (h,), h)), lm.n_layers))
        rows.append(
            (
                "  ContextVar.get + dict lookup",
                us(lambda: (H._CALL.get() or {}).get(1)),
                lm.n_layers,
            )
        )
        rows.append(
            (
                "  apply_operator",
                us(lambda: H.apply_operator(h, state.resolved, None, site(ONE_LAYER))),
                lm.n_layers,
            )
        )
        delta = state.resolved.deltas[site(ONE_LAYER)]
        rows.append(("    h + delta alone", us(lambda: h + delta), lm.n_layers))
        rows.append(("    delta.to(h.dtype) alone", us(lambda: delta.to(h.dtype)), 2 * lm.n_layers))
    # torch's hook dispatch: a module called with one no-op hook vs none
    ident = torch.nn.Identity()
    x = torch.randn(1, 1, 8)
    plain = us(lambda: ident(x))
    handle = ident.register_forward_hook(lambda *a: None)
    hooked = us(lambda: ident(x))
    handle.remove()
    rows.append(
        (
            "torch hook dispatch (module with 1 no-op hook - without)",
            hooked - plain,
            lm.n_layers + 1,
        )
    )
    print(
        f"# profile of one steered decode step (batch {b}, all 30 sites; us per call, median of {reps}):"
    )
    total = 0.0
    for name, v, n in rows:
        print(f"#   {name:<58} {v:8.1f} us  x{n}")
    pieces = [r for r in rows if not r[0].startswith(" ")]
    total = sum(v * n for _, v, n in pieces)
    print(
        f"#   predicted overhead per step {total / 1e3:.3f} ms (pre_backbone + 30 site hooks + 31 "
        f"dispatches) vs a {step_ms:.2f} ms unsteered step: predicted ratio "
        f"{step_ms / (step_ms + total / 1e3):.4f}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="few rounds, no child process (smoke test)"
    )
    ap.add_argument(
        "--budget", type=float, default=500, help="seconds for the whole run (aimed at)"
    )
    ap.add_argument(
        "--rounds", type=int, default=40, help="most rounds of ours (stops at the budget)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (see the docstring)")
    ap.add_argument(
        "--toggle-only", action="store_true", help="only the switching cost (and its RESULT line)"
    )
    ap.add_argument("--batch4", action="store_true", help="also ours with a left-padded batch of 4")
    ap.add_argument(
        "--profile", action="store_true", help="profile the hook path even when it passes"
    )
    ap.add_argument("--child-backends", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_backends is not None:
        backends_child(args.child_backends, args.threads)
        return
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    if args.quick:
        global NEW_TOKENS
        NEW_TOKENS = 8
    from peers_common import require_peers, versions

    require_peers()
    print("# versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    lm = load_model()
    direction = steering_direction(lm)
    print(
        f"# torch threads {torch.get_num_threads()}, {NEW_TOKENS} new tokens greedy (EOS ignored), "
        f"coeff {COEFF} x unit vector, one layer = block {ONE_LAYER}, all = {lm.n_layers} blocks",
        flush=True,
    )
    budget = 60.0 if args.quick else args.budget

    # 1. switching cost
    spec1 = SteeringSpec(direction.select([site(ONE_LAYER)]), COEFF, scale="unit")
    spec30 = SteeringSpec(direction, COEFF, scale="unit")
    toggle: dict[str, list[float]] = {}
    for _ in range(3):  # interleave the settings and repeng's switch
        for k, s in (("one", spec1), ("all", spec30)):
            toggle.setdefault(k, []).append(toggle_ms(lm, s, 100))
        toggle.setdefault("repeng", []).append(repeng_toggle_ms(lm, direction, 100))
    toggle1, toggle30 = statistics.median(toggle["one"]), statistics.median(toggle["all"])
    repeng30 = statistics.median(toggle["repeng"])
    print(f"INFO steer_toggle_ms_one_layer {toggle1:.3f} (enter + exit, median of 300)")
    print(f"INFO steer_toggle_ms_all_layers {toggle30:.3f} (enter + exit, median of 300)")
    print(f"INFO repeng_toggle_ms_all_layers {repeng30:.3f} (set_control + reset, median of 300)")
    toggle_ratio = toggle30 / repeng30
    if args.toggle_only:
        result("steer_toggle_vs_repeng", toggle_ratio, "<=", 1, ".3f")
        return
    for k, v in toggle_breakdown(lm, spec30, 100).items():
        print(f"#   toggle (30 sites) {k}: {v:.3f} ms")

    # 2. generation
    gen = Gen(lm, direction, 1)
    gen.set_round(0)
    texts = {k: job() for k, job in {**gen.ours_jobs(), **gen.peer_jobs()}.items()}  # warm-up
    ours_specs = {"base": None, "one": gen.specs["one"], "all": gen.specs["all"]}
    _cpu, _wall, ours_texts = lockstep(lm, gen.prompts, ours_specs, gen.cfg)  # warm-up
    hf_texts = [
        lm.tokenizer.decode(t, skip_special_tokens=True) for t in texts["hf_generate+steer all"]
    ]
    same = {
        "HF generate in steer": hf_texts == ours_texts["all"],
        "steering-vectors": texts["s-v all"] == texts["hf_generate+steer all"],
        "repeng": texts["repeng all"] == texts["hf_generate+steer all"],
    }
    print(
        "# same greedy tokens as ours (all layers steered): "
        + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same.items())
    )
    print(
        f"# steering changes the output: {ours_texts['all'] != ours_texts['base']}; lockstep "
        f"generations equal separate ones: {ours_texts['base'] == texts['ours_loop base']}"
    )
    left = budget - (time.perf_counter() - t_start)
    child_s = 0.0 if args.quick else min(60.0, 0.12 * left)  # + up to 75 s to boot the child
    gen_s = left - (child_s + 75.0 if child_s else 0.0) - 25.0
    t0 = time.perf_counter()
    quick = args.quick
    t_ours = run_lockstep(lm, 1, ours_specs, args.rounds, t0 + 0.55 * gen_s, 1 if quick else 4)
    t_b4 = None
    if args.batch4:
        t_b4 = run_lockstep(lm, 4, ours_specs, 3, 0.0, 3)
    t_hf = run_rounds(gen, gen.ours_jobs(), args.rounds, t0 + 0.75 * gen_s, 1 if quick else 2)
    t_peers = run_rounds(gen, gen.peer_jobs(), args.rounds, t0 + gen_s, 1 if quick else 2)

    print(f"\n## tokens/s ratio steered / unsteered ({NEW_TOKENS} new tokens, batch 1)")
    print("# ours, steering.generate loop, generations run in lockstep (step by step):")
    r_one = report_lockstep(t_ours, "one", "hf_loop_one_layer")
    r_all = report_lockstep(t_ours, "all", "hf_loop_all_layers")
    if t_b4 is not None:
        print("# ours loop, a batch of 4 chat prompts with left padding, lockstep:")
        report_lockstep(t_b4, "one", "hf_loop_b4_one_layer")
        report_lockstep(t_b4, "all", "hf_loop_b4_all_layers")
    print("# HF model.generate, whole generations interleaved:")
    report_ratio(
        t_hf, "hf_generate base", "hf_generate+steer one", "hf_generate_steer_one_layer_tps_ratio"
    )
    report_ratio(
        t_hf, "hf_generate base", "hf_generate+steer all", "hf_generate_steer_all_layers_tps_ratio"
    )
    print(
        f"INFO ours_loop_vs_hf_generate_unsteered_tps_ratio "
        f"{t_hf.paired_ratio('hf_generate base', 'ours_loop base'):.4f} (CPU time)"
    )
    print("# peers (their own application, HF model.generate), whole generations interleaved:")
    report_ratio(t_peers, "hf_generate base", "s-v one", "steering_vectors_one_layer_tps_ratio")
    report_ratio(t_peers, "hf_generate base", "s-v all", "steering_vectors_all_layers_tps_ratio")
    report_ratio(t_peers, "repeng base one", "repeng one", "repeng_one_layer_tps_ratio")
    report_ratio(t_peers, "repeng base all", "repeng all", "repeng_all_layers_tps_ratio")
    report_ratio(
        t_peers,
        "hf_generate base",
        "repeng base all",
        "repeng_wrapped_unsteered_vs_plain_tps_ratio",
    )

    if child_s > 0:
        child = run_backends(child_s, args.threads)
        if child:
            print("## forward-pass logits time, 4 x 64 tokens, steered_logits (main .venv)")
            for backend, d in child.items():
                if "error" in d:
                    print(f"INFO {backend}_logits: error {d['error']}")
                    continue
                print(
                    f"INFO {backend}_logits_one_layer_time_ratio {d['one']:.4f}  all_layers "
                    f"{d['all']:.4f}  (CPU time; wall clock {d['one_wall']:.3f} / {d['all_wall']:.3f}; "
                    f"unsteered {d['base_ms']:.0f} ms wall, {d['rounds']} rounds; steered logits vs "
                    f"hf rel diff {d['rel_diff_vs_hf']:.1e})"
                )

    step_ms = 1e3 * t_ours.totals().median("base", "cpu") / NEW_TOKENS
    if args.profile or min(r_one, r_all) < TARGET_RATIO or toggle_ratio > 1:
        profile_hooks(lm, gen, step_ms, 300)
    print(f"# total runtime {time.perf_counter() - t_start:.0f}s")
    result("hf_steer_one_layer_tps_ratio", r_one, ">=", TARGET_RATIO, ".4f")
    result("hf_steer_all_layers_tps_ratio", r_all, ">=", TARGET_RATIO, ".4f")
    result("steer_toggle_vs_repeng", toggle_ratio, "<=", 1, ".3f")


if __name__ == "__main__":
    main()
