"""The statistics behind a verdict (harness.stats), checked against closed forms and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from harness import stats


def test_summary_is_the_sample_mean_and_sd() -> None:
    s = stats.summarize([1.0, 2.0, 4.0, float("nan")])
    assert (s.n, s.mean) == (3, pytest.approx(7 / 3)) and s.sd == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert stats.summarize([1.0]) is None and stats.summarize([]) is None


def test_the_prediction_interval_is_mean_plus_t_sd_sqrt_one_plus_one_over_n() -> None:
    seeds = stats.Summary(8, 0.015, 0.0016)
    t = stats.prediction_test(0.0177, seeds, alpha=0.01)
    scale = 0.0016 * math.sqrt(1 + 1 / 8)
    assert t.stat == pytest.approx((0.0177 - 0.015) / scale)
    assert t.half_width == pytest.approx(sps.t.ppf(0.995, 7) * scale)
    assert t.p == pytest.approx(2 * sps.t.sf(abs(t.stat), 7))
    # on the interval's edge the p-value is alpha
    edge = stats.prediction_test(0.015 + t.half_width, seeds, alpha=0.01)
    assert edge.p == pytest.approx(0.01)
    assert stats.prediction_test(1.0, stats.Summary(4, 1.0, 0.0)) is None  # no spread: nothing to scale by


def test_the_paired_test_is_the_one_sample_t_test_of_the_differences() -> None:
    d = [0.01, 0.03, -0.005, 0.02, 0.015]
    t = stats.paired_test(d, alpha=0.05)
    ref = sps.ttest_1samp(d, 0.0)
    assert t.stat == pytest.approx(ref.statistic) and t.p == pytest.approx(ref.pvalue)
    lo, hi = t.center - t.half_width, t.center + t.half_width
    ci = ref.confidence_interval(0.95)
    assert (lo, hi) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert stats.paired_test([0.0, 0.0, 0.0]).p == 1.0 and stats.paired_test([1.0, 1.0]).p == 0.0
    assert stats.paired_test([1.0]) is None


def test_holm_adjusts_step_down_and_keeps_the_order() -> None:
    adj = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    assert adj == {"d": pytest.approx(0.02), "a": pytest.approx(0.03), "c": pytest.approx(0.06), "b": pytest.approx(0.06)}
    assert stats.holm({"x": 0.7}) == {"x": 0.7} and stats.holm({"x": 0.6, "y": 0.9}) == {"x": 1.0, "y": 1.0}


@pytest.mark.parametrize("x", [1.0, 0.0168, 0.97, 123.5, 1e-30])
def test_ulp32_is_the_float32_spacing(x: float) -> None:
    assert stats.ulp32(x) == pytest.approx(float(np.spacing(np.float32(x))), rel=1e-12)
    assert stats.ulp32(-x) == stats.ulp32(x)


def test_rounding_and_noise_limits() -> None:
    assert stats.rounding_limit(0.0168, 0.0168) == 8 * stats.ulp32(0.0168)
    assert stats.noise_limit(None) is None and stats.noise_limit(stats.Summary(1, 0, 0)) is None
    lim = stats.noise_limit(stats.Summary(4, 0.5, 1e-8), alpha=0.01)
    assert lim == pytest.approx(sps.t.ppf(0.995, 3) * 1e-8 * math.sqrt(2))


@pytest.mark.parametrize("bad", [0, -0.1, 0.6, float("nan")])
def test_alpha_is_a_probability(bad: float) -> None:
    with pytest.raises(ValueError):
        stats.check_alpha(bad)
