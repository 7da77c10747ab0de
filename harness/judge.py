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

from . import band as band_mod
from .band import Band
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


class BandVerdict(str, enum.Enum):
    """A cell's difference from its reference, against the training's own instability (the band)."""

    BITWISE = "bitwise"  # its weights are identical to the reference's (or to the archived ones)
    WITHIN = "within band"  # |Δ| <= the band's width on every metric: the training's own instability
    BEYOND = "beyond band"  # |Δ| > the band's width on some metric: a behavioural change worth a look
    NO_BAND = "no band"  # no band measured (or no reference): judged by tolerances alone

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
    band: "CellBand | None" = None  # its difference against the band (None: no band, nothing to judge)
    repeat_group: str | None = None  # the cell it repeats (``--repeats``), when it is one of several


@dataclass(frozen=True)
class MetricBand:
    """One metric of a cell against the band: Δ vs the reference, the band's width, their ratio."""

    delta: float | None
    width: float | None  # the band's width: max(range, 3 sd) (band.band_width)
    ratio: float | None  # |Δ| / width: <= 1 is within
    sd_ratio: float | None  # |Δ| / the band's sd (context: k·sd with k = band.K_SD)
    seed_ratio: float | None  # |Δ| / the seed band's range (context: could it change a conclusion?)
    verdict: BandVerdict


@dataclass
class CellBand:
    """A cell judged against a band: per metric, and overall (the worst metric)."""

    verdict: BandVerdict
    reference: str | None  # the cell (or "recorded trial") its Δ is taken from
    source: str  # "ulp": the measured band; "repeats": the cell's own repeats
    bitwise_to: str | None = None  # "first cell" | "archived weights" | "recorded trial" when the weights are identical
    ratio: float | None = None  # the largest |Δ| / width over its metrics
    sd_ratio: float | None = None
    seed_ratio: float | None = None
    beyond: list[str] = field(default_factory=list)  # the metrics beyond the band
    metrics: dict[str, MetricBand] = field(default_factory=dict)


@dataclass
class RepeatGroup:
    """The repeats of one cell (``--repeats N``): deterministic when they gave one distinct result."""

    name: str
    cells: list[str]
    distinct: int  # distinct results (weights digests, else metric values) among the repeats that ran
    deterministic: bool
    spread: dict[str, band_mod.Spread] = field(default_factory=dict)  # per metric, over the repeats


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
    band_rule: str = (f"|Δ| <= the ulp band's width: the larger of its range (max - min) and {band_mod.K_SD:g} sd; "
                      "|Δ| / sd shown beside it")
    repeats: list[RepeatGroup] = field(default_factory=list)
    schema: str = "harness.comparison/3"

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


def band_member(rec: ResultRecord) -> band_mod.Member:
    """A band member's record as the band sees it; a failed member, or an ulp member that was not perturbed, is not used."""
    b = rec.band or {}
    kind = str(b.get("kind"))
    used, why = True, None
    if not rec.ok:
        used, why = False, f"it {rec.status.value}: {rec.error.message if rec.error else rec.status.value}"
    elif kind == "ulp" and not (rec.perturbation or {}).get("applied"):
        used, why = False, ((rec.perturbation or {}).get("skipped") or "its record shows no perturbation applied")
    return band_mod.Member(cell=rec.cell, kind=kind, member=int(b.get("member") or 0), seed=b.get("seed"),
                           perturbation=rec.perturbation, used=used, why_not=why,
                           values=flat_val(rec) if rec.ok else {}, weights_sha256=rec.weights_sha256)


def measure_band(records: Iterable[ResultRecord]) -> Band | None:
    """The band of the band members among ``records`` (None when there are none)."""
    members = [r for r in records if r.band]
    if not members:
        return None
    ran = next((r for r in members if r.ok), None)
    return band_mod.measure([band_member(r) for r in members], where_words(ran) if ran else None)


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


def _max(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def judge_band(j: CellJudgement, rec: ResultRecord, first: ResultRecord | None, band: Band | None,
               own: Band | None = None) -> CellBand | None:
    """``rec``'s difference from its reference against ``band`` (else ``own``: its repeats' spread).

    The reference is the first cell; for the first cell itself, the recorded trial. The primary
    rule: a metric is within the band when ``|Δ| <= band range`` (max - min of the ulp members);
    ``|Δ| / sd`` and ``|Δ| / seed range`` are context. The weights identical to the reference's
    (or to the archived ones) make the cell ``bitwise``, unless a metric is beyond the band.
    """
    use = band if band is not None and band.measured else own
    if use is None or first is None:
        return None
    arch_identical = bool((j.weights_vs_archived or {}).get("identical"))
    if rec is first:
        if not j.vs_recorded:
            return CellBand(BandVerdict.NO_BAND, None, use.source)  # the baseline, with nothing recorded
        reference = "recorded trial"
        deltas = {k: d.diff for k, d in j.vs_recorded.items()}
        bitwise = ("recorded trial" if j.weights_identical_to_recorded or j.user_weights_identical_to_recorded
                   else "archived weights" if arch_identical else None)
    else:
        reference = first.cell
        deltas = {k: d.diff for k, d in j.vs_first.items() if not k.startswith("test:")}
        bitwise = "first cell" if j.weights_identical_to_first else "archived weights" if arch_identical else None
    metrics: dict[str, MetricBand] = {}
    for key, delta in deltas.items():
        if delta is None:
            continue  # missing or not finite: the tolerance gate says so
        width = band_mod.band_width(use, key)
        seeds = band_mod.seed_width(band, key)
        seed_r = band_mod.ratio(delta, seeds) if seeds else None  # a zero-width seed band says nothing
        if width is None:
            metrics[key] = MetricBand(delta, None, None, None, seed_r, BandVerdict.NO_BAND)
            continue
        r = band_mod.ratio(delta, width)
        verdict = (BandVerdict.BITWISE if bitwise and delta == 0 else
                   BandVerdict.WITHIN if r is not None and r <= 1 else BandVerdict.BEYOND)
        metrics[key] = MetricBand(delta, width, r, band_mod.ratio(delta, band_mod.band_sd(use, key)), seed_r, verdict)
    judged = {k: m for k, m in metrics.items() if m.verdict is not BandVerdict.NO_BAND}
    if not judged:
        return CellBand(BandVerdict.NO_BAND, reference, use.source, bitwise_to=bitwise, metrics=metrics)
    beyond = [k for k, m in judged.items() if m.verdict is BandVerdict.BEYOND]
    # Bitwise only when every metric equals the reference's: weights equal to the archived ones do not
    # make a cell bitwise against a first cell whose own weights differ from them.
    same = all(m.verdict is BandVerdict.BITWISE for m in judged.values())
    verdict = BandVerdict.BEYOND if beyond else BandVerdict.BITWISE if bitwise and same else BandVerdict.WITHIN
    return CellBand(verdict=verdict, reference=reference, source=use.source, bitwise_to=bitwise,
                    ratio=_max(m.ratio for m in judged.values()), sd_ratio=_max(m.sd_ratio for m in judged.values()),
                    seed_ratio=_max(m.seed_ratio for m in metrics.values()), beyond=beyond, metrics=metrics)


def _apply_band(j: CellJudgement, cb: CellBand | None) -> CellJudgement:
    """The cell's verdict with its band: beyond the band on any metric drifts it (tolerances still gate)."""
    if cb is None:
        return j
    j = dataclasses.replace(j, band=cb)
    if cb.verdict is not BandVerdict.BEYOND:
        return j
    what = "its own repeats' spread" if cb.source == "repeats" else "the band"
    times = "" if cb.ratio is None else (" (range 0)" if math.isinf(cb.ratio) else f" (x{cb.ratio:.3g} its width)")
    why = (f"beyond {what} on {len(cb.beyond)} metric(s) vs {cb.reference}: "
           f"{', '.join(cb.beyond[:3])}{' ...' if len(cb.beyond) > 3 else ''}{times}")
    if j.verdict in (Verdict.REPRODUCED, Verdict.UNRECORDED):
        return dataclasses.replace(j, verdict=Verdict.DRIFTED, reason=f"{why}; {j.reason}")
    if j.verdict is Verdict.DRIFTED:
        return dataclasses.replace(j, reason=f"{j.reason}; {why}")
    return j


# --------------------------------------------------------------------------- the comparison


def compare(records: list[ResultRecord], tol: Tolerances | None = None, missing: Iterable[str] = (),
            allow_data_change: bool = False) -> Comparison:
    """Judge every record against the recorded trial, the first cell that ran, and the band.

    Band members (records with ``band``) that ran make the band and are not cells; one
    that failed is a failed row like any cell. Skipped cells are ``skipped`` and do not
    fail the run; interrupted cells and ``missing`` ones (planned, never recorded) make the
    run ``incomplete``. A cell whose data does not match the digest the bundle records is
    ``not comparable`` unless ``allow_data_change`` (then it is judged, and the mismatch is
    a warning). Without a band, a cell repeated with different results is judged against
    its own repeats' spread.
    """
    tol = tol or Tolerances()
    band = measure_band(records)
    members = [r for r in records if r.band and r.ok]
    table = [r for r in records if not (r.band and r.ok)]
    groups = repeat_groups(table)
    own = {g.name: band_mod.from_values(g.name, [flat_val(r) for r in table if r.cell in g.cells and r.ok])
           for g in groups if not g.deterministic}
    first = next((r for r in table if r.ok and not r.band), None)
    cells = []
    for r in table:
        judged = _judge_ok(r, first, tol) if r.ok else _not_run(r)
        if r.ok:
            repeat = _repeat_of(r)
            judged = _apply_band(judged, judge_band(judged, r, first, band, own.get(repeat or "")))
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
    if band is not None:
        for note in band.notes:
            warnings.setdefault(note, None)
        if first is not None and members and band.environment and where_words(first) != band.environment:
            warnings.setdefault(f"the band was measured in {band.environment}; the baseline {first.cell} ran in "
                                f"{where_words(first)}: its width may not describe this baseline", None)
    return Comparison(overall=overall, reason=reason, first_cell=first.cell if first else None,
                      tolerances=tol.to_dict(), cells=cells, missing=missing, warnings=list(warnings),
                      band=band, repeats=groups)


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
