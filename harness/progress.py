"""Progress on stderr while cells run: a line per finished cell, and a live bar on a terminal.

Not a report: what it prints is gone once the run ends; the report (:mod:`harness.report`,
:mod:`harness.report_compact`) renders what the run left.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text

from .judge import is_row
from .record import ResultRecord
from .report import console



def finished_line(rec: ResultRecord, reused: bool = False) -> str:
    """The line streamed as a cell finishes: ``cell: status``, then its validation loss, time and cores (pure)."""
    parts = [f"{rec.cell}: {rec.status.value}"]
    val = rec.retrained.get("val_loss") if rec.ok else None
    if isinstance(val, (int, float)):
        parts.append(f"val loss {val:.7g}")
    if reused:
        parts.append(f"reused (run {rec.run_id})" if rec.run_id else "reused")
    elif rec.launcher_wall_s is not None:
        parts.append(f"{rec.launcher_wall_s:.1f}s")
    slot = rec.slot
    if not reused and slot is not None and slot.cpus:
        parts.append("cpus " + ",".join(str(c) for c in slot.cpus))
    if not reused and slot is not None and slot.gpu is not None:
        parts.append(f"gpu {slot.gpu}")
    # a skipped cell's reason (with the command that makes it run) is said once, under the results; a band
    # member is not a row there, so its line keeps the reason
    said_below = rec.status.value == "skipped" and is_row(rec)
    if not rec.ok and rec.error is not None and rec.status.value not in ("interrupted",) and not said_below:
        parts.append(rec.error.message.splitlines()[0][:160] if rec.error.message else rec.error.kind)
    return "  ".join(parts)


class CellProgress:
    """Progress on stderr while cells run: a line per cell as it finishes (streamed, in the order they end)
    and, on a terminal, a live bar with the cells running now, each one's epoch, and an ETA.

    With ``--no-progress`` (CI logs) only the lines are written; without a terminal and without
    ``--no-progress``, nothing (the tables follow).
    Called from the threads that run cells (``--jobs``): every method takes one lock.
    """

    def __init__(self, total: int, enabled: bool = True) -> None:
        import threading

        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.err = console(stderr=True)
        self.enabled = enabled
        self.live = enabled and self.err.is_terminal
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[note]}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=self.err, disable=not self.live,
                            transient=True)
        self.total = total
        self.done_cells = 0
        self.fractions: dict[str, float] = {}  # running cell -> share of its epochs done
        self.tasks: dict[str, Any] = {}  # running cell -> its bar
        self.lock = threading.RLock()

    def __enter__(self) -> "CellProgress":
        self.bar.__enter__()
        self.cells_task = self.bar.add_task("cells", total=max(self.total, 1), note=f"0/{self.total}")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def _overall(self) -> None:
        completed = self.done_cells + sum(self.fractions.values())
        self.bar.update(self.cells_task, completed=completed, total=max(self.total, 1),
                        note=f"{self.done_cells}/{self.total}")

    def start(self, cell: str) -> None:
        with self.lock:
            self.fractions[cell] = 0.0
            if cell not in self.tasks:
                self.tasks[cell] = self.bar.add_task(f"  {cell}", total=None, note="starting")

    def event(self, ev: dict[str, Any]) -> None:
        with self.lock:
            cell = ev.get("cell")
            task = self.tasks.get(cell) if isinstance(cell, str) else None
            if task is None:
                return
            epochs = ev.get("epochs") if isinstance(ev.get("epochs"), int) else None
            if ev.get("event") == "start":
                self.bar.update(task, total=epochs, completed=0, note=f"epoch 0/{epochs}" if epochs else "")
            elif ev.get("event") == "epoch" and isinstance(ev.get("epoch"), int):
                self.bar.update(task, total=epochs, completed=ev["epoch"],
                                note=f"epoch {ev['epoch']}/{epochs}" if epochs else f"epoch {ev['epoch']}")
                if epochs:
                    self.fractions[cell] = min(1.0, ev["epoch"] / epochs)
                self._overall()

    def done(self, rec: ResultRecord) -> None:
        with self.lock:
            task = self.tasks.pop(rec.cell, None)
            if task is not None:
                self.bar.remove_task(task)
            self.fractions.pop(rec.cell, None)
            self.done_cells += 1
            self._overall()
            self.info(finished_line(rec), "dim" if rec.ok else "yellow")

    def reused(self, rec: ResultRecord) -> None:
        """A cell whose earlier record stands (--resume): said, and left out of the ETA."""
        with self.lock:
            self.total = max(self.total - 1, 0)
            self._overall()
            self.info(finished_line(rec, reused=True))

    def note(self, text: str, style: str = "dim") -> None:
        with self.lock:
            self.err.print(Text(text, style=style))

    def info(self, text: str, style: str = "dim") -> None:
        """A progress line: above the live display, or plain with --no-progress; nothing otherwise (as before)."""
        with self.lock:
            if self.live or not self.enabled:
                self.err.print(Text(text, style=style), soft_wrap=True)
