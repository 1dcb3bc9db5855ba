"""Training interventions whose parameters are few tensors (Aligner tokens and gates, a low-rank
adapter's factors) with supervised fine-tuning on (prompt, response) chats or DPO on preference pairs.

Training runs through ``steer()``, the same hooks that apply the intervention afterwards; the base
model's own weights are frozen. A seeded share of the data is held out: its loss is measured every
``eval_every`` steps, the best parameters are kept, and training stops after ``patience`` evaluations
without improvement. DPO's reference is the base model (a fresh Aligner, gates at zero, and a fresh
adapter, B at zero, both *are* the base model), so its log-likelihoods are computed once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from repe.batching import fingerprint
from repe.models import LoadedModel
from repe.responses import Response, batch_inputs
from steering.aligner import DEFAULT_START_LAYER, Aligner
from steering.hooks import steer
from steering.rahf import frozen_base

OBJECTIVES = ("sft", "dpo")


@dataclass(frozen=True)
class Preference:
    """A prompt with a preferred and a dispreferred response."""

    prompt: str
    chosen: str
    rejected: str


def as_preferences(items: Sequence[Any]) -> list[Preference]:
    """Preference pairs from objects with ``prompt``/``chosen``/``rejected`` (``PreferencePair``) or
    3-tuples; a pair without a chosen answer is refused."""
    out = []
    for i, it in enumerate(items):
        p, c, r = it if isinstance(it, tuple) else (it.prompt, it.chosen, it.rejected)
        if not all(isinstance(x, str) and x.strip() for x in (p, c, r)):
            raise ValueError(f"preference pair {i} needs a prompt, a chosen and a rejected answer")
        out.append(Preference(p, c, r))
    return out


@dataclass(frozen=True)
class TrainConfig:
    objective: str = "sft"  # "sft" or "dpo"
    lr: float = 1e-2
    epochs: int = 3
    batch_size: int = 8
    held_out: float = 0.2  # share of the data held out for early stopping
    patience: int = 2  # evaluations without a held-out improvement before stopping
    eval_every: int = 10  # steps
    beta: float = 0.1  # DPO's temperature
    max_steps: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}; got {self.objective!r}")
        if not 0 <= self.held_out < 1:
            raise ValueError(f"held_out must be in [0, 1); got {self.held_out}")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_every < 1 or self.patience < 1:
            raise ValueError("epochs, batch_size, eval_every and patience must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0) or not self.beta > 0:
            raise ValueError("lr and beta must be positive")


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # step, train, held_out
    steps: int = 0
    best_step: int = 0
    initial_held_out: float = float("nan")
    best_held_out: float = float("nan")
    stopped_early: bool = False
    seconds: float = 0.0
    n_train: int = 0
    n_held_out: int = 0

    def summary(self) -> dict[str, Any]:
        """The figures without the history; a loss that was not measured (no held-out split) is None,
        so the summary writes as strict JSON."""
        out = asdict(self)
        out.pop("history")
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}


def _split(n: int, held_out: float, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = math.ceil(held_out * n) if held_out > 0 and n >= 2 else 0
    return order[k:], order[:k]


def _sft_loss(lm: LoadedModel, batch: Sequence[Response]) -> torch.Tensor:
    inputs, resp = batch_inputs(lm, batch, None)
    labels = inputs["input_ids"].masked_fill(~resp, -100)
    return lm.model(**inputs, labels=labels).loss


def _seq_logps(lm: LoadedModel, items: Sequence[Response]) -> torch.Tensor:
    """``[B]`` summed log-probabilities of each response given its prompt (under the caller's grad
    mode and steering)."""
    inputs, resp = batch_inputs(lm, items, None)
    logits = lm.model(**inputs).logits[:, :-1].float()
    tok = -F.cross_entropy(
        logits.transpose(1, 2), inputs["input_ids"][:, 1:], reduction="none"
    )  # [B, T-1]
    return (tok * resp[:, 1:]).sum(1)


def _pair_logps(lm: LoadedModel, batch: Sequence[Preference]) -> tuple[torch.Tensor, torch.Tensor]:
    items = [Response(p.prompt, p.chosen) for p in batch] + [
        Response(p.prompt, p.rejected) for p in batch
    ]
    lp = _seq_logps(lm, items)
    return lp[: len(batch)], lp[len(batch) :]


def _dpo_loss(
    lm: LoadedModel, batch: Sequence[Preference], ref: torch.Tensor, beta: float
) -> torch.Tensor:
    c, r = _pair_logps(lm, batch)
    return -F.logsigmoid(beta * ((c - ref[:, 0]) - (r - ref[:, 1]))).mean()


def train_intervention(
    lm: LoadedModel,
    intervention: Any,
    params: Sequence[torch.Tensor],
    data: Sequence[Any],
    config: TrainConfig | None = None,
    *,
    progress: bool = True,
    desc: str = "train",
    on_step: Callable[[int, int, float], None] | None = None,
    held_out_data: Sequence[Any] | None = None,
) -> TrainResult:
    """Train ``params`` (tensors of ``intervention``) in place on ``data``: :class:`Response` s for
    ``sft``, preference pairs for ``dpo``. The best held-out parameters are left in ``params``. The
    held-out split is a seeded ``config.held_out`` share of ``data``, or ``held_out_data`` when given."""
    cfg = config or TrainConfig()

    def prepared(rows: Sequence[Any]) -> list[Any]:
        if cfg.objective == "dpo":
            return list(as_preferences(rows))
        return [d if isinstance(d, Response) else Response(*d) for d in rows]

    items = prepared(data)
    if held_out_data is not None:
        if len(items) < 1 or len(held_out_data) < 1:
            raise ValueError("training needs at least 1 example and 1 held-out example")
        train_idx = list(range(len(items)))
        items += prepared(held_out_data)
        held_idx = list(range(len(train_idx), len(items)))
    elif len(items) < 2:
        raise ValueError(f"training needs at least 2 examples; got {len(items)}")
    else:
        train_idx, held_idx = _split(len(items), cfg.held_out, cfg.seed)
    result = TrainResult(n_train=len(train_idx), n_held_out=len(held_idx))
    bs = cfg.batch_size

    ref: torch.Tensor | None = None
    if cfg.objective == "dpo":  # the base model's log-likelihoods, once
        ref_rows = []
        with torch.inference_mode():
            for s in range(0, len(items), bs):
                c, r = _pair_logps(lm, items[s : s + bs])
                ref_rows.append(torch.stack([c, r], 1))
        ref = torch.cat(ref_rows)

    def loss_of(idx: Sequence[int]) -> torch.Tensor:
        batch = [items[i] for i in idx]
        with steer(lm, intervention):
            if cfg.objective == "sft":
                return _sft_loss(lm, batch)
            assert ref is not None
            return _dpo_loss(lm, batch, ref[list(idx)], cfg.beta)

    def held_loss() -> float:
        if not held_idx:
            return float("nan")
        with torch.no_grad():
            tot = 0.0
            for s in range(0, len(held_idx), bs):
                chunk = held_idx[s : s + bs]
                tot += float(loss_of(chunk)) * len(chunk)
        return tot / len(held_idx)

    g = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(train_idx) / bs)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(list(params), lr=cfg.lr)
    was_training = lm.model.training
    lm.model.eval()
    t0 = time.perf_counter()
    best = [p.detach().clone() for p in params]
    result.initial_held_out = result.best_held_out = held_loss()
    bad_evals, step = 0, 0
    try:
        with (
            frozen_base(lm),
            tqdm(total=total, desc=desc, unit="step", disable=not progress) as bar,
        ):
            while step < total and not result.stopped_early:
                order = torch.randperm(len(train_idx), generator=g).tolist()
                for s in range(0, len(order), bs):
                    if step >= total:
                        break
                    loss = loss_of([train_idx[i] for i in order[s : s + bs]])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    value = float(loss.detach())
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.3f}")
                    if on_step is not None:
                        on_step(step, total, value)
                    if held_idx and (step % cfg.eval_every == 0 or step == total):
                        h = held_loss()
                        result.history.append({"step": step, "train": value, "held_out": h})
                        if h < result.best_held_out:
                            result.best_held_out, result.best_step, bad_evals = h, step, 0
                            best = [p.detach().clone() for p in params]
                        else:
                            bad_evals += 1
                            if bad_evals >= cfg.patience:
                                result.stopped_early = True
                                break
                    elif not held_idx:
                        result.history.append({"step": step, "train": value})
    finally:
        lm.model.train(was_training)
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    if held_idx:
        with torch.no_grad():
            for p, b in zip(params, best, strict=True):
                p.copy_(b)
    else:
        result.best_step = step
    result.steps = step
    result.seconds = time.perf_counter() - t0
    return result


def data_fingerprint(data: Sequence[Any]) -> str:
    """A short hash of training data (responses or preference pairs)."""
    rows = [
        [d.prompt, d.response]
        if isinstance(d, Response)
        else list(as_preferences([d])[0].__dict__.values())
        for d in data
    ]
    return fingerprint([" \x1f ".join(r) for r in rows])


def train_aligner(
    lm: LoadedModel,
    data: Sequence[Any],
    *,
    n_tokens: int = 1,
    start_layer: int = DEFAULT_START_LAYER,
    config: TrainConfig | None = None,
    name: str = "aligner",
    progress: bool = True,
    on_step: Callable[[int, int, float], None] | None = None,
    held_out_data: Sequence[Any] | None = None,
) -> tuple[Aligner, TrainResult]:
    """A fresh Aligner trained on ``data`` (SFT: responses; DPO: preference pairs). Its ``params``
    record how (objective, N, start layer, learning rate, data fingerprint) and its ``metrics`` the
    held-out losses."""
    cfg = config or TrainConfig()
    al = Aligner.init(lm, n_tokens, start_layer=start_layer, seed=cfg.seed, name=name)
    result = train_intervention(
        lm,
        al,
        al.parameters(),
        data,
        cfg,
        progress=progress,
        desc=f"Aligner N={n_tokens}",
        on_step=on_step,
        held_out_data=held_out_data,
    )
    al.method = cfg.objective
    al.params = {
        **{k: v for k, v in asdict(cfg).items()},
        "n_examples": len(data),
        "data_fingerprint": data_fingerprint(data),
    }
    al.metrics = result.summary()
    return al, result
