"""Question-answer records: one model answer to one question, tagged with the source that gave it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from repe.errors import DataFormatError

_FIELDS = ("source", "qid", "question", "answer")


@dataclass(frozen=True)
class QARecord:
    """``source``: the name of what answered (a persona, a steering setting); ``qid``: the question's
    stable id (train/test splits are made on it); ``kind``: "value" or "control"."""

    source: str
    qid: str
    question: str
    answer: str
    kind: str = "value"

    def text(self) -> str:
        """What the encoder reads: UniVaR's ``Q: ... A: ...`` form."""
        return f"Q: {self.question}\nA: {self.answer}"


def write_records(records: Iterable[QARecord], path: str | os.PathLike[str]) -> None:
    """Append records to a JSONL file (one object per line)."""
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")


def read_records(path: str | os.PathLike[str]) -> list[QARecord]:
    """Records from a JSONL file; a malformed line is an error naming the file and line, except a
    truncated last line (an interrupted append), which is dropped."""
    p = Path(path)
    lines = p.read_text(encoding="utf-8").splitlines()
    out: list[QARecord] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines):
                break  # the write of the last line was cut off: what precedes it is intact
            raise DataFormatError(f"{p}:{i}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict) or any(not isinstance(obj.get(k), str) for k in _FIELDS):
            raise DataFormatError(f"{p}:{i}: a record needs string fields {', '.join(_FIELDS)}")
        out.append(QARecord(**{k: obj[k] for k in (*_FIELDS, "kind") if k in obj}))
    return out
