"""The local backend's warm worker: a cell's worker forked from a server that imported torch once.

A cold worker is a fresh interpreter that imports torch, torch's compiler stack (which
``use_deterministic_algorithms`` and the optimizers import) and scikit-learn (the archived
target scaler) before it trains: most of a small cell's wall time. A warm cell's worker is a
child forked from a server (:mod:`harness.backends.warm_server`) that did those imports once,
in the very environment a cold worker of the cell would get; the child then does what a cold
worker does (its own session, its cores, death with its parent, its token, its output to the
launcher's pipe) and runs the same ``harness.worker`` code, which seeds everything itself.

One server per distinct worker environment (:func:`server_key`): the interpreter and every
variable of the worker's environment but the cell's token and ``CUDA_VISIBLE_DEVICES`` (both
are set in the child, before anything reads them), and, for a cell with the default thread
count pinned to cores of its own, those cores (the OpenMP runtime counts them when torch
loads). What the launcher gets back is a :class:`WarmChild`, which answers ``poll``, ``wait``,
``send_signal`` and ``pid`` as a ``subprocess.Popen`` does, so the local backend times it out,
stops its process group and finds its strays by token exactly as for a cold worker.

When a cell cannot start warm (a trainer command, a server that failed to start, not Linux),
it starts cold, and its record says why (``start``, ``start_reason``).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from ..plan import Cell, Job
from .warm_server import GPU_VAR, TOKEN_PLACEHOLDER, TOKEN_VAR

SERVER_MODULE = "harness.backends.warm_server"
READY_TIMEOUT_S = 900.0  # importing torch took 9 s cold on a GPU host; a loaded machine is slower
ANSWER_TIMEOUT_S = 120.0  # a running server answers a request at once (it forks and replies)
_STDERR_TAIL = 2000


def warm_unusable(job: Job) -> str | None:
    """Why no cell of ``job`` can start warm here (pure but for the platform); None: they can."""
    if job.trainer_cmd:
        return "a trainer command (--trainer-cmd, trainer.command) runs an interpreter of its own"
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return f"the warm worker needs Linux (fork, prctl, /proc); this is {sys.platform}"
    if not hasattr(socket, "send_fds"):
        return "the warm worker needs socket.send_fds (Python 3.9 or later)"
    return None


def server_key(python: str, env: dict[str, str], cell: Cell) -> tuple[Any, ...]:
    """Which server a cell's worker is forked from (pure): the interpreter, the environment without the
    cell's token and GPU list, and, for a pinned cell with the default thread count, its cores."""
    shared = tuple(sorted((k, v) for k, v in env.items() if k not in (TOKEN_VAR, GPU_VAR)))
    cpus = cell.slot.cpus if cell.slot is not None and cell.threads is None else None
    return (python, shared, tuple(sorted(cpus)) if cpus else None)


def server_env(env: dict[str, str]) -> dict[str, str]:
    """The server's environment: the cell's, without its GPU list, with a placeholder token each child
    overwrites in place (pure)."""
    out = {k: v for k, v in env.items() if k != GPU_VAR}
    out[TOKEN_VAR] = TOKEN_PLACEHOLDER
    return out


class WarmChild:
    """A cell's worker forked by a server, seen as a ``subprocess.Popen``: ``pid``, ``stdout`` (the read end of
    its output), ``poll``, ``wait``, ``send_signal``, ``kill``, ``returncode``. Its exit status comes from the
    server; when the server ends first, the child was killed with it (``lost``)."""

    def __init__(self, pid: int, answer: socket.socket, stdout: Any, server: "WarmServer") -> None:
        self.pid = pid
        self.args = [server.python, "-m", SERVER_MODULE]
        self.stdout = stdout
        self.returncode: int | None = None
        self.lost = False
        self.server = server
        self._answer = answer
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        return self._check(0.0)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self._check(min(left, 1.0))
        return self.returncode

    def _check(self, timeout: float) -> int | None:
        if self.returncode is not None:
            return self.returncode
        try:
            ready, _, _ = select.select([self._answer], [], [], timeout)
        except (OSError, ValueError):  # closed under us: the launcher is done with it
            ready = [self._answer]
        if not ready:
            return None
        with self._lock:
            if self.returncode is not None:
                return self.returncode
            try:
                data = self._answer.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                data = b""
            if not data:
                # The server ended before it said how the child ended: the child got SIGKILL with it.
                self.lost = True
                self.returncode = -int(signal.SIGKILL)
            else:
                try:
                    doc = json.loads(data)
                except ValueError:
                    doc = {}
                if isinstance(doc.get("exit"), int):
                    self.returncode = doc["exit"]
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # the server has not reaped it: the pid is still the child's
            try:
                os.kill(self.pid, sig)
            except OSError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def close(self) -> None:
        self._answer.close()


class WarmServer:
    """One server process and its control socket."""

    def __init__(self, python: str, env: dict[str, str], cpus: tuple[int, ...] | None) -> None:
        self.python = python
        self.env = server_env(env)
        self.cpus = cpus
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.error: str | None = None
        self.facts: dict[str, Any] = {}
        self.ready = threading.Event()
        self.send_lock = threading.Lock()
        self.stderr: Any = None
        self.started_s: float | None = None

    # ------------------------------------------------------------------ life

    def start(self) -> None:
        """Start the server and wait until it has imported what it preloads (or failed); sets ``error``."""
        try:
            self._start()
        except Exception as exc:  # noqa: BLE001 - whatever it was, the cell starts cold and says why
            self.error = self.error or f"{type(exc).__name__}: {exc}"
            self.stop()
        finally:
            self.ready.set()

    def _start(self) -> None:
        t0 = time.perf_counter()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        self.stderr = tempfile.TemporaryFile()
        cmd = [self.python, "-m", SERVER_MODULE, "--control", str(theirs.fileno()), "--launcher", str(os.getpid())]
        if self.cpus:
            cmd += ["--cpus", ",".join(str(c) for c in self.cpus)]
        try:
            # Its own session, like a cold worker: Ctrl-C at the terminal reaches the launcher, which stops it.
            self.proc = subprocess.Popen(cmd, env=self.env, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=self.stderr, start_new_session=True)
        except OSError as exc:
            self.error = f"cannot start {self.python}: {exc}"
            return
        finally:
            theirs.close()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            ready, _, _ = select.select([ours], [], [], 0.5)
            if ready:
                try:
                    data = ours.recv(1 << 20)
                except OSError:
                    data = b""
                break
            if self.proc.poll() is not None:
                data = b""
                break
            if time.monotonic() > deadline:
                self.error = f"it did not finish importing torch within {READY_TIMEOUT_S:g}s"
                self.stop()
                return
        try:
            doc = json.loads(data) if data else {}
        except ValueError:
            doc = {}
        if doc.get("ready"):
            self.facts = doc
            self.started_s = time.perf_counter() - t0
            return
        self.error = doc.get("error") or self._ended()
        self.stop()

    def _ended(self) -> str:
        status = self.proc.wait() if self.proc is not None else None
        tail = ""
        if self.stderr is not None:
            try:
                self.stderr.seek(0)
                lines = self.stderr.read()[-_STDERR_TAIL:].decode("utf-8", "replace").strip().splitlines()
                tail = lines[-1] if lines else ""
            except (OSError, ValueError):
                pass
        return f"it ended with status {status} before it was ready" + (f": {tail[:300]}" if tail else "")

    def alive(self) -> bool:
        return self.error is None and self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        """Close the control socket (the server kills its children and exits), and wait for it to go."""
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None

    # ------------------------------------------------------------------ requests

    def _request(self, doc: dict[str, Any], fds: list[int]) -> tuple[socket.socket | None, str | None]:
        """Send one request with a socket for its answers; that socket, or why it could not be sent."""
        answer, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self.send_lock:
                if self.sock is None:
                    answer.close()
                    return None, "the warm server was stopped"
                socket.send_fds(self.sock, [json.dumps(doc).encode()], [theirs.fileno(), *fds])
        except OSError as exc:
            answer.close()
            return None, f"the warm server does not take requests ({exc.strerror or exc})"
        finally:
            theirs.close()
        return answer, None

    def spawn(self, env: dict[str, str], spec_path: Path, cpus: list[int] | None) -> tuple[WarmChild | None, str | None]:
        """Fork a worker for a cell; the child (its output already on a pipe here), or why not."""
        read_end, write_end = os.pipe()
        try:
            answer, why = self._request({"op": "cell", "env": env, "spec": str(spec_path), "cwd": os.getcwd(),
                                         "cpus": cpus}, [write_end])
        finally:
            os.close(write_end)
        if answer is None:
            os.close(read_end)
            return None, why
        doc = _answer(answer, ANSWER_TIMEOUT_S)
        if not isinstance(doc.get("pid"), int):
            answer.close()
            os.close(read_end)
            return None, doc.get("error") or "the warm server ended before it started the cell"
        return WarmChild(doc["pid"], answer, os.fdopen(read_end, "rb", buffering=0), self), None

    def ask(self) -> dict[str, Any]:
        """The running server's own facts (threads, CUDA state): for tests."""
        answer, why = self._request({"op": "facts"}, [])
        if answer is None:
            return {"error": why}
        try:
            return _answer(answer, ANSWER_TIMEOUT_S)
        finally:
            answer.close()


def _answer(sock: socket.socket, timeout: float) -> dict[str, Any]:
    ready, _, _ = select.select([sock], [], [], timeout)
    if not ready:
        return {"error": f"the warm server did not answer within {timeout:g}s"}
    try:
        data = sock.recv(1 << 20)
    except OSError:
        data = b""
    try:
        doc = json.loads(data) if data else {}
    except ValueError:
        doc = {}
    return doc if isinstance(doc, dict) else {}


_POOLS: "weakref.WeakSet[WarmPool]" = weakref.WeakSet()


@atexit.register
def _stop_every_pool() -> None:  # a caller that never closed its backend: no server outlives the launcher
    for pool in list(_POOLS):
        pool.close()


class WarmPool:
    """The servers of one local backend, one per :func:`server_key`, started when a cell first needs one."""

    def __init__(self, python: str) -> None:
        self.python = python
        self.lock = threading.Lock()
        self.servers: dict[tuple[Any, ...], WarmServer] = {}
        self.started: list[WarmServer] = []  # every server this pool started, in order
        _POOLS.add(self)

    def spawn(self, cell: Cell, env: dict[str, str], spec_path: Path,
              timeout_s: float | None = None) -> tuple[WarmChild | None, str | None]:
        """The cell's worker forked from its server (started first when needed), or why it must start cold.

        The first cell of an environment waits for its server's imports, as a cold worker would import
        for itself; at most the cell's ``timeout_s``: a server that takes longer (a hung import) leaves
        the cell to start cold (the server goes on for the cells after it)."""
        key = server_key(self.python, env, cell)
        starter = False
        with self.lock:
            server = self.servers.get(key)
            if server is None or (server.ready.is_set() and server.error is None and not server.alive()):
                # none yet, or it died (killed from outside): a new one
                cpus = key[2] or (tuple(cell.slot.cpus) if cell.slot is not None and cell.slot.cpus else None)
                server = WarmServer(self.python, {k: v for k, v in env.items() if k != TOKEN_VAR}, cpus)
                self.servers[key] = server
                self.started.append(server)
                starter = True
        if starter:
            threading.Thread(target=server.start, name="harness-warm-start", daemon=True).start()
        wait = min(READY_TIMEOUT_S, timeout_s) if timeout_s else READY_TIMEOUT_S
        if not server.ready.wait(timeout=wait):
            return None, f"its warm server had not finished importing torch after {wait:g}s"
        if server.error is not None:
            return None, f"its warm server could not start: {server.error}"
        if cell.slot is not None and cell.slot.cpus:
            cpus = sorted(cell.slot.cpus)
        else:
            from .base import usable_cpus

            cpus = usable_cpus()  # what a cold worker inherits from the launcher
        return server.spawn(env, spec_path, cpus)

    def close(self) -> None:
        """Stop every server (each kills what it still runs)."""
        with self.lock:
            servers = list(self.servers.values())
            self.servers.clear()
        for server in servers:
            server.stop()  # one still importing ends too: its starter's wait for it fails, and it stops it
