"""Snapshots of data that is a directory (a directory data.path, or a run with --data-dir),
without Docker: the tree is archived, unpacked for the rerun, checked against its digest and
mounted whole. The real round trip on an engine is in tests/engine/test_docker_snapshot.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import record as records
from harness.cli import main
from harness.worker.data import sha256_path

from tests.fake_engine import FakeEngine, Outcome
from tests.records import record as compare_record
from tests.unit.backends.test_docker_fake_engine import PACKAGES, make_archive, patched  # noqa: F401 - patched is a fixture
from tests.cli.snapshot.test_security import error_line, reseal


def bundle(tmp_path: Path) -> Path:
    """A custom trainer's bundle: the harness reads only its seed and its data."""
    b = tmp_path / "bundle" / "optuna_best"
    b.mkdir(parents=True)
    (b / "config.yaml").write_text("training: {seed: 1}\ntrainer: {entrypoint: 'siblings:train'}\n")
    return b


def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "dataset"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "points.npz").write_bytes(b"points")
    (d / "meta.json").write_text('{"scale": 2.0}')
    return d


def test_rerun_unpacks_the_directory_and_mounts_it_whole(patched: FakeEngine, tmp_path: Path, capsys) -> None:
    d = data_dir(tmp_path)
    archive, _, image_id = make_archive(tmp_path, patched, packages=PACKAGES, bundle=bundle(tmp_path), data_dir=d, in_dir="sub/points.npz")
    seen: dict = {}

    def worker(out: Path, req) -> None:
        mounts = {target: Path(source) for source, target, _ in req.mounts}
        seen.update(mounts=mounts, meta=(mounts["/harness/data"] / "meta.json").read_text(),
                    digest=sha256_path(mounts["/harness/data"]))
        spec = json.loads((out / "spec.json").read_text())
        records.write(out / "record.json", compare_record(spec["cell"]))

    patched.outcomes.append(Outcome(0, worker=worker))
    rc = main(["rerun", str(archive), "--out", str(tmp_path / "o"), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    assert seen["meta"] == '{"scale": 2.0}' and seen["digest"] == sha256_path(d)
    assert not any(t.startswith("/harness/data/") for t in seen["mounts"])  # the directory, not one file


def test_a_tree_that_is_not_the_archived_one_is_refused(patched: FakeEngine, tmp_path: Path, capsys) -> None:
    d = data_dir(tmp_path)
    archive, _, _ = make_archive(tmp_path, patched, packages=PACKAGES, bundle=bundle(tmp_path), data_dir=d, in_dir="sub/points.npz")
    reseal(archive, lambda m: m["data"]["dir"].update(sha256="ab" * 32))
    rc = main(["rerun", str(archive), "--out", str(tmp_path / "o"), "--no-progress"])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "dataset" in line and "the archived run ran with the --data-dir abababababab" in line
    assert patched.runs == []


@pytest.mark.parametrize("bad", ["../escaped", "/etc/passwd", "a//b", "sub/../../x"])
def test_a_path_inside_the_directory_must_stay_inside(patched: FakeEngine, tmp_path: Path, capsys, bad: str) -> None:
    d = data_dir(tmp_path)
    archive, _, _ = make_archive(tmp_path, patched, packages=PACKAGES, bundle=bundle(tmp_path), data_dir=d, in_dir="sub/points.npz")
    reseal(archive, lambda m: m["data"]["dir"].update(in_dir=bad))
    rc = main(["rerun", str(archive), "--out", str(tmp_path / "o"), "--no-progress"])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "data.dir.in_dir" in line
    assert patched.runs == []


def test_no_data_needs_the_data_dir_and_checks_it(patched: FakeEngine, tmp_path: Path, capsys) -> None:
    d = data_dir(tmp_path)
    archive, _, _ = make_archive(tmp_path, patched, packages=PACKAGES, bundle=bundle(tmp_path), data_dir=d, in_dir="sub/points.npz")
    reseal(archive, lambda m: m["data"].update(included=False))  # as --no-data writes it (the tree member unused)
    rc = main(["rerun", str(archive), "--out", str(tmp_path / "o1"), "--no-progress"])
    assert rc == 2 and "pass --data-dir DIR" in error_line(capsys.readouterr().err)
    (d / "meta.json").write_text('{"scale": 3.0}')  # a sibling changed since the run
    rc = main(["rerun", str(archive), "--data-dir", str(d), "--out", str(tmp_path / "o2"), "--no-progress"])
    assert rc == 2 and "ran with the --data-dir" in error_line(capsys.readouterr().err)
    (d / "meta.json").write_text('{"scale": 2.0}')
    patched.outcomes.append(Outcome(0, worker=lambda out, req: records.write(
        out / "record.json", compare_record(json.loads((out / "spec.json").read_text())["cell"]))))
    rc = main(["rerun", str(archive), "--data-dir", str(d), "--out", str(tmp_path / "o3"), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    (req,) = patched.runs
    assert {t: s for s, t, _ in req.mounts}["/harness/data"] == str(d.resolve())
