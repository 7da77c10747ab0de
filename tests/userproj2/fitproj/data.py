"""Loading plant.csv, splitting it, and standardising the features."""

import csv

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


def read_table(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        columns = reader.fieldnames
    return columns, {c: np.array([float(r[c]) for r in rows], dtype=np.float32) for c in columns}


def load_arrays(path, target_columns):
    columns, table = read_table(path)
    features = [c for c in columns if c not in target_columns]
    X = np.stack([table[c] for c in features], axis=1)
    y = np.stack([table[c] for c in target_columns], axis=1)
    return X, y, features


def holdout_split(n, val, test, seed):
    """Shuffled index split: (train, val, test) index arrays."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test)
    n_val = round(n * val)
    return order[n_test + n_val:], order[n_test:n_test + n_val], order[:n_test]


class Standardizer:
    def fit(self, X):
        self.mean = X.mean(axis=0)
        self.std = X.std(axis=0) + 1e-6
        return self

    def __call__(self, X):
        return ((X - self.mean) / self.std).astype(np.float32)


def make_loaders(cfg, data_path):
    """Train/val/test DataLoaders for cfg (features standardised on the train rows)."""
    dcfg, tcfg = cfg["data"], cfg["train"]
    X, y, _ = load_arrays(data_path, dcfg["target_columns"])
    tr, va, te = holdout_split(len(X), dcfg["holdout"]["val"], dcfg["holdout"]["test"], cfg["seed"])
    scale = Standardizer().fit(X[tr])

    def ds(idx):
        return TensorDataset(torch.from_numpy(scale(X[idx])), torch.from_numpy(y[idx]))

    train = DataLoader(ds(tr), batch_size=tcfg["batch_size"], shuffle=True, drop_last=True)
    val = DataLoader(ds(va), batch_size=tcfg.get("eval_batch_size", 256))
    test = DataLoader(ds(te), batch_size=tcfg.get("eval_batch_size", 256))
    return train, val, test
