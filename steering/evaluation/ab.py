"""Measuring the effect of steering, and its cost.

* The effect: CAA's A/B evaluation (:func:`ab_eval`). Each held-out question is the user turn and the
  assistant turn is opened with ``"("``, so the next token is the answer letter; the score is the mean over
  items of ``p(matching) / (p(matching) + p(not matching))`` (for A/B items ``p(matching) / (p(A) + p(B))``).
* The cost: how far steering moves the model on neutral text — mean ``KL(base || steered)`` of the
  next-token distributions over every real token (:func:`kl_from_base`) and the perplexity
  (:func:`perplexity`).
* A prompt in front of the question: ``context`` (a system message and/or earlier user / assistant turns)
  goes before every item's user turn, e.g. to compare steering with prompting
  (:mod:`steering.evaluation.prompting`); ``None`` leaves the prompts as they are.

Every prompt runs as two passes: the question (KV cache), then the opened answer ``"("``. A spec that
steers only the assistant turn (``positions="assistant"``, as CAA does) leaves the question untouched,
so :func:`ab_eval_specs` runs the question once for all such specs (and for ``None`` and coefficient-0
``add`` specs) and each adds one token per prompt; other specs steer both passes (a conditional spec
runs one whole forward, as it decides on the whole prompt).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from repe.batching import Encoded, TokenBatch, encode, make_batch
from repe.chat import Message, messages
from repe.datasets import CAAItem
from repe.datasets.caa import answer_letter, caa_split
from repe.kvcache import cache_kwargs, crop_cache
from repe.models import LoadedModel
from steering.hooks import steer
from steering.operators import OPERATORS
from steering.spec import SteeringSpec

ANSWER_OPENER = "("


# ---- the effect: A/B ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ABResult:
    """A/B evaluation of one setting.

    ``score`` is the mean matching probability (renormalised over the two answer letters), in [0, 1].
    ``balanced_score`` averages it first within the items whose matching answer is A, B, ..., then over
    the letters: a shift of the model's preference between letters (which small models show under
    steering) moves ``score`` with the mix of letters in the items, but cancels in ``balanced_score``;
    the two agree when the letters are equally represented (what sampling with ``n_items`` aims for).
    ``letter_mass`` is the mean probability the two letters get together (how much the model answers
    with a letter at all); ``accuracy`` the fraction of items where the matching letter is the likelier.
    """

    score: float
    balanced_score: float
    n_items: int
    item_scores: list[float]
    letter_mass: float
    accuracy: float
    behaviour: str | None = None
    spec: dict[str, Any] | None = None
    items_fingerprint: str = ""
    form: str = (
        "ab"  # "ab": the answer letter; "cloze": the answer text (steering.evaluation.cloze)
    )
    context: list[dict[str, str]] | None = None  # the messages before each item's user turn

    def __str__(self) -> str:
        return (
            f"A/B matching probability {self.score:.4f} (letter-balanced {self.balanced_score:.4f}) "
            f"over {self.n_items} items (letter mass {self.letter_mass:.3f}, accuracy "
            f"{self.accuracy:.3f})"
        )


_ROLES = ("system", "user", "assistant")


def check_context(context: Any) -> list[Message]:
    """A validated copy of ``context``: chat messages (``{"role", "content"}``) to put before an item's
    user turn — an optional first system message, then user / assistant turns that alternate, start
    with a user turn and end with an assistant turn (the item's user turn follows). ``None`` -> ``[]``.
    Anything else is refused with one line that says what is wrong."""
    if context is None:
        return []
    if isinstance(context, (str, bytes, dict)) or not isinstance(context, Sequence):
        raise ValueError(
            f"context must be a list of {{'role', 'content'}} chat messages or None; got a "
            f"{type(context).__name__}"
        )
    out: list[Message] = []
    for i, m in enumerate(context):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            got = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise ValueError(
                f"context message {i} must be a dict with exactly the keys 'role' and 'content'; "
                f"got {got!r}"
            )
        role, content = m["role"], m["content"]
        if role not in _ROLES:
            raise ValueError(f"context message {i}: role must be one of {_ROLES}; got {role!r}")
        if not isinstance(content, str):
            raise ValueError(
                f"context message {i}: content must be a string; got a {type(content).__name__}"
            )
        out.append({"role": role, "content": content})
    turns = out[1:] if out and out[0]["role"] == "system" else out
    for j, m in enumerate(turns):
        want = "user" if j % 2 == 0 else "assistant"
        if m["role"] != want:
            i = j + len(out) - len(turns)
            where = (
                "only the first message may be a system message"
                if m["role"] == "system"
                else "after an optional system message, turns must alternate user, assistant, ..."
            )
            raise ValueError(
                f"context message {i}: expected a {want} turn, got {m['role']} ({where})"
            )
    if turns and turns[-1]["role"] != "assistant":
        raise ValueError(
            "context must end with an assistant turn (or be only a system message): the item's "
            "user turn follows it"
        )
    return out


def items_fingerprint(items: Sequence[CAAItem]) -> str:
    """A stable short hash of A/B items (question and both answers, in order)."""
    payload = [
        [it.question, it.answer_matching_behavior, it.answer_not_matching_behavior] for it in items
    ]
    blob = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def letter_token_ids(
    lm: LoadedModel,
    letters: Sequence[str] = ("A", "B"),
    *,
    question: str = "Which one?",
    context: Sequence[Message] | None = None,
) -> dict[str, int]:
    """The token id of each answer letter as it follows the opened answer ``"("`` under ``lm``'s chat
    template (after ``context``, see :func:`check_context`): rendering the answer ``"(" + letter`` must
    add exactly one token to the rendering of ``"("``, and that token must decode to the letter."""
    tok = lm.tokenizer
    pre = check_context(context)
    base = encode(tok, [[*pre, *messages(question, assistant=ANSWER_OPENER)]])[0].ids
    out: dict[str, int] = {}
    for letter in letters:
        if not (isinstance(letter, str) and len(letter) == 1 and letter.isupper()):
            raise ValueError(f"letters must be single capital letters; got {letter!r}")
        ids = encode(tok, [[*pre, *messages(question, assistant=ANSWER_OPENER + letter)]])[0].ids
        if len(ids) != len(base) + 1 or ids[: len(base)] != base:
            pieces = [tok.decode([t]) for t in ids[len(base) - 2 :]]
            raise ValueError(
                f"the answer letter {letter!r} is not a single token after {ANSWER_OPENER!r} under "
                f"this tokenizer (the answer tokenises as {pieces!r}); the A/B evaluation needs it to be"
            )
        piece = tok.decode([ids[-1]])
        if piece != letter:
            raise ValueError(
                f"the token after {ANSWER_OPENER!r} decodes to {piece!r}, not the letter {letter!r}"
            )
        out[letter] = ids[-1]
    return out


def _held_out_items(
    items_or_behaviour: str | Sequence[CAAItem], n_items: int | None, seed: int, test_frac: float
) -> tuple[str | None, list[CAAItem]]:
    if isinstance(items_or_behaviour, str):
        behaviour: str | None = items_or_behaviour
        items = caa_split(items_or_behaviour, seed=seed, test_frac=test_frac)[1]
    else:
        behaviour = None
        items = list(items_or_behaviour)
        for i, it in enumerate(items):
            if not isinstance(it, CAAItem):
                raise ValueError(
                    f"items_or_behaviour must be a CAA behaviour name or a list of CAAItem; item {i} "
                    f"is a {type(it).__name__}"
                )
    if not items:
        raise ValueError("no A/B items to evaluate")
    if n_items is not None:
        if n_items < 1:
            raise ValueError(f"n_items must be >= 1 or None; got {n_items!r}")
        if n_items < len(items):
            items = stratified_sample(items, n_items, seed)
    return behaviour, items


def eval_items(
    items_or_behaviour: str | Sequence[CAAItem],
    specs: Sequence[SteeringSpec | None],
    n_items: int | None,
    batch_size: int,
    seed: int,
    test_frac: float,
) -> tuple[str | None, list[CAAItem]]:
    """Check an evaluation's arguments; the behaviour name (or None) and the items to score."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size!r}")
    if not specs:
        raise ValueError("specs is empty: pass at least one SteeringSpec or None")
    return _held_out_items(items_or_behaviour, n_items, seed, test_frac)


def paired_shift(base: Sequence[float], steered: Sequence[float]) -> tuple[float, float]:
    """Mean per-item change of the matching probability from ``base`` to ``steered`` item scores
    (``ABResult.item_scores`` of the same items) and its paired standard error (NaN for one item)."""
    diffs = [s - b for s, b in zip(steered, base, strict=True)]
    shift = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else math.nan
    return shift, se


def stratified_sample(items: Sequence[CAAItem], n: int, seed: int = 0) -> list[CAAItem]:
    """``n`` items, as evenly spread over the matching letters as the items allow (deterministic for
    ``seed``), in their original order. With as many A-matching as B-matching items, a steering
    vector that only shifts the model's preference between the letters leaves the score unchanged."""
    if not 1 <= n <= len(items):
        raise ValueError(f"n must be between 1 and the number of items ({len(items)}); got {n!r}")
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.answer_matching_behavior.strip(), []).append(i)
    queues = [rng.sample(idx, len(idx)) for _, idx in sorted(groups.items())]
    keep: list[int] = []
    while len(keep) < n:  # round-robin over the letters
        for q in queues:
            if q and len(keep) < n:
                keep.append(q.pop())
    return [items[i] for i in sorted(keep)]


@dataclass
class _ABBatch:
    rows: list[int]  # item indices
    batch: TokenBatch
    suffix_len: int  # tokens of the opened answer (same for every row), 0 = no shared prefix


def _ab_batches(
    lm: LoadedModel, items: list[CAAItem], batch_size: int, context: Sequence[Message] = ()
) -> list[_ABBatch]:
    """Each prompt (``context``, the question, the opened answer) tokenised, batched by length; the
    shared suffix (the opened answer) is what a cached prompt pass leaves for the answer pass, so the
    context is always part of the prompt pass."""
    encoded: list[Encoded] = encode(
        lm.tokenizer,
        [[*context, *messages(it.question, assistant=ANSWER_OPENER)] for it in items],
    )
    order = sorted(range(len(items)), key=lambda i: len(encoded[i].ids))  # less padding
    out = []
    pad = lm.tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ex = [encoded[i] for i in rows]
        suffixes = {
            tuple(e.ids[e.assistant_start :]) if e.assistant_start is not None else None for e in ex
        }
        suffix = next(iter(suffixes)) if len(suffixes) == 1 else None
        n_suffix = len(suffix) if suffix else 0
        if n_suffix and any(len(e.ids) <= n_suffix for e in ex):
            n_suffix = 0
        out.append(_ABBatch(rows, make_batch(ex, pad, "left"), n_suffix))
    return out


# operators for which coefficient 0 leaves the activations bit for bit as they are
IDENTITY_AT_ZERO = tuple(name for name, op in OPERATORS.items() if op.identity_at_zero)


def _prefix_is_unsteered(spec: SteeringSpec | None) -> bool:
    """Whether ``spec`` leaves the question (everything before the assistant turn) untouched."""
    if spec is None:
        return True
    if spec.condition is not None:
        return False
    if spec.positions == "assistant":
        return True
    return spec.operator in IDENTITY_AT_ZERO and all(
        spec.coeff_at(s) == 0.0 for s in spec.site_list()
    )


def _begin(state: Any, batch: TokenBatch) -> None:
    if state is not None:
        state.begin_batch(batch)


def _prompt_pass(
    lm: LoadedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    pos: torch.Tensor,
    cut: int,
    cache: Any,
) -> None:
    """The question (columns before ``cut``) into ``cache``; no LM head."""
    lm.backbone(
        input_ids=ids[:, :cut],
        attention_mask=mask[:, :cut],
        position_ids=pos[:, :cut],
        **cache_kwargs(lm.backbone, cache),
    )


def _answer_pass(
    lm: LoadedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    pos: torch.Tensor,
    cut: int,
    cache: Any,
) -> torch.Tensor:
    """The opened answer (columns from ``cut``) on top of ``cache``: ``[B, V]`` next-token logits."""
    return lm.model(
        input_ids=ids[:, cut:],
        attention_mask=mask,
        position_ids=pos[:, cut:],
        **cache_kwargs(lm.model, cache),
        logits_to_keep=1,
    ).logits[:, -1]


def _letter_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[B, V]`` last-token logits -> ``[B, 2]`` probabilities of (matching, not matching)."""
    probs = logits.float().softmax(-1)
    return probs.gather(-1, ids.to(probs.device))


def ab_eval_specs(
    lm: LoadedModel,
    items_or_behaviour: str | Sequence[CAAItem],
    specs: Sequence[SteeringSpec | None],
    *,
    n_items: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    test_frac: float = 0.2,
    progress: Callable[[int, int], None] | None = None,
    context: Sequence[Message] | None = None,
) -> list[ABResult]:
    """:func:`ab_eval` for several settings at once (``None`` = unsteered), one result per spec.

    ``progress(done, total)`` is called after each (batch, spec) pass, e.g. to drive a progress bar
    (a UI can also stop the run by raising from it). ``context``: chat messages put before every
    item's user turn (:func:`check_context`; None = none, the prompts as they always were).

    Prompts are left-padded, batched by length, and run with explicit ``position_ids`` and
    ``attention_mask``. Specs that leave the prompt unsteered share one pass over the prompts (KV cache)
    and each adds only a forward over the opened answer.
    """
    pre = check_context(context)
    behaviour, items = eval_items(items_or_behaviour, specs, n_items, batch_size, seed, test_frac)
    pairs = [
        (
            answer_letter(it.answer_matching_behavior, f"item {i}: answer_matching_behavior"),
            answer_letter(
                it.answer_not_matching_behavior, f"item {i}: answer_not_matching_behavior"
            ),
        )
        for i, it in enumerate(items)
    ]
    letters = sorted({x for p in pairs for x in p})
    token = letter_token_ids(lm, letters, question=items[0].question, context=pre)
    letter_ids = torch.tensor([[token[a], token[b]] for a, b in pairs], dtype=torch.long)
    probs = torch.zeros((len(specs), len(items), 2), dtype=torch.float64)
    dev = lm.device
    from transformers import DynamicCache

    ab_batches = _ab_batches(lm, items, batch_size, pre)
    total, done = len(ab_batches) * len(specs), 0
    for ab in ab_batches:
        b = ab.batch
        ids, mask, pos = (t.to(dev) for t in (b.input_ids, b.attention_mask, b.position_ids))
        rows = torch.tensor(ab.rows)
        want = letter_ids[rows]
        cut = ids.shape[1] - ab.suffix_len
        shared: Any = None  # the unsteered prompt's KV cache, made once per batch when needed
        with torch.inference_mode():
            for k, spec in enumerate(specs):
                ctx = steer(lm, spec) if spec is not None else contextlib.nullcontext()
                if ab.suffix_len and _prefix_is_unsteered(spec):
                    if shared is None:
                        shared = DynamicCache()
                        _prompt_pass(lm, ids, mask, pos, cut, shared)
                    crop_cache(shared, cut)
                    with ctx as st:
                        _begin(st, b)
                        logits = _answer_pass(lm, ids, mask, pos, cut, shared)
                elif ab.suffix_len and spec is not None and spec.condition is None:
                    # the prompt is steered too: its own pass, then the answer (same numbers as one
                    # forward, and bit-identical to the unsteered path when the spec changes nothing)
                    with ctx as st:
                        _begin(st, b)
                        own: Any = DynamicCache()
                        _prompt_pass(lm, ids, mask, pos, cut, own)
                        logits = _answer_pass(lm, ids, mask, pos, cut, own)
                else:  # conditional steering decides on the whole prompt: one forward
                    with ctx as st:
                        _begin(st, b)
                        logits = lm.model(
                            input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1
                        ).logits[:, -1]
                probs[k, rows] = _letter_probs(logits, want).double().cpu()
                done += 1
                if progress is not None:
                    progress(done, total)
    fp = items_fingerprint(items)
    groups: dict[str, list[int]] = {}
    for i, (match, _other) in enumerate(pairs):
        groups.setdefault(match, []).append(i)
    letter_groups = {k: torch.tensor(v) for k, v in groups.items()}
    out = []
    for k, spec in enumerate(specs):
        p = probs[k]
        mass = p.sum(-1)
        item = p[:, 0] / mass.clamp(min=1e-300)
        by_letter = [item[idx].mean() for idx in letter_groups.values()]
        out.append(
            ABResult(
                score=float(item.mean()),
                balanced_score=float(torch.stack(by_letter).mean()),
                n_items=len(items),
                item_scores=[float(x) for x in item],
                letter_mass=float(mass.mean()),
                accuracy=float((p[:, 0] > p[:, 1]).double().mean()),
                behaviour=behaviour,
                spec=None if spec is None else spec.to_json(),
                items_fingerprint=fp,
                context=[dict(m) for m in pre] if context is not None else None,
            )
        )
    return out


def ab_eval(
    lm: LoadedModel,
    items_or_behaviour: str | Sequence[CAAItem],
    spec: SteeringSpec | None = None,
    *,
    n_items: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    test_frac: float = 0.2,
    context: Sequence[Message] | None = None,
) -> ABResult:
    """CAA's A/B evaluation: the mean probability of the behaviour-matching answer letter.

    Args:
        lm: the model.
        items_or_behaviour: a CAA behaviour name (its held-out split from
            :func:`repe.datasets.caa.caa_split` with ``seed`` / ``test_frac``, disjoint from the pairs
            :func:`probes.caa.caa_direction` builds from) or a list of ``CAAItem``.
        spec: steer with this spec (inside ``steer(lm, spec)``); None = the unsteered model.
        n_items: evaluate at most this many items, sampled with ``seed`` and spread evenly over the
            matching letters (:func:`stratified_sample`; default: all).
        batch_size: prompts per forward pass.
        context: chat messages before every item's user turn (a system prompt, few-shot turns; see
            :func:`check_context`); None = none.
    """
    return ab_eval_specs(
        lm,
        items_or_behaviour,
        [spec],
        n_items=n_items,
        batch_size=batch_size,
        seed=seed,
        test_frac=test_frac,
        context=context,
    )[0]
