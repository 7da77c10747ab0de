"""Produce examples/optuna_best/ (or optuna_best_conv/) by running a small Optuna study for real.

Each trial is a full retrain through harness's own worker, in this process,
so the recorded trial is exactly what `harness run` reruns. The best trial is
exported the way the seed document describes: config.yaml, trial_info.yaml,
target_scaler.joblib and weights/{best,last}.pt.

    pip install -e '.[optuna]'
    python examples/optimize.py [--trials 8] [--out examples/optuna_best]
    python examples/optimize.py --model conv1d --out examples/optuna_best_conv
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "signals.npz"

BASE_CONFIG = {
    "data": {
        "path": "../data/signals.npz",
        "exclude_channels": [3],
        "downsample": 2,
        "split": {"train": 0.7, "val": 0.15, "test": 0.15},
    },
    "model": {"name": "mlp", "hidden": 64, "num_layers": 2, "dropout_rate": 0.1, "use_residual": True, "activation": "relu"},
    "training": {"seed": 42, "batch_size": 32, "epochs": 25, "learning_rate": 1e-3, "weight_decay": 0.0,
                 "optimizer": "adam", "scale_targets": True},
}

# The convolutional example: its kernels (oneDNN) depend on the CPU instruction set, and
# dropout plus more epochs let training amplify those differences (see README, --isa).
CONV_CONFIG = {
    "data": dict(BASE_CONFIG["data"]),
    "model": {"name": "conv1d", "hidden": 16, "num_layers": 2, "kernel_size": 5, "dropout_rate": 0.1,
              "use_residual": True, "activation": "relu"},
    "training": {**BASE_CONFIG["training"], "epochs": 30},
}


def _reexec_with_determinism_env() -> None:
    # The seed document's variables only take effect when set before Python starts.
    want = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONHASHSEED": "0"}
    if any(os.environ.get(k) != v for k, v in want.items()):
        os.environ.update(want)
        os.execv(sys.executable, [sys.executable, *sys.argv])


def conv_trial_config(trial) -> dict:
    cfg = copy.deepcopy(CONV_CONFIG)
    cfg["model"]["hidden"] = trial.suggest_categorical("hidden", [8, 16, 24])
    cfg["model"]["num_layers"] = trial.suggest_int("num_layers", 1, 3)
    cfg["model"]["kernel_size"] = trial.suggest_categorical("kernel_size", [3, 5, 7])
    cfg["model"]["dropout_rate"] = trial.suggest_float("dropout_rate", 0.05, 0.3)
    cfg["training"]["learning_rate"] = trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)
    cfg["training"]["batch_size"] = trial.suggest_categorical("batch_size", [16, 32])
    return cfg


def trial_config(trial) -> dict:
    cfg = copy.deepcopy(BASE_CONFIG)
    cfg["model"]["hidden"] = trial.suggest_categorical("hidden", [32, 64, 128])
    cfg["model"]["num_layers"] = trial.suggest_int("num_layers", 1, 3)
    cfg["model"]["dropout_rate"] = trial.suggest_float("dropout_rate", 0.0, 0.3)
    cfg["model"]["use_residual"] = trial.suggest_categorical("use_residual", [True, False])
    cfg["training"]["learning_rate"] = trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
    cfg["training"]["batch_size"] = trial.suggest_categorical("batch_size", [16, 32, 64])
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--out", default=None, help="default: examples/optuna_best (mlp), examples/optuna_best_conv (conv1d)")
    ap.add_argument("--model", choices=("mlp", "conv1d"), default="mlp", help="the search space: the MLP or the Conv1d example")
    args = ap.parse_args()
    args.out = args.out or str(HERE / ("optuna_best" if args.model == "mlp" else "optuna_best_conv"))
    make_config = trial_config if args.model == "mlp" else conv_trial_config
    _reexec_with_determinism_env()

    import optuna

    from harness.record import RunSpec
    from harness.safeio import sha256_file
    from harness.worker.retrain import run

    data_sha = sha256_file(DATA)
    work = Path(tempfile.mkdtemp(prefix="harness-study-"))
    runs: dict[int, dict] = {}

    def objective(trial) -> float:
        cfg = make_config(trial)
        cfg["data"]["path"] = str(DATA)
        tdir = work / f"trial-{trial.number}"
        (tdir / "bundle").mkdir(parents=True)
        (tdir / "bundle" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        with contextlib.redirect_stdout(io.StringIO()):  # the worker's progress events
            rec = run(RunSpec(cell=f"trial-{trial.number}", bundle_dir=str(tdir / "bundle"), out_dir=str(tdir / "out"),
                              determinism="strict", backend="optuna"))
        m = rec.retrained
        trial.set_user_attr("r2", m["val"]["r2"])
        trial.set_user_attr("mse", m["val"]["mse"])
        trial.set_user_attr("mae", m["val"]["mae"])
        trial.set_user_attr("test_r2", m["test"]["r2"])
        trial.set_user_attr("best_epoch", m["best_epoch"])
        trial.set_user_attr("weights_sha256", rec.weights_sha256)
        runs[trial.number] = {"config": cfg, "dir": tdir, "env": rec.env.to_dict(), "determinism": rec.determinism}
        return m["val_loss"]

    study = optuna.create_study(direction="minimize",
                                study_name="harness-example" if args.model == "mlp" else "harness-example-conv",
                                sampler=optuna.samplers.TPESampler(seed=0))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=args.trials)
    best = study.best_trial
    chosen = runs[best.number]

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "weights").mkdir(parents=True)
    cfg = copy.deepcopy(chosen["config"])
    cfg["data"]["path"] = os.path.relpath(DATA, out)
    cfg["data"]["sha256"] = data_sha
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = chosen["env"]
    info = {
        "study": study.study_name,
        "number": best.number,
        "value": best.value,
        "params": best.params,
        "user_attrs": dict(best.user_attrs),
        "data_sha256": data_sha,
        "environment": {k: env.get(k) for k in ("python", "torch", "cuda", "cudnn", "device", "threads", "numpy")
                        + (("cpu_capability",) if args.model != "mlp" else ())},
        "n_trials": len(study.trials),
    }
    (out / "trial_info.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
    shutil.copy(chosen["dir"] / "out" / "target_scaler.joblib", out / "target_scaler.joblib")
    shutil.copy(chosen["dir"] / "out" / "weights" / "best.pt", out / "weights" / "best.pt")
    shutil.copy(chosen["dir"] / "out" / "weights" / "last.pt", out / "weights" / "last.pt")
    shutil.rmtree(work, ignore_errors=True)
    print(f"best trial {best.number}: val_loss {best.value:.6g} -> {out}")


if __name__ == "__main__":
    main()
