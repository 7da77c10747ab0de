"""Optional glue a project adds so that harness can check more than its metrics:
the split it used, the scaler refit, and its archived weights evaluated here.
``retrain`` in train.py stays as it is; these reuse the project's own code."""

import os

import joblib
import torch
import torch.nn as nn
from sklearn.preprocessing import StandardScaler

from .train import MLP, fit, load_dataset, scores, split_dataset


def build_model(config, optuna_best_dir, data_path=None):
    """config.yaml trainer.model_fn: the project's model, untrained, for this config and data."""
    X, y = load_dataset(config, optuna_best_dir, data_path).tensors
    return MLP(X.shape[1], y.shape[1], config["model"]["hidden"])


def predict(model, config, optuna_best_dir, data_path=None):
    """config.yaml trainer.predict: the project's own scores of a model on its val and test splits."""
    ds = load_dataset(config, optuna_best_dir, data_path)
    _train, val_ds, test_ds = split_dataset(ds, config["data"]["split"], config["training"]["seed"])
    with torch.no_grad():
        xv, yv = val_ds[:]
        val_loss = nn.MSELoss()(model(xv), yv).item()
    return {"val": scores(model, val_ds), "test": scores(model, test_ds), "val_loss": val_loss}


def retrain_checked(config, optuna_best_dir, ctx, data_path=None):
    """The project's retrain, telling the harness its split and its train targets."""
    result, (train_ds, val_ds, test_ds) = fit(config, optuna_best_dir, data_path)
    ctx.declare_length(len(train_ds.dataset))
    ctx.report_split(train_ds, val_ds, test_ds)
    ctx.check_scaler(train_ds[:][1].numpy())
    return result


def archive_scaler(config, optuna_best_dir, data_path=None):
    """What the project archives beside its weights: the target scaler fitted on its train split."""
    ds = load_dataset(config, optuna_best_dir, data_path)
    train_ds, _val, _test = split_dataset(ds, config["data"]["split"], config["training"]["seed"])
    scaler = StandardScaler().fit(train_ds[:][1].numpy())
    joblib.dump(scaler, os.path.join(optuna_best_dir, "target_scaler.joblib"))
    return scaler
