"""CAA behaviours scored in cloze form: the answer *text*, for models that do not read A/B options.

Per item ``p_m / (p_m + p_o)`` where ``p`` is the answer's per-token geometric-mean probability
(length-normalised likelihood) under the (steered) model; the score is the mean over items, in the same
``ABResult`` as the A/B evaluation (``form="cloze"``). The items are the held-out split of
``repe.datasets.caa.caa_split``; the matching vector is ``probes.cloze.cloze_direction``.

>>> base, up = cloze_eval_specs(lm, "myopic-reward", [None, SteeringSpec(d, coeff=0.2)], n_items=80)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import nn

from repe.batching import Encoded, Inputs, encode, make_batch
from repe.chat import Message, messages
from repe.datasets import CAAItem
from repe.datasets.caa import cloze_items
from repe.models import LoadedModel
from steering.evaluation.ab import (
    ABResult,
    _begin,
    check_context,
    eval_items,
    items_fingerprint,
)
from steering.hooks import steer
from steering.spec import SteeringSpec


def _answer_logprob(
    lm: LoadedModel,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    offsets: list[int],
    starts: list[int],
    ends: list[int],
) -> list[float]:
    """Mean log-probability of each row's answer tokens (``[start, end)`` among its real tokens),
    from the backbone's final hidden states: the LM head runs on the predicting positions only."""
    rows, cols = [], []
    for b, (off, a, e) in enumerate(zip(offsets, starts, ends, strict=True)):
        rows += [b] * (e - a)
        cols += list(range(off + a, off + e))
    r = torch.tensor(rows, device=hidden.device)
    c = torch.tensor(cols, device=hidden.device)
    head = cast(nn.Module, lm.model.get_output_embeddings())  # type: ignore[operator]
    lp = head(hidden[r, c - 1]).float().log_softmax(-1)
    # the LM head may run on another device than the inputs (a device_map)
    tok_lp = lp.gather(-1, ids.to(lp.device)[r.to(lp.device), c.to(lp.device)][:, None])[:, 0]
    sums = torch.zeros(len(starts), dtype=torch.float64).index_add_(
        0, r.cpu(), tok_lp.double().cpu()
    )
    return [float(sums[b]) / (e - a) for b, (a, e) in enumerate(zip(starts, ends, strict=True))]


def cloze_eval_specs(
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
    """The cloze-form score of CAA items under each spec (``None`` = unsteered), one result per spec.

    Items and sampling as :func:`steering.evaluation.ab.ab_eval_specs` (a behaviour name means its held-out
    split). Per item: ``p_m / (p_m + p_o)`` with ``p`` the per-token geometric-mean probability of the
    answer text; ``letter_mass`` holds the mean ``p_m + p_o`` (how likely the answers are at all).
    ``context``: chat messages put before every item's user turn (a system prompt, few-shot turns;
    :func:`steering.evaluation.ab.check_context`); None = none, the prompts as they always were.
    """
    pre = check_context(context)
    behaviour, items = eval_items(items_or_behaviour, specs, n_items, batch_size, seed, test_frac)
    cloze = cloze_items(items)
    convs = [[*pre, *messages(c.stem, assistant=a)] for c in cloze for a in (c.matching, c.other)]
    encoded: list[Encoded] = encode(lm.tokenizer, cast(Inputs, convs))
    for i, e in enumerate(encoded):
        if e.assistant_start is None or e.assistant_start >= len(e.ids) or e.assistant_start < 1:
            raise ValueError(f"item {i // 2}: the answer text tokenises to nothing")
    pad = lm.tokenizer.pad_token_id
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    logp = torch.zeros((len(specs), len(encoded)), dtype=torch.float64)
    dev = lm.device
    groups = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    total, done = len(groups) * len(specs), 0
    for rows in groups:
        ex = [encoded[i] for i in rows]
        b = make_batch(ex, pad, "left")
        ids = b.input_ids.to(dev)
        starts = [e.assistant_start or 0 for e in ex]
        ends = [len(e.ids) for e in ex]
        with torch.inference_mode():
            for k, spec in enumerate(specs):
                ctx = steer(lm, spec) if spec is not None else contextlib.nullcontext()
                with ctx as st:
                    _begin(st, b)
                    hidden = lm.backbone(
                        input_ids=ids,
                        attention_mask=b.attention_mask.to(dev),
                        position_ids=b.position_ids.to(dev),
                    ).last_hidden_state
                logp[k, rows] = torch.tensor(
                    _answer_logprob(lm, hidden, ids, b.offsets, starts, ends), dtype=torch.float64
                )
                done += 1
                if progress is not None:
                    progress(done, total)
    fp = items_fingerprint(items)
    out = []
    for k, spec in enumerate(specs):
        lm_m, lm_o = logp[k, 0::2], logp[k, 1::2]
        item = torch.sigmoid(lm_m - lm_o)  # = p_m / (p_m + p_o)
        mass = lm_m.exp() + lm_o.exp()
        out.append(
            ABResult(
                score=float(item.mean()),
                balanced_score=float(item.mean()),
                n_items=len(items),
                item_scores=[float(x) for x in item],
                letter_mass=float(mass.mean()),
                accuracy=float((lm_m > lm_o).double().mean()),
                behaviour=behaviour,
                spec=None if spec is None else spec.to_json(),
                items_fingerprint=fp,
                form="cloze",
                context=[dict(m) for m in pre] if context is not None else None,
            )
        )
    return out
