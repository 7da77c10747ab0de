"""Rendering records and their comparison: rich tables, Markdown, JSON.

Everything here consumes typed records and the :class:`~harness.judge.Comparison`
that :func:`harness.judge.compare` made of them; nothing here computes a verdict.
"""

from __future__ import annotations

import math
from statistics import fmean
import os
import sys
from typing import Any, Iterable, Mapping

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .attribution import CONFOUNDED, NOT_ENOUGH, Attribution, AxisEffect, WidthFn
from .band import Band
from .judge import Comparison, MetricDiff, Verdict, is_row, max_abs
from .judge import attribution_of as judged_attribution
from .ladder import RUNG_LINES, RUNG_ORDER, Rung
from .record import REPORT_SCHEMA, BandKind, ResultRecord, _jsonable

VERDICT_STYLE = {Verdict.REPRODUCED: "bold green", Verdict.DRIFTED: "bold yellow", Verdict.FAILED: "bold red",
                 Verdict.UNRECORDED: "cyan", Verdict.SKIPPED: "dim", Verdict.INCOMPLETE: "bold magenta",
                 Verdict.NOT_COMPARABLE: "bold red", Verdict.UNJUDGED: "cyan"}
RUNG_STYLE = {Rung.BITWISE: "bold green", Rung.EQUAL: "bold green", Rung.SAME: "green", Rung.DRIFTED: "bold yellow",
              Rung.DIFFERS: "cyan"}


def verdict_style(word: str) -> str:
    """The style of a Results row's verdict word: a rung of the ladder, or a verdict."""
    for rung, style in RUNG_STYLE.items():
        if word == rung.value or word.startswith(rung.value + " "):
            return style
    try:
        return VERDICT_STYLE.get(Verdict(word), "")
    except ValueError:
        return ""


def console(stderr: bool = False) -> Console:
    """The console every command prints through: plain and 200 columns wide when not a terminal."""
    width = None
    if not sys.stdout.isatty():
        width = int(os.environ.get("COLUMNS", "200"))
    return Console(stderr=stderr, width=width, highlight=False, soft_wrap=False)


# --------------------------------------------------------------------------- formatting


def fnum(v: Any, digits: int = 6) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{v:.{digits}g}"


def fdelta(v: Any) -> str:
    """A difference: exact zero is shown as 0, everything else with sign and 2 digits."""
    if v is None:
        return "—"
    if v == 0:
        return "0"
    return f"{v:+.2e}"


def fmag(v: Any) -> str:
    """A magnitude (a max |Δ|): exact zero is 0, everything else unsigned with 2 digits."""
    if v is None:
        return "—"
    if v == 0:
        return "0"
    return f"{abs(v):.2e}"


def _mean(d: Mapping[str, Any] | None) -> float | None:
    vals = [float(v) for v in (d or {}).values() if v is not None]
    return fmean(vals) if vals else None


# What each determinism mode switches on: the table names only what a run measured otherwise.
_MODE_SWITCHES = {"strict": (True, True), "warn": (True, True), "default": (False, False)}


def determinism_label(det: Mapping[str, Any]) -> str:
    """``strict``, ``default`` ...: the mode, plus only the switches measured otherwise than the mode sets them.

    ``+TF32`` when TF32 matmuls were allowed; ``no cublas-ws`` / ``hashseed unset`` when a
    launch variable was missing. The record keeps every switch.
    """
    mode = det.get("mode")
    if not det or not mode:
        return "—"
    flags = []
    algos, cudnn = _MODE_SWITCHES.get(str(mode), (None, None))
    if algos is not None and bool(det.get("deterministic_algorithms")) != algos:
        flags.append("det-algos" if det.get("deterministic_algorithms") else "nondet-algos")
    if cudnn is not None and bool(det.get("cudnn_deterministic")) != cudnn:
        flags.append("cudnn-det" if det.get("cudnn_deterministic") else "cudnn-default")
    if det.get("matmul_allow_tf32"):
        flags.append("+TF32")
    launch_vars = algos is not False  # strict and warn start the worker with them; default leaves them unset
    if "CUBLAS_WORKSPACE_CONFIG" in det and bool(det.get("CUBLAS_WORKSPACE_CONFIG")) != launch_vars:
        flags.append("cublas-ws" if det.get("CUBLAS_WORKSPACE_CONFIG") else "no cublas-ws")
    hashseed = det.get("PYTHONHASHSEED")
    if "PYTHONHASHSEED" in det and (hashseed == "0") != launch_vars:
        flags.append("hashseed unset" if hashseed in (None, "") else f"hashseed {hashseed}")
    return str(mode) + (f" ({', '.join(flags)})" if flags else "")


def _env_summary(rec: ResultRecord) -> dict[str, str]:
    env = rec.env
    det = rec.determinism or {}
    where = rec.backend or "?"
    if rec.image is not None and rec.image.tag:
        where = f"{where}:{rec.image.tag}"
    slurm = rec.slurm
    if slurm is not None and (slurm.node or slurm.gres):  # the node and the GPU type the job was given
        gres = ",".join(slurm.gres or [])
        where += f" {slurm.node or '?'}" + (f" gpu:{gres}" if gres else "")
    return {
        "where": where,
        "python": env.python or "—",
        "torch": env.torch or "—",
        "cuda": env.cuda or "—",
        "cudnn": env.cudnn or "—",
        "device": env.device or "—",
        "driver": env.driver or "—",
        "threads": str(env.threads if env.threads is not None else "—"),
        "isa": isa_label(env.cpu_capability, env.isa_requested),
        "determinism": determinism_label(det),
    }


def isa_label(capability: str | None, requested: str | None) -> str:
    """The SIMD level torch's CPU kernels used, and the ``--isa`` level asked for when one was."""
    if capability is None:
        return "—"
    return f"{capability} ({requested})" if requested else capability


TRIAL_ROW = "trial (recorded)"


def trial_env_row(env: Mapping[str, Any] | None) -> dict[str, str] | None:
    """The Environment row of what trial_info.yaml recorded of the trial's own environment, if anything."""
    if not env:
        return None

    def v(*keys: str) -> str:
        for k in keys:
            if env.get(k) not in (None, ""):
                return str(env[k])
        return "—"

    host = v("hostname", "host")
    return {"cell": TRIAL_ROW, "where": "trial_info.yaml" + (f" ({host})" if host != "—" else ""),
            "python": v("python"), "torch": v("torch"), "cuda": v("cuda"), "cudnn": v("cudnn"),
            "device": v("device", "gpu"), "driver": v("driver"), "threads": v("threads"),
            "isa": v("cpu_capability", "isa"), "determinism": v("determinism")}


def _weights(j: Any, is_first: bool) -> str:
    """Bitwise identity of the retrained best weights with the trial's and the first cell's."""
    if j is None:
        return "—"
    parts = []
    arch = j.weights_vs_archived
    if arch:  # tensor by tensor against the bundle's weights/best.pt
        if arch.identical:
            parts.append("=archived")
        else:
            parts.append("≠archived")  # which tensor, and by how much: a line under the table (weights_notes)
    if j.weights_identical_to_recorded is not None:
        parts.append("=trial" if j.weights_identical_to_recorded else "≠trial")
    user = j.user_weights_identical_to_recorded
    if user is not None:  # the trainer's own digest vs trial_info's: its convention
        parts.append("=trial(own sha)" if user else "≠trial(own sha)")
    if not is_first and j.weights_identical_to_first is not None:
        parts.append("=first" if j.weights_identical_to_first else "≠first")
    return " ".join(parts) or "—"


def weights_notes(comparison: Comparison) -> list[str]:
    """Where the retrained weights first differ from the archived ones: one line per first differing tensor.

    Information, not a warning: off the trial's hardware or kernels the weights are expected to differ
    (the verdict says whether it matters).
    """
    by_tensor: dict[str, list[tuple[str, float | None]]] = {}
    for j in comparison.cells:
        arch = j.weights_vs_archived
        if arch and not arch.identical:
            by_tensor.setdefault(str(arch.first_difference), []).append((j.cell, arch.max_abs_diff))
    out = []
    for tensor, cells in by_tensor.items():
        deltas = sorted(d for _, d in cells if d is not None)
        size = "" if not deltas else (f", max |Δ| {deltas[0]:.2g}" if len(set(deltas)) == 1 or len(cells) == 1 else
                                      f", max |Δ| {deltas[0]:.2g} to {deltas[-1]:.2g}")
        who = cells[0][0] if len(cells) == 1 else f"{len(cells)} cells"
        out.append(f"retrained weights ≠ archived weights/best.pt in {who}: first at {tensor}{size}")
    return out


def _diff(d: Mapping[str, MetricDiff], key: str) -> float | None:
    m = d.get(key)
    return m.diff if m is not None else None


# --------------------------------------------------------------------------- rows (plain data)


def table_records(records: list[ResultRecord]) -> list[ResultRecord]:
    """The records that are rows of the tables (:func:`harness.judge.is_row`)."""
    return [r for r in records if is_row(r)]


def band_members(records: list[ResultRecord]) -> list[ResultRecord]:
    return [r for r in records if r.band]


def evidence(j: Any) -> str:
    """The "evidence" column: what supports the cell's rung, in a few words."""
    lad = getattr(j, "ladder", None) if j is not None else None
    if lad is None:
        return "reference" if j is not None and j.verdict in (Verdict.UNRECORDED,) else "—"
    if lad.rung is Rung.BITWISE:
        return "weights =" + ("trial" if lad.bitwise_to == "recorded trial" else
                              "archived" if lad.bitwise_to == "archived weights" else "first")
    m = lad.metrics.get(lad.deciding or "")
    if lad.rung is Rung.EQUAL:
        src = m.limit_from if m is not None else None
        if src is None:
            return "≤ noise"
        return "≤ f32 rounding" if src.startswith("float32") else f"≤ noise, {src.replace(' band', '')}"
    if lad.rung is Rung.DIFFERS:
        return "no seed band" if lad.n_seed < 2 else "not judged"
    if m is None or m.p_holm is None:
        return "—"
    if m.method == "paired seeds":
        return f"p={m.p_holm:.2g}, {m.n} seed pairs"
    return f"p={m.p_holm:.2g}, {m.n} seeds" + (", trial tested" if m.tested == "reference" else "")


def vs_seeds(j: Any) -> str:
    """The largest |Δ| against the reference, in seed standard deviations: could it change a conclusion?"""
    lad = getattr(j, "ladder", None) if j is not None else None
    if lad is None or lad.delta_sd is None:
        return "—"
    return "0" if lad.delta_sd == 0 else f"{lad.delta_sd:.2g}"


def verdict_word(j: Any) -> str:
    """The Results table's verdict: the cell's rung on the ladder when it has one, else its verdict."""
    if j is None:
        return Verdict.INCOMPLETE.value
    lad = getattr(j, "ladder", None)
    if lad is None or j.verdict in (Verdict.NOT_COMPARABLE, Verdict.FAILED, Verdict.SKIPPED, Verdict.INCOMPLETE):
        return j.verdict.value
    if j.out_of_tolerance:
        return "drifted (--tol)"
    return lad.rung.value


def rows(records: list[ResultRecord], comparison: Comparison) -> list[dict[str, str]]:
    """One row of display strings per cell (missing cells last); shared by the terminal and Markdown."""
    out = []
    first = comparison.first_cell
    for rec in table_records(records):
        j = comparison.cell(rec.cell)
        retrained = rec.retrained
        val = retrained.get("val") or {}
        vs_rec = j.vs_recorded if j else {}
        wall = rec.launcher_wall_s if rec.launcher_wall_s is not None else rec.wall_s
        out.append({
            "cell": rec.cell,
            **_env_summary(rec),
            "val_loss": ("non-finite" if "metrics.retrained.val_loss" in (rec.nonfinite or [])
                         else fnum(retrained.get("val_loss"))),
            "d_rec_loss": fdelta(_diff(vs_rec, "val_loss")),
            "r2": fnum(_mean(val.get("r2")), 5),
            "d_rec_r2": fmag(max_abs(vs_rec, "r2")),
            "mse": fnum(_mean(val.get("mse")), 5),
            "mae": fnum(_mean(val.get("mae")), 5),
            "d_first": "baseline" if rec.cell == first else fmag(max_abs(j.vs_first) if j else None),
            "weights": _weights(j, rec.cell == first),
            "d_archived": fmag(max_abs(j.archived_inference) if j else None),
            "wall": f"{wall:.1f}s" if isinstance(wall, (int, float)) and rec.ok else "—",
            "evidence": evidence(j),
            "vs_seeds": vs_seeds(j),
            "verdict": verdict_word(j),
            "reason": j.reason if j else "",
        })
    blank = {k: "—" for k in ("where", "python", "torch", "cuda", "cudnn", "device", "driver", "threads", "isa",
                              "determinism",
                              "val_loss", "d_rec_loss", "r2", "d_rec_r2", "mse", "mae", "d_first", "weights",
                              "d_archived", "wall", "evidence", "vs_seeds")}
    for name in comparison.missing:
        out.append({**blank, "cell": name, "verdict": Verdict.INCOMPLETE.value, "reason": "planned, but left no record"})
    return out


ENV_COLUMNS = [("cell", "cell"), ("where", "backend/image"), ("python", "python"), ("torch", "torch"), ("cuda", "cuda"),
               ("cudnn", "cudnn"), ("device", "device"), ("driver", "driver"), ("threads", "thr"), ("isa", "isa"),
               ("determinism", "determinism")]
RESULT_COLUMNS = [("cell", "cell"), ("val_loss", "val loss"), ("d_rec_loss", "Δ rec"), ("r2", "R² val"),
                  ("d_rec_r2", "max|ΔR²| rec"), ("mse", "MSE val"), ("mae", "MAE val"), ("d_first", "max|Δ| first"),
                  ("weights", "weights"), ("d_archived", "archived Δ"), ("wall", "wall"), ("verdict", "verdict")]
EVIDENCE_COLUMN = ("evidence", "evidence")
SEED_COLUMN = ("vs_seeds", "|Δ|/seed sd")


def has_band(comparison: Comparison) -> bool:
    """Whether a band was measured (ulp or seed members)."""
    return comparison.band is not None and bool(comparison.band.n_ulp or comparison.band.n_seed)


def has_seeds(comparison: Comparison) -> bool:
    return comparison.band is not None and comparison.band.n_seed >= 2


def result_columns(comparison: Comparison) -> list[tuple[str, str]]:
    """The Results table's columns: the evidence for each rung (and |Δ| in seed sd with a seed band) before
    the verdict."""
    cols = list(RESULT_COLUMNS)
    extra = [EVIDENCE_COLUMN]
    if has_seeds(comparison):
        extra.append(SEED_COLUMN)
    cols[-1:-1] = extra
    return cols


FREE_TEXT = ("where", "device", "determinism")  # may be shortened with an ellipsis; names and numbers never are
RESULTS_TITLE = ("Results (validation split; val loss in the trainer's units, for the reference trainer the MSE of the "
                 "scaled targets; R², MSE, MAE in original units; Δ rec = vs trial_info.yaml, Δ first = vs first cell)")
PER_TARGET_TITLE = "Per target (validation): value and Δ vs recorded"
PER_TARGET_COLUMNS = ("R²", "ΔR² rec", "MSE", "ΔMSE rec", "MAE", "ΔMAE rec", "test R²")


def environment_table(data: list[dict[str, str]]) -> Table:
    t = Table(title="Environment (measured inside each run)", box=box.SIMPLE_HEAD, title_justify="left")
    for key, head in ENV_COLUMNS:
        if key in FREE_TEXT:
            t.add_column(head, overflow="ellipsis")
        else:
            t.add_column(head, no_wrap=True)
    for r in data:
        t.add_row(*(r[k] for k, _ in ENV_COLUMNS))
    return t


def results_table(data: list[dict[str, str]], columns: list[tuple[str, str]] | None = None) -> Table:
    columns = columns or RESULT_COLUMNS
    t = Table(title=RESULTS_TITLE, box=box.SIMPLE_HEAD, title_justify="left")
    for key, head in columns:
        t.add_column(head, justify="left" if key in ("cell", "weights", "verdict", "evidence", "cause", "loss_curve")
                     else "right", no_wrap=True)
    for r in data:
        cells: list[Any] = [r[k] for k, _ in columns]
        cells[-1] = Text(r["verdict"], style=verdict_style(r["verdict"]))
        t.add_row(*cells)
    return t


def per_target_rows(records: list[ResultRecord], comparison: Comparison) -> list[tuple[str, ...]]:
    """(cell, target, *PER_TARGET_COLUMNS) display strings for every target of the cells that ran."""
    out: list[tuple[str, ...]] = []
    for rec in table_records(records):
        retrained = rec.retrained
        val = retrained.get("val") or {}
        test = retrained.get("test") or {}
        j = comparison.cell(rec.cell)
        vs_rec = j.vs_recorded if j else {}
        for target in (val.get("r2") or {}):
            def d(fam: str) -> str:
                return fdelta(_diff(vs_rec, f"{fam}/{target}"))
            out.append((rec.cell, target, fnum(val["r2"].get(target), 5), d("r2"),
                        fnum((val.get("mse") or {}).get(target), 5), d("mse"),
                        fnum((val.get("mae") or {}).get(target), 5), d("mae"),
                        fnum((test.get("r2") or {}).get(target), 5)))
    return out


def per_target_table(records: list[ResultRecord], comparison: Comparison) -> Table | None:
    """Per target detail of the cells that ran; None when no cell has per-target metrics."""
    t = Table(title=PER_TARGET_TITLE, box=box.SIMPLE_HEAD, title_justify="left")
    for head in ("cell", "target", *PER_TARGET_COLUMNS):
        t.add_column(head, justify="left" if head in ("cell", "target") else "right", no_wrap=True)
    for row in per_target_rows(records, comparison):
        t.add_row(*row)
    return t if t.row_count else None


def _stacked(title: str, blocks: list[tuple[str, list[tuple[str, Any]]]]) -> Group:
    """The narrow layout of a table: its title, then per row its name and one ``key: value`` line per column.

    Used when a table is wider than the terminal, so that no name or number is cut or wrapped.
    """
    parts: list[Any] = [Text(title, style="italic", overflow="fold")]
    for name, items in blocks:
        parts.append(Text(name, style="bold", no_wrap=True, overflow="ignore"))
        for key, value in items:
            line = Text(f"  {key}: ", no_wrap=True, overflow="ignore")
            line.append(value if isinstance(value, Text) else Text(str(value)))
            parts.append(line)
    parts.append(Text(""))
    return Group(*parts)


def _environment_stacked(data: list[dict[str, str]]) -> Group:
    return _stacked("Environment (measured inside each run)",
                    [(r["cell"], [(head, r[k]) for k, head in ENV_COLUMNS[1:]]) for r in data])


def _results_stacked(data: list[dict[str, str]], columns: list[tuple[str, str]] | None = None) -> Group:
    columns = columns or RESULT_COLUMNS
    blocks = []
    for r in data:
        items: list[tuple[str, Any]] = [(head, r[k]) for k, head in columns[1:-1]]
        items.append(("verdict", Text(r["verdict"], style=verdict_style(r["verdict"]))))
        blocks.append((r["cell"], items))
    return _stacked(RESULTS_TITLE, blocks)


def _per_target_stacked(records: list[ResultRecord], comparison: Comparison) -> Group | None:
    rows_ = per_target_rows(records, comparison)
    if not rows_:
        return None
    return _stacked(PER_TARGET_TITLE, [(f"{r[0]}  target {r[1]}", list(zip(PER_TARGET_COLUMNS, r[2:]))) for r in rows_])


# --------------------------------------------------------------------------- the band, the repeats

BAND_COLUMNS = ("metric", "n", "mean", "sd", "min", "max", "range")
SEED_COLUMNS = ("seeds n", "seeds sd", "seeds range")


def band_title(band: Band) -> str:
    if band.source != "ulp":
        what = "Band (a cell's own repeats)"
    elif band.n_ulp:
        what = f"Band: {band.n_ulp} retrains of the baseline, each with one initial weight moved by one ulp"
        if band.redrawn:  # whole again: say so, not as a warning
            what += (f" ({', '.join(band.redrawn)} drawn again: training rounded {'its' if len(band.redrawn) == 1 else 'their'}"
                     " change away)")
        what += f"; {band.n_seed} with other seeds" if band.n_seed else ""
    else:
        what = f"Band: {band.n_seed} retrains of the baseline with other seeds"
    where = f" ({band.environment})" if band.environment else ""
    return (f"{what}{where}. Validation; the ulp members are the numerical noise, the seeds the distribution "
            "a verdict is read against")


def _shown_keys(band: Band) -> list[str]:
    """The band's metric keys for display: the over-targets aggregates (``r2/*``) only where no per-target values are."""
    keys = list(dict.fromkeys([*band.ulp, *band.seed]))
    per_target = {k.split("/", 1)[0] for k in keys if "/" in k and not k.endswith("/*")}
    return [k for k in keys if not (k.endswith("/*") and k.split("/", 1)[0] in per_target)]


def band_rows(band: Band) -> list[tuple[str, ...]]:
    """(metric, n, mean, sd, min, max, range[, seeds n, seeds sd, seeds range]) display strings per metric key."""
    seeds = band.n_seed > 0
    out = []
    for key in _shown_keys(band):
        u = band.ulp.get(key)
        row: list[str] = [key]
        row += ([str(u.n), fnum(u.mean, 7), fmag(u.sd), fnum(u.min, 7), fnum(u.max, 7), fmag(u.range)] if u
                else ["0", "—", "—", "—", "—", "—"])
        if seeds:
            sd = band.seed.get(key)
            row += [str(sd.n), fmag(sd.sd), fmag(sd.range)] if sd else ["0", "—", "—"]
        out.append(tuple(row))
    return out


def band_table(band: Band) -> Table:
    heads = BAND_COLUMNS + (SEED_COLUMNS if band.n_seed else ())
    t = Table(title=band_title(band), box=box.SIMPLE_HEAD, title_justify="left")
    for h in heads:
        t.add_column(h, justify="left" if h == "metric" else "right", no_wrap=True)
    for row in band_rows(band):
        t.add_row(*row)
    return t


def _band_stacked(band: Band) -> Group:
    heads = BAND_COLUMNS + (SEED_COLUMNS if band.n_seed else ())
    return _stacked(band_title(band), [(r[0], list(zip(heads[1:], r[1:]))) for r in band_rows(band)])


MEMBER_COLUMNS = ("member", "kind", "change", "val loss", "R² val", "weights", "wall")


def _change(rec: ResultRecord) -> str:
    p = rec.perturbation
    if rec.band_kind is BandKind.SEED:
        return f"seed {rec.band.seed if rec.band and rec.band.seed is not None else '?'}"
    if p is None:
        return "—"
    return p.where() or "not perturbed"


def member_rows(records: list[ResultRecord]) -> list[tuple[str, ...]]:
    out = []
    for rec in band_members(records):
        val = rec.retrained.get("val") or {}
        wall = rec.launcher_wall_s if rec.launcher_wall_s is not None else rec.wall_s
        out.append((rec.cell, rec.band.kind.value if rec.band else "?", _change(rec),
                    fnum(rec.retrained.get("val_loss")) if rec.ok else rec.status.value, fnum(_mean(val.get("r2")), 5),
                    (rec.weights_sha256 or "—")[:12], f"{wall:.1f}s" if isinstance(wall, (int, float)) and rec.ok else "—"))
    return out


MEMBERS_TITLE = "Band members (one retrain each)"


def members_table(records: list[ResultRecord]) -> Table | None:
    t = Table(title=MEMBERS_TITLE, box=box.SIMPLE_HEAD, title_justify="left")
    for h in MEMBER_COLUMNS:
        t.add_column(h, justify="left" if h in ("member", "kind", "change", "weights") else "right", no_wrap=True)
    for row in member_rows(records):
        t.add_row(*row)
    return t if t.row_count else None


def _members_stacked(records: list[ResultRecord]) -> Group:
    return _stacked(MEMBERS_TITLE, [(r[0], list(zip(MEMBER_COLUMNS[1:], r[1:]))) for r in member_rows(records)])


REPEATS_TITLE = "Repeats (--repeats): each cell's repeats against the first of them"
REPEAT_COLUMNS = ("cell", "repeats", "distinct", "result")


def repeat_rows(comparison: Comparison) -> list[tuple[str, ...]]:
    out = []
    for g in comparison.repeats:
        if g.deterministic:
            result = "bitwise: deterministic (one distinct result)"
        else:
            loss = g.spread.get("val_loss")
            r2 = [v.range for k, v in g.spread.items() if k.startswith("r2/") and not k.endswith("/*")]
            parts = [f"val loss range {fmag(loss.range)}" if loss else "", f"max R² range {fmag(max(r2))}" if r2 else ""]
            spread = ", ".join(p for p in parts if p)
            result = f"{g.rung.value if g.rung else 'differ'}: nondeterministic" + (f" ({spread})" if spread else "")
            if comparison.band is None or not comparison.band.measured:
                result += "; their spread is the cell's numerical noise"
        out.append((g.name, str(len(g.cells)), str(g.distinct), result))
    return out


def repeats_table(comparison: Comparison) -> Table | None:
    t = Table(title=REPEATS_TITLE, box=box.SIMPLE_HEAD, title_justify="left")
    for h in REPEAT_COLUMNS:
        t.add_column(h, justify="left" if h in ("cell", "result") else "right", no_wrap=True)
    for row in repeat_rows(comparison):
        t.add_row(*row)
    return t if t.row_count else None


def _repeats_stacked(comparison: Comparison) -> Group:
    return _stacked(REPEATS_TITLE, [(r[0], list(zip(REPEAT_COLUMNS[1:], r[1:]))) for r in repeat_rows(comparison)])


def beyond_lines(comparison: Comparison) -> list[str]:
    """One line per cell that drifted or differs: against what, and the evidence (the deciding metric)."""
    out = []
    for c in comparison.cells:
        lad = c.ladder
        if lad is None or lad.rung not in (Rung.DRIFTED, Rung.DIFFERS):
            continue
        ref = "the recorded trial" if lad.reference == "recorded trial" else f"the first cell {lad.reference}"
        others = [k for k, m in lad.metrics.items() if m.rung is lad.rung and k != lad.deciding]
        more = f" ({len(others)} more metric(s) alike)" if others else ""
        out.append(f"{c.cell} {lad.rung.value} vs {ref}: {lad.evidence}{more}")
    return out


def tested(comparison: Comparison) -> tuple[int, float] | None:
    """With a cell on a seed-band rung: how many cells were tested, and the run-wide false-alarm bound."""
    if not set(comparison.rung_counts()) & {Rung.SAME, Rung.DRIFTED}:
        return None
    judged = sum(1 for c in comparison.cells if c.ladder is not None and c.ladder.n_tested)
    return judged, min(1.0, judged * comparison.alpha)


def legend_lines(comparison: Comparison) -> list[str]:
    """One line per rung the cells reached (what it means), and the false-alarm rate behind "drifted"."""
    seen = set(comparison.rung_counts())
    lines = [RUNG_LINES[r] for r in RUNG_ORDER if r in seen]
    t = tested(comparison)
    if t is not None:
        judged, bound = t
        runwide = f"; {judged} cell(s) were tested: at most {bound:.2g} for the run" if judged > 1 else ""
        lines.append(f"α = {comparison.alpha:g}: the chance that a cell from the same distribution is called drifted "
                     f"(Holm over its metrics){runwide}")
    return lines


def band_note(comparison: Comparison) -> str | None:
    """The line under the tables when cells differ and nothing judged them: what was measured, how to judge it."""
    differing = comparison.differing
    if not differing:
        return None
    band = comparison.band
    if band is None or not band.n_seed:
        return f"not judged: {len(differing)} cell(s) beyond numerical noise; judge them with --band-seeds 8"
    return f"not judged: {', '.join(differing[:3])}: the seed band has no spread on the metrics that differ"


def _fits(out: Console | None, table: Table) -> bool:
    """Whether ``table`` fits ``out`` at its natural width (always, without a console to measure)."""
    if out is None:
        return True
    return out.measure(table, options=out.options.update_width(10_000)).maximum <= out.width


def warnings(records: Iterable[ResultRecord], comparison: Comparison | None = None) -> list[str]:
    out = list(comparison.warnings) if comparison is not None else []
    for rec in records:
        for w in rec.warnings:
            # band members say the same things alike: once for all of them
            out.append(f"band members: {w}" if rec.band else f"{rec.cell}: {w}")
        sc = rec.scaler or {}
        if sc.get("refit_matches") is False:
            out.append(f"{rec.cell}: the scaler refitted on the reproduced train split differs from the archived one "
                       f"(max |Δ| {sc.get('max_abs_diff'):.3g}): the split or the data did not reproduce")
    # the same warning from every cell is said once
    return list(dict.fromkeys(out))


def archived_notes(records: Iterable[ResultRecord]) -> list[str]:
    """Why a custom trainer's cell has no ``archived Δ`` (the record's ``trainer.archived.why``), each reason once."""
    ok = [r for r in records if r.ok]
    by_why: dict[str, list[str]] = {}
    for r in ok:
        why = ((r.trainer or {}).get("archived") or {}).get("why")
        if why and not r.archived:
            by_why.setdefault(why, []).append(r.cell)
    return [f"archived Δ —{'' if len(cells) == len(ok) else ' for ' + ', '.join(cells)}: {why}"
            for why, cells in by_why.items()]


def objective_notes(records: Iterable[ResultRecord]) -> list[str]:
    """The one note for custom-trainer cells whose trial value was not compared: no val_loss, no trainer.objective."""
    from .judge import OBJECTIVE_NOTE, objective_of

    cells = [r.cell for r in records if r.ok and not r.band and r.trainer is not None and objective_of(r) is None
             and isinstance((r.recorded or {}).get("value"), (int, float)) and "val_loss" not in r.retrained]
    if not cells:
        return []
    ok = [r for r in records if r.ok and not r.band]
    return [f"{OBJECTIVE_NOTE}{'' if len(cells) == len(ok) else ' (' + ', '.join(cells[:5]) + ')'}"]


def trace_notes(records: Iterable[ResultRecord]) -> list[str]:
    """Why a --trace cell has no trace (the record's ``trace.why``), each reason once, naming its cells."""
    by_why: dict[str, list[str]] = {}
    for r in records:
        t = r.trace
        if t is not None and not t.file and not r.band:
            by_why.setdefault(t.why or "the run wrote none", []).append(r.cell)
    return [f"no trace for {', '.join(cells)}: {why}" for why, cells in by_why.items()]


def summary_line(comparison: Comparison) -> Text:
    counts = comparison.counts()
    n = len(comparison.cells) + len(comparison.missing)
    detail = ", ".join(f"{k} {v.value}" for v, k in sorted(counts.items(), key=lambda kv: kv[0].value))
    overall = comparison.overall
    if not n:  # a band on its own: nothing but its members
        return Text.assemble(("Overall: ", "bold"), (overall.value, VERDICT_STYLE.get(overall, "")),
                             f" — {comparison.reason}")
    return Text.assemble(("Overall: ", "bold"), (overall.value, VERDICT_STYLE.get(overall, "")),
                         f"  ({detail}; {n} cells) — {comparison.reason}")


def renderable(records: list[ResultRecord], comparison: Comparison, *, per_target: bool = True,
               out: Console | None = None, trial_environment: Mapping[str, Any] | None = None,
               width: WidthFn | None = None, parts_at: Mapping[str, str] | None = None,
               reused: Mapping[str, str] | None = None, causes: Mapping[str, str] | None = None) -> Group:
    """The report; each table narrower than ``out`` is printed as is, a wider one stacked (one block per row).

    ``trial_environment``: what trial_info.yaml recorded of the trial's environment, shown as a
    ``trial (recorded)`` row above the cells of the Environment table. ``width``: an instability
    band's width per metric key, for the Attribution table's ratios.
    """
    data = rows(records, comparison)
    trial = trial_env_row(trial_environment)
    members_only = not table_records(records) and not comparison.missing
    if members_only:  # a band on its own (harness band): where its members ran, what each changed
        env_data = ([trial] if trial else []) + rows_of_members(records)
    else:
        env_data = ([trial] if trial else []) + data
    cols = result_columns(comparison)
    if parts_at:  # traced cells: where each parts from the baseline (harness.diverge.parts_at_column)
        data = [{**r, "parts_at": parts_at.get(r["cell"], "—")} for r in data]
        cols[-1:-1] = [("parts_at", "parts at")]
    if causes:  # why each cell parts from the first, where the evidence supports a class (harness.causes)
        data = [{**r, "cause": causes.get(r["cell"], "—")} for r in data]
        cols[-1:-1] = [("cause", "cause")]
    if reused:  # --resume: which rows are records of an earlier run, taken as they were
        data = [{**r, "run": "reused" if r["cell"] in reused else "ran"} for r in data]
        cols[-1:-1] = [("run", "run")]
    env, res = environment_table(env_data), results_table(data, cols)
    res = _with_loss_column(res, records, comparison, data, cols, out)
    parts: list[Any] = [env if _fits(out, env) else _environment_stacked(env_data)]
    if members_only:
        mt = members_table(records)
        if mt is not None:
            parts.append(mt if _fits(out, mt) else _members_stacked(records))
    else:
        parts.append(res if _fits(out, res) else _results_stacked(data, cols))
    if per_target and not members_only:
        table = per_target_table(records, comparison)
        if table is not None:
            parts.append(table if _fits(out, table) else _per_target_stacked(records, comparison))
    if comparison.band is not None and (comparison.band.ulp or comparison.band.seed):
        bt = band_table(comparison.band)
        parts.append(bt if _fits(out, bt) else _band_stacked(comparison.band))
    rt = repeats_table(comparison)
    if rt is not None:
        parts.append(rt if _fits(out, rt) else _repeats_stacked(comparison))
    for line in legend_lines(comparison):
        parts.append(Text(f"  {line}", style="dim"))
    for line in beyond_lines(comparison):  # wrapped at spaces: metric names stay whole
        parts.append(Text(f"≠ {line}", style="yellow"))
    parts += attribution_parts(records, out, width, comparison)
    return Group(*parts, *notes(data, records, comparison))


LOSS_COLUMN_WIDTH = 16
LOSS_CAPTION = ("{key} by epoch: the first cell's curve (▁ low … █ high); each other cell's relative |Δ| from it "
                "(· identical, ▁ <1e-14, each step up two decades, █ ≥1e-2)")


def _with_loss_column(res: Table, records: list[ResultRecord], comparison: Comparison,
                      data: list[dict[str, str]], cols: list[tuple[str, str]], out: Console | None) -> Table:
    """The Results table with a per-epoch loss column (:mod:`harness.spark`) where the terminal shows it whole.

    Only on a console that draws Unicode and is wide enough for the table with the column;
    otherwise, or when no cell has a loss history, the table as it was, silently.
    """
    if out is None or not (out.encoding or "").lower().startswith("utf") or out.is_dumb_terminal:
        return res
    from .spark import loss_columns

    histories = {r.cell: r.history for r in table_records(records) if r.ok}
    key, text = loss_columns(histories, comparison.first_cell, LOSS_COLUMN_WIDTH)
    if key is None or not any(text.values()):
        return res
    with_col = results_table([{**r, "loss_curve": text.get(r["cell"], "")} for r in data],
                             cols[:-1] + [("loss_curve", key.replace("_", " ") + "/epoch")] + cols[-1:])
    with_col.caption = LOSS_CAPTION.format(key=key.replace("_", " "))
    with_col.caption_justify = "left"
    return with_col if _fits(out, with_col) else res


def rows_of_members(records: list[ResultRecord]) -> list[dict[str, str]]:
    """Environment rows of the band members (where a band on its own was measured)."""
    return [{"cell": r.cell, **_env_summary(r)} for r in band_members(records)]


def notes(data: list[dict[str, str]], records: list[ResultRecord], comparison: Comparison) -> list[Text]:
    """The lines under the tables: why a cell failed or was skipped, warnings, the overall verdict."""
    parts: list[Text] = []
    for r in data:
        if r["verdict"] == Verdict.FAILED.value:
            parts.append(Text(f"✗ {r['cell']}: {r['reason']}", style="red"))
        elif r["verdict"] == Verdict.SKIPPED.value:
            parts.append(Text(f"- {r['cell']} skipped: {r['reason']}", style="dim"))
        elif r["verdict"] == Verdict.INCOMPLETE.value:
            parts.append(Text(f"… {r['cell']} incomplete: {r['reason']}", style="magenta"))
        elif r["verdict"] == Verdict.NOT_COMPARABLE.value:
            parts.append(Text(f"✗ {r['cell']} not comparable: {r['reason']}", style="red"))
    for w in warnings(records, comparison):
        parts.append(Text(f"! {w}", style="bold red"))
    for n in weights_notes(comparison) + archived_notes(records) + trace_notes(records) + objective_notes(records):
        parts.append(Text(f"- {n}", style="dim"))
    note = band_note(comparison)
    if note:
        parts.append(Text(note, style="cyan"))
    parts.append(summary_line(comparison))
    return parts


def print_report(out: Console, records: list[ResultRecord], comparison: Comparison, *,
                 trial_environment: Mapping[str, Any] | None = None, width: WidthFn | None = None,
                 parts_at: Mapping[str, str] | None = None, reused: Mapping[str, str] | None = None,
                 causes: Mapping[str, str] | None = None) -> None:
    """The tables, then the note lines unwrapped: a reason often ends in a command to copy whole."""
    group = renderable(records, comparison, out=out, trial_environment=trial_environment, width=width,
                       parts_at=parts_at, reused=reused, causes=causes)
    n = len(notes(rows(records, comparison), records, comparison))
    tables, lines = group.renderables[:-n], group.renderables[-n:]
    out.print(Group(*tables))
    for line in lines:
        out.print(line, soft_wrap=True)


# --------------------------------------------------------------------------- attribution


ATTRIBUTION_TITLE = ("Attribution (max |Δ| between cells that differ only in that axis, as measured; validation split)")
ATTRIBUTION_COLUMNS = [("axis", "axis"), ("values", "values"), ("pairs", "pairs"), ("val_loss", "val loss"),
                       ("r2", "max|ΔR²|"), ("mse", "max|ΔMSE|"), ("mae", "max|ΔMAE|"), ("weights", "weights"),
                       ("status", "status")]


def attribution_of(records: list[ResultRecord], width: WidthFn | None = None,
                   comparison: Comparison | None = None) -> Attribution | None:
    """The attribution to show: the comparison's own (harness.judge computed it), or, with an explicit
    ``width`` or no comparison, the one those widths give."""
    if width is None and comparison is not None:
        return comparison.attribution
    return judged_attribution(records, comparison.band if comparison is not None else None, width)


def _effect_row(e: AxisEffect) -> dict[str, str]:
    def metric(family: str) -> str:
        v = e.family_max(family)
        if v is None:
            return "—"
        ratio = e.family_ratio(family)
        return fmag(v) + (f" ({ratio:.2g} sd)" if ratio is not None else "")

    if e.status == CONFOUNDED:
        status = "confounded" + (f" with {', '.join(e.confounded_with)}" if e.confounded_with else "")
    elif e.status == NOT_ENOUGH:
        status = NOT_ENOUGH
    else:
        status = "run-to-run spread" if not e.values and e.pairs else e.status
    return {"axis": e.axis, "values": ", ".join(e.values) or "—", "pairs": str(len(e.pairs)) if e.pairs else "0",
            **{f: metric(f) for f in ("val_loss", "r2", "mse", "mae")},
            "weights": f"{e.weights_identical}/{e.weights_compared} bitwise" if e.weights_compared else "—",
            "status": status}


def attribution_rows(attr: Attribution) -> list[dict[str, str]]:
    """One row per axis that varies in these cells, then the pairs that differ in nothing measured."""
    out = [_effect_row(e) for e in attr.varying]
    if attr.same_environment is not None:
        out.append(_effect_row(attr.same_environment))
    return out


def attribution_notes(attr: Attribution) -> list[str]:
    """The axes the cells cannot say anything about, in one line, and pairs left out."""
    fixed = [e for e in attr.axes if e.status == NOT_ENOUGH]
    one = [f"{e.axis} {e.values[0]}" for e in fixed if e.values]
    none = [e.axis for e in fixed if not e.values]
    lines = []
    if one:
        lines.append("not enough cells (one value in these cells): " + ", ".join(one))
    if none:
        lines.append("not enough cells (applies to no cell, or not measured): " + ", ".join(none))
    if attr.uncertain_pairs:
        lines.append(f"{attr.uncertain_pairs} pair(s) left out: an axis was measured in one cell and not the other")
    if attr.with_width:
        lines.append("(N sd) = |Δ| in standard deviations of the seed band for that metric")
    return lines


def attribution_table(attr: Attribution) -> Table:
    t = Table(title=ATTRIBUTION_TITLE, box=box.SIMPLE_HEAD, title_justify="left")
    for key, head in ATTRIBUTION_COLUMNS:
        t.add_column(head, justify="right" if key in ("pairs", "val_loss", "r2", "mse", "mae") else "left",
                     no_wrap=True)
    for r in attribution_rows(attr):
        t.add_row(*(r[k] for k, _ in ATTRIBUTION_COLUMNS))
    return t


def _attribution_stacked(attr: Attribution) -> Group:
    return _stacked(ATTRIBUTION_TITLE, [(r["axis"], [(head, r[k]) for k, head in ATTRIBUTION_COLUMNS[1:]])
                                        for r in attribution_rows(attr)])


def attribution_parts(records: list[ResultRecord], out: Console | None, width: WidthFn | None = None,
                      comparison: Comparison | None = None) -> list[Any]:
    """The Attribution table (stacked when too wide) and its note lines; nothing below two ok cells."""
    attr = attribution_of(records, width, comparison)
    if attr is None:
        return []
    parts: list[Any] = []
    if attribution_rows(attr):
        table = attribution_table(attr)
        parts.append(table if _fits(out, table) else _attribution_stacked(attr))
    else:
        parts.append(Text(ATTRIBUTION_TITLE, style="italic", overflow="fold"))
    parts += [Text(f"  {line}", style="dim", overflow="fold") for line in attribution_notes(attr)]
    parts.append(Text(""))
    return parts


# --------------------------------------------------------------------------- Markdown and JSON


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown(records: list[ResultRecord], comparison: Comparison, *, bundle: str | None = None,
             trial_environment: Mapping[str, Any] | None = None, width: WidthFn | None = None,
             causes: Mapping[str, str] | None = None) -> str:
    """A compact report fit for a pull-request comment: verdict, environments, results, per-target detail."""
    data = rows(records, comparison)
    if causes:
        data = [{**r, "cause": causes.get(r["cell"], "—")} for r in data]
    of = f" `{_md_escape(bundle)}`" if bundle else ""
    lines = [f"### harness{of}: **{comparison.overall.value}** — {_md_escape(comparison.reason)}", ""]

    def table(cols: list[tuple[str, str]], body: list[dict[str, str]]) -> None:
        lines.append("| " + " | ".join(_md_escape(h) for _, h in cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
        for r in body:
            lines.append("| " + " | ".join(_md_escape(r[k]) for k, _ in cols) + " |")

    trial = trial_env_row(trial_environment)
    if trial:
        env_cols = [("cell", "cell"), ("where", "backend/image"), ("python", "python"), ("torch", "torch"),
                    ("cuda", "cuda"), ("device", "device"), ("threads", "thr"), ("isa", "isa")]
        lines += ["Environment (the trial as recorded, then each cell as measured)", ""]
        table(env_cols, [trial, *data])
        lines.append("")
    if data:
        lines += [RESULTS_TITLE, ""]
        cols = [("cell", "cell"), ("torch", "torch"), ("cuda", "cuda"), ("device", "device"), ("isa", "isa"),
                ("determinism", "determinism")] + result_columns(comparison)[1:]
        if causes:
            cols[-1:-1] = [("cause", "cause")]
        table(cols, data)
    members = member_rows(records)
    if members and not data:
        lines += [MEMBERS_TITLE, ""]
        table([(h, h) for h in MEMBER_COLUMNS], [dict(zip(MEMBER_COLUMNS, row)) for row in members])
    targets = per_target_rows(records, comparison)
    if targets:
        heads = ["cell", "target", *PER_TARGET_COLUMNS]
        lines += ["", PER_TARGET_TITLE, ""]
        table([(h, h) for h in heads], [dict(zip(heads, row)) for row in targets])
    band = comparison.band
    if band is not None and (band.ulp or band.seed):
        heads = list(BAND_COLUMNS + (SEED_COLUMNS if band.n_seed else ()))
        lines += ["", band_title(band), ""]
        table([(h, h) for h in heads], [dict(zip(heads, row)) for row in band_rows(band)])
    reps = repeat_rows(comparison)
    if reps:
        lines += ["", REPEATS_TITLE, ""]
        table([(h, h) for h in REPEAT_COLUMNS], [dict(zip(REPEAT_COLUMNS, row)) for row in reps])
    attr = attribution_of(records, width, comparison)
    if attr is not None:
        lines += ["", ATTRIBUTION_TITLE, ""]
        if attribution_rows(attr):
            table(ATTRIBUTION_COLUMNS, attribution_rows(attr))
            lines.append("")
        lines += [f"- {_md_escape(line)}" for line in attribution_notes(attr)]
    notes = [f"- `{r['cell']}` {r['verdict']}: {_md_escape(r['reason'])}" for r in data
             if r["verdict"] in (Verdict.FAILED.value, Verdict.SKIPPED.value, Verdict.INCOMPLETE.value,
                                 Verdict.NOT_COMPARABLE.value)]
    notes += [f"- {_md_escape(w)}" for w in legend_lines(comparison)]
    notes += [f"- {_md_escape(w)}" for w in beyond_lines(comparison)]
    notes += [f"- {_md_escape(w)}" for w in warnings(records, comparison)]
    notes += [f"- {_md_escape(n)}" for n in weights_notes(comparison) + archived_notes(records) + trace_notes(records)
              + objective_notes(records)]
    note = band_note(comparison)
    if note:
        notes.append(f"- {_md_escape(note)}")
    if notes:
        lines += ["", *notes]
    tol = comparison.tolerances or {}
    if tol:
        lines += ["", "Tolerances: " + ", ".join(f"{k} abs {v['abs']:g} rel {v['rel']:g}" for k, v in sorted(tol.items()))]
    return "\n".join(lines) + "\n"


def json_report(records: list[ResultRecord], comparison: Comparison, width: WidthFn | None = None,
                causes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    judged = {k: v for k, v in _jsonable(comparison).items() if k != "attribution"}  # kept beside it, below
    out = {"schema": REPORT_SCHEMA, "records": [r.to_dict() for r in records], "comparison": judged}
    if causes:  # why each cell parts from the first (harness.causes), where the evidence supports a class
        out["causes"] = dict(causes)
    attr = attribution_of(records, width, comparison)
    if attr is not None:
        out["attribution"] = _jsonable(attr)
    return out
