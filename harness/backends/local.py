"""Cells as child processes on this machine.

The child is a fresh interpreter so that ``CUBLAS_WORKSPACE_CONFIG`` and
``PYTHONHASHSEED`` -- and a cell's CPU instruction-set switches
(``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``) --
are in its environment before it starts (setting them from inside a running
interpreter is too late), and so that one cell's torch state
(threads, determinism switches, CUDA context) cannot leak into the next.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from ..plan import Cell, Job
from ..worker import determinism, isa
from .base import Backend, Launch, LineFn

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_STRIPPED = ("CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED")


def child_env(cell: Cell, base: dict[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: the caller's, minus inherited determinism
    variables, plus exactly what the cell's mode and ISA level ask for (pure)."""
    env = isa.child_env(os.environ if base is None else base, cell.isa)
    for var in _STRIPPED:
        env.pop(var, None)
    if cell.threads:
        for var in determinism.THREAD_VARS:
            env.pop(var, None)
    env.update(determinism.launch_env(cell.determinism, cell.threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if cell.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU cell must not initialise (or be timed with) a GPU
    return env


class LocalBackend(Backend):
    name = "local"

    def __init__(self, python: str | None = None) -> None:
        self.python = python or sys.executable
        self._proc: subprocess.Popen[str] | None = None

    def launch(self, cell: Cell, job: Job, spec_path: Path, on_line: LineFn) -> Launch:
        try:
            # Its own session, so that stopping it (timeout, Ctrl-C, SIGTERM) also stops what it started
            # (DataLoader workers) and none of them keeps the output pipe open.
            self._proc = subprocess.Popen(
                [self.python, "-m", "harness.worker", "--spec", str(spec_path)],
                env=child_env(cell), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                stdin=subprocess.DEVNULL, bufsize=1, start_new_session=True,
            )
        except OSError as exc:
            return Launch(None, reason=f"cannot start {self.python}: {exc}")
        proc = self._proc
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            _kill_group(proc, signal.SIGKILL)

        timer = threading.Timer(job.timeout_s, expire) if job.timeout_s else None
        try:
            if timer is not None:
                timer.daemon = True
                timer.start()
            assert proc.stdout is not None
            for line in proc.stdout:
                on_line(line)
            return Launch(proc.wait(), timed_out=expired.is_set())
        finally:
            if timer is not None:
                timer.cancel()
            self.close()

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            _kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
                proc.wait()
        _kill_group(proc, signal.SIGKILL)  # what the worker started and left behind
        if proc.stdout is not None:
            proc.stdout.close()


def _kill_group(proc: subprocess.Popen[str], sig: int) -> None:
    """Signal the worker's process group (its session); nothing when it is gone."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    except OSError:
        try:
            proc.send_signal(sig)
        except OSError:
            pass
