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
    elif cell.slot is not None and cell.slot.gpu is not None and cell.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = cell.slot.gpu  # --jobs: its own GPU, seen as cuda:0
    return env


def worker_command(python: str, spec_path: Path, cpus: tuple[int, ...] | None = None) -> list[str]:
    """The worker's command line; with ``cpus``, it first pins itself to them and then becomes the worker (pure).

    Pinning before the worker's interpreter starts (``sched_setaffinity`` then ``execv``) means
    every thread it and its libraries start is on those cores from the first instruction.
    """
    worker = [python, "-m", "harness.worker", "--spec", str(spec_path)]
    return worker if cpus is None else pinned(worker, cpus)


def pinned(argv: list[str], cpus: tuple[int, ...]) -> list[str]:
    """``argv`` (an interpreter first) run on ``cpus`` only: it pins itself, then ``execv``s ``argv`` (pure)."""
    code = f"import os; os.sched_setaffinity(0, {sorted(cpus)!r}); os.execv({argv[0]!r}, {argv!r})"
    return [argv[0], "-c", code]


class LocalBackend(Backend):
    name = "local"

    def __init__(self, python: str | None = None) -> None:
        self.python = python or sys.executable
        self._procs: set[subprocess.Popen[str]] = set()  # one per running cell (--jobs runs several)
        self._lock = threading.Lock()
        self._env_digest: str | None = None

    def environment_digest(self, cell: Cell) -> str | None:
        if self._env_digest is None:
            from ..cache import local_environment_digest

            self._env_digest = local_environment_digest(self.python)
        return self._env_digest

    def host_slots(self) -> tuple[list[int] | None, list[str] | None]:
        from .base import usable_cpus

        return usable_cpus(), visible_gpus()

    def launch(self, cell: Cell, job: Job, spec_path: Path, on_line: LineFn) -> Launch:
        cpus = cell.slot.cpus if cell.slot is not None else None
        try:
            # Its own session, so that stopping it (timeout, Ctrl-C, SIGTERM) also stops what it started
            # (DataLoader workers) and none of them keeps the output pipe open.
            proc = subprocess.Popen(
                worker_command(self.python, spec_path, cpus),
                env=child_env(cell), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                stdin=subprocess.DEVNULL, bufsize=1, start_new_session=True,
            )
        except OSError as exc:
            return Launch(None, reason=f"cannot start {self.python}: {exc}")
        with self._lock:
            self._procs.add(proc)
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
            self._stop(proc)

    def close(self) -> None:
        """Stop every worker still running (Ctrl-C, SIGTERM); the thread that launched each one then reaps it."""
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            _terminate(proc)

    def _stop(self, proc: subprocess.Popen[str]) -> None:
        with self._lock:
            self._procs.discard(proc)
        _terminate(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def _terminate(proc: subprocess.Popen[str]) -> None:
    """Stop a worker and what it started: SIGTERM, then SIGKILL after 10 s; nothing when it has ended."""
    if proc.poll() is None:
        _kill_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGKILL)
            proc.wait()
    _kill_group(proc, signal.SIGKILL)  # what the worker started and left behind


def visible_gpus() -> list[str] | None:
    """The GPU ids a cell may be given: ``CUDA_VISIBLE_DEVICES`` as set, else torch's count; [] without CUDA.

    torch is asked only when the planner already imported it (a host with CUDA cells); None when unsure.
    """
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    except Exception:  # noqa: BLE001 - a broken driver: unsure
        return None


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
