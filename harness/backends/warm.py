"""The local backend's warm worker: a cell's worker forked from a server that imported torch once.

A cold worker is a fresh interpreter that imports torch, torch's compiler stack (which
``use_deterministic_algorithms`` and the optimizers import) and scikit-learn (the archived
target scaler) before it trains: most of a small cell's wall time. A warm cell's worker is a
child forked from a server (:mod:`harness.backends.warm_server`) that did those imports once,
in the very environment a cold worker of the cell would get; the child then does what a cold
worker does (its own session, its cores, death with its parent, its token, its output to the
launcher's pipe) and runs the same ``harness.worker`` code, which seeds everything itself.

One server per distinct worker environment (:func:`server_key`): the interpreter and every
variable of the worker's environment but the cell's token, ``CUDA_VISIBLE_DEVICES`` and the
``--isa`` level's variables (all set in the child, before anything reads them: ATen, oneDNN and
MKL read their instruction-set switches at their first kernel, not when torch loads), and, for a cell with the default thread
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
from .warm_server import CHILD_VARS, TOKEN_PLACEHOLDER, TOKEN_VAR

SERVER_MODULE = "harness.backends.warm_server"
READY_TIMEOUT_S = 900.0  # importing torch took 9 s cold on a GPU host; a loaded machine is slower
ANSWER_TIMEOUT_S = 120.0  # a running server answers a request at once (it forks and replies)
_STDERR_TAIL = 2000
GRACE_S = 1.0  # after a cell ends, how long its cores stay the next cell's before an import may take them


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
    shared = tuple(sorted((k, v) for k, v in env.items() if k not in CHILD_VARS))
    cpus = cell.slot.cpus if cell.slot is not None and cell.threads is None else None
    return (python, shared, tuple(sorted(cpus)) if cpus else None)


def server_env(env: dict[str, str]) -> dict[str, str]:
    """The server's environment: the cell's, without its GPU list, with a placeholder token each child
    overwrites in place (pure)."""
    out = {k: v for k, v in env.items() if k not in CHILD_VARS}
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
        self.claim = 0  # the pool's claim of cores for it (WarmPool.spawn)
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
        if proc is not None and proc.poll() is None and not self.facts:
            proc.kill()  # still importing (it reads its socket only after): it has no child to stop
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


def _default_max_servers() -> int:
    """How many servers may live at once: one per GiB of available memory (a server holds torch, its compiler
    stack and scikit-learn: about 0.4 GiB, shared with its children), at least 2, at most 32."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return max(2, min(32, int(line.split()[1]) >> 20))
    except (OSError, ValueError, IndexError):
        pass
    return 2


class WarmPool:
    """The servers of one local backend, one per :func:`server_key`.

    A server starts when a cell first needs it, or earlier (:meth:`expect`): when the run's cells are known,
    the servers of the environments coming next start on cores that neither a running cell nor another
    importing server uses, in the order the cells come, so that their imports overlap the cells that run
    now (at most ``max_servers`` live at once). A server whose environment has no cell left to run stops.
    """

    def __init__(self, python: str, max_servers: int | None = None) -> None:
        from .base import usable_cpus

        self.python = python
        self.lock = threading.Lock()
        self.servers: dict[tuple[Any, ...], WarmServer] = {}
        self.started: list[WarmServer] = []  # every server this pool started, in order
        self.max_servers = max_servers or _default_max_servers()
        self.cores = usable_cpus()  # what a cold worker inherits from the launcher, and the budget of imports
        self.pending: dict[tuple[Any, ...], int] = {}  # per environment: cells expected and not yet launched
        self.upcoming: dict[tuple[Any, ...], tuple[dict[str, str], bool]] = {}  # its environment, pinnable import
        # the cells launched and not ended: their key, pinned cores, cores held and server; a cell holds its
        # cores (for the imports that may start) from when its server is ready (before that its import does)
        self.claims: dict[int, tuple[tuple[Any, ...], tuple[int, ...] | None, int, WarmServer]] = {}
        self._claim_ids = iter(range(1, 1 << 62))
        _POOLS.add(self)

    def key(self, cell: Cell, env: dict[str, str]) -> tuple[Any, ...]:
        key = server_key(self.python, env, cell)
        if key[2] is not None and self.cores is not None and set(key[2]) == set(self.cores):
            key = (key[0], key[1], None)  # every core the launcher has: as unpinned
        return key

    # ------------------------------------------------------------------ which servers, when

    def expect(self, cells: list[tuple[Cell, dict[str, str]]]) -> None:
        """The cells about to run, in order, with their workers' environments: start their servers early."""
        with self.lock:
            for cell, env in cells:
                key = self.key(cell, env)
                self.pending[key] = self.pending.get(key, 0) + 1
                self.upcoming.setdefault(key, ({k: v for k, v in env.items() if k != TOKEN_VAR}, bool(cell.threads)))
        self._prestart()

    def _start(self, key: tuple[Any, ...], env: dict[str, str], cpus: tuple[int, ...] | None) -> WarmServer:
        """A new server for ``key`` (the lock held): its imports run in a thread of their own."""
        server = WarmServer(self.python, env, key[2] or cpus)
        self.servers[key] = server
        self.started.append(server)

        def start() -> None:
            server.start()
            self._prestart()  # its core is free again

        threading.Thread(target=start, name="harness-warm-start", daemon=True).start()
        return server

    def _prestart(self) -> None:
        """Start the servers of the environments coming next on the cores nothing uses now."""
        with self.lock:
            n = len(self.cores) if self.cores else 1
            busy: set[int] = set()
            held = 0
            for _key, cpus, cores, server in self.claims.values():
                if server.ready.is_set() and server.error is None:
                    held += cores
                    busy.update(cpus or ())
            importing = [sv for sv in self.servers.values() if not sv.ready.is_set()]
            held += len(importing)
            busy.update(c for sv in importing for c in (sv.cpus or ()) if len(sv.cpus or ()) == 1)
            live = sum(1 for sv in self.servers.values() if sv.error is None)
            for key, count in self.pending.items():
                if held >= n or live >= self.max_servers:
                    return
                if count <= 0 or key in self.servers:
                    continue
                env, pinnable = self.upcoming[key]
                free = [c for c in (self.cores or ()) if c not in busy]
                # a cell's own thread count makes its libraries' thread counts independent of the cores the
                # server imports on: pin the import to a free core; else the server needs the launcher's cores
                core = (free[0],) if pinnable and free and key[2] is None else None
                self._start(key, env, core)
                held += 1
                live += 1
                busy.update(core or ())

    def finished(self, cell: Cell, child: WarmChild) -> None:
        """A cell's warm worker ended: its cores are free; its server stops when no cell of it is left."""
        self._release(getattr(child, "claim", 0))

    def _release(self, claim: int) -> None:
        with self.lock:
            got = self.claims.pop(claim, None)
            retire = None
            if got is not None:
                key = got[0]
                server = self.servers.get(key)
                if (server is not None and key in self.upcoming and self.pending.get(key, 0) <= 0
                        and server.ready.is_set() and not any(c[0] == key for c in self.claims.values())):
                    retire = self.servers.pop(key)
        if retire is not None:
            retire.stop()
        # The cores it held are the next cell's (the runner starts one at once): look again once it had time to
        # claim them, so that an import does not take them first and make that cell wait.
        timer = threading.Timer(GRACE_S, self._prestart)
        timer.daemon = True
        timer.start()

    # ------------------------------------------------------------------ one cell

    def spawn(self, cell: Cell, env: dict[str, str], spec_path: Path,
              timeout_s: float | None = None) -> tuple[WarmChild | None, str | None]:
        """The cell's worker forked from its server (started first when needed), or why it must start cold.

        The first cell of an environment waits for its server's imports, as a cold worker would import
        for itself; at most the cell's ``timeout_s``: a server that takes longer (a hung import) leaves
        the cell to start cold (the server goes on for the cells after it)."""
        key = self.key(cell, env)
        own = tuple(cell.slot.cpus) if cell.slot is not None and cell.slot.cpus else None
        n = len(self.cores) if self.cores else 1
        cores = min(cell.slot.cores, n) if cell.slot is not None and cell.slot.cores else n  # unscheduled: every core
        with self.lock:
            if self.pending.get(key, 0) > 0:
                self.pending[key] -= 1
            server = self.servers.get(key)
            if server is None or (server.ready.is_set() and server.error is None and not server.alive()):
                # none yet, or it died (killed from outside): a new one, importing on the cell's own cores
                server = self._start(key, {k: v for k, v in env.items() if k != TOKEN_VAR}, own)
            claim = next(self._claim_ids)
            self.claims[claim] = (key, own, cores, server)
        child, why = None, None
        try:
            wait = min(READY_TIMEOUT_S, timeout_s) if timeout_s else READY_TIMEOUT_S
            if not server.ready.wait(timeout=wait):
                why = f"its warm server had not finished importing torch after {wait:g}s"
                return None, why
            if server.error is not None:
                why = f"its warm server could not start: {server.error}"
                return None, why
            cpus = sorted(own) if own else self.cores
            self._quiet(server, set(cpus or ()), time.monotonic() + wait)
            child, why = server.spawn(env, spec_path, cpus)
            if child is not None:
                child.claim = claim
            return child, why
        finally:
            if child is None:
                self._release(claim)

    def _quiet(self, mine: WarmServer, cores: set[int], deadline: float) -> None:
        """Wait until no other server imports on ``cores`` (one that imports unpinned may use any core): a cell
        never shares its cores with an import, as it never shares them with another cell (harness.schedule)."""
        while time.monotonic() < deadline:
            with self.lock:
                busy = [sv for sv in self.servers.values() if sv is not mine and not sv.ready.is_set()
                        and (not sv.cpus or not cores or set(sv.cpus) & cores)]
            if not busy:
                return
            busy[0].ready.wait(timeout=max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Stop every server (each kills what it still runs); a later cell starts a new one."""
        with self.lock:
            servers = list(self.servers.values())
            self.servers.clear()
            self.pending.clear()
            self.claims.clear()
        for server in servers:
            server.stop()
