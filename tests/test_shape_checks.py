"""jaxtyping's shape checks run under pytest for ``probes`` and ``steering`` as well as ``repe``
(``--jaxtyping-packages=repe,probes,steering,repe.typecheck.shapes`` in pyproject.toml), and they check
array shapes only: a public function's own one-line error for a wrong argument type still reaches the
caller."""

from __future__ import annotations

import jaxtyping
import pytest
import torch

from probes.caa import caa_direction
from probes.contrast import mean_difference
from probes.readers import MeanDiff
from repe.directions import Direction
from repe.models import LoadedModel
from repe.typecheck import is_array_hint
from steering.operators import op_add
from steering.spec import SteeringSpec, resolve


def test_probes_functions_are_shape_checked() -> None:
    with pytest.raises(jaxtyping.TypeCheckError):
        MeanDiff()._direction(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(jaxtyping.TypeCheckError):
        mean_difference(torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(2))


def test_steering_functions_are_shape_checked(tiny_lm: LoadedModel) -> None:
    with pytest.raises(jaxtyping.TypeCheckError):
        op_add(torch.zeros(2, 5, 8), torch.zeros(7), torch.zeros(7), 0.0)
    v = torch.zeros(tiny_lm.d_model)
    v[0] = 1.0
    r = resolve(tiny_lm, SteeringSpec(Direction({"blocks.1.hook_resid_post": v}, tiny_lm.identity)))
    h = torch.zeros(2, 3, tiny_lm.d_model)
    with pytest.raises(jaxtyping.TypeCheckError):
        r.apply(h, "blocks.1.hook_resid_post", torch.ones(2, 4, dtype=torch.bool))  # 4 != 3 tokens
    assert (
        r.apply(h, "blocks.1.hook_resid_post", torch.ones(2, 3, dtype=torch.bool)).shape == h.shape
    )


def test_only_array_annotations_are_checked(tiny_lm: LoadedModel) -> None:
    """A wrong non-array argument gets the function's own error, not a type-check error."""
    with pytest.raises(ValueError, match="behaviour name or a ContrastDataset"):
        caa_direction(tiny_lm, 3, layers=[1])  # type: ignore[arg-type]
    assert is_array_hint(jaxtyping.Float[torch.Tensor, "n d"] | None)
    assert not is_array_hint(int | None)
