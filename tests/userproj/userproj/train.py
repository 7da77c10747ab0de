"""A small forecasting project's training code, written as such projects are:
its own CSV loader, windowing, seeding, split and loop. Nothing here knows
about harness."""

import csv
import hashlib
import os
import random

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset, random_split


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def load_csv(path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    return header, np.array([[float(v) for v in r] for r in body], dtype=np.float32)


def make_windows(values, window, target_cols):
    """Each sample: `window` past rows of every column -> the next row's target columns."""
    X, y = [], []
    for t in range(window, len(values)):
        X.append(values[t - window:t].reshape(-1))
        y.append(values[t, target_cols])
    return np.stack(X), np.stack(y)


def split_dataset(dataset, ratios, seed):
    n = len(dataset)
    n_train = int(n * ratios[0])
    n_val = int(n * ratios[1])
    sizes = [n_train, n_val, n - n_train - n_val]
    return random_split(dataset, sizes, generator=torch.Generator().manual_seed(seed))


class MLP(nn.Module):
    def __init__(self, n_in, n_out, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))

    def forward(self, x):
        return self.net(x)


def weights_digest(state):
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(name.encode())
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def scores(model, ds):
    with torch.no_grad():
        xb, yb = ds[:]
        pred = model(xb)
    err = (pred - yb).numpy().astype(np.float64)
    yt = yb.numpy().astype(np.float64)
    ss_res = (err ** 2).sum(axis=0)
    ss_tot = ((yt - yt.mean(axis=0)) ** 2).sum(axis=0)
    return {"r2": float(np.mean(1.0 - ss_res / ss_tot)), "mse": float(np.mean(err ** 2)),
            "mae": float(np.mean(np.abs(err)))}


def load_dataset(config, optuna_best_dir, data_path=None):
    dc = config["data"]
    if data_path is None:
        data_path = os.path.join(optuna_best_dir, dc["path"])
    header, values = load_csv(data_path)
    targets = [header.index(c) for c in dc["targets"]]
    X, y = make_windows(values, dc["window"], targets)
    return TensorDataset(torch.from_numpy(X), torch.from_numpy(y))


def fit(config, optuna_best_dir, data_path=None):
    """The retrain; returns its result and the (train, val, test) subsets it used."""
    tr, dc, mc = config["training"], config["data"], config["model"]
    seed = tr["seed"]
    set_seed(seed)
    ds = load_dataset(config, optuna_best_dir, data_path)
    X, y = ds.tensors
    train_ds, val_ds, test_ds = split_dataset(ds, dc["split"], seed)
    loader = DataLoader(train_ds, batch_size=tr["batch_size"], shuffle=True,
                        generator=torch.Generator().manual_seed(seed), num_workers=0)
    model = MLP(X.shape[1], y.shape[1], mc["hidden"])
    opt = torch.optim.Adam(model.parameters(), lr=tr["lr"])
    loss_fn = nn.MSELoss()
    best, best_state = float("inf"), None
    for _epoch in range(tr["epochs"]):
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            xv, yv = val_ds[:]
            val_loss = loss_fn(model(xv), yv).item()
        if val_loss < best:
            best = val_loss
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    result = {"val": scores(model, val_ds), "test": scores(model, test_ds), "val_loss": best,
              "state_dict": best_state, "weights_sha256": weights_digest(best_state)}
    return result, (train_ds, val_ds, test_ds)


def retrain(config, optuna_best_dir, data_path=None):
    return fit(config, optuna_best_dir, data_path)[0]
