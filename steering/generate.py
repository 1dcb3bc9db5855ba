"""Generation with and without steering: batched (left padding), greedy or seeded sampling, streamed
token by token, and baseline vs steered side by side."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from repe.batching import Encoded, Inputs, encode, make_batch
from repe.chat import messages
from repe.kvcache import cache_from_tensors, cache_kwargs, dynamic_layers
from repe.models import LoadedModel
from steering.hooks import needs_sequence, steer
from steering.intervention import Intervention, as_resolved
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


#: tokens per call when a batch's prompts are run in length buckets (``prefill_split``)
PREFILL_TOKENS = 2048


def _splittable(lm: LoadedModel, spec: Any) -> bool:
    """Whether the prompts may run in several calls (a shared prefix, then length buckets): true when
    every hook acts token by token, i.e. the intervention needs no declared sequence (a condition reads
    the whole prompt; prompt/generated/assistant positions count the sequence's tokens)."""
    return spec is None or not needs_sequence(as_resolved(lm, spec))


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one of its own."""
    first, n = rows[0], min(len(r) for r in rows) - 1
    p = 0
    while p < n and all(r[p] == first[p] for r in rows):
        p += 1
    return p


def prefill_split(
    rows: Sequence[Sequence[int]],
    pad_id: int,
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor],
    device: torch.device | str,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """Prefill a batch of prompts without paying for the tokens they share or for most padding.

    The tokens every row starts with (a chat template and system prompt) run once, as a batch of one;
    each row's own tokens run after that prefix in buckets of similar length (about ``max_tokens``
    tokens per call; default ``PREFILL_TOKENS``), and the buckets' KV caches are joined into one batch whose rows read
    ``[shared prefix][padding][own tokens]``: a row's attention mask hides the padding and its position
    ids count its real tokens, so every row computes what it computes alone. ``run(ids, mask, pos,
    cache)`` is one forward call returning the last column's logits. Returns the ``[B, V]`` logits,
    the cache, the ``[B, T]`` attention mask and the ``[B, 1]`` position of each row's last token.
    Falls back to one left-padded call when the model's cache is not a plain ``DynamicCache``."""
    from transformers import DynamicCache

    max_tokens = max_tokens or PREFILL_TOKENS
    b = len(rows)
    p = _common_prefix(rows)
    prefix: Any = None
    prefix_layers: list[Any] = []
    if p:
        ids = torch.tensor([list(rows[0][:p])], device=device)
        prefix = DynamicCache()
        run(ids, torch.ones_like(ids), torch.arange(p, device=device)[None], prefix)
        found = dynamic_layers(prefix)
        if found is None:
            return _prefill_plain(rows, pad_id, run, device)
        prefix_layers = found
    order = sorted(range(b), key=lambda i: -len(rows[i]))
    s_max = len(rows[order[0]]) - p
    keys: list[list[torch.Tensor]] = []
    values: list[list[torch.Tensor]] = []
    logits, masks = [], []
    start = 0
    while start < b:
        width = len(rows[order[start]]) - p  # the bucket's longest row: rows are longest first
        group = order[start : start + max(1, max_tokens // width)]
        start += len(group)
        sb = make_batch([Encoded(list(rows[i][p:]), None) for i in group], pad_id, "left")
        n, gap = len(group), s_max - sb.input_ids.shape[1]
        cache: Any = DynamicCache()
        for li, layer in enumerate(prefix_layers):
            cache.update(layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1), li)
        own = sb.attention_mask.to(device)
        head = torch.ones((n, p), dtype=own.dtype, device=device)
        logits.append(
            run(
                sb.input_ids.to(device),
                torch.cat([head, own], -1),
                sb.position_ids.to(device) + p,
                cache,
            )
        )
        layers = dynamic_layers(cache)
        if layers is None:
            return _prefill_plain(rows, pad_id, run, device)
        for li, layer in enumerate(layers):
            if li == len(keys):
                keys.append([])
                values.append([])
            for store, t in ((keys[li], layer.keys), (values[li], layer.values)):
                hole = t.new_zeros((*t.shape[:2], gap, t.shape[3]))
                store.append(torch.cat([t[:, :, :p], hole, t[:, :, p:]], dim=-2))
        masks.append(torch.cat([head, own.new_zeros((n, gap)), own], -1))
    back = torch.empty(b, dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(b)
    back = back.to(device)
    cache = cache_from_tensors(
        [
            (torch.cat(k).index_select(0, back), torch.cat(v).index_select(0, back))
            for k, v in zip(keys, values, strict=True)
        ]
    )
    last = torch.tensor([[len(r) - 1] for r in rows], device=device)
    return (
        torch.cat(logits).index_select(0, back),
        cache,
        torch.cat(masks).index_select(0, back),
        last,
    )


def _prefill_plain(
    rows: Sequence[Sequence[int]],
    pad_id: int,
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor],
    device: torch.device | str,
) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    from transformers import DynamicCache

    batch = make_batch([Encoded(list(r), None) for r in rows], pad_id, "left")
    cache = DynamicCache()
    mask = batch.attention_mask.to(device)
    pos = batch.position_ids.to(device)
    return run(batch.input_ids.to(device), mask, pos, cache), cache, mask, pos[:, -1:]


def generate_stream(
    lm: LoadedModel,
    prompts: Prompts,
    spec: SteeringSpec | Intervention | None = None,
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

    # The steering lives in a private context: every step runs in it (``scope.run``), so between two
    # steps nothing is steered in the caller's context, whatever the caller runs there (another stream,
    # a baseline forward pass, another thread's work).
    scope = contextvars.copy_context()
    hooks = contextlib.ExitStack()

    def run(
        step_ids: torch.Tensor, mask: torch.Tensor, step_pos: torch.Tensor, cache: Any
    ) -> torch.Tensor:
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
        prefill = prefill_split if len(enc) > 1 and _splittable(lm, spec) else _prefill_plain
        logits, cache, mask, step_pos = scope.run(
            prefill, [e.ids for e in enc], lm.tokenizer.pad_token_id, run, dev
        )
        for i in range(cfg.max_new_tokens):
            nxt = _pick(logits, cfg, gen, rows)
            toks = nxt.tolist()
            for b, t in enumerate(toks):
                if not finished[b]:
                    out_ids[b].append(t)
                    if cfg.stop_at_eos and t == eos:
                        finished[b] = True
            texts = [lm.tokenizer.decode(o, skip_special_tokens=True) for o in out_ids]
            yield Step(i, toks, texts, list(finished), logits)
            if all(finished) or i + 1 == cfg.max_new_tokens:
                break
            step_pos = step_pos + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            logits = scope.run(run, nxt.unsqueeze(-1), mask, step_pos, cache)
    finally:
        scope.run(hooks.close)


def generate(
    lm: LoadedModel,
    prompts: Prompts,
    spec: SteeringSpec | Intervention | None = None,
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
