"""Acceptance: a second foreign project, class-based and written without harness in mind.

tests/userproj2/ holds ``fitproj``: a ``Trainer`` class (AdamW, OneCycleLR stepped per
optimizer step, gradient accumulation, bf16 autocast on CPU, ``torch.compile(model,
backend="aot_eager")``), its own CSV data (data/plant.csv), split, seeding from a
*top-level* ``seed`` key, its own checkpoint (``checkpoints/best.ckpt``: epoch, model,
optimizer, scheduler, val_mse) and its own metric names (``val_mse``, ``val_mae``,
``test_mse``). Two entry points: ``fitproj.api:train_and_eval(config, data_path, out_dir)``
and ``python -m fitproj.cli --config CFG --data CSV --out DIR``. Its optuna_best/ was made
by running that code once (tests/userproj2/make_optuna_best.py).

config.yaml holds no ``training`` section and no ``trainer`` section: the harness finds the
seed at the top-level ``seed`` (its fallback after ``training.seed``; ``--seed-key``/``trainer.seed_key``
name any other key) and the weights in the project's checkpoint (``weights/best.ckpt``, tensors
under ``model``).

The bundle was recorded on the CPU named in :data:`BUNDLE_CPU` (bf16 matmuls on AMX):
there a retrain gives the trial's numbers bit for bit; on another CPU model the bf16
kernels may round differently, and only a sane retrain is asserted.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from harness import record
from harness.record import Status, WeightsDiff

from tests.cli.test_cli import harness
from tests.conftest import TESTS, patience

USERPROJ2 = TESTS / "userproj2"
FUNCTION = "fitproj.api:train_and_eval"
COMMAND = "{python} -m fitproj.cli --config {config} --data {data} --out {out_dir}"

# Where tests/userproj2/optuna_best/ was made: CPU model, the bf16 ISA it used, torch.
BUNDLE_CPU = "Intel(R) Xeon(R) Processor"
BUNDLE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
BUNDLE_TORCH = "2.13.0+cpu"


def _on_bundle_cpu() -> bool:
    import torch

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    return model == BUNDLE_CPU and BUNDLE_BF16_FLAGS <= flags and torch.__version__ == BUNDLE_TORCH


ON_BUNDLE_CPU = _on_bundle_cpu()
# the project's own run with seed 2025 there (train_and_eval({**config, 'seed': 2025}))
SEED_2025_VAL_MSE = 0.020815937963319747


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(USERPROJ2), PYTHONDONTWRITEBYTECODE="1")
    env.pop("HARNESS_DEBUG", None)
    return env


def _ckpt(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- (a) the project alone


def test_the_project_itself_is_seeded_by_its_top_level_seed(tmp_path: Path) -> None:
    """Same seed twice (its function, then its CLI's main) -> the same checkpoint; seed + 1 -> another.

    One process (torch.compile's first compilation is most of the cost); the CLI as its own process
    is run by the command-entry test below, and the committed checkpoint is a run of another process."""
    import torch

    bundle = USERPROJ2 / "optuna_best"
    data = USERPROJ2 / "data" / "plant.csv"
    cfg = yaml.safe_load((bundle / "config.yaml").read_text())
    script = (
        "import sys, yaml\n"
        "from fitproj.api import train_and_eval\n"
        "from fitproj.cli import main\n"
        "config, data, out = sys.argv[1:4]\n"
        "cfg = yaml.safe_load(open(config))\n"
        "train_and_eval(cfg, data_path=data, out_dir=out + '/a', verbose=False)\n"
        "main(['--config', config, '--out', out + '/b', '--quiet'])  # data.path from the config, as a user runs it\n"
        "train_and_eval({**cfg, 'seed': cfg['seed'] + 1}, data_path=data, out_dir=out + '/c', verbose=False)\n"
    )
    p = subprocess.run([sys.executable, "-c", script, str(bundle / "config.yaml"), str(data), str(tmp_path)],
                       check=False, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=patience(120))
    assert p.returncode == 0, p.stdout + p.stderr
    metrics = json.loads(p.stdout.strip().splitlines()[-1])  # the CLI's last stdout line: its scores
    assert set(metrics) >= {"val_mse", "val_mae", "test_mse", "test_mae"}

    a, b, c = (_ckpt(tmp_path / n / "checkpoints" / "best.ckpt") for n in "abc")
    assert set(a) == {"epoch", "model", "optimizer", "scheduler", "val_mse"}
    assert not any(k.startswith("_orig_mod.") for k in a["model"])  # the compiled module's own state is saved
    assert a["model"].keys() == b["model"].keys() == c["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["val_mse"] == b["val_mse"] == metrics["val_mse"] and a["epoch"] == b["epoch"]
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
    assert c["val_mse"] != a["val_mse"]
    assert cfg["compile"] == "aot_eager" and cfg["precision"] == "bf16" and cfg["train"]["accum_steps"] == 2

    archived = _ckpt(bundle / "weights" / "best.ckpt")
    trial = yaml.safe_load((bundle / "trial_info.yaml").read_text())
    if ON_BUNDLE_CPU:  # the bundle's own checkpoint, made by the same code here, bit for bit
        assert all(torch.equal(a["model"][k], archived["model"][k]) for k in archived["model"])
        assert a["val_mse"] == archived["val_mse"] == trial["value"]
    else:
        assert math.isclose(a["val_mse"], trial["value"], rel_tol=0.25)


# --------------------------------------------------------------------------- (b), (c) through harness run


def _project(tmp_path: Path) -> Path:
    """A private copy of the project, as committed (config.yaml's seed is the top-level `seed`)."""
    proj = tmp_path / "proj"
    shutil.copytree(USERPROJ2, proj, ignore=shutil.ignore_patterns("__pycache__"))
    return proj


def _assert_retrain_matches_trial(proj: Path, out: Path, stdout: str) -> record.ResultRecord:
    from harness import judge

    (rec,) = record.load(out).records  # the retrain alone: run without the automatic band
    assert rec.status is Status.OK
    trial = yaml.safe_load((proj / "optuna_best" / "trial_info.yaml").read_text())
    val, test = rec.retrained["val"], rec.retrained["test"]
    assert set(val) == {"mse", "mae"} and set(test) == {"mse", "mae"}  # flat val_mse/val_mae/test_*, aggregates
    assert rec.data_sha256  # data.path is hashed
    assert (out / rec.cell / "checkpoints" / "best.ckpt").is_file()  # the project's own checkpoint, in the cell's dir
    if ON_BUNDLE_CPU:
        assert val["mse"]["*"] == trial["value"]  # optuna's objective was val_mse
        assert val["mae"]["*"] == trial["user_attrs"]["val_mae"]
        assert test["mse"]["*"] == trial["user_attrs"]["test_mse"]
        assert judge.compare([rec]).cell(rec.cell).verdict is judge.Verdict.REPRODUCED
        # its own checkpoint format (weights/best.ckpt; checkpoints/best.ckpt here), tensors under "model"
        assert rec.weights_vs_archived == WeightsDiff(identical=True, first_difference=None, max_abs_diff=0.0)
        assert "reproduced" in stdout
    else:  # bf16 kernels of another CPU: a sane retrain of the same model
        assert math.isclose(val["mse"]["*"], trial["value"], rel_tol=0.25)
    return rec


def _run(tmp_path: Path, *trainer: str) -> record.ResultRecord:
    proj = _project(tmp_path)
    out = tmp_path / "out"
    # no automatic band: off the bundle's CPU one would add 8 compiled retrains to a test of the retrain
    p = harness("run", str(proj / "optuna_best"), *trainer, "--trainer-path", str(proj),
                "--out", str(out), "--device", "cpu", "--band", "0", "--band-seeds", "0")
    assert p.returncode == 0, p.stdout + p.stderr
    return _assert_retrain_matches_trial(proj, out, p.stdout)


def test_function_entry_reproduces_the_bundle(tmp_path: Path) -> None:
    rec = _run(tmp_path, "--trainer", FUNCTION)
    # its loader is its own: the record does not claim a seeded generator or a worker count it cannot know
    assert rec.determinism["loader_generator_seeded"] is None and rec.determinism["num_workers"] is None


def test_command_entry_reproduces_the_bundle(tmp_path: Path) -> None:
    rec = _run(tmp_path, "--trainer-cmd", COMMAND)
    assert rec.trainer["exit_status"] == 0 and "JSON" in rec.trainer["metrics_from"]  # its last stdout line
    (proc,) = rec.trainer["python_processes"]
    assert proc["seed"] == 2024 and proc["determinism"]["deterministic_algorithms"] is True  # the top-level seed
    assert rec.trainer["seeded_by_harness"] is True


def test_a_seed_band_member_reaches_the_projects_own_seed(tmp_path: Path) -> None:
    """The band's other seed must land where the project reads it (top-level `seed`), or the band is a copy of the run."""
    proj = _project(tmp_path)
    out = tmp_path / "out"
    p = harness("run", str(proj / "optuna_best"), "--trainer", FUNCTION, "--trainer-path", str(proj),
                "--out", str(out), "--device", "cpu", "--band-seeds", "2", "--band", "0")
    assert p.returncode == 0, p.stdout + p.stderr
    recs = {r.cell: r for r in record.load(out).records}
    assert all(r.status is Status.OK for r in recs.values()), {c: r.error for c, r in recs.items()}
    members = sorted((r for r in recs.values() if r.band), key=lambda r: r.band.seed)
    (base,) = [r for r in recs.values() if not r.band]
    assert [m.band.seed for m in members] == [2025, 2026]
    val_mse = [r.retrained["val"]["mse"]["*"] for r in (base, *members)]
    assert len(set(val_mse)) == 3, val_mse  # three seeds, three trainings: the band has a spread
    if ON_BUNDLE_CPU:  # the band's seed 2025 is exactly the project's own run with seed: 2025
        assert val_mse[0] == yaml.safe_load((proj / "optuna_best" / "trial_info.yaml").read_text())["value"]
        assert val_mse[1] == SEED_2025_VAL_MSE


# --------------------------------------------------------------------------- band, trace and diverge, unedited


def _band(proj: Path, out: Path, *args: str) -> dict[str, record.ResultRecord]:
    p = harness("band", str(proj / "optuna_best"), *args, "--trainer-path", str(proj), "--n", "2", "--trace",
                "--device", "cpu", "-o", str(out), "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    recs = {r.cell: r for r in record.load(out).records}
    assert set(recs) == {"band-ulp-1", "band-ulp-2"}
    return recs


def _steps(proj: Path) -> int:
    """The project's optimizer steps: its micro-batches per epoch, one step per accum_steps (and the leftover)."""
    cfg = yaml.safe_load((proj / "optuna_best" / "config.yaml").read_text())
    rows = len((USERPROJ2 / "data" / "plant.csv").read_text().splitlines()) - 1
    n_train = rows - int(rows * cfg["data"]["holdout"]["val"]) - int(rows * cfg["data"]["holdout"]["test"])
    batches = -(-n_train // cfg["train"]["batch_size"])
    return cfg["train"]["epochs"] * -(-batches // cfg["train"]["accum_steps"])


def test_the_project_unedited_gets_a_band_a_trace_and_diverge(tmp_path: Path) -> None:
    """Class-based fit(), gradient accumulation, OneCycleLR, bf16 autocast, torch.compile, its own checkpoint:
    the torch hooks perturb it and trace it as a function in the worker, and trace it as a command in its own
    process (the command's perturbation: tests/cli/test_userproj.py)."""
    proj = _project(tmp_path)
    recs = _band(proj, tmp_path / "band", "--trainer", FUNCTION)
    for r in recs.values():
        p = r.perturbation
        assert p.applied is True and p.updated is True, p
        assert p.tensor.startswith("_orig_mod.") and p.module == "OptimizedModule"  # the compiled model
        assert r.trace.steps == _steps(proj)  # one line per optimizer step, not per micro-batch
        assert r.weights_vs_archived is not None  # its own checkpoint format, found and compared
    out = tmp_path / "cmd"
    p = harness("run", str(proj / "optuna_best"), "--trainer-cmd", COMMAND, "--trainer-path", str(proj), "--trace",
                "--device", "cpu", "--out", str(out), "--no-progress", "--band", "0", "--band-seeds", "0")
    assert p.returncode == 0, p.stdout + p.stderr
    (cmd,) = record.load(out).records
    assert cmd.trace.steps == _steps(proj) and cmd.perturbation is None
    p = harness("diverge", str(tmp_path / "band" / "band-ulp-1"), str(out / cmd.cell))
    assert p.returncode == 3 and "cause: perturbed differently" in p.stdout, p.stdout + p.stderr
    assert "band-ulp-1 moved _orig_mod." in p.stdout
