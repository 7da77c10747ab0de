"""`--data-dir` on a real Docker engine: a trainer that reads a file beside its data file
works in a container only when the whole directory is mounted.

Marked `docker`: skipped locally without an engine, required under CI=true.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import record
from harness.record import Status
from harness.worker.data import sha256_file, sha256_path

from .test_data_dir import make_project, trainer_args

pytestmark = pytest.mark.docker

CELL = "cpu-torch2.13"


def harness(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="230")
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, env=env, timeout=1800)


def test_the_directory_is_mounted_and_hashed(tmp_path: Path, wheelhouse_root, base_image) -> None:
    bundle = make_project(tmp_path)
    data = tmp_path / "data"
    docker = ["--image", CELL, "--wheelhouse", str(wheelhouse_root), "--base-image", base_image, "--no-progress"]
    # without --data-dir only the data file is mounted: the trainer cannot find meta.json beside it
    alone = harness("run", str(bundle), *trainer_args(), *docker, "--out", str(tmp_path / "alone"))
    assert alone.returncode == 1, alone.stdout + alone.stderr
    (failed,) = record.load(tmp_path / "alone").records
    assert failed.status is Status.FAILED and "meta.json" in failed.error.message
    p = harness("run", str(bundle), *trainer_args(), *docker, "--data-dir", str(data), "--out", str(tmp_path / "out"))
    assert p.returncode == 0, p.stdout + p.stderr
    (rec,) = record.load(tmp_path / "out").records
    assert rec.status is Status.OK and rec.env.in_container and rec.extra == {"scale": 2.0}
    assert rec.spec["data_dir"] == "/harness/data" and rec.spec["data_path"] == "/harness/data/points.npz"
    assert rec.data_sha256 == sha256_file(data / "points.npz")
    assert rec.data["dir_sha256"] == sha256_path(data)  # measured inside the container = on the host
    assert rec.host_paths["data_dir"] == str(data.resolve())
