"""Which cells may run at once, and on which cores and GPU (pure: no effects).

``--jobs N`` runs up to N cells side by side. Each running cell holds a *slot*:

- a CPU cell with ``threads=N`` holds N cores of its own (a disjoint CPU set, never
  shared with another running cell): its thread count is part of what is measured, so it is
  honoured exactly and no cell's cores are oversubscribed. A thread count above the host's
  cores holds every core (it runs alone, as it would without ``--jobs``);
- a CPU cell with the default thread count (``tdef``, ``--threads all``: torch's own default,
  every core) holds every core, so it runs alone;
- a CUDA cell holds one GPU of its own (``CUDA_VISIBLE_DEVICES`` / ``device_ids``) and, with
  ``threads=N``, N cores as above; with the default thread count it holds one core of the
  budget (its host thread) but is not pinned, since pinning would change torch's default
  thread count, which is what that cell measures. A ``cuda:N`` cell holds GPU N.

Where the host's cores are unknown, or ``--jobs 1``, cells run one at a time and nothing is
pinned, exactly as without this module. The pool hands out the lowest free cores first, so a
run's placement is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

AUTO = 0  # --jobs auto: as many as the slots allow


@dataclass(frozen=True)
class Slot:
    """Where one running cell runs: its CPU set (None: not pinned) and its GPU (None: none, or the backend's default)."""

    cpus: tuple[int, ...] | None = None
    gpu: str | None = None
    cores: int = 0  # cores of the budget it holds (its CPU set's size, or 1 for an unpinned CUDA cell)

    def to_record(self) -> dict[str, Any]:
        """What a record keeps of it: ``{"cpus": [..] | None, "gpu": id | None}``."""
        return {"cpus": list(self.cpus) if self.cpus is not None else None, "gpu": self.gpu}

    @property
    def cpuset(self) -> str | None:
        """``0,1,5`` for ``cpuset_cpus`` (None: not pinned)."""
        return ",".join(str(c) for c in self.cpus) if self.cpus is not None else None


@dataclass(frozen=True)
class Need:
    """What a cell must hold to run: cores (0: none counted) and a GPU ("any", an id, or None)."""

    cores: int
    pinned: bool
    gpu: str | None


def need(device: str, threads: int | None, n_cores: int, gpus: Sequence[str] | None) -> Need:
    """What a cell on ``device`` with ``threads`` holds on a host of ``n_cores`` cores and ``gpus`` (pure)."""
    on_cuda = device.startswith("cuda")
    gpu: str | None = None
    if on_cuda:
        _, _, index = device.partition(":")
        if index.isdigit() and gpus is not None and int(index) < len(gpus):
            gpu = gpus[int(index)]
        else:
            gpu = "any"
    if threads is None:
        return Need(cores=1, pinned=False, gpu=gpu) if on_cuda else Need(cores=n_cores, pinned=True, gpu=None)
    return Need(cores=min(threads, n_cores), pinned=True, gpu=gpu)


class SlotPool:
    """The host's cores and GPUs, handed to running cells and taken back (pure, not thread-safe: one caller).

    ``cpus``: the host's usable cores (None: unknown, so one cell at a time, unpinned).
    ``gpus``: the GPU ids a CUDA cell may get (None: unknown, so CUDA cells take turns on
    the backend's default GPUs). ``jobs``: at most this many cells at once (:data:`AUTO`: as the slots allow).
    """

    def __init__(self, cpus: Sequence[int] | None, gpus: Sequence[str] | None, jobs: int = AUTO) -> None:
        self.cpus = sorted(set(cpus)) if cpus else None
        self.gpus = list(gpus) if gpus is not None else None
        self.jobs = 1 if self.cpus is None else jobs
        self.pinning = self.jobs != 1  # --jobs 1 runs as it always did: nothing pinned
        self.free_cpus: list[int] = list(self.cpus or [])
        self.free_gpus: list[str] = list(self.gpus or [])
        self.budget = len(self.cpus) if self.cpus else 1  # cores not yet held (pinned or not)
        self.gpu_turn_free = True  # gpus unknown: CUDA cells take turns
        self.running = 0

    @property
    def n_cores(self) -> int:
        return len(self.cpus) if self.cpus else 1

    def need(self, device: str, threads: int | None) -> Need:
        return need(device, threads, self.n_cores, self.gpus)

    def take(self, device: str, threads: int | None) -> Slot | None:
        """A slot for a cell, or None when it must wait for one that runs now to end."""
        if self.jobs and self.running >= self.jobs:
            return None
        n = self.need(device, threads)
        if self.cpus is None or not self.pinning:
            if self.running:
                return None
            self.running = 1
            gpu = None
            if n.gpu is not None and n.gpu != "any":
                gpu = n.gpu
            return Slot(cpus=None, gpu=gpu, cores=0)
        if n.cores > self.budget or (n.pinned and n.cores > len(self.free_cpus)):
            return None
        gpu: str | None = None
        if n.gpu is not None:
            if self.gpus is None:
                if not self.gpu_turn_free:
                    return None
                self.gpu_turn_free = False
                gpu = None
            elif n.gpu == "any":
                if not self.free_gpus:
                    return None
                gpu = self.free_gpus.pop(0)
            else:
                if n.gpu not in self.free_gpus:
                    return None
                self.free_gpus.remove(n.gpu)
                gpu = n.gpu
        cpus: tuple[int, ...] | None = None
        if n.pinned:
            cpus = tuple(self.free_cpus[:n.cores])
            del self.free_cpus[:n.cores]
        self.budget -= n.cores
        self.running += 1
        return Slot(cpus=cpus, gpu=gpu, cores=n.cores)

    def give_back(self, slot: Slot, device: str) -> None:
        """The cell holding ``slot`` ended: its cores and GPU are free again."""
        self.running -= 1
        if self.cpus is None or not self.pinning:
            return
        if slot.cpus is not None:
            self.free_cpus = sorted(set(self.free_cpus) | set(slot.cpus))
        self.budget += slot.cores
        if device.startswith("cuda"):
            if self.gpus is None:
                self.gpu_turn_free = True
            elif slot.gpu is not None:
                self.free_gpus = [g for g in self.gpus if g in set(self.free_gpus) | {slot.gpu}]

    def most_at_once(self, cells: Sequence[tuple[str, int | None]]) -> int:
        """How many of ``cells`` (device, threads) would start at once on an idle pool (for the start line)."""
        probe = SlotPool(self.cpus, self.gpus, self.jobs)
        n = 0
        for device, threads in cells:
            if probe.take(device, threads) is not None:
                n += 1
        return max(n, 1) if cells else 0


def next_to_start(waiting: Sequence[Any], pool: SlotPool) -> list[tuple[Any, Slot]]:
    """The waiting cells (in plan order) that get a slot now: each takes the first that fits.

    A cell that does not fit does not hold back smaller ones behind it (they backfill the
    free cores); it starts as soon as enough is free, since nothing new starts ahead of it
    once the ones behind it have all started.
    """
    started = []
    for cell in waiting:
        slot = pool.take(cell.device, cell.threads)
        if slot is not None:
            started.append((cell, slot))
    return started
