"""Run once to (re)make data/plant.csv and optuna_best/ with the project's own code.

    python make_optuna_best.py

optuna_best/ holds what our Optuna study kept of its best trial: the trial's
config.yaml, trial_info.yaml (study.best_trial) and weights/best.ckpt, the
project's own checkpoint of that trial.
"""

import csv
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fitproj.api import train_and_eval

CONFIG = {
    "seed": 2024,
    "deterministic": True,
    "data": {"path": "../data/plant.csv", "target_columns": ["yield", "energy"],
             "holdout": {"val": 0.2, "test": 0.2}},
    "model": {"hidden": 32, "depth": 2, "dropout": 0.05},
    "optim": {"lr": 0.004, "weight_decay": 0.01, "betas": [0.9, 0.99], "schedule": "onecycle"},
    "train": {"epochs": 10, "batch_size": 16, "accum_steps": 2, "grad_clip": 1.0},
    "precision": "bf16",
    "compile": "aot_eager",
}


def make_csv(path, n=360):
    rng = np.random.default_rng(11)
    temp = rng.normal(80, 6, n)
    pressure = rng.normal(2.0, 0.3, n)
    humidity = rng.uniform(20, 70, n)
    flow = rng.normal(12, 2, n)
    rpm = rng.uniform(900, 1500, n)
    voltage = rng.normal(230, 4, n)
    z = (temp - 80) / 6
    yld = 0.6 + 0.08 * z - 0.05 * z ** 2 + 0.1 * (pressure - 2) + 0.002 * (flow - 12) * (rpm - 1200) / 100 \
        + 0.02 * rng.standard_normal(n)
    energy = 3.0 + 0.004 * (rpm - 1200) + 0.15 * np.tanh((humidity - 45) / 10) + 0.05 * (voltage - 230) / 4 \
        + 0.05 * rng.standard_normal(n)
    cols = {"temp": temp, "pressure": pressure, "humidity": humidity, "flow": flow, "rpm": rpm,
            "voltage": voltage, "yield": yld, "energy": energy}
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(cols))
        for row in zip(*cols.values()):
            w.writerow([f"{v:.4f}" for v in row])


def main():
    data = HERE / "data" / "plant.csv"
    data.parent.mkdir(exist_ok=True)
    if not data.exists():
        make_csv(data)
    out = HERE / "optuna_best"
    (out / "weights").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as run_dir:
        metrics = train_and_eval(CONFIG, data_path=str(data), out_dir=run_dir)
        shutil.copy(Path(run_dir) / "checkpoints" / "best.ckpt", out / "weights" / "best.ckpt")
    (out / "config.yaml").write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    best_trial = {  # as optuna's study.best_trial gives it
        "number": 23,
        "value": metrics["val_mse"],
        "params": {"lr": CONFIG["optim"]["lr"], "hidden": CONFIG["model"]["hidden"],
                   "accum_steps": CONFIG["train"]["accum_steps"]},
        "user_attrs": {k: metrics[k] for k in ("val_mae", "test_mse", "test_mae", "best_epoch")},
    }
    (out / "trial_info.yaml").write_text(yaml.safe_dump(best_trial, sort_keys=False))
    print(yaml.safe_dump(best_trial, sort_keys=False))


if __name__ == "__main__":
    main()
