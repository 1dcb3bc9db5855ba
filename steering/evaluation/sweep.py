"""Choosing where and how hard to steer: a coefficient x layer sweep of effect against cost.

For each layer and coefficient :func:`coeff_layer_sweep` reports the held-out A/B matching probability
(:func:`steering.evaluation.ab.ab_eval`), its shift from coefficient 0 at that layer, and the cost on neutral
text (KL from the unsteered model, perplexity). It recommends the strongest setting — the largest A/B
shift toward the behaviour among positive coefficients — whose KL stays within ``kl_budget``, and
:meth:`SweepReport.apply_to` writes that choice into a Direction (``recommended_coeff``, ``best_site``,
the table in ``metrics["sweep"]``).

>>> report = coeff_layer_sweep(lm, "sycophancy", layers=[8, 11, 14], coeffs=[-0.2, 0, 0.2])
>>> print(report.table())
>>> tuned = report.apply_to(report.direction)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from probes.caa import caa_direction
from probes.cloze import cloze_direction
from repe.datasets import CAAItem
from repe.directions import Direction
from repe.errors import require
from repe.models import LoadedModel
from steering.evaluation.ab import IDENTITY_AT_ZERO, ab_eval_specs, paired_shift
from steering.evaluation.cloze import cloze_eval_specs
from steering.evaluation.control import ABControl, ab_control
from steering.evaluation.costs import NeutralCosts
from steering.operators import OPERATORS
from steering.spec import SCALES, SteeringSpec

FORMS = ("ab", "cloze")
# what each form's score is, by name (plots and messages label the form they show)
FORM_SCORE = {
    "ab": "A/B matching probability",
    "cloze": "cloze matching probability (answer texts)",
}
DEFAULT_COEFFS = (-0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.4)


@dataclass(frozen=True)
class SweepRow:
    """One setting: steer ``site`` with ``coeff`` (in the report's scale)."""

    layer: int
    site: str
    coeff: float
    score: float  # A/B matching probability
    shift: float  # score - score at coeff 0, same layer
    balanced_score: float  # the score averaged per matching letter (see ABResult)
    kl: float  # mean KL(base || steered) on neutral text, nats per token
    perplexity: float  # on neutral text
    letter_mass: float  # mean p(matching) + p(not matching)
    se: float = 0.0  # paired standard error of the shift over items (0 at coeff 0)

    @property
    def beyond_noise(self) -> bool:
        """Whether the shift is more than two paired standard errors from zero."""
        return abs(self.shift) > 2 * self.se


@dataclass
class SweepReport:
    """The sweep table and the recommended setting (None when no positive coefficient both moves the
    A/B score toward the behaviour and keeps KL within the budget)."""

    behaviour: str | None
    rows: list[SweepRow]
    kl_budget: float
    scale: str
    operator: str
    positions: str
    n_items: int
    base_score: float
    base_perplexity: float
    recommended: SweepRow | None
    direction: Direction | None = field(default=None, repr=False)
    items_fingerprint: str = ""
    # does the model read A/B options at all? (steering.evaluation.control)
    control: ABControl | None = None
    form: str = "ab"  # "ab": answer letters; "cloze": answer texts (steering.evaluation.cloze)

    @property
    def layers(self) -> list[int]:
        return sorted({r.layer for r in self.rows})

    @property
    def coeffs(self) -> list[float]:
        return sorted({r.coeff for r in self.rows})

    def at(self, layer: int) -> list[SweepRow]:
        """The rows of one layer, by coefficient."""
        rows = sorted((r for r in self.rows if r.layer == layer), key=lambda r: r.coeff)
        if not rows:
            raise ValueError(f"layer must be one of the swept layers {self.layers}; got {layer!r}")
        return rows

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (what :meth:`apply_to` stores in ``metrics["sweep"]``)."""
        return {
            "behaviour": self.behaviour,
            "form": self.form,
            "kl_budget": self.kl_budget,
            "scale": self.scale,
            "operator": self.operator,
            "positions": self.positions,
            "n_items": self.n_items,
            "items_fingerprint": self.items_fingerprint,
            "base_score": self.base_score,
            "base_perplexity": self.base_perplexity,
            "control": None if self.control is None else self.control.to_dict(),
            "rows": [asdict(r) for r in self.rows],
            "recommended": None
            if self.recommended is None
            else {
                "layer": self.recommended.layer,
                "site": self.recommended.site,
                "coeff": self.recommended.coeff,
                "score": self.recommended.score,
                "shift": self.recommended.shift,
                "se": self.recommended.se,
                "kl": self.recommended.kl,
            },
        }

    def table(self) -> str:
        """A plain-text table; the recommended row is marked with ``*``."""
        head = (
            f"{'layer':>5} {'coeff':>7} {'A/B' if self.form == 'ab' else 'cloze':>7} {'shift':>8} {'se':>7} {'bal':>7} {'KL':>8} "
            f"{'ppl':>8} {'mass':>6}"
        )
        lines = [
            f"{'A/B' if self.form == 'ab' else 'Cloze'} sweep{'' if self.behaviour is None else ' ' + self.behaviour}: {self.n_items} "
            f"held-out items, scale={self.scale}, operator={self.operator}, "
            f"positions={self.positions}, KL budget {self.kl_budget:g}",
            head,
            "-" * len(head),
        ]
        for layer in self.layers:
            for r in self.at(layer):
                mark = " *" if r == self.recommended else ""
                lines.append(
                    f"{r.layer:>5} {r.coeff:>7.3g} {r.score:>7.4f} {r.shift:>+8.4f} {r.se:>7.4f} "
                    f"{r.balanced_score:>7.4f} {r.kl:>8.4f} {r.perplexity:>8.3f} "
                    f"{r.letter_mass:>6.3f}{mark}"
                )
        if self.recommended is None:
            lines.append(
                "no recommendation: no positive coefficient raised the score within the budget"
            )
        else:
            r = self.recommended
            noise = "" if r.beyond_noise else " (its shift is within two standard errors of zero)"
            lines.append(f"recommended: {r.site} coeff {r.coeff:g} ({self.scale}){noise}")
        if self.control is not None:
            lines.append(str(self.control))
            warning = self.control.warning()
            if warning:
                lines.append(f"WARNING: {warning}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def apply_to(self, direction: Direction | None = None) -> Direction:
        """A copy of ``direction`` (default: the one swept) with ``recommended_coeff`` and ``best_site``
        set from the recommendation and the sweep in ``metrics["sweep"]``."""
        d = direction if direction is not None else self.direction
        if d is None:
            raise ValueError("direction: pass the Direction to annotate (the report holds none)")
        if self.recommended is None:
            raise ValueError(
                f"the sweep recommends no setting (no positive coefficient raised the A/B score with "
                f"KL <= kl_budget={self.kl_budget:g}); raise kl_budget or sweep other layers"
            )
        site = self.recommended.site
        if site not in d.vectors:
            raise ValueError(f"direction {d.name!r} has no vector at the recommended site {site!r}")
        return replace(
            d,
            recommended_coeff=self.recommended.coeff,
            best_site=site,
            metrics={**d.metrics, "sweep": self.to_dict()},
        )


def recommend(rows: Sequence[SweepRow], kl_budget: float) -> SweepRow | None:
    """The positive-coefficient row with the largest positive shift whose KL is within the budget
    (ties: the smaller KL, then the smaller coefficient)."""
    ok = [r for r in rows if r.coeff > 0 and r.shift > 0 and r.kl <= kl_budget]
    if not ok:
        return None
    return max(ok, key=lambda r: (r.shift, -r.kl, -r.coeff))


def coeff_layer_sweep(
    lm: LoadedModel,
    behaviour: str | Sequence[CAAItem],
    layers: Sequence[int],
    coeffs: Sequence[float] = DEFAULT_COEFFS,
    *,
    kl_budget: float = 0.1,
    n_items: int | None = 40,
    direction: Direction | None = None,
    n_pairs: int | None = 64,
    scale: str = "relative",
    operator: str = "add",
    positions: str = "all",
    batch_size: int = 16,
    seed: int = 0,
    kl_texts: Sequence[str] | None = None,
    progress: Callable[[float, str], None] | None = None,
    control: bool | ABControl = True,
    form: str = "ab",
) -> SweepReport:
    """Sweep coefficients x layers: A/B effect on held-out items against KL / perplexity on neutral text.

    Args:
        lm: the model.
        behaviour: a CAA behaviour name (held-out items from :func:`repe.datasets.caa.caa_split` with
            ``seed``) or a list of ``CAAItem`` (then ``direction`` is required).
        layers: blocks to steer, one at a time (``blocks.L.hook_resid_post``).
        coeffs: coefficients in ``scale`` units; 0 is added when missing.
        kl_budget: the largest mean KL (nats per token) a recommended setting may cost.
        n_items: held-out A/B items (sampled with ``seed``; None = all).
        direction: the direction to steer with (default: :func:`probes.caa.caa_direction` on the
            training split, ``n_pairs`` pairs, at ``layers``).
        scale, operator: as in :class:`steering.SteeringSpec`.
        positions: which tokens of the A/B prompt are steered: ``"all"`` (default, as
            ``SteeringSpec``) or ``"assistant"``, the opened answer only, as CAA does on Llama 2 (much
            cheaper: the question runs once for every setting, but on small models such as the
            embedded SmolLM2-135M it barely moves the answers). Neutral text is steered at every token.
        kl_texts: neutral texts for the cost (default: ``repe.datasets.load_neutral()``).
        progress: called as ``progress(fraction_done, what)`` while it runs (a UI's progress bar;
            raising from it stops the sweep).
        control: run :func:`steering.evaluation.control.ab_control` (64 short prompts) and keep its result in
            the report (True, default), skip it (False), or pass a result already measured on ``lm``.
            Only for ``form="ab"``.
        form: ``"ab"`` (default): CAA's A/B letters (:func:`steering.evaluation.ab.ab_eval_specs`, vector
            :func:`probes.caa.caa_direction`); ``"cloze"``: the answers' texts
            (:func:`steering.evaluation.cloze.cloze_eval_specs`, vector :func:`probes.cloze.cloze_direction`),
            for models that do not read A/B options.
    """
    if not layers:
        raise ValueError("layers is empty: pass at least one block index")
    for layer in layers:
        if not isinstance(layer, int) or not 0 <= layer < lm.n_layers:
            raise ValueError(
                f"layers must be block indices in [0, {lm.n_layers - 1}]; got {layer!r}"
            )
    if not coeffs:
        raise ValueError("coeffs is empty: pass coefficients such as (-0.2, 0, 0.2)")
    if kl_budget < 0:
        raise ValueError(f"kl_budget must be >= 0; got {kl_budget!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}; got {scale!r}")
    if operator not in OPERATORS:
        raise ValueError(f"operator must be one of {sorted(OPERATORS)}; got {operator!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}; got {form!r}")
    layer_list = sorted(set(layers))
    coeff_list = sorted({float(c) for c in coeffs} | {0.0})
    if direction is None:
        if not isinstance(behaviour, str):
            raise ValueError("direction is required when behaviour is a list of items")
        build = caa_direction if form == "ab" else cloze_direction
        direction = build(lm, behaviour, layers=layer_list, n_pairs=n_pairs, seed=seed)
    sites = {layer: f"blocks.{layer}.hook_resid_post" for layer in layer_list}
    missing = [s for s in sites.values() if s not in direction.vectors]
    if missing:
        raise ValueError(
            f"direction {direction.name!r} has no vector at {missing}; sites: {direction.sites}"
        )

    def spec(layer: int, c: float) -> SteeringSpec:
        return SteeringSpec(
            direction,
            coeff=c,
            operator=operator,
            positions=positions,
            scale=scale,
            sites=[sites[layer]],
        )

    exact_zero = operator in IDENTITY_AT_ZERO  # coeff 0 rows are the unsteered numbers
    settings = [
        (layer, c) for layer in layer_list for c in coeff_list if c != 0.0 or not exact_zero
    ]

    def report(fraction: float, what: str) -> None:
        if progress is not None:
            progress(fraction, what)

    evaluate = ab_eval_specs if form == "ab" else cloze_eval_specs
    results = evaluate(
        lm,
        behaviour,
        [None, *(spec(layer, c) for layer, c in settings)],
        n_items=n_items,
        batch_size=batch_size,
        seed=seed,
        progress=lambda done, total: report(0.65 * done / total, "A/B answers"),
    )
    base = results[0]
    checked: ABControl | None = control if isinstance(control, ABControl) else None
    if control is True and form == "ab":
        checked = ab_control(
            lm,
            batch_size=batch_size,
            progress=lambda done, total: report(0.7 - 0.05 * (total - done) / total, "A/B control"),
        )
    costs = NeutralCosts(lm, kl_texts, batch_size)
    base_ppl = costs.perplexity(None)
    measured = {}
    for i, ((layer, c), res) in enumerate(zip(settings, results[1:], strict=True)):
        report(0.7 + 0.3 * i / max(len(settings), 1), "KL and perplexity on neutral text")
        kl, ppl = costs.measure(spec(layer, c))
        measured[(layer, c)] = (res, kl, ppl)
    rows = []
    for layer in layer_list:
        zero = measured.get((layer, 0.0), (base, 0.0, base_ppl))
        for c in coeff_list:
            res, kl, ppl = measured.get((layer, c), zero)
            shift, se = paired_shift(zero[0].item_scores, res.item_scores)
            rows.append(
                SweepRow(
                    layer,
                    sites[layer],
                    c,
                    res.score,
                    shift,
                    res.balanced_score,
                    kl,
                    ppl,
                    res.letter_mass,
                    se if math.isfinite(se) else 0.0,
                )
            )
    report(1.0, "done")
    return SweepReport(
        behaviour=behaviour if isinstance(behaviour, str) else None,
        rows=rows,
        kl_budget=kl_budget,
        scale=scale,
        operator=operator,
        positions=positions,
        n_items=base.n_items,
        base_score=base.score,
        base_perplexity=base_ppl,
        recommended=recommend(rows, kl_budget),
        direction=direction,
        items_fingerprint=base.items_fingerprint,
        control=checked,
        form=form,
    )


def sweep_figure(report: SweepReport) -> Any:
    """A plotly figure: the form's score (left, with bars of two paired standard errors of the shift) and KL
    (right) against the coefficient, one line per layer, the KL budget as a dashed line and the recommended setting as a star. Needs the ``plots`` extra."""
    go = require("plotly.graph_objects", "plots")
    subplots = require("plotly.subplots", "plots")
    score_name = FORM_SCORE[report.form]
    fig = subplots.make_subplots(
        rows=1, cols=2, subplot_titles=(score_name, "KL from base (neutral text)")
    )
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    for i, layer in enumerate(report.layers):
        rows = report.at(layer)
        color = palette[i % len(palette)]
        x = [r.coeff for r in rows]
        errors = {"type": "data", "array": [2 * r.se for r in rows], "visible": True}
        for col, y in ((1, [r.score for r in rows]), (2, [r.kl for r in rows])):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=y,
                    error_y=errors if col == 1 else None,
                    mode="lines+markers",
                    name=f"layer {layer}",
                    legendgroup=f"layer {layer}",
                    showlegend=col == 1,
                    line={"color": color},
                ),
                row=1,
                col=col,
            )
    fig.add_hline(
        y=report.kl_budget,
        line_dash="dash",
        line_color="grey",
        row=1,
        col=2,
        annotation_text=f"KL budget {report.kl_budget:g}",
        annotation_position="top left",
    )
    if report.recommended is not None:
        r = report.recommended
        for col, value in ((1, r.score), (2, r.kl)):
            fig.add_trace(
                go.Scatter(
                    x=[r.coeff],
                    y=[value],
                    mode="markers",
                    marker={"symbol": "star", "size": 16, "color": "black"},
                    name=f"recommended (layer {r.layer}, coeff {r.coeff:g})",
                    legendgroup="recommended",
                    showlegend=col == 1,
                ),
                row=1,
                col=col,
            )
    title = "Steering sweep" + ("" if report.behaviour is None else f": {report.behaviour}")
    fig.update_layout(title=title, template="plotly_white")
    fig.update_xaxes(title_text=f"coefficient ({report.scale})")
    fig.update_yaxes(title_text=f"{score_name} (mean over items)", row=1, col=1)
    fig.update_yaxes(title_text="KL (nats/token)", row=1, col=2)
    return fig
