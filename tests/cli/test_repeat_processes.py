"""benchmarks/repeat_processes.py: the fresh-process repeat count that docs/verdicts.md quotes trains
what a harness cell trains, so what it counts is the harness's own retrain."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from harness import record

from tests.conftest import REPO, patience

SCRIPT = REPO / "benchmarks" / "repeat_processes.py"


def test_each_run_trains_the_harness_cells_weights_and_the_count_adds_up(make_bundle, tmp_path: Path) -> None:
    bundle = make_bundle()
    out = tmp_path / "out"
    cell = subprocess.run([sys.executable, "-m", "harness", "run", str(bundle), "--device", "cpu", "--threads", "1",
                           "--band", "0", "--band-seeds", "0", "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=patience(300))
    assert cell.returncode == 0, cell.stdout + cell.stderr
    (rec,) = record.load(out).records
    p = subprocess.run([sys.executable, str(SCRIPT), "--bundle", str(bundle), "--runs", "2", "--epochs", "2",
                        "--env", "OMP_NUM_THREADS=1"], capture_output=True, text=True, timeout=patience(300))
    assert p.returncode == 0, p.stdout + p.stderr
    runs = re.findall(r"run +(\d+) +epoch-1 train loss (\S+) +weights (\w+) +threads (\d+)", p.stdout)
    assert [r[0] for r in runs] == ["1", "2"], p.stdout
    for _, loss, weights, threads in runs:
        assert threads == "1"  # --env reached the run
        # 1 thread: the harness's strict retrain, bit for bit (its last weights, 2 epochs)
        assert float(loss) == rec.history[0]["train_loss"]
        assert rec.last_weights_sha256 is not None and rec.last_weights_sha256.startswith(weights)
    counts = [int(n) for n in re.findall(r"^ +(\d+) x ", p.stdout, re.MULTILINE)]
    assert sum(counts) == 2 and f"{len(counts)} distinct result(s) in 2 runs:" in p.stdout


def test_a_malformed_env_is_one_line_and_exit_2() -> None:
    p = subprocess.run([sys.executable, str(SCRIPT), "--runs", "1", "--env", "MKL_CBWR"], capture_output=True,
                       text=True, timeout=patience(60))
    assert p.returncode == 2 and "--env 'MKL_CBWR': write NAME=VALUE" in p.stderr.splitlines()[-1]
    assert "Traceback" not in p.stderr
