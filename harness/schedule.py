"""Which cells may run at once, and on which cores and GPU (pure: no effects).

``--jobs N`` runs up to N cells side by side. Each running cell holds a *slot*:

- a CPU cell with ``threads=N`` holds N cores of its own (a disjoint CPU set, never
  shared with another running cell): its thread count is part of what is measured, so it is
  honoured exactly and no cell's cores are oversubscribed. A thread count above the host's
  cores holds every core (it runs alone, as it would without ``--jobs``);
- a CPU cell with the default thread count (``tdef``, ``--threads all``: torch's own default,
  every core) holds every core, so it runs alone;
- a CUDA cell holds a share of one GPU (``CUDA_VISIBLE_DEVICES`` / ``device_ids``) and, with
  ``threads=N``, N cores as above; with the default thread count it holds one core of the
  budget (its host thread) but is not pinned, since pinning would change torch's default
  thread count, which is what that cell measures. A ``cuda:N`` cell holds a share of GPU N.

``--jobs`` applies per device: up to N CPU cells at once, and up to N cells on each GPU. How
many cells share a GPU is sized from what the run's finished CUDA cells measured
(:func:`gpu_capacity`): until one has finished, a GPU holds one cell, so the first cell on
each GPU runs alone and its peak memory sizes the rest. Each process gets its own CUDA
context and the GPU time-slices between them; no kernel, algorithm or workspace setting
changes, so a strict cell's numbers do not depend on its neighbours (checked on a device by
``benchmarks/bench_gpu.py``), and the record keeps how many cells shared its GPU.

Where the host's cores are unknown, or ``--jobs 1``, cells run one at a time and nothing is
pinned, exactly as without this module. The pool hands out the lowest free cores first, so a
run's placement is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

AUTO = 0  # --jobs auto: as many as the slots allow
AUTO_PER_GPU = 8  # --jobs auto: at most this many cells share one GPU, whatever its memory allows
GPU_HEADROOM = 0.9  # the share of a GPU's memory that the cells sharing it may plan to fill
PEAK_MARGIN = 1.25  # a cell's measured peak, times this: allocator and data-size variance between cells
CONTEXT_MIB = 1024.0  # a CUDA context and its libraries, assumed until a cell that ran alone measures its own


def gpu_capacity(measured: Sequence[dict[str, Any]], jobs: int) -> tuple[int, str]:
    """How many cells may share one GPU, and why, from finished cells' ``gpu_memory`` (pure).

    Each entry is a record's ``gpu_memory`` plus ``"alone": bool`` (it ran with the GPU to itself, so
    its ``context_mib`` is its own). One cell needs its largest peak reserved by torch times
    :data:`PEAK_MARGIN`, plus a context (the largest measured alone, else :data:`CONTEXT_MIB`); the
    cells sharing a GPU may plan to fill :data:`GPU_HEADROOM` of the smallest device seen. Capped by
    ``jobs`` (:data:`AUTO_PER_GPU` for auto). Nothing measured yet: one.
    """
    cap = jobs if jobs else AUTO_PER_GPU
    usable = [m for m in measured if m.get("total_mib") and m.get("peak_reserved_mib") is not None]
    if cap <= 1:
        return 1, "--jobs 1"
    if not usable:
        return 1, "no CUDA cell has measured its memory yet"
    total = min(float(m["total_mib"]) for m in usable)
    contexts = [float(m["context_mib"]) for m in usable if m.get("alone") and m.get("context_mib") is not None]
    context = max(contexts) if contexts else CONTEXT_MIB
    peak = max(float(m["peak_reserved_mib"]) for m in usable)
    per_cell = peak * PEAK_MARGIN + context
    fits = max(1, int(total * GPU_HEADROOM // per_cell))
    n = min(cap, fits)
    why = (f"{peak:.0f} MiB peak x {PEAK_MARGIN} + {context:.0f} MiB context"
           f"{'' if contexts else ' (assumed)'} per cell, {GPU_HEADROOM:.0%} of {total:.0f} MiB")
    return n, why + (f"; capped by --jobs {cap}" if jobs and fits > cap else
                     f"; at most {AUTO_PER_GPU} per GPU" if not jobs and fits > cap else "")


@dataclass(frozen=True)
class Slot:
    """Where one running cell runs: its CPU set (None: not pinned) and its GPU (None: none, or the backend's default)."""

    cpus: tuple[int, ...] | None = None
    gpu: str | None = None
    cores: int = 0  # cores of the budget it holds (its CPU set's size, or 1 for an unpinned CUDA cell)
    gpu_shared: int = 0  # cells on its GPU when it started, itself included (0: no GPU held)

    def to_record(self) -> dict[str, Any]:
        """What a record keeps of it: ``{"cpus": [..] | None, "gpu": id | None}``, and ``"gpu_shared": n``
        (the cells on that GPU when it started, itself included) for a cell that held a GPU."""
        out: dict[str, Any] = {"cpus": list(self.cpus) if self.cpus is not None else None, "gpu": self.gpu}
        if self.gpu_shared:
            out["gpu_shared"] = self.gpu_shared
        return out

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
        self.gpu_load: dict[str, int] = {g: 0 for g in self.gpus or []}  # cells on each GPU now
        self.per_gpu = 1  # cells that may share a GPU: one until a finished cell measured (size_gpus)
        self.per_gpu_why = "no CUDA cell has measured its memory yet"
        self.measured: list[dict[str, Any]] = []
        self.packing_off: str | None = None  # why cells no longer share GPUs
        self.budget = len(self.cpus) if self.cpus else 1  # cores not yet held (pinned or not)
        self.gpu_turn_free = True  # gpus unknown: CUDA cells take turns
        self.running = 0
        self.cpu_running = 0  # CPU cells now (--jobs caps them, and the cells on each GPU, separately)

    @property
    def free_gpus(self) -> list[str]:
        """The GPUs with room for one more cell, least loaded first (then in the host's order)."""
        room = [g for g in self.gpus or [] if self.gpu_load[g] < self.per_gpu]
        return sorted(room, key=lambda g: self.gpu_load[g])

    def size_gpus(self, gpu_memory: dict[str, Any], alone: bool) -> bool:
        """A finished CUDA cell measured its GPU memory (a record's ``gpu_memory``); True when the
        number of cells that may share a GPU changed."""
        self.measured.append({**gpu_memory, "alone": alone})
        if self.packing_off is not None:
            return False
        before = self.per_gpu
        self.per_gpu, self.per_gpu_why = gpu_capacity(self.measured, self.jobs)
        return self.per_gpu != before

    def alone_on_gpus(self, why: str) -> None:
        """One cell per GPU for the rest of the run (a cell sharing a GPU ran out of its memory)."""
        self.per_gpu, self.per_gpu_why = 1, why
        self.packing_off = why

    @property
    def n_cores(self) -> int:
        return len(self.cpus) if self.cpus else 1

    def need(self, device: str, threads: int | None) -> Need:
        return need(device, threads, self.n_cores, self.gpus)

    def take(self, device: str, threads: int | None) -> Slot | None:
        """A slot for a cell, or None when it must wait for one that runs now to end."""
        n = self.need(device, threads)
        if self.jobs and n.gpu is None and self.cpu_running >= self.jobs:
            return None
        if self.jobs and n.gpu is not None and self.gpus is None and self.running >= self.jobs:
            return None
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
                gpu = self.free_gpus[0]
            else:
                if n.gpu not in self.free_gpus:
                    return None
                gpu = n.gpu
        cpus: tuple[int, ...] | None = None
        if n.pinned:
            cpus = tuple(self.free_cpus[:n.cores])
            del self.free_cpus[:n.cores]
        self.budget -= n.cores
        self.running += 1
        shared = 0
        if gpu is not None:
            self.gpu_load[gpu] += 1
            shared = self.gpu_load[gpu]
        elif n.gpu is None:
            self.cpu_running += 1
        return Slot(cpus=cpus, gpu=gpu, cores=n.cores, gpu_shared=shared)

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
            elif slot.gpu is not None and slot.gpu in self.gpu_load:
                self.gpu_load[slot.gpu] -= 1
        else:
            self.cpu_running -= 1

    def most_at_once(self, cells: Sequence[tuple[str, int | None]]) -> int:
        """How many of ``cells`` (device, threads) would start at once on an idle pool (for the start line)."""
        probe = SlotPool(self.cpus, self.gpus, self.jobs)
        probe.per_gpu = self.per_gpu
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
