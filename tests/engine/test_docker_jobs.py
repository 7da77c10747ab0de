"""--jobs on a real Docker engine: two one-thread cells in one image, side by side, each on a core of its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import record
from harness.record import Status

from tests.conftest import EXAMPLE
from tests.engine.test_docker_matrix import docker_args, harness

pytestmark = pytest.mark.docker


def test_two_cells_with_jobs_2_get_disjoint_cpusets(docker_client, wheelhouse_root, base_image, tmp_path: Path) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    out = tmp_path / "out"
    p = harness("matrix", str(EXAMPLE), "--cells", "cpu-torch2.13", "--threads", "1", "--determinism", "strict,default",
                "--jobs", "2", "--out", str(out), *docker_args(wheelhouse_root, base_image))
    assert p.returncode == 0, p.stdout + p.stderr
    recs = {r.cell: r for r in record.load(out).records}
    assert list(recs) == ["cpu-torch2.13-strict", "cpu-torch2.13-default"]
    a, b = recs.values()
    for r in (a, b):
        assert r.status is Status.OK and r.env.in_container is True
        assert r.slot is not None and len(r.slot.cpus) == 1
        assert r.env.extra["cpu_affinity"] == r.slot.cpus  # measured inside: cpuset_cpus took effect
    # Disjoint: both slots were held at once (one after the other, the second would get the first's
    # core back). Whether their training windows overlap depends on how long each container takes to
    # start against how long this example trains (under a second); tests/cli/test_jobs.py checks the
    # overlap on a retrain long enough to show it.
    assert set(a.slot.cpus).isdisjoint(b.slot.cpus)
