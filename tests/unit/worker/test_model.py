"""The reference models: config.yaml's model.name picks the MLP, a Conv1d or a GRU, each trained the same way."""

from __future__ import annotations

import pytest
import torch

from harness.bundle import ModelSpec, load_bundle
from harness.worker.data import prepare
from harness.worker.model import SignalConv1d, SignalGRU, SignalMLP, build, describe_mismatch
from harness.worker.train import split_indices, train_reference


@pytest.mark.parametrize(("name", "cls"), [("mlp", SignalMLP), ("conv1d", SignalConv1d), ("gru", SignalGRU)])
@pytest.mark.parametrize("kernel", [1, 5])
def test_each_model_maps_channels_by_time_to_targets(name: str, cls: type, kernel: int) -> None:
    spec = ModelSpec(name=name, hidden=8, num_layers=2, dropout_rate=0.1, use_residual=True, kernel_size=kernel)
    net = build(3 * 16, 2, spec, channels=3)
    assert isinstance(net, cls)
    net.eval()
    assert net(torch.zeros(5, 3, 16)).shape == (5, 2)


def test_a_conv_checkpoint_does_not_fit_an_mlp_config() -> None:
    conv = build(48, 2, ModelSpec(name="conv1d", hidden=8), channels=3)
    mlp = build(48, 2, ModelSpec(name="mlp", hidden=8), channels=3)
    assert describe_mismatch(mlp, conv.state_dict()) is not None


@pytest.mark.parametrize("name", ["conv1d", "gru"])
def test_the_reference_trainer_trains_them_reproducibly(make_bundle, name: str) -> None:
    bundle = load_bundle(make_bundle(model__name=name, model__kernel_size=3, training__epochs=2))
    data = prepare(bundle.data)
    split = split_indices(len(data.X), bundle.data.split, bundle.training.seed)
    y = data.y.astype("float32")
    runs = [train_reference(data, split, y, bundle.model, bundle.training, torch.device("cpu"))[1] for _ in range(2)]
    assert runs[0].val_loss is not None and runs[0].best_epoch in (1, 2)
    for k, v in runs[0].best_state.items():
        assert torch.equal(v, runs[1].best_state[k]), k  # same process, same seed: bit for bit
