"""Bring your own trainer: what the harness asks of a user's config, data, function and return value."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from harness import judge
from harness.bundle import load_bundle, parse_config, parse_trial_info
from harness.errors import InputError
from harness.record import ResultRecord, Status
from harness.worker import trainer_api
from harness.worker.data import read_layout, sha256_path
from harness.worker.trainer_api import TrainerContext, call, normalise_result

from .conftest import tiny_config

ROOT = Path("/nonexistent")


def _user_config() -> dict:
    return {"data": {"path": "series.csv", "split": [0.7, 0.15, 0.15], "window": 8},
            "model": {"kind": "lstm"}, "training": {"seed": 3, "lr": 0.01, "epochs": "many"}}


# --------------------------------------------------------------------------- config (defects 1, 2)


def test_custom_trainer_config_needs_only_what_the_harness_reads() -> None:
    data, _model, training, trainer = parse_config(_user_config(), ROOT, custom_trainer=True)
    assert training.seed == 3 and trainer is None
    assert data.resolved.endswith("series.csv")


def test_custom_trainer_config_still_needs_a_seed() -> None:
    cfg = _user_config()
    del cfg["training"]["seed"]
    with pytest.raises(InputError, match="training.seed is missing"):
        parse_config(cfg, ROOT, custom_trainer=True)


def test_reference_trainer_accepts_a_split_list() -> None:
    cfg = tiny_config()
    cfg["data"]["split"] = [0.6, 0.2, 0.2]
    data, *_ = parse_config(cfg, ROOT)
    assert data.split == (0.6, 0.2, 0.2)


def test_reference_trainer_refuses_a_split_list_of_two() -> None:
    cfg = tiny_config()
    cfg["data"]["split"] = [0.6, 0.4]
    with pytest.raises(InputError, match=r"data.split"):
        parse_config(cfg, ROOT)


def test_trainer_override_skips_reference_keys(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    (root / "series.csv").write_text("a,b\n1,2\n")
    (root / "config.yaml").write_text(yaml.safe_dump(_user_config()))
    b = load_bundle(root, trainer_override="m:f")
    assert b.trainer is not None and b.config["training"]["lr"] == 0.01
    with pytest.raises(InputError, match="is missing"):
        load_bundle(root)


# --------------------------------------------------------------------------- data as bytes (defect 3)


def test_data_is_hashed_as_bytes(tmp_path: Path) -> None:
    f = tmp_path / "x.csv"
    f.write_bytes(b"a,b\n1,2\n")
    import hashlib

    assert sha256_path(f) == hashlib.sha256(b"a,b\n1,2\n").hexdigest()
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "b.csv").write_bytes(b"2")
    (d / "sub" / "a.csv").write_bytes(b"1")
    first = sha256_path(d)
    (d / "sub" / "a.csv").write_bytes(b"3")
    assert sha256_path(d) != first


def test_reference_trainer_names_a_csv_for_what_it_is(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    (root / "signals.csv").write_text("a,b\n1,2\n")
    cfg = tiny_config()
    cfg["data"]["path"] = "signals.csv"
    data, *_ = parse_config(cfg, root)
    with pytest.raises(InputError) as info:
        read_layout(data)
    text = info.value.one_line()
    assert "signals.csv is a CSV file, not an .npz" in text and "--trainer" in text and "pickle" not in text


def test_preflight_does_not_open_a_custom_trainers_data(tmp_path: Path) -> None:
    from harness.preflight import check

    root = tmp_path / "b"
    root.mkdir()
    (root / "series.csv").write_text("a,b\n1,2\n")
    (root / "config.yaml").write_text(yaml.safe_dump(_user_config()))
    pre = check(load_bundle(root, trainer_override="m:f"))
    assert len(pre.data_sha256) == 64


# --------------------------------------------------------------------------- calling convention (defect 4)


def _ctx() -> TrainerContext:
    return TrainerContext(config={"a": 1}, seed=5, device="cpu", bundle_dir="/b", data_path="/b/d.csv", out_dir="/o")


def test_seed_style_signature_is_called_by_name() -> None:
    def retrain(config, optuna_best_dir, data_path=None):
        return (config, optuna_best_dir, data_path)

    assert call(retrain, _ctx()) == ({"a": 1}, "/b", "/b/d.csv")


def test_keyword_names_from_the_documented_set() -> None:
    def fit(cfg, *, seed, device="cuda", out_dir=None, context=None):
        return cfg, seed, device, out_dir, context

    ctx = _ctx()
    assert call(fit, ctx) == ({"a": 1}, 5, "cpu", "/o", ctx)


def test_old_convention_kept() -> None:
    def train(c, x):
        return c, x

    def seed_style(cfg, ctx):  # tests/trainers/seed_style.train's signature
        return cfg, ctx

    ctx = _ctx()
    assert call(train, ctx) == ({"a": 1}, ctx)
    assert call(seed_style, ctx) == ({"a": 1}, ctx)


def test_unknown_required_parameter_is_one_line() -> None:
    def train(config, dataset_name):
        return {}

    with pytest.raises(InputError) as info:
        call(train, _ctx())
    line = info.value.one_line()
    assert "dataset_name" in line and "optuna_best_dir" in line and "\n" not in line


# --------------------------------------------------------------------------- metrics shapes (defect 5)


def test_nested_scalar_metrics_are_normalised() -> None:
    m = normalise_result({"val": {"r2": 0.9, "MSE": 0.01, "mae": 0.08}, "test": {"R2": 0.8}, "val_loss": 0.02},
                         "m:f")["metrics"]
    assert m == {"val": {"r2": {"*": 0.9}, "mse": {"*": 0.01}, "mae": {"*": 0.08}},
                 "test": {"r2": {"*": 0.8}}, "val_loss": 0.02}


def test_flat_metrics_are_normalised() -> None:
    m = normalise_result({"metrics": {"val_r2": {"a": 0.5}, "test_mae": 0.3, "loss": 1.0}}, "m:f")["metrics"]
    assert m == {"val": {"r2": {"a": 0.5}}, "test": {"mae": {"*": 0.3}}, "val_loss": 1.0}


def test_bad_metric_value_names_the_key() -> None:
    with pytest.raises(InputError) as info:
        normalise_result({"val": {"r2": "high"}}, "m:f")
    assert "val.r2" in info.value.one_line()


def test_trial_info_aggregate_r2_is_accepted() -> None:
    t = parse_trial_info({"number": 1, "value": 0.1, "params": {}, "user_attrs": {"r2": 0.93, "mse": 0.01}})
    assert t.r2 == {"*": 0.93} and t.mse == {"*": 0.01}


def _rec(retrained: dict, recorded: dict) -> ResultRecord:
    return ResultRecord(cell="c", status=Status.OK, metrics={"retrained": retrained, "archived": None},
                        recorded=recorded)


def test_judge_matches_what_both_have_and_warns_about_the_rest() -> None:
    rec = _rec({"val_loss": 0.1, "val": {"r2": {"*": 0.9}}},
               {"value": 0.1, "r2": {"*": 0.9}, "mae": {"*": 0.2}})
    cmp = judge.compare([rec])
    assert cmp.overall is judge.Verdict.REPRODUCED
    (cell,) = cmp.cells
    assert set(cell.vs_recorded) == {"val_loss", "r2/*"}
    assert cell.unmatched_recorded == ["mae/*"]
    assert any("mae/*" in w for w in cmp.warnings)


def test_judge_derives_an_aggregate_from_per_target_values() -> None:
    rec = _rec({"val": {"r2": {"a": 0.8, "b": 1.0}}}, {"r2": {"*": 0.9}})
    (cell,) = judge.compare([rec]).cells
    assert math.isclose(cell.vs_recorded["r2/*"].new, 0.9)


# --------------------------------------------------------------------------- trainer paths (defect 6)


def test_every_trainer_path_goes_on_sys_path_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    (tmp_path / "code" / "proj_a").mkdir(parents=True)
    (tmp_path / "code" / "proj_a" / "__init__.py").write_text("")
    (tmp_path / "code" / "proj_a" / "train.py").write_text("from helper_b import VALUE\ndef fit(config):\n    return VALUE\n")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "helper_b.py").write_text("VALUE = 7\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    func = trainer_api.resolve("proj_a.train:fit", [str(tmp_path / "code"), str(tmp_path / "lib")])
    assert func({}) == 7
    assert sys.path[:2] == [str(tmp_path / "code"), str(tmp_path / "lib")]


def test_import_hint_names_the_folders_and_the_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    pkg = tmp_path / "proj" / "mypkg_x"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text("def retrain(config):\n    return {}\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(InputError) as info:
        trainer_api.resolve("mypkg_x.train:retrain", [str(pkg)])
    line = info.value.one_line()
    assert str(pkg) in line and f"--trainer-path {pkg.parent}" in line


# --------------------------------------------------------------------------- weights as tensors (defect 7)


def test_weights_compared_tensor_by_tensor() -> None:
    import torch

    from harness.worker.retrain import compare_state

    a = {"w": torch.zeros(2, 2), "b": torch.ones(2)}
    assert compare_state(a, {k: v.clone() for k, v in a.items()}) == {"identical": True, "first_difference": None,
                                                                      "max_abs_diff": 0.0}
    b = {"w": torch.tensor([[0.0, 0.5], [0.0, 0.0]]), "b": torch.ones(2)}
    assert compare_state(b, a) == {"identical": False, "first_difference": "w", "max_abs_diff": 0.5}


def test_report_shows_weights_vs_archived() -> None:
    from harness.report import _weights

    rec = _rec({"val_loss": 0.1}, {"value": 0.1, "weights_sha256": "theirs"})
    rec.weights_sha256 = "ours"
    rec.weights_vs_archived = {"identical": False, "first_difference": "net.0.weight", "max_abs_diff": 0.25}
    rec.user_weights = {"sha256": "theirs", "recorded": "theirs", "identical_to_recorded": True}
    (cell,) = judge.compare([rec]).cells
    text = _weights(cell, True)
    assert text.startswith("≠archived") and "≠trial" not in text and "=trial(own sha)" in text
    from harness.report import weights_notes

    assert weights_notes(judge.compare([rec])) == [f"≠archived {rec.cell}: first differs at net.0.weight, max |Δ| 0.25"]


def test_custom_trainer_may_find_its_own_data(tmp_path: Path) -> None:
    from harness.preflight import check

    cfg = {"training": {"seed": 1}, "dataset": {"csv": "somewhere.csv"}}
    data, _m, training, _t = parse_config(cfg, ROOT, custom_trainer=True)
    assert data.path is None and data.resolved is None and training.seed == 1
    root = tmp_path / "b"
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    pre = check(load_bundle(root, trainer_override="m:f"))
    assert pre.data_sha256 is None and any("no data.path" in w for w in pre.warnings)
    with pytest.raises(InputError, match="data is missing"):
        parse_config(cfg, ROOT)  # the reference trainer still needs it


def test_no_data_mount_without_data(tmp_path: Path) -> None:
    from harness.backends.docker import container_run_spec, container_spec
    from harness.plan import Cell, Job
    from harness.record import ImageInfo

    job = Job(bundle_dir=str(tmp_path), data_path=None, results_dir=str(tmp_path / "r"), trainer="m:f")
    req = container_spec(Cell("c"), job, "img")
    assert [target for _src, target, _ro in req.mounts if "/data" in target] == []
    assert container_run_spec(Cell("c"), job, ImageInfo(id="x", tag="t")).data_path is None
