"""A numeric switch set in the caller's environment (MKL_CBWR, ...) reaches the worker, its record and the attribution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from harness import record
from harness.worker.envinfo import SWITCHES

from tests.conftest import REPO, patience


def _run(bundle: Path, out: Path, **switches: str) -> record.ResultRecord:
    env = {k: v for k, v in os.environ.items() if k not in SWITCHES}
    env.update(switches, COLUMNS="220")
    p = subprocess.run([sys.executable, "-m", "harness", "run", str(bundle), "--device", "cpu", "--out", str(out),
                        "--no-progress"], capture_output=True, text=True, cwd=REPO, env=env, timeout=patience(300))
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
