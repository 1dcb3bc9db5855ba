"""``report.html``: one self-contained page per run (plotly's script inlined once, figures, tables,
per-step summaries, the warnings the library gave, and the provenance of the run)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from repe.atomic import write_text

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{margin-bottom:0.2em} h2{border-bottom:1px solid #ddd;padding-bottom:0.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:0.6em 0;font-size:0.9em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4} .muted{color:#666;font-size:0.9em}
.warn{background:#fff4e0;border-left:4px solid #e69500;padding:6px 10px;margin:4px 0}
.status-complete{color:#1a7f37} .status-interrupted,.status-failed,.status-running{color:#b3261e}
code{background:#f4f4f4;padding:0 3px}
"""


def _md_table(md: str) -> str:
    """A markdown pipe table (as the steps write them) as HTML."""
    lines = [ln.strip() for ln in md.strip().splitlines() if ln.strip().startswith("|")]
    if len(lines) < 2:
        return f"<pre>{html.escape(md)}</pre>"
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    head, body = cells[0], [r for r in cells[2:]]
    out = [
        "<table><thead><tr>",
        *(f"<th>{html.escape(h)}</th>" for h in head),
        "</tr></thead><tbody>",
    ]
    for r in body:
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _kv(rows: list[tuple[str, Any]]) -> str:
    return (
        "<table>"
        + "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
        )
        + "</table>"
    )


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def render(run_dir: Path, plotlyjs: str = "inline") -> str:
    """The report's HTML. ``plotlyjs``: ``"inline"`` (self-contained) or a file name to load it from."""
    import plotly.io as pio

    rec = json.loads((run_dir / "record.json").read_text(encoding="utf-8"))
    steps_dir = run_dir / "steps"
    infos: dict[str, dict[str, Any]] = {}
    for sid in rec["steps"]:
        p = steps_dir / f"{sid}.json"
        if p.exists():
            infos[sid] = json.loads(p.read_text(encoding="utf-8"))
    code = rec.get("code", {})
    status = rec.get("status", "?")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(rec['study'])}: study report</title><style>{_CSS}</style>",
    ]
    if plotlyjs == "inline":
        parts.append(f"<script type='text/javascript'>{_plotly_js()}</script>")
    else:
        parts.append(f"<script src='{html.escape(plotlyjs)}'></script>")
    parts.append("</head><body>")
    parts.append(f"<h1>{html.escape(rec['study'])}</h1>")
    if rec.get("description"):
        parts.append(f"<p>{html.escape(rec['description'])}</p>")
    parts.append(
        f"<p>Status: <b class='status-{html.escape(status)}'>{html.escape(status)}</b>"
        + (f" ({html.escape(str(rec.get('error')))})" if rec.get("error") else "")
        + "</p>"
    )
    sampling = rec.get("config", {}).get("study", {}).get("sampling")
    if sampling:
        parts.append(f"<p class='warn'><b>Sampling:</b> {html.escape(sampling)}</p>")
    ident = (rec.get("model") or {}).get("identity") or {}
    parts.append(
        _kv(
            [
                ("run", rec.get("run_id")),
                ("started / finished (UTC)", f"{rec.get('started')} / {rec.get('finished')}"),
                ("total time", f"{rec.get('timings', {}).get('total_seconds', '?')} s"),
                (
                    "model",
                    f"{rec['model'].get('spec')} ({ident.get('name', '?')}, {ident.get('n_layers', '?')} blocks, d_model {ident.get('d_model', '?')}, {rec['model'].get('dtype')})",
                ),
                ("seed", rec.get("seeds", {}).get("study")),
                (
                    "code",
                    f"{code.get('commit') or 'unknown'}"
                    + (" (uncommitted changes)" if code.get("dirty") else ""),
                ),
                (
                    "packages",
                    ", ".join(f"{k} {v}" for k, v in rec.get("packages", {}).items() if v),
                ),
                (
                    "rerun",
                    f"repe study rerun {rec.get('run_id')}"
                    if status == "complete"
                    else "run the study again to resume",
                ),
            ]
        )
    )
    warnings = rec.get("warnings") or []
    parts.append("<h2>Warnings</h2>")
    if warnings:
        parts += [f"<div class='warn'>{html.escape(w)}</div>" for w in warnings]
    else:
        parts.append("<p class='muted'>The library gave no warnings.</p>")
    parts.append("<h2>Steps</h2>")
    parts.append(
        _md_table(
            "| step | kind | status | time (s) | samples | key |\n|---|---|---|---|---|---|\n"
            + "\n".join(
                f"| {sid} | {s['kind']} | {s['status']} | {s.get('compute_seconds', '')} | {s.get('n_samples', '')} | {s['key']} |"
                for sid, s in rec["steps"].items()
            )
        )
    )
    for sid, info in infos.items():
        parts.append(
            f"<h2 id='step-{html.escape(sid)}'>{html.escape(sid)} <span class='muted'>({html.escape(info['kind'])})</span></h2>"
        )
        if info.get("summary"):
            parts.append(f"<p>{html.escape(info['summary'])}</p>")
        for title, md in info.get("tables", []):
            parts.append(f"<h3>{html.escape(title)}</h3>{_md_table(md)}")
        for name in info.get("figures", {}):
            fig_path = run_dir / "figures" / f"{sid}.{name}.json"
            if fig_path.exists():
                fig = pio.from_json(fig_path.read_text(encoding="utf-8"))
                parts.append(
                    fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{sid}-{name}")
                )
        for title, fragment in info.get("html", []):
            parts.append(f"<h3>{html.escape(title)}</h3>{fragment}")
        if info.get("n_samples"):
            parts.append(
                f"<p class='muted'>{info['n_samples']} per-sample rows in <code>samples/{html.escape(sid)}.jsonl</code></p>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path, plotlyjs: str = "inline") -> Path:
    run_dir = Path(run_dir)
    return write_text(run_dir / "report.html", render(run_dir, plotlyjs))


def publish(run_dir: str | Path, dest: str | Path) -> Path:
    """A run's report for committing beside others: ``dest/report.html`` loads plotly from
    ``../plotly.min.js`` (written once for all of them) instead of inlining 4.6 MB in each, next to the
    record, the metrics and the resolved study file."""
    import shutil

    run_dir, dest = Path(run_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    js = dest.parent / "plotly.min.js"
    if not js.exists():
        write_text(js, _plotly_js())
    write_text(dest / "report.html", render(run_dir, plotlyjs="../plotly.min.js"))
    for name in ("record.json", "metrics.json", "study.toml"):
        shutil.copyfile(run_dir / name, dest / name)
    return dest / "report.html"


if __name__ == "__main__":  # python -m studies.report RUN_DIR DEST
    import sys

    print(publish(sys.argv[1], sys.argv[2]))
