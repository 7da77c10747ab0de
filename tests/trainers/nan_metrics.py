"""A custom trainer whose validation loss is NaN (and, with NAN_ALL=1, every validation prediction)."""

import os

import numpy as np
import torch
from torch import nn


def train(config, ctx):
    data = np.load(ctx.data_path)
    x = torch.tensor(data["X"], dtype=torch.float32).flatten(1)
    y = data["y"].astype("float32")
    model = nn.Linear(x.shape[1], y.shape[1])
    with torch.no_grad():
        val = model(x[:10]).numpy()
        test = model(x[10:20]).numpy()
    if os.environ.get("NAN_ALL"):
        val = val * float("nan")
    return {"predictions": {"val": (y[:10], val), "test": (y[10:20], test)}, "val_loss": float("nan"),
            "state_dict": model.state_dict(), "target_names": [str(t) for t in data["target_names"]]}
