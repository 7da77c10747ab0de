"""The reference trainer's two data paths: the seeded DataLoader, and a replay of it.

``loader``: the seed document's ``DataLoader(train, batch_size, shuffle=True,
generator=g, num_workers=0)``; every batch is gathered sample by sample and
collated in Python.

``fast``: the train split's tensors held whole on the device, each batch taken
by index (``x[idx]``), in the order the seeded DataLoader would produce. The
order is had by replaying the draws that loader makes on ``g`` per epoch; in
torch 2.13 these are

1. ``_BaseDataLoaderIter.__init__``: one int64 base seed,
   ``torch.empty((), dtype=torch.int64).random_(generator=g)``
2. ``RandomSampler.__iter__``: ``torch.randperm(n, generator=g)`` -- the order
3. the same, once the sampler is exhausted: a trailing ``randperm(n)`` for the
   ``num_samples % n`` remainder, which yields nothing but still draws

Because the replay uses the same generator, ``g`` is in the same state after
every epoch as it would be under the DataLoader. Whether this holds for the
torch in use is not assumed: :func:`prove` runs a real DataLoader's epochs on a
fresh generator and compares both the batches and the generator state after
them with the replay; the fast path is used only when they agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader

from ..options import DATA_PATHS, DEFAULT_DATA_PATH

PROOF_EPOCHS = 2  # a real DataLoader's first epochs, compared batch by batch and by generator state


def replay_epoch(n: int, batch_size: int, g: torch.Generator, drop_last: bool = False) -> list[torch.Tensor]:
    """One epoch's batches of positions ``0..n-1``, drawing on ``g`` exactly as the seeded DataLoader does."""
    torch.empty((), dtype=torch.int64).random_(generator=g)  # the iterator's base seed (unused with no workers)
    perm = torch.randperm(n, generator=g)
    torch.randperm(n, generator=g)  # RandomSampler's trailing randperm for num_samples % n (== 0) samples
    stop = n - n % batch_size if drop_last else n
    return list(perm[:stop].split(batch_size)) if stop else []  # split() of nothing is one empty batch


def loader_epoch(n: int, batch_size: int, g: torch.Generator, drop_last: bool = False) -> list[torch.Tensor]:
    """One epoch's batches of positions ``0..n-1`` from a real seeded DataLoader (shuffle, in-process)."""
    loader = DataLoader(range(n), batch_size=batch_size, shuffle=True, generator=g, num_workers=0,
                        pin_memory=False, drop_last=drop_last)
    return [b for b in loader]


Replay = Callable[[int, int, torch.Generator, bool], list[torch.Tensor]]


def prove(n: int, batch_size: int, seed: int, *, drop_last: bool = False, epochs: int = PROOF_EPOCHS,
          replay: Replay | None = None) -> str | None:
    """None when ``replay`` (default :func:`replay_epoch`) gives the seeded DataLoader's batches and generator state; else why not (one line)."""
    replay = replay or replay_epoch
    g_loader = torch.Generator().manual_seed(seed)
    g_replay = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        want = loader_epoch(n, batch_size, g_loader, drop_last)
        got = replay(n, batch_size, g_replay, drop_last)
        if len(want) != len(got):
            return f"epoch {epoch}: the DataLoader gave {len(want)} batches, the replay {len(got)}"
        for i, (a, b) in enumerate(zip(want, got)):
            if not torch.equal(a.to(torch.int64), b.to(torch.int64)):
                return f"epoch {epoch}, batch {i + 1}: the replayed sample order differs from the DataLoader's"
        if not torch.equal(g_loader.get_state(), g_replay.get_state()):
            return f"epoch {epoch}: the generator's state after the replay differs from the DataLoader's"
    return None


@dataclass
class Decision:
    """Which data path a run asked for and which it took, and why (copied into the record)."""

    requested: str
    effective: str
    proof: str  # "replay equals DataLoader (N epochs, torch X)" | why the replay was refused | "not attempted"
    torch: str = field(default_factory=lambda: torch.__version__)

    @property
    def fell_back(self) -> bool:
        return self.requested == "fast" and self.effective != "fast"

    def to_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "effective": self.effective, "proof": self.proof, "torch": self.torch,
                "fell_back": self.fell_back}


MAX_DEVICE_SHARE = 0.5  # the resident split may take at most this share of the device's free memory


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA device; None on the CPU (the split is already in host memory there)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def decide(requested: str | None, n: int, batch_size: int, seed: int, *, drop_last: bool = False,
           replay: Replay | None = None, nbytes: int = 0, free_bytes: int | None = None) -> Decision:
    """The path to train on: ``fast`` only when :func:`prove` holds for this torch, here and now.

    ``nbytes``: what the resident split takes on the device; ``free_bytes``: the device's free
    memory (None: no limit, the CPU). A split that would take more than half of it stays on the loader.
    """
    want = requested or DEFAULT_DATA_PATH
    if want not in DATA_PATHS:
        raise ValueError(f"data path {want!r} is not one of {', '.join(DATA_PATHS)}")
    if want == "loader":
        return Decision(want, "loader", "not attempted")
    if free_bytes is not None and nbytes > MAX_DEVICE_SHARE * free_bytes:
        return Decision(want, "loader", f"fell back to the DataLoader: the train split ({nbytes / 2**20:.0f} MiB) "
                                        f"would take more than half of the device's free memory "
                                        f"({free_bytes / 2**20:.0f} MiB)")
    why = prove(n, batch_size, seed, drop_last=drop_last, replay=replay)
    if why is not None:
        return Decision(want, "loader", f"fell back to the DataLoader: {why} (torch {torch.__version__})")
    return Decision(want, "fast", f"replay equals the DataLoader's first {PROOF_EPOCHS} epochs and generator "
                                  f"state (torch {torch.__version__})")


class ResidentFeed:
    """The fast path's training batches: tensors resident on ``device``, rows taken by replayed index.

    Iterating it is one epoch, as iterating the seeded DataLoader is, and draws
    on its generator exactly as that loader would (:func:`replay_epoch`).
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], batch_size: int, generator: torch.Generator,
                 device: torch.device, *, drop_last: bool = False, replay: Replay | None = None) -> None:
        self.tensors = tuple(t.to(device) for t in tensors)
        self.n = int(self.tensors[0].shape[0])
        self.batch_size = batch_size
        self.generator = generator
        self.device = device
        self.drop_last = drop_last
        self.replay = replay or replay_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for idx in self.replay(self.n, self.batch_size, self.generator, self.drop_last):
            idx = idx.to(self.device)
            yield tuple(t[idx] for t in self.tensors)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)
