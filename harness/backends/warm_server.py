"""The warm worker's server: one interpreter that imported torch once, forking a fresh child per cell.

Started by the local backend (:mod:`harness.backends.warm`) in exactly the environment a cold
worker of its cells gets (``child_env`` without the per-cell ``HARNESS_CELL_TOKEN``,
``CUDA_VISIBLE_DEVICES`` and ISA variables), so ``PYTHONHASHSEED`` and the thread counts are
in effect before the interpreter and torch start, as for a cold worker::

    python -m harness.backends.warm_server --control FD --launcher PID [--cpus 0,1]

It imports what every worker imports (:data:`harness.worker.preload.PRELOAD`) and never runs a torch operation, never
asks for a GPU (torch never initialises CUDA here: a child does, after its own
``CUDA_VISIBLE_DEVICES`` is set) and never starts a thread pool of OpenMP. Then it waits on its
control socket (a ``SOCK_SEQPACKET`` socket pair with the launcher). A request is one JSON
message with two descriptors (``SCM_RIGHTS``): a socket for the answer and the write end of the
launcher's output pipe. For each, the server forks; the child

* starts its own session (``setsid``), asks for SIGKILL when the server dies
  (``PR_SET_PDEATHSIG``; the server is single-threaded) and ends at once when it already has,
* pins itself to the cell's cores (or the launcher's, when the cell is not pinned),
* writes its stdout and stderr to the launcher's pipe,
* writes the cell's token into its environment block (so that ``/proc/PID/environ`` of it
  and of whatever it forks carries the token, as a cold worker's does) and sets the cell's
  token, ``CUDA_VISIBLE_DEVICES`` and its ``--isa`` level's variables (:data:`ISA_VARS`) in ``os.environ``,
* and becomes the worker: ``harness.worker.retrain.main`` on the cell's spec, which seeds
  everything itself exactly as in a cold worker.

The server answers ``{"pid": N}`` once the child's session exists, and ``{"exit": status}``
(as ``Popen.returncode`` says it) when the child has ended. When the launcher goes (its end
of the control socket closes: it ended, was killed with SIGKILL, or stopped the server) or
the server gets SIGTERM, the server kills every child it started, what those started
(their sessions, their process trees in ``/proc``, the processes carrying their tokens), and
exits.

Linux only (``fork``, ``prctl``, ``/proc``); the launcher starts cold workers elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import sys
import time
import traceback
import warnings
from typing import Any

from ..worker import isa
from ..worker.preload import preload

TOKEN_VAR = "HARNESS_CELL_TOKEN"
# The server starts with this value in place of a cell's token (the same length as
# secrets.token_hex(16)), so that each child can overwrite it in its environment block.
TOKEN_PLACEHOLDER = "0" * 32
GPU_VAR = "CUDA_VISIBLE_DEVICES"
# The instruction-set switches of ATen, oneDNN and MKL (harness.worker.isa.VARS). Each library reads its
# own the first time it dispatches a kernel, which no server does (it runs no torch operation), so a
# child sets them for its cell and one server serves every --isa level of an environment. Their own
# verbose reports show each level taken in a forked child (tests/cli/test_warm.py).
ISA_VARS = isa.VARS
CHILD_VARS = (TOKEN_VAR, GPU_VAR, *ISA_VARS)  # what each child sets itself; never part of a server's environment
MAX_MESSAGE = 4 << 20

def _die_with_parent(parent: int) -> None:
    """SIGKILL when ``parent`` dies (Linux ``PR_SET_PDEATHSIG``); end now when it already has."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(137)


def _write_token_in_place(token: str) -> bool:
    """Overwrite the placeholder token in this process's environment block (what ``/proc/PID/environ``
    shows, and what a forked process inherits) with ``token``; True when ``/proc`` shows it after."""
    if len(token) != len(TOKEN_PLACEHOLDER):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.getenv.restype = ctypes.c_void_p
        libc.getenv.argtypes = [ctypes.c_char_p]
        where = libc.getenv(TOKEN_VAR.encode())
        if not where or ctypes.string_at(where) != TOKEN_PLACEHOLDER.encode():
            return False
        ctypes.memmove(where, token.encode(), len(token))
        with open("/proc/self/environ", "rb") as fh:
            return f"{TOKEN_VAR}={token}".encode() in fh.read().split(b"\0")
    except (OSError, AttributeError, ValueError):
        return False


class _Child:
    """One cell's worker, as the server keeps it."""

    def __init__(self, pid: int, answer: socket.socket, token: str | None) -> None:
        self.pid = pid
        self.answer = answer
        self.token = token


def run_worker(spec: str) -> None:
    """Become the worker on ``spec``: what ``harness/worker/__main__.py`` does, with its command line."""
    from pathlib import Path

    import harness.worker as worker_pkg
    from harness.worker.retrain import exit_now, main

    sys.argv = [str(Path(worker_pkg.__file__).with_name("__main__.py")), "--spec", spec]
    exit_now(main())


class Server:
    def __init__(self, control: socket.socket, launcher: int, started_with: dict[str, str]) -> None:
        self.control = control
        self.launcher = launcher
        self.pid = os.getpid()
        self.children: dict[int, _Child] = {}
        # the environment every cell of this server shares: what it started with (before the imports set
        # their own variables, as they do in a cold worker too), less the token
        self.base = {k: v for k, v in started_with.items() if k not in CHILD_VARS}
        self.stopping = False
        from .proctable import carrying, process_table  # imported now: stopping must not fail on an import

        self._carrying, self._process_table = carrying, process_table
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    # ------------------------------------------------------------------ the loop

    def serve(self) -> str | None:
        """Answer requests until the launcher goes; returns the spec to run in a forked child (in the child),
        None in the server once it is done."""
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_term)
        self.sel.register(self.control, selectors.EVENT_READ)
        self.sel.register(self.wake_r, selectors.EVENT_READ)
        while True:
            for key, _ in self.sel.select(timeout=1.0):
                if key.fileobj is self.control:
                    try:
                        msg, fds, _flags, _addr = socket.recv_fds(self.control, MAX_MESSAGE, 4)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        msg, fds = b"", []
                    if not msg:  # the launcher closed its end: it stopped us, or it is gone
                        for fd in fds:
                            os.close(fd)
                        self.stop()
                        return None
                    spec = self.handle(msg, fds)
                    if spec is not None:
                        return spec  # the child
                else:
                    try:
                        while os.read(self.wake_r, 512):
                            pass
                    except (BlockingIOError, InterruptedError):
                        pass
            self.reap()
            if self.stopping or os.getppid() != self.launcher:
                self.stop()
                return None

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def reap(self) -> None:
        """Tell the launcher how each ended child ended (Popen's returncode: negative for a signal)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            _send(child.answer, {"exit": os.waitstatus_to_exitcode(status)})
            child.answer.close()

    def stop(self) -> None:
        """Kill every child and what it started, then return (the caller exits)."""
        _carrying, _process_table = self._carrying, self._process_table
        for _ in range(3):  # what a dying process starts is found on the next look
            table = _process_table()
            below: dict[int, list[int]] = {}
            for pid, (ppid, _) in table.items():
                below.setdefault(ppid, []).append(pid)
            targets: set[int] = set()
            todo = [c.pid for c in self.children.values() if c.pid in table]
            while todo:
                pid = todo.pop()
                if pid in targets or pid == self.pid:
                    continue
                targets.add(pid)
                todo.extend(below.get(pid, ()))
            for child in self.children.values():
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except OSError:
                    pass
                if child.token:
                    targets.update(_carrying(f"{TOKEN_VAR}={child.token}".encode(), table))
            targets.discard(self.pid)
            for pid in targets:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            if not targets:
                break
        deadline = time.monotonic() + 10
        while self.children and time.monotonic() < deadline:
            self.reap()
            if self.children:
                time.sleep(0.01)

    # ------------------------------------------------------------------ one request

    def handle(self, msg: bytes, fds: list[int]) -> str | None:
        answer = socket.socket(fileno=fds[0]) if fds else None
        extra = fds[1:]
        try:
            req = json.loads(msg)
        except ValueError:
            req = None
        if answer is None or not isinstance(req, dict):
            for fd in extra:
                os.close(fd)
            if answer is not None:
                answer.close()
            return None
        if req.get("op") == "facts":
            _send(answer, self.facts())
            answer.close()
            for fd in extra:
                os.close(fd)
            return None
        if req.get("op") != "cell" or len(extra) != 1:
            _send(answer, {"error": f"unknown request {req.get('op')!r}"})
            answer.close()
            for fd in extra:
                os.close(fd)
            return None
        out = extra[0]
        env = req.get("env") or {}
        differs = sorted(k for k in set(env) | set(self.base)
                         if k not in CHILD_VARS and env.get(k) != self.base.get(k))
        if differs:
            _send(answer, {"error": f"the cell's environment is not this server's ({', '.join(differs[:5])} differ)"})
            answer.close()
            os.close(out)
            return None
        ready_r, ready_w = os.pipe()
        try:
            with warnings.catch_warnings():
                # Python 3.12 warns of a fork while the BLAS libraries' idle threads exist (their fork handlers
                # stop them); no thread of this process holds a lock the child needs.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except OSError as exc:
            os.close(ready_r)
            os.close(ready_w)
            os.close(out)
            _send(answer, {"error": f"fork failed: {exc}"})
            answer.close()
            return None
        if pid == 0:  # the cell's worker
            try:
                os.close(ready_r)
                self._become_cell(req, env, out, answer, ready_w)
            except BaseException:  # noqa: BLE001 - never return into the server's loop
                try:
                    traceback.print_exc()  # into the cell's log once its output is the launcher's pipe
                    sys.stderr.flush()
                finally:
                    os._exit(127)
            return str(req["spec"])
        os.close(ready_w)
        os.close(out)
        try:
            while os.read(ready_r, 64):  # its session exists (or it ended) once the pipe closes
                pass
        except OSError:
            pass
        os.close(ready_r)
        self.children[pid] = _Child(pid, answer, env.get(TOKEN_VAR))
        if not _send(answer, {"pid": pid}):  # the launcher gave up on it already
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        return None

    def _become_cell(self, req: dict[str, Any], env: dict[str, str], out: int, answer: socket.socket,
                     ready: int) -> None:
        os.setsid()
        _die_with_parent(self.pid)
        cpus = req.get("cpus")
        if cpus:
            os.sched_setaffinity(0, [int(c) for c in cpus])
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        self.sel.close()
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)
        self.control.close()
        answer.close()
        for child in self.children.values():
            child.answer.close()
        self.children.clear()
        token = env.get(TOKEN_VAR)
        if token:
            _write_token_in_place(token)
            os.environ[TOKEN_VAR] = token
        for var in (GPU_VAR, *ISA_VARS):  # before anything reads them: putenv, as the libraries getenv
            if var in env:
                os.environ[var] = env[var]
            else:
                os.environ.pop(var, None)
        if req.get("cwd"):
            os.chdir(req["cwd"])
        os.close(ready)

    def facts(self) -> dict[str, Any]:
        """What a test asks of a running server: its threads, and whether torch initialised CUDA here."""
        torch = sys.modules.get("torch")
        try:
            threads = len(os.listdir("/proc/self/task"))
        except OSError:
            threads = None
        return {"pid": self.pid, "threads": threads, "children": sorted(self.children),
                "cuda_initialized": bool(torch is not None and torch.cuda.is_initialized()),
                "hash_randomization": bool(sys.flags.hash_randomization)}


def _send(sock: socket.socket, doc: dict[str, Any]) -> bool:
    try:
        sock.send(json.dumps(doc).encode())
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m harness.backends.warm_server")
    ap.add_argument("--control", type=int, required=True)
    ap.add_argument("--launcher", type=int, required=True)
    ap.add_argument("--cpus", default="")
    a = ap.parse_args(argv)
    if a.cpus:
        os.sched_setaffinity(0, [int(c) for c in a.cpus.split(",")])
    control = socket.socket(fileno=a.control)
    if os.getppid() != a.launcher:  # the launcher is gone already
        os._exit(0)
    started_with = dict(os.environ)
    t0 = time.perf_counter()
    facts = preload()
    if facts["cuda_asked"] or facts["cuda_initialized"]:
        why = (f"importing {', '.join(dict.fromkeys(facts['cuda_asked']))} asked torch for the CUDA devices"
               if facts["cuda_asked"] else "torch initialised CUDA while importing")
        _send(control, {"error": why + ": a child forked from it could not use the GPU"})
        os._exit(0)
    _send(control, {"ready": True, "pid": os.getpid(), "seconds": time.perf_counter() - t0, **facts})
    spec = Server(control, a.launcher, started_with).serve()
    if spec is None:
        os._exit(0)
    run_worker(spec)


if __name__ == "__main__":
    main()
