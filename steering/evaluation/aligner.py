"""Ready Aligner tasks and their evaluation against the base model, a steering vector for the same task
and a LoRA of the same task, with parameter counts side by side. The command line (``repe aligner``),
the study (``studies/aligner_embedded.py``) and the app's Aligner panel run these.

* ``form`` — always open with a fixed phrase (:data:`FORM_PHRASE`). The data are made here from the
  shipped control questions: the model's own greedy answer with the phrase put in front. Success: the
  share of *held-out* questions whose greedy answer opens with the phrase (SFT).
* ``value`` — preferred vs dispreferred answers from shipped data (CAA refusal and hallucination pairs,
  the honest/harmless answer preferred), trained with DPO. Measure: the held-out chosen-vs-rejected
  log-likelihood margin, its change with a paired bootstrap interval.
* ``facts`` — invented facts (``repe.datasets.load_fictional_facts``): SFT on the statements as answers
  to two wordings of each question; recall: the share of questions in a third, held-out wording whose
  greedy answer names the invented capital. The paper's claim is that global tokens carry form, not
  knowledge: ``N = 1`` should not learn what a LoRA with ~100x the parameters does.

Each run also measures KL and perplexity on neutral text, so costs sit beside effects.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repe.atomic import write_text
from repe.chat import messages
from repe.datasets import load_fictional_facts
from repe.datasets.preference import PreferencePair, load_preference_pairs
from repe.datasets.questions import question_set
from repe.directions import Direction
from repe.models import LoadedModel
from repe.responses import Response, batch_inputs, hidden_on_responses
from steering.adapter import LowRankAdapter
from steering.aligner import DEFAULT_START_LAYER
from steering.aligner_train import TrainConfig, train_aligner, train_intervention
from steering.evaluation.costs import NeutralCosts
from steering.evaluation.preference import paired_change, preference_margins
from steering.evaluation.rahf import matched_vector
from steering.generate import GenerationConfig, generate
from steering.spec import SteeringSpec

TASKS = ("form", "value", "facts")
FORM_PHRASE = "Ahoy, friend!"
VALUE_SOURCES = ("caa:refusal", "caa:hallucination")
OBJECTIVE = {"form": "sft", "value": "dpo", "facts": "sft"}
# measured on the embedded model (studies/aligner_embedded.py): see the README's Aligner paragraph
DEFAULT_LR = {"form": 1e-2, "value": 1e-2, "facts": 1e-2}
DEFAULT_LORA_LR = {"form": 1e-3, "value": 1e-3, "facts": 5e-3}
DEFAULT_EPOCHS = {"form": 3, "value": 2, "facts": 15}
# value (DPO), N=1, 96 training pairs, 2 epochs, lr 1e-2: beta 0.1 raised the held-out margin by +36.3
# at KL 1.05 and perplexity x4.10 on neutral text; beta 0.5: +10.4 at KL 0.18, x1.32; beta 1.0: +7.8
# at KL 0.13, x1.22. The default is the cheapest of the three
DEFAULT_BETA = 1.0


@dataclass(frozen=True)
class AlignerRun:
    task: str = "form"
    n_tokens: int = 1
    start_layer: int = DEFAULT_START_LAYER
    train: int = 48  # form: questions; value: pairs per source; facts: ignored (all 24 facts)
    held: int = 48  # form: questions; value: pairs per source
    lr: float | None = None  # None: DEFAULT_LR of the task
    epochs: int | None = None  # None: DEFAULT_EPOCHS of the task
    batch_size: int = 8
    seed: int = 0
    answer_tokens: int = 24  # form: length of the model's own answers behind the phrase
    compare_vector: bool = True
    compare_lora: bool = True
    lora_rank: int = 8
    lora_first_layer: int = 0  # the LoRA covers q/v of blocks lora_first_layer..last
    lora_lr: float | None = None
    sources: tuple[str, ...] = VALUE_SOURCES  # value: preference pairs (caa:<behaviour> or JSONL)
    beta: float = DEFAULT_BETA  # value: DPO's temperature

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}; got {self.task!r}")
        if self.train < 2 or self.held < 1 or self.n_tokens < 1:
            raise ValueError("train >= 2, held >= 1 and n_tokens >= 1")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1; got {self.epochs}")

    @property
    def n_epochs(self) -> int:
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS[self.task]

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.task]

    @property
    def lora_learning_rate(self) -> float:
        return self.lora_lr if self.lora_lr is not None else DEFAULT_LORA_LR[self.task]


# ---- data -----------------------------------------------------------------------------------------


def form_split(run: AlignerRun) -> tuple[list[str], list[str]]:
    """Seeded, disjoint training and held-out control questions."""
    qs = [q.text for q in question_set("control").questions]
    random.Random(run.seed).shuffle(qs)
    if len(qs) < run.train + run.held:
        raise ValueError(
            f"{len(qs)} control questions; train + held asks for {run.train + run.held}"
        )
    return qs[: run.train], qs[run.train : run.train + run.held]


def form_data(lm: LoadedModel, prompts: Sequence[str], answer_tokens: int = 24) -> list[Response]:
    """The model's own greedy answers to ``prompts`` with :data:`FORM_PHRASE` in front."""
    cfg = GenerationConfig(max_new_tokens=answer_tokens)
    out = []
    for s in range(0, len(prompts), 32):
        chunk = list(prompts[s : s + 32])
        for q, a in zip(chunk, generate(lm, [messages(q) for q in chunk], None, cfg), strict=True):
            out.append(Response(q, f"{FORM_PHRASE} {a.strip()}".strip()))
    return out


def _norm(s: str) -> str:
    return " ".join("".join(c for c in s.lower() if c.isalnum() or c.isspace()).split())


def form_success(
    lm: LoadedModel, prompts: Sequence[str], intervention: Any = None, *, batch_size: int = 32
) -> np.ndarray:
    """Per prompt, 1.0 when the greedy answer opens with :data:`FORM_PHRASE` (case and punctuation
    aside)."""
    want = _norm(FORM_PHRASE)
    cfg = GenerationConfig(max_new_tokens=8)
    out: list[float] = []
    for s in range(0, len(prompts), batch_size):
        chats = [messages(q) for q in prompts[s : s + batch_size]]
        out += [float(_norm(a).startswith(want)) for a in generate(lm, chats, intervention, cfg)]
    return np.array(out)


def value_split(run: AlignerRun) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Per source, a seeded shuffle: ``train`` pairs train, the next ``held`` are held out."""
    rng = random.Random(run.seed)
    train, held = [], []
    for src in run.sources:
        pairs = [p for p in load_preference_pairs(src) if p.chosen is not None]
        rng.shuffle(pairs)
        if len(pairs) < run.train + run.held:
            raise ValueError(f"{src}: {len(pairs)} pairs; train + held asks for more")
        train += pairs[: run.train]
        held += pairs[run.train : run.train + run.held]
    return train, held


def facts_data() -> tuple[list[Response], list[str], list[str], list[str]]:
    """(training responses, held-out questions, their answers, one training question per fact)."""
    facts = load_fictional_facts()
    train = [Response(q, f.statement) for f in facts for q in f.train]
    return (
        train,
        [f.held_out for f in facts],
        [f.answer for f in facts],
        [f.train[0] for f in facts],
    )


def recall(
    lm: LoadedModel,
    questions: Sequence[str],
    answers: Sequence[str],
    intervention: Any = None,
    *,
    batch_size: int = 32,
) -> np.ndarray:
    """Per question, 1.0 when the greedy answer (24 tokens) names its answer."""
    cfg = GenerationConfig(max_new_tokens=24)
    out: list[float] = []
    for s in range(0, len(questions), batch_size):
        chats = [messages(q) for q in questions[s : s + batch_size]]
        texts = generate(lm, chats, intervention, cfg)
        out += [
            float(a.lower() in t.lower())
            for a, t in zip(answers[s : s + batch_size], texts, strict=True)
        ]
    return np.array(out)


# ---- the comparisons ------------------------------------------------------------------------------


def response_direction(
    lm: LoadedModel, plus: Sequence[Response], minus: Sequence[Response], layer: int
) -> Direction:
    """Mean response-token state of ``plus`` minus that of ``minus`` after block ``layer``."""

    def mean(items: Sequence[Response]) -> torch.Tensor:
        tot, n = torch.zeros(lm.d_model), 0
        for s in range(0, len(items), 8):
            inputs, resp = batch_inputs(lm, items[s : s + 8], None)
            with torch.inference_mode():
                h = hidden_on_responses(lm, inputs, resp, [layer])[0].float().cpu()
            tot, n = tot + h.sum(0), n + h.shape[0]
        return tot / max(n, 1)

    vec = mean(plus) - mean(minus)
    return Direction(
        {f"blocks.{layer}.hook_resid_post": vec},
        lm.identity,
        name="task-vector",
        method="mean_diff",
    )


def lora_for(lm: LoadedModel, run: AlignerRun) -> LowRankAdapter:
    layers = list(range(run.lora_first_layer, lm.n_layers))
    return LowRankAdapter.init(lm, layers, rank=run.lora_rank, seed=run.seed, name="lora")


def lora_parameters(ad: LowRankAdapter) -> int:
    return sum(t.numel() for t in ad.parameters())


def _interval(before: np.ndarray, after: np.ndarray) -> dict[str, float]:
    return dict(zip(("mean", "lo", "hi"), paired_change(before, after), strict=True))


def run_aligner(
    lm: LoadedModel,
    run: AlignerRun,
    out: str | Path | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Train an Aligner on ``run.task`` and measure it (and, as asked, a steering vector and a LoRA of
    the same task) on held-out data. With ``out``, writes ``aligner.safetensors``/``.json`` and
    ``result.json`` there."""
    t0 = time.perf_counter()
    layer = lm.n_layers // 3
    costs = NeutralCosts(lm)
    base_kl, base_ppl = costs.measure(None)
    # facts: every statement is trained on (a held-out share would hold out facts never seen, and
    # stop on how well unseen facts are guessed); recall is measured on the held-out wording instead
    held_share = 0.0 if run.task == "facts" else 0.2
    cfg = TrainConfig(
        objective=OBJECTIVE[run.task],
        lr=run.learning_rate,
        epochs=run.n_epochs,
        batch_size=run.batch_size,
        held_out=held_share,
        beta=run.beta,
        seed=run.seed,
    )
    lora_cfg = TrainConfig(
        objective=cfg.objective,
        lr=run.lora_learning_rate,
        epochs=run.n_epochs,
        batch_size=run.batch_size,
        held_out=held_share,
        beta=run.beta,
        seed=run.seed,
    )
    # the settings as JSON has them (tuples as lists), so a saved result reads back equal
    settings = json.loads(json.dumps(asdict(run)))
    result: dict[str, Any] = {"run": settings, "model": lm.identity.name, "layer": layer}
    result["base"] = {"neutral_perplexity": base_ppl}

    def costs_of(x: Any) -> dict[str, float]:
        kl, ppl = costs.measure(x)
        return {"neutral_kl": kl, "perplexity_ratio": ppl / base_ppl}

    data: Any
    if run.task == "form":
        train_q, held_q = form_split(run)
        log(
            f"form task: own answers to {len(train_q)} training questions, '{FORM_PHRASE}' in front"
        )
        data = form_data(lm, train_q, run.answer_tokens)

        def score(x: Any) -> np.ndarray:
            return form_success(lm, held_q, x)

        metric = "success"
    elif run.task == "value":
        train_p, held_p = value_split(run)
        data = train_p

        def score(x: Any) -> np.ndarray:
            return preference_margins(lm, held_p, x)

        metric = "margin"
    else:
        data, held_q, answers, seen_q = facts_data()

        def score(x: Any) -> np.ndarray:
            return recall(lm, held_q, answers, x)

        metric = "recall"
    base_scores = score(None)
    result["base"][metric] = float(base_scores.mean())
    if run.task == "facts":
        result["base"]["recall_training_wording"] = float(recall(lm, seen_q, answers).mean())
    log(f"base model: {metric} {base_scores.mean():.3f}")

    al, res = train_aligner(
        lm,
        data,
        n_tokens=run.n_tokens,
        start_layer=run.start_layer,
        config=cfg,
        name=f"aligner-{run.task}",
        progress=progress,
        on_step=on_step,
    )
    al_scores = score(al)
    entry: dict[str, Any] = {
        "parameters": al.n_parameters,
        metric: float(al_scores.mean()),
        f"{metric}_change": _interval(base_scores, al_scores),
        "training": res.summary(),
        **costs_of(al),
    }
    if run.task == "facts":
        entry["recall_training_wording"] = float(recall(lm, seen_q, answers, al).mean())
    result["aligner"] = entry
    al.metrics = {**al.metrics, **{k: v for k, v in entry.items() if k != "training"}}
    al.params["task"] = run.task
    log(f"Aligner N={run.n_tokens} ({al.n_parameters} parameters): {metric} {al_scores.mean():.3f}")

    if run.compare_vector and run.task != "facts":
        if run.task == "form":
            plain = [
                Response(r.prompt, r.response[len(FORM_PHRASE) :].strip() or ".") for r in data
            ]
            direction = response_direction(lm, data, plain, layer)
            best: tuple[float, float, SteeringSpec | None] = (-1.0, 0.0, None)
            for c in (1.0, 2.0, 4.0, 8.0):  # the coefficient that works best on training questions
                spec = SteeringSpec(direction, coeff=c, scale="raw")
                ok = float(form_success(lm, train_q[:16], spec).mean())
                if ok > best[0]:
                    best = (ok, c, spec)
            assert best[2] is not None
            spec, how = best[2], f"best of coefficients 1-8 on training questions ({best[1]})"
        else:
            chosen = [Response(p.prompt, p.chosen or "") for p in data]
            rejected = [Response(p.prompt, p.rejected) for p in data]
            direction = response_direction(lm, chosen, rejected, layer)
            spec, _ = matched_vector(lm, direction, costs, entry["neutral_kl"])
            how = "KL on neutral text matched to the Aligner's"
        v_scores = score(spec)
        result["vector"] = {
            "parameters": lm.d_model,
            "site": f"blocks.{layer}.hook_resid_post",
            "coefficient": spec.coeff,
            "chosen_by": how,
            metric: float(v_scores.mean()),
            f"{metric}_change": _interval(base_scores, v_scores),
            **costs_of(spec),
        }
        log(f"steering vector: {metric} {v_scores.mean():.3f}")

    if run.compare_lora:
        ad = lora_for(lm, run)
        lres = train_intervention(
            lm, ad, ad.parameters(), data, lora_cfg, progress=progress, desc="LoRA"
        )
        l_scores = score(ad)
        result["lora"] = {
            "parameters": lora_parameters(ad),
            "rank": run.lora_rank,
            "layers": f"{run.lora_first_layer}..{lm.n_layers - 1} (q_proj, v_proj)",
            metric: float(l_scores.mean()),
            f"{metric}_change": _interval(base_scores, l_scores),
            "training": lres.summary(),
            **costs_of(ad),
        }
        if run.task == "facts":
            result["lora"]["recall_training_wording"] = float(
                recall(lm, seen_q, answers, ad).mean()
            )
        log(f"LoRA ({lora_parameters(ad)} parameters): {metric} {l_scores.mean():.3f}")

    result["metric"] = metric
    result["seconds"] = time.perf_counter() - t0
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        al.save(folder / "aligner")
        write_text(folder / "result.json", json.dumps(result, indent=2))
    result["artifact"] = al
    return result
