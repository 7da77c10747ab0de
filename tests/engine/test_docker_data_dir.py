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

from tests.cli.test_data_dir import make_project, trainer_args

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


def test_a_container_cell_exports_and_its_export_reruns_reproduced(tmp_path: Path, wheelhouse_root, base_image) -> None:
    bundle = make_project(tmp_path)
    data = tmp_path / "data"
    docker = ["--image", CELL, "--wheelhouse", str(wheelhouse_root), "--base-image", base_image, "--no-progress"]
    p = harness("run", str(bundle), *trainer_args(), *docker, "--data-dir", str(data), "--out", str(tmp_path / "out"))
    assert p.returncode == 0, p.stdout + p.stderr
    exported = tmp_path / "exported"
    p = harness("export", str(tmp_path / "out"), "-o", str(exported))
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"--data-dir {data.resolve()}" in p.stdout  # the rerun needs the directory again
    p = harness("run", str(exported), *docker, "--data-dir", str(data), "--out", str(tmp_path / "again"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "reproduced" in p.stdout
    (first,) = record.load(tmp_path / "out").records
    (again,) = record.load(tmp_path / "again").records
    assert again.weights_sha256 == first.weights_sha256 and again.weights_vs_archived.identical is True


def test_snapshot_of_a_custom_trainer_with_directory_data_reruns_offline(tmp_path: Path, wheelhouse_root,
                                                                        base_image) -> None:
    """data.path names a directory and the trainer's code lies in the bundle: both are archived."""
    import shutil

    import yaml

    from harness import snapshot as snap

    from tests.cli.test_cli import TRAINERS

    bundle = make_project(tmp_path)
    shutil.copytree(TRAINERS, bundle / "code", ignore=shutil.ignore_patterns("__pycache__"))
    (bundle / "config.yaml").write_text(yaml.safe_dump({
        "training": {"seed": 3}, "data": {"path": "../data"},
        "trainer": {"entrypoint": "siblings:train", "code_dir": "code"}}))
    archive = tmp_path / "dir.harness.tar"
    p = harness("snapshot", str(bundle), "--cell", CELL, "-o", str(archive), "--out", str(tmp_path / "out"),
                "--wheelhouse", str(wheelhouse_root), "--base-image", base_image, "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    m = snap.verify(archive).manifest
    assert snap.DATA_TREE in {e["name"] for e in m["members"]} and m["data"]["kind"] == "directory"
    assert m["data"]["sha256"] == sha256_path(tmp_path / "data")
    shutil.rmtree(tmp_path / "data")  # the rerun has only the archive
    shutil.rmtree(bundle)
    p = harness("rerun", str(archive), "--out", str(tmp_path / "rerun"), "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "bitwise identical" in p.stdout
    rerun = record.read(tmp_path / "rerun" / f"{CELL}@rerun" / "record.json")
    assert rerun.status is Status.OK and rerun.extra == {"scale": 2.0}
    assert rerun.data_sha256 == m["data"]["sha256"] and rerun.env.extra["net_interfaces"] == ["lo"]
