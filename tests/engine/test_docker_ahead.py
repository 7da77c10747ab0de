"""Docker cells whose containers start ahead of their turn, on a real engine: the same weights as cold
containers, the next cell's container created while the one before it trains, and nothing left behind by
a run stopped while one waits. The rules and the worker's wait: tests/unit/backends/test_start_ahead.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import record
from harness.record import Status

from tests.conftest import EXAMPLE, default_signals, patience

pytestmark = pytest.mark.docker


# ----------------------------------------------------------------------------- a real engine


def _docker_matrix(out: Path, wheelhouse_root: Path, base_image: str, *extra: str) -> subprocess.CompletedProcess[str]:
    from tests.engine.test_docker_matrix import docker_args, harness

    return harness("matrix", str(EXAMPLE), "--cells", "cpu-torch2.13", "--repeats", "3", "--threads", "1",
                   "--out", str(out), *extra, *docker_args(wheelhouse_root, base_image))


def test_containers_started_ahead_train_the_cold_weights_and_start_behind_the_cell_before(
        docker_client, wheelhouse_root, base_image, tmp_path: Path) -> None:
    since = int(time.time()) - 1
    ahead = _docker_matrix(tmp_path / "ahead", wheelhouse_root, base_image)
    until = int(time.time()) + 1
    assert ahead.returncode == 0, ahead.stdout + ahead.stderr
    cold = _docker_matrix(tmp_path / "cold", wheelhouse_root, base_image, "--cold")
    assert cold.returncode == 0, cold.stdout + cold.stderr
    warm_recs = record.load(tmp_path / "ahead").records
    cold_recs = record.load(tmp_path / "cold").records
    assert len(warm_recs) == len(cold_recs) == 3
    for w, c in zip(warm_recs, cold_recs):
        assert w.status is Status.OK and c.status is Status.OK
        assert (w.start, w.start_reason) == ("warm", None)
        assert (c.start, c.start_reason) == ("cold", "--cold")
        assert w.weights_sha256 and w.weights_sha256 == c.weights_sha256  # bit for bit
        assert w.env.in_container is True
    # The engine's own events: each later cell's container was created before the one before it ended.
    events = list(docker_client.events(since=since, until=until, decode=True,
                                       filters={"type": "container", "label": "org.harness.run"}))
    names = [r.cell for r in warm_recs]
    created = {e["Actor"]["Attributes"].get("org.harness.cell"): e["time"] for e in events
               if e.get("Action") == "create" and e["Actor"]["Attributes"].get("org.harness.cell") in names}
    died = {e["Actor"]["Attributes"].get("org.harness.cell"): e["time"] for e in events
            if e.get("Action") == "die" and e["Actor"]["Attributes"].get("org.harness.cell") in names}
    assert set(created) == set(died) == set(names)
    for before, after in zip(names, names[1:]):
        assert created[after] <= died[before], (before, after, created, died)
    # and nothing is left of them
    assert not docker_client.containers.list(all=True, filters={"label": "org.harness.cell=" + names[-1]})


def test_a_run_stopped_while_a_container_waits_for_its_turn_leaves_no_container(
        docker_client, wheelhouse_root, base_image, tmp_path: Path) -> None:
    from tests.engine.test_docker_matrix import docker_args

    out = tmp_path / "out"
    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-m", "harness", "matrix", str(EXAMPLE), "--cells", "cpu-torch2.13",
                             "--repeats", "3", "--out", str(out), *docker_args(wheelhouse_root, base_image)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                            preexec_fn=default_signals)  # a Ctrl-C as at a terminal, under CI too
    try:
        label = {"label": f"org.harness.pid={proc.pid}"}
        deadline = time.monotonic() + patience(600)
        while time.monotonic() < deadline and len(docker_client.api.containers(all=True, filters=label)) < 2:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        assert len(docker_client.api.containers(all=True, filters=label)) >= 2, "no container was started ahead"
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=patience(120))
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert docker_client.api.containers(all=True, filters=label) == []  # (the low-level list: no inspect races)
