"""The first screen: the verdict, then one line per cell, then which axis moved what.

``harness run``, ``matrix``, ``band`` and ``compare`` print this by default; ``--detail``
prints every table (:func:`harness.report.print_report`). It is built to fit the terminal:
every line within its width at 80 columns and up, names and numbers never cut, the verdict
on the first line. Every number says its split and its units. Nothing here computes a
verdict; it renders the :class:`~harness.judge.Comparison` it is given.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from rich.console import Console
from rich.cells import cell_len
from rich.padding import Padding
from rich.text import Text

from .judge import Comparison, Verdict
from .ladder import RUNG_ORDER, Rung
from .record import ResultRecord
from .report import (_band_stacked, _fits, attribution_notes, attribution_of, attribution_rows, band_note, beyond_lines,
                     band_table, has_seeds, objective_notes, tested, rows, summary_line, trace_notes, trial_env_row,
                     verdict_style, warnings)

CELLS_TITLE = ("Cells: validation split; val loss in the trainer's units (the reference trainer's: MSE of the "
               "scaled targets); Δ trial = vs trial_info.yaml")
ATTRIBUTION_TITLE = "Which axis moved what (max |Δ| between cells that differ only in that axis; validation split)"
DETAIL_HINT = "Every table (environment, per-target R²/MSE/MAE in original units, band, weights): add --detail"
NOT_OK = {Verdict.FAILED.value: ("✗", "red"), Verdict.SKIPPED.value: ("-", "dim"),
          Verdict.INCOMPLETE.value: ("…", "magenta"), Verdict.NOT_COMPARABLE.value: ("✗", "red")}


def _line(text: str, style: str = "", indent: int = 0) -> Any:
    """A line rich wraps at spaces to the terminal's width (never past it), its continuation indented."""
    body = Text(text, style=style, overflow="fold")
    return Padding(body, (0, 0, 0, indent), expand=False) if indent else body


def _distinct(values: list[str]) -> str:
    vals = [v for v in dict.fromkeys(values) if v and v != "—"]
    return ", ".join(vals)


RUNG_SHORT = {
    Rung.BITWISE: "bitwise: the retrained weights are identical to the reference's",
    Rung.EQUAL: "numerically equal: |Δ| within one trajectory's numerical noise (ulp band)",
    Rung.SAME: "same distribution: beyond that noise, within what another seed gives (seed band)",
    Rung.DRIFTED: "drifted: beyond what another training seed gives (seed band, at α)",
    Rung.DIFFERS: "differs: beyond the numerical noise; no seed band judged it (--band-seeds 8)",
}


def legend(comparison: Comparison) -> list[str]:
    """What each verdict word on this screen means, and the false-alarm rate behind "drifted"."""
    seen = set(comparison.rung_counts())
    lines = [RUNG_SHORT[r] for r in RUNG_ORDER if r in seen]
    t = tested(comparison)
    if t is not None:
        judged, bound = t
        run = f"; {judged} cells: ≤ {bound:.2g} for the run" if judged > 1 else ""
        lines.append(f"α = {comparison.alpha:g}: chance a cell of the trial's distribution is called drifted{run}")
    return lines


def environment_lines(data: list[dict[str, str]], trial: Mapping[str, Any] | None) -> list[str]:
    """Where the cells ran, and where the trial did, each in one line of the values that occur."""
    def summary(rows_: list[dict[str, str]]) -> str:
        parts = []
        for key, label in (("device", ""), ("torch", "torch "), ("cuda", "CUDA "), ("python", "python ")):
            v = _distinct([r.get(key, "—") for r in rows_])
            if v:
                parts.append(label + v)
        return " · ".join(parts)

    out = []
    here = summary([r for r in data if r.get("verdict") not in NOT_OK])
    if here:
        out.append(f"ran on: {here}")
    t = trial_env_row(trial)
    if t is not None:
        there = summary([t])
        if there:
            out.append(f"the trial (as trial_info.yaml records it): {there}")
    return out


GAP = "  "
INDENT = "    "


def fit(heads: list[str], rows: list[list[str]], width: int, *, right: set[int] | None = None,
        optional: list[int] | None = None, styles: dict[int, Callable[[str], str]] | None = None,
        beside_name: int | None = None) -> list[Text]:
    """A table as plain lines that fit ``width``: column 0 names the row and is never cut.

    One line per row when it fits, else without the first optional column; else the name takes
    its own line (with column ``beside_name`` after it) and the other columns the indented line
    below it, the optional columns going in the order given until it fits. Numbers are
    right-aligned, nothing is wrapped inside a column.
    """
    styles, right, optional = styles or {}, right or set(), optional or []

    def widths(cols: list[int]) -> dict[int, int]:
        return {c: max([cell_len(heads[c])] + [cell_len(r[c]) for r in rows]) for c in cols}

    def join(r: list[str], cols: list[int], w: dict[int, int]) -> Text:
        line = Text()
        for k, c in enumerate(cols):
            cell = r[c]
            pad = " " * (w[c] - cell_len(cell))
            if k:
                line.append(GAP)
            if c in right:
                line.append(pad)
            line.append(cell, style=styles[c](cell) if c in styles else "")
            if c not in right and k < len(cols) - 1:
                line.append(pad)
        return line

    n = len(heads)
    trials: list[tuple[bool, list[int]]] = [(False, list(range(n)))]
    if optional:
        trials.append((False, [c for c in range(n) if c != optional[0]]))
    for k in range(len(optional) + 1):
        trials.append((True, [c for c in range(n) if c not in optional[:k] and c != beside_name]))
    for two_lines, keep in trials:
        w = widths(keep)
        rest = keep[1:] if two_lines else keep
        total = sum(w[c] for c in rest) + len(GAP) * (len(rest) - 1) + (len(INDENT) if two_lines else 0)
        if total <= width:
            break
    out: list[Text] = []
    rule = Text("─" * min(width, max(total, w[keep[0]] if two_lines else 0)), style="dim")
    if not two_lines:
        out += [join(heads, keep, w).copy(), rule]
        out[0].stylize("bold")
        return out + [join(r, keep, w) for r in rows]
    head = Text(INDENT).append_text(join(heads, keep[1:], w))
    head.stylize("bold")
    def name(r: list[str]) -> str:
        return r[keep[0]] + (f"  {r[beside_name]}" if beside_name is not None else "")

    out += [Text(name(heads), style="bold"), head, rule]
    for r in rows:
        out.append(Text(name(r), overflow="fold"))
        out.append(Text(INDENT).append_text(join(r, keep[1:], w)))
    return out


def cells_lines(data: list[dict[str, str]], comparison: Comparison, reused: Mapping[str, str] | None,
                width: int) -> list[Text]:
    """One row per cell: its verdict, its val loss, the Δ to the trial, and what supports the verdict."""
    cols = [("cell", "cell"), ("verdict", "verdict"), ("val_loss", "val loss")]
    if any(r.get("d_rec_loss") not in (None, "—") for r in data):
        cols.append(("d_rec_loss", "Δ trial"))
    if has_seeds(comparison):
        cols.append(("vs_seeds", "|Δ|/seed sd"))
    cols.append(("evidence", "evidence"))
    if reused:
        cols.append(("run", "run"))
    keys = [k for k, _ in cols]
    body = []
    for r in data:
        r = {**r, "run": "reused" if reused and r["cell"] in reused else "ran"}
        body.append([r.get(k, "—") if r["verdict"] not in NOT_OK or k in ("cell", "verdict", "run") else "—"
                     for k in keys])
    right = {keys.index(k) for k in ("val_loss", "d_rec_loss", "vs_seeds") if k in keys}
    optional = [keys.index(k) for k in ("val_loss", "vs_seeds", "d_rec_loss") if k in keys]
    return fit([h for _, h in cols], body, width, right=right, optional=optional,
               styles={keys.index("verdict"): verdict_style})


def attribution_lines(records: list[ResultRecord], comparison: Comparison, width: int) -> tuple[list[Text], list[str]]:
    """The axes that vary, one line each: the values, what they moved, how many pairs stayed bitwise."""
    attr = attribution_of(records, None, comparison)
    if attr is None:
        return [], []
    data = attribution_rows(attr)
    if not data:
        return [], _notes(attr)
    odd = any(r["status"] != "measured" for r in data)
    heads = ["axis", "values", "val loss", "max|ΔR²|", "weights"] + (["status"] if odd else [])
    body = []
    for r in data:
        status = "confounded" if r["status"].startswith("confounded") else r["status"]  # with what: --detail
        body.append([r["axis"], r["values"], r["val_loss"], r["r2"], r["weights"]] + ([status] if odd else []))
    return fit(heads, body, width, right={2, 3}, beside_name=1), _notes(attr)


def _notes(attr: Any) -> list[str]:
    """The attribution's notes a first screen needs: pairs left out, what (N sd) means; not the fixed axes."""
    return [n for n in attribution_notes(attr) if not n.startswith("not enough cells")]


def band_line(comparison: Comparison) -> str | None:
    """What the band measured, in one line: the yardsticks the verdicts were read against."""
    band = comparison.band
    if band is None or not (band.n_ulp or band.n_seed):
        return None
    if band.source != "ulp":
        return "band: a cell's own repeats (their spread is the numerical noise)"
    parts = []
    if band.n_ulp:
        again = f"; {len(band.redrawn)} drawn again: training rounded the change away" if band.redrawn else ""
        parts.append(f"{band.n_ulp} retrains, one weight moved by an ulp (the noise{again})")
    if band.n_seed:
        parts.append(f"{band.n_seed} with other seeds (the spread)")
    where = f", on {band.environment}" if band.environment else ""
    return f"band: {'; '.join(parts)}{where}"


def print_compact(out: Console, records: list[ResultRecord], comparison: Comparison, *,
                  trial_environment: Mapping[str, Any] | None = None, parts_at: Mapping[str, str] | None = None,
                  causes: Mapping[str, str] | None = None, reused: Mapping[str, str] | None = None) -> None:
    """The verdict first, then what it rests on, one line per cell, the attribution, and what did not run."""
    data = rows(records, comparison)
    out.print(summary_line(comparison))
    for line in legend(comparison):
        out.print(_line(line, "dim", 2))
    line = band_line(comparison)
    if line:
        out.print(_line(line, "dim", 2))
    for line in environment_lines(data, trial_environment):
        out.print(_line(line, "dim", 2))
    if data:
        out.print(Text(""))
        out.print(_line(CELLS_TITLE, "italic", 0))
        for t in cells_lines(data, comparison, reused, out.width):
            out.print(t, soft_wrap=False, overflow="fold")
    elif comparison.band is not None and (comparison.band.ulp or comparison.band.seed):  # a band on its own
        bt = band_table(comparison.band)
        out.print(Text(""))
        out.print(bt if _fits(out, bt) else _band_stacked(comparison.band))
    for r in data:  # why a cell did not give a verdict: a reason often ends in a command, never cut
        mark = NOT_OK.get(r["verdict"])
        if mark:
            head = f"{mark[0]} {r['cell']}" + (":" if r["verdict"] == Verdict.FAILED.value else f" {r['verdict']}:")
            if cell_len(f"{head} {r['reason']}") <= out.width:
                out.print(Text(f"{head} {r['reason']}", style=mark[1]), soft_wrap=True)
            else:  # the reason whole on a line of its own
                out.print(_line(head, mark[1]))
                out.print(Text(f"  {r['reason']}", style=mark[1]), soft_wrap=True)
    for line in beyond_lines(comparison):
        out.print(_line(f"≠ {line}", "yellow"))
    for cell in sorted(set(parts_at or {}) | set(causes or {})):
        at, why = (parts_at or {}).get(cell), (causes or {}).get(cell)
        if cell == comparison.first_cell or at == "baseline":
            continue  # the cell the others are traced against parts from nothing
        if at == "never":  # its trace is the baseline's, step for step: nothing parts (a cause may still be said)
            if why:
                out.print(_line(f"↳ {cell} never parts from {comparison.first_cell}: {why}", "cyan"))
            continue
        if (at and at != "—") or why:
            out.print(_line(f"↳ {cell} parts from {comparison.first_cell}"
                            + (f" at {at}" if at and at != "—" else "") + (f": {why}" if why else ""), "cyan"))
    table, notes = attribution_lines(records, comparison, out.width)
    if table:
        out.print(Text(""))
        out.print(_line(ATTRIBUTION_TITLE, "italic", 0))
        for t in table:
            out.print(t, overflow="fold")
    for n in notes:
        out.print(_line(n, "dim", 2))
    for w in warnings(records, comparison):
        out.print(_line(f"! {w}", "bold red"))
    for n in trace_notes(records) + objective_notes(records):
        out.print(_line(f"- {n}", "dim"))
    note = band_note(comparison)
    if note:
        out.print(_line(note, "cyan"))
    out.print(_line(DETAIL_HINT, "dim"))
