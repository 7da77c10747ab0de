"""The verdict ladder: bitwise → numerically equal → same distribution → drifted. Pure.

A cell is judged per metric against its reference (the recorded trial, else the first
cell), climbing down the ladder until a rung's evidence holds:

* ``bitwise``: its retrained weights are identical to the reference's (and so is every metric);
* ``numerically equal``: |Δ| is inside the numerical noise of one trajectory: the ulp band's
  prediction interval for a difference of two runs, ``t(n−1, 1−α/2)·sd·√2``, and never less
  than :data:`harness.stats.FLOAT32_ULPS` float32 ulps of the metric (rounding);
* ``same distribution``: beyond that, but inside what another training seed gives: the seed
  band's prediction interval at the false-alarm rate α, Holm-corrected over the cell's metrics
  (or, with the cell's own seeds, a paired t test of the shift);
* ``drifted``: outside it. A retrain in the reference environment would not plausibly give it.
* ``differs``: beyond numerical noise, with no seed band to say whether it matters: not judged.

The cell's rung is its worst metric's. :mod:`harness.judge` decides what is compared with
what (which reference, which value the seed band tests); this module only climbs the ladder.
The statistics are :mod:`harness.stats`; docs/verdicts.md states the assumptions.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from . import stats


class Rung(str, enum.Enum):
    """How close a cell is to its reference, per metric and per cell."""

    BITWISE = "bitwise"
    EQUAL = "numerically equal"
    SAME = "same distribution"
    DIFFERS = "differs"  # beyond numerical noise; no seed band to judge it by
    DRIFTED = "drifted"

    def __str__(self) -> str:
        return self.value


# Worst last: a cell's rung is the worst of its metrics'.
RUNG_ORDER = (Rung.BITWISE, Rung.EQUAL, Rung.SAME, Rung.DIFFERS, Rung.DRIFTED)

# One line per rung, for the table's legend and the docs (docs/verdicts.md).
RUNG_LINES = {
    Rung.BITWISE: "bitwise: the retrained weights are identical to the reference's",
    Rung.EQUAL: "numerically equal: |Δ| is within the numerical noise of one trajectory (the ulp band; "
                f"at least {stats.FLOAT32_ULPS} float32 ulps)",
    Rung.SAME: "same distribution: beyond numerical noise, inside what another training seed gives "
               "(the seed band's prediction interval at α)",
    Rung.DRIFTED: "drifted: outside that interval; a retrain in the reference environment would not plausibly give it",
    Rung.DIFFERS: "differs: beyond numerical noise, and no seed band to judge whether it matters (--band-seeds 8)",
}


def worst(rungs: Sequence[Rung]) -> Rung | None:
    return max(rungs, key=RUNG_ORDER.index) if rungs else None


@dataclass(frozen=True)
class Yardsticks:
    """What a cell is judged with: the numerical noise and the seed distribution, per metric key."""

    alpha: float = stats.DEFAULT_ALPHA
    noise: Mapping[str, stats.Summary] = field(default_factory=dict)  # runs of one trajectory (ulp members, repeats)
    noise_source: str | None = None  # "ulp band (n=8)", "own repeats (n=2)"
    seeds: Mapping[str, stats.Summary] = field(default_factory=dict)  # retrains with other seeds
    n_seed: int = 0


@dataclass(frozen=True)
class MetricRung:
    """One metric of a cell on the ladder, with the numbers behind its rung."""

    rung: Rung
    delta: float | None  # cell − reference
    reference: float | None = None  # the reference's value
    limit: float | None = None  # the numerical-noise limit |Δ| was held against
    limit_from: str | None = None  # what set it: "ulp band (n=8)" | "float32 rounding"
    delta_sd: float | None = None  # |Δ| in seed standard deviations
    tested: str | None = None  # "cell" | "reference" | "pairs": what the distribution test was made on
    method: str | None = None  # "prediction interval" | "paired seeds"
    n: int | None = None  # seed members (prediction interval) or seed pairs (paired) behind the test
    stat: float | None = None  # the t statistic
    p: float | None = None
    p_holm: float | None = None  # Holm-adjusted over the cell's tested metrics
    shift: float | None = None  # paired: the mean shift (cell − band, seed by seed)
    shift_ci: tuple[float, float] | None = None  # its 1 − α confidence interval
    why: str = ""


@dataclass
class CellRung:
    """A cell on the ladder: its rung (the worst metric's), the reference, and the evidence."""

    rung: Rung
    reference: str  # "recorded trial" or the first cell's name
    alpha: float
    evidence: str  # one line: what supports the rung
    metrics: dict[str, MetricRung] = field(default_factory=dict)
    bitwise_to: str | None = None  # what its weights are identical to, when they are
    tested: str | None = None  # "cell" | "reference" | "pairs"
    n_seed: int = 0
    n_tested: int = 0  # metrics the distribution test covered (Holm's m)
    deciding: str | None = None  # the metric that set the rung (the worst)

    @property
    def delta_sd(self) -> float | None:
        """The largest |Δ| in seed sd over the metrics."""
        vals = [m.delta_sd for m in self.metrics.values() if m.delta_sd is not None]
        return max(vals) if vals else None


def noise_limit_for(key: str, ref: float, new: float, sticks: Yardsticks) -> tuple[float, str]:
    """The largest |Δ| on ``key`` that is numerical noise, and what set it: the ulp band's (or the
    repeats') prediction interval for a difference, never less than float32 rounding at the values."""
    rounding = stats.rounding_limit(ref, new)
    noise = stats.noise_limit(sticks.noise.get(key), sticks.alpha)
    if noise is not None and noise > rounding:
        return noise, sticks.noise_source or "ulp band"
    return rounding, f"float32 rounding ({stats.FLOAT32_ULPS} ulp)"


def _g(x: float) -> str:
    return f"{x:.2g}"


def climb(reference: str, deltas: Mapping[str, tuple[float, float | None]], sticks: Yardsticks, *,
          weights_identical: str | None = None, tested: str = "cell",
          test_values: Mapping[str, float] | None = None,
          pairs: Mapping[str, Sequence[float]] | None = None) -> CellRung:
    """Put one cell on the ladder.

    ``deltas``: per metric key, (reference value, cell value); a cell value of None is a metric
    the cell produced as NaN or infinity where the reference has a number: it drifted.
    ``weights_identical``: what the cell's weights are bitwise identical to ("recorded trial",
    "archived weights", a cell name), or None. ``test_values``: the values the seed band's
    prediction interval tests (the cell's, or the reference's when the band ran where the cell
    ran: ``tested`` says which); ``pairs``: per key, the paired differences cell − band over
    the seeds both retrained (then the paired t test is used instead).
    """
    alpha = sticks.alpha
    metrics: dict[str, MetricRung] = {}
    beyond: list[str] = []
    for key, (ref, new) in deltas.items():
        seed = sticks.seeds.get(key)
        if new is None or not math.isfinite(new):
            metrics[key] = MetricRung(Rung.DRIFTED, None, ref, why=f"{key} is not a finite number here; the reference has "
                                                              f"{ref:.7g}")
            continue
        d = new - ref
        dsd = abs(d) / seed.sd if seed is not None and seed.sd > 0 else None
        if weights_identical and d == 0:
            metrics[key] = MetricRung(Rung.BITWISE, d, ref, delta_sd=dsd, why="identical")
            continue
        limit, src = noise_limit_for(key, ref, new, sticks)
        if abs(d) <= limit:
            metrics[key] = MetricRung(Rung.EQUAL, d, ref, limit, src, dsd,
                                      why=f"|Δ| {_g(abs(d))} ≤ {_g(limit)}, the numerical noise ({src})")
            continue
        metrics[key] = MetricRung(Rung.DIFFERS, d, ref, limit, src, dsd,
                                  why=f"|Δ| {_g(abs(d))} > {_g(limit)}, the numerical noise ({src})")
        beyond.append(key)
    tests: dict[str, stats.Test] = {}
    for key in beyond:
        t = None
        if pairs is not None and len(pairs.get(key) or ()) >= 2:
            t = stats.paired_test(pairs[key], alpha)
        elif pairs is None and key in sticks.seeds and test_values is not None and key in test_values:
            t = stats.prediction_test(test_values[key], sticks.seeds[key], alpha)
        if t is not None:
            tests[key] = t
    adjusted = holm_distinct(tests)
    for key in beyond:
        m = metrics[key]
        t = tests.get(key)
        if t is None:
            if pairs is not None:
                why = f"{m.why}; fewer than two seeds retrained on both sides"
            elif sticks.n_seed < 2:
                why = f"{m.why}; no seed band to judge it by"
            else:
                why = f"{m.why}; no seed moved {key} (its seed sd is 0): not judged"
            metrics[key] = _replace(m, why=why)
            continue
        padj = adjusted[key]
        rung = Rung.DRIFTED if padj < alpha else Rung.SAME
        paired = t.method == "paired seeds"
        what = (f"shift {t.center:+.3g} (CI {t.center - t.half_width:+.3g} .. {t.center + t.half_width:+.3g}) over "
                f"{t.n} seed pairs" if paired else
                f"{'the reference' if tested == 'reference' else 'the cell'} at {abs(t.stat):.2g} "
                f"× the seed band's scale (n={t.n})")
        why = (f"{what}; p={t.p:.2g}, {_holm_words(distinct_hypotheses(list(tests)), padj)} "
               f"{'<' if rung is Rung.DRIFTED else '≥'} α={alpha:g}")
        metrics[key] = _replace(m, rung=rung, tested="pairs" if paired else tested, method=t.method, n=t.n, stat=t.stat,
                                p=t.p, p_holm=padj, shift=t.center if paired else None,
                                shift_ci=(t.center - t.half_width, t.center + t.half_width) if paired else None, why=why)
    rungs = [m.rung for m in metrics.values()]
    if weights_identical and all(r is Rung.BITWISE for r in rungs):
        cell = Rung.BITWISE
    else:
        cell = worst([r for r in rungs if r is not Rung.BITWISE] or [Rung.EQUAL]) or Rung.EQUAL
    deciding = _deciding(metrics, cell)
    return CellRung(rung=cell, reference=reference, alpha=alpha, metrics=metrics, bitwise_to=weights_identical,
                    tested=("pairs" if pairs is not None else tested) if tests else None, n_seed=sticks.n_seed,
                    n_tested=distinct_hypotheses(list(tests)), deciding=deciding,
                    evidence=_evidence(cell, metrics, deciding, weights_identical))


def same_test(key: str, keys: Sequence[str]) -> str:
    """The key whose test ``key``'s is: R² = 1 − MSE / var(y) on the same samples, so R² and MSE of one
    target are one hypothesis, not two (Holm counts it once)."""
    fam, _, target = key.partition("/")
    if fam == "mse" and f"r2/{target}" in keys:
        return f"r2/{target}"
    return key


def holm_distinct(tests: Mapping[str, stats.Test]) -> dict[str, float]:
    """Holm-adjusted p-values over the distinct hypotheses among ``tests`` (see :func:`same_test`)."""
    keys = list(tests)
    heads = {k: same_test(k, keys) for k in keys}
    adjusted = stats.holm({k: tests[k].p for k in keys if heads[k] == k})
    return {k: adjusted[heads[k]] for k in keys}


def distinct_hypotheses(keys: Sequence[str]) -> int:
    return len({same_test(k, keys) for k in keys})


def _holm_words(m: int, padj: float) -> str:
    return f"Holm over {m} metric(s) {padj:.2g}" if m > 1 else f"{padj:.2g}"


def _replace(m: MetricRung, **kw: object) -> MetricRung:
    from dataclasses import replace

    return replace(m, **kw)  # type: ignore[arg-type]


def _deciding(metrics: Mapping[str, MetricRung], cell: Rung) -> str | None:
    """The metric behind the cell's rung: the smallest Holm p among the tested, else the largest |Δ|/limit."""
    at = [k for k, m in metrics.items() if m.rung is cell]
    if not at:
        return None
    tested = [k for k in at if metrics[k].p_holm is not None]
    if tested:
        return min(tested, key=lambda k: (metrics[k].p_holm, k))  # type: ignore[arg-type]

    def ratio(k: str) -> float:
        m = metrics[k]
        return abs(m.delta) / m.limit if m.delta is not None and m.limit else 0.0
    return max(at, key=lambda k: (ratio(k), k))


def _evidence(cell: Rung, metrics: Mapping[str, MetricRung], deciding: str | None, bitwise_to: str | None) -> str:
    n = len(metrics)
    if cell is Rung.BITWISE:
        return f"its weights are identical to the {bitwise_to}'s, and so are all {n} metric(s)"
    m = metrics.get(deciding or "")
    if cell is Rung.EQUAL:
        if m is None:
            return "no metric to compare"
        return f"all {n} metric(s) within the numerical noise; closest to its edge: {deciding} {m.why}"
    return f"{deciding}: {m.why}" if m is not None else ""
