"""Steering against prompting: does a steering vector move a CAA behaviour more than simply asking for it?

AxBench (Wu et al., 2025) found that prompting beats steering. :func:`steering_vs_prompting` scores one
behaviour's held-out items, in cloze form and / or A/B form, under

* a steering vector at a sweep of coefficients (one layer), and
* four prompts (:func:`prompt_conditions`): a system prompt asking for the behaviour (``system_toward``),
  one asking for its opposite (``system_away``; both shipped in ``repe/data/behaviour_prompts``), and
  ``n_shots`` worked examples from the behaviour's *training* split answered the behaviour's way
  (``fewshot_toward``) or the other way (``fewshot_away``),

and reports, side by side, each setting's behaviour shift from the unprompted, unsteered model (paired
standard error over items), its cost on neutral text (mean ``KL(base || setting)`` per token and the
perplexity; for a prompt, the neutral text follows the rendered prompt, :func:`prompt_costs`) and the
shift per unit of KL. :meth:`SteeringVsPrompting.verdict` says, per form and direction, whether the
best steering setting or the best prompt moves the behaviour more per nat of KL.

The unprompted model is the item's user turn alone under the chat template (for SmolLM2 that includes
the template's default system prompt, which a ``system_*`` prompt replaces). In A/B form the model must
read the options for any of this to mean something: the A/B control
(:func:`steering.evaluation.control.ab_control`) runs once and its warning travels with the results.

>>> d = cloze_direction(lm, "refusal", layers=[12])
>>> res = steering_vs_prompting(lm, "refusal", d, (-0.2, -0.1, 0.1, 0.2), n_items=32)
>>> print(res.table()); [v["sentence"] for v in res.verdict()]
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import nn

from repe.batching import Encoded, encode, make_batch
from repe.chat import Message, messages
from repe.datasets import CAA_BEHAVIOURS, CAAItem, load_behaviour_prompts
from repe.datasets.caa import cloze_item, cloze_split
from repe.directions import Direction
from repe.models import LoadedModel
from steering.evaluation.ab import (
    ABResult,
    ab_eval_specs,
    check_context,
    paired_shift,
    stratified_sample,
)
from steering.evaluation.cloze import cloze_eval_specs
from steering.evaluation.control import ab_control
from steering.evaluation.costs import NeutralCosts
from steering.spec import SCALES, SteeringSpec

FORMS = ("cloze", "ab")
PROMPT_SETTINGS = ("system_toward", "system_away", "fewshot_toward", "fewshot_away")
_PROMPT_SIGN = {"system_toward": 1, "system_away": -1, "fewshot_toward": 1, "fewshot_away": -1}


# ---- the prompts --------------------------------------------------------------------------------
def _check_behaviour(behaviour: Any) -> str:
    if not isinstance(behaviour, str) or behaviour not in CAA_BEHAVIOURS:
        raise ValueError(f"behaviour must be one of {CAA_BEHAVIOURS}; got {behaviour!r}")
    return behaviour


def _check_form(form: Any) -> str:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}; got {form!r}")
    return cast(str, form)


def _shots(train: Sequence[CAAItem], n_shots: int, seed: int, form: str) -> list[CAAItem]:
    """``n_shots`` training items spread over the matching letters (cloze form: only items that have
    a cloze form)."""
    pool = list(train)
    if form == "cloze":
        ok = []
        for it in pool:
            try:
                cloze_item(it)
            except ValueError:
                continue
            ok.append(it)
        pool = ok
    if len(pool) < n_shots:
        raise ValueError(
            f"n_shots={n_shots} but the training split has only {len(pool)} usable items"
        )
    return stratified_sample(pool, n_shots, seed)


def prompt_conditions(
    lm: LoadedModel,
    behaviour: str,
    form: str,
    *,
    n_shots: int = 3,
    seed: int = 0,
    test_frac: float = 0.2,
) -> dict[str, list[Message]]:
    """The four prompting baselines for ``behaviour`` as contexts for
    :func:`steering.evaluation.cloze.cloze_eval_specs` / :func:`steering.evaluation.ab.ab_eval_specs`
    (``context=``): ``system_toward`` / ``system_away`` (the shipped system prompts,
    :func:`repe.datasets.load_behaviour_prompts`) and ``fewshot_toward`` / ``fewshot_away`` (``n_shots``
    user / assistant turns).

    The few-shot examples come from the behaviour's training split (:func:`repe.datasets.caa.cloze_split`
    with ``seed`` and ``test_frac``, the questions a vector is built from), never from the held-out
    items an evaluation with the same ``seed`` and ``test_frac`` scores; they are spread over the
    matching letters. In cloze form the user turn is the question's stem and the assistant turn the
    matching (toward) or other (away) answer's text; in A/B form the user turn is the whole question
    with its options and the assistant turn the answer letter as CAA writes it (``"(A)"``).
    Each context is rendered once under ``lm``'s chat template, so a template that refuses it fails here.
    """
    behaviour = _check_behaviour(behaviour)
    form = _check_form(form)
    if not isinstance(n_shots, int) or isinstance(n_shots, bool) or n_shots < 1:
        raise ValueError(f"n_shots must be an integer >= 1; got {n_shots!r}")
    system = load_behaviour_prompts()[behaviour]
    train, _held_out = cloze_split(behaviour, seed=seed, test_frac=test_frac)
    shots = _shots(train, n_shots, seed, form)
    toward: list[Message] = []
    away: list[Message] = []
    for i, it in enumerate(shots):
        if form == "cloze":
            c = cloze_item(it, f"training item {i}")
            user, yes, no = c.stem, c.matching, c.other
        else:
            user = it.question
            yes, no = it.answer_matching_behavior.strip(), it.answer_not_matching_behavior.strip()
        toward += [{"role": "user", "content": user}, {"role": "assistant", "content": yes}]
        away += [{"role": "user", "content": user}, {"role": "assistant", "content": no}]
    out = {
        "system_toward": [{"role": "system", "content": system["toward"]}],
        "system_away": [{"role": "system", "content": system["away"]}],
        "fewshot_toward": toward,
        "fewshot_away": away,
    }
    for name, ctx in out.items():
        check_context(ctx)
        try:
            encode(lm.tokenizer, [[*ctx, *messages("Question?")]])
        except Exception as e:  # a template's own error (jinja raises its own types)
            raise ValueError(
                f"the chat template cannot render the {name} prompt: {str(e).splitlines()[0]}"
            ) from e
    return out


# ---- the cost of a prompt -------------------------------------------------------------------------
def _context_ids(lm: LoadedModel, context: list[Message]) -> list[int]:
    """The context's tokens as the chat template renders it (turns closed, no generation prompt)."""
    if not context:
        return []
    tok = lm.tokenizer
    if getattr(tok, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {type(tok).__name__} has no chat template: a prompt's cost needs one"
        )
    text = tok.apply_chat_template(
        context, tokenize=False, add_generation_prompt=False, continue_final_message=False
    )
    return list(tok(text, add_special_tokens=False)["input_ids"])


def prompt_costs(
    lm: LoadedModel,
    context: Sequence[Message] | None,
    texts: Sequence[str] | None = None,
    *,
    costs: NeutralCosts | None = None,
    batch_size: int = 16,
) -> tuple[float, float]:
    """(mean ``KL(base || prompted)`` per real token, perplexity) on neutral texts (default:
    ``repe.datasets.load_neutral()``), where *prompted* means each text follows ``context`` rendered by
    the chat template (every turn closed, no generation prompt).

    Token by token, each text's next-token distributions with the prefix are compared with those of
    the text alone (what :class:`steering.evaluation.costs.NeutralCosts` computes once: pass ``costs``
    to reuse its unprompted log-probabilities, and then not ``texts``). The KL is averaged over every
    real token of the texts, the perplexity over the same tokens as NeutralCosts counts (each text
    token that has a predecessor in the text), so both sit beside a steering vector's. An empty
    context (or None) gives KL 0 up to rounding and the unprompted perplexity.

    The KL holds everything the prefix does to the text after it: the prompt's content, but also what
    any chat-formatted prefix does (the text no longer starts the sequence; a template that inserts a
    default system prompt, as SmolLM2's does before a few-shot context, inserts it here too). Measure
    a neutral prompt (e.g. the template's default system prompt) to see that floor.
    """
    pre = check_context(context)
    if costs is None:
        costs = NeutralCosts(lm, texts, batch_size)
    elif texts is not None:
        raise ValueError("pass texts or costs (which holds its texts), not both")
    elif costs.lm is not lm:
        raise ValueError("costs was built on another model than lm")
    prefix = _context_ids(lm, pre)
    n = len(prefix)
    pad = lm.tokenizer.pad_token_id
    head = cast(nn.Module, lm.model.get_output_embeddings())  # type: ignore[operator]
    dev = lm.device
    kl_sum, kl_n, nll_sum, nll_n = 0.0, 0, 0.0, 0
    for b, lp_base in zip(costs.batches, costs.base(), strict=True):
        rows_ids = [
            b.input_ids[i, off : off + length].tolist()
            for i, (off, length) in enumerate(zip(b.offsets, b.lengths, strict=True))
        ]
        pb = make_batch([Encoded(prefix + ids, None) for ids in rows_ids], pad, "left")
        with torch.inference_mode():
            hidden = lm.backbone(
                input_ids=pb.input_ids.to(dev),
                attention_mask=pb.attention_mask.to(dev),
                position_ids=pb.position_ids.to(dev),
            ).last_hidden_state
            r_list: list[int] = []
            new_c: list[int] = []
            old_c: list[int] = []
            for i, length in enumerate(b.lengths):
                r_list += [i] * length
                new_c += [pb.offsets[i] + n + t for t in range(length)]
                old_c += [b.offsets[i] + t for t in range(length)]
            r = torch.tensor(r_list, device=hidden.device)
            lp = head(hidden[r, torch.tensor(new_c, device=hidden.device)]).float().log_softmax(-1)
            lpb = lp_base[r.to(lp_base.device), torch.tensor(old_c, device=lp_base.device)]
            lpb = lpb.to(lp.device)
            kl = (lpb.exp() * (lpb - lp)).sum(-1)
            kl_sum += float(kl.double().sum())
            kl_n += len(r_list)
            # next-token NLL at every text token but each text's last (the token after it is not text)
            start = 0
            for i, length in enumerate(b.lengths):
                if length > 1:
                    nxt = torch.tensor(rows_ids[i][1:], device=lp.device)
                    got = lp[start : start + length - 1].gather(-1, nxt[:, None])
                    nll_sum -= float(got.double().sum())
                    nll_n += length - 1
                start += length
    return kl_sum / kl_n, math.exp(nll_sum / nll_n)


_MARK = "\u2063REPE-NEUTRAL-TEXT\u2063"


def frame_ids(lm: LoadedModel, context: Sequence[Message] | None) -> list[int]:
    """The tokens the chat template puts before a user turn that follows ``context``: for an empty
    context, the model's default chat frame (SmolLM2's template inserts its default system prompt)."""
    pre = check_context(context)
    tok = lm.tokenizer
    if getattr(tok, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {type(tok).__name__} has no chat template: a prompt's cost needs one"
        )
    text = tok.apply_chat_template(
        [*pre, {"role": "user", "content": _MARK}], tokenize=False, add_generation_prompt=False
    )
    if _MARK not in text:  # pragma: no cover - a template that rewrites the user's text
        raise ValueError("the chat template does not keep the user's text verbatim")
    return list(tok(text[: text.index(_MARK)], add_special_tokens=False)["input_ids"])


class FramedCosts:
    """KL and perplexity on neutral texts put where a user's message goes in a chat, so that a
    steering vector and a prompt are measured in the same place.

    Each text is the user turn after the model's default chat frame (the reference: unprompted,
    unsteered). A *prompt* replaces that frame with its own context (a system prompt, few-shot turns)
    before the same user turn; a *steering* keeps the frame and steers every token. The KL
    ``KL(reference || intervened)`` is averaged over every text token's next-token distribution, the
    perplexity over every text token that has a predecessor in the text. Measured against the bare
    text instead (:func:`prompt_costs`), any chat prefix, even the template's own default system prompt,
    costs a prompt about 0.7 nats on the embedded model before it asks for anything: a floor that says
    nothing about the prompt and would hand every per-KL comparison to steering.
    """

    def __init__(
        self, lm: LoadedModel, texts: Sequence[str] | None = None, batch_size: int = 16
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size!r}")
        from repe.datasets import load_neutral

        self.lm = lm
        self.batch_size = batch_size
        tok = lm.tokenizer
        self.texts = [
            list(tok(t, add_special_tokens=False)["input_ids"])
            for t in (texts if texts is not None else load_neutral())
        ]
        if not any(len(t) > 1 for t in self.texts):
            raise ValueError("texts: every text is a single token; perplexity needs at least two")
        self._reference = self._logprobs(frame_ids(lm, None), None)

    def _logprobs(self, prefix: list[int], spec: Any) -> list[torch.Tensor]:
        """Per batch of texts, ``[n text tokens, V]`` log-probabilities at the text's tokens."""
        from steering.evaluation.costs import neutral_spec
        from steering.hooks import steer

        lm = self.lm
        pad = lm.tokenizer.pad_token_id
        head = cast(nn.Module, lm.model.get_output_embeddings())  # type: ignore[operator]
        n = len(prefix)
        out = []
        for s in range(0, len(self.texts), self.batch_size):
            rows = self.texts[s : s + self.batch_size]
            b = make_batch([Encoded(prefix + ids, None) for ids in rows], pad, "left")
            ctx = steer(lm, neutral_spec(spec)) if spec is not None else contextlib.nullcontext()
            with ctx as state, torch.inference_mode():
                if state is not None:
                    state.begin_batch(b)
                hidden = lm.backbone(
                    input_ids=b.input_ids.to(lm.device),
                    attention_mask=b.attention_mask.to(lm.device),
                    position_ids=b.position_ids.to(lm.device),
                ).last_hidden_state
            r = [i for i, ids in enumerate(rows) for _ in ids]
            c = [b.offsets[i] + n + t for i, ids in enumerate(rows) for t in range(len(ids))]
            with torch.inference_mode():
                h = hidden[
                    torch.tensor(r, device=hidden.device), torch.tensor(c, device=hidden.device)
                ]
                out.append(head(h).float().log_softmax(-1))
        return out

    def measure(
        self, *, context: Sequence[Message] | None = None, spec: Any = None
    ) -> tuple[float, float]:
        """(KL per text token, perplexity) with ``context`` in place of the default frame (None: the
        frame) and/or steered by ``spec``."""
        if context is None and spec is None:
            lps = self._reference
        else:
            lps = self._logprobs(frame_ids(self.lm, context), spec)
        kl_sum, kl_n, nll_sum, nll_n = 0.0, 0, 0.0, 0
        for k, (lp, ref) in enumerate(zip(lps, self._reference, strict=True)):
            kl = (ref.exp() * (ref - lp)).sum(-1)
            kl_sum += float(kl.double().sum())
            kl_n += kl.numel()
            start = 0
            for ids in self.texts[k * self.batch_size : (k + 1) * self.batch_size]:
                if len(ids) > 1:
                    nxt = torch.tensor(ids[1:], device=lp.device)
                    nll_sum -= float(
                        lp[start : start + len(ids) - 1].gather(-1, nxt[:, None]).double().sum()
                    )
                    nll_n += len(ids) - 1
                start += len(ids)
        return kl_sum / kl_n, math.exp(nll_sum / nll_n)


# ---- the comparison -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComparisonRow:
    """One setting of one form.

    ``method`` is ``"steering"`` (``coeff`` set) or ``"prompt"``; ``sign`` the intended direction
    (+1 toward the behaviour, -1 away; a steering row's is its coefficient's sign, 0 at 0);
    ``shift = score - base_score`` with ``se`` its paired standard error over items; ``kl`` (nats per
    token) and ``ppl`` on neutral text as a user's message in the chat frame (:class:`FramedCosts`: the
    same place for a vector and a prompt); ``per_kl = shift / kl`` and ``per_kl_se = se / kl`` (None
    when ``kl`` is 0). ``kl_text`` / ``ppl_text``: the same on the bare text (a vector's
    :class:`~steering.evaluation.costs.NeutralCosts`; a prompt's :func:`prompt_costs`, whose KL holds
    the chat frame's own cost).
    """

    form: str
    method: str
    setting: str
    coeff: float | None
    sign: int
    score: float
    base_score: float
    shift: float
    se: float
    kl: float
    ppl: float
    per_kl: float | None
    per_kl_se: float | None
    kl_text: float | None = None
    ppl_text: float | None = None


def _finite(x: Any) -> Any:
    """JSON-safe: NaN / inf -> None, recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _fmt(x: float | None, spec: str = "+.4f") -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, spec)


@dataclass
class SteeringVsPrompting:
    """The comparison's results (:func:`steering_vs_prompting`).

    ``base``: per form, the unprompted, unsteered score, the perplexity on neutral text, the number of
    items and their fingerprint. ``item_scores``: per ``(form, setting)`` (setting ``"base"``: the
    unprompted, unsteered model), the per-item matching probabilities, items in the same order. ``contexts``: per form, the prompts used. ``warnings``: sentences a report
    must show (e.g. the A/B control's when the model does not read A/B options).
    """

    behaviour: str
    rows: list[ComparisonRow]
    base: dict[str, dict[str, Any]]
    item_scores: dict[tuple[str, str], list[float]]
    warnings: list[str] = field(default_factory=list)
    site: str = ""
    scale: str = "relative"
    positions: str = "all"
    direction: str = ""
    n_shots: int = 3
    seed: int = 0
    contexts: dict[str, dict[str, list[Message]]] = field(default_factory=dict)
    controls: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    @property
    def forms(self) -> list[str]:
        return [f for f in FORMS if f in self.base]

    def at(self, form: str, setting: str) -> ComparisonRow:
        for r in self.rows:
            if r.form == form and r.setting == setting:
                return r
        raise ValueError(
            f"no row for form {form!r} and setting {setting!r}; settings: "
            f"{sorted({r.setting for r in self.rows})}"
        )

    def verdict(self) -> list[dict[str, Any]]:
        """Per form and intended direction (``"toward"``, ``"away"``): the steering setting and the prompt
        that move the score furthest the intended way per nat of KL (``value = sign * shift / kl``,
        ``se = se / kl``), and which wins: ``"steering"`` or ``"prompting"`` when the two intervals of
        ±2 SE do not overlap, ``"tie"`` when they do (or an SE is unknown), None when one side has no
        setting with a positive KL. Each dict carries a one-line ``sentence``."""
        out: list[dict[str, Any]] = []
        for form in self.forms:
            for name, sign in (("toward", 1), ("away", -1)):
                best: dict[str, dict[str, Any] | None] = {}
                for method in ("steering", "prompt"):
                    cands = [
                        r
                        for r in self.rows
                        if r.form == form
                        and r.method == method
                        and r.sign == sign
                        and r.per_kl is not None
                    ]
                    if not cands:
                        best[method] = None
                        continue
                    r = max(cands, key=lambda r: sign * cast(float, r.per_kl))
                    best[method] = {
                        "setting": r.setting,
                        "value": sign * cast(float, r.per_kl),
                        "se": r.per_kl_se,
                        "shift": r.shift,
                        "shift_se": r.se,
                        "kl": r.kl,
                    }
                s, p = best["steering"], best["prompt"]
                winner: str | None
                if s is None or p is None:
                    winner = None
                else:
                    se_s, se_p = s["se"], p["se"]
                    if se_s is None or se_p is None or not math.isfinite(se_s + se_p):
                        winner = "tie"
                    elif s["value"] - 2 * se_s > p["value"] + 2 * se_p:
                        winner = "steering"
                    elif p["value"] - 2 * se_p > s["value"] + 2 * se_s:
                        winner = "prompting"
                    else:
                        winner = "tie"
                out.append(
                    {
                        "form": form,
                        "direction": name,
                        "steering": s,
                        "prompt": p,
                        "winner": winner,
                        "sentence": _sentence(form, name, s, p, winner),
                    }
                )
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (NaN -> None): settings, rows, base, verdicts, prompts, and the per-item
        scores as ``{form: {setting: [...]}}``."""
        return _finite(
            {
                "behaviour": self.behaviour,
                "site": self.site,
                "scale": self.scale,
                "positions": self.positions,
                "direction": self.direction,
                "n_shots": self.n_shots,
                "seed": self.seed,
                "forms": self.forms,
                "base": self.base,
                "rows": [asdict(r) for r in self.rows],
                "verdict": self.verdict(),
                "warnings": list(self.warnings),
                "controls": self.controls,
                "contexts": self.contexts,
                "item_scores": {
                    form: {s: v for (f, s), v in self.item_scores.items() if f == form}
                    for form in dict.fromkeys(f for f, _ in self.item_scores)
                },
            }
        )

    def table(self) -> str:
        """A markdown table: per form, the base, then every setting's shift, cost and shift per KL."""
        lines = [
            f"**Steering vs prompting: {self.behaviour}** (steering {self.direction!r} at "
            f"{self.site}, scale={self.scale}, positions={self.positions}; {self.n_shots}-shot "
            f"prompts from the training split)",
            "",
        ]
        for form in self.forms:
            b = self.base[form]
            lines.append(
                f"{form} form: {b['n_items']} held-out items, base score {b['score']:.4f}, base "
                f"perplexity {b['ppl']:.3f}"
            )
        lines += [
            "",
            "KL and ppl: neutral text as the user's message in the chat frame (the same place for a "
            "vector and a prompt); KL bare: on the bare text, where a prompt's KL holds the frame's "
            "own cost.",
            "",
            "| form | method | setting | score | shift | se | KL | ppl | shift/KL | se | KL bare |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.form} | {r.method} | {r.setting} | {r.score:.4f} | {_fmt(r.shift)} | "
                f"{_fmt(r.se, '.4f')} | {r.kl:.4f} | {r.ppl:.3f} | {_fmt(r.per_kl, '+.3f')} | "
                f"{_fmt(r.per_kl_se, '.3f')} | {_fmt(r.kl_text, '.4f')} |"
            )
        lines.append("")
        lines += [f"- {v['sentence']}" for v in self.verdict()]
        lines += [f"\n> WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _sentence(
    form: str,
    name: str,
    s: dict[str, Any] | None,
    p: dict[str, Any] | None,
    winner: str | None,
) -> str:
    def say(x: dict[str, Any]) -> str:
        return (
            f"{x['setting']} {_fmt(x['value'], '+.3f')} ± {_fmt(x['se'], '.3f')} per nat of KL "
            f"(shift {_fmt(x['shift'])} ± {_fmt(x['shift_se'], '.4f')}, KL {x['kl']:.4f})"
        )

    head = f"{form} form, {'toward' if name == 'toward' else 'away from'} the behaviour"
    if s is None or p is None:
        missing = "steering setting" if s is None else "prompt"
        return f"{head}: no verdict (no {missing} of this direction with a positive KL)"
    verdict = {
        "steering": "steering wins",
        "prompting": "prompting wins",
        "tie": "a tie (the ±2 SE intervals overlap)",
    }[cast(str, winner)]
    return f"{head}: {verdict}: steering {say(s)} vs prompt {say(p)}"


def _coeff_label(c: float) -> str:
    return f"coeff {c:+.2f}" if round(c, 2) == c else f"coeff {c:+g}"


def _sign(c: float) -> int:
    return (c > 0) - (c < 0)


def steering_vs_prompting(
    lm: LoadedModel,
    behaviour: str,
    direction: Direction,
    coeffs: Sequence[float],
    *,
    layer: int | None = None,
    forms: Sequence[str] = ("cloze", "ab"),
    n_items: int | None = None,
    seed: int = 0,
    n_shots: int = 3,
    scale: str = "relative",
    positions: str = "all",
    batch_size: int = 16,
    progress: Callable[[float, str], None] | None = None,
    kl_texts: Sequence[str] | None = None,
    test_frac: float = 0.2,
) -> SteeringVsPrompting:
    """Score ``behaviour``'s held-out items under a steering vector and under prompting baselines.

    Args:
        lm: the model.
        behaviour: a CAA behaviour (one of ``repe.datasets.CAA_BEHAVIOURS``).
        direction: the vector to steer with, built by the caller from the training split with the
            same ``seed`` (e.g. :func:`probes.cloze.cloze_direction` or :func:`probes.caa.caa_direction`).
        coeffs: coefficients in ``scale`` units; each is a steering row (its sign is its intended
            direction).
        layer: steer ``blocks.{layer}.hook_resid_post``; None = the direction's best site, else its
            first site.
        forms: ``"cloze"`` (answer texts, :func:`steering.evaluation.cloze.cloze_eval_specs`) and / or
            ``"ab"`` (answer letters, :func:`steering.evaluation.ab.ab_eval_specs`; the A/B control runs
            once and its warning, if any, is kept in ``warnings``).
        n_items: held-out items per form (sampled with ``seed``, spread over the matching letters;
            None = all).
        n_shots: worked examples in each few-shot prompt (:func:`prompt_conditions`).
        scale, positions: as in :class:`steering.SteeringSpec` (positions ``"all"``, as the sweep).
        progress: ``progress(fraction_done, what)`` while it runs (raising from it stops the run).
        kl_texts: neutral texts for KL and perplexity (default: ``repe.datasets.load_neutral()``); one
            :class:`steering.evaluation.costs.NeutralCosts` serves every setting.
        test_frac: the held-out fraction of the split (as the other evaluations).
    """
    behaviour = _check_behaviour(behaviour)
    if not isinstance(direction, Direction):
        raise ValueError(f"direction must be a Direction; got a {type(direction).__name__}")
    if isinstance(forms, str) or not forms:
        raise ValueError(f"forms must be a non-empty list drawn from {FORMS}; got {forms!r}")
    form_list = [_check_form(f) for f in forms]
    if len(set(form_list)) != len(form_list):
        raise ValueError(f"forms has a duplicate; got {forms!r}")
    if isinstance(coeffs, (str, bytes)) or not coeffs:
        raise ValueError("coeffs is empty: pass coefficients such as (-0.2, -0.1, 0.1, 0.2)")
    coeff_list: list[float] = []
    for c in coeffs:
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
            raise ValueError(f"coeffs must be finite numbers; got {c!r}")
        if float(c) not in coeff_list:
            coeff_list.append(float(c))
    coeff_list.sort()
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}; got {scale!r}")
    if layer is None:
        site = direction.best_site or direction.sites[0]
    else:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < lm.n_layers:
            raise ValueError(
                f"layer must be a block index in [0, {lm.n_layers - 1}]; got {layer!r}"
            )
        site = f"blocks.{layer}.hook_resid_post"
    if site not in direction.vectors:
        raise ValueError(
            f"direction {direction.name!r} has no vector at {site!r}; sites: {direction.sites}"
        )

    def report(fraction: float, what: str) -> None:
        if progress is not None:
            progress(fraction, what)

    specs = [
        SteeringSpec(direction, coeff=c, positions=positions, scale=scale, sites=[site])
        for c in coeff_list
    ]
    report(0.0, "KL and perplexity on neutral text")
    costs = NeutralCosts(lm, kl_texts, batch_size)
    costs.base()
    framed = FramedCosts(lm, kl_texts, batch_size)
    base_ppl = framed.measure()[1]
    base_ppl_text = costs.perplexity(None)
    steer_cost = [(*framed.measure(spec=s), *costs.measure(s)) for s in specs]
    prompt_cost: dict[str, tuple[float, float, float, float]] = {}
    rows: list[ComparisonRow] = []
    base: dict[str, dict[str, Any]] = {}
    item_scores: dict[tuple[str, str], list[float]] = {}
    contexts: dict[str, dict[str, list[Message]]] = {}
    controls: dict[str, dict[str, Any] | None] = {}
    warnings: list[str] = []
    for k, form in enumerate(form_list):
        span = 0.2 + 0.8 * k / len(form_list), 0.8 / len(form_list)

        def step(frac: float, what: str, span: tuple[float, float] = span) -> None:
            report(span[0] + span[1] * frac, what)

        evaluate = cloze_eval_specs if form == "cloze" else ab_eval_specs
        step(0.0, f"{form}: steering")
        results = evaluate(
            lm,
            behaviour,
            [None, *specs],
            n_items=n_items,
            batch_size=batch_size,
            seed=seed,
            test_frac=test_frac,
        )
        ref = results[0]
        item_scores[form, "base"] = ref.item_scores
        for c, res, cost in zip(coeff_list, results[1:], steer_cost, strict=True):
            item_scores[form, _coeff_label(c)] = res.item_scores
            rows.append(_row(form, "steering", _coeff_label(c), c, _sign(c), ref, res, *cost))
        ctxs = prompt_conditions(
            lm, behaviour, form, n_shots=n_shots, seed=seed, test_frac=test_frac
        )
        contexts[form] = ctxs
        for j, name in enumerate(PROMPT_SETTINGS):
            step(0.4 + 0.5 * j / len(PROMPT_SETTINGS), f"{form}: {name}")
            res = evaluate(
                lm,
                behaviour,
                [None],
                n_items=n_items,
                batch_size=batch_size,
                seed=seed,
                test_frac=test_frac,
                context=ctxs[name],
            )[0]
            if res.items_fingerprint != ref.items_fingerprint:  # pragma: no cover - a bug guard
                raise RuntimeError(f"{form}: the {name} prompt was scored on other items")
            key = json.dumps(ctxs[name], sort_keys=True)
            if key not in prompt_cost:
                prompt_cost[key] = (
                    *framed.measure(context=ctxs[name]),
                    *prompt_costs(lm, ctxs[name], costs=costs),
                )
            item_scores[form, name] = res.item_scores
            rows.append(
                _row(form, "prompt", name, None, _PROMPT_SIGN[name], ref, res, *prompt_cost[key])
            )
        base[form] = {
            "score": ref.score,
            "ppl": base_ppl,
            "ppl_text": base_ppl_text,
            "n_items": ref.n_items,
            "items_fingerprint": ref.items_fingerprint,
        }
        if form == "ab":
            step(0.95, "A/B control")
            control = ab_control(lm, batch_size=batch_size)
            controls[form] = control.to_dict()
            warning = control.warning()
            if warning is not None:
                warnings.append(f"A/B form: {warning}")
        else:
            controls[form] = None
    report(1.0, "done")
    return SteeringVsPrompting(
        behaviour=behaviour,
        rows=rows,
        base=base,
        item_scores=item_scores,
        warnings=warnings,
        site=site,
        scale=scale,
        positions=positions,
        direction=direction.name,
        n_shots=n_shots,
        seed=seed,
        contexts=contexts,
        controls=controls,
    )


def _row(
    form: str,
    method: str,
    setting: str,
    coeff: float | None,
    sign: int,
    ref: ABResult,
    res: ABResult,
    kl: float,
    ppl: float,
    kl_text: float | None = None,
    ppl_text: float | None = None,
) -> ComparisonRow:
    shift, se = paired_shift(ref.item_scores, res.item_scores)
    defined = kl > 0
    return ComparisonRow(
        form=form,
        method=method,
        setting=setting,
        coeff=coeff,
        sign=sign,
        score=res.score,
        base_score=ref.score,
        shift=shift,
        se=se,
        kl=kl,
        ppl=ppl,
        per_kl=shift / kl if defined else None,
        per_kl_se=se / kl if defined else None,
        kl_text=kl_text,
        ppl_text=ppl_text,
    )
