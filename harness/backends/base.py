"""The one small interface every backend implements (local processes, Docker,
and a Slurm cluster).

:meth:`Backend.run` is the one skeleton: lay out the cell's directory, write
the :class:`~harness.record.RunSpec`, launch, relay the worker's output,
then read the worker's record -- or, when it left none, write the failure
record with the exit status and the log tail. A backend supplies only how to
launch a worker (:meth:`Backend.launch`) and, where its paths differ from the
host's, the spec the worker sees (:meth:`Backend.spec`).
"""

from __future__ import annotations

import json
import os
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from .. import record
from ..errors import ErrorKind, HarnessError
from ..plan import Cell, Job
from ..record import ImageInfo, ResultRecord, RunSpec, Status, read_worker_record
from ..safeio import atomic_write_text, create_no_follow, fresh_dir
from ..worker import EVENT_PREFIX

EventFn = Callable[[dict[str, Any]], None]
LineFn = Callable[[str], None]
TAIL_LINES = 40


@dataclass
class Launch:
    """How a launched worker ended, as the launcher saw it."""

    exit_status: int | None  # None: it never started, or the launcher could not tell
    reason: str | None = None  # a better reason than the exit status, when the launcher has one
    timed_out: bool = False  # the launcher killed it at the job's timeout
    image: ImageInfo | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # fields for the record (host_paths ...)
    # when the worker left no record: what the launcher saw it as (a Slurm job cancelled or out of
    # time is interrupted or timeout, not failed) and where it went wrong (slurm); None: failed, run
    status: Status | None = None
    kind: ErrorKind | None = None


@dataclass(frozen=True)
class CellRefused:
    """A cell that cannot start, decided before it runs (:meth:`Backend.prepare`, a plan's blocked cells).

    ``skip_reason``: this host cannot make what the cell needs (no base image, no wheelhouse and no
    built image): the cell is skipped, and the reason names the command that makes it buildable.
    Otherwise making it failed (its image, its wheelhouse ...): the cell fails alone, with ``error``'s
    line and, for a build, the tail of its log.
    """

    error: HarnessError
    skip_reason: str | None = None
    log_tail: tuple[str, ...] = ()

    @classmethod
    def of(cls, error: HarnessError) -> CellRefused:
        """What ``error`` means for its cell: a missing base image skips it, a failed build carries its log's tail."""
        from ..errors import BaseImageMissing, BuildFailed

        return cls(error, skip_reason=error.skip_reason if isinstance(error, BaseImageMissing) else None,
                   log_tail=tuple(error.log_tail) if isinstance(error, BuildFailed) else ())


def relay(line: str, on_event: EventFn | None, log: TextIO, tail: deque[str]) -> None:
    """Route one line of worker output: progress events to the callback, the rest to the log."""
    if line.startswith(EVENT_PREFIX):
        if on_event is not None:
            try:
                on_event(json.loads(line[len(EVENT_PREFIX):]))
            except ValueError:
                pass
        return
    log.write(line)
    tail.append(line)


def failure_reason(exit_status: int | None, log_tail: str) -> str:
    """Why a worker that left no record failed, from what the launcher saw (pure)."""
    if exit_status is None:
        reason = "the worker never started"
    elif exit_status < 0:
        reason = f"worker was killed by signal {-exit_status} and wrote no record"
    else:
        reason = f"worker exited with status {exit_status} and wrote no record"
    last = log_tail.strip().splitlines()[-1:] if log_tail.strip() else []
    return reason + (f"; last output: {last[0][:300]}" if last else "")


def usable_cpus() -> list[int] | None:
    """The cores this process may run on (its affinity), or None where the OS cannot say."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def timeout_reason(timeout_s: float | None) -> str:
    return f"timed out after {timeout_s:g}s (--timeout {timeout_s:g}); the worker was killed"


class Backend(ABC):
    name = "abstract"

    def prepare(self, cells: list[Cell], job: Job) -> dict[str, CellRefused]:
        """Make what the cells need (images ...). Returns the cells that cannot start, and why; the others go on."""
        return {}

    def expect(self, cells: list[Cell], job: Job) -> None:
        """The cells about to run, in order, told once before the first starts (a backend may start their
        workers or containers ahead of their turn). Nothing by default."""

    def key_inputs(self, cell: Cell, job: Job) -> dict[str, object]:
        """What the cell's cache key adds to its environment and spec (harness.cache): the worker's variables that
        can change its numbers, the files a trainer command names ...; ``never_reused``: why it is never reused.
        Nothing by default."""
        return {}

    def spec(self, cell: Cell, job: Job) -> RunSpec:
        """The spec as the worker sees it; host paths unless the backend maps them."""
        return RunSpec(
            cell=cell.name, bundle_dir=job.bundle_dir, out_dir=str(job.cell_dir(cell)), data_path=job.data_path,
            data_dir=job.data_dir,
            device=cell.device, determinism=cell.determinism, threads=cell.threads, tf32=cell.tf32,
            repeat=cell.repeat, isa=cell.isa, trainer=job.trainer, trainer_path=job.trainer_path,
            trainer_cmd=job.trainer_cmd, trace=job.trace,
            backend=self.name, labels=cell.labels, seed=cell.seed, perturb=cell.perturb, band=cell.band,
            data_feed=job.data_feed, seed_key=job.seed_key, trainer_cwd=job.trainer_cwd,
        )

    def spec_document(self, cell: Cell, job: Job) -> dict[str, Any]:
        """What ``spec.json`` holds (a backend may hand a worker an archived spec unchanged)."""
        return self.spec(cell, job).to_dict()

    def make_cell_dir(self, out: Path) -> None:
        """Create the directory the worker writes into, empty: nothing a previous run left stays.

        A cell's directory is writable by what runs in the cell (a container runs untrusted pickles),
        so the host never follows a link there (:mod:`harness.safeio`): every run starts from a fresh
        directory, ``worker.log`` is created exclusively, ``spec.json`` and ``record.json`` are written
        through a temporary file and ``os.replace`` (which replaces a link rather than writing through
        it), and a record is read only when it is a regular file."""
        fresh_dir(out)

    @abstractmethod
    def launch(self, cell: Cell, job: Job, spec_path: Path, on_line: LineFn) -> Launch:
        """Start the worker on ``spec_path``, feed each output line to ``on_line``, wait for it to end."""

    def close(self) -> None:
        """Release what the backend holds; stop anything still running (Ctrl-C)."""

    def environment_digest(self, cell: Cell) -> str | None:
        """What the cell runs in, for its cache key (an image's id, a local environment's digest); None: unknown."""
        return None

    def host_slots(self) -> tuple[list[int] | None, list[str] | None]:
        """The cores and GPU ids cells may be given (harness.schedule); None where this host cannot tell."""
        return usable_cpus(), None

    def run(self, cell: Cell, job: Job, on_event: EventFn | None = None, cache_key: str | None = None) -> ResultRecord:
        """Run one cell to completion and return its record (also on disk); ``cache_key``: the cell's key
        (harness.cache), which its record carries."""
        launched, log_tail, wall_s = self.execute(cell, job, on_event)
        return self.finish(cell, job, launched, log_tail, wall_s, cache_key)

    def execute(self, cell: Cell, job: Job, on_event: EventFn | None = None) -> tuple[Launch, str, float]:
        """The first half of :meth:`run`: a fresh cell directory, ``spec.json``, the launch, the worker's
        output relayed into ``worker.log``. Returns how it ended, the log's tail and the wall time.
        (The Slurm backend runs this half on the node and :meth:`finish` where it was submitted.)"""
        files = job.cell_paths(cell)
        self.make_cell_dir(files.folder)  # fresh: never read a previous run's record, never follow its links
        atomic_write_text(files.spec, record.dumps(self.spec_document(cell, job)))
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        t0 = time.perf_counter()
        with create_no_follow(files.log) as log:
            launched = self.launch(cell, job, files.spec, lambda line: relay(line, on_event, log, tail))
        return launched, "".join(tail), time.perf_counter() - t0

    def finish(self, cell: Cell, job: Job, launched: Launch, log_tail: str, wall_s: float,
               cache_key: str | None = None) -> ResultRecord:
        """The worker's record, or a failure record when it left none (crash, OOM kill, never started), with what
        the host adds, written once: the cell's key goes with the record before anyone sees it finished."""
        path = job.cell_paths(cell).record
        rec: ResultRecord | None = None
        problem = None
        if launched.timed_out:
            rec = ResultRecord.without_metrics(
                cell.name, Status.TIMEOUT, ErrorKind.TIMEOUT, timeout_reason(job.timeout_s),
                exit_status=launched.exit_status, log_tail=log_tail[-record.LOG_TAIL_CHARS:] or None,
                image=launched.image.tag if launched.image else None)
        else:
            try:
                rec = read_worker_record(path)
            except HarnessError as exc:
                problem = f"the worker's record is unusable: {exc.one_line()}"
        if rec is None:
            rec = ResultRecord.without_metrics(
                cell.name, launched.status or Status.FAILED, launched.kind or ErrorKind.RUN,
                launched.reason or problem or failure_reason(launched.exit_status, log_tail),
                exit_status=launched.exit_status, log_tail=log_tail[-record.LOG_TAIL_CHARS:] or None,
                image=launched.image.tag if launched.image else None)
        elif rec.error is not None and rec.error.log_tail is None and log_tail:
            rec.error.log_tail = log_tail[-record.LOG_TAIL_CHARS:]
        rec.labels = {**rec.labels, **cell.labels}
        if cell.band and rec.band is None:  # a band member that failed is still the band's
            rec.band = cell.band
        rec.backend = self.name
        rec.run_id = job.run_id or rec.run_id
        if launched.image is not None:
            rec.image = launched.image
        for key, value in launched.extra.items():
            setattr(rec, key, value)
        rec.launcher_wall_s = wall_s
        rec.timeout_s = job.timeout_s
        rec.slot = cell.slot.to_record() if cell.slot is not None else None
        rec.warnings.extend(n for n in cell.notes if n not in rec.warnings)
        if cache_key is not None:
            rec.cache_key = cache_key
        record.write(path, rec)
        return rec
