"""Measuring what steering does: the behaviour evaluation sub-package.

* :mod:`steering.evaluation.ab` — CAA's A/B evaluation (the answer letter's probability).
* :mod:`steering.evaluation.cloze` — the same items scored on the answers' texts (cloze form).
* :mod:`steering.evaluation.control` — the A/B control: does the model read the options at all?
* :mod:`steering.evaluation.costs` — KL from the unsteered model and perplexity on neutral text.
* :mod:`steering.evaluation.sweep` — a coefficient x layer sweep of all of the above, with a
  recommended setting.
* :mod:`steering.evaluation.prompting` — steering against prompting (system prompts, few-shot examples):
  behaviour shift, KL and perplexity side by side, and which moves the behaviour more per nat of KL.

The vectors themselves are built by readers in ``probes`` (``probes.caa``, ``probes.cloze``); the
items and their split by question come from ``repe.datasets.caa``.
"""

from steering.evaluation.ab import ABResult, ab_eval, ab_eval_specs, paired_shift
from steering.evaluation.cloze import cloze_eval_specs
from steering.evaluation.control import ABControl, ab_control
from steering.evaluation.costs import NeutralCosts, kl_from_base, perplexity
from steering.evaluation.prompting import (
    SteeringVsPrompting,
    prompt_conditions,
    prompt_costs,
    steering_vs_prompting,
)
from steering.evaluation.sweep import SweepReport, coeff_layer_sweep

__all__ = [
    "ABControl",
    "ABResult",
    "NeutralCosts",
    "SteeringVsPrompting",
    "SweepReport",
    "ab_control",
    "ab_eval",
    "ab_eval_specs",
    "cloze_eval_specs",
    "coeff_layer_sweep",
    "kl_from_base",
    "paired_shift",
    "perplexity",
    "prompt_conditions",
    "prompt_costs",
    "steering_vs_prompting",
]
