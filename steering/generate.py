"""Generation with and without steering: batched (left padding), greedy or seeded sampling, streamed
token by token, and baseline vs steered side by side."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from repe.batching import Inputs, encode, make_batch
from repe.chat import messages
from repe.kvcache import cache_kwargs
from repe.models import LoadedModel
from steering.hooks import steer
from steering.spec import SteeringSpec

Prompts = Sequence[str] | Sequence[list[dict[str, str]]]


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling; got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")


@dataclass
class Step:
    """One generation step: the new token of every row, the text generated so far, and the ``[B, V]``
    next-token logits the token was picked from."""

    index: int
    token_ids: list[int]
    texts: list[str]
    finished: list[bool]
    logits: torch.Tensor | None = None


def as_chats(prompts: Prompts, chat: bool = True) -> Inputs:
    """User strings become one-turn chats (the model answers as the assistant); conversations pass."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings or conversations, not a single string")
    if not prompts:
        raise ValueError("prompts is empty")
    if chat and isinstance(prompts[0], str):
        return [messages(p) for p in prompts]  # type: ignore[arg-type]
    return prompts  # type: ignore[return-value]


def _pick(
    logits: torch.Tensor,
    cfg: GenerationConfig,
    gen: torch.Generator | None,
    rows: list[torch.Generator] | None = None,
) -> torch.Tensor:
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = (logits.float() / cfg.temperature).softmax(-1)
    idx: torch.Tensor | None = None
    if cfg.top_p < 1.0:
        # the nucleus almost always lies in the top 512 tokens: find it there (exact) and draw among
        # those candidates only; sort the whole vocabulary only when some row's top 512 hold less
        # than top_p
        sorted_p, idx = probs.topk(min(512, probs.shape[-1]), dim=-1)
        if bool((sorted_p.sum(-1) < cfg.top_p).any()):
            sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < cfg.top_p
        probs = sorted_p * keep
    if rows is not None:  # one generator per row: a row's draws do not depend on its batch
        drawn = torch.cat(
            [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, rows, strict=True)]
        )
    else:
        drawn = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    return drawn if idx is None else idx.gather(-1, drawn.unsqueeze(-1)).squeeze(-1)


def generate_stream(
    lm: LoadedModel,
    prompts: Prompts,
    spec: SteeringSpec | None = None,
    config: GenerationConfig | None = None,
    *,
    chat: bool = True,
    seeds: Sequence[int] | None = None,
) -> Generator[Step, None, None]:
    """Yield one :class:`Step` per new token (all prompts in one left-padded batch, KV cache on).
    ``seeds`` (one per prompt, sampling only): each row samples from its own generator, so a row's
    answer is the same whatever else shares its batch."""
    cfg = config or GenerationConfig()
    inputs = as_chats(prompts, chat)
    enc = encode(lm.tokenizer, inputs)
    batch = make_batch(enc, lm.tokenizer.pad_token_id, "left")
    dev = lm.device
    ids = batch.input_ids.to(dev)
    mask = batch.attention_mask.to(dev)
    pos = batch.position_ids.to(dev)
    eos = lm.tokenizer.eos_token_id
    gen = torch.Generator(device=dev).manual_seed(cfg.seed) if cfg.do_sample else None
    rows = None
    if seeds is not None:
        if len(seeds) != len(enc):
            raise ValueError(f"seeds must give one seed per prompt: {len(seeds)} for {len(enc)}")
        if cfg.do_sample:
            rows = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]
    out_ids: list[list[int]] = [[] for _ in enc]
    finished = [False] * len(enc)
    from transformers import DynamicCache

    # The steering lives in a private context: every step runs in it (``scope.run``), so between two
    # steps nothing is steered in the caller's context, whatever the caller runs there (another stream,
    # a baseline forward pass, another thread's work).
    scope = contextvars.copy_context()
    hooks = contextlib.ExitStack()
    cache: Any = DynamicCache()

    def step(step_ids: torch.Tensor, mask: torch.Tensor, step_pos: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return lm.model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_pos,
                **cache_kwargs(lm.model, cache),
                logits_to_keep=1,
            ).logits[:, -1]

    try:
        if spec is not None:
            state = scope.run(hooks.enter_context, steer(lm, spec))
            scope.run(state.begin_batch, batch)
        step_ids, step_pos = ids, pos
        for i in range(cfg.max_new_tokens):
            logits = scope.run(step, step_ids, mask, step_pos)
            nxt = _pick(logits, cfg, gen, rows)
            toks = nxt.tolist()
            for b, t in enumerate(toks):
                if not finished[b]:
                    out_ids[b].append(t)
                    if cfg.stop_at_eos and t == eos:
                        finished[b] = True
            texts = [lm.tokenizer.decode(o, skip_special_tokens=True) for o in out_ids]
            yield Step(i, toks, texts, list(finished), logits)
            if all(finished):
                break
            step_ids = nxt.unsqueeze(-1)
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
    finally:
        scope.run(hooks.close)


def generate(
    lm: LoadedModel,
    prompts: Prompts,
    spec: SteeringSpec | None = None,
    config: GenerationConfig | None = None,
    *,
    chat: bool = True,
    seeds: Sequence[int] | None = None,
) -> list[str]:
    """Completions of every prompt (steered when ``spec`` is given)."""
    texts: list[str] = []
    for step in generate_stream(lm, prompts, spec, config, chat=chat, seeds=seeds):
        texts = step.texts
    return texts


@dataclass(frozen=True)
class Comparison:
    prompt: str
    baseline: str
    steered: str


def compare(
    lm: LoadedModel,
    prompts: Prompts,
    spec: SteeringSpec,
    config: GenerationConfig | None = None,
) -> list[Comparison]:
    """Baseline and steered completions side by side (same prompts, same sampling seed)."""
    base = generate(lm, prompts, None, config)
    steered = generate(lm, prompts, spec, config)
    shown = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
    return [Comparison(p, b, s) for p, b, s in zip(shown, base, steered, strict=True)]
