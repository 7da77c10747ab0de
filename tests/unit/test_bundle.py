"""config.yaml / trial_info.yaml validation (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.bundle import load_bundle, parse_config, parse_trial_info
from harness.errors import InputError

from tests.conftest import DELETE, tiny_config


def test_defaults_and_resolution(tmp_path: Path) -> None:
    data, model, training, trainer = parse_config(tiny_config(), tmp_path)
    assert data.resolved == str((tmp_path / "signals.npz").resolve())
    assert data.split == (0.6, 0.2, 0.2)
    assert data.exclude_channels == (2,)
    assert model.hidden == 16 and model.activation == "relu"
    assert training.seed == 7 and training.optimizer == "adam" and training.scale_targets
    assert trainer is None


def test_data_override_and_absolute(tmp_path: Path) -> None:
    data, *_ = parse_config(tiny_config(data__path="/abs/x.npz"), tmp_path)
    assert data.resolved == "/abs/x.npz"
    data, *_ = parse_config(tiny_config(), tmp_path, data_override=str(tmp_path / "other.npz"))
    assert data.resolved.endswith("other.npz")


def test_test_ratio_defaults_to_rest(tmp_path: Path) -> None:
    data, *_ = parse_config(tiny_config(data__split={"train": 0.5, "val": 0.25}), tmp_path)
    assert data.split == (0.5, 0.25, 0.25)


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"training__seed": DELETE}, "training.seed is missing (needed to seed every RNG and the split)"),
        ({"training__seed": "42"}, "training.seed must be an integer, got str '42'"),
        ({"training__seed": True}, "training.seed must be an integer"),
        ({"training__batch_size": 0}, "training.batch_size must be >= 1"),
        ({"training__batch_size": 3.5}, "training.batch_size must be an integer"),
        ({"training__epochs": DELETE}, "training.epochs is missing"),
        ({"training__learning_rate": -1.0}, "training.learning_rate must be > 0"),
        ({"training__optimizer": "lion"}, "training.optimizer is 'lion'"),
        ({"data__path": DELETE}, "data.path is missing"),
        ({"data__split": {"train": 0.9, "val": 0.2, "test": 0.1}}, "data.split ratios must be >= 0 and sum to 1"),
        ({"data__downsample": 0}, "data.downsample must be >= 1"),
        ({"data__exclude_channels": ["a"]}, "data.exclude_channels must be a list of integers"),
        ({"model__dropout_rate": 1.5}, "model.dropout_rate must be in [0, 1)"),
        ({"model__use_residual": "yes"}, "model.use_residual must be true or false"),
        ({"model__name": "transformer"}, "model.name is 'transformer'"),
        ({"model__name": "conv1d", "model__kernel_size": 0}, "model.kernel_size must be >= 1"),
        ({"model__name": "conv1d", "model__kernel_size": 4}, "model.kernel_size must be odd"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path: Path, over: dict, needle: str) -> None:
    with pytest.raises(InputError) as info:
        parse_config(tiny_config(**over), tmp_path)
    msg = info.value.one_line()
    assert msg.startswith("config.yaml: ")
    assert needle in msg
    assert "\n" not in msg


def test_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="must be a mapping of sections"):
        parse_config(["a"], tmp_path)


def test_optuna_best_trial_shape() -> None:
    # What `study.best_trial` gives, nested, with metrics in user_attrs.
    info = {"best_trial": {"number": 12, "value": 0.25, "params": {"hidden": 64},
                           "user_attrs": {"r2": {"a": 0.9}, "mse": {"a": 0.1}, "data_sha256": "ABC"}}}
    rec = parse_trial_info(info)
    assert rec.number == 12 and rec.value == 0.25 and rec.params == {"hidden": 64}
    assert rec.r2 == {"a": 0.9} and rec.mse == {"a": 0.1} and rec.data_sha256 == "abc"


def test_flat_trial_shape() -> None:
    rec = parse_trial_info({"trial_number": 3, "val_loss": 1, "r2": {"x": 0.5}})
    assert rec.number == 3 and rec.value == 1.0 and rec.r2 == {"x": 0.5}


def test_multi_objective_values() -> None:
    assert parse_trial_info({"number": 1, "values": [0.3, 2.0]}).value == 0.3


@pytest.mark.parametrize(
    ("info", "needle"),
    [
        ([1, 2], "must be a mapping"),
        ({"number": "x"}, "number must be an integer"),
        ({"value": "low"}, "value (the validation loss) must be a number"),
        ({"r2": [0.9]}, "r2 must be a number or map target names to numbers"),
        ({"r2": {"a": "high"}}, "r2.a must be a number"),
    ],
)
def test_bad_trial_info(info: object, needle: str) -> None:
    with pytest.raises(InputError) as e:
        parse_trial_info(info)
    assert e.value.one_line().startswith("trial_info.yaml: ")
    assert needle in e.value.one_line()


def test_load_bundle_finds_files(example: Path) -> None:
    b = load_bundle(example)
    assert b.scaler_path and b.scaler_path.endswith("target_scaler.joblib")
    assert b.best_weights and b.best_weights.endswith("best.pt")
    assert b.last_weights and b.last_weights.endswith("last.pt")
    assert b.recorded is not None and b.recorded.r2 and b.recorded.value is not None


def test_trainer_override_needs_module_function(make_bundle) -> None:
    root = make_bundle()
    with pytest.raises(InputError, match="is not `module:function`"):
        load_bundle(root, trainer_override="justamodule")


@pytest.mark.parametrize("trainer, needle", [
    ({"objective": "val.foo"}, "config.yaml: trainer.objective 'val.foo' is not a metric of the record"),
    ({"objective": "train.r2"}, "config.yaml: trainer.objective 'train.r2' is not a metric of the record"),
    ({"objective": 3}, "config.yaml: trainer.objective must be a non-empty string"),
    ({"weights": "/abs/model.pt"}, "config.yaml: trainer.weights '/abs/model.pt' must be a path inside the cell's output"),
    ({"weights": "ckpt/../../x.pt"}, "config.yaml: trainer.weights 'ckpt/../../x.pt' must be a path inside"),
])
def test_a_bad_objective_or_weights_path_is_refused_at_load(tmp_path: Path, trainer: dict, needle: str) -> None:
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"seed": 1, "trainer": {"entrypoint": "m:f", **trainer}}))
    with pytest.raises(InputError) as info:
        load_bundle(tmp_path)
    line = info.value.one_line()
    assert line.startswith(needle) and "\n" not in line


def test_objective_and_weights_are_kept_under_a_command_line_trainer(tmp_path: Path) -> None:
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(
        {"seed": 1, "trainer": {"objective": "test.r2.a", "weights": "./ckpt/best.ckpt"}}))
    b = load_bundle(tmp_path, trainer_cmd_override="sh -c true")
    assert (b.trainer.objective, b.trainer.weights, b.trainer.command) == ("test.r2.a", "ckpt/best.ckpt", "sh -c true")


def test_expected_data_digests_names_where_the_bundle_records_the_datas_digest(make_bundle) -> None:
    from harness.bundle import expected_data_digests

    assert expected_data_digests(load_bundle(make_bundle("none"))) == {}
    both = load_bundle(make_bundle("both", trial_info={"number": 1, "value": 0.5, "data_sha256": "AB" * 32},
                                   data__sha256="cd" * 32))
    assert expected_data_digests(both) == {"config.yaml data.sha256": "cd" * 32,
                                           "trial_info.yaml data_sha256": "ab" * 32}
