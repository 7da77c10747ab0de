"""A trainer command for the tests that trains, seeding itself as a project does.

    python cmd_fit.py (--config CFG | --bundle DIR) --data NPZ --out DIR [--seed N] [--update torch|hand]
                      [--steps N] [--child-steps N]

The seed is ``--seed`` when given, else the config's ``training.seed`` (``--bundle DIR``:
``DIR/config.yaml``, the trial's file, whatever the harness hands elsewhere). It trains a
tiny MLP on the npz's X/y for ``--steps`` steps: ``torch.optim.SGD`` (``--update torch``) or a
hand-written update (``hand``). With ``--child-steps N`` it then runs itself again as a
child Python process that trains N more steps of its own (its output under ``OUT/child``).
It writes ``OUT/weights/best.pt`` and prints its metrics as one JSON line.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch
import yaml


def main() -> None:
    p = argparse.ArgumentParser()
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--config")
    where.add_argument("--bundle")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int)
    p.add_argument("--update", choices=("torch", "hand"), default="torch")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--child-steps", type=int, default=0)
    a = p.parse_args()
    config = a.config or os.path.join(a.bundle, "config.yaml")
    with open(config, encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    seed = a.seed if a.seed is not None else cfg["training"]["seed"]
    torch.manual_seed(seed)
    data = np.load(a.data)
    X = torch.tensor(data["X"], dtype=torch.float32).flatten(1)
    y = torch.tensor(data["y"], dtype=torch.float32)
    model = torch.nn.Sequential(torch.nn.Linear(X.shape[1], 8), torch.nn.ReLU(), torch.nn.Linear(8, y.shape[1]))
    opt = torch.optim.SGD(model.parameters(), lr=0.05) if a.update == "torch" else None
    for _ in range(a.steps):
        idx = torch.randint(0, len(X), (16,))
        loss = torch.nn.functional.mse_loss(model(X[idx]), y[idx])
        model.zero_grad()
        loss.backward()
        if opt is not None:
            opt.step()
        else:
            with torch.no_grad():
                for param in model.parameters():
                    param -= 0.05 * param.grad
    if a.child_steps:
        child = [sys.executable, os.path.abspath(__file__), "--config", config, "--data", a.data,
                 "--out", os.path.join(a.out, "child"), "--seed", str(seed), "--steps", str(a.child_steps)]
        subprocess.run(child, check=True, stdout=subprocess.DEVNULL)
    os.makedirs(os.path.join(a.out, "weights"), exist_ok=True)
    torch.save(model.state_dict(), os.path.join(a.out, "weights", "best.pt"))
    with torch.no_grad():
        val_loss = torch.nn.functional.mse_loss(model(X), y).item()
    print(json.dumps({"val_loss": val_loss, "extra": {"seed": seed, "config": config}}))


if __name__ == "__main__":
    main()
