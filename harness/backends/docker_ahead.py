"""Docker cells started ahead of their turn: each cell's own container, importing while others run.

A container's cold start is its engine's create and start plus the worker's imports (torch,
its compiler stack, scikit-learn): seconds per cell, while the cell before it trains. A cell
about to run gets its container now, with everything the cell's container gets (its mounts,
its environment, its memory, PID and time limits, its GPU), started at the lowest CPU weight
(:data:`AHEAD_CPU_SHARES`) so that its imports use only what the running cells leave idle.
Its worker (``python -m harness.worker --await-go``, :mod:`harness.worker.preload`) imports,
prints its ready line and waits. When the cell's turn comes the backend gives the container
its cores and the engine's default CPU weight and sends the go signal; only then does the
worker read its spec and the bundle. Nothing of the cell has run before that.

One container per cell, never one for several: a container's mounts are fixed when it is
created, and a container shared by cells would let each read and write its neighbours'
directories (see the threat model). What is shared is time, not a process.

A container started ahead is used only when it is exactly the container the cell would get
cold (:func:`mismatch`); otherwise it is removed and the cell starts cold, its record saying
why. The pure parts are here; :class:`~harness.backends.docker.DockerBackend` runs them.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from ..docker_engine import ContainerRequest
from ..worker.preload import AWAIT_FLAG

AHEAD_CPU_SHARES = 2  # the engine's lowest weight: a container importing ahead yields to every running cell
TURN_CPU_SHARES = 1024  # the engine's default weight (docker run --cpu-shares), for every cell that runs
AWAIT_LIMIT_S = 3600  # a container not given its turn within this ends by itself (its launcher is gone)
WORKER_LABEL = "org.harness.worker-start"  # on images whose worker can wait for its turn (Dockerfile.cuda)
WORKER_AWAITS = "await-go"


def ahead_request(cold: ContainerRequest) -> ContainerRequest:
    """The container a cell gets ahead of its turn, from the one it would get cold (pure): the worker
    waits for the go signal, the CPU weight is the lowest and no cores are chosen yet."""
    return dataclasses.replace(cold, command=(AWAIT_FLAG, str(AWAIT_LIMIT_S), *cold.command),
                               cpu_shares=AHEAD_CPU_SHARES, cpuset=None)


def mismatch(ahead: ContainerRequest, now: ContainerRequest, *, threads: int | None,
             only_gpu: str | None = None, all_cores: Iterable[int] | None = None) -> str | None:
    """Why the container started ahead is not the one the cell gets now (pure); None: it is.

    Only its cores and CPU weight may differ (the engine changes those when the turn comes), and
    the cores only when the cell sets its own thread count or is given every core (``all_cores``,
    those it imported on): torch's default counts the cores the worker imported on. ``all`` GPUs and
    a host's only GPU are the same GPU.
    """
    same_gpus = ahead.gpus == now.gpus or (only_gpu is not None and {ahead.gpus, now.gpus} == {"all", only_gpu})
    if not same_gpus:
        return f"its turn gave it GPU {now.gpus}, not the {ahead.gpus} it was started with"
    every = set(all_cores) if all_cores is not None else None
    if now.cpuset and threads is None and {int(c) for c in now.cpuset.split(",")} != every:
        return ("--jobs pinned it to cores of its own and it runs torch's default thread count, which counts "
                "the cores torch loads on")
    settled = dataclasses.replace(ahead, command=ahead.command[2:], cpu_shares=now.cpu_shares, cpuset=now.cpuset,
                                  gpus=now.gpus)
    if settled != now:
        changed = [f.name for f in dataclasses.fields(now) if getattr(settled, f.name) != getattr(now, f.name)]
        return f"its container differs from the one started ahead ({', '.join(changed)})"
    return None


def next_ahead(queue: Iterable[str], launched: set[str], ahead: set[str], running: int, most: int,
               idle: int = 0) -> list[str]:
    """The cells to start ahead now, in queue order (pure): as many as run at once (at least one) and one per
    ``idle`` core besides (an import takes longer than a short retrain), less those already waiting, at most
    ``most`` waiting in all (each holds an interpreter that imported torch)."""
    room = min(max(1, running) + idle, most) - len(ahead)
    out: list[str] = []
    for name in queue:
        if room <= 0:
            break
        if name in launched or name in ahead:
            continue
        out.append(name)
        room -= 1
    return out
