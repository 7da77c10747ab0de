"""The one small interface every backend implements (local processes, Docker,
and later a cluster scheduler).

A backend gets a :class:`Cell` and a :class:`Job` and returns a result record.
Only :meth:`Backend.run` touches the system; everything it launches runs
``python -m harness.worker`` with a :class:`~harness.record.RunSpec`, so every
backend produces the same record.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import HarnessError
from ..record import error_record, write_record

EventFn = Callable[[dict[str, Any]], None]


@dataclass
class Cell:
    """One point of the matrix: where and how a retrain runs."""

    name: str
    device: str = "cpu"
    determinism: str = "strict"
    threads: int | None = None
    tf32: bool = False
    repeat: int = 0
    image: Any = None  # harness.matrix.ImageCell for the docker backend
    skip_reason: str | None = None
    labels: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    """What every cell of one invocation shares (host paths)."""

    bundle_dir: str
    data_path: str
    results_dir: str
    trainer: str | None = None
    trainer_path: str | None = None
    trace: bool = False

    def cell_dir(self, cell: Cell) -> Path:
        return Path(self.results_dir) / cell.name


@dataclass
class Plan:
    """What one invocation will run: the backend, its cells, and cells already decided."""

    backend: "Backend"
    cells: list[Cell]
    skipped: list[Cell] = field(default_factory=list)  # cannot run on this host, with the reason
    failures: dict[str, HarnessError] = field(default_factory=dict)  # cell name -> why it cannot start


class Backend(ABC):
    name = "abstract"

    def prepare(self, cells: list[Cell], job: Job) -> dict[str, HarnessError]:
        """Make what the cells need (images ...). Returns per-cell failures; others go on."""
        return {}

    @abstractmethod
    def run(self, cell: Cell, job: Job, on_event: EventFn | None = None) -> dict[str, Any]:
        """Run one cell to completion and return its record (also on disk)."""

    def close(self) -> None:
        """Release what the backend holds; stop anything still running."""


def finish_record(cell: Cell, job: Job, *, rc: int | None, log_tail: str, wall_s: float,
                  reason: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read the worker's record, or write a failure record when it left none.

    A worker that crashed, was OOM-killed or never started leaves no record;
    the failure, its exit status and the log tail become the cell's record so
    the table still has a row for it.
    """
    path = job.cell_dir(cell) / "record.json"
    record: dict[str, Any] | None = None
    if path.is_file():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            record = None
    if record is None:
        if reason is None:
            reason = f"worker exited with status {rc} and wrote no record"
            if rc is not None and rc < 0:
                reason = f"worker was killed by signal {-rc} and wrote no record"
        tail = log_tail.strip().splitlines()[-1:] if log_tail.strip() else []
        message = reason + (f"; last output: {tail[0][:300]}" if tail else "")
        record = error_record(cell.name, "run", message, wall_s=wall_s, extra={"log_tail": log_tail[-4000:]})
    record.setdefault("labels", {}).update(cell.labels)
    if extra:
        record.update(extra)
    record["launcher_wall_s"] = wall_s
    write_record(path, record)
    return record
