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
import pytest

from tests.conftest import REPO, TESTS, patience


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
                       capture_output=True, text=True, env=env, timeout=patience(300))
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
                       capture_output=True, text=True, timeout=patience(300))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    rec = record.read(tmp_path / "o" / "record.json")
    assert rec.status is Status.FAILED and "has schema harness.runspec/1" in rec.error.message


# --------------------------------------------------------------------------- what a cell leaves behind
#
# tests/trainers/strays.py leaves processes in sessions of their own holding the worker's stdout
# (the way `setsid sleep 1000 &` does). The run must end when the worker ends, --timeout and SIGTERM
# must end it promptly, and none of those processes may outlive the run.

TRAINERS = TESTS / "trainers"


def _alive(pid: int) -> bool:
    """``pid`` runs (a zombie waiting for its parent to reap it has ended)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return raw[raw.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def _still_alive(pids: list[int], seconds: float) -> list[int]:
    """The ``pids`` still running after waiting up to ``seconds`` (scaled) for all of them to end."""
    import time

    deadline = time.monotonic() + patience(seconds)
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _pids(where: Path, names: list[str]) -> dict[str, int]:
    return {n: int((where / f"{n}.pid").read_text()) for n in names if (where / f"{n}.pid").exists()}


def _wait_for_file(path: Path, proc: subprocess.Popen, seconds: float) -> None:
    import time

    deadline = time.monotonic() + patience(seconds)
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path.name} never appeared (the CLI {'ended' if proc.poll() is not None else 'runs'})"


def _strays_cli(root: Path, out: Path, where: Path, *extra: str, mode: str = "", strays: str = "session,daemon",
                start: str = "warm", **popen) -> subprocess.Popen:
    """``harness run`` with the strays trainer; ``start``: its worker forked from a warm server (the default),
    or a fresh interpreter (``cold``: ``--cold``)."""

    env = dict(os.environ, PYTHONPATH=str(REPO), STRAYS_DIR=str(where), STRAYS_MODE=mode, STRAYS=strays)
    env.pop("HARNESS_DEBUG", None)
    where.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "harness", "run", str(root), "--trainer", "strays:train",
                             "--trainer-path", str(TRAINERS), "--out", str(out), "--device", "cpu", "--no-progress",
                             *(["--cold"] if start == "cold" else []), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def _no_server_left(cli: subprocess.Popen) -> None:
    """The CLI (ended) left no warm server running."""
    import time

    from tests.cli.test_warm import servers_of

    deadline = time.monotonic() + patience(10)
    while servers_of(cli.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert servers_of(cli.pid) == []


STARTS = pytest.mark.parametrize("start", ["cold", "warm"])


def _finish(proc: subprocess.Popen, where: Path, seconds: float) -> tuple[str, str]:
    """The CLI's output once it ends (a CLI still running after ``seconds``, scaled, is a failure);
    every process it left is killed afterwards, whatever the test found."""
    import signal

    try:
        return proc.communicate(timeout=patience(seconds))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for pid in _pids(where, ["worker", "session", "daemon", "scrubbed"]).values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@STARTS
def test_a_run_ends_when_its_worker_ends_though_a_stray_holds_the_output(make_bundle, tmp_path: Path, start) -> None:
    # It used to read the output to its end, which the stray held for 1000 s: a trainer that returned
    # in seconds was recorded as timed out minutes later.
    where, out = tmp_path / "strays", tmp_path / "o"
    proc = _strays_cli(make_bundle(), out, where, "--timeout", "120", start=start)
    _, err = _finish(proc, where, 60)
    assert proc.returncode == 0, err
    rec = record.read(out / "run" / "record.json")
    assert rec.status is Status.OK and rec.launcher_wall_s < patience(60)
    assert rec.start == start and rec.start_reason == ("--cold" if start == "cold" else None)
    _no_server_left(proc)
    log = (out / "run" / "worker.log").read_text()
    assert "strays: started session, daemon" in log
    strays = _pids(where, ["session", "daemon"])
    assert len(strays) == 2 and _still_alive(list(strays.values()), 10) == []


@STARTS
def test_timeout_ends_a_cell_and_what_left_its_session(make_bundle, tmp_path: Path, start) -> None:
    import time

    where, out = tmp_path / "strays", tmp_path / "o"
    limit = int(patience(6))  # time enough to start the worker and its strays
    t0 = time.monotonic()
    proc = _strays_cli(make_bundle(), out, where, "--timeout", str(limit), mode="hang",
                       strays="session,daemon,scrubbed", start=start)
    _, err = _finish(proc, where, limit + 30)
    took = time.monotonic() - t0
    assert proc.returncode == 1, err
    rec = record.read(out / "run" / "record.json")
    assert rec.status is Status.TIMEOUT and "strays: started" in rec.error.log_tail
    assert rec.start == start
    _no_server_left(proc)
    assert took < limit + patience(15)
    found = _pids(where, ["worker", "session", "daemon", "scrubbed"])
    assert len(found) == 4, found
    assert _still_alive(list(found.values()), 10) == [], found


@STARTS
def test_sigterm_ends_a_cell_and_what_left_its_session_promptly(make_bundle, tmp_path: Path, start) -> None:
    import signal

    from tests.conftest import default_signals

    where, out = tmp_path / "strays", tmp_path / "o"
    proc = _strays_cli(make_bundle(), out, where, mode="hang", preexec_fn=default_signals, start=start)
    try:
        _wait_for_file(where / "worker.pid", proc, 60)
        proc.send_signal(signal.SIGTERM)
    finally:
        _, err = _finish(proc, where, 20)
    assert proc.returncode == 143, err
    assert record.read(out / "run" / "record.json").status is Status.INTERRUPTED
    found = _pids(where, ["worker", "session", "daemon"])
    assert len(found) == 3 and _still_alive(list(found.values()), 10) == [], found
    _no_server_left(proc)


@STARTS
def test_a_worker_dies_with_its_cli_killed_with_sigkill(make_bundle, tmp_path: Path, start) -> None:
    # A worker left running used to write its record later, over the record of the next run (--resume).
    import signal

    where, out = tmp_path / "strays", tmp_path / "o"
    # warm: the server, which outlives the CLI's SIGKILL for a moment, also stops what the worker started
    proc = _strays_cli(make_bundle(), out, where, mode="hang", strays="session,daemon" if start == "warm" else "",
                       start=start)
    try:
        _wait_for_file(where / "worker.pid", proc, 60)
        worker = int((where / "worker.pid").read_text())
        assert _alive(worker)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=patience(10))
        assert _still_alive([worker], 10) == []
        if start == "warm":
            strays = _pids(where, ["session", "daemon"])
            assert len(strays) == 2 and _still_alive(list(strays.values()), 10) == [], strays
            _no_server_left(proc)
    finally:
        _finish(proc, where, 10)


def test_the_worker_is_started_to_die_with_the_launcher(tmp_path: Path) -> None:
    from harness.backends.local import guarded_command

    cmd = guarded_command("/py", tmp_path / "spec.json", (3,), 4242)
    assert cmd[:2] == ["/py", "-c"] and "prctl(1, int(signal.SIGKILL)" in cmd[2]
    assert "if os.getppid() != 4242:\n    os._exit(137)" in cmd[2]  # the launcher died before prctl took effect
    assert "sched_setaffinity(0, [3])" in cmd[2] and "harness.worker" in cmd[2]
    # started by another parent than the one named (the launcher died first): it ends before it becomes the worker
    p = subprocess.run(guarded_command(sys.executable, tmp_path / "spec.json", None, 1), capture_output=True,
                       text=True, timeout=patience(30))
    assert p.returncode == 137 and "harness" not in p.stdout + p.stderr
