"""A bare retrain written the way the seed document prescribes, with no harness around it.

    python benchmarks/seed_retrain.py BUNDLE [--threads N] [--out DIR]

set_seed, seeded random_split, the archived target scaler, set_seed again and
build the model, DataLoader(shuffle=True, generator=seeded, num_workers=0),
epochs of MSE with a validation loss after each, the best epoch's weights kept.
The model class is harness's (the config names it), so both train the same
network; everything around it is the seed's plain loop. Prints the best
weights' digest as JSON, comparable with a harness record's weights_sha256.
The launcher sets CUBLAS_WORKSPACE_CONFIG and PYTHONHASHSEED before start.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import joblib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch.utils.data import DataLoader, Subset, TensorDataset, random_split  # noqa: E402

from harness.bundle import ModelSpec  # noqa: E402
from harness.worker.model import build, state_sha256  # noqa: E402


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)  # as harness's strict mode
    root = Path(a.bundle)
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    d, m, t = cfg["data"], cfg["model"], cfg["training"]
    seed = int(t["seed"])
    set_seed(seed)
    with np.load((root / d["path"]), allow_pickle=False) as npz:
        X, y = npz["X"], npz["y"]
    keep = [c for c in range(X.shape[1]) if c not in set(d.get("exclude_channels") or [])]
    X = np.ascontiguousarray(X[:, keep, :: int(d.get("downsample", 1))], dtype=np.float32)
    y = np.ascontiguousarray(y if y.ndim == 2 else y[:, None], dtype=np.float32)
    n = len(X)
    n_train, n_val = int(n * d["split"]["train"]), int(n * d["split"]["val"])
    tr, va, _ = random_split(range(n), [n_train, n_val, n - n_train - n_val], generator=torch.Generator().manual_seed(seed))
    scaler = joblib.load(root / "target_scaler.joblib")  # the archived scaler (code: the bundle is trusted here)
    ys = scaler.transform(y.astype(np.float64)).astype(np.float32)
    set_seed(seed)
    spec = ModelSpec(**{k: m[k] for k in ("name", "hidden", "num_layers", "dropout_rate", "use_residual", "activation",
                                           "kernel_size") if k in m})
    net = build(X.shape[1] * X.shape[2], ys.shape[1], spec, X.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=t["learning_rate"], weight_decay=t.get("weight_decay", 0.0))
    loss_fn = torch.nn.MSELoss()
    train = Subset(TensorDataset(torch.from_numpy(X), torch.from_numpy(ys)), list(tr.indices))
    loader = DataLoader(train, batch_size=int(t["batch_size"]), shuffle=True,
                        generator=torch.Generator().manual_seed(seed), num_workers=0, pin_memory=False)
    X_val, Y_val = torch.from_numpy(X[list(va.indices)]), ys[list(va.indices)]
    best, best_state = float("inf"), None
    for _ in range(int(t["epochs"])):
        net.train()
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(xb), yb)
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            pred = net(X_val).numpy().astype(np.float64)
        val = float(np.mean((pred - Y_val.astype(np.float64)) ** 2))
        if val < best:
            best, best_state = val, copy.deepcopy({k: v.detach().cpu() for k, v in net.state_dict().items()})
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        torch.save(best_state, Path(a.out) / "best.pt")
        torch.save(net.state_dict(), Path(a.out) / "last.pt")
    print(json.dumps({"weights_sha256": state_sha256(best_state), "val_loss": best}))


if __name__ == "__main__":
    main()
