"""Where a custom trainer runs inside a pinned image, on a real Docker engine (tests/cli/test_trainer_cwd.py runs
the same project locally): with ``trainer.cwd: project`` in its project's folder as the container mounts it,
``/harness/trainer/0``, where the project's own relative data path works unchanged; by default in the image's
working directory, which a missing file's reason names."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness import record
from harness.record import Status

from tests.engine.test_docker_matrix import docker_args, harness
from tests.cli.test_trainer_cwd import _project

pytestmark = pytest.mark.docker


def test_a_function_trainer_runs_in_its_mounted_project(docker_client, wheelhouse_root, base_image,
                                                         tmp_path: Path) -> None:
    proj = _project(tmp_path, cwd="project")
    out = tmp_path / "out"
    p = harness("run", str(proj / "optuna_best"), "--image", "cpu-torch2.13", "--out", str(out),
                *docker_args(wheelhouse_root, base_image))
    assert p.returncode == 0, p.stdout + p.stderr
    (rec,) = record.load(out).records
    assert rec.status is Status.OK and rec.backend == "docker" and rec.env.in_container
    assert rec.trainer["cwd"] == "/harness/trainer/0" and rec.trainer["cwd_mode"] == "project"
    assert rec.retrained["val_loss"] == 2.5
    assert rec.host_paths["trainer_path"] == [str(proj)]  # the host folder behind /harness/trainer/0

    # the default: the image's working directory, named in the reason when the project's path is not there
    cfg_path = proj / "optuna_best" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    del cfg["trainer"]["cwd"]
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "default"
    # (--data of the same name would be mounted at /harness/data/points.csv: data/points.csv from /harness)
    values = tmp_path / "values.csv"
    values.write_bytes((proj / "data" / "points.csv").read_bytes())
    p = harness("run", str(proj / "optuna_best"), "--image", "cpu-torch2.13", "--out", str(out),
                "--data", str(values), *docker_args(wheelhouse_root, base_image))
    assert p.returncode == 1, p.stdout + p.stderr
    (rec,) = record.load(out).records
    assert rec.status is Status.FAILED and "FileNotFoundError" in rec.error.message
    assert "the trainer ran in /harness (trainer.cwd unset" in rec.error.message
    assert rec.trainer == {"cwd": "/harness", "cwd_mode": "default"}
