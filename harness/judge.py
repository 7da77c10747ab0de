"""Verdicts: pure functions of typed result records.

Plain data in, plain data out (as in dvc's metric diff): flatten each record's
metrics into ``{"val_loss": x, "r2/target": x, ...}``, diff two such maps
into ``{key: MetricDiff(old, new, diff, rel, ok)}``, and turn the diffs into a
:class:`Verdict` per cell and overall with per-metric tolerances. This is the
only module that judges; workers measure, :mod:`harness.report` renders.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import InputError
from .record import RecordSet, ResultRecord, Status

FAMILIES = ("val_loss", "r2", "mse", "mae")



class Verdict(str, enum.Enum):
    """What a cell (or the whole run) says about reproduction."""

    REPRODUCED = "reproduced"  # every recorded metric within tolerance
    DRIFTED = "drifted"  # ran, and at least one metric is outside tolerance
    UNRECORDED = "unrecorded"  # ran fine; nothing recorded to judge against
    FAILED = "failed"  # did not produce metrics: build, container, trainer ...
    SKIPPED = "skipped"  # this host cannot run it; does not fail the run
    INCOMPLETE = "incomplete"  # interrupted, or planned and never recorded; never "reproduced"
    NOT_COMPARABLE = "not comparable"  # trained on other data than the trial (digest mismatch)

    def __str__(self) -> str:
        return self.value


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
    if _number(metrics.get("val_loss")):
        out["val_loss"] = float(metrics["val_loss"])
    per = metrics.get(split) or {}
    if not isinstance(per, Mapping):
        return out
    for fam in ("r2", "mse", "mae"):
        values = per.get(fam) or {}
        if not isinstance(values, Mapping):
            continue
        for target, v in values.items():
            if _number(v):
                out[f"{fam}/{target}"] = float(v)
    return out


def _number(v: Any) -> bool:
    """A metric value that can be judged: a number that is not bool (None, text ... are missing)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def flatten_recorded(recorded: Mapping[str, Any] | None) -> dict[str, float]:
    """The recorded trial in the same shape (its metrics are on the validation split)."""
    if not recorded:
        return {}
    out: dict[str, float] = {}
    if _number(recorded.get("value")):
        out["val_loss"] = float(recorded["value"])
    for fam in ("r2", "mse", "mae"):
        values = recorded.get(fam) or {}
        if not isinstance(values, Mapping):
            continue
        for target, v in values.items():
            if _number(v):  # a recorded null (written for NaN) is nothing to compare with
                out[f"{fam}/{target}"] = float(v)
    return out


AGGREGATE = "*"  # the target name of a metric over all targets (one number); see README


def with_aggregates(flat: Mapping[str, float], wanted: Iterable[str]) -> dict[str, float]:
    """``flat`` plus ``fam/*`` for each wanted aggregate it lacks but has per-target values of.

    The aggregate is the mean over targets: scikit-learn's default
    (``multioutput="uniform_average"``) for r2_score, mean_squared_error and
    mean_absolute_error, which is how a single recorded number is usually computed.
    """
    out = dict(flat)
    for key in wanted:
        fam, _, target = key.partition("/")
        if target != AGGREGATE or key in out or fam not in ("r2", "mse", "mae"):
            continue
        values = [v for k, v in flat.items() if k.startswith(fam + "/") and k != key]
        if values:
            out[key] = sum(values) / len(values)
    return out


@dataclass(frozen=True)
class MetricDiff:
    """One metric of a cell against a reference: ``new - old`` and whether tolerance allows it."""

    old: float
    new: float | None
    diff: float | None
    rel: float | None
    ok: bool


def diff(old: Mapping[str, float], new: Mapping[str, float], tol: Tolerances | None = None) -> dict[str, MetricDiff]:
    """Keys present in ``old`` compared with ``new``; a key ``new`` lacks is not ok."""
    tol = tol or Tolerances()
    out: dict[str, MetricDiff] = {}
    for key, o in old.items():
        n = new.get(key)
        if n is None or not math.isfinite(n):  # missing, or NaN/inf: never within tolerance
            out[key] = MetricDiff(o, n, None, None, False)
            continue
        d = n - o
        rel = (d / abs(o)) if o != 0.0 and math.isfinite(o) else None
        out[key] = MetricDiff(o, n, d, rel, tol.for_key(key).allows(o, n))
    return out


def max_abs(diffs: Mapping[str, MetricDiff], family: str | None = None, prefix: str = "") -> float | None:
    """The largest |diff| among keys of ``family`` (all when None) that start with ``prefix``."""
    vals = [abs(v.diff) for k, v in diffs.items()
            if v.diff is not None and k.startswith(prefix)
            and (family is None or k[len(prefix):].split("/", 1)[0] == family)]
    return max(vals) if vals else None


def data_mismatches(rec: ResultRecord) -> list[str]:
    """One line per digest the bundle records for the data that the data the run read does not match."""
    if not rec.data_sha256:
        return []
    return [f"DATA MISMATCH: {source} is {want[:12]}..., but the data file hashes to {rec.data_sha256[:12]}...; "
            "this is not the data the trial was trained on"
            for source, want in sorted(rec.expected_data_sha256.items()) if want != rec.data_sha256]


# --------------------------------------------------------------------------- the comparison


@dataclass
class CellJudgement:
    cell: str
    status: Status
    verdict: Verdict
    reason: str
    vs_recorded: dict[str, MetricDiff] = field(default_factory=dict)
    vs_first: dict[str, MetricDiff] = field(default_factory=dict)  # keys "test:..." compare the test split
    vs_first_ok: bool | None = None
    weights_identical_to_first: bool | None = None
    weights_identical_to_recorded: bool | None = None
    archived_inference: dict[str, MetricDiff] = field(default_factory=dict)  # archived weights evaluated here vs recorded
    out_of_tolerance: list[str] = field(default_factory=list)
    unmatched_recorded: list[str] = field(default_factory=list)  # recorded metrics this run produced nothing to compare with
    weights_vs_archived: dict[str, Any] | None = None  # the retrained best weights vs weights/best.pt, tensor by tensor
    user_weights_identical_to_recorded: bool | None = None  # the trainer's own digest vs trial_info's, its convention


@dataclass
class Comparison:
    """Every cell judged, the overall verdict, and what is missing."""

    overall: Verdict
    reason: str
    first_cell: str | None
    tolerances: dict[str, dict[str, float]]
    cells: list[CellJudgement]
    missing: list[str] = field(default_factory=list)  # planned cells that left no record
    warnings: list[str] = field(default_factory=list)
    schema: str = "harness.comparison/2"

    def cell(self, name: str) -> CellJudgement | None:
        return next((c for c in self.cells if c.cell == name), None)

    def counts(self) -> dict[Verdict, int]:
        out: dict[Verdict, int] = {}
        for c in self.cells:
            out[c.verdict] = out.get(c.verdict, 0) + 1
        if self.missing:
            out[Verdict.INCOMPLETE] = out.get(Verdict.INCOMPLETE, 0) + len(self.missing)
        return out


def _both(a: Any, b: Any) -> bool | None:
    if a is None or b is None:
        return None
    return a == b


def _not_run(rec: ResultRecord) -> CellJudgement:
    message = rec.error.message if rec.error else rec.status.value
    verdict = {Status.SKIPPED: Verdict.SKIPPED, Status.INTERRUPTED: Verdict.INCOMPLETE,
               Status.TIMEOUT: Verdict.FAILED}.get(rec.status, Verdict.FAILED)  # a timeout fails: it hung
    return CellJudgement(rec.cell, rec.status, verdict, message)


def _not_comparable(judged: CellJudgement, rec: ResultRecord) -> CellJudgement:
    """The cell trained on other data than the trial: its metrics say nothing about reproduction."""
    wants = ", ".join(f"{source} {want[:12]}..." for source, want in sorted(rec.expected_data_sha256.items())
                      if want != rec.data_sha256)
    reason = (f"trained on other data than the trial: the data hashes to {(rec.data_sha256 or '')[:12]}..., "
              f"the bundle records {wants}; pass --allow-data-change to judge it anyway")
    return dataclasses.replace(judged, verdict=Verdict.NOT_COMPARABLE, reason=reason)


def _judge_ok(rec: ResultRecord, first: ResultRecord | None, tol: Tolerances) -> CellJudgement:
    flat = flatten_split(rec.retrained, "val")
    recorded = rec.recorded
    wanted = flatten_recorded(recorded)
    produced = with_aggregates(flat, wanted)
    unmatched = sorted(k for k in wanted if k not in produced)
    vs_rec = diff({k: v for k, v in wanted.items() if k in produced}, produced, tol) if recorded else {}
    vs_first: dict[str, MetricDiff] = {}
    vs_first_ok: bool | None = None
    if first is not None and rec is not first:
        vs_first = diff(flatten_split(first.retrained, "val"), flat, tol)
        vs_first.update({f"test:{k}": v for k, v in diff(flatten_split(first.retrained, "test"),
                                                          flatten_split(rec.retrained, "test"), tol).items()})
        vs_first_ok = all(v.ok for v in vs_first.values())
    elif rec is first:
        vs_first_ok = True
    archived = rec.archived
    user = rec.user_weights or {}
    arch_flat = with_aggregates(flatten_split(archived, "val"), wanted) if archived else {}
    arch = diff({k: v for k, v in wanted.items() if k in arch_flat}, arch_flat, tol) if (recorded and archived) else {}
    bad = [k for k, v in vs_rec.items() if not v.ok]
    if recorded and vs_rec:
        verdict = Verdict.DRIFTED if bad else Verdict.REPRODUCED
        reason = (f"{len(bad)} of {len(vs_rec)} recorded metrics outside tolerance" if bad
                  else f"all {len(vs_rec)} recorded metrics within tolerance")
    elif recorded:
        verdict, reason = Verdict.UNRECORDED, "trial_info.yaml records no metric this run produces"
    else:
        verdict, reason = Verdict.UNRECORDED, "no trial_info.yaml: nothing recorded to compare with"
        if vs_first_ok is False:
            verdict, reason = Verdict.DRIFTED, "differs from the first cell beyond tolerance"
            bad = [k for k, v in vs_first.items() if not v.ok]
    return CellJudgement(
        cell=rec.cell, status=rec.status, verdict=verdict, reason=reason, vs_recorded=vs_rec, vs_first=vs_first,
        vs_first_ok=vs_first_ok,
        weights_identical_to_first=_both(rec.weights_sha256, first.weights_sha256 if first else None),
        # a trainer that returns its own digest tells us trial_info's digest is in its convention, not ours
        weights_identical_to_recorded=(None if user.get("sha256") else
                                       _both(rec.weights_sha256, (recorded or {}).get("weights_sha256"))),
        archived_inference=arch, out_of_tolerance=bad, unmatched_recorded=unmatched,
        weights_vs_archived=rec.weights_vs_archived, user_weights_identical_to_recorded=user.get("identical_to_recorded"),
    )


def _overall(cells: list[CellJudgement], missing: list[str]) -> tuple[Verdict, str]:
    verdicts = [c.verdict for c in cells]
    ran = [v for v in verdicts if v not in (Verdict.SKIPPED, Verdict.FAILED, Verdict.INCOMPLETE)]
    n_skip = verdicts.count(Verdict.SKIPPED)
    skipped = f"; {n_skip} skipped" if n_skip else ""
    if Verdict.FAILED in verdicts:
        return Verdict.FAILED, f"{verdicts.count(Verdict.FAILED)} cell(s) failed{skipped}"
    incomplete = verdicts.count(Verdict.INCOMPLETE) + len(missing)
    if incomplete:
        return Verdict.INCOMPLETE, f"{incomplete} cell(s) interrupted or never recorded{skipped}"
    if Verdict.NOT_COMPARABLE in verdicts:
        return Verdict.NOT_COMPARABLE, (f"{verdicts.count(Verdict.NOT_COMPARABLE)} cell(s) trained on other data than "
                                        f"the trial (data digest mismatch); pass --allow-data-change to judge "
                                        f"them anyway{skipped}")
    if not ran:
        return Verdict.INCOMPLETE, (f"no cell ran: all {n_skip} were skipped on this host" if n_skip else "no cell ran")
    if Verdict.DRIFTED in verdicts:
        return Verdict.DRIFTED, f"{verdicts.count(Verdict.DRIFTED)} of {len(ran)} cell(s) drifted{skipped}"
    if all(v is Verdict.REPRODUCED for v in ran):
        return Verdict.REPRODUCED, f"{len(ran)} cell(s) reproduced{skipped}"
    return Verdict.UNRECORDED, f"{len(ran)} cell(s) ran, nothing recorded to judge against{skipped}"


def split_mismatch(rec: ResultRecord) -> str | None:
    """The warning for a trainer whose reported split is not the seeded one (record ``split.reported``)."""
    split = rec.split or {}
    rep = split.get("reported") or {}
    if rep.get("matches") is not False:
        return None
    first = rep.get("first_difference")
    names = ("train", "val", "test")
    i = names.index(first) if first in names else None
    sizes = ""
    if i is not None and isinstance(rep.get("sizes"), list) and isinstance(split.get("sizes"), list):
        sizes = f" ({rep['sizes'][i]} vs {split['sizes'][i]} samples)"
    how = {"ctx.split": "the split ctx.split handed out"}.get(split.get("source"),
                                                            "the split re-derived from data.split and training.seed")
    order = "; same samples in another order" if rep.get("same_samples") else ""
    return f"the split the trainer reported differs from {how}, first in {first}{sizes}{order}"


def compare(records: list[ResultRecord], tol: Tolerances | None = None, missing: Iterable[str] = (),
            allow_data_change: bool = False) -> Comparison:
    """Judge every record against the recorded trial and against the first cell that ran.

    Skipped cells are ``skipped`` and do not fail the run; interrupted cells and
    ``missing`` ones (planned, never recorded) make the run ``incomplete``. A cell
    whose data does not match the digest the bundle records is ``not comparable``
    unless ``allow_data_change`` (then it is judged, and the mismatch is a warning).
    """
    tol = tol or Tolerances()
    first = next((r for r in records if r.ok), None)
    cells = []
    for r in records:
        judged = _judge_ok(r, first, tol) if r.ok else _not_run(r)
        if r.ok and not allow_data_change and data_mismatches(r):
            judged = _not_comparable(judged, r)
        cells.append(judged)
    missing = [m for m in missing if m not in {r.cell for r in records}]
    overall, reason = _overall(cells, missing)
    warnings: dict[str, None] = {}
    for r in records:
        for w in data_mismatches(r):
            warnings.setdefault(f"{r.cell}: {w}", None)
    for r in records:
        w = split_mismatch(r)
        if w:
            warnings.setdefault(f"{r.cell}: {w}", None)
    for c in cells:
        if c.unmatched_recorded:
            warnings.setdefault(f"{c.cell}: trial_info.yaml records {', '.join(c.unmatched_recorded)}, which this run "
                                "does not produce: not compared", None)
    return Comparison(overall=overall, reason=reason, first_cell=first.cell if first else None,
                      tolerances=tol.to_dict(), cells=cells, missing=missing, warnings=list(warnings))


def merge(sets: Iterable[RecordSet]) -> RecordSet:
    """Concatenate record sets from several places, keeping cell names unique."""
    seen: dict[str, int] = {}
    out: list[ResultRecord] = []
    missing: list[str] = []
    for rs in sets:
        for rec in rs.records:
            name = rec.cell
            if name in seen:
                seen[name] += 1
                rec = dataclasses.replace(rec, cell=f"{name}@{rec.env.hostname or seen[name]}")
            else:
                seen[name] = 0
            out.append(rec)
        missing.extend(rs.missing)
    return RecordSet(out, missing, ", ".join(rs.source for rs in sets), [w for rs in sets for w in rs.warnings])
