"""Cells as child processes on this machine.

The child is a fresh interpreter so that ``CUBLAS_WORKSPACE_CONFIG`` and
``PYTHONHASHSEED`` -- and a cell's CPU instruction-set switches
(``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``) --
are in its environment before it starts (setting them from inside a running
interpreter is too late), and so that one cell's torch state
(threads, determinism switches, CUDA context) cannot leak into the next.

With ``warm=True`` (the CLI's default; ``--cold`` turns it off) that child is forked from a
server started in the very same environment, which imported torch once for every cell of it
(:mod:`harness.backends.warm`); the child is still a new process per cell, never a previous
cell's, and is stopped, timed out and searched for exactly as a cold one.
"""

from __future__ import annotations

import codecs
import io
import os
import secrets
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..plan import Cell, Job
from ..worker import determinism, isa
from .base import Backend, Launch, LineFn
from .proctable import carrying as _carrying, process_table as _process_table

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


# Run first in the worker's process, before it becomes the worker (``execv``): ask the kernel for SIGKILL
# when the launcher dies (PR_SET_PDEATHSIG, Linux; it survives execv), then make sure the launcher was
# still there once that took effect -- when it died first, the process was already handed to init and
# no signal would ever come.
_DIE_WITH_LAUNCHER = """import os, signal, sys
if sys.platform.startswith("linux"):
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass
if os.getppid() != {parent}:
    os._exit(137)
"""


def guarded_command(python: str, spec_path: Path, cpus: tuple[int, ...] | None, parent: int) -> list[str]:
    """:func:`worker_command` as the local backend starts it: the process dies with ``parent`` (the
    launcher, this process) even when that is killed with SIGKILL, and is pinned to ``cpus`` first (pure)."""
    worker = worker_command(python, spec_path)
    code = _DIE_WITH_LAUNCHER.format(parent=int(parent))
    if cpus is not None:
        code += f"os.sched_setaffinity(0, {sorted(cpus)!r})\n"
    code += f"os.execv({python!r}, {worker!r})\n"
    return [python, "-c", code]


# Every process a cell starts inherits this variable, with a value of its own for each cell, so that
# what left the worker's session and process tree (setsid, a double fork) is still found and stopped.
CELL_TOKEN_VAR = "HARNESS_CELL_TOKEN"
_LOOK_EVERY_S = 1.0  # how often a running worker's process tree is walked
_LONGEST_LINE = 1 << 20  # a longer line without a newline is passed on in pieces
_DRAIN_MAX_BYTES = 64 << 20  # at most this much output still in the pipe is read once the worker ended


class LocalBackend(Backend):
    name = "local"

    def __init__(self, python: str | None = None, *, warm: bool = False, cold_reason: str | None = None) -> None:
        """``warm``: fork each cell's worker from a server that imported torch once (harness.backends.warm);
        else every worker is a fresh interpreter, and ``cold_reason`` is what its record says why (``--cold``)."""
        self.python = python or sys.executable
        self._procs: dict[Any, _Tree] = {}  # one per running cell (--jobs runs several)
        self._lock = threading.Lock()
        self._env_digest: str | None = None
        self._cold_reason = cold_reason
        self.warm = None
        if warm:
            from .warm import WarmPool

            self.warm = WarmPool(self.python)

    def environment_digest(self, cell: Cell) -> str | None:
        if self._env_digest is None:
            from ..cache import local_environment_digest

            self._env_digest = local_environment_digest(self.python)
        return self._env_digest

    def key_inputs(self, cell: Cell, job: Job) -> dict[str, object]:
        """What the cell's key adds (harness.cache): the variables of the worker's environment that can change
        its numbers, and the files a trainer command names; ``never_reused``: why the cell cannot be keyed."""
        from ..cache import numeric_environment, trainer_command_files

        env = child_env(cell)
        inputs: dict[str, object] = {"environ": numeric_environment(env)}
        if job.trainer_cmd:
            files, why = trainer_command_files(job.trainer_cmd, python=self.python, cell=cell, job=job,
                                               path=env.get("PATH", os.defpath))
            inputs["files"] = files
            if why is not None:
                inputs["never_reused"] = why
        return inputs

    def host_slots(self) -> tuple[list[int] | None, list[str] | None]:
        from .base import usable_cpus

        return usable_cpus(), visible_gpus()

    def expect(self, cells: list[Cell], job: Job) -> None:
        """The cells about to run, in order (the runner says so once it knows which will): the warm servers
        of their environments start now, on cores no running cell uses (harness.backends.warm)."""
        if self.warm is None or not cells:
            return
        from .warm import warm_unusable

        if warm_unusable(job) is None:
            self.warm.expect([(cell, child_env(cell)) for cell in cells])

    def launch(self, cell: Cell, job: Job, spec_path: Path, on_line: LineFn) -> Launch:
        cpus = cell.slot.cpus if cell.slot is not None else None
        env = child_env(cell)
        env[CELL_TOKEN_VAR] = secrets.token_hex(16)
        proc: Any = None
        start: dict[str, Any] = {"start": "cold", "start_reason": self._cold_reason}
        if self.warm is not None:
            from .warm import warm_unusable

            why = warm_unusable(job)
            if why is None:
                # A child of the cell's warm server, which does what guarded_command does (its own session,
                # its cores, death with its parent) and then runs the same worker; strays are found alike.
                proc, why = self.warm.spawn(cell, env, spec_path, job.timeout_s)
            start = {"start": "warm", "start_reason": None} if proc is not None else {"start": "cold", "start_reason": why}
        if proc is None:
            try:
                # Its own session, so that stopping it (timeout, Ctrl-C, SIGTERM) also stops what it started
                # (DataLoader workers); what leaves that session is found by its process tree and its token.
                proc = subprocess.Popen(
                    guarded_command(self.python, spec_path, cpus, os.getpid()),
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, bufsize=0,
                    start_new_session=True,
                )
            except OSError as exc:
                return Launch(None, reason=f"cannot start {self.python}: {exc}", extra=start)
        tree = _Tree(proc, env[CELL_TOKEN_VAR])
        with self._lock:
            self._procs[proc] = tree
        try:
            expired = _relay_until_exit(proc, tree, job.timeout_s, on_line)
            launched = Launch(proc.wait(), timed_out=expired, extra=start)
            if getattr(proc, "lost", False):
                launched.reason = "the warm worker's server ended while the cell ran, and the worker was killed with it"
            return launched
        finally:
            self._stop(proc, tree)
            if start["start"] == "warm" and self.warm is not None:
                self.warm.finished(cell, proc)

    def close(self) -> None:
        """Stop every worker still running (Ctrl-C, SIGTERM); the thread that launched each one then reaps it."""
        with self._lock:
            trees = list(self._procs.values())
        for tree in trees:
            _terminate(tree)
        if self.warm is not None:
            self.warm.close()  # and the warm servers: none outlives the run (a later cell starts a new one)

    def _stop(self, proc: Any, tree: _Tree) -> None:
        with self._lock:
            self._procs.pop(proc, None)
        _terminate(tree)
        if proc.stdout is not None:
            proc.stdout.close()
        if hasattr(proc, "close"):  # a warm child: the socket its exit status came on
            proc.close()


def _relay_until_exit(proc: Any, tree: _Tree, timeout_s: float | None, on_line: LineFn) -> bool:
    """Pass the worker's output to ``on_line`` line by line until the worker itself ends; True when it was
    killed at ``timeout_s``.

    The end of the output is not waited for: a process the worker started and left behind may hold the
    pipe open for ever. What the worker wrote before it ended is still read (it is in the pipe).
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    lines = _Lines(on_line)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    expired = False
    look_at = time.monotonic()
    open_pipe = True
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while proc.poll() is None:
            now = time.monotonic()
            if now >= look_at:
                tree.collect()
                look_at = now + _LOOK_EVERY_S
            if deadline is not None and now >= deadline and not expired:
                expired = True
                tree.collect()  # what it runs right now, however recently started
                tree.signal(signal.SIGKILL)
            wait = 0.2 if deadline is None or expired else max(0.0, min(0.2, deadline - now))
            if open_pipe:
                if sel.select(wait) and not lines.read(fd):
                    open_pipe = False  # every writer closed it: wait for the worker alone
                    sel.unregister(fd)
            else:
                try:
                    proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    pass
    drained = 0
    while open_pipe and drained < _DRAIN_MAX_BYTES:  # what the worker wrote before it ended
        got = lines.read(fd)
        if not got:
            break
        drained += got
    lines.flush()
    return expired


class _Lines:
    """Bytes from the worker's pipe to text lines: UTF-8 (bad bytes replaced), newlines as text mode reads them."""

    def __init__(self, on_line: LineFn) -> None:
        self.on_line = on_line
        self.decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")("replace"), translate=True)
        self.partial = ""

    def read(self, fd: int) -> int:
        """Read what the pipe holds now and pass on its whole lines; the bytes read, 0 at the end of the output
        (or when nothing is there now: the caller reads only after the selector said there is)."""
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return 0
        except OSError:
            return 0
        if chunk:
            self._feed(self.decoder.decode(chunk))
        return len(chunk)

    def _feed(self, text: str) -> None:
        text = self.partial + text
        *whole, self.partial = text.split("\n")
        for line in whole:
            self.on_line(line + "\n")
        while len(self.partial) > _LONGEST_LINE:
            self.on_line(self.partial[:_LONGEST_LINE])
            self.partial = self.partial[_LONGEST_LINE:]

    def flush(self) -> None:
        self._feed(self.decoder.decode(b"", final=True))
        if self.partial:
            self.on_line(self.partial)
            self.partial = ""


class _Tree:
    """What one cell's worker started, to stop it all: the worker's process group, every process seen below
    the worker (walked in /proc while it runs, also through ``setsid``), and every process that carries the
    cell's token in its environment (what a double fork handed to init before any walk could see it).

    A process is known by its pid and start time, so that a pid the system has since given to another
    process is never signalled.
    """

    def __init__(self, proc: Any, token: str) -> None:
        self.proc = proc  # a subprocess.Popen, or a warm child (harness.backends.warm.WarmChild) that acts as one
        self.token = f"{CELL_TOKEN_VAR}={token}".encode()
        self.seen: dict[int, int] = {}
        self.lock = threading.Lock()

    def collect(self) -> None:
        """Add every process now below the worker, or below a process seen before (Linux /proc; else nothing)."""
        table = _process_table()
        with self.lock:
            roots = {pid for pid, started in self.seen.items() if table.get(pid, (0, -1))[1] == started}
            if self.proc.poll() is None and self.proc.pid in table:
                roots.add(self.proc.pid)
            children: dict[int, list[int]] = {}
            for pid, (ppid, _) in table.items():
                children.setdefault(ppid, []).append(pid)
            todo = list(roots)
            while todo:
                for child in children.get(todo.pop(), ()):
                    if child not in roots and child != os.getpid():
                        roots.add(child)
                        todo.append(child)
            self.seen = {pid: table[pid][1] for pid in roots if pid != self.proc.pid and pid in table}

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the worker's group, to every process seen below it that still lives, and to every
        process carrying the cell's token."""
        _kill_group(self.proc, sig)
        table = _process_table()
        with self.lock:
            seen = dict(self.seen)
        targets = {pid for pid, started in seen.items() if table.get(pid, (0, -1))[1] == started}
        targets.update(_carrying(self.token, table))
        for pid in sorted(targets):
            if pid in (os.getpid(), self.proc.pid):
                continue
            try:
                os.kill(pid, sig)
            except OSError:
                pass


def _terminate(tree: _Tree) -> None:
    """Stop a worker and what it started: SIGTERM, then SIGKILL after 10 s; then SIGKILL to whatever it left
    behind (its group, the processes seen below it, those carrying its token)."""
    proc = tree.proc
    if proc.poll() is None:
        tree.collect()
        tree.signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            tree.signal(signal.SIGKILL)
            proc.wait()
    tree.collect()  # what the processes seen below it started since
    tree.signal(signal.SIGKILL)


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


def _kill_group(proc: Any, sig: int) -> None:
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
