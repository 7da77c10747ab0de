"""Rendering records and their comparison: rich tables, Markdown, JSON.

Everything here consumes plain data (result records and the output of
``harness.compare.compare``); nothing here computes a verdict.
"""

from __future__ import annotations

import math
from statistics import fmean
from typing import Any, Iterable, Mapping

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

VERDICT_STYLE = {"reproduced": "bold green", "drifted": "bold yellow", "failed": "bold red", "unrecorded": "cyan"}


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


def _mean(d: Mapping[str, Any] | None) -> float | None:
    vals = [float(v) for v in (d or {}).values() if v is not None]
    return fmean(vals) if vals else None


def _max_abs(diffs: Mapping[str, Any], family: str | None = None, prefix: str = "") -> float | None:
    vals = [abs(v["diff"]) for k, v in diffs.items()
            if v.get("diff") is not None and k.startswith(prefix)
            and (family is None or k[len(prefix):].split("/", 1)[0] == family)]
    return max(vals) if vals else None


def _env_summary(rec: Mapping[str, Any]) -> dict[str, str]:
    env = rec.get("env") or {}
    det = rec.get("determinism") or {}
    flags = []
    if det:
        flags.append("det-algos" if det.get("deterministic_algorithms") else "nondet-algos")
        flags.append("cudnn-det" if det.get("cudnn_deterministic") else "cudnn-default")
        if det.get("matmul_allow_tf32"):
            flags.append("TF32")
        if det.get("CUBLAS_WORKSPACE_CONFIG"):
            flags.append("cublas-ws")
        if det.get("PYTHONHASHSEED") == "0":
            flags.append("hashseed0")
    image = rec.get("image") or {}
    where = rec.get("backend") or "?"
    if image.get("tag"):
        where = f"{where}:{image['tag']}"
    return {
        "where": where,
        "python": env.get("python") or "—",
        "torch": env.get("torch") or "—",
        "cuda": env.get("cuda") or "—",
        "cudnn": env.get("cudnn") or "—",
        "device": env.get("device") or "—",
        "driver": env.get("driver") or "—",
        "threads": str(env.get("threads") if env.get("threads") is not None else "—"),
        "determinism": (det.get("mode") or "—") + (f" ({', '.join(flags)})" if flags else ""),
    }


def _weights(cmp: Mapping[str, Any], is_first: bool) -> str:
    """Bitwise identity of the retrained best weights with the trial's and the first cell's."""
    parts = []
    vs_trial = cmp.get("weights_identical_to_recorded")
    if vs_trial is not None:
        parts.append("=trial" if vs_trial else "≠trial")
    vs_first = cmp.get("weights_identical_to_first")
    if not is_first and vs_first is not None:
        parts.append("=first" if vs_first else "≠first")
    return " ".join(parts) or "—"


# --------------------------------------------------------------------------- rows (plain data)


def rows(records: list[dict[str, Any]], comparison: Mapping[str, Any]) -> list[dict[str, str]]:
    """One row of display strings per cell; shared by the terminal and Markdown renderers."""
    out = []
    by_cell = {c["cell"]: c for c in comparison.get("cells", [])}
    first = comparison.get("first_cell")
    for rec in records:
        cmp = by_cell.get(rec.get("cell"), {})
        retrained = (rec.get("metrics") or {}).get("retrained") or {}
        val = retrained.get("val") or {}
        vs_rec = cmp.get("vs_recorded") or {}
        vs_first = cmp.get("vs_first") or {}
        arch = cmp.get("archived_inference") or {}
        row = {
            "cell": str(rec.get("cell")),
            **_env_summary(rec),
            "val_loss": fnum(retrained.get("val_loss")),
            "d_rec_loss": fdelta((vs_rec.get("val_loss") or {}).get("diff")),
            "r2": fnum(_mean(val.get("r2")), 5),
            "d_rec_r2": fdelta(_max_abs(vs_rec, "r2")),
            "mse": fnum(_mean(val.get("mse")), 5),
            "mae": fnum(_mean(val.get("mae")), 5),
            "d_first": "baseline" if rec.get("cell") == first else fdelta(_max_abs(vs_first)),
            "weights": _weights(cmp, rec.get("cell") == first),
            "d_archived": fdelta(_max_abs(arch)),
            "wall": f"{rec.get('wall_s'):.1f}s" if isinstance(rec.get("wall_s"), (int, float)) else "—",
            "verdict": cmp.get("verdict", "?"),
            "reason": cmp.get("reason", ""),
        }
        out.append(row)
    return out


ENV_COLUMNS = [("cell", "cell"), ("where", "backend/image"), ("python", "python"), ("torch", "torch"), ("cuda", "cuda"),
               ("cudnn", "cudnn"), ("device", "device"), ("driver", "driver"), ("threads", "thr"),
               ("determinism", "determinism")]
RESULT_COLUMNS = [("cell", "cell"), ("val_loss", "val loss"), ("d_rec_loss", "Δ rec"), ("r2", "R² val"),
                  ("d_rec_r2", "max|ΔR²| rec"), ("mse", "MSE val"), ("mae", "MAE val"), ("d_first", "max|Δ| first"),
                  ("weights", "weights"), ("d_archived", "archived Δ"), ("wall", "wall"), ("verdict", "verdict")]


def environment_table(data: list[dict[str, str]]) -> Table:
    t = Table(title="Environment (measured inside each run)", box=box.SIMPLE_HEAD, title_justify="left")
    for _, head in ENV_COLUMNS:
        t.add_column(head, overflow="fold")
    for r in data:
        t.add_row(*(r[k] for k, _ in ENV_COLUMNS))
    return t


def results_table(data: list[dict[str, str]]) -> Table:
    t = Table(title="Results (validation split, original units; Δ rec = vs trial_info.yaml, Δ first = vs first cell)",
              box=box.SIMPLE_HEAD, title_justify="left")
    for key, head in RESULT_COLUMNS:
        t.add_column(head, justify="left" if key in ("cell", "weights", "verdict") else "right", overflow="fold")
    for r in data:
        cells = [r[k] for k, _ in RESULT_COLUMNS]
        cells[-1] = Text(r["verdict"], style=VERDICT_STYLE.get(r["verdict"], ""))
        t.add_row(*cells)
    return t


def per_target_table(records: list[dict[str, Any]], comparison: Mapping[str, Any]) -> Table:
    t = Table(title="Per target (validation): value and Δ vs recorded", box=box.SIMPLE_HEAD, title_justify="left")
    for head in ("cell", "target", "R²", "ΔR² rec", "MSE", "ΔMSE rec", "MAE", "ΔMAE rec", "test R²"):
        t.add_column(head, justify="left" if head in ("cell", "target") else "right")
    by_cell = {c["cell"]: c for c in comparison.get("cells", [])}
    for rec in records:
        retrained = (rec.get("metrics") or {}).get("retrained") or {}
        val = retrained.get("val") or {}
        test = retrained.get("test") or {}
        vs_rec = (by_cell.get(rec.get("cell")) or {}).get("vs_recorded") or {}
        for target in (val.get("r2") or {}):
            def d(fam: str) -> str:
                return fdelta((vs_rec.get(f"{fam}/{target}") or {}).get("diff"))
            t.add_row(str(rec.get("cell")), target, fnum(val["r2"].get(target), 5), d("r2"),
                      fnum((val.get("mse") or {}).get(target), 5), d("mse"),
                      fnum((val.get("mae") or {}).get(target), 5), d("mae"),
                      fnum((test.get("r2") or {}).get(target), 5))
    return t


def warnings(records: Iterable[Mapping[str, Any]]) -> list[str]:
    out = []
    for rec in records:
        for w in rec.get("warnings") or []:
            out.append(f"{rec.get('cell')}: {w}")
        sc = rec.get("scaler") or {}
        if sc.get("refit_matches") is False:
            out.append(f"{rec.get('cell')}: the scaler refitted on the reproduced train split differs from the archived one "
                       f"(max |Δ| {sc.get('max_abs_diff'):.3g}): the split or the data did not reproduce")
    # the same warning from every cell is said once
    seen: dict[str, None] = {}
    for w in out:
        seen.setdefault(w, None)
    return list(seen)


def summary_line(comparison: Mapping[str, Any]) -> Text:
    cells = comparison.get("cells", [])
    counts: dict[str, int] = {}
    for c in cells:
        counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
    overall = comparison.get("overall", "?")
    detail = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
    return Text.assemble(("Overall: ", "bold"), (overall, VERDICT_STYLE.get(overall, "")), f"  ({detail}; {len(cells)} cells)")


def renderable(records: list[dict[str, Any]], comparison: Mapping[str, Any], *, per_target: bool = True) -> Group:
    data = rows(records, comparison)
    parts: list[Any] = [environment_table(data), results_table(data)]
    if per_target:
        parts.append(per_target_table(records, comparison))
    for r in data:
        if r["verdict"] == "failed":
            parts.append(Text(f"✗ {r['cell']}: {r['reason']}", style="red"))
    for w in warnings(records):
        parts.append(Text(f"! {w}", style="bold red"))
    parts.append(summary_line(comparison))
    return Group(*parts)


def print_report(console: Console, records: list[dict[str, Any]], comparison: Mapping[str, Any]) -> None:
    console.print(renderable(records, comparison))


# --------------------------------------------------------------------------- Markdown and JSON


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown(records: list[dict[str, Any]], comparison: Mapping[str, Any]) -> str:
    """A compact report fit for a pull-request comment."""
    data = rows(records, comparison)
    lines = [f"### harness: **{comparison.get('overall')}**", ""]
    cols = [("cell", "cell"), ("torch", "torch"), ("cuda", "cuda"), ("device", "device"), ("determinism", "determinism")] + RESULT_COLUMNS[1:]
    lines.append("| " + " | ".join(_md_escape(h) for _, h in cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in data:
        lines.append("| " + " | ".join(_md_escape(r[k]) for k, _ in cols) + " |")
    fails = [r for r in data if r["verdict"] == "failed"]
    notes = [f"- `{r['cell']}` failed: {_md_escape(r['reason'])}" for r in fails] + [f"- {_md_escape(w)}" for w in warnings(records)]
    if notes:
        lines += ["", *notes]
    tol = comparison.get("tolerances") or {}
    if tol:
        lines += ["", "Tolerances: " + ", ".join(f"{k} abs {v['abs']:g} rel {v['rel']:g}" for k, v in sorted(tol.items()))]
    return "\n".join(lines) + "\n"


def json_report(records: list[dict[str, Any]], comparison: Mapping[str, Any]) -> dict[str, Any]:
    return {"schema": "harness.report/1", "records": records, "comparison": dict(comparison)}
