"""Answers per *source* for value maps: a source is (model, system-prompt persona, steering spec or none,
sampling settings). Every question is answered by every source with batched, KV-cached, seeded generation
through the ordinary ``steer()`` path (``steering.generate``), stored as QA records and cached on disk
keyed by the model's identity, the source, the question set's fingerprint and the sampling settings, so
the app, the command line and studies reuse them.

Each question's row samples from its own generator seeded by (sampling seed, question id): an answer is
the same whatever batch it was generated in, so a run that was cancelled and resumed gives the answers an
uninterrupted run gives. Records are appended to the cache after every batch: cancelling keeps what is
done.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from probes.valuemap.records import QARecord, read_records, write_records
from repe.chat import messages
from repe.datasets.questions import QuestionSet
from repe.models import LoadedModel, cache_root
from steering.generate import GenerationConfig, generate
from steering.spec import SteeringSpec

DEFAULT_SAMPLING = GenerationConfig(
    max_new_tokens=48, do_sample=True, temperature=0.7, top_p=0.9, seed=0
)


def spec_fingerprint(spec: SteeringSpec) -> str:
    """A digest of everything that changes what a spec does: its JSON view, its vectors and the
    direction's parameters (the calibration the relative scale reads)."""
    h = hashlib.sha256(json.dumps(spec.to_json(), sort_keys=True, default=str).encode())
    h.update(json.dumps(spec.direction.params, sort_keys=True, default=str).encode())
    for site, vec in sorted(spec.direction.tensors().items()):
        h.update(site.encode())
        h.update(vec.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Source:
    """What answers: ``persona`` is a system prompt (None: the model's default chat template);
    ``spec`` a steering setting (None: unsteered). ``name`` labels the source on maps and in
    metrics; it is not part of the cache key."""

    name: str
    persona: str | None = None
    spec: SteeringSpec | None = field(default=None, compare=False)
    sampling: GenerationConfig = DEFAULT_SAMPLING
    coeff: float | None = None  # the steering coefficient, for trajectories

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "\n\r\t"):
            raise ValueError(f"a source needs a one-line name; got {self.name!r}")

    def key(self) -> dict[str, Any]:
        return {
            "persona": self.persona,
            "spec": None if self.spec is None else spec_fingerprint(self.spec),
            "sampling": asdict(self.sampling),
        }


def question_seed(seed: int, qid: str) -> int:
    return (
        int.from_bytes(hashlib.sha256(f"{seed}:{qid}".encode()).digest()[:4], "little") & 0x7FFFFFFF
    )


class AnswerCache:
    """One JSONL file of records per (model identity, source key, question-set fingerprint), under
    ``root`` (default: the repe cache's ``answers`` folder), with a small JSON beside it saying what
    the key was."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else cache_root() / "answers"

    def path(self, lm: LoadedModel, source: Source, questions: QuestionSet) -> Path:
        key = {
            "model": lm.identity.to_dict(),
            "source": source.key(),
            "questions": {"name": questions.name, "fingerprint": questions.fingerprint},
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        path = self.root / f"{digest[:24]}.jsonl"
        meta = path.with_suffix(".key.json")
        if not meta.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps(key, indent=1, sort_keys=True, default=str))
        return path

    def load(self, path: Path) -> dict[str, QARecord]:
        return {r.qid: r for r in read_records(path)} if path.exists() else {}


@dataclass
class Answers:
    """Records in (source, question) order; ``complete`` is False when the run was cancelled."""

    records: list[QARecord]
    complete: bool
    generated: int = 0  # answers generated in this call (the rest came from the cache)
    new_tokens: int = 0


def collect_answers(
    lm: LoadedModel,
    sources: Sequence[Source],
    questions: QuestionSet,
    *,
    cache: AnswerCache | None = None,
    use_cache: bool = True,
    batch_size: int = 32,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> Answers:
    """Every question answered by every source (cached answers reused; the rest generated in
    batches of ``batch_size``, longest prompts together). ``should_stop`` is asked between batches:
    True stops the run, keeping (and caching) what is done."""
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique; got {names}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    cache = cache or AnswerCache()
    done: dict[str, dict[str, QARecord]] = {}
    paths: dict[str, Path] = {}
    for s in sources:
        paths[s.name] = cache.path(lm, s, questions)
        done[s.name] = cache.load(paths[s.name]) if use_cache else {}
        if not use_cache:
            paths[s.name].unlink(missing_ok=True)
    todo = sum(1 for s in sources for q in questions.questions if q.qid not in done[s.name])
    generated = tokens = 0
    stopped = False
    bar = tqdm(total=todo, desc="answers", unit="answer", disable=not progress or todo == 0)
    tok = lm.tokenizer
    with bar:
        for s in sources:
            missing = [q for q in questions.questions if q.qid not in done[s.name]]
            missing.sort(key=lambda q: -len(q.text))
            for start in range(0, len(missing), batch_size):
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                chunk = missing[start : start + batch_size]
                texts = generate(
                    lm,
                    [messages(q.text, system=s.persona) for q in chunk],
                    s.spec,
                    s.sampling,
                    seeds=[question_seed(s.sampling.seed, q.qid) for q in chunk],
                )
                new = [
                    QARecord(s.name, q.qid, q.text, t.strip(), q.kind)
                    for q, t in zip(chunk, texts, strict=True)
                ]
                write_records(new, paths[s.name])
                done[s.name].update({r.qid: r for r in new})
                generated += len(new)
                tokens += sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
                bar.update(len(new))
            if stopped:
                break
    records = [
        QARecord(s.name, r.qid, r.question, r.answer, r.kind)
        for s in sources
        for q in questions.questions
        if (r := done[s.name].get(q.qid)) is not None
    ]
    return Answers(records, complete=not stopped, generated=generated, new_tokens=tokens)
