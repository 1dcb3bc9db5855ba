"""The Intervention protocol, tested with a second, trivial implementation: a per-site gain."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from repe.directions import Direction
from repe.hooks import leftover_hooks
from repe.sites import parse_site
from steering import Intervention, Resolved, SteeringSpec, steer

SITE = "blocks.2.hook_resid_post"


@dataclass
class ResolvedGain:
    gains: dict[str, float]
    positions: str = "all"
    token_indices: list[int] = field(default_factory=list)
    condition: Any = None

    @property
    def sites(self) -> list[str]:
        return list(self.gains)

    def find_assistant_starts(self, ids, real):
        raise ValueError("Gain does not support positions='assistant'")

    def apply(self, h, site, mask):
        new = h * self.gains[site]
        return new if mask is None else torch.where(mask.unsqueeze(-1), new, h)


@dataclass
class Gain:
    """Multiply the activation at each site by a number (plain data, no tensors)."""

    gains: dict[str, float]
    positions: str = "all"

    def resolve(self, lm):
        for s in self.gains:
            parse_site(s, lm.n_layers)  # refuses a site the model does not have
        return ResolvedGain(dict(self.gains), self.positions)

    def to_json(self):
        return {"kind": "gain", "gains": self.gains, "positions": self.positions}

    @property
    def exporters(self):
        return ("spec",)


def enc(lm, texts=("The weather today is", "Hello")):
    lm.tokenizer.padding_side = "left"
    return lm.tokenizer(list(texts), return_tensors="pt", padding=True)


def logits(lm, e):
    with torch.no_grad():
        return lm.model(**e).logits


def by_hand(lm, e, site, fn):
    layer = lm.layers[parse_site(site).layer]
    h = layer.register_forward_hook(
        lambda m, a, o: (fn(o[0]), *o[1:]) if isinstance(o, tuple) else fn(o)
    )
    try:
        return logits(lm, e)
    finally:
        h.remove()


def test_a_second_implementation_steers_through_steer(tiny_lm):
    g = Gain({SITE: 1.5})
    assert isinstance(g, Intervention) and isinstance(g.resolve(tiny_lm), Resolved)
    e = enc(tiny_lm)
    real = e["attention_mask"].bool().unsqueeze(-1)
    want = by_hand(tiny_lm, e, SITE, lambda h: torch.where(real, h * 1.5, h))
    with steer(tiny_lm, g):
        got = logits(tiny_lm, e)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, logits(tiny_lm, e))
    assert leftover_hooks(tiny_lm.model) == []


def test_positions_and_sequences_work_for_any_intervention(tiny_lm):
    e = enc(tiny_lm)
    with steer(tiny_lm, Gain({SITE: 1.5}, positions="prompt")) as state:
        with pytest.raises(ValueError, match="begin_sequence"):
            logits(tiny_lm, e)
        state.begin_sequence(attention_mask=e["attention_mask"])
        prompt = logits(tiny_lm, e)
    with steer(tiny_lm, Gain({SITE: 1.5})):
        everything = logits(tiny_lm, e)
    assert torch.allclose(prompt, everything, atol=1e-6)  # the whole input is the prompt here


def test_interventions_nest_with_steering_vectors(tiny_lm):
    g = torch.Generator().manual_seed(0)
    d = Direction({SITE: torch.randn(tiny_lm.d_model, generator=g)}, tiny_lm.identity).normalized()
    e = enc(tiny_lm)
    real = e["attention_mask"].bool().unsqueeze(-1)
    u = d[SITE]
    # the inner (later) steer's hook is prepended, so it runs first: gain, then the vector
    want = by_hand(tiny_lm, e, SITE, lambda h: torch.where(real, h * 2.0 + 3.0 * u, h))
    with (
        steer(tiny_lm, SteeringSpec(d, coeff=3.0, scale="unit")),
        steer(tiny_lm, Gain({SITE: 2.0})),
    ):
        got = logits(tiny_lm, e)
    assert torch.allclose(got, want, atol=1e-4)
    assert leftover_hooks(tiny_lm.model) == []


def test_steer_refuses_what_is_not_an_intervention(tiny_lm):
    with pytest.raises(TypeError, match="Intervention"), steer(tiny_lm, {"gains": 1}):  # type: ignore[arg-type]
        pass
    with (
        pytest.raises(ValueError, match="out of range"),
        steer(tiny_lm, Gain({"blocks.99.hook_resid_post": 2.0})),
    ):
        pass
    assert leftover_hooks(tiny_lm.model) == []


def test_steering_specs_say_which_exporters_carry_them(tiny_lm):
    d = Direction({SITE: torch.ones(tiny_lm.d_model)}, tiny_lm.identity).normalized()
    assert "gguf" in SteeringSpec(d, 1.0).exporters
    assert "gguf" not in SteeringSpec(d, 1.0, operator="ablate").exporters
    assert "gguf" not in SteeringSpec(d, 1.0, positions="prompt").exporters
    assert "pt" in SteeringSpec(d, 1.0, operator="clamp").exporters


def test_operator_properties_live_on_the_operator():
    from repe.cli import _operator_names
    from steering.evaluation.ab import IDENTITY_AT_ZERO
    from steering.operators import OPERATORS

    assert _operator_names() == list(OPERATORS)  # the CLI's choices come from the registry
    assert set(IDENTITY_AT_ZERO) == {n for n, op in OPERATORS.items() if op.identity_at_zero}
    h, u = torch.randn(3, 8), torch.nn.functional.normalize(torch.randn(8), dim=0)
    for name, op in OPERATORS.items():
        # identity_at_zero is what the function does at coefficient 0 (delta 0, clamp value 0)
        same = torch.allclose(op.fn(h, torch.zeros(8), u, 0.0), h, atol=1e-6)
        assert same == op.identity_at_zero, name
        assert op.formula and "safetensors" in op.exporters


def test_exported_spec_carries_the_operators_formula(tiny_lm, tmp_path):
    import json

    from steering.export import export
    from steering.operators import OPERATORS

    d = Direction({SITE: torch.ones(tiny_lm.d_model)}, tiny_lm.identity).normalized()
    export(SteeringSpec(d, 1.0, operator="ablate_add", scale="unit"), tmp_path / "s.json", "spec")
    payload = json.loads((tmp_path / "s.json").read_text())
    assert payload["formula"] == OPERATORS["ablate_add"].formula
