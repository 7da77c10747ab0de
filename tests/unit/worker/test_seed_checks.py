"""The seed's checks for custom trainers: the split, the scaler refit, the archived weights through hooks."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from harness import judge, report
from harness.bundle import DataSpec, load_bundle, parse_config
from harness.errors import InputError, RunFailed
from harness.record import ResultRecord, RunSpec, Status
from harness.worker import seed_checks
from harness.worker.seed_checks import split_record
from harness.worker.train import split_indices
from harness.worker.trainer_api import TrainerContext, call, load_strict, normalise_result

SEED = 11
RATIOS = (0.6, 0.2, 0.2)


def _ctx(scaler=None, ratios=RATIOS) -> TrainerContext:
    return TrainerContext(config={}, seed=SEED, device="cpu", bundle_dir="b", data_path="d", out_dir="o",
                          scaler=scaler, _data_spec=DataSpec(path=None, resolved=None, sha256=None, split=ratios),
                          _scaler_reference=scaler)


def _split_of(ctx: TrainerContext, note: str | None = None) -> dict:
    return split_record(ctx._checks, ctx._data_spec.split, note, SEED)


def _ok_record(cell: str, **kw) -> ResultRecord:
    return ResultRecord(cell=cell, status=Status.OK, metrics={"retrained": {"val": {"r2": {"*": 0.9}}}}, **kw)


# --------------------------------------------------------------------------- split


def test_rederived_split_equals_the_one_ctx_split_hands_out() -> None:
    handed, declared = _ctx(), _ctx()
    s = handed.split(50)
    declared.declare_length(50)
    a, b = _split_of(handed), _split_of(declared)
    assert a["source"] == "ctx.split" and b["source"] == "re-derived" and b["n_from"] == "declared"
    assert a["sizes"] == b["sizes"] == [30, 10, 10]
    assert a["indices_sha256"] == b["indices_sha256"] == seed_checks.split_digest([s.train, s.val, s.test])["indices_sha256"]
    # the same fields and digest as the reference trainer's record
    ref = split_indices(50, RATIOS, SEED)
    assert a["indices_sha256"] == seed_checks.sha_json([ref.train, ref.val, ref.test])


def test_a_custom_trainers_split_list_is_read_and_anything_else_is_only_noted() -> None:
    cfg = {"data": {"path": "x.csv", "split": [0.6, 0.2, 0.2]}, "training": {"seed": 1}}
    data, *_ = parse_config(cfg, Path("/nonexistent"), custom_trainer=True)
    assert data.split == (0.6, 0.2, 0.2) and data.split_note is None
    cfg["data"]["split"] = "by_date"  # the trainer's own key, not ratios: not an error
    data, *_ = parse_config(cfg, Path("/nonexistent"), custom_trainer=True)
    assert data.split_note and "data.split" in data.split_note
    del cfg["data"]["split"]
    data, *_ = parse_config(cfg, Path("/nonexistent"), custom_trainer=True)
    assert data.split_note == "config.yaml has no data.split"
    ctx = _ctx()
    ctx.declare_length(50)
    rec = split_record(ctx._checks, data.split, data.split_note, SEED)
    assert rec["source"] is None and "cannot be re-derived" in rec["why"] and "sizes" not in rec


def test_a_matching_reported_split_is_recorded_as_such() -> None:
    ctx = _ctx()
    ctx.declare_length(50)
    s = split_indices(50, RATIOS, SEED)
    ctx.report_split(torch.tensor(s.train), np.array(s.val), s.test)
    rec = _split_of(ctx)
    assert rec["reported"]["matches"] is True and rec["reported"]["indices_sha256"] == rec["indices_sha256"]
    assert judge.split_mismatch(_ok_record("c", split=rec)) is None


def test_a_mismatching_reported_split_is_a_warning_naming_the_first_differing_split() -> None:
    s = split_indices(50, RATIOS, SEED)
    ctx = _ctx()
    ctx.report_split(s.train, list(reversed(s.val)), s.test)  # same samples, another order; length from the sizes
    rec = _split_of(ctx)
    assert rec["n_from"] == "reported"
    assert rec["reported"] == {**rec["reported"], "matches": False, "first_difference": "val", "same_samples": True}
    other = _ctx()
    other.split(50)
    other.report_split(s.train[:-1], s.val + s.train[-1:], s.test)
    rec2 = _split_of(other)
    assert rec2["reported"]["first_difference"] == "train" and rec2["reported"]["same_samples"] is False
    comparison = judge.compare([_ok_record("a", split=rec), _ok_record("b", split=rec2)])
    assert ("a: the split the trainer reported differs from the split re-derived from data.split and "
            "training.seed, first in val (10 vs 10 samples); same samples in another order") in comparison.warnings
    assert ("b: the split the trainer reported differs from the split ctx.split handed out, first in train "
            "(29 vs 30 samples)") in comparison.warnings
    assert all(c.verdict is not judge.Verdict.FAILED for c in comparison.cells)  # a warning, not a verdict


def test_nothing_said_about_the_split_is_recorded_with_the_reason() -> None:
    rec = _split_of(_ctx())
    assert rec["source"] is None and "ctx.declare_length" in rec["why"]


def test_bad_split_arguments_are_one_line() -> None:
    ctx = _ctx()
    with pytest.raises(InputError, match=r"ctx.report_split val is not a sequence of sample indices.*flatnonzero"):
        ctx.report_split([0, 1], np.array([True, False]), [2])
    with pytest.raises(InputError, match=r"ctx.declare_length\(n\) must be the dataset's number of samples"):
        ctx.declare_length(0)


def test_split_and_scaler_checks_may_be_returned_instead() -> None:
    got = normalise_result({"val_loss": 0.1, "split_indices": {"train": [0, 1], "val": [2], "test": [3]},
                            "n_samples": 4, "train_targets": np.zeros((2, 1))}, "m:f")
    assert got["split_indices"] == [[0, 1], [2], [3]] and got["n_samples"] == 4 and got["y_train"][0] == "train_targets"
    with pytest.raises(InputError, match="m:f returned split_indices without test"):
        normalise_result({"split_indices": {"train": [0], "val": [1]}}, "m:f")
    with pytest.raises(InputError, match="m:f returned n_samples, which must be"):
        normalise_result({"n_samples": 2.5}, "m:f")


# --------------------------------------------------------------------------- scaler


def test_scaler_refit_on_the_right_targets_matches_and_on_wrong_ones_does_not() -> None:
    from sklearn.preprocessing import StandardScaler

    y = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    archived = StandardScaler().fit(y[:30])
    ctx = _ctx(scaler=archived)
    ok = ctx.check_scaler(torch.from_numpy(y[:30]))
    assert ok["refit_matches"] is True and ok["max_abs_diff"] == 0.0 and ok["source"] == "ctx.check_scaler"
    bad = ctx.check_scaler(y[10:])  # another train split
    assert bad["refit_matches"] is False and bad["max_abs_diff"] > 0
    rec = _ok_record("c", scaler=bad)
    assert any("c: the scaler refitted on the reproduced train split differs from the archived one" in w
               for w in report.warnings([rec]))


def test_the_check_uses_the_archived_scaler_even_when_the_trainer_refits_ctx_scaler() -> None:
    import copy

    from sklearn.preprocessing import StandardScaler

    y = np.arange(20, dtype=np.float64).reshape(10, 2)
    archived = StandardScaler().fit(y)
    ctx = TrainerContext(config={}, seed=SEED, device="cpu", bundle_dir="b", data_path="d", out_dir="o",
                         scaler=archived, _scaler_reference=copy.deepcopy(archived))
    ctx.scaler.fit(y * 3)  # the trainer's business
    assert ctx.check_scaler(y * 3)["refit_matches"] is False


def test_without_an_archived_scaler_nothing_is_checked_and_the_record_says_so() -> None:
    info = _ctx().check_scaler(np.ones(5))
    assert info["archived"] is False and info["refit_matches"] is None and "no target_scaler.joblib" in info["why"]


# --------------------------------------------------------------------------- hooks


def test_predict_gets_the_model_by_name_or_first() -> None:
    ctx = _ctx()
    model = object()
    assert call(lambda model, config: (model, config), ctx, {"model": model}, first=model) == (model, {})
    assert call(lambda m, seed: (m, seed), ctx, {"model": model}, first=model) == (model, SEED)
    assert call(lambda cfg, net=None: net, ctx, {"net": model}, first=model) is model


def test_a_state_that_does_not_fit_the_model_is_one_line_naming_the_hook() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    state = {"0.weight": torch.zeros(5, 3), "0.bias": torch.zeros(5), "2.weight": torch.zeros(1, 4)}
    with pytest.raises(InputError) as exc:
        load_strict(model, state, "trainer.model_fn pkg.m:build", "weights/best.pt")
    line = exc.value.one_line()
    assert "\n" not in line
    assert line.startswith("config.yaml: trainer.model_fn pkg.m:build builds a model whose state does not fit "
                           "weights/best.pt: missing 1.bias, 1.weight; unexpected 2.weight; shape 0.bias (5,) vs (4,)")


# ---- the whole custom run, in process, on a small bundle


TRAINER = '''
import numpy as np
import torch

def build(config):
    torch.rand(1000)  # consumes the global RNG: the harness reseeds before the trainer
    return torch.nn.Linear(2, 1)

def build_other(config):
    return torch.nn.Linear(3, 1)

def predict(model, data_path):
    x = torch.tensor(np.loadtxt(data_path, delimiter=",", ndmin=2), dtype=torch.float32)
    with torch.no_grad():
        pred = model(x[:, :2]).numpy()
    y = x[:, 2:].numpy()
    return {"val": (y[:3], pred[:3]), "test": (y[3:], pred[3:])}

def broken(model):
    raise TypeError("boom")

def nothing(model):
    return {"extra": 1}

def train(config, ctx):
    return {"val_loss": float(torch.rand(1)), "state_dict": torch.nn.Linear(2, 1).state_dict()}
'''


@pytest.fixture
def custom_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A bundle whose trainer, hooks and archived weights live in tmp_path; returns a runner of its custom run."""
    from harness.worker import retrain

    name = f"seedchk_{abs(hash(str(tmp_path))) % 10**8}"
    code = tmp_path / "code"
    code.mkdir()
    (code / f"{name}.py").write_text(TRAINER)
    root = tmp_path / "optuna_best"
    (root / "weights").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torch.nn.Linear(2, 1).state_dict(), root / "weights" / "best.pt")
    (root / "data.csv").write_text("\n".join(f"{i},{i % 3},{2 * i}" for i in range(6)) + "\n")
    monkeypatch.setattr(sys, "path", list(sys.path))

    def run(**hooks: str) -> ResultRecord:
        trainer = {"entrypoint": f"{name}:train", "code_dir": str(code),
                   **{k: f"{name}:{v}" for k, v in hooks.items()}}
        cfg = {"data": {"path": "data.csv"}, "training": {"seed": 5}, "trainer": trainer}
        (root / "config.yaml").write_text(yaml.safe_dump(cfg))
        bundle = load_bundle(root)
        out = tmp_path / "out"
        rec = ResultRecord(cell="c", status=Status.OK)
        retrain._custom_run(RunSpec(cell="c", bundle_dir=str(root), out_dir=str(out)), bundle, torch.device("cpu"),
                            out, rec)
        return rec

    yield run
    sys.modules.pop(name, None)


def test_archived_weights_are_evaluated_through_the_hooks_before_training(custom_bundle) -> None:
    from harness.worker import determinism

    rec = custom_bundle(model_fn="build", predict="predict")
    info = rec.trainer["archived"]
    assert info["model_fn"].endswith(":build") and info["predict"].endswith(":predict")
    assert (info["loaded"], info["evaluated"], info["why"]) == (True, True, None)
    assert set(rec.archived) == {"val", "test"} and set(rec.archived["val"]["r2"]) == {"target_0"}
    determinism.set_seed(5)
    assert rec.retrained["val_loss"] == float(torch.rand(1))  # the hooks' RNG use did not reach the trainer
    assert rec.split["source"] is None and rec.scaler["refit_matches"] is None and rec.scaler["why"]


def test_model_fn_alone_loads_the_archived_state_and_says_why_there_are_no_metrics(custom_bundle) -> None:
    rec = custom_bundle(model_fn="build")
    assert rec.archived is None
    assert rec.trainer["archived"]["loaded"] is True and "no trainer.predict" in rec.trainer["archived"]["why"]
    assert report.archived_notes([rec]) == [f"archived Δ —: {rec.trainer['archived']['why']}"]


def test_no_hooks_is_a_note_not_silence(custom_bundle) -> None:
    rec = custom_bundle()
    assert rec.archived is None and "no trainer.model_fn/trainer.predict" in rec.trainer["archived"]["why"]


def test_a_model_fn_whose_model_does_not_fit_the_archived_state_stops_the_run(custom_bundle) -> None:
    with pytest.raises(InputError, match=r"^config.yaml: trainer.model_fn seedchk_\d+:build_other builds a model "
                                         r"whose state does not fit weights/best.pt: shape weight \(1, 2\) vs \(1, 3\)"):
        custom_bundle(model_fn="build_other", predict="predict")


def test_a_hook_that_raises_is_a_failure_naming_it(custom_bundle) -> None:
    with pytest.raises(InputError, match=r"config.yaml trainer.predict: .* has no function 'nope'"):
        custom_bundle(model_fn="build", predict="nope")
    with pytest.raises(RunFailed, match=r"^trainer.predict seedchk_\d+:broken raised TypeError: boom"):
        custom_bundle(model_fn="build", predict="broken")
    with pytest.raises(InputError, match=r"trainer.predict seedchk_\d+:nothing returned no predictions or metrics"):
        custom_bundle(model_fn="build", predict="nothing")


def test_a_hook_that_is_not_module_function_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump({"training": {"seed": 1},
                                                      "trainer": {"entrypoint": "m:f", "predict": "justaname"}}))
    with pytest.raises(InputError, match=r"config.yaml: trainer.predict 'justaname' is not `module:function`"):
        load_bundle(root)


def test_hooks_stay_when_trainer_names_the_entrypoint(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump({"training": {"seed": 1}, "trainer": {"model_fn": "m:build"}}))
    b = load_bundle(root, trainer_override="m:train")
    assert b.trainer.entrypoint == "m:train" and b.trainer.model_fn == "m:build" and b.trainer.predict is None
    with pytest.raises(InputError, match="trainer.entrypoint is missing"):
        load_bundle(root)


def test_the_record_keeps_torchs_per_backend_precision_and_never_fails_reading_it() -> None:
    """After the harness's legacy switch, a trainer's per-backend setting makes torch refuse the legacy getter
    (RuntimeError): the capture records the per-backend values and the legacy one as unknown, not a crash."""
    import torch

    from harness.worker import determinism

    if not hasattr(torch.backends.mkldnn, "matmul"):
        pytest.skip("this torch has no per-backend float32 precision (torch < 2.9)")
    before = torch.backends.mkldnn.matmul.fp32_precision, torch.get_float32_matmul_precision()
    try:
        determinism.apply("strict", tf32=False, threads=None)
        got = determinism.capture("strict", 7)
        assert got["float32_matmul_precision"] == "highest" and got["fp32_precision"]["mkldnn.matmul"] == "ieee"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"  # as a trainer may, after the harness's switches
        with pytest.raises(RuntimeError):
            torch.get_float32_matmul_precision()
        got = determinism.capture("strict", 7)
        assert got["float32_matmul_precision"] is None and got["fp32_precision"]["mkldnn.matmul"] == "bf16"
        assert set(got["fp32_precision"]) <= set(determinism.FP32_PRECISION_AT)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before[0]
        torch.set_float32_matmul_precision(before[1])
