"""Per-target regression metrics (pure numpy, float64, original target units)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

METRICS = ("r2", "mse", "mae")


def per_target(y_true: np.ndarray, y_pred: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{"r2": {name: v}, "mse": {...}, "mae": {...}}`` for 2-D arrays (samples x targets).

    R² follows scikit-learn's ``r2_score`` per output: 1 - SS_res / SS_tot, with
    a constant target giving 1.0 when predicted exactly and 0.0 otherwise.
    """
    yt = np.asarray(y_true, dtype=np.float64)
    yp = np.asarray(y_pred, dtype=np.float64)
    if yt.ndim == 1:
        yt = yt[:, None]
    if yp.ndim == 1:
        yp = yp[:, None]
    if yt.shape != yp.shape:
        raise ValueError(f"shape mismatch: y_true {yt.shape} vs y_pred {yp.shape}")
    if yt.shape[1] != len(names):
        raise ValueError(f"{yt.shape[1]} targets but {len(names)} names")
    err = yp - yt
    mse = np.mean(err**2, axis=0)
    mae = np.mean(np.abs(err), axis=0)
    ss_res = np.sum(err**2, axis=0)
    ss_tot = np.sum((yt - yt.mean(axis=0)) ** 2, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), np.where(ss_res == 0, 1.0, 0.0))
    return {
        "r2": {n: float(v) for n, v in zip(names, r2)},
        "mse": {n: float(v) for n, v in zip(names, mse)},
        "mae": {n: float(v) for n, v in zip(names, mae)},
    }
