"""Verdicts: pure functions of typed result records.

Plain data in, plain data out (as in dvc's metric diff): flatten each record's
metrics into ``{"val_loss": x, "r2/target": x, ...}``, diff two such maps into
``{key: MetricDiff(old, new, diff, rel, ok)}``, and put every cell on the verdict
ladder (:mod:`harness.ladder`) against its reference: the recorded trial, else the
first cell. The bands a run measured are the yardsticks; explicit tolerances are a
user's gate on top. This is the only module that judges; workers measure,
:mod:`harness.report` renders. docs/verdicts.md says how a verdict is reached.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from . import band as band_mod
from . import stats
from .band import Band
from .errors import InputError
from .ladder import CellRung, Rung, Yardsticks, climb, noise_limit_for
from .attribution import Attribution, attribute
from .record import BandKind, RecordSet, ResultRecord, Status, WeightsDiff, flatten_split

FAMILIES = ("val_loss", "r2", "mse", "mae")
TRIAL = "recorded trial"


class Verdict(str, enum.Enum):
    """What a cell (or the whole run) says about reproduction."""

    REPRODUCED = "reproduced"  # bitwise, numerically equal or same distribution as the recorded trial
    DRIFTED = "drifted"  # outside the seed band's prediction interval at α (or outside an explicit --tol)
    UNJUDGED = "not judged"  # beyond numerical noise, and no seed band to say whether it matters
    UNRECORDED = "unrecorded"  # ran fine; nothing recorded to judge against (judged against the first cell)
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


@dataclass
class Tolerances:
    """Explicit tolerances (``--tol``, ``--tolerances``): a user's gate, per metric family.

    There are none by default: a tolerance cannot say whether a difference is larger than what
    training does to itself, so the bands judge (:mod:`harness.ladder`). A family given one here
    gates on top of the ladder: a cell outside it is ``drifted`` whatever the bands say.
    """

    by_family: dict[str, Tol] = field(default_factory=dict)

    def gate(self, key: str) -> Tol | None:
        """The tolerance set for ``key``'s family, or None (no gate)."""
        return self.by_family.get(key.split("/", 1)[0])

    def for_key(self, key: str) -> Tol:
        return self.gate(key) or Tol()

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


def _number(v: Any) -> bool:
    """A metric value that can be judged: a number that is not bool (None, text ... are missing)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def flatten_recorded(recorded: Mapping[str, Any] | None, value_at: str | None = "val_loss") -> dict[str, float]:
    """The recorded trial in the same shape (its metrics are on the validation split).

    ``value_at``: the flat key the trial's objective ``value`` is compared as (:func:`value_key`; None:
    not compared). A metric trial_info.yaml records itself under that key stays as recorded.
    """
    if not recorded:
        return {}
    out: dict[str, float] = {}
    for fam in ("r2", "mse", "mae"):
        values = recorded.get(fam) or {}
        if not isinstance(values, Mapping):
            continue
        for target, v in values.items():
            if _number(v):  # a recorded null (written for NaN) is nothing to compare with
                out[f"{fam}/{target}"] = float(v)
    if value_at is not None and _number(recorded.get("value")):
        out.setdefault(value_at, float(recorded["value"]))
    return out


OBJECTIVE_NOTE = ("trial_info.yaml's value was not compared: the trainer returns no val_loss, and config.yaml does "
                  "not say which metric the value is; declare it, e.g. trainer: {objective: val.mse}")


def objective_of(rec: ResultRecord) -> str | None:
    """Which metric trial_info.yaml's ``value`` is for this record: ``val_loss`` for the reference trainer (the
    seed document defines it so), a custom trainer's ``trainer.objective``, or None when it declared none."""
    if rec.trainer is None:
        return "val_loss"
    objective = rec.trainer.get("objective") if isinstance(rec.trainer, Mapping) else None
    return objective if isinstance(objective, str) else None


def value_key(objective: str | None, produced: Mapping[str, float] | None) -> tuple[str | None, str | None]:
    """The flat key (``val_loss``, ``mse/*``, ``test:r2/a``) the trial's value is compared as, and the warning
    when the declared objective names no metric of ``produced`` (None: the value is not compared) (pure).

    Undeclared (None): ``val_loss`` when the run produced it (a trainer's val_loss, loss, best_val_loss or
    objective), else nothing, without a warning (the report's note says how to declare it). A declared
    metric without a target takes the run's aggregate ``*`` or its one target. ``produced`` None: keys only.
    """
    from .bundle import objective_parts

    if objective == "val_loss" or (objective is None and (produced is None or "val_loss" in produced)):
        return "val_loss", None
    if objective is None:
        return None, None
    parts = objective_parts(objective)
    if parts is None:  # a record from elsewhere: the worker validated its own
        return None, f"trainer.objective {objective!r} is not a metric path: trial_info.yaml's value was not compared"
    split, metric, target = parts
    prefix = "test:" if split == "test" else ""
    if target is not None or produced is None:
        key = f"{prefix}{metric}/{target if target is not None else AGGREGATE}"
        if produced is None or key in produced:
            return key, None
        return None, (f"trainer.objective {objective} names {split} {metric}"
                      f"{f' of target {target}' if target is not None else ''}, which this run does not produce: "
                      "trial_info.yaml's value was not compared")
    targets = sorted(k.split("/", 1)[1] for k in produced if k.startswith(f"{prefix}{metric}/"))
    if AGGREGATE in targets or len(targets) == 1:
        return f"{prefix}{metric}/{AGGREGATE if AGGREGATE in targets else targets[0]}", None
    if not targets:
        return None, (f"trainer.objective {objective} names {split} {metric}, which this run does not produce: "
                      "trial_info.yaml's value was not compared")
    return None, (f"trainer.objective {objective} names no single metric: the run has {split} {metric} for "
                  f"{', '.join(targets[:4])}{' ...' if len(targets) > 4 else ''}; name one, e.g. "
                  f"{objective}.{targets[0]}: trial_info.yaml's value was not compared")


def judged_values(rec: ResultRecord) -> tuple[dict[str, float], dict[str, float], str | None, str | None]:
    """The recorded trial flat (its value at the record's objective), what the run produced to compare with
    (validation metrics, and test metrics as ``test:...`` when the objective is a test metric), the key the
    value is compared as, and the warning when the declared objective cannot be compared."""
    flat = flatten_split(rec.retrained, "val")
    test = {f"test:{k}": v for k, v in flatten_split(rec.retrained, "test").items()}
    objective = objective_of(rec)
    # A metric the run produced as NaN or infinity is produced (and judged: never within a band), not
    # missing: a val_loss of nan must not make trial_info.yaml's value "not compared".
    bad = {**{k: math.nan for k in nonfinite_keys(rec)}, **{f"test:{k}": math.nan for k in nonfinite_keys(rec, "test")}}
    at, problem = value_key(objective, {**bad, **flat, **test})
    if at is not None and at.startswith("test:") and at in test:
        flat = {**flat, at: test[at]}
    return flatten_recorded(rec.recorded, at), flat, at, problem


AGGREGATE = "*"  # the target name of a metric over all targets (one number); see docs/your-own-project.md


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
    """Keys present in ``old`` compared with ``new``; ``ok``: within the key's explicit tolerance (always,
    without one), and never for a key ``new`` lacks or has as NaN or infinity."""
    tol = tol or Tolerances()
    out: dict[str, MetricDiff] = {}
    for key, o in old.items():
        n = new.get(key)
        if n is None or not math.isfinite(n):  # missing, or NaN/inf: never within tolerance
            out[key] = MetricDiff(o, n, None, None, False)
            continue
        d = n - o
        rel = (d / abs(o)) if o != 0.0 and math.isfinite(o) else None
        gate = tol.gate(key)
        out[key] = MetricDiff(o, n, d, rel, gate is None or gate.allows(o, n))
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
    out_of_tolerance: list[str] = field(default_factory=list)  # metrics outside an explicit --tol (the user's gate)
    unmatched_recorded: list[str] = field(default_factory=list)  # recorded metrics this run produced nothing to compare with
    objective: str | None = None  # the flat key trial_info.yaml's value was compared as (None: not compared)
    objective_problem: str | None = None  # why a declared trainer.objective could not be compared
    weights_vs_archived: WeightsDiff | None = None  # the retrained best weights vs weights/best.pt, tensor by tensor
    user_weights_identical_to_recorded: bool | None = None  # the trainer's own digest vs trial_info's, its convention
    ladder: CellRung | None = None  # its rung against the reference (None: it is the reference, or did not run)
    repeat_group: str | None = None  # the cell it repeats (``--repeats``), when it is one of several
    nonfinite: list[str] = field(default_factory=list)  # metric keys it produced as NaN or infinity

    @property
    def rung(self) -> Rung | None:
        return self.ladder.rung if self.ladder is not None else None


@dataclass
class RepeatGroup:
    """The repeats of one cell (``--repeats N``): deterministic when they gave one distinct result."""

    name: str
    cells: list[str]
    distinct: int  # distinct results (weights digests, else metric values) among the repeats that ran
    deterministic: bool
    spread: dict[str, band_mod.Spread] = field(default_factory=dict)  # per metric, over the repeats
    rung: Rung | None = None  # the worst rung of a repeat against the first repeat (bitwise when deterministic)


@dataclass
class ReferenceInBand:
    """Where the reference itself lies in the seed band: outside it, the band's environment is not the
    reference's (or the reference's value was a lucky pick: the best trial of a search is optimistic)."""

    reference: str
    outside: bool
    deciding: str | None
    stat: float | None
    p_holm: float | None
    n_seed: int
    why: str


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
    band: Band | None = None  # the band the cells were judged against (None: none measured)
    alpha: float = stats.DEFAULT_ALPHA
    reference: str | None = None  # "recorded trial", or the first cell when nothing is recorded
    reference_in_band: ReferenceInBand | None = None
    rule: str = ("bitwise → numerically equal (|Δ| within the ulp band's noise, at least "
                 f"{stats.FLOAT32_ULPS} float32 ulps) → same distribution (inside the seed band's prediction "
                 "interval at α, Holm over the cell's metrics) → drifted")
    repeats: list[RepeatGroup] = field(default_factory=list)
    schema: str = "harness.comparison/4"
    # Which axis moved the metrics (harness.attribution), judged with the seed band's widths where one was
    # measured; None below two cells that ran. report.json keeps it beside the comparison, not inside.
    attribution: Attribution | None = None

    def cell(self, name: str) -> CellJudgement | None:
        return next((c for c in self.cells if c.cell == name), None)

    def counts(self) -> dict[Verdict, int]:
        out: dict[Verdict, int] = {}
        for c in self.cells:
            out[c.verdict] = out.get(c.verdict, 0) + 1
        if self.missing:
            out[Verdict.INCOMPLETE] = out.get(Verdict.INCOMPLETE, 0) + len(self.missing)
        return out

    def rung_counts(self) -> dict[Rung, int]:
        out: dict[Rung, int] = {}
        for c in self.cells:
            if c.rung is not None:
                out[c.rung] = out.get(c.rung, 0) + 1
        return out

    @property
    def differing(self) -> list[str]:
        """Cells beyond numerical noise that no seed band judged (``differs``): what a seed band would settle."""
        return [c.cell for c in self.cells if c.rung is Rung.DIFFERS]


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


def nonfinite_keys(rec: ResultRecord, split: str = "val") -> list[str]:
    """The flat metric keys (``val_loss``, ``r2/target`` ...) the run produced as NaN or infinity."""
    out = []
    for path in rec.nonfinite:
        if not isinstance(path, str):
            continue  # a hostile record may hold anything there
        parts = path.split(".")
        if parts[:2] != ["metrics", "retrained"]:
            continue
        rest = parts[2:]
        if rest == ["val_loss"]:
            out.append("val_loss")
        elif len(rest) == 3 and rest[0] == split and rest[1] in ("r2", "mse", "mae"):
            out.append(f"{rest[1]}/{rest[2]}")
    return out


def _judge_ok(rec: ResultRecord, first: ResultRecord | None, tol: Tolerances) -> CellJudgement:
    """The diffs of an ok cell against the recorded trial and the first cell; its verdict comes from the ladder."""
    recorded = rec.recorded
    wanted, flat, objective, objective_problem = judged_values(rec)
    produced = with_aggregates(flat, wanted)
    bad_numbers = [k for k in nonfinite_keys(rec) if k in wanted]
    unmatched = sorted(k for k in wanted if k not in produced and k not in bad_numbers)
    vs_rec = diff({k: v for k, v in wanted.items() if k in produced or k in bad_numbers}, produced, tol) if recorded else {}
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
    user = rec.user_weights
    arch_flat = with_aggregates(flatten_split(archived, "val"), wanted) if archived else {}
    arch = diff({k: v for k, v in wanted.items() if k in arch_flat}, arch_flat, tol) if (recorded and archived) else {}
    gated = vs_rec if vs_rec else (vs_first if rec is not first else {})
    bad = [k for k, v in gated.items() if tol.gate(k.removeprefix("test:")) is not None and not v.ok
           and not k.startswith("test:")]
    if recorded and vs_rec:
        verdict, reason = Verdict.REPRODUCED, ""
    elif recorded:
        verdict, reason = Verdict.UNRECORDED, "trial_info.yaml records no metric this run produces"
    else:
        verdict, reason = Verdict.UNRECORDED, "no trial_info.yaml: nothing recorded to compare with"
    return CellJudgement(
        cell=rec.cell, status=rec.status, verdict=verdict, reason=reason, vs_recorded=vs_rec, vs_first=vs_first,
        vs_first_ok=vs_first_ok,
        weights_identical_to_first=_both(rec.weights_sha256, first.weights_sha256 if first else None),
        # a trainer that returns its own digest tells us trial_info's digest is in its convention, not ours
        weights_identical_to_recorded=(None if user else
                                       _both(rec.weights_sha256, (recorded or {}).get("weights_sha256"))),
        archived_inference=arch, out_of_tolerance=bad, unmatched_recorded=unmatched,
        weights_vs_archived=rec.weights_vs_archived, user_weights_identical_to_recorded=user.identical_to_recorded if user else None,
        nonfinite=bad_numbers,
        objective=objective if recorded and objective in wanted else None,
        objective_problem=objective_problem if recorded and _number(recorded.get("value")) else None,
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
    rungs = _rung_words(cells)
    if Verdict.DRIFTED in verdicts:
        return Verdict.DRIFTED, f"{verdicts.count(Verdict.DRIFTED)} of {len(ran)} cell(s) drifted{rungs}{skipped}"
    if Verdict.UNJUDGED in verdicts:
        n = verdicts.count(Verdict.UNJUDGED)
        return Verdict.UNJUDGED, f"{n} cell(s) differ, no seed band{skipped}"
    if all(v is Verdict.REPRODUCED for v in ran):
        return Verdict.REPRODUCED, f"{len(ran)} cell(s) reproduced{rungs}{skipped}"
    return Verdict.UNRECORDED, f"{len(ran)} cell(s) ran, nothing recorded to judge against{rungs}{skipped}"


def _rung_words(cells: list[CellJudgement]) -> str:
    counts: dict[Rung, int] = {}
    for c in cells:
        if c.rung is not None:
            counts[c.rung] = counts.get(c.rung, 0) + 1
    from .ladder import RUNG_ORDER

    words = [f"{counts[r]} {r.value}" for r in RUNG_ORDER if r in counts]
    return f": {', '.join(words)}" if words else ""


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
# --------------------------------------------------------------------------- the band


def flat_val(rec: ResultRecord) -> dict[str, float]:
    """A record's validation metrics, flat, with the over-targets aggregates (``r2/*``) added."""
    flat = flatten_split(rec.retrained, "val")
    return with_aggregates(flat, [f"{fam}/{AGGREGATE}" for fam in ("r2", "mse", "mae")])


def where_words(rec: ResultRecord) -> str:
    """Where a record ran, in words: what a band's width is tied to."""
    env = rec.env
    parts = [f"torch {env.torch or '?'}", env.device or env.device_type or "?"]
    if env.cuda:
        parts.append(f"CUDA {env.cuda}")
    if rec.image is not None and rec.image.tag:
        parts.append(f"image {rec.image.tag}")
    mode = (rec.determinism or {}).get("mode")
    if mode:
        parts.append(str(mode))
    if env.threads is not None:
        parts.append(f"{env.threads} thread(s)")
    return ", ".join(parts)


def is_band_member(rec: ResultRecord) -> bool:
    """Whether ``rec`` is a member of the band (an ulp or seed retrain of the baseline), not a cell's own seed."""
    return rec.band_kind in (BandKind.ULP, BandKind.SEED)


def is_row(rec: ResultRecord) -> bool:
    """Whether ``rec`` is a row of the results: a cell, or a band member that failed (one that ran, or that its
    band's probes left out, :func:`harness.band.gate`, belongs to the band and its notes)."""
    return not (rec.band and (rec.ok or rec.status is Status.SKIPPED))


def band_member(rec: ResultRecord) -> band_mod.Member:
    """A band member's record as the band sees it; a failed member, or an ulp member that was not perturbed, is not used."""
    b = rec.band
    kind = b.kind.value if b else "None"
    used, why = True, None
    if not rec.ok:
        used, why = False, f"it {rec.status.value}: {rec.error.message if rec.error else rec.status.value}"
    elif kind == "ulp" and not (rec.perturbation and rec.perturbation.applied):
        used, why = False, ((rec.perturbation.skipped if rec.perturbation else None)
                            or "its record shows no perturbation applied")
    return band_mod.Member(cell=rec.cell, kind=kind, member=b.member if b else 0, seed=b.seed if b else None,
                           perturbation=rec.perturbation, used=used, why_not=why,
                           values=flat_val(rec) if rec.ok else {}, weights_sha256=rec.weights_sha256,
                           command=(rec.trainer or {}).get("command"),
                           redraw_of=str(of) if (of := rec.labels.get(band_mod.REDRAW_OF)) else None)


def measure_band(records: Iterable[ResultRecord]) -> Band | None:
    """The band of the band members among ``records`` (None when there are none); the run they perturb, where it is
    among ``records``, shows which ulp members trained its weights (:func:`harness.band.absorbed`)."""
    records = list(records)
    members = [r for r in records if is_band_member(r)]
    if not members:
        return None
    ran = next((r for r in members if r.ok), None)
    return band_mod.measure([band_member(r) for r in members], where_words(ran) if ran else None,
                            unperturbed_weights(records))


def unperturbed_weights(records: Iterable[ResultRecord]) -> set[str]:
    """The weights digests of the runs the band members among ``records`` perturb (their ``band_of`` cells)."""
    return {r.weights_sha256 for r in perturbed_runs(records) if r.weights_sha256}


def perturbed_runs(records: Iterable[ResultRecord]) -> list[ResultRecord]:
    """The runs among ``records`` that ran, and that the band members among them perturb (their ``band_of`` cells)."""
    records = list(records)
    of = {str(r.labels.get("band_of")) for r in records if is_band_member(r) and r.labels.get("band_of")}
    return [r for r in records if r.ok and not r.band and r.cell in of]


def band_conflict(band_records: Iterable[ResultRecord], config_sha256: str | None, data_sha256: str | None,
                  trainer: str | None) -> str | None:
    """Why a band was not measured for this bundle (another config, data or trainer), or None when it was."""
    for r in band_records:
        theirs = (r.bundle or {}).get("config_sha256")
        if theirs is None and r.ok and config_sha256 is not None:
            return f"{r.cell} records no config digest (written by an older harness)"
        if theirs is not None and config_sha256 is not None and theirs != config_sha256:
            return (f"{r.cell} was measured for another config.yaml (digest {theirs[:12]}..., "
                    f"this bundle's is {config_sha256[:12]}...)")
        if r.data_sha256 and data_sha256 and r.data_sha256 != data_sha256:
            return f"{r.cell} trained on other data (sha256 {r.data_sha256[:12]}..., this data's is {data_sha256[:12]}...)"
        ran_with = (r.spec or {}).get("trainer")
        if r.ok and ran_with != trainer:
            return f"{r.cell} ran trainer {ran_with or 'reference'}, this bundle runs {trainer or 'the reference trainer'}"
    return None


def _repeat_of(rec: ResultRecord) -> str | None:
    """The cell ``rec`` is a repeat of (its name without ``-rN``), or None when it is no repeat."""
    n = (rec.labels or {}).get("repeat")
    suffix = f"-r{n}"
    if isinstance(n, int) and not isinstance(n, bool) and rec.cell.endswith(suffix) and len(rec.cell) > len(suffix):
        return rec.cell[: -len(suffix)]
    return None


def repeat_groups(records: Iterable[ResultRecord]) -> list[RepeatGroup]:
    """The cells run more than once (``--repeats N``), each with its distinct results and spread."""
    groups: dict[str, list[ResultRecord]] = {}
    for r in records:
        base = _repeat_of(r)
        if base is not None:
            groups.setdefault(base, []).append(r)
    out = []
    for name, recs in groups.items():
        if len(recs) < 2:
            continue
        ok = [r for r in recs if r.ok]
        flats = [flat_val(r) for r in ok]
        results = {r.weights_sha256 or repr(sorted(f.items())) for r, f in zip(ok, flats)}
        keys = list(dict.fromkeys(k for f in flats for k in f))
        spreads = {k: s for k in keys if (s := band_mod.spread([f[k] for f in flats if k in f])) is not None}
        out.append(RepeatGroup(name=name, cells=[r.cell for r in recs], distinct=len(results),
                               deterministic=len(ok) >= 2 and len(results) == 1, spread=spreads))
    return out



def _summary(s: band_mod.Spread | None) -> stats.Summary | None:
    return stats.Summary(s.n, s.mean, s.sd) if s is not None and s.sd is not None and s.n >= 2 else None


def yardsticks(band: Band | None, alpha: float, own: Band | None = None) -> Yardsticks:
    """The numerical noise (the ulp band, else a cell's own repeats) and the seed distribution of ``band``."""
    noise: dict[str, stats.Summary] = {}
    source = None
    use = band if band is not None and band.measured else own
    if use is not None and use.measured:
        noise = {k: s for k, v in use.ulp.items() if (s := _summary(v)) is not None}
        source = f"ulp band (n={use.n_ulp})" if use.source == "ulp" else f"own repeats (n={use.n_ulp})"
    seeds: dict[str, stats.Summary] = {}
    n_seed = 0
    if band is not None and band.n_seed >= band_mod.MIN_MEMBERS:
        seeds = {k: s for k, v in band.seed.items() if (s := _summary(v)) is not None}
        n_seed = band.n_seed
    return Yardsticks(alpha=alpha, noise=noise, noise_source=source, seeds=seeds, n_seed=n_seed)


def numerically_equal(a: Mapping[str, float], b: Mapping[str, float], sticks: Yardsticks) -> bool:
    """Every metric both have is within the numerical noise of the other (no metric in common: False)."""
    shared = [k for k in a if k in b and math.isfinite(a[k]) and math.isfinite(b[k])]
    return bool(shared) and all(abs(a[k] - b[k]) <= noise_limit_for(k, a[k], b[k], sticks)[0] for k in shared)


def band_baseline(band: Band | None, records: Iterable[ResultRecord]) -> dict[str, float] | None:
    """What the band's baseline gave, per metric: its ulp members' mean (each is the baseline moved by one
    ulp), else the baseline cell's own record when it is among ``records``; None when neither is known."""
    if band is None:
        return None
    if band.n_ulp:
        return {k: s.mean for k, s in band.ulp.items()}
    base = next(iter(perturbed_runs(records)), None)
    return flat_val(base) if base is not None else None


def cell_seed_pairs(cell: str, records: Iterable[ResultRecord]) -> dict[str, list[float]] | None:
    """Per metric, the paired differences (the cell's retrain with seed s) − (the band's with seed s) over
    the seeds both retrained (``--cell-seeds``); None when the cell has no retrain of its own with a band seed."""
    records = list(records)
    mine = {r.band.seed: r for r in records
            if r.ok and r.band and r.band.kind is BandKind.CELL_SEED and r.band.of == cell}
    if not mine:
        return None
    theirs = {r.band.seed: r for r in records if r.ok and r.band_kind is BandKind.SEED}
    out: dict[str, list[float]] = {}
    for seed in sorted(s for s in mine if s in theirs and s is not None):
        a, b = flat_val(mine[seed]), flat_val(theirs[seed])
        for k in a.keys() & b.keys():
            if math.isfinite(a[k]) and math.isfinite(b[k]):
                out.setdefault(k, []).append(a[k] - b[k])
    return out


def _climb(j: CellJudgement, rec: ResultRecord, first: ResultRecord | None, sticks: Yardsticks,
           baseline: dict[str, float] | None, pairs: dict[str, list[float]] | None, tol: Tolerances) -> CellJudgement:
    """The cell's rung against its reference, and its verdict from it (explicit tolerances gate on top)."""
    cell_vals = flat_val(rec)
    if j.objective is not None and j.objective.startswith("test:"):  # trainer.objective: a test metric
        cell_vals[j.objective] = judged_values(rec)[1][j.objective]
    if j.vs_recorded:
        reference = TRIAL
        ref_vals = {k: d.old for k, d in j.vs_recorded.items()}
        arch_identical = bool(j.weights_vs_archived and j.weights_vs_archived.identical)
        identical = (TRIAL if j.weights_identical_to_recorded or j.user_weights_identical_to_recorded
                     else "archived weights" if arch_identical else None)
    elif first is not None and rec is not first:
        reference = first.cell
        ref_vals = {k: d.old for k, d in j.vs_first.items() if not k.startswith("test:")}
        identical = f"first cell {first.cell}" if j.weights_identical_to_first else None
    else:
        return j  # the reference itself (nothing recorded): nothing to climb against
    deltas = {k: (ref_vals[k], cell_vals.get(k) if k not in j.nonfinite else None) for k in ref_vals
              if k in cell_vals or k in j.nonfinite}
    # The value the seed band tests: the cell's, as one more draw. When the band ran where the cell ran
    # (the cell is numerically equal to the band's baseline) but not where the reference ran, the cell's
    # value is the band's own and says nothing new: then the reference is tested against the band instead.
    tested, values = "cell", cell_vals
    if baseline is not None and numerically_equal(cell_vals, baseline, sticks) \
            and not numerically_equal(ref_vals, baseline, sticks):
        tested, values = "reference", ref_vals
    ladder = climb(reference, deltas, sticks, weights_identical=identical, tested=tested, test_values=values,
                   pairs=pairs)
    verdict = j.verdict
    if ladder.rung is Rung.DRIFTED:
        verdict = Verdict.DRIFTED
    elif ladder.rung is Rung.DIFFERS:
        verdict = Verdict.UNJUDGED
    elif reference != TRIAL:
        verdict = Verdict.UNRECORDED  # agrees with the first cell; nothing recorded to reproduce
    reason = f"{ladder.rung.value} vs the {reference if reference == TRIAL else 'first cell ' + reference}: " \
             f"{ladder.evidence}"
    if j.out_of_tolerance:
        gates = ", ".join(f"{k} ({_tol_words(tol, k)})" for k in j.out_of_tolerance[:3])
        verdict = Verdict.DRIFTED
        reason = f"outside the explicit tolerance on {gates}; {reason}"
    return dataclasses.replace(j, ladder=ladder, verdict=verdict, reason=reason)


def _tol_words(tol: Tolerances, key: str) -> str:
    g = tol.gate(key)
    if g is None:
        return "?"
    return ",".join(f"{k}:{v:g}" for k, v in (("abs", g.abs), ("rel", g.rel)) if v) or "exact"


def reference_in_band(records: list[ResultRecord], sticks: Yardsticks) -> ReferenceInBand | None:
    """Where the recorded trial lies in the seed band (None without both)."""
    rec = next((r for r in records if r.ok and r.recorded), None)
    if rec is None or sticks.n_seed < band_mod.MIN_MEMBERS:
        return None
    values = judged_values(rec)[0]
    tests = {k: t for k, v in values.items() if k in sticks.seeds
             and (t := stats.prediction_test(v, sticks.seeds[k], sticks.alpha)) is not None}
    if not tests:
        return None
    from .ladder import distinct_hypotheses, holm_distinct

    adjusted = holm_distinct(tests)
    key = min(adjusted, key=lambda k: (adjusted[k], k))
    t = tests[key]
    outside = adjusted[key] < sticks.alpha
    why = (f"{key} {t.stat:+.2g} × the seed band's scale from its mean (n={t.n}); p={t.p:.2g}"
           + (f", Holm over {distinct_hypotheses(list(tests))} metric(s) {adjusted[key]:.2g}" if len(tests) > 1 else ""))
    return ReferenceInBand(TRIAL, outside, key, t.stat, adjusted[key], t.n, why)


def _repeat_rungs(groups: list[RepeatGroup], table: list[ResultRecord], sticks: Yardsticks) -> None:
    """Each repeat group's rung: its repeats against the first of them (bitwise when they are identical)."""
    by_name = {r.cell: r for r in table if r.ok}
    for g in groups:
        recs = [by_name[c] for c in g.cells if c in by_name]
        if len(recs) < 2:
            continue
        base = flat_val(recs[0])
        rungs = []
        for r in recs[1:]:
            vals = flat_val(r)
            same = bool(r.weights_sha256) and r.weights_sha256 == recs[0].weights_sha256
            deltas = {k: (base[k], vals[k]) for k in base if k in vals}
            rungs.append(climb(recs[0].cell, deltas, sticks, weights_identical=recs[0].cell if same else None,
                               test_values=vals).rung)
        from .ladder import worst

        g.rung = worst(rungs)


# --------------------------------------------------------------------------- the comparison


def compare(records: list[ResultRecord], tol: Tolerances | None = None, missing: Iterable[str] = (),
            allow_data_change: bool = False, alpha: float = stats.DEFAULT_ALPHA) -> Comparison:
    """Judge every record against its reference (the recorded trial, else the first cell that ran) on the
    verdict ladder, with the band among ``records`` as the yardsticks and ``tol`` as an explicit gate.

    Band members (records with ``band``) that ran make the band and are not cells; one
    that failed is a failed row like any cell, one that was skipped is a note of the band. Skipped cells are ``skipped`` and do not
    fail the run; interrupted cells and ``missing`` ones (planned, never recorded) make the
    run ``incomplete``. A cell whose data does not match the digest the bundle records is
    ``not comparable`` unless ``allow_data_change`` (then it is judged, and the mismatch is
    a warning). Without an ulp band, a cell repeated with different results has its own
    repeats' spread as its numerical noise.
    """
    tol = tol or Tolerances()
    alpha = stats.check_alpha(alpha)
    band = measure_band(records)
    members = [r for r in records if r.band and r.ok]
    table = [r for r in records if is_row(r)]
    groups = repeat_groups(table)
    own = {g.name: band_mod.from_values(g.name, [flat_val(r) for r in table if r.cell in g.cells and r.ok])
           for g in groups if not g.deterministic}
    first = next((r for r in table if r.ok and not r.band), None)
    sticks = yardsticks(band, alpha)
    _repeat_rungs(groups, table, sticks)
    baseline = band_baseline(band, records)
    cells = []
    for r in table:
        judged = _judge_ok(r, first, tol) if r.ok else _not_run(r)
        if r.ok:
            repeat = _repeat_of(r)
            own_sticks = yardsticks(band, alpha, own.get(repeat or "")) if not sticks.noise else sticks
            judged = _climb(judged, r, first, own_sticks, baseline, cell_seed_pairs(r.cell, records), tol)
            judged.repeat_group = repeat if repeat in {g.name for g in groups} else None
        if r.ok and not allow_data_change and data_mismatches(r):
            judged = _not_comparable(judged, r)
        cells.append(judged)
    missing = [m for m in missing if m not in {r.cell for r in records}]
    overall, reason = _overall(cells, missing)
    if not cells and not missing and band is not None:
        overall, reason = ((Verdict.UNRECORDED, f"band measured: {band.n_ulp} ulp member(s)"
                            + (f", {band.n_seed} seed member(s)" if band.n_seed else "") + "; no cell to judge against it")
                           if band.measured or band.n_seed else
                           (Verdict.INCOMPLETE, "no band: " + "; ".join(band.notes or ["too few members ran"])))
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
        if c.objective_problem:
            warnings.setdefault(f"{c.cell}: {c.objective_problem}", None)
    ref_in_band = reference_in_band(table, sticks)
    if band is not None:
        for note in band.notes:
            warnings.setdefault(note, None)
        if first is not None and members and band.environment and where_words(first) != band.environment:
            warnings.setdefault(f"the band was measured in {band.environment}; the first cell {first.cell} ran in "
                                f"{where_words(first)}", None)
        if ref_in_band is not None and ref_in_band.outside:
            warnings.setdefault(
                f"the recorded trial lies outside this seed band ({ref_in_band.why}): the band's environment "
                f"({band.environment or 'where it ran'}) does not give the trial's distribution, or the trial's value "
                "was a lucky pick (the best trial of a search is optimistic)", None)
    reference = TRIAL if any(c.ladder is not None and c.ladder.reference == TRIAL for c in cells) else (
        first.cell if first is not None else None)
    return Comparison(overall=overall, reason=reason, first_cell=first.cell if first else None,
                      tolerances=tol.to_dict(), cells=cells, missing=missing, warnings=list(warnings),
                      band=band, alpha=alpha, reference=reference, reference_in_band=ref_in_band, repeats=groups,
                      attribution=attribution_of(records, band))


def attribution_of(records: list[ResultRecord], band: Band | None = None,
                   width: Any = None) -> Attribution | None:
    """Which axis moved the metrics among the cells of ``records`` (band members are the band, not cells);
    None below two cells that ran. ``width``: each metric's yardstick, else the seed band's spread (two
    seeds or more), else none."""
    cells = [r for r in records if not r.band]
    if sum(1 for r in cells if r.ok) < 2:
        return None
    if width is None and band is not None and band.n_seed >= 2:
        seed = band.seed
        width = lambda key: seed[key].sd if key in seed else None  # noqa: E731
    return attribute(cells, width)


def merge(sets: Iterable[RecordSet]) -> RecordSet:
    """Concatenate record sets from several places, keeping cell names unique.

    A band member given twice (a run that names its band in run.json, and the band's
    own directory) is kept once.
    """
    seen: dict[str, int] = {}
    members: set[tuple[Any, ...]] = set()
    out: list[ResultRecord] = []
    missing: list[str] = []
    for rs in sets:
        for rec in rs.records:
            if rec.band:
                key = (rec.cell, rec.run_id, rec.started_at, rec.weights_sha256)
                if key in members:
                    continue
                members.add(key)
            name = rec.cell
            if name in seen:
                seen[name] += 1
                rec = dataclasses.replace(rec, cell=f"{name}@{rec.env.hostname or seen[name]}")
            else:
                seen[name] = 0
            out.append(rec)
        missing.extend(rs.missing)
    return RecordSet(out, missing, ", ".join(rs.source for rs in sets), [w for rs in sets for w in rs.warnings])


def band_fits(records: Iterable[ResultRecord]) -> str | None:
    """Why the band members among ``records`` were not measured for its cells (another config, data
    or trainer), or None when they were (or there is no band, or no cell to compare with)."""
    records = list(records)
    cell = next((r for r in records if r.ok and not r.band), None)
    band = [r for r in records if r.band]
    if cell is None or not band:
        return None
    return band_conflict(band, (cell.bundle or {}).get("config_sha256"), cell.data_sha256,
                         (cell.spec or {}).get("trainer"))
