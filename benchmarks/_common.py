"""What the benchmarks share: interleaved rounds, medians, and a bundle copy with other epochs."""

from __future__ import annotations

import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable

import yaml

REPO = Path(__file__).resolve().parent.parent


def interleaved(variants: dict[str, Callable[[], float]], rounds: int, unit: str = "s") -> dict[str, list[float]]:
    """Each round runs every variant once, in order (ABAB...), so machine noise hits all alike.

    ``unit`` is how the round lines print the values: ``s`` (seconds) or ``ms``.
    """
    times: dict[str, list[float]] = {k: [] for k in variants}
    scale, fmt = (1e3, "{:.3f}ms") if unit == "ms" else (1.0, "{:.2f}s")
    for r in range(rounds):
        for name, fn in variants.items():
            times[name].append(fn())
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} " + fmt.format(v[-1] * scale) for k, v in times.items()),
              flush=True)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bundle_copy(src: Path, dst: Path, epochs: int | None) -> Path:
    """``src`` copied to ``dst`` with ``training.epochs`` replaced and the data path made absolute."""
    shutil.copytree(src, dst)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    cfg["data"]["path"] = str((src / cfg["data"]["path"]).resolve())
    if epochs is not None:
        cfg["training"]["epochs"] = int(epochs)
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dst


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()}), python {platform.python_version()}")
