"""Token-level reading: project every token's activation onto a direction (RepE's "honesty scan").

>>> result = scan(lm, messages("Tell me about Paris.", assistant="Paris is in Germany."), honesty)
>>> list(result)[:3]                     # [(token, value), ...]
>>> html = scan_html(result)             # coloured tokens, red (absent) to green (present)
>>> fig = scan_figure(result)            # the same as a plotly heatmap
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from repe.batching import encode
from repe.capture import capture
from repe.chat import Conversation
from repe.directions import Direction
from repe.errors import require
from repe.models import LoadedModel

__all__ = ["ScanResult", "scan", "scan_figure", "scan_html", "token_strings"]


@dataclass(frozen=True)
class ScanResult:
    """Per-token projections of one text or conversation onto a direction at one site.

    ``values`` are the projections after the requested centring and scaling; ``raw`` are the plain
    dot products with the direction's vector. ``assistant_start`` is the first token of the assistant
    turn for conversations (None for plain texts). Iterating gives ``(token, value)`` pairs.
    """

    tokens: list[str]
    values: list[float]
    raw: list[float]
    site: str
    direction: str
    center: float
    scale: float
    assistant_start: int | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def __iter__(self) -> Iterator[tuple[str, float]]:
        return iter(zip(self.tokens, self.values, strict=True))

    def __getitem__(self, i: int) -> tuple[str, float]:
        return self.tokens[i], self.values[i]

    def pairs(self) -> list[tuple[str, float]]:
        return list(self)


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """The text each token adds, decoded incrementally so that characters split over several
    byte-level tokens appear whole on the token that completes them ('' on the others)."""
    out: list[str] = []
    prev = ""
    for k in range(len(ids)):
        text = tokenizer.decode(
            ids[: k + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        if text.endswith("\ufffd") and k < len(ids) - 1:
            out.append("")
            continue
        if text.startswith(prev):
            out.append(text[len(prev) :])
        else:  # the decoder rewrote earlier text; fall back to the token on its own
            out.append(
                tokenizer.decode(
                    [ids[k]], skip_special_tokens=False, clean_up_tokenization_spaces=False
                )
            )
        prev = text
    return out


def _site_of(direction: Direction, site: str | None) -> str:
    if site is not None:
        direction[site]  # raises a KeyError listing the direction's sites
        return site
    if direction.best_site is not None:
        return direction.best_site
    if len(direction.vectors) == 1:
        return next(iter(direction.vectors))
    raise ValueError(
        f"direction {direction.name!r} has no best_site and {len(direction.vectors)} sites; pass "
        f"site= one of {direction.sites}"
    )


def scan(
    lm: LoadedModel,
    text_or_conversation: str | Conversation,
    direction: Direction,
    site: str | None = None,
    *,
    center: float | str | None = None,
    scale: float | str | None = None,
    backend: str = "hf",
) -> ScanResult:
    """Project every token's activation at ``site`` (default: the direction's best site) onto the
    direction.

    Args:
        center: None (raw projections), ``"threshold"`` (the reader's fitted threshold from the
            direction's stats, so positive = concept present), ``"mean"`` (the mean over this input's
            tokens) or a number to subtract.
        scale: None, ``"std"`` (the standard deviation over this input's tokens) or a number to
            divide by (after centring).
    """
    direction.check_compatible(lm)
    site = _site_of(direction, site)
    vec = direction[site].detach().to("cpu", torch.float64).reshape(-1)
    inputs: list[str] | list[Conversation] = (
        [text_or_conversation] if isinstance(text_or_conversation, str) else [text_or_conversation]
    )
    enc = encode(lm.tokenizer, inputs)[0]
    acts = capture(
        lm, inputs, [site], positions="all", batch_size=1, backend=backend, progress=False
    )
    rows = acts.example(site, 0).detach().to("cpu", torch.float64).flatten(1)
    if rows.shape[0] != len(enc.ids):
        raise RuntimeError(
            f"capture returned {rows.shape[0]} rows for {len(enc.ids)} tokens at {site}"
        )
    if rows.shape[1] != vec.numel():
        raise ValueError(
            f"direction {direction.name!r} has {vec.numel()} values at {site}; the activations "
            f"have {rows.shape[1]}"
        )
    raw = rows @ vec
    if center is None:
        c = 0.0
    elif center == "mean":
        c = float(raw.mean())
    elif center == "threshold":
        st = direction.stats.get(site, {})
        if "threshold" not in st:
            raise ValueError(
                f"center='threshold' needs stats[{site!r}]['threshold'] in the direction (set by "
                "probes.sweep); this direction has none; use center='mean' or a number"
            )
        c = float(st["threshold"])
    elif isinstance(center, int | float) and not isinstance(center, bool):
        c = float(center)
    else:
        raise ValueError(f"center must be None, 'mean', 'threshold' or a number; got {center!r}")
    if scale is None:
        s = 1.0
    elif scale == "std":
        s = float(raw.std()) if raw.numel() > 1 else 1.0
    elif isinstance(scale, int | float) and not isinstance(scale, bool) and scale > 0:
        s = float(scale)
    else:
        raise ValueError(f"scale must be None, 'std' or a positive number; got {scale!r}")
    s = s if s > 0 else 1.0
    values = ((raw - c) / s).tolist()
    return ScanResult(
        tokens=token_strings(lm.tokenizer, enc.ids),
        values=[float(v) for v in values],
        raw=[float(v) for v in raw.tolist()],
        site=site,
        direction=direction.name,
        center=c,
        scale=s,
        assistant_start=enc.assistant_start,
    )


# ---- views -----------------------------------------------------------------------------------
_RED = (215, 25, 28)
_GREEN = (26, 150, 65)


def _colour(value: float, vmax: float) -> str:
    t = max(-1.0, min(1.0, value / vmax)) if vmax > 0 else 0.0
    end = _GREEN if t > 0 else _RED
    a = abs(t)
    r, g, b = (round(255 * (1 - a) + e * a) for e in end)
    return f"#{r:02x}{g:02x}{b:02x}"


def _text_colour(value: float, vmax: float) -> str:
    """Dark text on pale backgrounds, white on strong ones (readable either way)."""
    t = abs(value / vmax) if vmax > 0 else 0.0
    return "#fff" if t > 0.55 else "#111"


def colour_scale(values: Sequence[float], quantile: float = 0.95) -> float:
    """The |value| that gets the full colour: the ``quantile`` of the absolute values, leaving the
    first token out. Many models park a huge activation on the first token (the attention sink,
    |value| in the thousands on SmolLM2); scaled by it, every other token would look neutral.
    Larger values clip to the full colour."""
    rest = [abs(v) for v in (values[1:] if len(values) > 1 else values)]
    if not rest:
        return 0.0
    ranked = sorted(rest)
    top = ranked[min(len(ranked) - 1, max(0, math.ceil(quantile * len(ranked)) - 1))]
    return top if top > 0 else ranked[-1]


def scan_html(result: ScanResult, *, vmax: float | None = None) -> str:
    """The tokens as HTML spans on a red (negative) - white - green (positive) scale.

    Token text is escaped; whitespace is kept (``white-space: pre-wrap``). ``vmax`` sets the value
    that gets the full colour (default: :func:`colour_scale`, which leaves the first token out and
    clips the top 5%)."""
    top = vmax if vmax is not None else colour_scale(result.values)
    spans = []
    for i, (tok, v) in enumerate(result):
        if result.assistant_start is not None and i == result.assistant_start:
            spans.append('<span style="border-left:2px solid #555;margin-left:1px"></span>')
        spans.append(
            f'<span title="{html.escape(f"{tok!r}: {v:+.3f}", quote=True)}" '
            f'style="background:{_colour(v, top)};color:{_text_colour(v, top)}">'
            f"{html.escape(tok)}</span>"
        )
    chip = "color:#fff;font-weight:600;border-radius:3px;padding:0 4px"
    legend = (
        f'<div style="font-size:0.8em;color:#555;margin-bottom:4px">'
        f"{html.escape(result.direction)} at {html.escape(result.site)}: "
        f'<span style="background:{_colour(-1, 1)};{chip}">absent</span> '
        f'<span style="background:{_colour(1, 1)};{chip}">present</span> '
        f"(full colour at |value| &ge; {top:.3g}; the first token is left out of the scale)</div>"
    )
    return (
        '<div class="repe-scan" style="font-family:monospace;white-space:pre-wrap;'
        f'line-height:1.6">{legend}{"".join(spans)}</div>'
    )


def scan_figure(result: ScanResult, *, width: int = 16) -> Any:
    """A plotly heatmap of the scan: tokens laid out in rows of ``width``, coloured by value
    (red-yellow-green, centred on 0), each cell labelled with its token."""
    require("plotly", "plots")
    go = require("plotly.graph_objects", "plots")
    if width < 1:
        raise ValueError(f"width must be >= 1; got {width!r}")
    n = len(result)
    n_rows = max(1, -(-n // width))
    z: list[list[float | None]] = [[None] * width for _ in range(n_rows)]
    text: list[list[str]] = [[""] * width for _ in range(n_rows)]
    hover: list[list[str]] = [[""] * width for _ in range(n_rows)]
    for i, (tok, v) in enumerate(result):
        r, c = divmod(i, width)
        z[r][c] = v
        shown = tok.replace("\n", "\\n")
        text[r][c] = html.escape(shown)
        hover[r][c] = f"#{i} {html.escape(repr(tok))}: {v:+.3f}"
    top = max((abs(v) for v in result.values), default=1.0) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=z,
            text=text,
            texttemplate="%{text}",
            hovertext=hover,
            hoverinfo="text",
            colorscale="RdYlGn",
            zmid=0.0,
            zmin=-top,
            zmax=top,
            xgap=1,
            ygap=1,
            colorbar={"title": "projection"},
        )
    )
    fig.update_layout(
        title=f"{result.direction} at {result.site}",
        yaxis={"autorange": "reversed", "showticklabels": False},
        xaxis={"showticklabels": False},
        template="plotly_white",
        height=max(200, 40 * n_rows + 120),
    )
    return fig
