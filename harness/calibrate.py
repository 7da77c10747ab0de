"""The verdict's false-alarm rate and power, measured by simulation through the judge's own ladder.

    python -m harness.calibrate [--cells 10000] [--alpha 0.01]

Synthetic cells are drawn from one distribution (no change: every "drifted" is a false alarm) or
from one shifted by k seed sd (every "drifted" is a detection), each judged against its own freshly
drawn seed band, exactly as harness.judge does it: :func:`harness.ladder.climb` on the tests of
:mod:`harness.stats`. Prints the table docs/verdicts.md quotes; tests/unit/test_calibrate.py asserts
the bounds. numpy draws the cells (imported here only).
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Sequence

from . import stats
from .ladder import Rung, Yardsticks, climb

TRIAL = "recorded trial"


def judge(rng: Any, n: int, shift: float, alpha: float, *, paired: bool = False, metrics: int = 1,
          rho: float = 0.0) -> bool:
    """One synthetic cell: True when it is called drifted. Metrics are unit-variance, correlated ``rho``."""
    import numpy as np

    cov = np.full((metrics, metrics), rho) + np.eye(metrics) * (1 - rho)
    keys = [f"m{i}" for i in range(metrics)]
    band = rng.multivariate_normal(np.zeros(metrics), cov, size=n)
    seeds = {k: stats.summarize(band[:, i]) for i, k in enumerate(keys)}
    sticks = Yardsticks(alpha=alpha, seeds=seeds, n_seed=n)
    if paired:  # the cell retrained with the band's own seeds: independent draws, shifted
        mine = rng.multivariate_normal(np.full(metrics, shift), cov, size=n)
        pairs = {k: list(mine[:, i] - band[:, i]) for i, k in enumerate(keys)}
        cell = mine[0]
    else:
        cell = rng.multivariate_normal(np.full(metrics, shift), cov)
        pairs = None
    # the reference sits 10 (beyond any float32 rounding) away, so every metric reaches the seed band
    deltas = {k: (10.0, 10.0 + float(cell[i])) for i, k in enumerate(keys)}
    values = {k: float(cell[i]) for i, k in enumerate(keys)}
    return climb(TRIAL, deltas, sticks, test_values=values, pairs=pairs).rung is Rung.DRIFTED


def rate(cells: int, seed: int, **kw: Any) -> float:
    """The share of ``cells`` synthetic cells called drifted (``kw``: :func:`judge`'s)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return sum(judge(rng, **kw) for _ in range(cells)) / cells


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=10_000)
    ap.add_argument("--alpha", type=float, default=stats.DEFAULT_ALPHA)
    a = ap.parse_args(argv)
    se = math.sqrt(a.alpha * (1 - a.alpha) / a.cells)
    print(f"false-alarm rate (no change), {a.cells} cells each, alpha {a.alpha} (binomial se {se:.4f}):")
    for n in (4, 8, 16):
        one = rate(a.cells, n, n=n, shift=0.0, alpha=a.alpha)
        many = rate(a.cells, 100 + n, n=n, shift=0.0, alpha=a.alpha, metrics=7, rho=0.0)
        corr = rate(a.cells, 200 + n, n=n, shift=0.0, alpha=a.alpha, metrics=7, rho=0.8)
        pair = rate(a.cells, 300 + n, n=n, shift=0.0, alpha=a.alpha, paired=True)
        print(f"  n={n:2d}: one metric {one:.4f}  7 independent {many:.4f}  7 at rho 0.8 {corr:.4f}  paired {pair:.4f}")
    print("power (a shift of k seed sd), one metric:")
    for n in (4, 8, 16):
        row = []
        for k in (1, 2, 3, 4, 6):
            single = rate(a.cells // 4, 400 + n * 10 + k, n=n, shift=float(k), alpha=a.alpha)
            paired = rate(a.cells // 4, 500 + n * 10 + k, n=n, shift=float(k), alpha=a.alpha, paired=True)
            row.append(f"{k} sd: {single:.2f} / {paired:.2f}")
        print(f"  n={n:2d} (one retrain / {n} seed pairs): " + "  ".join(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
