"""``--html FILE``: one self-contained page of a run (or of ``harness diverge``), readable offline.

The page is plain HTML with inline CSS and inline SVG figures drawn by matplotlib's SVG
backend: no script, no font, no URL to fetch, so it opens the same from a laptop's disk,
a CI artifact or an air-gapped machine years later. matplotlib is imported only here and
only when a page is built (``--html``): the other commands do not pay its start-up.

Building the page (:func:`run_page`, :func:`diverge_page`) is a pure function of plain
data: the records, their :class:`~harness.judge.Comparison` and the parsed traces. Every
string read from a record (cell names, reasons, warnings, labels) is HTML-escaped, and
escaped for matplotlib's text parser before it becomes a figure label. The effects are
at the end: reading the traces beside the records (never through a link) and writing
the file (atomically; never through a link, never over a directory).
"""

from __future__ import annotations

import html
import io
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from . import __version__
from .errors import InputError
from .judge import Comparison, Verdict, flat_val
from .record import ResultRecord

MAX_POINTS = 2000  # per curve: a longer trace is drawn every Nth step (the page stays small)
MAX_TARGETS = 8  # per metric family in the deltas figure; the rest are named, not drawn
MAX_LABEL = 48  # characters of a cell name in a figure (tables show it whole)
NAME_CH = 22  # characters a line a table's cell-name column is given before the others (it wraps beyond)
NO_TRACES = "no traces: pass --trace to draw the loss of every training step"
NO_BAND = "no seed band measured: no interval to read the points against (measure one: --band-seeds 8)"
FAMILIES = ("val_loss", "r2", "mse", "mae")
FAMILY_TITLE = {"val_loss": "val loss", "r2": "R²", "mse": "MSE", "mae": "MAE"}
VERDICT_CLASS = {Verdict.REPRODUCED: "ok", Verdict.DRIFTED: "drift", Verdict.FAILED: "bad",
                 Verdict.NOT_COMPARABLE: "bad", Verdict.INCOMPLETE: "incomplete", Verdict.SKIPPED: "dim",
                 Verdict.UNRECORDED: "unrec", Verdict.UNJUDGED: "unrec"}
# The Results table's order: what a reader looks for first, then the numbers behind it; the columns
# rarely needed to judge a cell sit behind its name (a disclosure), so the table fits a 1280 px window.
RESULT_LEAD = ("verdict", "cell", "evidence")
RESULT_MORE = ("mse", "mae", "weights", "d_archived", "wall")
# Columns of names, tags, digests and paths: they may break anywhere (prose breaks between words only).
IDENTIFIERS = frozenset({"cell", "where", "weights", "member", "change", "metric", "values", "parts_at", "value"})
RUNG_CLASS = {"bitwise": "ok", "numerically equal": "ok", "same distribution": "ok", "drifted": "drift",
              "drifted (--tol)": "drift", "differs": "unrec"}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:1.5em auto;
max-width:1600px;padding:0 1em;color:#1d2330;background:#fff;line-height:1.4;overflow-wrap:break-word}
h1{font-size:1.45em;margin:.2em 0}h2{font-size:1.15em;margin:1.6em 0 .4em;border-bottom:1px solid #d8dce4;
padding-bottom:.2em}
.meta{color:#4a5468;font-size:.92em}
.wide{max-width:100%;overflow-x:auto;margin:.4em 0 .8em}
table{border-collapse:collapse;font-size:.82em}
th,td{padding:.22em .55em;border-bottom:1px solid #e6e9ef;text-align:right;white-space:nowrap;vertical-align:top}
th{background:#f3f5f9;font-weight:600;white-space:normal}td.l,th.l{text-align:left}
td.l{white-space:normal}td.id{overflow-wrap:anywhere}
td:first-child{position:sticky;left:0;background:#fff}th:first-child{position:sticky;left:0}
.verdict{font-weight:700;padding:.05em .45em;border-radius:.3em;white-space:nowrap}
details.more summary{cursor:pointer}
details.more dl{margin:.15em 0 .1em;width:0;min-width:100%;color:#4a5468}
details.more dl>div{display:inline-block;margin-right:.9em}
details.more dt{display:inline;font-weight:600}details.more dd{display:inline;margin:0 0 0 .3em}
@media (max-width:760px){.wide table,.wide tbody,.wide tr,.wide td{display:block}.wide thead{display:none}
.wide tr{border-bottom:2px solid #d8dce4;padding:.25em 0}
.wide td{position:static;border:0;text-align:left;white-space:normal;overflow-wrap:anywhere}
.wide td::before{content:attr(data-label);display:inline-block;min-width:9em;font-weight:600;color:#4a5468}}
.ok{color:#0d6b2f;background:#dcf5e3}.drift{color:#7a5200;background:#fff0c7}.bad{color:#9b1020;background:#fde0e3}
.incomplete{color:#6b1a78;background:#f4e1f7}.dim{color:#5c6370;background:#eceef2}.unrec{color:#0b5f73;background:#d9f1f7}
.none{color:#5c6370;font-style:italic}
ul.notes{font-size:.9em;color:#3a4254}
figure{margin:.5em 0}figcaption{font-size:.85em;color:#4a5468;margin-top:.2em}
svg{max-width:100%;height:auto}
pre{background:#f6f8fa;padding:.7em;overflow-x:auto;font-size:.85em}
footer{margin-top:2em;font-size:.8em;color:#6b7385}
"""


# --------------------------------------------------------------------------- escaping


def esc(value: Any) -> str:
    """HTML-escape anything shown on the page (quotes too: text may end up in an attribute)."""
    return html.escape(str(value), quote=True)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def plot_label(text: Any) -> str:
    """A string made safe for a matplotlib label: no mathtext (``$``), no control characters, not
    hidden from the legend (a leading ``_``), and not longer than :data:`MAX_LABEL`."""
    s = _CONTROL.sub("?", str(text))
    if len(s) > MAX_LABEL:
        s = s[: MAX_LABEL - 1] + "…"
    s = s.replace("\\", "\\\\").replace("$", r"\$")
    return "\u200b" + s if s.startswith("_") else s


# --------------------------------------------------------------------------- figures (matplotlib, SVG)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasSVG(fig)
    return fig


_SVG_START = re.compile(r"<svg\b")
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.S)


def svg_of(fig: Any) -> str:
    """The figure as one inline ``<svg>`` element: no XML prolog, DOCTYPE or RDF metadata (they
    name external URLs), text kept as text (small, selectable), ids stable from run to run."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "harness", "svg.image_inline": True}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    m = _SVG_START.search(text)
    text = text[m.start():] if m else text
    return _PATH_DATA.sub(_round_path, _METADATA.sub("", text))


_PATH_DATA = re.compile(r'(\sd=")([^"]*)(")')
_LONG_DECIMAL = re.compile(r"(\d\.\d\d)\d+")


def _round_path(m: re.Match) -> str:
    """Path coordinates to 1/100 pt (invisible at any zoom a report is read at): the page shrinks by a third."""
    return m.group(1) + _LONG_DECIMAL.sub(r"\1", m.group(2)) + m.group(3)


def _style(i: int) -> dict[str, Any]:
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
              "#bcbd22", "#17becf"]
    dashes = ["-", "--", "-.", ":"]
    return {"color": colors[i % len(colors)], "linestyle": dashes[(i // len(colors)) % len(dashes)]}


def _losses(trace: Any) -> tuple[list[int], list[float]]:
    steps = [s.step for s in trace.steps]
    losses = [float.fromhex(s.loss) for s in trace.steps]
    stride = max(1, math.ceil(len(steps) / MAX_POINTS))
    if stride > 1:
        steps, losses = steps[::stride], losses[::stride]
    return steps, losses


def _parts_step(base: Any, trace: Any) -> int | None:
    from .diverge import diverge

    p = diverge(base, trace, {}, {}).parts_at
    return None if p is None else int(p["step"])


def curves_svg(traces: Sequence[tuple[str, Any]]) -> str:
    """Every traced cell's loss per step, overlaid (top), and |loss - the first cell's| per step (bottom,
    log scale: a cell identical to the first draws nothing there). A dashed vertical line in the cell's
    colour marks the step where it parts from the first cell. Many cells, or long names, put the legend
    in a row of its own below the plots, as wide as the figure: inside the plot it would cover the curves
    and, wider than the figure, be cut off."""
    firsts: dict[tuple[str, ...], str] = {}
    same_of = [firsts.setdefault(tuple(s.loss for s in t.steps), n) for n, t in traces]
    longest = max(len(plot_label(n)) + 24 + (len(plot_label(s)) + 11 if s != n else 0)
                  for (n, _), s in zip(traces, same_of))  # a label's length, at most (its tag: 24)
    below = len(traces) > 6 or longest > 60
    ncols = max(1, min(3, 170 // (longest + 8)))
    key_h = 0.25 + 0.165 * math.ceil(len(traces) / ncols) if below else 0.0
    fig = _figure(11, 6.2 + key_h)
    if below:
        top, bottom, key = fig.subplots(3, 1, height_ratios=[3.72, 2.48, key_h])
        top.sharex(bottom)
        top.tick_params(labelbottom=False)
        key.axis("off")
    else:
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    base_name, base = traces[0]
    base_steps, base_loss = _losses(base)
    base_at = dict(zip(base_steps, base_loss))
    marked: dict[int, int] = {}
    drawn: dict[tuple[str, ...], str] = {}  # a curve bitwise equal to one drawn already is named, not drawn again
    for i, (name, trace) in enumerate(traces):
        st = _style(i)
        steps, loss = _losses(trace)
        at = None if i == 0 else _parts_step(base, trace)
        tag = " (first)" if i == 0 else (" (never parts)" if at is None else f" (parts at step {at})")
        same = drawn.setdefault(tuple(s.loss for s in trace.steps), name)
        if same != name:
            top.plot([], [], lw=1.1, label=f"{plot_label(name)}{tag}: loss = {plot_label(same)}'s", **st)
        else:
            top.plot(steps, loss, lw=1.1, alpha=0.9, label=plot_label(name) + tag, **st)
        if i and same == name:
            pairs = [(s, abs(v - base_at[s])) for s, v in zip(steps, loss) if s in base_at and v != base_at[s]]
            if pairs:
                bottom.plot([p[0] for p in pairs], [p[1] for p in pairs], lw=1.0, alpha=0.9, **st)
        if at is not None:
            for ax in (top, bottom):
                ax.axvline(at, color=st["color"], lw=1.0, ls=(0, (4, 3)), alpha=0.8)
            marked[at] = marked.get(at, 0) + 1
    for at, n in sorted(marked.items())[:6]:
        top.annotate(f"parts: step {at}" + (f" ({n} cells)" if n > 1 else ""), xy=(at, 1.0),
                     xycoords=("data", "axes fraction"), xytext=(3, -12), textcoords="offset points",
                     fontsize=8, color="#333")
    if all(v > 0 for _, tr in traces for v in _losses(tr)[1]):
        top.set_yscale("log")
    top.set_ylabel("training loss (per step)")
    top.set_title(f"Loss per optimizer step; dashed line: where a cell parts from {plot_label(base_name)}",
                  fontsize=10, loc="left")
    if below:
        key.legend(*top.get_legend_handles_labels(), fontsize=7.5, ncols=ncols, loc="upper left", frameon=False,
                   borderaxespad=0)
    else:
        top.legend(fontsize=7.5, loc="upper right", framealpha=0.85)
    top.grid(alpha=0.3)
    if bottom.lines:
        bottom.set_yscale("log")
    else:
        bottom.text(0.5, 0.5, "every cell's loss equals the first cell's at every step", ha="center", va="center",
                    transform=bottom.transAxes, fontsize=9, color="#555")
    bottom.set_ylabel("|loss − first cell|")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    return svg_of(fig)


def history_svg(histories: Sequence[tuple[str, list[Mapping[str, Any]]]]) -> str:
    """Per-epoch train and validation loss from the records (cells without a trace)."""
    fig = _figure(11, 4)
    ax = fig.subplots()
    for i, (name, hist) in enumerate(histories):
        st = _style(i)
        for key, ls, what in (("train_loss", "-", "train"), ("val_loss", ":", "val")):
            pts = [(h.get("epoch"), h.get(key)) for h in hist]
            pts = [(e, v) for e, v in pts if isinstance(e, (int, float)) and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=st["color"], ls=ls, marker=".",
                        lw=1.1, label=f"{plot_label(name)} {what}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Loss per epoch (from the records; solid: train, dotted: validation)", fontsize=10, loc="left")
    ax.legend(fontsize=7.5, ncols=2 if len(histories) > 4 else 1)
    ax.grid(alpha=0.3)
    return svg_of(fig)


@dataclass
class DeltaSeries:
    """One metric key's Δ per cell against the reference, and where "same distribution" lies as a Δ:
    the seed band's 1 − α prediction interval minus the reference's value (None: no seed band)."""

    key: str
    deltas: list[float | None]
    interval: tuple[float, float] | None


def delta_series(cells: Sequence[ResultRecord], reference: Mapping[str, float],
                 interval: Any = None) -> list[DeltaSeries]:
    """Per metric key (aggregates ``r2/*`` only where there are no per-target keys): value - reference;
    ``interval(key)``: the prediction interval of the seed band for ``key`` (None: none)."""
    flats = [flat_val(r) for r in cells]
    keys = list(dict.fromkeys(k for f in flats for k in f if k in reference))
    per_target = {k.split("/", 1)[0] for k in keys if "/" in k and not k.endswith("/*")}
    keys = [k for k in keys if not (k.endswith("/*") and k.split("/", 1)[0] in per_target)]
    out = []
    for key in keys:
        ds = [f[key] - reference[key] if key in f and math.isfinite(f[key]) and math.isfinite(reference[key])
              else None for f in flats]
        iv = interval(key) if interval else None
        out.append(DeltaSeries(key, ds, (iv[0] - reference[key], iv[1] - reference[key]) if iv else None))
    return out


def deltas_svg(names: Sequence[str], series: Sequence[DeltaSeries], reference: str) -> tuple[str, list[str]]:
    """One panel per metric family: each cell's Δ (points, one marker per target), and per target the seed
    band's prediction interval as a shade: a point inside its target's shade is the same distribution.
    Returns the SVG and notes (targets left out)."""
    fams = [f for f in FAMILIES if any(s.key.split("/", 1)[0] == f for s in series)]
    notes: list[str] = []
    fig = _figure(max(8.0, min(11.0, 2.0 + 0.55 * len(names) * max(1, len(fams)))),
                  3.6 + 0.07 * min(MAX_LABEL, max(len(n) for n in names)))
    axes = fig.subplots(1, len(fams), squeeze=False)[0]
    markers = "osD^v<>P"
    x0 = list(range(len(names)))
    for ax, fam in zip(axes, fams):
        group = [s for s in series if s.key.split("/", 1)[0] == fam]
        if len(group) > MAX_TARGETS:
            notes.append(f"{FAMILY_TITLE[fam]}: {len(group) - MAX_TARGETS} more target(s) not drawn: "
                         + ", ".join(s.key for s in group[MAX_TARGETS:]))
            group = group[:MAX_TARGETS]
        off = 0.5 / max(len(group), 1)
        for j, s in enumerate(group):
            xs = [x + (j - (len(group) - 1) / 2) * off for x, d in zip(x0, s.deltas) if d is not None]
            ys = [d for d in s.deltas if d is not None]
            label = s.key.split("/", 1)[1] if "/" in s.key else s.key
            if s.interval is not None:
                ax.axhspan(s.interval[0], s.interval[1], color=_style(j)["color"], alpha=0.08, lw=0)
            ax.plot(xs, ys, markers[j % len(markers)], ms=5, color=_style(j)["color"], label=plot_label(label))
        ax.axhline(0, color="#444", lw=0.8)
        ax.set_xticks(x0, [plot_label(n) for n in names], rotation=60, ha="right", fontsize=7.5)
        ax.set_title(f"Δ {FAMILY_TITLE[fam]}", fontsize=10)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useMathText=False)
        ax.grid(alpha=0.3, axis="y")
        ax.set_xlim(-0.6, len(names) - 0.4)
        if len(group) > 1:
            ax.legend(fontsize=7, title="target", title_fontsize=7, framealpha=0.8)
    fig.suptitle(f"Δ vs {plot_label(reference)} (validation); shade: the seed band's prediction interval",
                 fontsize=10)
    return svg_of(fig), notes


def attribution_svg(attr: Any) -> str | None:
    """Per varying axis, the largest |Δ| it moved each metric family by (one panel per family)."""
    same = [attr.same_environment] if attr.same_environment is not None else []
    effects = [e for e in [*attr.varying, *same] if e.pairs]
    fams = [f for f in FAMILIES if any(e.family_max(f) is not None for e in effects)]
    if not effects or not fams:
        return None
    fig = _figure(11, 1.2 + 0.45 * len(effects))
    axes = fig.subplots(1, len(fams), squeeze=False, sharey=True)[0]
    ys = list(range(len(effects)))
    for ax, fam in zip(axes, fams):
        vals = [e.family_max(fam) or 0.0 for e in effects]
        ax.barh(ys, vals, color=[_style(i)["color"] for i in ys], alpha=0.85)
        for y, e, v in zip(ys, effects, vals):
            r = e.family_ratio(fam)
            ax.annotate(("0" if v == 0 else f"{v:.2g}") + (f" ({r:.2g} sd)" if r is not None else ""), xy=(v, y),
                        xytext=(3, 0), textcoords="offset points", va="center", fontsize=7.5)
        ax.set_title(f"max |Δ| {FAMILY_TITLE[fam]}", fontsize=9.5)
        if max(vals) > 0:
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3), useMathText=False)
            ax.set_xlim(0, max(vals) * 1.45)
        else:  # every pair bitwise identical: nothing moved
            ax.set_xlim(0, 1)
            ax.set_xticks([0])
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(ys, [plot_label(e.axis) for e in effects], fontsize=8.5)
    axes[0].invert_yaxis()
    return svg_of(fig)


# --------------------------------------------------------------------------- HTML pieces


def table(columns: Sequence[tuple[str, str]], rows: Iterable[Mapping[str, Any]], *, left: Iterable[str] = ("cell",),
          verdict_key: str | None = None, more: Sequence[tuple[str, str]] = (), more_in: str | None = None) -> str:
    """An HTML table of display strings; every cell escaped; the verdict column coloured.

    It fits the page's width: left-aligned (text) cells wrap, anywhere if they must (cell names,
    image tags, digests); ``more``: columns shown not as columns but in a disclosure (``<details>``)
    in each row's ``more_in`` cell. Every cell carries its header (``data-label``) for the stacked
    layout of a narrow window, and the table sits in a ``.wide`` box that scrolls, its first column
    staying in view, rather than widen the page where even wrapping is not enough."""
    left, rows = set(left), list(rows)
    head = "".join(f'<th class="{"l" if k in left else ""}"{_name_width(k, rows)}>{esc(h)}</th>' for k, h in columns)
    body = []
    for r in rows:
        tds = []
        for k, h in columns:
            v = r.get(k, "—")
            cls = ("l id" if k in IDENTIFIERS else "l") if k in left else ""
            if k == verdict_key:
                try:
                    vc = RUNG_CLASS.get(v) or VERDICT_CLASS.get(Verdict(v), "")
                except ValueError:
                    vc = ""
                inner = f'<span class="verdict {vc}">{esc(v)}</span>'
            elif k == more_in and more:
                extra = "".join(f"<div><dt>{esc(mh)}</dt><dd>{esc(r.get(mk, '—'))}</dd></div>" for mk, mh in more)
                inner = f'<details class="more"><summary>{esc(v)}</summary><dl>{extra}</dl></details>'
            else:
                inner = esc(v)
            tds.append(f'<td class="{cls}" data-label="{esc(h)}">{inner}</td>')
        body.append("<tr>" + "".join(tds) + "</tr>")
    return ('<div class="wide"><table><thead><tr>' + head + "</tr></thead><tbody>" + "".join(body)
            + "</tbody></table></div>")


def _name_width(key: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """A name column is given room for up to :data:`NAME_CH` characters a line before the other columns: a long
    cell name (``cu130-torch2.14-cuda-strict-tdef-baseline``) reads in two lines, not in four."""
    if key not in ("cell", "member") or not rows:
        return ""
    longest = max(len(str(r.get(key, ""))) for r in rows)
    return f' style="min-width:{min(longest, NAME_CH) + 2}ch"'  # + the disclosure's marker


def none(text: str) -> str:
    return f'<p class="none">{esc(text)}</p>'


def notes_list(lines: Iterable[str]) -> str:
    items = [f"<li>{esc(x)}</li>" for x in lines]
    return f'<ul class="notes">{"".join(items)}</ul>' if items else ""


def figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{esc(caption)}</figcaption></figure>"


def document(title: str, body: Sequence[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body)
            + f"\n<footer>written by harness {esc(__version__)}; self-contained: no script, no external resource"
              "</footer>\n</body></html>\n")


# --------------------------------------------------------------------------- the run page


@dataclass
class RunPage:
    """What a run's page shows: plain data, gathered by the caller."""

    command: str  # "matrix", "run", "compare", "band"
    records: list[ResultRecord]
    comparison: Comparison
    bundle: str | None = None
    trial_environment: Mapping[str, Any] | None = None
    traces: Mapping[str, Any] = field(default_factory=dict)  # cell -> Trace | refusal reason | None
    parts_at: Mapping[str, str] = field(default_factory=dict)
    causes: Mapping[str, str] = field(default_factory=dict)  # cell -> why it parts from the first (harness.causes)


def run_page(p: RunPage) -> str:
    """The whole page of ``harness run/matrix/compare/band``."""
    from . import report as rp

    records, comparison = p.records, p.comparison
    run_ids = list(dict.fromkeys(r.run_id for r in records if r.run_id))
    overall = comparison.overall
    title = f"harness {p.command}" + (f": {p.bundle}" if p.bundle else "")
    vc = VERDICT_CLASS.get(overall, "")
    counts = ", ".join(f"{k} {v.value}" for v, k in sorted(comparison.counts().items(), key=lambda kv: kv[0].value))
    body = [f"<h1>{esc(title)}</h1>",
            f'<p>Overall: <span class="verdict {vc}">{esc(overall.value)}</span> — {esc(comparison.reason)}</p>',
            f'<p class="meta">run {esc(", ".join(run_ids) or "—")}'
            + (f"; {esc(counts)}" if counts else "") + "</p>"]

    data = rp.rows(records, comparison)
    members_only = not rp.table_records(records) and not comparison.missing
    trial = rp.trial_env_row(p.trial_environment)
    env_rows = ([trial] if trial else []) + (rp.rows_of_members(records) if members_only else data)
    body.append("<h2>Environment (measured inside each run)</h2>")
    body.append(table(rp.ENV_COLUMNS, env_rows, left=("cell", "where", "device", "determinism", "isa"))
                if env_rows else none("no cell ran"))

    body.append(f"<h2>{esc('Band members (one retrain each)' if members_only else rp.RESULTS_TITLE)}</h2>")
    if members_only:
        mem = [dict(zip(rp.MEMBER_COLUMNS, r)) for r in rp.member_rows(records)]
        body.append(table([(h, h) for h in rp.MEMBER_COLUMNS], mem, left=("member", "kind", "change", "weights"))
                    if mem else none("no band member ran"))
    elif data:
        cols = rp.result_columns(comparison)
        if p.parts_at:
            data = [{**r, "parts_at": p.parts_at.get(r["cell"], "—")} for r in data]
            cols[-1:-1] = [("parts_at", "parts at")]
        if p.causes:
            data = [{**r, "cause": p.causes.get(r["cell"], "—")} for r in data]
            cols[-1:-1] = [("cause", "cause")]
        lead = [c for k in RESULT_LEAD for c in cols if c[0] == k]
        more = [c for c in cols if c[0] in RESULT_MORE]
        cols = lead + [c for c in cols if c not in lead and c not in more]
        body.append(table(cols, data, left=("cell", "weights", "evidence", "parts_at", "cause", "verdict"),
                          verdict_key="verdict", more=more, more_in="cell"))
        if more:
            body.append(f'<p class="meta">▸ beside a cell\'s name opens its {esc(", ".join(h for _, h in more))}</p>')
    else:
        body.append(none("no cell ran"))
    notes = rp.legend_lines(comparison) + rp.beyond_lines(comparison)  # what each rung means; who drifted, and why
    notes += [t.plain.removeprefix("- ") for t in rp.notes(data, records, comparison)[:-1]]
    body.append(notes_list(notes))

    body += _curves_section(records, members_only, p.traces)
    body += _deltas_section(records, comparison, members_only)
    body += _attribution_section(records, comparison)
    return document(title, body)


def _curve_cells(records: list[ResultRecord], members_only: bool) -> list[ResultRecord]:
    from .report import band_members, table_records

    return band_members(records) if members_only else [r for r in table_records(records) if not r.band]


def _curves_section(records: list[ResultRecord], members_only: bool, traces: Mapping[str, Any]) -> list[str]:
    from .diverge import Trace

    out = ["<h2>Loss curves</h2>"]
    cells = [r for r in _curve_cells(records, members_only) if r.ok]
    traced = [(r.cell, traces[r.cell]) for r in cells if isinstance(traces.get(r.cell), Trace)
              and traces[r.cell].steps]
    lines = []
    for r in cells:
        t = traces.get(r.cell)
        if isinstance(t, str):
            lines.append(f"{r.cell}: trace refused ({t})")
        elif not isinstance(t, Trace) and traced:
            why = r.trace.why if r.trace else None
            lines.append(f"{r.cell}: no trace" + (f" ({why})" if why else ""))
    if traced:
        n = max(len(t.steps) for _, t in traced)
        every = math.ceil(n / MAX_POINTS)
        out.append(figure(curves_svg(traced),
                          f"{len(traced)} traced cell(s), {n} steps"
                          + (f" (one step in {every} drawn)" if every > 1 else "")
                          + "; the first cell is the reference of the lower panel and of the dashed lines."))
    else:
        hist = [(r.cell, r.history) for r in cells if r.history]
        out.append(none(NO_TRACES if cells else "no cell ran: no loss to draw"))
        if hist:
            out.append(figure(history_svg(hist), "per-epoch losses as each record holds them"))
    out.append(notes_list(lines))
    return out


def _deltas_section(records: list[ResultRecord], comparison: Comparison, members_only: bool) -> list[str]:
    from . import stats
    from .judge import judged_values
    from .report import band_rows, band_title, BAND_COLUMNS, SEED_COLUMNS

    band = comparison.band
    out = ["<h2>Δ per metric against the reference, and the seed band</h2>"]
    cells = [r for r in _curve_cells(records, members_only) if r.ok]
    interval = None
    if band is not None and band.n_seed >= 2:
        def interval(key: str) -> tuple[float, float] | None:
            s = band.seed.get(key)
            if s is None or not s.sd:
                return None
            t = stats.prediction_test(s.mean, stats.Summary(s.n, s.mean, s.sd), comparison.alpha)
            return None if t is None else (s.mean - t.half_width, s.mean + t.half_width)
    recorded = next((judged_values(r)[0] for r in cells if r.recorded), None)
    if members_only and band is not None:
        reference, ref_name = {k: s.mean for k, s in (band.ulp or band.seed).items()}, "the band's mean"
    elif recorded:
        reference, ref_name = recorded, "the recorded trial"
    else:
        first = next((r for r in cells if r.cell == comparison.first_cell), cells[0] if cells else None)
        reference, ref_name = (flat_val(first) if first else {}), (first.cell if first else "")
    if not cells or not reference or (len(cells) < 2 and not recorded):
        out.append(none("fewer than two cells ran: no Δ to draw"))
    else:
        series = delta_series(cells, reference, interval)
        if series:
            svg, notes = deltas_svg([r.cell for r in cells], series, ref_name)
            out.append(figure(svg, "each point is a cell's value minus the reference's; each target's shade is the "
                                   f"seed band's {1 - comparison.alpha:.0%} prediction interval, as a Δ: a point "
                                   "inside its shade is the same distribution"))
            out.append(notes_list(notes))
        else:
            out.append(none("no metric the cells share with the reference"))
    if band is None or band.n_seed < 2:
        out.append(none(NO_BAND))
    if band is not None and (band.ulp or band.seed):
        heads = list(BAND_COLUMNS + (SEED_COLUMNS if band.n_seed else ()))
        out.append(f"<p>{esc(band_title(band))}</p>")
        out.append(table([(h, h) for h in heads], [dict(zip(heads, r)) for r in band_rows(band)], left=("metric",)))
        out.append(notes_list(band.notes))
    return out


def _attribution_section(records: list[ResultRecord], comparison: Comparison) -> list[str]:
    from .report import ATTRIBUTION_COLUMNS, ATTRIBUTION_TITLE, attribution_notes, attribution_of, attribution_rows

    out = ["<h2>Attribution: which axis moved the metrics</h2>"]
    attr = attribution_of(records, comparison=comparison)
    if attr is None:
        out.append(none("no attribution: fewer than two cells ran"))
        return out
    rows = attribution_rows(attr)
    out.append(f"<p>{esc(ATTRIBUTION_TITLE)}</p>")
    if rows:
        out.append(table(ATTRIBUTION_COLUMNS, rows, left=("axis", "values", "weights", "status")))
        svg = attribution_svg(attr)
        if svg:
            out.append(figure(svg, "per axis, the largest |Δ| between two cells that differ only in that axis"
                                   + (" (N sd: in seed standard deviations)" if attr.with_width else "")))
    else:
        out.append(none("no axis varies between these cells"))
    out.append(notes_list(attribution_notes(attr)))
    return out


# --------------------------------------------------------------------------- the diverge page


def diverge_page(result: Any, trace_a: Any, trace_b: Any) -> str:
    """``harness diverge A B``: both loss curves with the parting step, the first differing tensor, the metrics."""
    from .diverge import Parting, render

    title = f"harness diverge: {result.a} vs {result.b}"
    cls = "ok" if result.parting is Parting.NEVER else "drift"
    body = [f"<h1>{esc(title)}</h1>",
            f'<p>Result: <span class="verdict {cls}">{esc(result.parting.value)}</span></p>',
            "<h2>Where the runs part</h2>", "<pre>" + esc("\n".join(render(result))) + "</pre>"]
    ft = result.first_tensor
    body.append(table([("what", "what"), ("value", "value")], [
        {"what": "parts at step", "value": (result.parts_at or {}).get("step", "never")},
        {"what": "parts in", "value": (result.parts_at or {}).get("what", "—")},
        {"what": "first differing tensor", "value": f"{ft['name']} (step {ft['at_step']})" if ft else "—"},
    ], left=("what", "value")))
    body.append("<h2>Loss curves</h2>")
    if trace_a.steps and trace_b.steps:
        body.append(figure(curves_svg([(f"A: {result.a}", trace_a), (f"B: {result.b}", trace_b)]),
                           "A is the reference of the lower panel; the dashed line marks where B parts from A"))
    else:
        body.append(none("a trace holds no step: nothing to draw"))
    body.append("<h2>How far apart the retrained metrics end (|A − B|)</h2>")
    rows = [{"metric": k, "value": "n/a" if v is None else ("0" if v == 0 else f"{v:.3g}")}
            for k, v in result.metrics.items()]
    body.append(table([("metric", "metric"), ("value", "|A − B|")], rows, left=("metric",)) if rows
                else none("no metric in both records"))
    body.append(notes_list(result.notes))
    return document(title, body)


# --------------------------------------------------------------------------- effects: traces in, the page out


def check_target(path: str) -> None:
    """Refuse, before anything runs, an ``--html`` FILE that is a directory or a symbolic link (exit 2)."""
    p = Path(path)
    if p.is_symlink():
        raise InputError(str(p), "is a symbolic link; the report is never written through a link",
                         hint="pass --html a new file name, or remove the link")
    if p.is_dir():
        raise InputError(str(p), "is a directory, not a file", hint="pass --html a file name, e.g. --html report.html")


def write_page(path: str, text: str, records_at: str | None = None) -> None:
    """Write the page atomically (temp file, then rename), then say where on stderr (``report: /abs/path``, one
    line, plain: a path to click or copy); one line when that fails, the records stay."""
    from .safeio import atomic_write_text

    check_target(path)
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        kept = f"; the records are kept in {records_at}" if records_at else ""
        again = f" (`harness compare {records_at} --html FILE` writes it again)" if records_at else ""
        raise InputError(str(path), f"the HTML report could not be written ({(exc.strerror or str(exc)).lower()})"
                         f"{kept}", hint=f"pass --html a writable path{again}") from None
    print(f"report: {os.path.abspath(path)}", file=sys.stderr, flush=True)


def write_run_page(opts: Any, records: list[ResultRecord], comparison: Comparison, results: Path | None,
                   bundle_dir: str | None, trial_environment: Mapping[str, Any] | None,
                   traces: Mapping[str, Any], parts: Mapping[str, str], causes: Mapping[str, str]) -> None:
    """``--html FILE`` of run/matrix/band/compare: build the page from what the runner read, and write it."""
    bundle = Path(bundle_dir).name if bundle_dir else _bundle_name(records)
    page = run_page(RunPage(command=opts.command or "run", records=records, comparison=comparison, bundle=bundle,
                            trial_environment=trial_environment, traces=dict(traces), parts_at=dict(parts),
                            causes=dict(causes)))
    write_page(opts.html, page, str(results) if results is not None else None)


def _bundle_name(records: Iterable[ResultRecord]) -> str | None:
    for r in records:
        b = (r.spec or {}).get("bundle_dir") or (r.bundle or {}).get("path")
        if isinstance(b, str) and b.strip("/"):
            return Path(b).name
    return None
