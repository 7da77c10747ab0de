"""Expanding the local matrix's axes into named cells (pure)."""

from __future__ import annotations

import itertools
from typing import Sequence

from .backends.base import Cell
from .worker.determinism import MODES
from .errors import UsageError


def _name(device: str, mode: str, threads: int | None, tf32: bool, repeat: int, repeats: int) -> str:
    parts = [device.replace(":", ""), mode, f"t{threads}" if threads else "tdef"]
    if device.startswith("cuda"):
        parts.append("tf32" if tf32 else "fp32")
    if repeats > 1:
        parts.append(f"r{repeat + 1}")
    return "-".join(parts)


def local_cells(
    devices: Sequence[str],
    modes: Sequence[str],
    threads: Sequence[int | None],
    tf32: Sequence[bool] = (False,),
    repeats: int = 1,
) -> list[Cell]:
    """Every combination of the axes; TF32 only varies on CUDA devices.

    The first cell is the baseline the others are compared with, so the
    strictest settings come first.
    """
    for m in modes:
        if m not in MODES:
            raise UsageError(f"--determinism {m!r} is not one of {', '.join(MODES)}", hint="e.g. --determinism strict,default")
    for d in devices:
        if d != "cpu" and not d.startswith("cuda"):
            raise UsageError(f"--devices {d!r} is not cpu or cuda[:N]", hint="e.g. --devices cpu,cuda")
    if repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {repeats}")
    cells: list[Cell] = []
    seen: set[str] = set()
    for device, mode, t, tf, r in itertools.product(devices, modes, threads, tf32, range(repeats)):
        if tf and not device.startswith("cuda"):
            continue
        name = _name(device, mode, t, tf, r, repeats)
        if name in seen:
            continue
        seen.add(name)
        cells.append(Cell(name=name, device=device, determinism=mode, threads=t, tf32=bool(tf) and device.startswith("cuda"),
                          repeat=r, labels={"device": device, "determinism": mode, "threads": t, "tf32": tf, "repeat": r + 1}))
    return cells


def parse_threads(text: str) -> list[int | None]:
    """``1,2`` or ``1,all``; ``all``/``default`` leaves torch's own default."""
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip()
        if part in ("all", "default", "auto"):
            out.append(None)
            continue
        try:
            v = int(part)
        except ValueError:
            raise UsageError(f"--threads {part!r} is not an integer", hint="e.g. --threads 1,2 or --threads 1,all") from None
        if v < 1:
            raise UsageError(f"--threads must be >= 1, got {v}")
        out.append(v)
    return out
