"""Contrastive Activation Addition (CAA): a steering vector from A/B answer pairs.

For every CAA question the model sees the same prompt answered with the letter that matches the behaviour
(``"(A"``) and with the other letter (``"(B"``). The vector at a layer is the mean, over pairs, of the
difference between the two residual-stream activations read *at the answer-letter token* (Rimsky et al.,
"Steering Llama 2 via Contrastive Activation Addition"). Its sign follows the workbench convention:
positive = the behaviour (``answer_matching_behavior``).

>>> train, test_items = caa_split("sycophancy", seed=0)   # repe.datasets.caa: disjoint by question
>>> d = caa_direction(lm, "sycophancy", layers=[11], n_pairs=64)   # built from the train split only
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from probes.contrast import mean_difference
from repe.batching import Encoded, Inputs, encode, make_batch
from repe.calibration import calibrate
from repe.capture import capture
from repe.chat import Conversation, render
from repe.datasets import ContrastDataset
from repe.datasets.caa import caa_split
from repe.datasets.core import Side
from repe.directions import Direction
from repe.hooks import hook_scope
from repe.kvcache import cache_kwargs, crop_cache
from repe.models import LoadedModel
from repe.positions import Index
from repe.sites import parse_site

METHOD = "caa_mean_diff"
POSITION = "answer_letter"
# the end of an answer: "(A", "(A)" or "Answer: (B" (the letter is group 1)
_ANSWER_RE = re.compile(r"\(([A-Z])\)?\s*$")


@dataclass(frozen=True)
class AnswerPosition:
    """Where the answer letter of one side sits: its token index, the letter and its token id."""

    index: int  # among the example's tokens, as ``repe.batching.encode`` tokenises it
    n_tokens: int
    letter: str
    token_id: int


def _side_text(lm: LoadedModel, side: Side) -> tuple[str, int, bool]:
    """The text the model sees for one side, where the answer part starts, and whether it is a chat."""
    if isinstance(side, str):
        return side, 0, False
    conv: Conversation = side
    if conv[-1]["role"] != "assistant":
        raise ValueError(
            "a CAA side must end in an assistant turn holding the answer (e.g. '(A'); "
            f"this one ends in a {conv[-1]['role']!r} turn"
        )
    r = render(lm.tokenizer, conv)
    assert r.assistant_char_start is not None  # set for conversations ending in an assistant turn
    return r.text, r.assistant_char_start, True


def answer_positions(
    lm: LoadedModel, sides: Sequence[Side], what: str = "side"
) -> list[AnswerPosition]:
    """Locate the answer-letter token of every side under ``lm``'s tokenizer (and chat template).

    The answer must end in a parenthesised capital letter (``"(A"``, ``"(A)"``, ``"Answer: (B"``). The
    token that covers the letter is found through the tokenizer's character offsets, and decoding it
    must give exactly the letter; anything else raises a ``ValueError`` naming the side.
    """
    tok = lm.tokenizer
    encoded = encode(tok, cast(Inputs, list(sides)))
    out = []
    for i, (side, enc) in enumerate(zip(sides, encoded, strict=True)):
        text, answer_start, is_chat = _side_text(lm, side)
        tail = text[answer_start:]
        m = _ANSWER_RE.search(tail)
        if m is None:
            raise ValueError(
                f"{what} {i}: the answer must end in a capital letter in parentheses such as '(A' "
                f"(CAA leaves the parenthesis open); got an answer ending in {tail[-20:]!r}"
            )
        letter = m.group(1)
        char = answer_start + m.start(1)
        mapped = tok(
            text, add_special_tokens=not is_chat, return_offsets_mapping=True, truncation=False
        )
        if list(mapped["input_ids"]) != enc.ids:
            raise RuntimeError(f"{what} {i}: tokenising with offsets gave different token ids")
        index = next(
            (t for t, (a, b) in enumerate(mapped["offset_mapping"]) if a <= char < b), None
        )
        if index is None:
            raise ValueError(f"{what} {i}: no token covers the answer letter {letter!r}")
        token_id = enc.ids[index]
        piece = tok.decode([token_id])
        if piece.strip() != letter:
            raise ValueError(
                f"{what} {i}: the token at the answer position ({index}) decodes to {piece!r}, not "
                f"the answer letter {letter!r}; the letter must be a token of its own under this "
                "tokenizer (answers like '(A' are)"
            )
        out.append(AnswerPosition(index, len(enc.ids), letter, token_id))
    return out


def _capture_at(
    lm: LoadedModel,
    sides: Sequence[Side],
    positions: Sequence[AnswerPosition],
    sites: list[str],
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Activations ``{site: [N, d_model]}`` at each side's own answer position (grouped by the
    position counted from the end, so each group is one ``capture`` call with a fixed index)."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(positions):
        groups.setdefault(p.index - p.n_tokens, []).append(i)
    out = {s: torch.zeros((len(sides), lm.d_model), dtype=torch.float32) for s in sites}
    for offset, idx in groups.items():
        acts = capture(
            lm,
            cast(Inputs, [sides[i] for i in idx]),
            sites,
            positions=Index((offset,)),
            batch_size=batch_size,
            progress=False,
        )
        for s in sites:
            out[s][torch.tensor(idx)] = acts[s].float()
    return out


class _Stop(Exception):
    pass


def _capture_letter_pairs(
    lm: LoadedModel,
    pos_ids: Sequence[list[int]],
    neg_ids: Sequence[list[int]],
    sites: list[str],
    batch_size: int,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Pairs that differ only in their last token (the answer letter): run the shared prompt once per
    pair (KV cache, stopping after the deepest site) and then each answer letter as one more token.

    Returns ``({site: [N, d]}, {site: [N, d]})`` for the positive and the negative letters."""
    from transformers import DynamicCache

    from repe.backends.hf import execution_key, register_capture

    parsed = [parse_site(s, lm.n_layers) for s in sites]
    deepest = max(parsed, key=execution_key)
    got: dict[str, torch.Tensor] = {}
    recording = [False]

    def sink(name: str) -> Any:
        def fn(t: torch.Tensor) -> None:
            if recording[0]:
                got[name] = t[:, -1].detach().float().cpu()

        return fn

    def stop(_t: torch.Tensor) -> None:
        raise _Stop

    pad = lm.tokenizer.pad_token_id
    dev = lm.device
    outs: tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]] = (
        {s: [] for s in sites},
        {s: [] for s in sites},
    )
    with hook_scope() as scope:
        for site in parsed:
            scope.add(register_capture(lm, site, scope.gate(sink(site.name))))
        scope.add(register_capture(lm, deepest, scope.gate(stop)))
        for start in range(0, len(pos_ids), batch_size):
            chunk = range(start, min(start + batch_size, len(pos_ids)))
            b = make_batch([Encoded(pos_ids[i][:-1], None) for i in chunk], pad, "left")
            ids, mask, pos = (t.to(dev) for t in (b.input_ids, b.attention_mask, b.position_ids))
            cut = ids.shape[1]
            cache: Any = DynamicCache()
            full_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            with torch.inference_mode():
                recording[0] = False
                with contextlib.suppress(_Stop):
                    lm.backbone(
                        input_ids=ids,
                        attention_mask=mask,
                        position_ids=pos,
                        **cache_kwargs(lm.backbone, cache),
                    )
                recording[0] = True
                for side_ids, out in zip((pos_ids, neg_ids), outs, strict=True):
                    crop_cache(cache, cut)
                    last = torch.tensor([[side_ids[i][-1]] for i in chunk], device=dev)
                    got.clear()
                    with contextlib.suppress(_Stop):
                        lm.backbone(
                            input_ids=last,
                            attention_mask=full_mask,
                            position_ids=pos[:, -1:] + 1,
                            **cache_kwargs(lm.backbone, cache),
                        )
                    for s in sites:
                        out[s].append(got[s])
    return (
        {s: torch.cat(v) for s, v in outs[0].items()},
        {s: torch.cat(v) for s, v in outs[1].items()},
    )


def letter_balanced_weights(letters: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, int]:
    """Pair weights (summing to 1) for a mean difference in which the answer letters cancel.

    ``letters[i]`` is pair i's (positive letter, negative letter). Within every unordered letter pair
    ``{X, Y}`` the two orders (X, Y) and (Y, X) get equal total weight, and each unordered pair weight in
    proportion to its count; pairs whose order never occurs reversed get weight 0 (pairs with the same
    letter on both sides need no partner). Returns the weights and the number of pairs left out."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (a, b) in enumerate(letters):
        groups.setdefault((a, b), []).append(i)
    w = torch.zeros(len(letters), dtype=torch.float64)
    dropped = 0
    for (a, b), idx in groups.items():
        if a == b:  # the same letter on both sides cancels within the pair
            w[idx] = 1.0
            continue
        rev = groups.get((b, a))
        if rev is None:
            dropped += len(idx)
            continue
        total = len(idx) + len(rev)  # the unordered pair's share, split evenly between the orders
        w[idx] = total / 2 / len(idx)
    if float(w.sum()) == 0.0:
        raise ValueError(
            "balance_letters=True needs both answer orders (e.g. matching 'A' with other 'B', and "
            f"matching 'B' with other 'A'); the pairs have only {sorted(groups)}. Pass "
            "balance_letters=False for a plain mean"
        )
    return w / w.sum(), dropped


def _layers(lm: LoadedModel, layers: Sequence[int] | int | None) -> list[int]:
    if layers is None:
        return list(range(lm.n_layers))
    ls = [layers] if isinstance(layers, int) else list(layers)
    if not ls:
        raise ValueError("layers is empty: pass layer indices, or None for every layer")
    for layer in ls:
        if not isinstance(layer, int) or not 0 <= layer < lm.n_layers:
            raise ValueError(
                f"layers must be block indices in [0, {lm.n_layers - 1}]; got {layer!r}"
            )
    return sorted(set(ls))


def caa_direction(
    lm: LoadedModel,
    behaviour_or_dataset: str | ContrastDataset,
    layers: Sequence[int] | int | None = None,
    n_pairs: int | None = None,
    seed: int = 0,
    *,
    batch_size: int = 16,
    test_frac: float = 0.2,
    balance_letters: bool = True,
) -> Direction:
    """The CAA steering vector: mean over pairs of (matching - non-matching) residual activations at
    ``blocks.L.hook_resid_post``, read at the answer-letter token.

    Args:
        lm: the model.
        behaviour_or_dataset: a CAA behaviour name (``repe.datasets.CAA_BEHAVIOURS``; its training split
            from :func:`caa_split` with ``seed`` / ``test_frac`` is used) or a ``ContrastDataset`` of
            answer pairs (positive side = the behaviour), used as it is.
        layers: block indices (default: every block).
        n_pairs: use at most this many pairs, sampled with ``seed`` (default: all).
        seed: split and sampling seed.
        balance_letters: weight the pairs so that each answer-letter order (matching ``A`` / other
            ``B``, and the reverse) counts equally. The residual stream at the letter token carries the
            letter's identity, far larger than the behaviour; an unweighted mean over, say, 31 A-pairs
            and 33 B-pairs keeps 2/64 of it, enough to swamp the behaviour on a small model. Pairs whose
            letter order never occurs reversed are left out (``params["n_pairs_dropped"]``).

    Returns a unit-norm Direction (``method="caa_mean_diff"``) with ``stats[site]["mean_diff_norm"]`` (the
    raw mean-difference norm) and ``stats[site]["resid_norm"]`` (from :func:`repe.calibration`).
    """
    if n_pairs is not None and n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1 or None; got {n_pairs!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size!r}")
    layer_list = _layers(lm, layers)
    if isinstance(behaviour_or_dataset, str):
        behaviour: str | None = behaviour_or_dataset
        dataset, _test = caa_split(behaviour_or_dataset, seed=seed, test_frac=test_frac)
    elif isinstance(behaviour_or_dataset, ContrastDataset):
        behaviour = None
        dataset = behaviour_or_dataset
    else:
        raise ValueError(
            "behaviour_or_dataset must be a CAA behaviour name or a ContrastDataset; got "
            f"{type(behaviour_or_dataset).__name__}"
        )
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset.name!r} has no pairs")
    if n_pairs is not None and n_pairs < len(dataset):
        dataset = dataset.sample(n_pairs, seed=seed)
    pos_sides: list[Side] = [p.positive for p in dataset.pairs]
    neg_sides: list[Side] = [p.negative for p in dataset.pairs]
    pos_at = answer_positions(lm, pos_sides, "positive side of pair")
    neg_at = answer_positions(lm, neg_sides, "negative side of pair")
    sites = [f"blocks.{layer}.hook_resid_post" for layer in layer_list]
    ids = [
        encode(lm.tokenizer, cast(Inputs, [p, n]))
        for p, n in zip(pos_sides, neg_sides, strict=True)
    ]
    shared = all(
        pa.index == pa.n_tokens - 1 >= 1
        and na.index == na.n_tokens - 1
        and e[0].ids[:-1] == e[1].ids[:-1]
        for pa, na, e in zip(pos_at, neg_at, ids, strict=True)
    )
    if shared:  # CAA pairs: the same prompt, then the letter
        pos, neg = _capture_letter_pairs(
            lm, [e[0].ids for e in ids], [e[1].ids for e in ids], sites, batch_size
        )
    else:
        pos = _capture_at(lm, pos_sides, pos_at, sites, batch_size)
        neg = _capture_at(lm, neg_sides, neg_at, sites, batch_size)
    if balance_letters:
        weights, dropped = letter_balanced_weights(
            [(p.letter, n.letter) for p, n in zip(pos_at, neg_at, strict=True)]
        )
    else:
        weights = torch.full((len(dataset),), 1.0 / len(dataset), dtype=torch.float64)
        dropped = 0
    vectors: dict[str, torch.Tensor] = {}
    stats: dict[str, dict[str, float]] = {}
    for s in sites:
        diff = mean_difference(pos[s], neg[s], weights)
        norm = float(diff.norm())
        if norm == 0.0:
            raise ValueError(
                f"the mean difference at {s} is zero: the two sides of every pair read the same "
                "activation (are the positive and negative answers identical?)"
            )
        vectors[s] = (diff / norm).float()
        stats[s] = {"mean_diff_norm": norm}
    name = f"caa/{behaviour}" if behaviour is not None else f"caa/{dataset.name}"
    direction = Direction(
        vectors=vectors,
        identity=lm.identity,
        name=name,
        method=METHOD,
        params={
            "behaviour": behaviour,
            "dataset": dataset.name,
            "layers": layer_list,
            "n_pairs": len(dataset),
            "seed": seed,
            "test_frac": test_frac if behaviour is not None else None,
            "position": POSITION,
            "balance_letters": balance_letters,
            "n_pairs_dropped": dropped,
            "sign": "positive = answer_matching_behavior (the pair's positive side)",
            "letters": {
                "positive": sorted({p.letter for p in pos_at}),
                "negative": sorted({p.letter for p in neg_at}),
            },
        },
        normalisation="unit",
        dataset_fingerprint=dataset.fingerprint(),
        stats=stats,
    )
    return calibrate(lm, direction)
