"""Metrics agree with scikit-learn's definitions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from harness.worker.metrics import per_target


def test_against_sklearn() -> None:
    rng = np.random.default_rng(1)
    yt = rng.standard_normal((50, 3))
    yp = yt + 0.3 * rng.standard_normal((50, 3))
    m = per_target(yt, yp, ["a", "b", "c"])
    np.testing.assert_allclose(list(m["r2"].values()), r2_score(yt, yp, multioutput="raw_values"), rtol=1e-12)
    np.testing.assert_allclose(list(m["mse"].values()), mean_squared_error(yt, yp, multioutput="raw_values"), rtol=1e-12)
    np.testing.assert_allclose(list(m["mae"].values()), mean_absolute_error(yt, yp, multioutput="raw_values"), rtol=1e-12)


def test_constant_target() -> None:
    yt = np.ones((5, 1))
    assert per_target(yt, yt, ["k"])["r2"]["k"] == 1.0
    assert per_target(yt, yt + 1, ["k"])["r2"]["k"] == 0.0


def test_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        per_target(np.zeros((3, 2)), np.zeros((3, 1)), ["a", "b"])
