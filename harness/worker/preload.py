"""What a worker imports before it trains, imported ahead of its turn.

Two starts use it. The local backend's warm server (:mod:`harness.backends.warm_server`) imports
:data:`PRELOAD` once and forks a fresh child per cell. A Docker cell's container started ahead
of its turn (``python -m harness.worker --await-go SECONDS --spec ...``, see
:func:`await_go`) imports them, says so on stdout, and waits for the launcher's signal before
it reads its spec: the import overlaps the cells that run before it, and the container stays
the cell's own (its mounts, limits and environment are the cell's from the start).

Importing runs no torch operation and touches no GPU; standard library only at import time.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, Callable

from . import EVENT_PREFIX

# What a worker imports before and while it trains the reference model: importing them ahead
# is the point of a warm start. Importing runs no torch operation and touches no GPU. A module
# that is not installed is left out (the worker fails, or does without it, as a cold one would).
PRELOAD = (
    "numpy", "torch", "torch.nn", "torch.optim", "torch.utils.data",
    "torch._inductor.config",  # torch.use_deterministic_algorithms imports it (and torch._dynamo)
    "yaml", "joblib", "sklearn.preprocessing",  # the archived target scaler is a scikit-learn pickle
    "harness.bundle", "harness.worker.retrain", "harness.worker.determinism",
    "harness.worker.envinfo", "harness.worker.isa", "harness.worker.data", "harness.worker.model",
    "harness.worker.train", "harness.worker.metrics", "harness.worker.perturb", "harness.worker.trace",
    "harness.worker.seed_checks", "harness.worker.trainer_api", "harness.worker.hooks",
    "harness.worker.checkpoint", "harness.worker.trainer_cmd", "harness.worker.feed",
)

AWAIT_FLAG = "--await-go"  # python -m harness.worker --await-go SECONDS --spec ...
GO_SIGNAL = signal.SIGUSR1  # what the launcher sends (docker kill --signal) when the cell's turn has come
READY_LINE = EVENT_PREFIX + '{"event": "ready"}'  # printed once the imports are done and the signal awaited
EXIT_NO_GO = 75  # no signal within the wait (EX_TEMPFAIL): the launcher is gone; nothing was run


def preload(modules: tuple[str, ...] = PRELOAD) -> dict[str, Any]:
    """Import ``modules``; what was imported, what was not (and why), and whether CUDA was asked for.

    torch's CUDA device count is watched while importing: a module that asks for it initialises
    the CUDA driver in this process, and a child forked from it could not use the GPU.
    """
    import importlib

    asked: list[str] = []
    missing: dict[str, str] = {}
    watched = None
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - not installed, or broken: the worker says so itself
            missing[name] = f"{type(exc).__name__}: {exc}"[:300]
        if watched is None and "torch" in sys.modules:
            watched = watch_cuda(sys.modules["torch"], asked, name)
    if watched is not None:
        watched()
    torch = sys.modules.get("torch")
    initialised = bool(torch is not None and torch.cuda.is_initialized())
    return {"modules": [m for m in modules if m not in missing], "missing": missing,
            "cuda_asked": asked, "cuda_initialized": initialised}


def watch_cuda(torch: Any, asked: list[str], importing: str) -> Callable[[], None]:
    """Note every call of torch's CUDA device count while the modules import; returns the undo."""
    C = torch._C
    original = getattr(C, "_cuda_getDeviceCount", None)
    if original is None:  # a CPU-only torch: there is no CUDA to initialise
        return lambda: None

    def counting(*args: Any, **kw: Any) -> Any:
        asked.append(importing)
        return original(*args, **kw)

    C._cuda_getDeviceCount = counting

    def undo() -> None:
        C._cuda_getDeviceCount = original

    return undo


def split_await(argv: list[str]) -> tuple[float | None, list[str]]:
    """``--await-go SECONDS`` taken off the front of the worker's arguments (pure): (seconds or None, the rest)."""
    if len(argv) >= 2 and argv[0] == AWAIT_FLAG:
        try:
            seconds = float(argv[1])
        except ValueError:
            seconds = -1.0
        if seconds > 0:
            return seconds, argv[2:]
        print(f"harness.worker: {AWAIT_FLAG} takes a positive number of seconds, not {argv[1]!r}", file=sys.stderr)
        raise SystemExit(2)
    return None, argv


def await_go(limit_s: float) -> None:
    """Import what a worker imports, print :data:`READY_LINE`, and wait for :data:`GO_SIGNAL`.

    The signal is blocked before anything else, so one sent early stays pending instead of being
    lost (a container's first process ignores a signal it has no handler for); the launcher sends
    it only after the ready line anyway. No signal within ``limit_s``: the launcher is gone; the
    worker ends with :data:`EXIT_NO_GO` having read nothing of the cell.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {GO_SIGNAL})
    preload()
    print(READY_LINE, flush=True)
    got = signal.sigtimedwait({GO_SIGNAL}, limit_s)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {GO_SIGNAL})
    if got is None:
        print(f"harness.worker: no go signal within {limit_s:.0f}s; the launcher is gone, nothing was run",
              file=sys.stderr, flush=True)
        raise SystemExit(EXIT_NO_GO)
