"""`--data-dir DIR`: the directory around the data file, for trainers that read files beside it.

Local runs through the real CLI (a child process per cell), the container's mounts as
plain data. The Docker run itself is in tests/engine/test_docker_data_dir.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from harness import record
from harness.backends.docker import container_run_spec, container_spec
from harness.bundle import load_bundle
from harness.errors import InputError
from harness.plan import Cell, Job
from harness.record import ImageInfo, RunSpec, Status
from harness.safeio import sha256_file
from harness.worker.data import sha256_path

from tests.cli.test_cli import TRAINERS, harness


def make_project(root: Path, data_path: str = "../data/points.npz") -> Path:
    """``root/data/{points.npz, meta.json}`` and ``root/optuna_best`` for tests/trainers/siblings.py."""
    data = root / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(5)
    X = rng.standard_normal((40, 2, 3)).astype(np.float32)
    np.savez(data / "points.npz", X=X, y=(X.reshape(40, -1) @ rng.standard_normal((6, 2))).astype(np.float32))
    (data / "meta.json").write_text(json.dumps({"scale": 2.0, "targets": ["a", "b"]}))
    bundle = root / "optuna_best"
    bundle.mkdir()
    (bundle / "config.yaml").write_text(yaml.safe_dump({"training": {"seed": 3}, "data": {"path": data_path}}))
    return bundle


def trainer_args() -> list[str]:
    return ["--trainer", "siblings:train", "--trainer-path", str(TRAINERS)]


def error_line(p) -> str:
    assert "Traceback" not in p.stderr, p.stderr
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("harness: error:")]
    return line


def test_a_local_run_hashes_the_directory_and_the_trainer_reads_the_sibling(tmp_path: Path) -> None:
    bundle = make_project(tmp_path)
    data = tmp_path / "data"
    out = tmp_path / "out"
    p = harness("run", str(bundle), *trainer_args(), "--data-dir", str(data), "--device", "cpu", "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    (rec,) = record.load(out).records
    assert rec.status is Status.OK
    assert rec.extra == {"scale": 2.0}  # read from meta.json, beside the data file
    assert rec.data_sha256 == sha256_file(data / "points.npz")  # the data file, as the bundle records it
    assert rec.data["dir_sha256"] == sha256_path(data) and rec.data["in_dir"] == "points.npz"
    assert rec.spec["data_dir"] == str(data.resolve())
    # a sibling that changes moves the directory's digest, not the data file's
    (data / "meta.json").write_text(json.dumps({"scale": 3.0, "targets": ["a", "b"]}))
    p = harness("run", str(bundle), *trainer_args(), "--data-dir", str(data), "--device", "cpu",
                "--out", str(tmp_path / "out2"))
    assert p.returncode == 0, p.stdout + p.stderr
    (again,) = record.load(tmp_path / "out2").records
    assert again.data_sha256 == rec.data_sha256 and again.data["dir_sha256"] != rec.data["dir_sha256"]
    assert again.extra == {"scale": 3.0}


def test_data_path_relative_to_the_data_dir(tmp_path: Path) -> None:
    bundle = make_project(tmp_path, data_path="points.npz")  # not beside the bundle: inside the data dir
    out = tmp_path / "out"
    p = harness("run", str(bundle), *trainer_args(), "--data-dir", str(tmp_path / "data"), "--device", "cpu",
                "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    (rec,) = record.load(out).records
    assert rec.spec["data_path"] == str((tmp_path / "data" / "points.npz").resolve())


def test_data_outside_the_data_dir_is_refused(tmp_path: Path) -> None:
    bundle = make_project(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    p = harness("run", str(bundle), *trainer_args(), "--data-dir", str(other), "--device", "cpu",
                "--out", str(tmp_path / "o1"))
    assert p.returncode == 2
    line = error_line(p)
    assert "config.yaml" in line and "lies outside --data-dir" in line and str(other) in line
    p = harness("run", str(bundle), *trainer_args(), "--data", str(tmp_path / "data" / "points.npz"),
                "--data-dir", str(other), "--device", "cpu", "--out", str(tmp_path / "o2"))
    assert p.returncode == 2 and "--data" in error_line(p) and "lies outside --data-dir" in error_line(p)
    p = harness("run", str(bundle), *trainer_args(), "--data-dir", str(tmp_path / "nope"), "--device", "cpu",
                "--out", str(tmp_path / "o3"))
    assert p.returncode == 2 and "--data-dir" in error_line(p) and "is not a directory" in error_line(p)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_without_a_data_path_the_directory_is_the_data(tmp_path: Path) -> None:
    bundle = make_project(tmp_path)
    (bundle / "config.yaml").write_text(yaml.safe_dump({"training": {"seed": 3}}))
    b = load_bundle(bundle, trainer_override="siblings:train", trainer_path=[str(TRAINERS)],
                    data_dir=str(tmp_path / "data"))
    assert b.data.resolved == b.data.dir == str((tmp_path / "data").resolve())


def test_the_container_gets_the_whole_directory(tmp_path: Path) -> None:
    job = Job(bundle_dir=str(tmp_path / "b"), data_path=str(tmp_path / "d" / "sub" / "points.npz"),
              data_dir=str(tmp_path / "d"), results_dir=str(tmp_path / "r"))
    mounts = {target: (source, ro) for source, target, ro in container_spec(Cell("c"), job, "img").mounts}
    assert mounts["/harness/data"] == (str(tmp_path / "d"), True)
    assert not any(t.startswith("/harness/data/") for t in mounts)
    spec = container_run_spec(Cell("c"), job, ImageInfo(id="sha256:x"))
    assert spec.data_path == "/harness/data/sub/points.npz" and spec.data_dir == "/harness/data"
    whole = Job(bundle_dir="b", data_path=str(tmp_path / "d"), data_dir=str(tmp_path / "d"), results_dir="r")
    assert container_run_spec(Cell("c"), whole, ImageInfo(id="x")).data_path == "/harness/data"


def test_a_spec_without_data_dir_stays_readable_by_older_workers() -> None:
    spec = RunSpec(cell="c", bundle_dir="/b", out_dir="/o", data_path="/d/x.npz")
    assert "data_dir" not in spec.to_dict() and "data_dir" not in json.loads(spec.to_json())
    with_dir = RunSpec(cell="c", bundle_dir="/b", out_dir="/o", data_path="/d/x.npz", data_dir="/d")
    assert RunSpec.from_json(with_dir.to_dict()).data_dir == "/d"
    assert RunSpec.from_json(spec.to_dict()).data_dir is None


def test_within_data_dir_is_checked_in_the_worker_too(tmp_path: Path) -> None:
    bundle = make_project(tmp_path)
    with pytest.raises(InputError, match="lies outside --data-dir"):
        load_bundle(bundle, trainer_override="m:f", data_override=str(tmp_path / "data" / "points.npz"),
                    data_dir=str(bundle))


def test_a_link_that_leaves_the_data_dir_is_refused_before_anything_trains(tmp_path: Path) -> None:
    bundle = make_project(tmp_path)
    data = tmp_path / "data"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "vocab.txt").write_text("the host's own file")
    (data / "vocab.txt").symlink_to(elsewhere / "vocab.txt")  # absolute: a container resolves it to its own file
    (data / "sub").mkdir()
    (data / "sub" / "up.txt").symlink_to(Path("..") / ".." / "elsewhere" / "vocab.txt")  # relative, leaving
    (data / "same.json").symlink_to("meta.json")  # relative and inside: resolves alike everywhere
    out = tmp_path / "out"
    p = harness("run", str(bundle), *trainer_args(), "--data-dir", str(data), "--device", "cpu", "--out", str(out))
    assert p.returncode == 2, p.stdout + p.stderr
    line = error_line(p)
    assert f"--data-dir {data.resolve()}: holds a link that leaves it" in line
    assert f"vocab.txt -> {elsewhere / 'vocab.txt'}" in line and "sub/up.txt -> ../../elsewhere/vocab.txt" in line
    assert "same.json" not in line
    assert not out.exists()  # refused before anything ran
    # data that is a directory is hashed only without such links, with or without --data-dir
    with pytest.raises(InputError, match="holds a link that leaves it or is absolute"):
        sha256_path(data)
    (data / "vocab.txt").unlink()
    (data / "sub" / "up.txt").unlink()
    b = load_bundle(bundle, trainer_override="siblings:train", trainer_path=[str(TRAINERS)], data_dir=str(data))
    assert b.data.dir == str(data.resolve())
    assert len(sha256_path(data)) == 64  # the link that stays inside is hashed as the file it names
