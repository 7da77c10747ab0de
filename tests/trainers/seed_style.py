"""A user's own trainer, written the way the seed document's code is written
(its own set_seed, split_dataset and DataLoader), plugged into harness through
the documented contract: ``train(config, ctx) -> dict``."""

import random

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset, random_split


def set_seed(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def split_dataset(dataset, seed, ratios):
    n = len(dataset)
    n_train = int(n * ratios["train"])
    n_val = int(n * ratios["val"])
    g = torch.Generator().manual_seed(seed)
    return random_split(dataset, [n_train, n_val, n - n_train - n_val], generator=g)


class _HandSGD:
    def __init__(self, params, lr):
        self.params, self.lr = list(params), lr

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        with torch.no_grad():
            for p in self.params:
                p -= self.lr * p.grad


class _Bare:
    """A model as bare tensors and a function: what a trainer without nn.Module looks like."""

    def __init__(self, net):
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in net.state_dict().items()}

    def __call__(self, x):
        p = self.params
        return nn.functional.linear(torch.relu(nn.functional.linear(x, p["0.weight"], p["0.bias"])),
                                    p["2.weight"], p["2.bias"])

    def parameters(self):
        return list(self.params.values())

    def state_dict(self):
        return {k: v.detach() for k, v in self.params.items()}

    def train(self):
        pass

    def eval(self):
        pass


def train(cfg, ctx):
    seed = 1234 if cfg.get("ignore_seed") else cfg["training"]["seed"]  # a project with its seed hard-coded
    set_seed(seed)
    data = np.load(ctx.data_path)
    X = torch.tensor(data["X"], dtype=torch.float32).flatten(1)
    y = torch.tensor(data["y"], dtype=torch.float32)
    train_ds, val_ds, test_ds = split_dataset(TensorDataset(X, y), seed, cfg["data"]["split"])
    loader = DataLoader(train_ds, batch_size=cfg["training"]["batch_size"], shuffle=True,
                        generator=torch.Generator().manual_seed(seed), num_workers=0, pin_memory=False)
    set_seed(seed)
    model = nn.Sequential(nn.Linear(X.shape[1], 16), nn.ReLU(), nn.Linear(16, y.shape[1]))
    if cfg.get("functional"):  # no nn.Module is ever called: the weights are bare tensors
        model = _Bare(model)
    if cfg.get("perturb_hook"):  # the documented hook: a band member's one-ulp change, else nothing
        model = ctx.perturb(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["training"]["learning_rate"])
    if cfg.get("hand_written_update"):  # plain SGD by hand: no torch.optim step for the hooks to see
        opt = _HandSGD(model.parameters(), cfg["training"]["learning_rate"])
    epochs = cfg["training"]["epochs"]
    for epoch in range(1, epochs + 1):
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            opt.step()
            if cfg.get("trace_hook"):  # the documented hook: the step's loss and parameters under --trace
                ctx.on_step(model, loss, epoch=epoch)
        model.eval()
        with torch.no_grad():
            xv, yv = val_ds[:]
            val_loss = nn.functional.mse_loss(model(xv), yv).item()
        ctx.progress(epoch, epochs, val_loss=val_loss)
    if cfg.get("fail_when_single_threaded") and torch.get_num_threads() == 1:
        raise RuntimeError("deliberate failure in a single-threaded cell")
    with torch.no_grad():
        preds = {name: (ds[:][1].numpy(), model(ds[:][0]).numpy()) for name, ds in (("val", val_ds), ("test", test_ds))}
    return {"predictions": preds, "val_loss": val_loss, "state_dict": model.state_dict(),
            "target_names": [str(t) for t in data["target_names"]], "extra": {"style": "seed"}}
