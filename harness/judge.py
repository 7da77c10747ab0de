"""Comparison and verdicts: pure functions of result records.

Plain data in, plain data out (as in dvc's metric diff): flatten each record's
metrics into ``{"val_loss": x, "r2/target": x, ...}``, diff two such maps
into ``{key: {"old", "new", "diff", "rel", "ok"}}``, and turn diffs into a
verdict with per-metric tolerances. Rendering lives in harness.report.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import InputError

FAMILIES = ("val_loss", "r2", "mse", "mae")

REPRODUCED = "reproduced"
DRIFTED = "drifted"
FAILED = "failed"
UNRECORDED = "unrecorded"  # ran fine; no trial_info.yaml to judge against


@dataclass(frozen=True)
class Tol:
    abs: float = 0.0
    rel: float = 0.0

    def allows(self, old: float, new: float) -> bool:
        if math.isnan(old) or math.isnan(new):
            return math.isnan(old) and math.isnan(new)
        return abs(new - old) <= self.abs + self.rel * abs(old)


# Defaults: a rerun in the same environment is expected to match to the last
# bit; these leave room for the reduction-order noise of another library build
# while flagging anything a researcher would call a different result.
DEFAULT_TOLERANCES: dict[str, Tol] = {
    "val_loss": Tol(abs=1e-6, rel=1e-3),
    "r2": Tol(abs=1e-3, rel=0.0),
    "mse": Tol(abs=1e-8, rel=1e-3),
    "mae": Tol(abs=1e-8, rel=1e-3),
}


@dataclass
class Tolerances:
    by_family: dict[str, Tol] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))

    def for_key(self, key: str) -> Tol:
        return self.by_family.get(key.split("/", 1)[0], Tol())

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {k: asdict(v) for k, v in self.by_family.items()}


def parse_tolerance(text: str, base: Tolerances | None = None, where: str = "--tol") -> Tolerances:
    """``r2=abs:1e-4`` or ``mse=rel:0.01,abs:0`` or ``r2=1e-4`` (absolute)."""
    tol = Tolerances(dict((base or Tolerances()).by_family))
    if "=" not in text:
        raise InputError(where, f"{text!r} is not METRIC=abs:X[,rel:Y]", hint="write e.g. --tol r2=abs:1e-4")
    fam, spec = text.split("=", 1)
    fam = fam.strip()
    if fam not in FAMILIES:
        raise InputError(where, f"unknown metric {fam!r}", hint=f"use one of {', '.join(FAMILIES)}")
    cur = asdict(tol.by_family.get(fam, Tol()))
    for part in spec.split(","):
        part = part.strip()
        kind, _, val = part.partition(":") if ":" in part else ("abs", "", part)
        if kind not in ("abs", "rel"):
            raise InputError(where, f"{text!r}: {kind!r} is neither abs nor rel", hint="write e.g. --tol r2=abs:1e-4")
        try:
            v = float(val)
        except ValueError:
            raise InputError(where, f"{text!r}: {val!r} is not a number", hint="write e.g. --tol r2=abs:1e-4") from None
        if not (v >= 0 and math.isfinite(v)):
            raise InputError(where, f"{text!r}: tolerances must be finite and >= 0")
        cur[kind] = v
    tol.by_family[fam] = Tol(**cur)
    return tol


def load_tolerances(path: str | Path, base: Tolerances | None = None) -> Tolerances:
    """A YAML file ``{r2: {abs: 1e-4}, mse: {rel: 0.01}}``."""
    from .bundle import load_yaml

    data = load_yaml(Path(path), str(path))
    tol = Tolerances(dict((base or Tolerances()).by_family))
    if not isinstance(data, Mapping):
        raise InputError(str(path), "must map metric names to {abs: X, rel: Y}", hint="write e.g. `r2: {abs: 0.001}`")
    for fam, spec in data.items():
        if fam not in FAMILIES:
            raise InputError(str(path), f"unknown metric {fam!r}", hint=f"use one of {', '.join(FAMILIES)}")
        if not isinstance(spec, Mapping) or not set(spec) <= {"abs", "rel"}:
            raise InputError(str(path), f"{fam} must be a mapping with abs and/or rel", hint="write e.g. `r2: {abs: 0.001}`")
        cur = asdict(tol.by_family.get(fam, Tol()))
        for k, v in spec.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise InputError(str(path), f"{fam}.{k} must be a number >= 0, got {v!r}")
            cur[k] = float(v)
        tol.by_family[fam] = Tol(**cur)
    return tol


# --------------------------------------------------------------------------- flattening


def flatten_split(metrics: Mapping[str, Any] | None, split: str = "val") -> dict[str, float]:
    """``{"val_loss": .., "r2/t": .., "mse/t": .., "mae/t": ..}`` of one evaluation."""
    if not metrics:
        return {}
    out: dict[str, float] = {}
    if metrics.get("val_loss") is not None:
        out["val_loss"] = float(metrics["val_loss"])
    per = metrics.get(split) or {}
    for fam in ("r2", "mse", "mae"):
        for target, v in (per.get(fam) or {}).items():
            if v is not None:
                out[f"{fam}/{target}"] = float(v)
    return out


def flatten_recorded(recorded: Mapping[str, Any] | None) -> dict[str, float]:
    """The recorded trial in the same shape (its metrics are on the validation split)."""
    if not recorded:
        return {}
    out: dict[str, float] = {}
    if recorded.get("value") is not None:
        out["val_loss"] = float(recorded["value"])
    for fam in ("r2", "mse", "mae"):
        for target, v in (recorded.get(fam) or {}).items():
            out[f"{fam}/{target}"] = float(v)
    return out


def diff(old: Mapping[str, float], new: Mapping[str, float], tol: Tolerances | None = None) -> dict[str, dict[str, Any]]:
    """Keys present in ``old`` compared with ``new``: old, new, diff, rel, ok."""
    tol = tol or Tolerances()
    out: dict[str, dict[str, Any]] = {}
    for key, o in old.items():
        n = new.get(key)
        if n is None:
            out[key] = {"old": o, "new": None, "diff": None, "rel": None, "ok": False}
            continue
        d = n - o
        rel = (d / abs(o)) if o not in (0.0,) and math.isfinite(o) else None
        out[key] = {"old": o, "new": n, "diff": d, "rel": rel, "ok": tol.for_key(key).allows(o, n)}
    return out


def delta_vs_recorded(metrics: Mapping[str, Any], recorded: Mapping[str, Any] | None, tol: Tolerances | None = None) -> dict[str, Any]:
    """What the worker stores in a record: retrained val metrics against the trial."""
    if not recorded:
        return {}
    return diff(flatten_recorded(recorded), flatten_split(metrics.get("retrained"), "val"), tol)


def max_abs(d: Mapping[str, Mapping[str, Any]], family: str) -> float | None:
    vals = [abs(v["diff"]) for k, v in d.items() if k.split("/", 1)[0] == family and v.get("diff") is not None]
    return max(vals) if vals else None


# --------------------------------------------------------------------------- the comparison


@dataclass
class CellComparison:
    cell: str
    status: str  # ok | error
    verdict: str  # reproduced | drifted | failed | unrecorded
    reason: str
    vs_recorded: dict[str, Any]
    vs_first: dict[str, Any]
    vs_first_ok: bool | None
    weights_identical_to_first: bool | None
    weights_identical_to_recorded: bool | None
    archived_inference: dict[str, Any]  # archived best weights evaluated here, vs recorded
    out_of_tolerance: list[str]


def _both(a: Any, b: Any) -> bool | None:
    if a is None or b is None:
        return None
    return a == b


def compare(records: list[dict[str, Any]], tol: Tolerances | None = None) -> dict[str, Any]:
    """Judge every record against the recorded trial and against the first successful cell."""
    tol = tol or Tolerances()
    first = next((r for r in records if r.get("status") == "ok"), None)
    first_flat = flatten_split((first or {}).get("metrics", {}).get("retrained"), "val") if first else {}
    first_test = flatten_split((first or {}).get("metrics", {}).get("retrained"), "test") if first else {}
    rows: list[CellComparison] = []
    for rec in records:
        cell = rec.get("cell", "?")
        if rec.get("status") != "ok":
            err = rec.get("error") or {}
            rows.append(CellComparison(cell, "error", FAILED, err.get("message", "failed"), {}, {}, None, None, None, {}, []))
            continue
        retrained = rec.get("metrics", {}).get("retrained")
        flat = flatten_split(retrained, "val")
        recorded = rec.get("recorded")
        vs_rec = diff(flatten_recorded(recorded), flat, tol) if recorded else {}
        vs_first: dict[str, Any] = {}
        vs_first_ok = None
        if first is not None and rec is not first:
            vs_first = diff(first_flat, flat, tol)
            vs_first.update({f"test:{k}": v for k, v in diff(first_test, flatten_split(retrained, "test"), tol).items()})
            vs_first_ok = all(v["ok"] for v in vs_first.values())
        elif rec is first:
            vs_first_ok = True
        archived = rec.get("metrics", {}).get("archived")
        arch = diff(flatten_recorded(recorded), flatten_split(archived, "val"), tol) if (recorded and archived) else {}
        bad = [k for k, v in vs_rec.items() if not v["ok"]]
        if recorded and vs_rec:
            verdict = DRIFTED if bad else REPRODUCED
            reason = f"{len(bad)} of {len(vs_rec)} recorded metrics outside tolerance" if bad else f"all {len(vs_rec)} recorded metrics within tolerance"
        elif recorded:
            verdict, reason = UNRECORDED, "trial_info.yaml records no metric this run produces"
        else:
            verdict, reason = UNRECORDED, "no trial_info.yaml: nothing recorded to compare with"
            if vs_first_ok is False:
                verdict, reason = DRIFTED, "differs from the first cell beyond tolerance"
                bad = [k for k, v in vs_first.items() if not v["ok"]]
        rows.append(CellComparison(
            cell=cell, status="ok", verdict=verdict, reason=reason, vs_recorded=vs_rec, vs_first=vs_first,
            vs_first_ok=vs_first_ok,
            weights_identical_to_first=_both(rec.get("weights_sha256"), (first or {}).get("weights_sha256")),
            weights_identical_to_recorded=_both(rec.get("weights_sha256"), (recorded or {}).get("weights_sha256")),
            archived_inference=arch, out_of_tolerance=bad,
        ))
    verdicts = [r.verdict for r in rows]
    if FAILED in verdicts:
        overall = FAILED
    elif DRIFTED in verdicts:
        overall = DRIFTED
    elif verdicts and all(v == REPRODUCED for v in verdicts):
        overall = REPRODUCED
    else:
        overall = UNRECORDED if verdicts else FAILED
    return {
        "schema": "harness.comparison/1",
        "first_cell": first.get("cell") if first else None,
        "tolerances": tol.to_dict(),
        "overall": overall,
        "cells": [asdict(r) for r in rows],
    }


def exit_code(comparison: Mapping[str, Any]) -> int:
    """0 reproduced (or nothing to judge), 1 a run failed, 3 drifted."""
    from .errors import EXIT_DRIFTED, EXIT_OK, EXIT_RUN_FAILED

    overall = comparison.get("overall")
    if overall == FAILED:
        return EXIT_RUN_FAILED
    if overall == DRIFTED:
        return EXIT_DRIFTED
    return EXIT_OK


def merge(groups: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Concatenate record lists from several machines, keeping cell names unique."""
    seen: dict[str, int] = {}
    out = []
    for group in groups:
        for rec in group:
            rec = dict(rec)
            name = rec.get("cell", "?")
            if name in seen:
                seen[name] += 1
                rec["cell"] = f"{name}@{(rec.get('env') or {}).get('hostname') or seen[name]}"
            else:
                seen[name] = 0
            out.append(rec)
    return out
