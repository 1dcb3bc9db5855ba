"""steering: interventions that change a running model (control vectors, ablation, clamping,
conditional steering, low-rank adapters, Aligner global tokens), all through one protocol and ``steer()``; generation; exporters
(``steering.export``); and the evaluation sub-package that measures their effect
(``steering.evaluation``)."""

from steering.adapter import LowRankAdapter
from steering.aligner import Aligner
from steering.hooks import SteerState, steer
from steering.intervention import Intervention, Resolved
from steering.operators import OPERATORS
from steering.spec import Condition, SteeringSpec

__all__ = [
    "OPERATORS",
    "Aligner",
    "Condition",
    "Intervention",
    "LowRankAdapter",
    "Resolved",
    "SteerState",
    "SteeringSpec",
    "steer",
]
