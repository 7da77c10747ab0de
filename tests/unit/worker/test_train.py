"""The reference retrain follows the seed document's procedure exactly."""

from __future__ import annotations


import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset, random_split

import harness.worker.train as train_mod
from harness.bundle import load_bundle
from harness.worker.data import prepare
from harness.worker.determinism import set_seed
from harness.worker.train import batch_order, split_indices, train_reference


def seed_split_dataset(dataset, seed: int, ratios=(0.6, 0.2, 0.2)):
    """The seed document's split_dataset, written as it is there."""
    n = len(dataset)
    n_train = int(n * ratios[0])
    n_val = int(n * ratios[1])
    n_test = n - n_train - n_val
    g = torch.Generator().manual_seed(seed)
    return random_split(dataset, [n_train, n_val, n_test], generator=g)


def seed_loader(train_ds, batch_size: int, seed: int) -> DataLoader:
    return DataLoader(train_ds, batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed), num_workers=0, pin_memory=False)


def test_split_equals_seed_code() -> None:
    n, seed = 57, 42
    ds = TensorDataset(torch.arange(n))
    tr, va, te = seed_split_dataset(ds, seed)
    ours = split_indices(n, (0.6, 0.2, 0.2), seed)
    assert ours.train == list(tr.indices) and ours.val == list(va.indices) and ours.test == list(te.indices)
    assert sorted(ours.train + ours.val + ours.test) == list(range(n))
    assert split_indices(n, (0.6, 0.2, 0.2), seed + 1).train != ours.train


def test_batch_order_equals_seed_code() -> None:
    n, seed, bs, epochs = 57, 42, 8, 3
    ds = TensorDataset(torch.arange(n))
    tr, _, _ = seed_split_dataset(ds, seed)
    loader = seed_loader(tr, bs, seed)
    expected = [[b[0].tolist() for b in loader] for _ in range(epochs)]
    assert batch_order(split_indices(n, (0.6, 0.2, 0.2), seed).train, bs, seed, epochs) == expected
    assert expected[0] != expected[1]  # a fresh permutation every epoch, from the one seeded generator


def test_reference_loop_sees_the_seed_batches(make_bundle, monkeypatch) -> None:
    """Instrument the loop's loader: the samples it trains on, batch by batch, are the seed code's."""
    bundle = load_bundle(make_bundle(training__epochs=2))
    data = prepare(bundle.data)
    seen: list[list[int]] = []
    row_index = {data.X[i].tobytes(): i for i in range(len(data.X))}
    real = train_mod.make_train_loader

    class Spy:
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            for xb, yb in self.loader:
                seen.append([row_index[x.numpy().tobytes()] for x in xb])
                yield xb, yb

    monkeypatch.setattr(train_mod, "make_train_loader", lambda *a, **k: Spy(real(*a, **k)))
    split = split_indices(len(data.X), bundle.data.split, bundle.training.seed)
    set_seed(bundle.training.seed)
    train_reference(data, split, data.y, bundle.model, bundle.training, torch.device("cpu"), data_path="loader")
    tr, _, _ = seed_split_dataset(TensorDataset(torch.arange(len(data.X))), bundle.training.seed, bundle.data.split)
    loader = seed_loader(tr, bundle.training.batch_size, bundle.training.seed)
    expected = [b[0].tolist() for _ in range(2) for b in loader]
    assert seen == expected


def test_same_seed_same_weights_in_process(make_bundle) -> None:
    bundle = load_bundle(make_bundle())
    data = prepare(bundle.data)
    split = split_indices(len(data.X), bundle.data.split, bundle.training.seed)
    outs = []
    for _ in range(2):
        set_seed(bundle.training.seed)
        _, out = train_reference(data, split, data.y, bundle.model, bundle.training, torch.device("cpu"))
        outs.append(out)
    for k in outs[0].best_state:
        assert torch.equal(outs[0].best_state[k], outs[1].best_state[k])
    assert outs[0].val_loss == outs[1].val_loss
    assert [h["epoch"] for h in outs[0].history] == [1, 2]
    assert outs[0].best_epoch in (1, 2)
    assert np.isfinite(outs[0].val_loss)
