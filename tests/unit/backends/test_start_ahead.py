"""Docker cells whose containers start ahead of their turn (harness.backends.docker_ahead): the pure
rules, and the worker's wait as a real process. No engine needed; tests/engine/test_docker_ahead.py runs
them on a real one."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness.backends.docker import DockerBackend, container_spec
from harness.backends.docker_ahead import (AHEAD_CPU_SHARES, AWAIT_LIMIT_S, TURN_CPU_SHARES, WORKER_AWAITS,
                                           WORKER_LABEL, ahead_request, mismatch, next_ahead)
from harness.docker_engine import ContainerRequest, ImageFacts
from harness.plan import Cell, Job
from harness.record import ImageInfo
from harness.schedule import Slot
from harness.worker.preload import AWAIT_FLAG, EXIT_NO_GO, READY_LINE, split_await

from tests.conftest import REPO, patience

# ----------------------------------------------------------------------------- pure rules


def _cold(**over: object) -> ContainerRequest:
    base = ContainerRequest(image="sha256:abc", command=("--spec", "/harness/out/spec.json"),
                            mounts=(("/b", "/harness/bundle", True), ("/o", "/harness/out", False)),
                            environment={"PYTHONHASHSEED": "0"}, cpu_shares=TURN_CPU_SHARES, timeout_s=60.0)
    return dataclasses.replace(base, **over)  # type: ignore[arg-type]


def test_the_container_started_ahead_waits_at_the_lowest_weight_on_no_chosen_cores() -> None:
    ahead = ahead_request(_cold(cpuset="0"))
    assert ahead.command == (AWAIT_FLAG, str(AWAIT_LIMIT_S), "--spec", "/harness/out/spec.json")
    assert ahead.cpu_shares == AHEAD_CPU_SHARES < TURN_CPU_SHARES
    assert ahead.cpuset is None
    # everything else is the cell's own container: mounts, environment, limits
    assert dataclasses.replace(ahead, command=_cold().command, cpu_shares=TURN_CPU_SHARES, cpuset="0") == \
        _cold(cpuset="0")


def test_it_is_used_only_when_it_is_the_cells_own_container() -> None:
    ahead = ahead_request(_cold())
    assert mismatch(ahead, _cold(), threads=None) is None
    assert mismatch(ahead, _cold(cpuset="1"), threads=1) is None  # its cores are given at its turn
    assert "thread count" in mismatch(ahead, _cold(cpuset="1"), threads=None)  # torch counted other cores
    assert "thread count" in mismatch(ahead, _cold(cpuset="1"), threads=None, all_cores=[0, 1])
    # every core of the host is the count torch took when it imported: the default thread count holds
    assert mismatch(ahead, _cold(cpuset="0,1"), threads=None, all_cores=[0, 1]) is None
    assert "GPU 0" in mismatch(ahead, _cold(gpus="0"), threads=1)
    assert mismatch(ahead_request(_cold(gpus="all")), _cold(gpus="0"), threads=1, only_gpu="0") is None
    assert "environment" in mismatch(ahead, _cold(environment={"PYTHONHASHSEED": "1"}), threads=None)
    assert "mounts" in mismatch(ahead, _cold(mounts=()), threads=None)
    assert "memory" in mismatch(ahead, _cold(memory="1g"), threads=None)


def test_as_many_wait_as_cells_run_and_at_least_one() -> None:
    queue = ["a", "b", "c", "d"]
    assert next_ahead(queue, set(), set(), running=0, most=8) == ["a"]
    assert next_ahead(queue, {"a"}, set(), running=1, most=8) == ["b"]
    assert next_ahead(queue, {"a"}, {"b"}, running=1, most=8) == []
    assert next_ahead(queue, {"a", "b"}, set(), running=2, most=8) == ["c", "d"]
    assert next_ahead(queue, set(), set(), running=4, most=2) == ["a", "b"]  # memory caps how many wait
    assert next_ahead(queue, set(queue), set(), running=4, most=8) == []
    assert next_ahead(queue, {"a"}, set(), running=1, most=8, idle=2) == ["b", "c", "d"]  # idle cores import
    assert next_ahead(queue, {"a"}, set(), running=1, most=2, idle=2) == ["b", "c"]


def test_await_flag_is_taken_off_the_front() -> None:
    assert split_await(["--spec", "x"]) == (None, ["--spec", "x"])
    assert split_await([AWAIT_FLAG, "30", "--spec", "x"]) == (30.0, ["--spec", "x"])
    with pytest.raises(SystemExit):
        split_await([AWAIT_FLAG, "soon", "--spec", "x"])


class _Engine:
    """Only what the backend asks of an engine to decide whether an image's worker can wait."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels

    def image(self, ref: str) -> ImageFacts:
        return ImageFacts(id=ref, labels=self.labels)


def _backend(labels: dict[str, str], **kw: object) -> DockerBackend:
    b = DockerBackend(_Engine(labels), {}, **kw)  # type: ignore[arg-type]
    b.images["c"] = ImageInfo(id="sha256:" + "1" * 64, tag="harness:old-cell")
    return b


def test_an_image_built_before_workers_could_wait_starts_its_cells_cold_and_says_so() -> None:
    assert _backend({WORKER_LABEL: WORKER_AWAITS})._cannot_await(Cell(name="c")) is None
    why = _backend({})._cannot_await(Cell(name="c"))
    assert why is not None and "harness:old-cell" in why and "rebuild" in why


def test_a_cold_backend_says_why_each_cell_started_at_its_turn(tmp_path: Path) -> None:
    job = Job(bundle_dir=str(tmp_path), data_path=None, results_dir=str(tmp_path / "out"))
    cell = Cell(name="c")
    cold = _backend({WORKER_LABEL: WORKER_AWAITS}, ahead=False)
    assert cold._take_ahead(cell, job, _cold(), 1.0) == (None, "--cold")
    slurm = _backend({WORKER_LABEL: WORKER_AWAITS}, ahead=False, cold_reason="a Slurm job runs one cell")
    assert slurm._take_ahead(cell, job, _cold(), 1.0) == (None, "a Slurm job runs one cell")
    alone = _backend({WORKER_LABEL: WORKER_AWAITS})
    assert "no cells were queued" in alone._take_ahead(cell, job, _cold(), 1.0)[1]


def test_the_cells_request_with_a_slot_is_the_cold_one(tmp_path: Path) -> None:
    job = Job(bundle_dir=str(tmp_path), data_path=None, results_dir=str(tmp_path / "out"))
    cell = Cell(name="c", threads=1, slot=Slot(cpus=(1,), cores=1))
    b = _backend({WORKER_LABEL: WORKER_AWAITS})
    now = b._request(cell, job, None)
    assert now.cpuset == "1" and now.cpu_shares == TURN_CPU_SHARES
    assert now == container_spec(cell, job, b.images["c"].id, host_uid=now.user and int(now.user.split(":")[0]),
                                 run_id=b.run_id, tag="harness:old-cell", cpu_shares=TURN_CPU_SHARES)


# ----------------------------------------------------------------------------- the worker's wait, as a process


def _worker(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "harness.worker", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def test_a_waiting_worker_reads_nothing_before_the_go_signal_and_runs_after_it(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"  # written after the ready line: the worker has not looked for it before
    proc = _worker(AWAIT_FLAG, "600", "--spec", str(spec))
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().rstrip("\n") == READY_LINE  # imports done, nothing read yet
        spec.write_text("[]")  # not a spec: the worker refuses it once it reads it, exit 2
        proc.send_signal(signal.SIGUSR1)
        _out, err = proc.communicate(timeout=patience(60))
    finally:
        proc.kill()
    assert proc.returncode == 2, err
    assert str(spec) in err


def test_a_worker_given_no_go_ends_by_itself_having_run_nothing(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"cell": "x", "out_dir": str(tmp_path / "out")}))
    proc = _worker(AWAIT_FLAG, "1", "--spec", str(spec))
    out, err = proc.communicate(timeout=patience(120))
    assert proc.returncode == EXIT_NO_GO, err
    assert out.splitlines() == [READY_LINE]
    assert "no go signal" in err
    assert not (tmp_path / "out").exists()  # no record: nothing of the cell ran


