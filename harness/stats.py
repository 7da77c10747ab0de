"""The statistics behind a verdict: prediction intervals, paired tests, Holm's correction. Pure.

Everything a verdict claims about a distribution is computed here, from plain numbers,
so that the false-alarm rate and the power can be measured by simulation against the
very functions the judge calls (``tests/unit/test_calibrate.py``). scipy supplies the
Student t distribution; it is imported on first use, so that the CLI starts without it.

The model (docs/verdicts.md, "How a verdict is reached"): the metrics of retrains that
differ only in their training seed are independent draws from one distribution that is
close to normal. A seed band of ``n`` such retrains estimates its mean and sd. A cell
that is one more draw from it lands inside ``mean ± t(n−1, 1−α/2)·sd·√(1 + 1/n)`` with
probability exactly ``1 − α``: the prediction interval. With the same seeds retrained in
the cell's own environment, the paired differences test the shift directly.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass
from typing import Mapping, Sequence

DEFAULT_ALPHA = 0.01  # the false-alarm rate of "drifted" per cell (--alpha)
FLOAT32_ULPS = 8  # |Δ| within this many float32 ulps of the metric is rounding, whatever the bands say


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float in (0, 0.5]; ValueError otherwise."""
    a = float(alpha)
    if not (0.0 < a <= 0.5) or math.isnan(a):
        raise ValueError(f"alpha must be in (0, 0.5], got {alpha!r}")
    return a


@functools.lru_cache(maxsize=4096)
def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(q, df))


def t_two_sided_p(stat: float, df: int) -> float:
    """P(|T| >= |stat|) for Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(min(1.0, 2.0 * t.sf(abs(stat), df)))


@dataclass(frozen=True)
class Summary:
    """n, mean and sample sd (n − 1) of finite values."""

    n: int
    mean: float
    sd: float


def summarize(values: Sequence[float]) -> Summary | None:
    """The summary of the finite ``values``; None with fewer than two."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if len(vals) < 2:
        return None
    mean = math.fsum(vals) / len(vals)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return Summary(len(vals), mean, sd)


@dataclass(frozen=True)
class Test:
    """One metric's test: the statistic, its two-sided p-value, and the interval it was read against."""

    method: str  # "prediction interval" | "paired seeds"
    n: int  # seed members (prediction interval) or pairs (paired seeds)
    stat: float  # a Student t statistic with n − 1 degrees of freedom
    p: float
    center: float  # the interval's centre: the seed mean, or the mean shift (paired)
    half_width: float  # at the alpha the test was made for
    alpha: float


def prediction_test(value: float, seeds: Summary, alpha: float = DEFAULT_ALPHA) -> Test | None:
    """Is ``value`` one more draw from the distribution ``seeds`` was drawn from?

    ``(value − mean) / (sd·√(1 + 1/n))`` is Student t with n − 1 degrees of freedom when it is,
    whatever the true mean and sd. None when the sd is 0 (a metric no seed moved: nothing to scale by).
    """
    if seeds.n < 2 or not seeds.sd > 0 or not math.isfinite(value):
        return None
    scale = seeds.sd * math.sqrt(1.0 + 1.0 / seeds.n)
    stat = (value - seeds.mean) / scale
    return Test("prediction interval", seeds.n, stat, t_two_sided_p(stat, seeds.n - 1), seeds.mean,
                t_quantile(1.0 - alpha / 2.0, seeds.n - 1) * scale, alpha)


def paired_test(diffs: Sequence[float], alpha: float = DEFAULT_ALPHA) -> Test | None:
    """Is the mean of the paired differences (cell − band, seed by seed) zero?

    The one-sample t test on the differences: ``mean / (sd / √k)`` with k − 1 degrees of freedom.
    ``center ± half_width`` is the 1 − alpha confidence interval of the shift. None with fewer than two
    pairs; all differences exactly 0 is a shift of 0 with p = 1.
    """
    s = summarize(diffs)
    if s is None:
        return None
    if s.sd == 0:
        if s.mean == 0:
            return Test("paired seeds", s.n, 0.0, 1.0, 0.0, 0.0, alpha)
        return Test("paired seeds", s.n, math.copysign(math.inf, s.mean), 0.0, s.mean, 0.0, alpha)
    se = s.sd / math.sqrt(s.n)
    stat = s.mean / se
    return Test("paired seeds", s.n, stat, t_two_sided_p(stat, s.n - 1), s.mean,
                t_quantile(1.0 - alpha / 2.0, s.n - 1) * se, alpha)


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment: reject ``key`` at level α when its adjusted p-value is below α.

    The chance that any of the hypotheses is rejected when all are true is at most α, whatever
    their dependence (Holm 1979); it is uniformly more powerful than Bonferroni's ``m·p``.
    """
    order = sorted(pvalues, key=lambda k: (pvalues[k], k))
    m = len(order)
    out: dict[str, float] = {}
    running = 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[key]))
        out[key] = running
    return out


def ulp32(x: float) -> float:
    """The spacing of float32 numbers at ``|x|`` (its unit in the last place)."""
    a = abs(float(x))
    if not math.isfinite(a):
        return math.inf
    if a >= 3.4028234663852886e38:
        return 2.0 ** 104
    bits = struct.unpack("<I", struct.pack("<f", a))[0]  # rounds a to the nearest float32
    nxt = struct.unpack("<f", struct.pack("<I", bits + 1))[0]
    here = struct.unpack("<f", struct.pack("<I", bits))[0]
    return nxt - here


def rounding_limit(a: float, b: float, ulps: int = FLOAT32_ULPS) -> float:
    """``ulps`` float32 ulps at the larger of |a| and |b|: a difference below it is rounding, not a change."""
    return ulps * ulp32(max(abs(a), abs(b)))


def noise_limit(noise: Summary | None, alpha: float = DEFAULT_ALPHA) -> float | None:
    """The largest |Δ| between two runs that differ only by ``noise`` (n runs of one trajectory, one ulp
    apart): ``t(n−1, 1−α/2)·sd·√2``, the prediction interval of a difference of two such runs."""
    if noise is None or noise.n < 2:
        return None
    return t_quantile(1.0 - alpha / 2.0, noise.n - 1) * noise.sd * math.sqrt(2.0)
