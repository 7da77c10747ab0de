"""Acceptance: a foreign project written like real user code reproduces with only
``--trainer module:function --trainer-path DIR`` (no adapter, no edits).

tests/userproj/ holds the project (its own CSV loader, split, loop and weights
digest), its data (a CSV) and an optuna_best/ made by running the project's own
code once (tests/userproj/make_optuna_best.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from harness import record
from harness.record import Status

from .test_cli import harness

USERPROJ = Path(__file__).parent / "userproj"


def _copy(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    shutil.copytree(USERPROJ, proj, ignore=shutil.ignore_patterns("__pycache__"))
    return proj


def test_user_project_reproduces_with_run(tmp_path: Path) -> None:
    proj = _copy(tmp_path)
    out = tmp_path / "out"
    p = harness("run", str(proj / "optuna_best"), "--trainer", "userproj.train:retrain", "--trainer-path", str(proj),
                "--out", str(out), "--device", "cpu")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "reproduced" in p.stdout and "=archived" in p.stdout
    (rec,) = record.load(out).records
    assert rec.status is Status.OK
    assert rec.weights_vs_archived == {"identical": True, "first_difference": None, "max_abs_diff": 0.0}
    assert rec.user_weights["identical_to_recorded"] is True  # the project's own digest convention
    assert rec.data_sha256  # the CSV is hashed as bytes
    val = rec.retrained["val"]
    assert set(val["r2"]) == {"*"} and isinstance(val["mse"]["*"], float)


def test_user_project_reproduces_in_a_matrix(tmp_path: Path) -> None:
    proj = _copy(tmp_path)
    out = tmp_path / "out"
    p = harness("matrix", str(proj / "optuna_best"), "--trainer", "userproj.train:retrain", "--trainer-path", str(proj),
                "--backend", "local", "--devices", "cpu", "--threads", "1,all", "--determinism", "strict",
                "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    recs = record.load(out).records
    assert len(recs) == 2 and all(r.status is Status.OK for r in recs)
    assert all(r.weights_vs_archived["identical"] for r in recs)
    assert p.stdout.count("=archived") >= 2
