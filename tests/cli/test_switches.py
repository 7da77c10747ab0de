"""A numeric switch set in the caller's environment (MKL_CBWR, ...), or a precision a trainer sets itself, reaches the
record and the attribution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import record
from harness.attribution import attribute
from harness.worker.envinfo import SWITCHES

from tests.conftest import REPO, patience

TRAINERS = REPO / "tests" / "trainers"


def _run(bundle: Path, out: Path, *args: str, **switches: str) -> record.ResultRecord:
    env = {k: v for k, v in os.environ.items() if k not in SWITCHES}
    env.update(switches, COLUMNS="220")
    p = subprocess.run([sys.executable, "-m", "harness", "run", str(bundle), "--device", "cpu", "--out", str(out),
                        "--no-progress", *args], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=patience(300))
    assert p.returncode == 0, p.stdout + p.stderr
    (rec,) = record.load(out).records
    return rec


def test_mkl_cbwr_reaches_the_record_and_is_the_axis_the_runs_differ_in(make_bundle, tmp_path: Path) -> None:
    bundle = make_bundle()
    plain = _run(bundle, tmp_path / "plain")
    cnr = _run(bundle, tmp_path / "cnr", MKL_CBWR="COMPATIBLE")  # MKL's portable branch, in CNR mode
    assert plain.env.switches == {} and cnr.env.switches == {"MKL_CBWR": "COMPATIBLE"}
    p = subprocess.run([sys.executable, "-m", "harness", "compare", str(tmp_path / "plain"), str(tmp_path / "cnr"),
                        "--json", str(tmp_path / "c.json")], capture_output=True, text=True, cwd=REPO,
                       timeout=patience(300))
    assert p.returncode in (0, 3), p.stdout + p.stderr
    axes = {a["axis"]: a for a in json.loads((tmp_path / "c.json").read_text())["attribution"]["axes"]}
    assert axes["switches"]["status"] == "measured" and sorted(axes["switches"]["values"]) == ["MKL_CBWR=COMPATIBLE",
                                                                                                "none"]
    assert all(a["status"] != "measured" for name, a in axes.items() if name != "switches")  # nothing else differs
    assert "nondeterministic" not in p.stdout  # the switch, not the kernels' nondeterminism, is what the runs differ in


def test_a_trainers_own_per_backend_precision_is_recorded_and_is_the_axis(make_bundle, tmp_path: Path) -> None:
    """torch.backends.mkldnn.matmul.fp32_precision = "bf16" in the user's code: torch then refuses its legacy
    getter, and the cell is still recorded, with the precision it trained at; the runs differ in ``tf32`` only."""
    import torch

    if not hasattr(torch.backends.mkldnn, "matmul"):
        pytest.skip("this torch has no per-backend float32 precision (torch < 2.9)")
    bundle = make_bundle()
    common = ("--trainer-path", str(TRAINERS), "--threads", "1", "--band", "0", "--band-seeds", "0")
    plain = _run(bundle, tmp_path / "plain", "--trainer", "seed_style:train", *common)
    bf16 = _run(bundle, tmp_path / "bf16", "--trainer", "bf16_matmul:train", *common)
    assert plain.determinism["fp32_precision"]["mkldnn.matmul"] == "ieee"
    assert bf16.determinism["fp32_precision"]["mkldnn.matmul"] == "bf16"
    assert bf16.determinism["float32_matmul_precision"] is None  # torch will not say, after both APIs were used
    axes = {a.axis: a for a in attribute([plain, bf16]).axes}
    assert sorted(axes["tf32"].values) == ["bf16", "off"]
    assert all(not a.values or len(a.values) == 1 for name, a in axes.items() if name != "tf32"), axes
