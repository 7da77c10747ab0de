"""--trace in a container: the trace the worker writes inside is read on the host and compared.

Marked `docker`: skipped locally without an engine, required under CI=true.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.diverge import parse_trace

from tests.conftest import EXAMPLE, REPO
from tests.cli.test_diverge import _diverge_names_where_the_loss_bits_part, _trace_lines

pytestmark = pytest.mark.docker


def harness(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=1800,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "230"})


def test_a_container_trace_is_read_on_the_host_and_compared_with_a_local_one(
        tmp_path: Path, docker_client, wheelhouse_root: Path, base_image: str) -> None:
    common = ["--threads", "1", "--determinism", "strict", "--trace", "--no-progress"]
    p = harness("matrix", str(EXAMPLE), "--cells", "cpu-torch2.13", "--out", str(tmp_path / "d"),
                "--wheelhouse", str(wheelhouse_root), "--base-image", base_image, *common)
    assert p.returncode in (0, 3), p.stdout + p.stderr
    p = harness("run", str(EXAMPLE), "--device", "cpu", "--out", str(tmp_path / "l"), *common)
    assert p.returncode in (0, 3), p.stdout + p.stderr
    (docker_cell,) = [c for c in (tmp_path / "d").iterdir() if (c / "record.json").is_file()]
    (local_cell,) = [c for c in (tmp_path / "l").iterdir() if (c / "record.json").is_file()]
    rec = json.loads((docker_cell / "record.json").read_text())
    assert rec["env"]["in_container"] is True and rec["trace"]["file"] == "trace.jsonl"
    trace = parse_trace((docker_cell / "trace.jsonl").read_text(), "container trace")  # written inside, read here
    assert trace.source == "reference" and len(trace.steps) == rec["trace"]["steps"] > 0
    steps = [{k: r[k] for k in ("step", "loss", "state")} for r in _trace_lines(docker_cell / "trace.jsonl")
             if "loss" in r]
    local = [{k: r[k] for k in ("step", "loss", "state")} for r in _trace_lines(local_cell / "trace.jsonl")
             if "loss" in r]
    if steps == local:  # the same torch on the same CPU trained bit for bit, and diverge must say so
        p = harness("diverge", str(docker_cell), str(local_cell))
        assert (p.returncode, p.stdout.splitlines()[-1].split(":")[0]) in (
            (0, "never part"), (3, "evaluation-only drift")), p.stdout + p.stderr
    else:  # something in the image moved the numbers: diverge names the step the files say
        _diverge_names_where_the_loss_bits_part(docker_cell, local_cell, tmp_path)
