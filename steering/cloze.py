"""CAA behaviours in cloze form: score and steer the answer *text*, for models that do not read A/B options.

CAA's A/B evaluation asks for a letter. A model that picks its letter without reading the options
(``steering.ab_control``; the embedded SmolLM2-135M is one) gives A/B scores at chance whatever a
steering vector does. The cloze form (as small-model benchmarks score multiple choice) drops the letters:
the question's stem (the text before its list of choices) is the user turn and each option's text is a
candidate assistant answer.

* :func:`cloze_items` turns CAA A/B items into ``ClozeItem`` (stem, matching text, other text).
* :func:`cloze_eval_specs` scores them: per item ``p_m / (p_m + p_o)`` where ``p`` is the answer's
  per-token geometric-mean probability (length-normalised likelihood) under the (steered) model; the
  score is the mean over items, in the same ``ABResult`` as the A/B evaluation (``form="cloze"``).
* :func:`cloze_direction` is the matching steering vector: the mean over training pairs of (matching
  - other) residual activations averaged over the answer's tokens, from the same training split as
  :func:`steering.caa.caa_direction` (``caa_split``), so held-out questions are never seen.

>>> d = cloze_direction(lm, "myopic-reward", layers=[6], n_pairs=100)
>>> base, up = cloze_eval_specs(lm, "myopic-reward", [None, SteeringSpec(d, coeff=0.2)], n_items=80)
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from repe.batching import Encoded, Inputs, encode, make_batch
from repe.capture import capture
from repe.chat import messages
from repe.datasets import CAAItem, ContrastDataset, ContrastPair, load_caa_items
from repe.directions import Direction
from repe.models import LoadedModel
from steering.caa import _layers, caa_split
from steering.calibrate import calibrate
from steering.evaluate import ABResult, _begin, answer_letter, eval_items, items_fingerprint
from steering.hooks import steer
from steering.spec import SteeringSpec

METHOD = "cloze_mean_diff"
_OPTION = re.compile(r"^\s*\(([A-Z])\)\s?(.*)$")


@dataclass(frozen=True)
class ClozeItem:
    """One CAA question in cloze form: the stem and the two answers' texts."""

    stem: str
    matching: str
    other: str


def cloze_item(item: CAAItem, what: str = "item") -> ClozeItem:
    """Split a CAA A/B question into its stem and the texts of its matching and other options.

    The options are the lines that start with ``(A)``, ``(B)``, ... (an option runs until the next one);
    the stem is everything before the first option, without a trailing ``Choices:`` line."""
    stem_lines: list[str] = []
    options: dict[str, list[str]] = {}
    current: str | None = None
    for line in item.question.split("\n"):
        m = _OPTION.match(line)
        if m is not None:
            current = m.group(1)
            options[current] = [m.group(2)]
        elif current is not None:
            options[current].append(line)
        else:
            stem_lines.append(line)
    stem = "\n".join(stem_lines).strip()
    if stem.endswith("Choices:"):
        stem = stem[: -len("Choices:")].strip()
    text = {k: "\n".join(v).strip() for k, v in options.items()}
    m_letter = answer_letter(item.answer_matching_behavior, f"{what}: answer_matching_behavior")
    o_letter = answer_letter(
        item.answer_not_matching_behavior, f"{what}: answer_not_matching_behavior"
    )
    missing = [x for x in (m_letter, o_letter) if not text.get(x)]
    if not stem or missing:
        raise ValueError(
            f"{what}: cannot put this question in cloze form ("
            + ("no question before the options" if not stem else f"no option text for {missing}")
            + f"); it reads {item.question[:80]!r}..."
        )
    return ClozeItem(stem, text[m_letter], text[o_letter])


def cloze_items(items: Sequence[CAAItem]) -> list[ClozeItem]:
    return [cloze_item(it, f"item {i}") for i, it in enumerate(items)]


def cloze_pairs(dataset_items: Sequence[CAAItem], name: str) -> ContrastDataset:
    """Contrast pairs (positive = the matching answer's text) as chat conversations."""
    pairs = []
    for c in cloze_items(dataset_items):
        pairs.append(
            ContrastPair(
                positive=messages(c.stem, assistant=c.matching),
                negative=messages(c.stem, assistant=c.other),
            )
        )
    return ContrastDataset(name=name, pairs=pairs, source="caa (cloze form)")


def cloze_split(
    behaviour: str, seed: int = 0, test_frac: float = 0.2
) -> tuple[list[CAAItem], list[CAAItem]]:
    """The training and held-out A/B items of ``caa_split`` (same questions on each side)."""
    test = caa_split(behaviour, seed=seed, test_frac=test_frac)[1]
    held_out = {it.question for it in test}
    return [it for it in load_caa_items(behaviour) if it.question not in held_out], test


def cloze_direction(
    lm: LoadedModel,
    behaviour_or_items: str | Sequence[CAAItem],
    layers: Sequence[int] | int | None = None,
    n_pairs: int | None = None,
    seed: int = 0,
    *,
    batch_size: int = 16,
    test_frac: float = 0.2,
) -> Direction:
    """Steering vector from the answer texts: mean over pairs of (matching - other) activation at
    ``blocks.L.hook_resid_post``, averaged over the answer's tokens (question in the user turn).

    Args:
        behaviour_or_items: a CAA behaviour (its training split, as :func:`steering.caa.caa_split`)
            or a list of ``CAAItem`` used as they are.
        n_pairs: use at most this many items, sampled with ``seed`` (default: all).

    Returns a unit-norm Direction (``method="cloze_mean_diff"``) with ``stats[site]`` holding
    ``mean_diff_norm`` and ``resid_norm`` (calibrated strength, :mod:`steering.calibrate`).
    """
    if n_pairs is not None and n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1 or None; got {n_pairs!r}")
    layer_list = _layers(lm, layers)
    if isinstance(behaviour_or_items, str):
        behaviour: str | None = behaviour_or_items
        items = cloze_split(behaviour_or_items, seed=seed, test_frac=test_frac)[0]
    else:
        behaviour = None
        items = list(behaviour_or_items)
    if not items:
        raise ValueError("no items to build a cloze vector from")
    dataset = cloze_pairs(items, f"caa/{behaviour or 'items'}[cloze train]")
    if n_pairs is not None and n_pairs < len(dataset):
        dataset = dataset.sample(n_pairs, seed=seed)
    sites = [f"blocks.{layer}.hook_resid_post" for layer in layer_list]
    pos, neg = (
        capture(
            lm,
            cast(Inputs, [getattr(p, side) for p in dataset.pairs]),
            sites,
            positions="assistant_mean",
            batch_size=batch_size,
            progress=False,
        )
        for side in ("positive", "negative")
    )
    vectors: dict[str, torch.Tensor] = {}
    stats: dict[str, dict[str, float]] = {}
    for s in sites:
        diff = (pos[s].double() - neg[s].double()).mean(0)
        norm = float(diff.norm())
        if norm == 0.0:
            raise ValueError(f"the mean difference at {s} is zero: are the two answers identical?")
        vectors[s] = (diff / norm).float()
        stats[s] = {"mean_diff_norm": norm}
    direction = Direction(
        vectors=vectors,
        identity=lm.identity,
        name=f"cloze/{behaviour or dataset.name}",
        method=METHOD,
        params={
            "behaviour": behaviour,
            "layers": layer_list,
            "n_pairs": len(dataset),
            "seed": seed,
            "test_frac": test_frac if behaviour is not None else None,
            "position": "answer_text_mean",
            "sign": "positive = the answer_matching_behavior option's text",
        },
        normalisation="unit",
        dataset_fingerprint=dataset.fingerprint(),
        stats=stats,
    )
    return calibrate(lm, direction)


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
    tok_lp = lp.gather(-1, ids[r, c][:, None])[:, 0]
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
) -> list[ABResult]:
    """The cloze-form score of CAA items under each spec (``None`` = unsteered), one result per spec.

    Items and sampling as :func:`steering.evaluate.ab_eval_specs` (a behaviour name means its held-out
    split). Per item: ``p_m / (p_m + p_o)`` with ``p`` the per-token geometric-mean probability of the
    answer text; ``letter_mass`` holds the mean ``p_m + p_o`` (how likely the answers are at all).
    """
    behaviour, items = eval_items(items_or_behaviour, specs, n_items, batch_size, seed, test_frac)
    cloze = cloze_items(items)
    convs = [messages(c.stem, assistant=a) for c in cloze for a in (c.matching, c.other)]
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
            )
        )
    return out
