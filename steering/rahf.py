"""RAHF: train a low-rank adapter so that the model's own representations move by a preference activity
pattern (Liu et al., ACL 2024, "Aligning Large Language Models with Human Preferences through
Representation Engineering").

For a (prompt, response) read plainly (no instruction), the target at each chosen block and response
token is ``T = h_frozen(plain) + alpha_pattern * (h(preferred) - h(dispreferred))``, the last two read
under the preferred and dispreferred instructions (``repe.responses``; the pattern itself is
``probes.preference``); the loss is the mean L2 distance
(not squared) between the adapted model's states on the plain input and ``T``. The adapter
(``steering.adapter.LowRankAdapter``, q/v projections by default) is applied through ``steer()``, the same
hooks that apply it afterwards; the base weights are frozen while it trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from tqdm.auto import tqdm

from repe.chat import messages
from repe.models import LoadedModel
from repe.responses import (
    BAD_INSTRUCTION,
    GOOD_INSTRUCTION,
    Condition,
    CondLike,
    Response,
    aligned,
    as_condition,
    batch_inputs,
    check_layers,
    hidden_on_responses,
    response_states,
)
from steering.adapter import DEFAULT_TARGETS, LowRankAdapter
from steering.generate import GenerationConfig, generate
from steering.hooks import steer


def setting(intervention: Any, instruction: str | None = None, label: str = "") -> Condition:
    """The condition of reading under ``intervention`` (an adapter, a steering spec: any
    Intervention), for patterns of type (b): the model with vs without a setting."""
    return Condition(
        instruction=instruction,
        scope=lambda lm: steer(lm, intervention),
        label=label or f"under {getattr(intervention, 'name', type(intervention).__name__)}",
    )


def own_answers(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    instruction: str | None = None,
    max_new_tokens: int = 40,
    batch_size: int = 32,
    progress: bool = False,
) -> list[Response]:
    """The model's own greedy answers to ``prompts`` (the anchor of D2O-style negative-only data).
    An answer that comes out empty is dropped."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens)
    out = []
    starts = range(0, len(prompts), batch_size)
    for s in tqdm(starts, desc="own answers", unit="batch", disable=not progress):
        chunk = list(prompts[s : s + batch_size])
        chats = [messages(q, system=instruction) for q in chunk]
        for q, a in zip(chunk, generate(lm, chats, None, cfg), strict=True):
            if a.strip():
                out.append(Response(q, a.strip()))
    return out


@dataclass(frozen=True)
class SCITConfig:
    """Contrastive instruction tuning (RAHF's first step, "SCIT"): one adapter that teaches the model to
    give the preferred responses under the preferred instruction and the dispreferred responses under
    the dispreferred one, so that the two instructions carry the preference the pattern then reads."""

    preferred: str | None = GOOD_INSTRUCTION
    dispreferred: str | None = BAD_INSTRUCTION
    rank: int = 8
    alpha: float = 16.0
    lr: float = 3e-4
    epochs: int = 2
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.preferred == self.dispreferred:
            raise ValueError("SCIT needs two different instructions")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")


def scit_tune(
    lm: LoadedModel,
    preferred: Sequence[Response],
    dispreferred: Sequence[Response],
    config: SCITConfig | None = None,
    *,
    progress: bool = True,
    on_step: Callable[[int, int, float], None] | None = None,
) -> LowRankAdapter:
    """Train the SCIT adapter (every block's q/v): next-token loss on the response tokens of the
    ``preferred`` responses read under ``config.preferred`` and of the ``dispreferred`` ones under
    ``config.dispreferred``. The base weights stay frozen."""
    cfg = config or SCITConfig()
    if not preferred or not dispreferred:
        raise ValueError("SCIT needs preferred and dispreferred responses")
    g = torch.Generator().manual_seed(cfg.seed)
    batches = []
    for group, instr in ((preferred, cfg.preferred), (dispreferred, cfg.dispreferred)):
        order = torch.randperm(len(group), generator=g).tolist()
        for s in range(0, len(order), cfg.batch_size):
            chunk = [group[i] for i in order[s : s + cfg.batch_size]]
            inputs, resp = batch_inputs(lm, chunk, instr)
            batches.append((inputs, inputs["input_ids"].masked_fill(~resp, -100)))
    ad = LowRankAdapter.init(
        lm, list(range(lm.n_layers)), rank=cfg.rank, alpha=cfg.alpha, seed=cfg.seed, name="scit"
    )
    ad.method = "scit"
    ad.params = {
        "preferred": cfg.preferred,
        "dispreferred": cfg.dispreferred,
        "lr": cfg.lr,
        "epochs": cfg.epochs,
        "n_preferred": len(preferred),
        "n_dispreferred": len(dispreferred),
    }
    params = ad.parameters()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    total, step = cfg.epochs * len(batches), 0
    was_training = lm.model.training
    lm.model.eval()
    try:
        with (
            frozen_base(lm),
            tqdm(total=total, desc="SCIT", unit="step", disable=not progress) as bar,
        ):
            for _ in range(cfg.epochs):
                for i in torch.randperm(len(batches), generator=g).tolist():
                    inputs, labels = batches[i]
                    with steer(lm, ad):
                        loss = lm.model(**inputs, labels=labels).loss
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    value = float(loss.detach())
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.3f}")
                    if on_step is not None:
                        on_step(step, total, value)
    finally:
        lm.model.train(was_training)
        for p in params:
            p.requires_grad_(False)
    return ad


def default_layers(n_layers: int, k: int = 4) -> list[int]:
    """``k`` blocks spread over 30-60% of the depth (where RAHF puts its targets)."""
    lo, hi = round(0.3 * n_layers), max(round(0.3 * n_layers), round(0.6 * n_layers) - 1)
    if k == 1 or hi == lo:
        return [lo]
    return sorted({round(lo + i * (hi - lo) / (k - 1)) for i in range(k)})


@dataclass(frozen=True)
class RAHFConfig:
    layers: tuple[int, ...] | None = None  # target blocks; None: default_layers
    adapter_layers: tuple[int, ...] | None = (
        None  # blocks the adapter changes; None: up to the last target
    )
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rank: int = 8
    alpha: float = 16.0
    alpha_pattern: float = 5.0
    preferred: CondLike = GOOD_INSTRUCTION  # an instruction, None, or a Condition
    dispreferred: CondLike = BAD_INSTRUCTION
    plain: str | None = None  # the instruction the adapted model reads (None: the model's default)
    lr: float = 1e-3
    epochs: int = 4
    batch_size: int = 4
    held_out: float = 0.2
    patience: int = 2  # evaluations without a held-out improvement before stopping
    eval_every: int = 10  # steps
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.held_out < 1:
            raise ValueError(f"held_out must be in (0, 1); got {self.held_out}")
        if self.batch_size < 1 or self.epochs < 1 or self.eval_every < 1:
            raise ValueError("batch_size, epochs and eval_every must be >= 1")
        if not math.isfinite(self.alpha_pattern) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError("alpha_pattern must be finite and lr > 0")

    def describe(self) -> dict[str, Any]:
        """The settings as JSON-able values (conditions by their description)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("preferred", "dispreferred"):
                v = as_condition(v).describe()
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


@dataclass
class RAHFBatch:
    """One batch's plain inputs, response-token mask and frozen targets ``[L, N, d]``."""

    inputs: dict[str, torch.Tensor]
    resp: torch.Tensor
    target: torch.Tensor


def prepare(
    lm: LoadedModel,
    items: Sequence[Response],
    layers: Sequence[int],
    cfg: RAHFConfig,
    *,
    pooled: torch.Tensor | None = None,
    progress: bool = False,
) -> list[RAHFBatch]:
    """Targets for ``items`` in batches of ``cfg.batch_size`` (read once, with the model frozen).
    With ``pooled`` (``[L, d]``, one vector per target block) the pattern added at every response
    token is that vector (a pooled pattern: responses that differ) instead of the per-token
    difference of the two conditions."""
    layers = check_layers(lm, layers)
    if pooled is not None and tuple(pooled.shape) != (len(layers), lm.d_model):
        raise ValueError(
            f"pooled pattern has shape {tuple(pooled.shape)}; expected "
            f"({len(layers)}, {lm.d_model}) (one vector per target block)"
        )
    out = []
    starts = range(0, len(items), cfg.batch_size)
    for s in tqdm(starts, desc="RAHF targets", unit="batch", disable=not progress):
        chunk = items[s : s + cfg.batch_size]
        inputs, resp = batch_inputs(lm, chunk, cfg.plain)
        with torch.no_grad():
            plain = hidden_on_responses(lm, inputs, resp, layers).float()
        if pooled is not None:
            shift = pooled.to(plain.device, plain.dtype)[:, None, :]
            out.append(RAHFBatch(inputs, resp, plain + cfg.alpha_pattern * shift))
            continue
        pos = response_states(lm, chunk, layers, cfg.preferred)
        neg = response_states(lm, chunk, layers, cfg.dispreferred)
        aligned(pos, neg)
        aligned(plain, pos)
        out.append(RAHFBatch(inputs, resp, plain + cfg.alpha_pattern * (pos - neg)))
    return out


def rahf_loss(
    lm: LoadedModel, adapter: LowRankAdapter, batch: RAHFBatch, layers: Sequence[int]
) -> torch.Tensor:
    """Mean L2 distance between the adapted states on the response tokens and the targets."""
    with steer(lm, adapter):
        h = hidden_on_responses(lm, batch.inputs, batch.resp, layers)
    return (h.float() - batch.target).norm(dim=-1).mean()


class frozen_base:
    """Inside: the model's own parameters do not require gradients (restored on exit)."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.saved: list[tuple[torch.nn.Parameter, bool]] = []

    def __enter__(self) -> None:
        self.saved = [(p, p.requires_grad) for p in self.lm.model.parameters()]
        for p, _ in self.saved:
            p.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for p, flag in self.saved:
            p.requires_grad_(flag)


@dataclass
class RAHFResult:
    adapter: LowRankAdapter
    layers: list[int]
    history: list[dict[str, float]] = field(default_factory=list)  # step, train, held_out
    best_step: int = 0
    initial_held_out: float = float("nan")
    best_held_out: float = float("nan")
    stopped_early: bool = False


def _mean_loss(
    lm: LoadedModel, adapter: LowRankAdapter, batches: Sequence[RAHFBatch], layers: list[int]
) -> float:
    with torch.no_grad():
        tot = sum(float(rahf_loss(lm, adapter, b, layers)) * int(b.resp.sum()) for b in batches)
    return tot / max(1, sum(int(b.resp.sum()) for b in batches))


def train_rahf(
    lm: LoadedModel,
    items: Sequence[Response],
    config: RAHFConfig | None = None,
    *,
    progress: bool = True,
    name: str = "rahf",
    pooled: torch.Tensor | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> RAHFResult:
    """Train an adapter on ``items`` (a seeded held-out share decides early stopping; the adapter
    returned is the one with the lowest held-out loss). ``pooled``: see :func:`prepare`.
    ``on_step(step, total, loss)`` is called after every step (a progress bar in the app)."""
    cfg = config or RAHFConfig()
    layers = check_layers(lm, cfg.layers if cfg.layers is not None else default_layers(lm.n_layers))
    if len(items) < 2:
        raise ValueError(f"RAHF needs at least 2 items (train and held out); got {len(items)}")
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(items), generator=g).tolist()
    n_held = max(1, round(cfg.held_out * len(items)))
    held = [items[i] for i in order[:n_held]]
    train = [items[i] for i in order[n_held:]]
    adapter_layers = (
        list(cfg.adapter_layers) if cfg.adapter_layers else list(range(max(layers) + 1))
    )
    adapter = LowRankAdapter.init(
        lm,
        adapter_layers,
        targets=cfg.targets,
        rank=cfg.rank,
        alpha=cfg.alpha,
        seed=cfg.seed,
        name=name,
    )
    adapter.method = "rahf"
    adapter.params = {
        **cfg.describe(),
        "layers": layers,
        "adapter_layers": adapter_layers,
        "pattern": "pooled" if pooled is not None else "token",
    }
    train_b = prepare(lm, train, layers, cfg, pooled=pooled, progress=progress)
    held_b = prepare(lm, held, layers, cfg, pooled=pooled, progress=progress)
    params = adapter.parameters()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    res = RAHFResult(adapter, layers)
    res.initial_held_out = res.best_held_out = _mean_loss(lm, adapter, held_b, layers)
    best = [p.detach().clone() for p in params]
    bad, step = 0, 0
    total = cfg.epochs * len(train_b)
    bar = tqdm(total=total, desc="RAHF", unit="step", disable=not progress)
    was_training = lm.model.training
    lm.model.eval()
    try:
        with frozen_base(lm), bar:
            for _epoch in range(cfg.epochs):
                perm = torch.randperm(len(train_b), generator=g).tolist()
                for i in perm:
                    loss = rahf_loss(lm, adapter, train_b[i], layers)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    loss_value = float(loss.detach())
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.3f}")
                    if on_step is not None:
                        on_step(step, total, loss_value)
                    if step % cfg.eval_every == 0 or step == total:
                        held_loss = _mean_loss(lm, adapter, held_b, layers)
                        res.history.append(
                            {"step": step, "train": loss_value, "held_out": held_loss}
                        )
                        if held_loss < res.best_held_out:
                            res.best_held_out, res.best_step, bad = held_loss, step, 0
                            best = [p.detach().clone() for p in params]
                        else:
                            bad += 1
                            res.stopped_early = bad >= cfg.patience
                    if res.stopped_early:
                        break
                if res.stopped_early:
                    break
    finally:
        lm.model.train(was_training)
    with torch.no_grad():
        for p, b in zip(params, best, strict=True):
            p.copy_(b)
            p.requires_grad_(False)
    adapter.metrics = {
        "held_out_loss_initial": res.initial_held_out,
        "held_out_loss_best": res.best_held_out,
        "best_step": res.best_step,
        "steps": step,
    }
    return res
