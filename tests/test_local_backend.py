"""The local backend's child environment, and the worker's refusal to train without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from harness.plan import Cell
from harness.backends.local import child_env
from harness import record
from harness.record import RunSpec, Status


def test_strict_child_gets_the_variables_before_start() -> None:
    env = child_env(Cell("c", determinism="strict", threads=3), base={"PATH": "/bin", "OMP_NUM_THREADS": "9"})
    assert env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and env["PYTHONHASHSEED"] == "0"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # a CPU cell never touches a GPU


def test_default_child_does_not_inherit_them() -> None:
    env = child_env(Cell("c", determinism="default"), base={"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONHASHSEED": "0"})
    assert "CUBLAS_WORKSPACE_CONFIG" not in env and "PYTHONHASHSEED" not in env


def test_cuda_child_keeps_its_gpus() -> None:
    assert "CUDA_VISIBLE_DEVICES" not in child_env(Cell("g", device="cuda"), base={})


def test_worker_refuses_strict_mode_without_the_launch_variables(make_bundle, tmp_path: Path) -> None:
    root = make_bundle()
    spec = RunSpec(cell="c", bundle_dir=str(root), out_dir=str(tmp_path / "o"))
    (tmp_path / "spec.json").write_text(spec.to_json())
    env = {k: v for k, v in os.environ.items() if k not in ("CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED")}
    p = subprocess.run([sys.executable, "-m", "harness.worker", "--spec", str(tmp_path / "spec.json")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1
    rec = record.read(tmp_path / "o" / "record.json")
    assert rec.status is Status.FAILED and "CUBLAS_WORKSPACE_CONFIG=:4096:8" in rec.error.message
    assert "PYTHONHASHSEED=0" in rec.error.message


def test_worker_refuses_a_spec_of_another_version(make_bundle, tmp_path: Path) -> None:
    root = make_bundle()
    spec = json.loads(RunSpec(cell="c", bundle_dir=str(root), out_dir=str(tmp_path / "o")).to_json())
    spec["schema"] = "harness.runspec/1"
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    p = subprocess.run([sys.executable, "-m", "harness.worker", "--spec", str(tmp_path / "spec.json")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    rec = record.read(tmp_path / "o" / "record.json")
    assert rec.status is Status.FAILED and "has schema harness.runspec/1" in rec.error.message
