"""Where a custom trainer runs (``trainer.cwd``, ``--trainer-cwd``) and how data.path reaches it.

tests/cwdproj is a foreign project whose code opens config.yaml's ``data.path`` as written, relative to
the directory it runs in; its data lies beside its code, not in its optuna_best/. Every run goes through
the real CLI (``python -m harness run``), started from a directory that is neither the project nor the
bundle, as a user in another terminal would.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from harness import record
from harness.bundle import load_bundle
from harness.errors import InputError
from harness.record import RunSpec, Status

from tests.cli.test_cli import harness
from tests.conftest import REPO, TESTS

CWDPROJ = TESTS / "cwdproj"
COMMAND = "{python} -m cwdproj.cli {config}"


def _project(root: Path, **trainer: object) -> Path:
    """A private copy of tests/cwdproj under ``root``; ``trainer`` keys are added to config.yaml's trainer section."""
    proj = root / "proj"
    shutil.copytree(CWDPROJ, proj, ignore=shutil.ignore_patterns("__pycache__"))
    if trainer:
        cfg_path = proj / "optuna_best" / "config.yaml"
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg["trainer"].update(trainer)
        cfg_path.write_text(yaml.safe_dump(cfg))
    return proj


def _elsewhere(root: Path) -> Path:
    where = root / "elsewhere"
    where.mkdir()
    return where


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("harness: error:")]
    return line


@pytest.fixture(scope="module")
def project_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """config.yaml says trainer.cwd: project; run from another directory, without --data: (project, cwd, results)."""
    root = tmp_path_factory.mktemp("cwd-project")
    proj = _project(root, cwd="project")
    where = _elsewhere(root)
    p = harness("run", str(proj / "optuna_best"), "--device", "cpu", "--out", str(root / "res"), "--no-progress",
                cwd=where)
    assert p.returncode == 0, p.stdout + p.stderr
    return proj, where, root / "res"


# --------------------------------------------------------------------------- today's default: where harness runs


def test_by_default_a_function_runs_where_harness_runs_and_a_missing_file_names_it(tmp_path: Path) -> None:
    proj = _project(tmp_path)
    where = _elsewhere(tmp_path)
    # data.path is resolved from the bundle, where the project's data is not: one line, before anything trains
    p = harness("run", str(proj / "optuna_best"), "--device", "cpu", "--out", str(tmp_path / "none"), cwd=where)
    assert p.returncode == 2
    line = _one_error_line(p.stderr)
    assert "data not found" in line and "trainer.cwd: project" in line
    # with --data the harness finds the data, but the trainer opens data.path relative to its working directory
    p = harness("run", str(proj / "optuna_best"), "--device", "cpu", "--data", str(proj / "data" / "points.csv"),
                "--out", str(tmp_path / "res"), "--no-progress", cwd=where)
    assert p.returncode == 1, p.stdout + p.stderr
    (rec,) = record.load(tmp_path / "res").records
    assert rec.status is Status.FAILED
    msg = rec.error.message
    assert "FileNotFoundError" in msg and "'data/points.csv'" in msg
    assert f"the trainer ran in {where} (trainer.cwd unset" in msg
    assert "trainer.cwd: project" in msg and "--trainer-cwd project" in msg and "--data" in msg
    assert "\n" not in msg
    assert rec.trainer == {"cwd": str(where), "cwd_mode": "default"}  # a failed record says where it ran too
    assert f"the trainer ran in {where}" in p.stdout + p.stderr


def test_by_default_a_command_runs_in_its_cell_and_a_missing_file_names_it(tmp_path: Path) -> None:
    proj = _project(tmp_path)
    where = _elsewhere(tmp_path)
    out = tmp_path / "res"
    p = harness("run", str(proj / "optuna_best"), "--trainer-cmd", COMMAND, "--trainer-path", str(proj),
                "--device", "cpu", "--data", str(proj / "data" / "points.csv"), "--out", str(out), "--no-progress",
                cwd=where)
    assert p.returncode == 1, p.stdout + p.stderr
    (rec,) = record.load(out).records
    msg = rec.error.message
    assert "the trainer command exited with status 1" in msg and "No such file" in msg
    assert f"the trainer ran in {out / 'run'} (trainer.cwd unset: the cell's results directory)" in msg
    assert "trainer.cwd: project" in msg and "FileNotFoundError" in rec.error.log_tail
    assert rec.trainer == {"cwd": str(out / "run"), "cwd_mode": "default"}


# --------------------------------------------------------------------------- trainer.cwd: project


def test_with_project_one_data_path_serves_the_harness_and_the_code(project_run) -> None:
    proj, _, res = project_run
    (rec,) = record.load(res).records
    assert rec.status is Status.OK
    assert rec.trainer["cwd"] == str(proj) and rec.trainer["cwd_mode"] == "project"
    assert rec.retrained["val_loss"] == 2.5  # the trainer read the file the harness hashed
    data = proj / "data" / "points.csv"
    assert rec.data_sha256 == hashlib.sha256(data.read_bytes()).hexdigest()
    assert rec.spec["trainer_cwd"] == "project"


def test_the_flag_runs_a_command_in_its_project(tmp_path: Path) -> None:
    proj = _project(tmp_path)
    where = _elsewhere(tmp_path)
    out = tmp_path / "res"
    p = harness("run", str(proj / "optuna_best"), "--trainer-cmd", COMMAND, "--trainer-path", str(proj),
                "--trainer-cwd", "project", "--device", "cpu", "--out", str(out), "--no-progress", cwd=where)
    assert p.returncode == 0, p.stdout + p.stderr
    (rec,) = record.load(out).records
    assert rec.trainer["cwd"] == str(proj) and rec.trainer["cwd_mode"] == "project"
    assert rec.retrained["val_loss"] == 2.5
    assert (out / "run" / "trainer.stdout.log").is_file()  # its logs stay in its cell


def test_with_bundle_a_path_relative_to_the_bundle_serves_both(tmp_path: Path) -> None:
    proj = _project(tmp_path, cwd="bundle")
    cfg_path = proj / "optuna_best" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["data"]["path"] = "../data/points.csv"  # from the bundle, as the harness has always read it
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "res"
    p = harness("run", str(proj / "optuna_best"), "--device", "cpu", "--out", str(out), "--no-progress",
                cwd=_elsewhere(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    (rec,) = record.load(out).records
    assert rec.trainer["cwd"] == str(proj / "optuna_best") and rec.trainer["cwd_mode"] == "bundle"
    assert rec.retrained["val_loss"] == 2.5


def test_an_exported_project_run_keeps_its_cwd_and_finds_its_data(project_run, tmp_path: Path) -> None:
    proj, _, res = project_run
    out = tmp_path / "exp"
    p = harness("export", str(res), "-o", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["trainer"]["cwd"] == "project"
    bundle = load_bundle(out)
    assert bundle.trainer.cwd == "project" and bundle.data.resolved == str(proj / "data" / "points.csv")


# --------------------------------------------------------------------------- bad values, before anything trains


@pytest.mark.parametrize("how", ["config", "flag"])
def test_a_bad_trainer_cwd_is_one_line_exit_2(how: str, tmp_path: Path) -> None:
    proj = _project(tmp_path, **({"cwd": "home"} if how == "config" else {}))
    args = ["--trainer-cwd", "home"] if how == "flag" else []
    p = harness("run", str(proj / "optuna_best"), "--device", "cpu", "--out", str(tmp_path / "res"), *args)
    assert p.returncode == 2
    line = _one_error_line(p.stderr)
    assert ("--trainer-cwd 'home'" if how == "flag" else "config.yaml: trainer.cwd 'home'") in line
    assert "is not one of bundle, project" in line and "trainer.cwd" in line
    assert not (tmp_path / "res" / "run").exists()


def test_project_needs_a_code_directory(tmp_path: Path) -> None:
    proj = _project(tmp_path, cwd="project")
    with pytest.raises(InputError, match="trainer.cwd: project runs the trainer in its code directory, but no "
                                         "--trainer-path"):
        load_bundle(proj / "optuna_best", trainer_cmd_override=COMMAND)  # a command keeps no config code_dir
    with pytest.raises(InputError, match="--trainer-cwd: sets where your own trainer runs"):
        load_bundle(REPO / "examples" / "optuna_best", trainer_cwd_override="project")


def test_project_resolves_a_relative_data_path_from_the_code_and_data_stays_data(tmp_path: Path) -> None:
    proj = _project(tmp_path)
    bundle = load_bundle(proj / "optuna_best", trainer_cwd_override="project")
    assert bundle.trainer.cwd == "project" and bundle.data.resolved == str(proj / "data" / "points.csv")
    given = tmp_path / "other.csv"
    given.write_text("1\n")
    bundle = load_bundle(proj / "optuna_best", trainer_cwd_override="project", data_override=str(given))
    assert bundle.data.resolved == str(given)  # --data is yours, as always
    assert load_bundle(proj / "optuna_best").data.resolved == str(proj / "optuna_best" / "data" / "points.csv")


def test_the_spec_carries_trainer_cwd_only_when_set_and_refuses_a_bad_one() -> None:
    spec = RunSpec(cell="c", bundle_dir="/b", out_dir="/o")
    assert "trainer_cwd" not in spec.to_dict()  # a worker of an older image still reads the spec
    doc = dict(spec.to_dict(), trainer_cwd="project")
    assert RunSpec.from_json(doc).trainer_cwd == "project"
    with pytest.raises(InputError, match="trainer_cwd 'home' is not one of bundle, project"):
        RunSpec.from_json(dict(doc, trainer_cwd="home"))


def test_a_record_written_before_trainer_cwd_still_loads(project_run) -> None:
    _, _, res = project_run
    doc = record.ResultRecord.from_json(record.load(res).records[0].to_dict()).to_dict()
    for key in ("cwd", "cwd_mode"):
        del doc["trainer"][key]
    old = record.ResultRecord.from_json(doc)
    assert old.status is Status.OK and "cwd" not in old.trainer
