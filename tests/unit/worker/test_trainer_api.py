"""Bring your own trainer: what the harness asks of a user's config, data, function and return value."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from harness import judge
from harness.bundle import load_bundle, parse_config, parse_trial_info
from harness.errors import InputError
from harness.record import ResultRecord, Status, WeightsDiff
from harness.worker import trainer_api
from harness.worker.data import read_layout, sha256_path
from harness.worker.trainer_api import TrainerContext, call, normalise_result

from tests.conftest import tiny_config

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
    with pytest.raises(InputError) as info:
        parse_config(cfg, ROOT, custom_trainer=True)
    assert info.value.one_line() == ("config.yaml: no seed found (looked for training.seed and seed); declare where "
                                     "your trainer reads it with trainer: {seed_key: KEY}")


def test_a_custom_trainer_may_keep_its_seed_at_the_top_or_declare_where() -> None:
    top = {"seed": 11, "data": {"path": "series.csv"}}  # no training section at all
    _d, _m, training, _t = parse_config(top, ROOT, custom_trainer=True)
    assert (training.seed, training.seed_key) == (11, "seed")
    both = {"seed": 11, "training": {"seed": 3}}
    assert parse_config(both, ROOT, custom_trainer=True)[2].seed_key == "training.seed"
    declared = {"train": {"random_state": 5}, "seed": 11, "trainer": {"entrypoint": "m:f", "seed_key": "train.random_state"}}
    _d, _m, training, _t = parse_config(declared, ROOT)
    assert (training.seed, training.seed_key) == (5, "train.random_state")
    assert parse_config(top, ROOT, custom_trainer=True, seed_key="seed")[2].seed_key == "seed"  # --seed-key


@pytest.mark.parametrize("cfg, override, needle", [
    ({"seed": 1, "trainer": {"entrypoint": "m:f", "seed_key": "train.random_state"}}, None,
     "config.yaml: trainer.seed_key names train.random_state, which config.yaml does not have"),
    ({"train": {"random_state": "5"}, "trainer": {"entrypoint": "m:f", "seed_key": "train.random_state"}}, None,
     "config.yaml: train.random_state (the seed, trainer.seed_key) must be an integer, got str '5'"),
    ({"seed": 1, "trainer": {"entrypoint": "m:f"}}, "rs", "config.yaml: --seed-key names rs, which config.yaml does not have"),
    ({"seed": True, "trainer": {"entrypoint": "m:f"}}, None, "config.yaml: seed must be an integer, got bool True"),
])
def test_a_seed_key_that_holds_no_integer_is_one_line(cfg: dict, override, needle: str) -> None:
    with pytest.raises(InputError) as info:
        parse_config(cfg, ROOT, seed_key=override)
    line = info.value.one_line()
    assert line.startswith(needle) and "\n" not in line


def test_the_reference_trainer_still_reads_training_seed_only() -> None:
    cfg = tiny_config()
    seed = cfg["training"].pop("seed")
    with pytest.raises(InputError, match="training.seed is missing"):
        parse_config({**cfg, "seed": seed}, ROOT)
    with pytest.raises(InputError, match="--seed-key"):
        parse_config(tiny_config(), ROOT, seed_key="seed")


def test_no_hint_suggests_the_reference_trainers_training_section_to_a_custom_trainer(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump({"lr": 0.1}))
    with pytest.raises(InputError) as info:
        load_bundle(root, trainer_override="m:f")
    assert "batch_size" not in info.value.one_line() and "seed_key" in info.value.one_line()


def test_a_seed_band_member_writes_its_seed_where_the_trainer_reads_it(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    cfg = {"train": {"random_state": 5, "lr": 0.1}, "trainer": {"entrypoint": "m:f", "seed_key": "train.random_state"}}
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    member = load_bundle(root).with_seed(6)
    assert member.config["train"] == {"random_state": 6, "lr": 0.1} and "training" not in member.config
    assert (member.training.seed, member.training.split_seed) == (6, 5)
    (root / "config.yaml").write_text(yaml.safe_dump({"seed": 5}))
    member = load_bundle(root, trainer_override="m:f").with_seed(7)
    assert member.config == {"seed": 7}
    assert load_bundle(root, trainer_override="m:f", seed_key_override="seed").training.seed_key == "seed"


def test_trainer_keys_are_known_and_a_misspelt_one_is_said() -> None:
    from harness.bundle import unknown_trainer_keys

    known = {"trainer": {"entrypoint": "m:f", "code_dir": "src", "model_fn": "m:b", "predict": "m:p",
                         "seed_key": "seed", "objective": "val.mse", "weights": "model.pt"}}
    assert unknown_trainer_keys(known) == []
    assert unknown_trainer_keys({"trainer": {"command": "x", "seed_kye": "seed"}}) == [
        "config.yaml: trainer.seed_kye is not a key of the trainer section (did you mean trainer.seed_key?); "
        "it was ignored"]


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


def _custom(retrained: dict, recorded: dict, objective: str | None = None) -> ResultRecord:
    rec = _rec(retrained, recorded)
    rec.trainer = {"entrypoint": "m:f", "objective": objective}
    return rec


def test_a_trainer_without_val_loss_is_not_warned_about_the_trials_value() -> None:
    rec = _custom({"val": {"mse": {"*": 0.02}, "r2": {"*": 0.9}}}, {"value": 0.02, "r2": {"*": 0.9}})
    cmp = judge.compare([rec])
    assert cmp.overall is judge.Verdict.REPRODUCED and cmp.warnings == []
    assert cmp.cells[0].unmatched_recorded == [] and cmp.cells[0].objective is None
    from harness.report import objective_notes

    (note,) = objective_notes([rec])
    assert "value was not compared" in note and "trainer: {objective: val.mse}" in note
    # a trainer that names its objective (val_loss, loss, best_val_loss, objective) is compared as before
    named = _custom({"val_loss": 0.02, "val": {"r2": {"*": 0.9}}}, {"value": 0.02})
    assert set(judge.compare([named]).cells[0].vs_recorded) == {"val_loss"} and objective_notes([named]) == []


@pytest.mark.parametrize("objective, retrained, key", [
    ("val.mse", {"val": {"mse": {"*": 0.02}}}, "mse/*"),
    ("val.mse", {"val": {"mse": {"a": 0.02}}}, "mse/a"),  # one target: the path without it is enough
    ("val.mse.b", {"val": {"mse": {"a": 0.5, "b": 0.02}}}, "mse/b"),
    ("test.r2", {"val": {"r2": {"*": 0.1}}, "test": {"r2": {"*": 0.02}}}, "test:r2/*"),
    ("val_loss", {"val_loss": 0.02}, "val_loss"),
])
def test_the_declared_objective_is_what_the_trials_value_is_compared_with(objective, retrained, key) -> None:
    cmp = judge.compare([_custom(retrained, {"value": 0.02}, objective)])
    (cell,) = cmp.cells
    assert cell.objective == key and cell.vs_recorded[key].old == 0.02 and cell.vs_recorded[key].new == 0.02
    assert cmp.overall is judge.Verdict.REPRODUCED and cmp.warnings == []


@pytest.mark.parametrize("objective, retrained, needle", [
    ("val.mae", {"val": {"mse": {"*": 0.02}}}, "trainer.objective val.mae names val mae, which this run does not produce"),
    ("val.mse", {"val": {"mse": {"a": 0.1, "b": 0.2}}},
     "trainer.objective val.mse names no single metric: the run has val mse for a, b; name one, e.g. val.mse.a"),
    ("val.mse.c", {"val": {"mse": {"a": 0.1}}}, "names val mse of target c, which this run does not produce"),
])
def test_a_declared_objective_the_run_lacks_is_a_warning_naming_it(objective, retrained, needle) -> None:
    cmp = judge.compare([_custom(retrained, {"value": 0.02}, objective)])
    assert [w for w in cmp.warnings if needle in w and "value was not compared" in w]
    assert not any("records val_loss" in w for w in cmp.warnings)


def test_the_reference_trainers_objective_stays_val_loss() -> None:
    rec = _rec({"val": {"mse": {"*": 0.02}}}, {"value": 0.02})  # no trainer section: the reference trainer
    assert any("records val_loss, which this run does not produce" in w for w in judge.compare([rec]).warnings)


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

    assert weights_notes(judge.compare([rec])) == [
        f"retrained weights ≠ archived weights/best.pt in {rec.cell}: first at net.0.weight, max |Δ| 0.25"]


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


# --------------------------------------------------------------------------- the worker meets the project where it is


def _worker_bundle(tmp_path: Path, cfg: dict, code: str, *, trial_info: dict | None = None,
                   archived: dict | None = None, scaler: object = None) -> tuple[Path, str]:
    """A bundle whose trainer is ``code`` (a module of its own name, so each test imports its own)."""
    import joblib

    name = f"byot_{tmp_path.name.replace('-', '_').lower()}"
    src = tmp_path / "src"
    src.mkdir()
    (src / f"{name}.py").write_text(code)
    root = tmp_path / "bundle"
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump({**cfg, "trainer": {"entrypoint": f"{name}:train",
                                                                         "code_dir": str(src), **cfg.get("trainer", {})}}))
    if trial_info is not None:
        (root / "trial_info.yaml").write_text(yaml.safe_dump(trial_info))
    for rel, value in (archived or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".safetensors"):
            write_safetensors(root / rel, value)
        else:
            import torch

            torch.save(value, root / rel)
    if scaler is not None:
        joblib.dump(scaler, root / "target_scaler.joblib")
    return root, name


def _run_worker(root: Path, out: Path, **spec: object):
    from harness.record import RunSpec
    from harness.worker import retrain

    return retrain.run(RunSpec(cell="run", bundle_dir=str(root), out_dir=str(out), determinism="default", **spec))


def write_safetensors(path: Path, tensors: dict) -> None:
    """The safetensors layout, written by hand: 8-byte little-endian header length, JSON header, data."""
    import json

    import torch

    names = {torch.float32: "F32", torch.int64: "I64", torch.float16: "F16"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for key, t in tensors.items():
        raw = t.contiguous().numpy().tobytes()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def _net_state(seed: int = 1) -> dict:
    import torch

    torch.manual_seed(seed)
    return {k: v.clone() for k, v in torch.nn.Linear(3, 2).state_dict().items()}


WRITES_WEIGHTS = '''
import os
import torch


def state(seed):
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in torch.nn.Linear(3, 2).state_dict().items()}


def train(config, out_dir):
    for rel, kind in config["writes"].items():
        path = os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if kind == "checkpoint":  # a project's own format: the model's state among other things
            torch.save({"epoch": 3, "model": state(1), "optim": {"param_groups": [{"lr": 0.1}]}}, path)
        elif kind == "safetensors":
            import json
            t = state(1)
            header, blobs, offset = {}, [], 0
            for key, v in t.items():
                raw = v.contiguous().numpy().tobytes()
                header[key] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + len(raw)]}
                blobs.append(raw)
                offset += len(raw)
            text = json.dumps(header).encode()
            with open(path, "wb") as fh:
                fh.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))
        elif kind == "link":
            os.symlink(config["link_to"], path)
        else:
            torch.save(state(2), path)
    return {"val_loss": 0.5}
'''


def test_weights_a_trainer_writes_as_model_pt_are_found_and_compared_tensor_by_tensor(tmp_path: Path) -> None:
    import torch

    root, _ = _worker_bundle(tmp_path, {"training": {"seed": 1}, "writes": {"model.pt": "checkpoint"}}, WRITES_WEIGHTS,
                             archived={"weights/model.pt": _net_state(1)})
    rec = _run_worker(root, tmp_path / "o")
    assert rec.trainer["weights"] == {"file": "model.pt", "archived": "weights/model.pt", "how": "found",
                                      "why": None, "tensors_from": "model", "saved": "weights/best.pt"}
    assert rec.weights_vs_archived == WeightsDiff(identical=True, first_difference=None, max_abs_diff=0.0)
    assert rec.weights_sha256 == rec.archived_weights_sha256
    saved = torch.load(tmp_path / "o" / "weights" / "best.pt", weights_only=True)  # what export carries
    assert sorted(saved) == ["bias", "weight"]
    assert torch.load(tmp_path / "o" / "model.pt", weights_only=True)["epoch"] == 3  # the trainer's file, untouched


def test_declared_weights_are_compared_with_the_one_archived_file(tmp_path: Path) -> None:
    root, _ = _worker_bundle(
        tmp_path, {"training": {"seed": 1}, "writes": {"ckpt/last.ckpt": "checkpoint", "other.pt": "plain"},
                   "trainer": {"weights": "ckpt/last.ckpt"}},
        WRITES_WEIGHTS, archived={"weights/final.safetensors": _net_state(1)})
    rec = _run_worker(root, tmp_path / "o")
    w = rec.trainer["weights"]
    assert (w["file"], w["archived"], w["how"]) == ("ckpt/last.ckpt", "weights/final.safetensors", "declared")
    assert rec.weights_vs_archived.identical is True


def test_safetensors_weights_are_read_without_a_dependency(tmp_path: Path) -> None:
    root, _ = _worker_bundle(tmp_path, {"training": {"seed": 1}, "writes": {"out/model.safetensors": "safetensors"}},
                             WRITES_WEIGHTS, archived={"weights/best.pt": _net_state(1), "weights/last.pt": _net_state(3)})
    rec = _run_worker(root, tmp_path / "o")
    w = rec.trainer["weights"]
    assert (w["file"], w["archived"], w["how"]) == ("out/model.safetensors", "weights/best.pt", "found")
    assert rec.weights_vs_archived.identical is True


def test_several_weights_files_are_not_guessed_between(tmp_path: Path) -> None:
    root, _ = _worker_bundle(tmp_path, {"training": {"seed": 1}, "writes": {"a.pt": "plain", "b/c.pth": "plain"}}, WRITES_WEIGHTS,
                             archived={"weights/best.pt": _net_state(2)})
    rec = _run_worker(root, tmp_path / "o")
    w = rec.trainer["weights"]
    assert w["file"] is None and rec.weights_vs_archived is None and rec.weights_sha256 is None
    assert "a.pt, b/c.pth" in w["why"] and "trainer: {weights: PATH}" in w["why"]
    assert not (tmp_path / "o" / "weights").exists()


def test_a_link_the_trainer_planted_is_not_followed(tmp_path: Path) -> None:
    import torch

    outside = tmp_path / "elsewhere.pt"
    torch.save(_net_state(1), outside)
    root, _ = _worker_bundle(tmp_path, {"training": {"seed": 1}, "writes": {"model.pt": "link"}, "link_to": str(outside),
                                        "trainer": {"weights": "model.pt"}}, WRITES_WEIGHTS,
                             archived={"weights/model.pt": _net_state(1)})
    rec = _run_worker(root, tmp_path / "o")
    assert rec.weights_vs_archived is None and "is a link" in rec.trainer["weights"]["why"]
    assert any(w.startswith("trainer.weights: model.pt is a link") for w in rec.warnings)
    undeclared = yaml.safe_load((root / "config.yaml").read_text())
    del undeclared["trainer"]["weights"]
    (root / "config.yaml").write_text(yaml.safe_dump(undeclared))
    rec = _run_worker(root, tmp_path / "o2")
    assert rec.weights_vs_archived is None and "links not followed: model.pt" in rec.trainer["weights"]["why"]
    assert "model.pt in the output directory is a link; it was not followed" in rec.warnings


@pytest.mark.parametrize("mangle, needle", [
    (lambda raw: (10 ** 9).to_bytes(8, "little") + raw[8:], "header"),
    (lambda raw: raw[:-4], "outside the file"),
    (lambda raw: raw.replace(b'"F32"', b'"Q32"'), "dtype 'Q32'"),
    (lambda raw: raw[:5], "shorter than a safetensors header"),
])
def test_a_malformed_safetensors_file_is_refused_in_bounds(tmp_path: Path, mangle, needle: str) -> None:
    from harness.worker import checkpoint

    good = tmp_path / "w.safetensors"
    write_safetensors(good, {"w": _net_state(1)["weight"]})
    assert sorted(checkpoint.load(tmp_path, "w.safetensors")[0]) == ["w"]
    (tmp_path / "bad.safetensors").write_bytes(mangle(good.read_bytes()))
    with pytest.raises(checkpoint.Unreadable, match=needle):
        checkpoint.load(tmp_path, "bad.safetensors")


def test_a_checkpoint_without_a_model_mapping_is_compared_by_every_tensor() -> None:
    import torch

    from harness.worker.checkpoint import tensors_of

    state, source = tensors_of({"epoch": 3, "layers": [{"w": torch.ones(1)}, {"w": torch.zeros(1)}], "name": "x"})
    assert source is None and sorted(state) == ["layers.0.w", "layers.1.w"]
    state, source = tensors_of({"model_state_dict": {"a": torch.ones(1)}, "optimizer_state_dict": {"s": torch.ones(1)}})
    assert source == "model_state_dict" and list(state) == ["a"]


SCALER_TRAINER = '''
def train(config, ctx):
    ctx.check_scaler([[1.0], [2.0], [3.0]])
    return {"val_loss": 0.5, "extra": {"scaler": sorted(ctx.scaler)}}
'''


def test_a_custom_trainers_scaler_is_its_own_business(tmp_path: Path) -> None:
    root, _ = _worker_bundle(tmp_path, {"training": {"seed": 1}}, SCALER_TRAINER, scaler={"mean": 2.0, "std": 1.0})
    rec = _run_worker(root, tmp_path / "o")
    assert rec.status is Status.OK and rec.extra == {"scaler": ["mean", "std"]}  # handed over as it is
    assert rec.scaler["refit_matches"] is None and rec.scaler["class"] == "dict"
    assert "holds a dict, which has no fit() or transform()" in rec.scaler["why"]
    from harness.worker.retrain import _load_scaler

    with pytest.raises(InputError, match="holds a dict, which has no transform"):  # the reference trainer needs one
        _load_scaler(str(root / "target_scaler.joblib"))


def test_a_command_trainers_scaler_is_loaded_and_checked_before_the_command_runs(tmp_path: Path) -> None:
    import joblib

    root = tmp_path / "bundle"
    root.mkdir()
    cmd = 'sh -c "echo ran > ran; echo \'{\\"val_loss\\": 0.5, \\"y_train\\": [[1.0], [2.0]]}\'"'
    (root / "config.yaml").write_text(yaml.safe_dump({"training": {"seed": 1}, "trainer": {"command": cmd}}))
    joblib.dump({"mean": 2.0}, root / "target_scaler.joblib")
    rec = _run_worker(root, tmp_path / "o")
    assert rec.status is Status.OK and (tmp_path / "o" / "ran").exists()
    assert "holds a dict, which has no fit() or transform()" in rec.scaler["why"]
    (root / "target_scaler.joblib").write_bytes(b"not a pickle at all")
    with pytest.raises(InputError, match="cannot be loaded as a joblib scaler"):
        _run_worker(root, tmp_path / "o2")
    assert not (tmp_path / "o2" / "ran").exists()  # refused before the command trained


SEED_TRAINER = '''
def train(config, seed):
    return {"val_loss": 0.5, "extra": {"seed": seed, "in_config": config["train"]["random_state"]}}
'''


def test_the_worker_records_the_declared_objective(tmp_path: Path) -> None:
    root, _ = _worker_bundle(tmp_path, {"train": {"random_state": 5}, "trainer": {"seed_key": "train.random_state",
                                                                               "objective": "val.mse"}}, SEED_TRAINER)
    assert _run_worker(root, tmp_path / "o").trainer["objective"] == "val.mse"


def test_a_seed_band_member_records_where_its_seed_went(tmp_path: Path) -> None:
    root, _ = _worker_bundle(tmp_path, {"train": {"random_state": 5}, "trainer": {"seed_key": "train.random_state"}},
                             SEED_TRAINER)
    rec = _run_worker(root, tmp_path / "o", seed=9, band={"kind": "seed", "member": 4})
    assert rec.extra == {"seed": 9, "in_config": 9}
    assert (rec.band.kind, rec.band.member, rec.band.seed) == ("seed", 4, 9)
    assert rec.trainer["seed_key"] == "train.random_state"


def test_a_command_seed_band_member_reads_its_seed_from_config(tmp_path: Path) -> None:
    src = tmp_path / "sh"
    src.mkdir()
    (src / "report.sh").write_text('printf \'{"val_loss": 0.5, "extra": {"line": "%s"}}\\n\' "$(grep \'^seed:\' "$1")"\n')
    root = tmp_path / "bundle"
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump({"seed": 5, "trainer": {"command": "sh {code_dir}/report.sh {config}",
                                                                              "code_dir": str(src)}}))
    rec = _run_worker(root, tmp_path / "o", seed=8, band={"kind": "seed", "member": 3})
    assert rec.extra == {"line": "seed: 8"} and rec.trainer["seed_key"] == "seed"
    assert rec.band.seed_via[0] == "{config} in the command: a copy of config.yaml with the seed at seed"
    assert rec.trainer["config"] == str(tmp_path / "o" / "harness-config.yaml")
    assert yaml.safe_load((root / "config.yaml").read_text())["seed"] == 5  # the bundle is untouched
    rec = _run_worker(root, tmp_path / "o2")
    assert rec.extra == {"line": "seed: 5"} and rec.trainer["config"] == str(root.resolve() / "config.yaml")


_ENV_ROUTE = "the environment: HARNESS_SEED, and HARNESS_CONFIG (a copy of config.yaml with the seed at train.rs)"
_CHILD_RNGS = "the global RNGs of every Python process of the command, seeded at interpreter start"


@pytest.mark.parametrize("command, routes", [
    ("{python} -m p.train {bundle} --out {out_dir}", []),
    ("{python} -m p.train {bundle} --seed {seed}", ["{seed} in the command"]),
    ("{python} -m p.train --config={config}",
     ["{config} in the command: a copy of config.yaml with the seed at train.rs"]),
    ("{python} -m p.train {config} {seed}",
     ["{seed} in the command", "{config} in the command: a copy of config.yaml with the seed at train.rs"]),
])
def test_a_command_seed_members_record_names_only_the_routes_its_command_has(command: str, routes: list) -> None:
    from types import SimpleNamespace

    from harness.worker.retrain import seed_via

    bundle = SimpleNamespace(trainer=SimpleNamespace(command=command), training=SimpleNamespace(seed_key="train.rs"))
    assert seed_via(bundle) == [*routes, _ENV_ROUTE, _CHILD_RNGS]
