"""A user's trainer whose head carries a LoRA adapter (Hu et al. 2021): its B matrix starts at zero.

A one-ulp change of a zero is a denormal (1.4e-45). It vanishes in the forward pass (added to
values of order one), and Adam's first step moves that weight by about the learning rate, where
the denormal is far below one ulp: training rounds the change away, every time, on any CPU. A
change drawn elsewhere in the head reaches training. ``config.yaml`` key ``perturb`` says what
the trainer hands to ``ctx.perturb``: ``head`` (every value of the head) or ``lora_b`` (B only);
``rank`` the adapter's rank.
"""

import numpy as np
import torch
import torch.nn as nn

RANK = 1


class Head(nn.Module):
    """``y = W h + b + B (A h)``; A random, B zero, as LoRA starts."""

    def __init__(self, features, targets, rank=RANK):
        super().__init__()
        self.linear = nn.Linear(features, targets)
        self.lora_a = nn.Parameter(torch.randn(rank, features) / features ** 0.5)
        self.lora_b = nn.Parameter(torch.zeros(targets, rank))

    def forward(self, h):
        return self.linear(h) + (h @ self.lora_a.T) @ self.lora_b.T


class LoraB(nn.Module):
    """The head's B alone, as the module handed to ``ctx.perturb`` (its one parameter, shared)."""

    def __init__(self, head):
        super().__init__()
        self.lora_b = head.lora_b


def build(features, targets, hidden=6, rank=RANK):
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), Head(hidden, targets, rank))


def train(cfg, ctx):
    seed = cfg["training"]["seed"]
    torch.manual_seed(seed)
    data = np.load(ctx.data_path)
    X = torch.tensor(data["X"], dtype=torch.float32).flatten(1)
    y = torch.tensor(data["y"], dtype=torch.float32)
    n = len(X)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(n * 0.6), int(n * 0.2)
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    model = build(X.shape[1], y.shape[1], rank=cfg.get("rank", RANK))
    head = model[2]
    ctx.perturb(LoraB(head) if cfg.get("perturb") == "lora_b" else head)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["training"]["learning_rate"])
    xt, yt = X[parts["train"]], y[parts["train"]]
    batch = cfg["training"]["batch_size"]
    epochs = cfg["training"]["epochs"]
    for epoch in range(1, epochs + 1):
        for i in range(0, len(xt), batch):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(xt[i:i + batch]), yt[i:i + batch])
            loss.backward()
            opt.step()
        with torch.no_grad():
            val_loss = nn.functional.mse_loss(model(X[parts["val"]]), y[parts["val"]]).item()
        ctx.progress(epoch, epochs, val_loss=val_loss)
    with torch.no_grad():
        preds = {name: (y[parts[name]].numpy(), model(X[parts[name]]).numpy()) for name in ("val", "test")}
    return {"predictions": preds, "val_loss": val_loss, "state_dict": model.state_dict(),
            "target_names": [str(t) for t in data["target_names"]]}
