"""The reference retrain, written exactly as the seed document prescribes.

Order of operations (each step is a condition of the seed document):

1. ``set_seed(training.seed)`` (torch, numpy, random, CUDA)
2. ``random_split(dataset, [n_train, n_val, n_test], generator=torch.Generator().manual_seed(seed))``
3. the target scaler: the archived one when present, else a fresh one fitted on the train split
4. ``set_seed(seed)`` again, then build the model (default initialisers); an ulp band
   member moves one of its initial values by one ulp here (:mod:`harness.worker.perturb`)
5. training loader: ``DataLoader(train, batch_size, shuffle=True,
   generator=torch.Generator().manual_seed(seed), num_workers=0, pin_memory=False)``
6. epochs of MSE on scaled targets; validation loss after each epoch; the best
   epoch's weights kept (strictly lower validation loss wins) and the last epoch's

Step 5 has a second form, ``data_path="fast"`` (the default; :mod:`harness.worker.feed`):
the same batches in the same order from tensors resident on the device, taken only
when a real DataLoader's first epochs prove the replay equal for this torch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset, random_split

from . import feed as feed_mod
from . import model as model_mod
from ..bundle import ModelSpec, TrainingSpec
from ..errors import ErrorKind, RunFailed
from .data import Dataset, split_sizes
from .determinism import set_seed

ProgressFn = Callable[[int, int, dict[str, float]], None]
StepFn = Callable[[int, int, float, torch.nn.Module], None]  # epoch, step, loss, model after the step


class Diverged(RunFailed):
    """The training diverged: no epoch had a finite validation loss, so there are no best weights."""

    kind = ErrorKind.DIVERGED


def _diverged(spec: TrainingSpec, first_bad: tuple[int, int, float] | None, history: list[dict[str, float]],
              stopped: bool) -> Diverged:
    """The one line for a training whose every validation loss was NaN or infinite."""
    epochs = spec.epochs
    if first_bad is not None:  # the first training step whose loss was not finite
        epoch, step, loss = first_bad
        row = history[epoch - 1] if len(history) >= epoch else {}
        what = (f"its loss was {loss!r} at step {step} (epoch {epoch} of {epochs}; "
                f"validation loss {row.get('val_loss', float('nan'))!r})")
    else:
        row = next(r for r in history if not math.isfinite(r["val_loss"]))
        what = f"its validation loss was {row['val_loss']!r} at epoch {row['epoch']} of {epochs}"
    end = (f"stopped after epoch {len(history)}: the weights are no longer finite, so no later epoch can give "
           "a finite validation loss" if stopped else "no epoch had a finite validation loss, so there are no best weights")
    return Diverged(f"the training diverged: {what}; {end}",
                    hint=f"lower training.learning_rate in config.yaml (now {spec.learning_rate!r}), "
                         "or check the data and its scaling")


@dataclass
class Split:
    train: list[int]
    val: list[int]
    test: list[int]


@dataclass
class TrainOutput:
    best_state: dict[str, torch.Tensor] | None
    last_state: dict[str, torch.Tensor] | None
    val_loss: float | None  # the objective: best validation loss (scaled MSE)
    best_epoch: int | None
    history: list[dict[str, float]] = field(default_factory=list)
    predictions: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # split -> (y_true, y_pred), original units
    metrics: dict[str, Any] = field(default_factory=dict)  # only from custom trainers that compute their own
    extra: dict[str, Any] = field(default_factory=dict)


def split_indices(n: int, ratios: tuple[float, float, float], seed: int) -> Split:
    """The seed's ``split_dataset``: ``random_split`` with a freshly seeded generator."""
    sizes = split_sizes(n, ratios)
    g = torch.Generator().manual_seed(seed)
    parts = random_split(range(n), list(sizes), generator=g)
    return Split(*(list(map(int, p.indices)) for p in parts))


def make_train_loader(dataset: torch.utils.data.Dataset, batch_size: int, seed: int) -> DataLoader:
    """The seed's training loader: shuffled by an explicitly seeded generator, in-process."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=0,
        pin_memory=False,
    )


def batch_order(train_idx: Sequence[int], batch_size: int, seed: int, epochs: int) -> list[list[list[int]]]:
    """Original sample indices of every batch of every epoch, as the reference loop sees them."""
    loader = make_train_loader(Subset(TensorDataset(torch.arange(max(train_idx) + 1 if train_idx else 0)), list(train_idx)), batch_size, seed)
    return [[b[0].tolist() for b in loader] for _ in range(epochs)]


def _optimizer(params: Any, spec: TrainingSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    return torch.optim.SGD(params, lr=spec.learning_rate, weight_decay=spec.weight_decay, momentum=0.9)


@torch.no_grad()
def predict(net: torch.nn.Module, X: np.ndarray, device: torch.device, batch_size: int = 4096) -> np.ndarray:
    """Scaled-space predictions, in fixed-size chunks (no shuffling, no randomness)."""
    net.eval()
    out = []
    for start in range(0, len(X), batch_size):
        xb = torch.from_numpy(X[start : start + batch_size]).to(device)
        out.append(net(xb).float().cpu().numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, 0), dtype=np.float32)


def scaled_mse(pred_scaled: np.ndarray, y_scaled: np.ndarray) -> float:
    """The objective's validation loss: mean squared error over every element, scaled space."""
    d = pred_scaled.astype(np.float64) - y_scaled.astype(np.float64)
    return float(np.mean(d * d))


def train_reference(
    data: Dataset,
    split: Split,
    y_scaled: np.ndarray,
    model_spec: ModelSpec,
    spec: TrainingSpec,
    device: torch.device,
    *,
    progress: ProgressFn | None = None,
    on_step: StepFn | None = None,
    perturb: Callable[[torch.nn.Module], Any] | None = None,
    data_path: str | None = None,
) -> tuple[torch.nn.Module, TrainOutput]:
    """Train the reference model. ``y_scaled`` is y already passed through the scaler.

    ``perturb`` is called with the freshly built model, before it moves to ``device`` and
    before the optimizer sees it (an ulp band member's one-ulp change; draws no RNG).
    ``data_path``: "loader" or "fast" (None: the default); which one ran, and why, is in
    ``TrainOutput.extra["data_path"]``.
    """
    # Decided first: the proof draws only on generators of its own, never on the global RNG.
    row_bytes = (data.X[:1].nbytes + data.n_targets * 4) if len(data.X) else 0
    decision = feed_mod.decide(data_path, len(split.train), spec.batch_size, spec.seed,
                               nbytes=row_bytes * len(split.train), free_bytes=feed_mod.device_free_bytes(device))
    X_t = torch.from_numpy(data.X)
    Y_t = torch.from_numpy(y_scaled.astype(np.float32))
    train_set = Subset(TensorDataset(X_t, Y_t), split.train)
    X_val = data.X[split.val]
    Y_val = y_scaled[split.val]

    set_seed(spec.seed)  # seeding right before building the model: same initial weights
    net = model_mod.build(data.n_features, data.n_targets, model_spec, int(data.X.shape[1]))
    if perturb is not None:
        perturb(net)
    net = net.to(device)
    opt = _optimizer(net.parameters(), spec)
    loss_fn = torch.nn.MSELoss()
    if decision.effective == "fast":
        rows = torch.as_tensor(split.train, dtype=torch.int64)
        loader: Any = feed_mod.ResidentFeed((X_t[rows], Y_t[rows]), spec.batch_size,
                                            torch.Generator().manual_seed(spec.seed), device)
    else:
        loader = make_train_loader(train_set, spec.batch_size, spec.seed)

    best_loss = math.inf
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int | None = None
    history: list[dict[str, float]] = []
    step = 0
    first_bad: tuple[int, int, float] | None = None  # (epoch, step, loss): the first step whose loss was not finite
    for epoch in range(1, spec.epochs + 1):
        net.train()
        total, count = 0.0, 0
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(xb), yb)
            loss.backward()
            opt.step()
            step += 1
            lv = float(loss.detach())
            if first_bad is None and not math.isfinite(lv):
                first_bad = (epoch, step, lv)
            total += lv * len(xb)
            count += len(xb)
            if on_step is not None:
                on_step(epoch, step, lv, net)
        val_loss = scaled_mse(predict(net, X_val, device), Y_val)
        row = {"epoch": epoch, "train_loss": total / max(count, 1), "val_loss": val_loss}
        history.append(row)
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in net.state_dict().items()})
        if progress is not None:
            progress(epoch, spec.epochs, row)
        if best_state is None and not math.isfinite(val_loss) and epoch < spec.epochs and not all(
                bool(torch.isfinite(p).all()) for p in net.parameters()):
            # A NaN or infinite weight stays so under every optimizer here: the rest would be NaN too.
            raise _diverged(spec, first_bad, history, stopped=True)
    if best_state is None:
        raise _diverged(spec, first_bad, history, stopped=False)
    last_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    return net, TrainOutput(
        best_state=best_state,
        last_state=last_state,
        val_loss=best_loss if math.isfinite(best_loss) else None,
        best_epoch=best_epoch,
        history=history,
        extra={"data_path": decision.to_dict()},
    )
