"""Cells as child processes on this machine.

The child is a fresh interpreter so that ``CUBLAS_WORKSPACE_CONFIG`` and
``PYTHONHASHSEED`` are in its environment before it starts (setting them from
inside a running interpreter is too late), and so that one cell's torch state
(threads, determinism switches, CUDA context) cannot leak into the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from ..worker import determinism
from ..record import RunSpec, atomic_write_text
from ..worker.retrain import EVENT_PREFIX
from .base import Backend, Cell, EventFn, Job, finish_record

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_STRIPPED = ("CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED")


def child_env(cell: Cell, base: dict[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: the caller's, minus inherited determinism
    variables, plus exactly what the cell's mode asks for (pure)."""
    env = dict(os.environ if base is None else base)
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


def run_spec(cell: Cell, job: Job, backend: str = "local") -> RunSpec:
    return RunSpec(
        cell=cell.name, bundle_dir=job.bundle_dir, out_dir=str(job.cell_dir(cell)), data_path=job.data_path,
        device=cell.device, determinism=cell.determinism, threads=cell.threads, tf32=cell.tf32,
        repeat=cell.repeat, trainer=job.trainer, trainer_path=job.trainer_path, trace=job.trace,
        backend=backend, labels=cell.labels,
    )


def relay(line: str, on_event: EventFn | None, log: Any, tail: deque[str]) -> None:
    """Route one line of worker output: progress events to the callback, the rest to the log."""
    if line.startswith(EVENT_PREFIX):
        if on_event is not None:
            try:
                on_event(json.loads(line[len(EVENT_PREFIX):]))
            except ValueError:
                pass
        return
    log.write(line)
    tail.append(line)


class LocalBackend(Backend):
    name = "local"

    def __init__(self, python: str | None = None) -> None:
        self.python = python or sys.executable
        self._proc: subprocess.Popen[str] | None = None

    def run(self, cell: Cell, job: Job, on_event: EventFn | None = None) -> dict[str, Any]:
        out = job.cell_dir(cell)
        out.mkdir(parents=True, exist_ok=True)
        stale = out / "record.json"
        if stale.exists():
            stale.unlink()
        spec_path = out / "spec.json"
        atomic_write_text(spec_path, run_spec(cell, job).to_json())
        tail: deque[str] = deque(maxlen=40)
        t0 = time.perf_counter()
        rc: int | None = None
        with open(out / "worker.log", "w", encoding="utf-8") as log:
            try:
                self._proc = subprocess.Popen(
                    [self.python, "-m", "harness.worker", "--spec", str(spec_path)],
                    env=child_env(cell), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                    stdin=subprocess.DEVNULL, bufsize=1,
                )
            except OSError as exc:
                tail.append(f"cannot start {self.python}: {exc}\n")
            else:
                try:
                    assert self._proc.stdout is not None
                    for line in self._proc.stdout:
                        relay(line, on_event, log, tail)
                    rc = self._proc.wait()
                finally:
                    self.close()
        return finish_record(cell, job, rc=rc, log_tail="".join(tail), wall_s=time.perf_counter() - t0,
                             extra={"backend": self.name})

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
