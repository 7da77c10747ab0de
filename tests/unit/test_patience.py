"""conftest's ``patience()``: the waits of the tests grow with the load, a sudden burst included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import patience


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_sudden_burst_of_busy_processes_lengthens_the_waits_at_once() -> None:
    """The 1-minute load average still reads low 20 s after a burst starts; patience() sees it at once."""
    cores = os.cpu_count() or 1
    busy = 2 * cores  # twice as many busy loops as cores: waits at least 4x as long (at most 10x)
    procs = [subprocess.Popen(["sh", "-c", "while :; do :; done"], start_new_session=True) for _ in range(busy)]
    try:
        deadline = time.monotonic() + patience(30)
        while not all(_state(p.pid) == "R" for p in procs):  # each one started its loop (runnable)
            assert time.monotonic() < deadline, "the busy loops did not start"
            time.sleep(0.01)
        assert patience(10) >= 10 * min(10.0, 2.0 * busy / cores) - 1e-9
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert 1 <= patience(1) <= 10  # never less than asked, at most 10x
