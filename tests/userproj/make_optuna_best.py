"""Run once to (re)make data/series.csv and optuna_best/ with the project's own code.

    python make_optuna_best.py
"""

import csv
import os
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from userproj.train import retrain  # noqa: E402


def make_csv(path):
    rng = np.random.default_rng(7)
    t = np.arange(300)
    a = np.sin(t / 9.0) + 0.05 * rng.standard_normal(300)
    b = np.cos(t / 13.0) + 0.05 * rng.standard_normal(300)
    c = 0.6 * a - 0.3 * b + 0.05 * rng.standard_normal(300)
    d = 0.5 * np.roll(a, 2) + 0.4 * c + 0.05 * rng.standard_normal(300)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["a", "b", "c", "d"])
        for row in zip(a, b, c, d):
            w.writerow([f"{v:.5f}" for v in row])


def main():
    data = HERE / "data" / "series.csv"
    data.parent.mkdir(exist_ok=True)
    if not data.exists():
        make_csv(data)
    out = HERE / "optuna_best"
    (out / "weights").mkdir(parents=True, exist_ok=True)
    config = {
        "data": {"path": "../data/series.csv", "window": 8, "targets": ["c", "d"], "split": [0.7, 0.15, 0.15]},
        "model": {"hidden": 32},
        "training": {"seed": 1234, "lr": 0.003, "batch_size": 32, "epochs": 12},
    }
    result = retrain(config, str(out))
    torch.save(result["state_dict"], out / "weights" / "best.pt")
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    best_trial = {  # as optuna's study.best_trial gives it
        "number": 17,
        "value": result["val_loss"],
        "params": {"lr": 0.003, "hidden": 32},
        "user_attrs": {"r2": result["val"]["r2"], "mse": result["val"]["mse"], "mae": result["val"]["mae"],
                       "weights_sha256": result["weights_sha256"]},
    }
    (out / "trial_info.yaml").write_text(yaml.safe_dump(best_trial, sort_keys=False))
    print(yaml.safe_dump(best_trial, sort_keys=False))


if __name__ == "__main__":
    main()
