"""One hook-gating helper (``repe.hooks.hook_scope``) serves capture, CAA's letter-pair capture and
steering: a scope's hooks act only for forward passes run inside it, every hook goes when it closes
(also after an exception), and scopes in other threads never see each other's hooks."""

from __future__ import annotations

import contextvars
import threading
from typing import Any

import pytest
import torch
from torch import nn

from probes.caa import _capture_letter_pairs
from repe import capture
from repe.directions import Direction
from repe.hooks import HookScope, hook_scope, leftover_hooks
from repe.models import LoadedModel
from steering import SteeringSpec, steer


def test_a_gated_hook_runs_only_inside_its_scope() -> None:
    lin = nn.Linear(2, 2)
    seen: list[str] = []
    with hook_scope() as scope:
        scope.add(lin.register_forward_hook(scope.gate(lambda *_: seen.append("in"))))
        lin(torch.zeros(1, 2))
        # the same module called from a thread (a fresh context): the hook stays silent there
        t = threading.Thread(target=lambda: lin(torch.zeros(1, 2)))
        t.start()
        t.join()
        # a context copied while the scope is open is inside it
        contextvars.copy_context().run(lambda: lin(torch.zeros(1, 2)))
        assert leftover_hooks(lin) == ["<root>"]
    lin(torch.zeros(1, 2))
    assert seen == ["in", "in"]
    assert leftover_hooks(lin) == []


def test_nested_scopes_are_independent_and_close_on_errors() -> None:
    lin = nn.Linear(2, 2)
    seen: list[str] = []
    with hook_scope() as outer:
        outer.add(lin.register_forward_hook(outer.gate(lambda *_: seen.append("outer"))))
        with pytest.raises(RuntimeError), hook_scope() as inner:
            inner.add(lin.register_forward_hook(inner.gate(lambda *_: seen.append("inner"))))
            lin(torch.zeros(1, 2))
            raise RuntimeError("half-way")
        assert not inner.active() and outer.active()
        lin(torch.zeros(1, 2))
    assert seen == ["outer", "inner", "outer"]
    assert leftover_hooks(lin) == []


def test_capture_caa_and_steering_all_gate_through_the_one_helper(
    tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Count the hooks each of the three registers through ``HookScope.gate`` (the old code had its
    own gate in each, and registered none through the helper)."""
    calls: list[int] = []
    real = HookScope.gate

    def spy(self: HookScope, fn: Any) -> Any:
        calls.append(self.key)
        return real(self, fn)

    monkeypatch.setattr(HookScope, "gate", spy)
    capture(tiny_lm, ["a b c"], ["blocks.1.hook_resid_post"], progress=False)
    assert len(calls) == 2  # the site, and the early stop after the deepest site
    calls.clear()
    ids = tiny_lm.tokenizer("one two three")["input_ids"]
    _capture_letter_pairs(tiny_lm, [ids], [ids[:-1] + [ids[0]]], ["blocks.1.hook_resid_post"], 4)
    assert len(calls) == 2
    calls.clear()
    v = torch.zeros(tiny_lm.d_model)
    v[0] = 1.0
    d = Direction({"blocks.1.hook_resid_post": v}, tiny_lm.identity)
    with steer(tiny_lm, SteeringSpec(d, coeff=1.0, scale="raw")):
        assert len(calls) == 2  # the backbone's pre-hook and the steered site
        assert len(set(calls)) == 1
    assert leftover_hooks(tiny_lm.model) == []
