"""A script as the trainer inside a pinned image, on a real Docker engine: the user project's own
entry point (``python -m userproj.cli``) reproduces with only --trainer-cmd and --trainer-path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness import record
from harness.record import Status

from .conftest import assert_reproduces
from .test_docker_matrix import docker_args, harness

pytestmark = pytest.mark.docker

USERPROJ = Path(__file__).parent / "userproj"


def test_a_command_trainer_reproduces_in_a_ci_image(docker_client, wheelhouse_root, base_image, tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    shutil.copytree(USERPROJ, proj, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "out"
    p = harness("run", str(proj / "optuna_best"), "--image", "cpu-torch2.13",
                "--trainer-cmd", "{python} -m userproj.cli {bundle} --out {out_dir} --data {data} --report yaml",
                "--trainer-path", str(proj), "--out", str(out), *docker_args(wheelhouse_root, base_image))
    assert p.returncode == 0, p.stdout + p.stderr
    (rec,) = record.load(out).records
    assert rec.status is Status.OK and rec.backend == "docker" and rec.env.in_container
    assert_reproduces(rec, p.stdout)  # bit for bit on the trial's CPU model, to numerical noise elsewhere
    # the command ran in the container, with the image's Python and the container's paths, seeded by the harness
    assert rec.trainer["argv"][0] == "/opt/venv/bin/python" and rec.trainer["cwd"] == "/harness/out"
    assert rec.trainer["seeded_by_harness"] is True
    (proc,) = rec.trainer["python_processes"]
    assert proc["torch"] == rec.env.torch and proc["determinism"]["deterministic_algorithms"] is True
    assert (out / "cpu-torch2.13" / "trainer.stdout.log").read_text().startswith("retraining /harness/bundle")
