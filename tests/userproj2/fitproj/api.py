"""Train one configuration and score it: what our Optuna objective calls."""

import time
from pathlib import Path

import yaml

from .data import make_loaders
from .trainer import Trainer
from .utils import pick_device, seed_everything


def load_config(path):
    with open(path) as fh:
        return yaml.safe_load(fh)


def train_and_eval(config, data_path=None, out_dir=None, device=None, verbose=True):
    """Train `config` (a dict or a YAML path) and return its validation and test scores."""
    if not isinstance(config, dict):
        base = Path(config).parent
        config = load_config(config)
        data_path = data_path or base / config["data"]["path"]
    data_path = data_path or config["data"]["path"]
    out_dir = Path(out_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    seed_everything(config["seed"], config.get("deterministic", True))
    train, val, test = make_loaders(config, data_path)
    n_in, n_out = (t.shape[1] for t in train.dataset.tensors)
    trainer = Trainer(config, n_in, n_out, device=pick_device(device), out_dir=out_dir)
    best = trainer.fit(train, val, log=print if verbose else (lambda *_: None))
    scores = trainer.evaluate(test)
    return {"val_mse": best["val_mse"], "val_mae": best["val_mae"], "test_mse": scores["mse"],
            "test_mae": scores["mae"], "best_epoch": best["epoch"]}
