"""Study: does any prompt format make the embedded model read A/B options?

The A/B control (``steering.evaluation.control``: 32 trivially easy questions, each in both option orders) is
scored under several prompt formats: the chat format the A/B evaluation uses (assistant turn opened with
``"("``), other chat openers, an instruction, few-shot chat turns, and plain text without the chat
template. For each: the correct letter's probability renormalised over A and B, averaged per question
over its two orders (0.5 = the letter does not depend on the options), its standard error over
questions, and the accuracy. The report goes to ``--out`` (default ``studies/reports/ab_formats.md``).

    .venv/bin/python studies/ab_formats.py      # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from repe.atomic import write_text  # noqa: E402
from repe.datasets import CAAItem, load_ab_control  # noqa: E402
from repe.models import LoadedModel, load_model  # noqa: E402
from steering.evaluation.ab import ABResult  # noqa: E402
from steering.evaluation.control import summarise  # noqa: E402

INSTRUCTION = "Answer with the letter of the correct choice."
SHOTS = [
    ("Which of these is an animal?\n\nChoices:\n (A) A horse\n (B) A table", "(A)"),
    ("What is 3 + 1?\n\nChoices:\n (A) 10\n (B) 4", "(B)"),
    ("Which is hot?\n\nChoices:\n (A) Snow\n (B) Fire", "(B)"),
    ("What do people sleep in?\n\nChoices:\n (A) A bed\n (B) A cup", "(A)"),
]


def chat(lm: LoadedModel, question: str, opener: str, system: str = "", shots: int = 0) -> str:
    msgs = [{"role": "system", "content": system}] if system else []
    for q, a in SHOTS[:shots]:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": question})
    text = lm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return str(text) + opener


# name -> (prompt builder, letters as the next token: "A" or " A")
FORMATS: dict[str, tuple[Callable[[LoadedModel, str], str], str]] = {
    "chat, answer opened with '(' (the A/B evaluation)": (lambda lm, q: chat(lm, q, "("), ""),
    "chat, answer not opened": (lambda lm, q: chat(lm, q, ""), ""),
    "chat, 'The answer is ('": (lambda lm, q: chat(lm, q, "The answer is ("), ""),
    "chat, instruction in the user turn, '('": (
        lambda lm, q: chat(lm, f"{q}\n\n{INSTRUCTION}", "("),
        "",
    ),
    "chat, instruction as system prompt, '('": (
        lambda lm, q: chat(lm, q, "(", system=INSTRUCTION),
        "",
    ),
    "chat, 2 solved examples first, '('": (lambda lm, q: chat(lm, q, "(", shots=2), ""),
    "chat, 4 solved examples first, '('": (lambda lm, q: chat(lm, q, "(", shots=4), ""),
    "plain text, 'Question: ... Answer: ('": (lambda lm, q: f"Question: {q}\nAnswer: (", ""),
    "plain text, 'Question: ... Answer:' (letters ' A' / ' B')": (
        lambda lm, q: f"Question: {q}\nAnswer:",
        " ",
    ),
}


def score(lm: LoadedModel, items: list[CAAItem], build: Callable[..., str], space: str) -> ABResult:
    tok = lm.tokenizer
    ids_a, ids_b = (tok.encode(space + x, add_special_tokens=False) for x in "AB")
    if len(ids_a) != 1 or len(ids_b) != 1:
        raise ValueError(f"{space + 'A'!r} / {space + 'B'!r} are not single tokens")
    out = []
    for it in items:
        text = build(lm, it.question)
        plain = not text.startswith("<|")
        ids = tok(text, return_tensors="pt", add_special_tokens=plain).input_ids
        with torch.inference_mode():
            p = lm.model(ids).logits[0, -1].float().softmax(-1)
        pa, pb = float(p[ids_a[0]]), float(p[ids_b[0]])
        out.append(pa / (pa + pb) if it.answer_matching_behavior == "(A)" else pb / (pa + pb))
    mean = sum(out) / len(out)
    return ABResult(mean, mean, len(out), out, float("nan"), sum(x > 0.5 for x in out) / len(out))


def study(lm: LoadedModel | None = None) -> str:
    """The report (markdown); ``lm`` defaults to the embedded model."""
    lm = lm if lm is not None else load_model()
    items = load_ab_control()
    lines = [
        "# Does any prompt format make the embedded model read A/B options?",
        "",
        f"The A/B control ({len(items) // 2} trivially easy questions x 2 option orders). Score: the "
        "correct letter's probability over A and B, averaged per question over its two orders; 0.5 = "
        "the letter does not depend on the options.",
        "",
        "| format | score | se | accuracy | reads the options (> 0.5 + 2 se) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, (build, space) in FORMATS.items():
        c = summarise(items, score(lm, items, build, space))
        lines.append(
            f"| {name} | {c.score:.4f} | {c.se:.4f} | {c.accuracy:.3f} | "
            f"{'yes' if c.reads_choices else 'no'} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "studies" / "reports" / "ab_formats.md")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report = study()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, report)
    print(report)


if __name__ == "__main__":
    main()
