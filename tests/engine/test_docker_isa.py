"""The ISA axis in containers: the switches reach the container before its interpreter starts.

Marked `docker`: skipped locally without an engine, required under CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import record
from harness.record import Status
from harness.worker.isa import read_host_levels

from tests.conftest import EXAMPLE_CONV, REPO

pytestmark = pytest.mark.docker


@pytest.mark.skipif("baseline" not in read_host_levels(), reason="an x86-64 host with CPU flags is needed")
def test_two_isa_cells_of_one_image_run_other_kernels(tmp_path: Path, docker_client, wheelhouse_root: Path,
                                                      base_image: str) -> None:
    shutil.copytree(EXAMPLE_CONV, tmp_path / "examples" / "optuna_best_conv")
    shutil.copytree(REPO / "examples" / "data", tmp_path / "examples" / "data")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "harness", "matrix", str(tmp_path / "examples" / "optuna_best_conv"),
                        "--cells", "cpu-torch2.13", "--isa", "native,baseline", "--threads", "1", "--out", str(out),
                        "--band", "0", "--band-seeds", "0",  # the kernels are compared, not judged
                        "--json", str(tmp_path / "r.json"), "--wheelhouse", str(wheelhouse_root),
                        "--base-image", base_image, "--no-progress", "--detail"],
                       capture_output=True, text=True, env=dict(os.environ, COLUMNS="230"), timeout=1800)
    assert p.returncode == 0, p.stdout + p.stderr
    recs = {r.cell: r for r in record.load(out).records}
    assert list(recs) == ["cpu-torch2.13-native", "cpu-torch2.13-baseline"]
    native, base = recs["cpu-torch2.13-native"], recs["cpu-torch2.13-baseline"]
    for rec in (native, base):
        assert rec.status is Status.OK and rec.env.in_container is True and rec.env.torch == "2.13.0+cpu"
    # measured inside the containers: the image's torch took the level each container was given
    assert native.env.cpu_capability in ("AVX2", "AVX512") and native.env.isa_env == {}
    assert base.env.cpu_capability == "DEFAULT" and base.env.isa_requested == "baseline"
    assert base.env.isa_env == {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                                "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
    assert native.weights_sha256 != base.weights_sha256  # the Conv1d example shows the axis: ≠first
    report = json.loads((tmp_path / "r.json").read_text())
    isa = next(a for a in report["attribution"]["axes"] if a["axis"] == "isa")
    assert isa["status"] == "measured" and isa["pairs"] == [["cpu-torch2.13-native", "cpu-torch2.13-baseline"]]
    assert "DEFAULT (baseline)" in p.stdout and "≠first" in p.stdout
