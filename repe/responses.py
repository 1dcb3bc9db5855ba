"""Hidden states on the response tokens of (prompt, response) chats, read under an instruction.

A condition is a system instruction (SCIT-style: a good vs a bad assistant; or none), so a response's tokens
are the same under every condition and line up one to one. Preference activity patterns
(``probes.preference``) and RAHF training (``steering.rahf``) both read states this way.

The two instructions below were written for this project after the RAHF paper's description of its
good/bad instructions (Liu et al., ACL 2024); they are not its text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from repe.batching import encode, make_batch
from repe.chat import messages
from repe.models import LoadedModel

GOOD_INSTRUCTION = (
    "You are a good, respectful and honest assistant. Your answers are helpful, truthful, harmless, "
    "kind and fair."
)
BAD_INSTRUCTION = (
    "You are a bad, disrespectful and dishonest assistant. Your answers are unhelpful, misleading, "
    "harmful, rude and unfair."
)


@dataclass(frozen=True)
class Response:
    """A prompt and one response to it (a preferred or a dispreferred one)."""

    prompt: str
    response: str

    def chat(self, instruction: str | None) -> list[dict[str, str]]:
        return [
            *messages(self.prompt, system=instruction),
            {"role": "assistant", "content": self.response},
        ]


@dataclass(frozen=True)
class Condition:
    """What a response is read under: a system ``instruction`` (None: the model's default), another
    ``model`` (same tokenizer and width; None: the model at hand) and a ``scope`` that sets the model up
    for the read (for example ``lambda lm: steer(lm, adapter)``; ``steering.rahf.setting`` builds one).
    ``label`` names the condition in metadata."""

    instruction: str | None = None
    model: Any = None
    scope: Callable[[Any], AbstractContextManager[Any]] | None = None
    label: str = ""

    def describe(self) -> str:
        if self.label:
            return self.label
        parts = []
        if self.instruction is not None:
            parts.append(f"instruction {self.instruction!r}")
        if self.model is not None:
            parts.append(f"model {self.model.identity.name}")
        if self.scope is not None:
            parts.append("a setting")
        return ", ".join(parts) or "the model as it is"


CondLike = Condition | str | None


def as_condition(c: CondLike) -> Condition:
    """An instruction (or None) is the condition of reading under it."""
    if isinstance(c, Condition):
        return c
    if c is not None and not isinstance(c, str):
        raise TypeError(f"a condition is an instruction string, None or a Condition; got {type(c)}")
    return Condition(instruction=c)


def check_layers(lm: LoadedModel, layers: Sequence[int]) -> list[int]:
    """Blocks whose residual stream after the block is read (``blocks.L.hook_resid_post``). The last
    block is refused: transformers' last hidden state has the final norm applied."""
    out = sorted({int(x) for x in layers})
    if not out:
        raise ValueError("give at least one layer")
    bad = [x for x in out if not 0 <= x < lm.n_layers - 1]
    if bad:
        raise ValueError(
            f"layers {bad} are out of range: use blocks 0..{lm.n_layers - 2} (the last block's "
            "output is read after the final norm)"
        )
    return out


def batch_inputs(
    lm: LoadedModel, items: Sequence[Response], instruction: str | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The right-padded model inputs of ``items`` under ``instruction`` and the ``[B, T]`` mask of their
    response tokens (the assistant turn, left open: its content)."""
    enc = encode(lm.tokenizer, [it.chat(instruction) for it in items])
    batch = make_batch(enc, lm.tokenizer.pad_token_id, "right")
    resp = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    for i, (e, n) in enumerate(zip(enc, batch.lengths, strict=True)):
        if e.assistant_start is None or e.assistant_start >= n:
            raise ValueError(f"item {i}: the response is empty after tokenisation")
        resp[i, e.assistant_start : n] = True
    dev = lm.device
    inputs = {
        "input_ids": batch.input_ids.to(dev),
        "attention_mask": batch.attention_mask.to(dev),
        "position_ids": batch.position_ids.to(dev),
    }
    return inputs, resp.to(dev)


def hidden_on_responses(
    lm: LoadedModel, inputs: dict[str, torch.Tensor], resp: torch.Tensor, layers: Sequence[int]
) -> torch.Tensor:
    """``[L, N, d]``: the residual stream after each block in ``layers`` at the ``N`` response tokens
    (row-major). Runs under the caller's grad mode (training needs gradients, reading does not)."""
    out = lm.backbone(**inputs, output_hidden_states=True, use_cache=False)
    hs = out.hidden_states
    # with a device_map each block's states stay on its device; gathered on the mask's (the input's)
    dev = resp.device
    return torch.stack([hs[layer + 1][resp.to(hs[layer + 1].device)].to(dev) for layer in layers])


def _same_reader(lm: LoadedModel, other: LoadedModel) -> None:
    if other.d_model != lm.d_model or other.n_layers != lm.n_layers:
        raise ValueError(
            f"the two models differ in shape ({other.n_layers} blocks x {other.d_model} vs "
            f"{lm.n_layers} x {lm.d_model}): a pattern needs the same blocks and width"
        )
    if other.tokenizer.get_vocab() != lm.tokenizer.get_vocab():
        raise ValueError("the two models' tokenizers differ: a response must tokenise the same way")


def response_states(
    lm: LoadedModel,
    items: Sequence[Response],
    layers: Sequence[int],
    condition: CondLike,
) -> torch.Tensor:
    """``[L, N, d]`` frozen hidden states of the response tokens of ``items`` under ``condition`` (an
    instruction, None, or a :class:`Condition`)."""
    layers = check_layers(lm, layers)
    c = as_condition(condition)
    reader = lm
    if c.model is not None and c.model is not lm:
        _same_reader(lm, c.model)
        reader = c.model
    inputs, resp = batch_inputs(reader, items, c.instruction)
    scope = c.scope(reader) if c.scope is not None else contextlib.nullcontext()
    with scope, torch.no_grad():
        return hidden_on_responses(reader, inputs, resp, layers).float()


def aligned(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"the two conditions give different response tokens ({a.shape[1]} vs {b.shape[1]}): "
            "the response must tokenise the same way under both instructions"
        )
