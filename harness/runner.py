"""Running a plan: the steps of ``harness run`` and ``harness matrix``.

load and check the bundle -> plan the cells -> write ``run.json`` -> prepare
the backend (build images) -> run each cell -> judge -> render and write the
reports. Every step is a function here; the CLI only parses its arguments into
:mod:`harness.options`, calls :func:`execute` and maps the outcome to an exit code.

Ctrl-C at any point while cells run leaves a complete picture on disk: the
cells that finished keep their records, the running one gets an
``interrupted`` record, ``report.json`` covers what exists, and the cells that
never started are named (they stay listed in ``run.json``).
"""

from __future__ import annotations

import datetime as _dt
import errno
import functools
import os
import stat
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import __version__, record
from .errors import ErrorKind, HarnessError, InputError, Interrupted, disk_failure
from .judge import Comparison, Tolerances, band_member, compare, unperturbed_weights
from .options import ReportOptions, RunOptions
from .plan import Cell, Job, Plan, band_cells, choose_baseline, make_plan, redraw_cell, with_band, with_cell_seeds
from .record import BandKind, ResultRecord, RunManifest, Status

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

    from .backends.base import Backend, CellRefused
    from .schedule import Slot, SlotPool


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def new_run_id() -> str:
    return f"{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


# --------------------------------------------------------------------------- steps


def load_and_check(opts: RunOptions, weights: bool = True) -> tuple[Any, Any]:
    """Read and validate the bundle and its data; nothing trains before this passes.

    ``weights=False``: the archived weights are checked only once a cell is about to train
    (``--resume`` may reuse every cell, and then torch is never imported)."""
    from . import preflight
    from .bundle import load_bundle

    bundle = load_bundle(opts.bundle, data_override=opts.data, trainer_override=opts.trainer,
                         trainer_path=opts.trainer_path, trainer_cmd_override=opts.trainer_cmd, data_dir=opts.data_dir,
                         seed_key_override=opts.seed_key, trainer_cwd_override=opts.trainer_cwd)
    if opts.strict_config and bundle.trainer is None:
        from .bundle import CONFIG, unknown_config_keys

        unknown = unknown_config_keys(bundle.config, strict=True)
        if unknown:
            it = "it" if len(unknown) == 1 else "them"
            raise InputError(CONFIG, "; ".join(m.removeprefix(f"{CONFIG}: ") for m in unknown)
                             + f"; --strict-config refused {it}",
                             hint=f"rename {it} (or remove {it}), or drop --strict-config to ignore {it} with a warning")
    return bundle, preflight.check(bundle, weights=weights)


def results_dir(out: str | None, bundle_root: str, prefix: str = "") -> Path:
    """``--out``, else ``harness-results/<bundle>-<time>/`` under the working directory."""
    if out:
        return Path(out).resolve()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return (Path.cwd() / "harness-results" / f"{prefix}{Path(bundle_root).name}-{stamp}").resolve()


_WHY_NOT_WRITABLE = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                     errno.EPERM: "permission denied", errno.ENOSPC: "no space left on device",
                     errno.EDQUOT: "disk quota exceeded"}


def _refuse_in_the_way(path: Path) -> InputError:
    """Something is already where the harness creates a file of its own in ``--out``: it is never written
    through (a link there could point anywhere); one line naming it (exit 2)."""
    try:
        link = stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        link = False
    what = "is a symbolic link; the harness never follows a link in --out" if link else \
        "is in the way (not a file of this harness: a hard link, a FIFO, a directory ...); it is not written to"
    return InputError(str(path), what, hint="remove it, or pass another --out")


def check_writable(out: Path) -> None:
    """Create ``out`` and write and remove a probe file in it, before anything trains (exit 2 if that fails).

    The probe is created afresh (``O_EXCL | O_NOFOLLOW``): a link or file planted under its name is refused."""
    probe = out / f".harness-probe-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise _refuse_in_the_way(probe) from None
        try:
            os.write(fd, b"probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        why = _WHY_NOT_WRITABLE.get(exc.errno or 0) or (exc.strerror or str(exc)).lower()
        raise InputError(str(out), f"not writable ({why})", hint="pass --out DIR on a writable disk") from None


LOCK_FILE = ".harness.lock"


class ResultsLock:
    """An exclusive ``flock`` on ``OUT/.harness.lock`` for the whole run: one run per results directory.

    Two runs writing one directory used to report each other's records. The lock is
    not blocking: a second run is refused at once, naming the pid that holds it.
    The kernel drops it when the process ends, however it ends; :meth:`release` also
    removes the file, while it still holds the lock and only when the name is still its file.

    Removing it opens a race the lock must survive: a run that opened the file just before
    its holder removed it would lock a file no longer in the directory, while a third run
    creates a fresh one and locks that. So a lock counts only once the name in the directory
    is the very file locked (same inode); otherwise that file is let go and the name opened
    again. Every step goes through a descriptor of the directory: never through a link, and
    the same directory to the end, whatever is renamed meanwhile.
    """

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_FILE
        self.fd: int | None = None
        self._dir_fd: int | None = None
        try:
            dir_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _refuse_in_the_way(out) from None
            raise InputError(str(out), f"cannot be locked ({exc.strerror})", hint="pass --out DIR on a writable disk") from None
        try:
            fd = self._acquire(out, dir_fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            os.close(dir_fd)
            raise
        self._dir_fd, self.fd = dir_fd, fd

    def _acquire(self, out: Path, dir_fd: int) -> int:
        """A descriptor of the lock file, flock'ed, that is the file named ``LOCK_FILE`` in ``dir_fd``."""
        import fcntl

        for _ in range(100):
            try:  # never through a link planted there: it would be truncated and written (the pid)
                fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644,
                             dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.EISDIR):
                    raise _refuse_in_the_way(self.path) from None
                raise InputError(str(out), f"cannot be locked ({exc.strerror})",
                                 hint="pass --out DIR on a writable disk") from None
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 0:  # its holder removed it since: open the name again
                os.close(fd)
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                os.close(fd)
                raise _refuse_in_the_way(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise InputError(str(out), f"cannot be locked ({exc.strerror})",
                                     hint="pass --out DIR on a local disk") from None
                raise InputError(str(out), f"is in use by another harness run (pid {self._holder()})",
                                 hint="wait for it to finish, or pass another --out") from None
            if _same_file(fd, dir_fd):
                return fd
            os.close(fd)  # it locked a file its holder removed (or that was replaced) after it was opened
        raise InputError(str(out), "cannot be locked (its lock file keeps being replaced)", hint="pass another --out")

    def _holder(self) -> str:
        for _ in range(20):  # the holder writes its pid right after it locks
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                try:
                    pid = os.read(fd, 32).decode("ascii", "replace").strip()
                finally:
                    os.close(fd)
            except OSError:
                pid = ""
            if pid.isdigit():
                return pid
            time.sleep(0.05)
        return "unknown"

    def release(self) -> None:
        """Remove the lock file (still holding it, and only if the name is still this file), then let go."""
        fd, self.fd = self.fd, None
        dir_fd, self._dir_fd = self._dir_fd, None
        try:
            if fd is not None and dir_fd is not None and _same_file(fd, dir_fd):
                try:
                    os.unlink(LOCK_FILE, dir_fd=dir_fd)
                except OSError:
                    pass  # a disk gone read-only, say: the file stays, and the next run locks it as it is
        finally:
            if fd is not None:
                os.close(fd)  # closing the descriptor drops the flock
            if dir_fd is not None:
                os.close(dir_fd)


def _same_file(fd: int, dir_fd: int) -> bool:
    """Whether ``LOCK_FILE`` in the directory ``dir_fd`` is (not a link to) the file open as ``fd``."""
    try:
        named = os.stat(LOCK_FILE, dir_fd=dir_fd, follow_symlinks=False)
        held = os.fstat(fd)
    except OSError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def refuse_another_runs_records(out: Path, resume: bool) -> None:
    """A results directory holding another run's records is refused unless ``--resume`` (exit 2)."""
    if resume:
        return
    held = [p.parent.name for p in sorted(out.glob(f"*/{record.RECORD_FILE}"))]
    if not held and not (out / record.RUN_FILE).exists():
        return
    try:
        manifest = record.read_manifest(out)
    except HarnessError:
        manifest = None
    run = f" (run {manifest.run_id})" if manifest is not None else ""
    cells = f": {', '.join(held[:5])}{' ...' if len(held) > 5 else ''}" if held else ""
    raise InputError(str(out), f"already holds the records of another run{run}{cells}",
                     hint="pass --resume to reuse it (finished cells whose inputs are unchanged are reused, "
                          "the others rerun and their records replaced), or pass another --out")


def make_backend(plan: Plan, *, cold: bool = False) -> Backend:
    """The backend a plan runs on; ``cold`` (``--cold``): local workers start as fresh interpreters, never warm,
    and Docker cells' containers start at their turn, never ahead of it."""
    if plan.backend == "local":
        from .backends.local import LocalBackend

        return LocalBackend(warm=not cold, cold_reason="--cold" if cold else None)
    if plan.backend == "slurm":
        from .backends.slurm import SlurmBackend

        return SlurmBackend(plan.slurm, plan.builds, offline=bool(plan.options and plan.options.offline))
    from .backends.docker import DockerBackend
    from .docker_engine import Engine

    im = plan.options
    return DockerBackend(Engine.connect(), plan.builds, gpus=im.gpus if im else "all", memory=im.memory if im else None,
                         aliases=plan.aliases, offline=bool(im and im.offline), ahead=not cold)


def _log_tail(path: Path, chars: int = 2000) -> str | None:
    from .safeio import tail_no_follow  # a cell may have left a link there

    return tail_no_follow(path, chars)


@dataclass
class Outcome:
    """What a run left: the records in plan order, the planned cells that have none, and the reused ones."""

    records: list[ResultRecord]
    missing: list[str]
    reused: dict[str, str] = field(default_factory=dict)  # cell -> run id of the earlier run whose record stands


def _is_input_stop(rec: ResultRecord) -> bool:
    """The worker found bad input (the bundle, its data): every cell would fail the same way."""
    return not rec.ok and rec.error is not None and rec.error.kind in (ErrorKind.INPUT, ErrorKind.USAGE)


def run_cells(plan: Plan, backend: Backend, job: Job, progress: Any, *, jobs: int = 1, cache: Any = None) -> Outcome:
    """Run every runnable cell, up to ``jobs`` at once (harness.schedule); a failed cell does not stop the others.

    Skipped and blocked cells get their records without starting. With ``cache``
    (harness.cache.CellCache) every record carries its cell's key, and when ``cache.reuse``
    a finished record whose key is unchanged stands for its cell, which is not rerun.
    Ctrl-C writes an ``interrupted`` record for every running cell and raises
    :class:`Interrupted` with the outcome so far attached (``exc.outcome``); cells not
    started stay missing.
    """
    return _CellRun(plan, backend, job, progress, jobs, cache).run()


class _CellRun:
    """One :func:`run_cells`, step by step: the cells that never start, the finished ones reused, then
    the loop that starts what fits and collects what finished, and the interrupt path."""

    def __init__(self, plan: Plan, backend: Backend, job: Job, progress: Any, jobs: int, cache: Any) -> None:
        self.plan, self.backend, self.job, self.progress = plan, backend, job, progress
        self.jobs, self.cache = jobs, cache
        self.records: dict[str, ResultRecord] = {}
        self.reused: dict[str, str] = {}  # cell -> run id of the earlier run whose record stands
        self.keys: dict[str, str] = {}  # cell -> its cache key
        self.waiting: list[Cell] = []  # in plan order; a cell to run again goes first
        self.running: dict[Future[tuple[ResultRecord, bool]], tuple[Cell, Slot, float]] = {}
        self.rerun_alone: dict[str, str] = {}  # cells that ran out of GPU memory beside others, and run again alone
        self.stop: ResultRecord | None = None  # a worker found bad input: nothing more starts
        self.executor: ThreadPoolExecutor | None = None
        self.pool: SlotPool  # once the cells to run are known (:meth:`get_ready`)

    def run(self) -> Outcome:
        self.keep_skipped()
        try:
            self.waiting = self.refuse_blocked()
            self.keys.update(cell_keys(self.waiting, self.backend, self.job, self.cache))
            self.reuse_finished()
            self.get_ready()
            self.run_waiting()
            self.stop_on_bad_input()
        except KeyboardInterrupt as stop_signal:
            raise self.interrupted(stop_signal) from None
        finally:
            self.backend.close()
            if self.executor is not None:
                self.executor.shutdown(wait=False, cancel_futures=True)
        return self.outcome()

    # ------------------------------------------------------------------ records

    def keep(self, cell: Cell, rec: ResultRecord) -> None:
        """A record the runner made (or completed): the run's, the cell's labels and band, written."""
        rec.run_id = self.job.run_id
        rec.labels = {**cell.labels, **rec.labels}
        if cell.band and rec.band is None:
            rec.band = cell.band
        self.records[cell.name] = rec
        try:
            record.write(self.job.cell_dir(cell) / record.RECORD_FILE, rec)
        except OSError as exc:
            disk = disk_failure(exc)
            if disk is None:
                raise
            rec.warnings.append(f"record.json could not be written: {disk}")

    def outcome(self) -> Outcome:
        cells = self.plan.cells
        return Outcome([self.records[c.name] for c in cells if c.name in self.records],
                       [c.name for c in cells if c.name not in self.records], dict(self.reused))

    def work(self, cell: Cell) -> tuple[ResultRecord, bool]:
        """One cell, in a worker thread: its record, and True when the runner must write it."""
        try:
            return self.backend.run(cell, self.job, self.progress.event, cache_key=self.keys.get(cell.name)), False
        except OSError as exc:
            disk = disk_failure(exc)
            if disk is None:
                raise
            # The disk filled up (or went read-only) under the cell: its row says so.
            return ResultRecord.without_metrics(cell.name, Status.FAILED, ErrorKind.DISK, disk,
                                                backend=self.backend.name, started_at=now_utc()), True

    # ------------------------------------------------------------------ before any cell starts

    def keep_skipped(self) -> None:
        """The cells this host cannot run get their records; the runnable ones' warnings are said."""
        for c in self.plan.skipped:
            self.keep(c, ResultRecord.without_metrics(c.name, Status.SKIPPED, ErrorKind.SKIPPED,
                                                      c.skip_reason or "skipped",
                                                      backend=self.backend.name, started_at=now_utc()))
        for c in self.plan.runnable:
            if c.warning:
                self.progress.note(f"! {c.name}: {c.warning}", "yellow")

    def refuse_blocked(self) -> list[Cell]:
        """The backend makes what the cells need; the cells that cannot start (the plan's blocked ones, what
        ``prepare`` refused) get their records. Returns the others, in plan order."""
        from .backends.base import CellRefused

        plan, runnable = self.plan, self.plan.runnable
        # A wheelhouse cell given no wheelhouse is not blocked when its image is already built: the
        # backend uses harness:<cell> as found (or skips the cell when there is none).
        blocked: dict[str, CellRefused] = {
            name: CellRefused.of(exc) for name, exc in plan.blocked.items()
            if not any(c.name == name and c.image is not None and c.image.name in plan.aliases for c in runnable)}
        blocked.update(self.backend.prepare([c for c in runnable if c.name not in blocked], self.job))
        for cell in runnable:
            if cell.name not in blocked:
                continue
            self.progress.start(cell.name)
            rec = refused_record(cell.name, blocked[cell.name], self.backend.name)
            self.keep(cell, rec)
            self.progress.done(rec)
        return [c for c in runnable if c.name not in blocked]

    def reuse_finished(self) -> None:
        """With ``--resume``: a finished record whose key is unchanged stands for its cell, which does not run."""
        if self.cache is None or not self.cache.reuse:
            return
        from .cache import reusable

        for cell in list(self.waiting):
            key = self.keys.get(cell.name)
            found = reusable(self.job.cell_dir(cell), cell.name, key) if key is not None else None
            if found is not None:
                self.records[cell.name] = found
                self.reused[cell.name] = found.run_id or ""
                self.waiting.remove(cell)
                getattr(self.progress, "reused", self.progress.done)(found)
        if self.reused:
            start(self.plan, self.job, self.job.bundle_dir, self.reused)  # run.json names the records it takes

    def get_ready(self) -> None:
        """What must hold before a cell trains is checked, the backend told which cells will run, and the host's
        cores and GPUs pooled for them (``jobs``)."""
        from .schedule import SlotPool

        waiting = self.waiting
        if waiting and self.cache is not None and self.cache.before_run is not None:
            self.cache.before_run()  # what was left unchecked in case nothing had to train (the weights)
        if waiting:
            self.backend.expect(list(waiting), self.job)  # the cells that will run, in order (local: warm servers)
        self.pool = SlotPool(*self.backend.host_slots(), self.jobs) if self.jobs != 1 else SlotPool(None, None, 1)
        if self.pool.pinning and len(waiting) > 1:
            at_once = self.pool.most_at_once([(c.device, c.threads) for c in waiting])
            getattr(self.progress, "info", self.progress.note)(
                f"jobs: up to {at_once} cell(s) at once on {self.pool.n_cores} core(s), each on cores of its own")

    # ------------------------------------------------------------------ while cells run

    def run_waiting(self) -> None:
        """Start what fits, collect what finished, until no cell waits or runs (or, after bad input, none runs)."""
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        executor = self.executor = ThreadPoolExecutor(max_workers=max(1, len(self.waiting)),
                                                      thread_name_prefix="harness-cell")
        order = [c.name for c in self.plan.runnable]
        while self.waiting or self.running:
            self.start_what_fits(self.skip_band_members(), executor)
            if not self.running:
                break
            done, _ = wait(list(self.running), timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in sorted(done, key=lambda f: order.index(self.running[f][0].name)):
                self.collect(fut)

    def skip_band_members(self) -> list[Cell]:
        """The waiting cells that may start now; the band members the band's probes showed are not worth
        running get their skipped records (a skip may decide the next one)."""
        while True:
            ready, skips = band_gates(self.waiting, self.records, self.plan.cells)
            if not skips:
                return ready
            for cell in [c for c in self.waiting if c.name in skips]:
                self.waiting.remove(cell)
                self.progress.start(cell.name)
                self.keep(cell, ResultRecord.without_metrics(cell.name, Status.SKIPPED, ErrorKind.SKIPPED,
                                                             skips[cell.name],
                                                             backend=self.backend.name, started_at=now_utc()))
                self.progress.done(self.records[cell.name])

    def start_what_fits(self, ready: list[Cell], executor: ThreadPoolExecutor) -> None:
        """The ready cells the pool has room for start, each on its slot; nothing starts after bad input."""
        from .schedule import Slot, next_to_start

        pool = self.pool
        starts = next_to_start(ready, pool) if self.stop is None else []
        if self.stop is None and not starts and not self.running and ready:
            starts = [(ready[0], Slot())]  # nothing fits an idle host (e.g. no GPU id to give): run it as is
            pool.running += 1
        for cell, slot in starts:
            self.waiting.remove(cell)
            self.progress.start(cell.name)
            placed = replace(cell, slot=slot) if pool.pinning else cell
            self.running[executor.submit(self.work, placed)] = (cell, slot, time.perf_counter())

    def collect(self, fut: Future[tuple[ResultRecord, bool]]) -> None:
        """A finished cell: its slot given back and its record kept. One that ran out of GPU memory beside other
        cells runs again, alone, and no cell shares a GPU from then on; a worker that found bad input stops
        anything more from starting."""
        cell, slot, _t0 = self.running.pop(fut)
        pool = self.pool
        pool.give_back(slot, cell.device)
        rec, unwritten = fut.result()
        if slot.gpu_shared > 1 and cell.name not in self.rerun_alone and _out_of_gpu_memory(rec):
            # It ran out of GPU memory beside other cells: no cell shares a GPU from now on,
            # and this one runs again, alone; its record says so.
            why = f"{cell.name} ran out of GPU memory sharing its GPU with {slot.gpu_shared - 1} other cell(s)"
            pool.alone_on_gpus(why)
            self.rerun_alone[cell.name] = why
            self.progress.note(f"! {why}: it runs again alone, and no cells share a GPU for the rest of this run",
                               "yellow")
            self.waiting.insert(0, replace(cell, notes=(*cell.notes, f"ran again alone on its GPU: {why}")))
            return
        if rec.gpu_memory and slot.gpu is not None and pool.size_gpus(rec.gpu_memory.to_dict(), slot.gpu_shared == 1):
            getattr(self.progress, "info", self.progress.note)(f"gpu: up to {pool.per_gpu} cell(s) share a GPU "
                                                               f"({pool.per_gpu_why})")
        if unwritten:
            self.keep(cell, rec)
        else:
            self.records[cell.name] = rec
        self.progress.done(rec)
        if _is_input_stop(rec) and self.stop is None:
            self.stop = rec  # start nothing more; the cells running now end as they will

    # ------------------------------------------------------------------ how it ends

    def stop_on_bad_input(self) -> None:
        """The worker found bad input (the bundle, its data): every cell would fail the same way, so the run
        stops, keeps what ran and exits 2 (after the report of what ran: execute_plan)."""
        if self.stop is not None and self.stop.error is not None:
            refused = InputError("", self.stop.error.message)
            refused.outcome = self.outcome()  # type: ignore[attr-defined]
            raise refused

    def interrupted(self, stop_signal: KeyboardInterrupt) -> Interrupted:
        """Ctrl-C (or SIGTERM): every running cell is stopped and gets an ``interrupted`` record, unless it had
        just finished; the error to raise carries the outcome so far."""
        from concurrent.futures import wait

        self.backend.close()  # every running worker or container is stopped
        if self.running:
            wait(list(self.running), timeout=60)  # their threads end once their workers are gone
        how = "terminated (SIGTERM)" if type(stop_signal).__name__ == "Terminated" else "interrupted (Ctrl-C)"
        for fut, (cell, _slot, t0) in self.running.items():
            finished = fut.done() and fut.exception() is None and fut.result()[0].ok
            if finished:  # it ended just as the signal came: its record stands
                self.records[cell.name] = fut.result()[0]
                continue
            self.keep(cell, ResultRecord.without_metrics(
                cell.name, Status.INTERRUPTED, ErrorKind.INTERRUPTED,
                f"{how} after {time.perf_counter() - t0:.1f}s; the run was stopped",
                backend=self.backend.name, started_at=now_utc(), log_tail=_log_tail(self.job.cell_paths(cell).log)))
        got = self.outcome()
        exc = Interrupted(f"interrupted; {len(got.records)} record(s) kept in {self.job.results_dir}",
                          hint=("cells not run: " + ", ".join(got.missing)) if got.missing else None)
        exc.outcome = got  # type: ignore[attr-defined]
        return exc


def refused_record(cell: str, refused: CellRefused, backend: str) -> ResultRecord:
    """The record of a cell that cannot start. This host cannot build it (no base image, no wheelhouse and no
    built image): skipped, with the command that makes it buildable. Making what it needs failed (its image,
    its wheelhouse, its base image): it fails alone, a build with its log's tail."""
    if refused.skip_reason:
        return ResultRecord.without_metrics(cell, Status.SKIPPED, ErrorKind.SKIPPED, refused.skip_reason,
                                            backend=backend, started_at=now_utc())
    return ResultRecord.without_metrics(cell, Status.FAILED, ErrorKind.IMAGE, refused.error.one_line(),
                                        backend=backend, started_at=now_utc(),
                                        log_tail="\n".join(refused.log_tail) or None)


def _out_of_gpu_memory(rec: ResultRecord) -> bool:
    """The cell failed because its GPU ran out of memory (torch's OutOfMemoryError, or CUDA's own words)."""
    if rec.ok or rec.error is None:
        return False
    text = f"{rec.error.message}\n{rec.error.log_tail or ''}\n{rec.error.traceback or ''}".lower()
    return "outofmemoryerror" in text or "cuda out of memory" in text or "cuda_error_out_of_memory" in text


def band_gates(waiting: list[Cell], records: dict[str, ResultRecord],
               cells: list[Cell]) -> tuple[list[Cell], dict[str, str]]:
    """The waiting cells that may start now, and the band members not to run at all, with why.

    A band's first members are its probes (:func:`harness.band.gate`): the others wait for
    them, so a trainer the perturbation cannot reach, or a seed that does not reach the
    trainer, costs one or two retrains, not the whole band.
    """
    from .band import gate

    ready: list[Cell] = []
    skip: dict[str, str] = {}
    for cell in waiting:
        b = cell.band
        if b is None or b.kind not in (BandKind.ULP, BandKind.SEED):
            ready.append(cell)
            continue
        of = (cell.labels or {}).get("band_of")
        mine = [c for c in cells if c.band is not None and c.band.kind == b.kind and (c.labels or {}).get("band_of") == of]
        planned = [c.band.member for c in mine if c.band]
        finished = {c.band.member: band_member(records[c.name]) for c in mine if c.band and c.name in records}
        what, why = gate(b.kind.value, b.member, planned, finished)
        if what == "run":
            ready.append(cell)
        elif what == "skip" and why is not None:
            skip[cell.name] = why
    return ready, skip


def cell_keys(cells: list[Cell], backend: Backend, job: Job, cache: Any) -> dict[str, str]:
    """Each cell's cache key (harness.cache), for the cells whose environment the backend can name.

    The backend's ``key_inputs`` add what else can change the cell's numbers: the
    worker's environment, the files a trainer command names. A cell they cannot key is left out (it is
    never reused). With ``--resume``, each finished cell that reruns is said, with what changed."""
    if cache is None:
        return {}
    keys = {}
    said: list[str] = []
    for cell in cells:
        env = backend.environment_digest(cell)
        if not env:
            continue
        inputs = dict(backend.key_inputs(cell, job))
        never = inputs.pop("never_reused", None) if inputs else None
        if never is not None:
            said.append(f"{cell.name}: never reused: {never}")
            continue
        keys[cell.name] = cache.key(env, backend.spec_document(cell, job), inputs)
        cache.remember(job.results_dir, keys[cell.name])  # for a later --resume to say what changed
        why = cache.why_rerun(job.results_dir, job.cell_dir(cell), cell.name, keys[cell.name]) if cache.reuse else None
        if why is not None:
            said.append(f"{cell.name}: rerun: {why}")
    if said and cache.reuse:
        from rich.text import Text

        from .report import console

        err = console(stderr=True)
        for line in said:
            err.print(Text(line, style="yellow"), soft_wrap=True)
    return keys


def recorded_environment(bundle_dir: str | None) -> dict[str, Any] | None:
    """What the bundle's trial_info.yaml recorded of the trial's environment (None when nothing, or unreadable)."""
    if not bundle_dir:
        return None
    from .bundle import TRIAL_INFO, load_yaml, parse_trial_info

    path = Path(bundle_dir) / TRIAL_INFO
    try:
        return parse_trial_info(load_yaml(path, TRIAL_INFO)).environment or None if path.is_file() else None
    except (HarnessError, OSError):
        return None  # the run already said what is wrong with it


def recorded_environment_of(records: list[ResultRecord]) -> dict[str, Any] | None:
    """The trial's environment as the records carry it (``recorded.environment``): what ``compare`` shows
    without the bundle at hand."""
    for rec in records:
        env = (rec.recorded or {}).get("environment")
        if isinstance(env, dict) and env:
            return env
    return None


def _show(records: list[ResultRecord], missing: list[str], comparison: Comparison, detail: bool,
          trial_env: dict[str, Any] | None, parts: dict[str, str], causes: dict[str, str],
          bundle_dir: str | None, reused: dict[str, str] | None) -> None:
    """The terminal report on stdout: what to do when nothing ran, every table (--detail), or the first screen."""
    from .report import console, print_report

    if records and not missing and all(r.status is Status.SKIPPED for r in records):
        print_nothing_ran(console(), records, bundle_dir)
    elif detail:
        print_report(console(), records, comparison, trial_environment=trial_env, parts_at=parts, causes=causes,
                     reused=reused)
    else:
        from .report_compact import print_compact

        print_compact(console(), records, comparison, trial_environment=trial_env, parts_at=parts, causes=causes,
                      reused=reused)
    if reused:
        console().print(f"Reused {len(reused)} of {len(records)} cell(s) from earlier runs (inputs unchanged; "
                        f"--force reruns them): {', '.join(reused)}", soft_wrap=True, markup=False, highlight=False)


def render(records: list[ResultRecord], missing: list[str], tol: Tolerances, results: Path | None,
           report_opts: ReportOptions, bundle_dir: str | None = None, reused: dict[str, str] | None = None) -> Comparison:
    """Judge, print (on stdout unless ``report_opts.show`` is off), and write the reports (``report.json`` in the
    results directory, --json, --markdown)."""
    from .report import console, json_report, markdown

    comparison = compare(records, tol, missing, allow_data_change=report_opts.allow_data_change,
                         alpha=report_opts.alpha)
    trial_env = recorded_environment(bundle_dir) or recorded_environment_of(records)
    roots = [results] if results is not None else [Path(p) for p in report_opts.trace_dirs]
    traces = read_traces(records, roots) if roots else {}
    parts, causes = parting(records, traces)
    if report_opts.show:  # harness.api leaves stdout to its caller unless asked: it has the comparison
        _show(records, missing, comparison, report_opts.detail, trial_env, parts,
              {k: f.short for k, f in causes.items()}, bundle_dir, reused)
    report = record.dumps(json_report(records, comparison, causes={k: f.to_dict() for k, f in causes.items()}))
    if results is not None:
        try:
            record.atomic_write_text(results / "report.json", report)
        except OSError as exc:
            disk = disk_failure(exc)
            if disk is None:
                raise
            console(stderr=True).print(f"[bold red]! report.json could not be written: {disk}[/bold red]")
    if report_opts.json_out:
        record.atomic_write_text(report_opts.json_out, report)
    if report_opts.markdown:
        record.atomic_write_text(report_opts.markdown, markdown(
            records, comparison, bundle=Path(bundle_dir).name if bundle_dir else None, trial_environment=trial_env,
            causes={k: f.short for k, f in causes.items()}))
    if results is not None:
        console(stderr=True).print(f"[dim]records: {results}[/dim]")
    if report_opts.html:  # last: a page that cannot be written leaves every record and report above
        from .report_html import write_run_page

        write_run_page(report_opts, records, comparison, results, bundle_dir, trial_env, traces, parts,
                       {k: f.short for k, f in causes.items()})
    return comparison


def read_traces(records: list[ResultRecord], roots: list[Path]) -> dict[str, Any]:
    """Each cell's parsed ``trace.jsonl`` from the first root that holds ``ROOT/<cell>/trace.jsonl``: a Trace,
    the reason it was refused (a link, too large, malformed), or None without one. Never follows a link, not
    even ``ROOT/<cell>`` (harness.safeio), and streams the file line by line (harness.diverge.read_trace)."""
    from .diverge import TRACE_FILE, read_trace

    out: dict[str, Any] = {}
    for rec in records:
        if not (rec.trace and rec.trace.file) or "/" in rec.cell or rec.cell in ("", ".", ".."):
            out[rec.cell] = None
            continue
        found: Any = None
        for root in roots:
            path = root / rec.cell / TRACE_FILE
            try:
                found = read_trace(path, within=root)
            except HarnessError as exc:
                found = exc.one_line()
            if found is not None:
                break
        out[rec.cell] = found
    return out


def parting(records: list[ResultRecord], traces: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """The Results table's "parts at" column (from the traces; {} without them), and why each cell parts
    from the first (harness.causes.Finding), where its settings and traces support a class."""
    from .causes import classify
    from .diverge import Trace, diverge, parts_at_column

    cells = [r for r in records if not r.band and r.ok]
    parts = parts_at_column(traces, [r.cell for r in records if not r.band])
    causes: dict[str, Any] = {}
    if cells:
        first = cells[0]
        for rec in cells[1:]:
            ta, tb = traces.get(first.cell), traces.get(rec.cell)
            d = diverge(ta, tb, {}, {}) if isinstance(ta, Trace) and isinstance(tb, Trace) else None
            found = classify(first, rec, d)
            if found is not None:
                causes[rec.cell] = found
    return parts, causes


def print_nothing_ran(out: Any, records: list[ResultRecord], bundle_dir: str | None = None) -> None:
    """No cell could run here: one short message of what to do, not a table of skips.

    Reasons alike (the same first words: "base image ...", "no wheelhouse ...") are said
    once, with their count and one cell's full reason as the example.
    """
    groups: dict[str, list[ResultRecord]] = {}
    for r in records:
        reason = r.error.message if r.error else "skipped"
        groups.setdefault(" ".join(reason.split()[:2]), []).append(r)
    out.print(f"[bold]No cell could run on this host[/bold] ({len(records)} skipped). To run some:", soft_wrap=True)
    for same in groups.values():
        first = same[0]
        more = f" (and {len(same) - 1} more cell(s) alike)" if len(same) > 1 else ""
        out.print(f"  {first.cell}: {first.error.message if first.error else 'skipped'}{more}",
                  soft_wrap=True, markup=False, highlight=False)
    bundle = bundle_dir or "BUNDLE"
    out.print(f"  or retrain with this machine's own torch: `harness matrix {bundle} --backend local`",
              soft_wrap=True, markup=False, highlight=False)


def start(plan: Plan, job: Job, bundle_root: str, reused: dict[str, str] | None = None) -> None:
    """Write ``run.json`` (the planned cells, in order) before any cell runs; again, naming the reused records."""
    Path(job.results_dir).mkdir(parents=True, exist_ok=True)
    record.write_manifest(job.results_dir, RunManifest(
        run_id=job.run_id, cells=[c.name for c in plan.cells], backend=plan.backend, bundle=bundle_root,
        started_at=now_utc(), harness_version=__version__, band_from=job.band_from, reused=dict(reused or {})))


def load_band(path: str, bundle: Any, data_sha256: str | None) -> list[ResultRecord]:
    """The band members saved in ``path`` (``--band-from``), refused in one line unless measured for this bundle.
    Its files are read as hostile input (record.load: no link followed, no FIFO opened, sizes capped)."""
    from .bundle import config_digest
    from .judge import band_conflict

    found = record.load(path, follow_band=False)
    members = [r for r in found.records if r.band]
    hint = f"measure one for this bundle: `harness band {bundle.root} -o DIR`, or --band 8"
    if not members:
        raise InputError(path, "holds no band records", hint=hint)
    why = band_conflict(members, config_digest(bundle.config), data_sha256,
                        bundle.trainer.entrypoint if bundle.trainer else None)
    if why:
        raise InputError(path, f"is not a band of this bundle: {why}", hint=hint)
    return members


@dataclass(frozen=True)
class AutoBands:
    """``--band auto`` and ``--band-seeds auto``: the bands to measure after the cells, only when a cell differs
    from its reference beyond what the bands measured so far can judge."""

    n_ulp: int  # ulp members, when a difference is small enough to be numerical noise and none was measured
    n_seed: int  # seed members, when a difference remains and no seed band was measured
    training_seed: int
    trial_environment: dict[str, Any] | None = None


# A cell every metric of which is within this relative difference of its reference may differ by numerical
# noise alone (one trajectory's rounding reaches about 1e-6 in the examples; another seed moves them by 1e-2
# and more): measuring the ulp band first can then show it numerically equal. This decides what is measured,
# never a verdict.
PLAUSIBLY_NUMERICAL = 1e-4


def _plausibly_numerical(cell: Any) -> bool:
    """Every metric of ``cell`` within PLAUSIBLY_NUMERICAL of its reference's value (relative)."""
    lad = cell.ladder
    if lad is None or not lad.metrics:
        return False
    return all(m.delta is not None and m.reference is not None
               and abs(m.delta) <= PLAUSIBLY_NUMERICAL * max(abs(m.reference), 1e-12) for m in lad.metrics.values())


def _auto_band_plan(plan: Plan, auto: AutoBands, records: list[ResultRecord], report_opts: ReportOptions,
                    tol: Tolerances) -> tuple[Plan, str] | None:
    """The band members to run now (and why, in one line), or None when the cells need none."""
    from .judge import TRIAL, Verdict
    from .ladder import Rung

    comparison = compare(records, tol, allow_data_change=report_opts.allow_data_change, alpha=report_opts.alpha)
    band = comparison.band
    # a cell trained on other data than the trial is not comparable: no band would make it so
    judged = [c for c in comparison.cells if c.verdict is not Verdict.NOT_COMPARABLE]
    # beyond float32 rounding by so little that an ulp band could show them numerically equal
    small = [c for c in judged if c.rung in (Rung.DIFFERS, Rung.SAME) and _plausibly_numerical(c)]
    differing = [c for c in judged if c.rung is Rung.DIFFERS]
    # once: an ulp band that ran but measured nothing (every member unperturbed, or rounded away) is not run again
    ulp_ran = band is not None and any(m.kind == "ulp" for m in band.members)
    if auto.n_ulp and (band is None or not band.measured) and small and not ulp_ran:
        n_ulp, n_seed, what, differing = auto.n_ulp, 0, "the numerical noise (ulp band)", small
    elif differing and auto.n_seed and (band is None or band.n_seed < 2):
        n_ulp, n_seed, what = 0, auto.n_seed, "the seed band"
    else:
        return None
    cells = [c for c in plan.runnable if not c.band]
    # The bands describe where the trial ran: a cell that reproduces the trial to numerical noise when one
    # does, else the cell the trial's recorded environment names.
    equal = [c.cell for c in comparison.cells if c.ladder is not None and c.ladder.reference == TRIAL
             and c.rung in (Rung.BITWISE, Rung.EQUAL)]
    base = next((c for c in cells if c.name in equal), None) or choose_baseline(cells, auto.trial_environment)
    if base is None:
        return None
    members = band_cells(base, n_ulp, n_seed, auto.training_seed)

    blocked = {m.name: plan.blocked[base.name] for m in members if base.name in plan.blocked}
    took = next((r.launcher_wall_s or r.wall_s for r in records if r.cell == base.name and r.ok), None)
    n = n_ulp + n_seed
    cost = f", about {n} x {took:.0f} s" if took else ""
    flag = "--band" if n_ulp else "--band-seeds"
    why = (f"{len(differing)} cell(s) differ from their reference beyond {'float32 rounding' if n_ulp else 'numerical noise'}"
           f": measuring {what} to judge them: {n} retrains of {base.name}{cost} ({flag} 0 skips this; "
           f"{flag} N measures it up front)")
    return replace(plan, cells=members, blocked=blocked), why


REDRAW_ROUNDS = 3  # a member drawn again whose change is rounded away again is drawn once more, and so on, this often


def redraw_plan(plan: Plan, records: list[ResultRecord]) -> tuple[Plan, str] | None:
    """The ulp members to draw again, in place of those whose one-ulp change training rounded away (and why, in
    one line), or None when there are none.

    Such a member trained the unperturbed run's weights (:func:`harness.band.absorbed`): it measures no
    numerical noise, and the band leaves it out. Each is replaced once by a member with a fresh change, at
    most as many in all as the band planned, so a model that rounds every change away costs one round.
    """
    from .band import REDRAW_OF, absorbed

    ulp = [r for r in records if r.band_kind is BandKind.ULP]
    copies = absorbed([band_member(r) for r in ulp], unperturbed_weights(records))
    cells = {c.name: c for c in plan.cells}
    ulp_cells = [c for c in plan.cells if c.band is not None and c.band.kind is BandKind.ULP]
    replaced = {c.labels.get(REDRAW_OF) for c in ulp_cells} | {r.labels.get(REDRAW_OF) for r in ulp}
    budget = sum(1 for c in ulp_cells if REDRAW_OF not in c.labels) - sum(1 for c in ulp_cells if REDRAW_OF in c.labels)
    todo = [cells[name] for name in copies if name not in replaced and name in cells][:max(budget, 0)]
    if not todo:
        return None
    numbers = [c.band.member for c in ulp_cells if c.band] + [r.band.member for r in ulp if r.band]
    first = max(numbers, default=0) + 1
    members = [redraw_cell(c, first + i) for i, c in enumerate(todo)]
    pairs = ", ".join(f"{m.name} for {c.name}" for c, m in zip(todo, members))
    why = (f"{len(todo)} ulp member(s) trained the unperturbed run's weights (the one-ulp change was rounded away in "
           f"training): drawing again: {pairs}")
    return replace(plan, cells=members, blocked={}), why


def execute_plan(plan: Plan, backend: Backend, job: Job, report_opts: ReportOptions, tol: Tolerances,
                 progress_enabled: bool = True, extra_records: list[ResultRecord] | None = None, *,
                 jobs: int = 1, cache: Any = None, auto_bands: AutoBands | None = None) -> Comparison:
    """Run a plan on a backend (``jobs`` cells at once; ``cache``: harness.cache.CellCache) and judge it;
    on Ctrl-C, judge and report what exists, then re-raise. With ``auto_bands``, the bands a cell needs
    to be judged follow the cells: the ulp band, then the seed band."""
    from .progress import CellProgress
    from .report import console

    start(plan, job, job.bundle_dir)
    before = list(extra_records or [])
    outcome = Outcome([], [])

    def follow(more: tuple[Plan, str], ahead: bool) -> None:
        """Run ``more``'s cells after those run so far (listed in run.json ahead of them or after), and say why."""
        nonlocal plan, outcome
        extra_plan, why = more
        console(stderr=True).print(f"[dim]{why}[/dim]", soft_wrap=True)
        cells = extra_plan.cells + plan.cells if ahead else plan.cells + extra_plan.cells
        plan = replace_cells(plan, cells, extra_plan.blocked)
        start(plan, job, job.bundle_dir, outcome.reused)  # run.json lists them too
        with CellProgress(len(extra_plan.runnable), enabled=progress_enabled) as progress:
            extra = run_cells(extra_plan, backend, job, progress, jobs=jobs, cache=cache)
        first, then = (extra, outcome) if ahead else (outcome, extra)
        outcome = Outcome(first.records + then.records, first.missing + then.missing, {**outcome.reused, **extra.reused})

    def redraw() -> None:
        for _ in range(REDRAW_ROUNDS):
            more = redraw_plan(plan, before + outcome.records)
            if more is None:
                return
            follow(more, ahead=False)

    try:
        with CellProgress(len(plan.runnable), enabled=progress_enabled) as progress:
            outcome = run_cells(plan, backend, job, progress, jobs=jobs, cache=cache)
        redraw()
        for _ in range(2):  # the ulp band, then the seed band, each only when still needed
            more = _auto_band_plan(plan, auto_bands, before + outcome.records, report_opts, tol) if auto_bands else None
            if more is None:
                break
            follow(more, ahead=True)
            redraw()
    except Interrupted as exc:
        got: Outcome = exc.outcome  # type: ignore[attr-defined]
        try:
            render(before + got.records, got.missing, tol, Path(job.results_dir), report_opts, bundle_dir=job.bundle_dir,
                   reused=got.reused)
        except HarnessError:
            pass  # the interrupt is what the user needs to hear about
        raise
    except InputError as exc:
        # A cell's worker refused the input (exit 2): the records that exist are reported as on any
        # other path (the table, report.json), then the one line and exit 2.
        got = getattr(exc, "outcome", None)
        if got is None:
            raise
        try:
            render(before + got.records + outcome.records, got.missing + outcome.missing, tol, Path(job.results_dir),
                   report_opts, bundle_dir=job.bundle_dir, reused={**outcome.reused, **got.reused})
        except HarnessError:
            pass  # the refusal is what the user needs to hear about
        raise
    return render(before + outcome.records, outcome.missing, tol, Path(job.results_dir), report_opts,
                  bundle_dir=job.bundle_dir, reused=outcome.reused)


def replace_cells(plan: Plan, cells: list[Cell], blocked: dict[str, Any]) -> Plan:

    return replace(plan, cells=cells, blocked={**plan.blocked, **blocked})


def execute(opts: RunOptions, report_opts: ReportOptions, tol: Tolerances,
            on_results_dir: Callable[[Path], None] | None = None) -> Comparison:
    """``harness run`` / ``harness matrix``: every step, from the bundle to the verdict.

    ``on_results_dir`` is told the results directory once this run holds it (the CLI says how to resume it)."""
    from .report import console

    deferred = opts.resume and not opts.force
    bundle, pre = load_and_check(opts, weights=not deferred)
    err = console(stderr=True)
    for w in pre.warnings:
        loud = "MISMATCH" in w or "not a key the reference trainer reads" in w
        err.print(f"[bold red]! {w}[/bold red]" if loud else f"[yellow]! {w}[/yellow]", soft_wrap=True)
    plan = make_plan(opts)
    band = load_band(opts.band_from, bundle, pre.data_sha256) if opts.band_from else []
    if opts.cell_seeds and opts.band_from:  # the cells' seeds pair with the band's: refused before anything trains
        have = sum(1 for r in band if r.ok and r.band_kind is BandKind.SEED)
        if have < opts.cell_seeds:
            raise InputError(opts.band_from, f"holds {have} seed member(s); --cell-seeds {opts.cell_seeds} pairs each "
                             "cell's seeds with as many of the band's",
                             hint=f"measure them: `harness band {bundle.root} --band-seeds {opts.cell_seeds} -o DIR`")
    trial_env = recorded_environment(bundle.root)
    if opts.band or opts.band_seeds or opts.band_only:
        baseline = None if opts.band_only else choose_baseline(plan.runnable, trial_env)
        plan = with_band(plan, opts.band, opts.band_seeds, bundle.training.seed, only=opts.band_only,
                         baseline=baseline)
        base = next((c for c in plan.cells if c.band), None)
        if base is not None:
            what = [f"{opts.band} retrains with one initial weight moved by one ulp" if opts.band else "",
                    f"{opts.band_seeds} with other seeds" if opts.band_seeds else ""]
            err.print(f"[dim]band of the baseline cell {base.labels.get('band_of')}: {' and '.join(w for w in what if w)}"
                      f"{'' if opts.band_only else ', first'}[/dim]", soft_wrap=True)
    if opts.cell_seeds:
        plan = with_cell_seeds(plan, opts.cell_seeds, bundle.training.seed)
        err.print(f"[dim]cell seeds: every cell also retrains with seeds {bundle.training.seed + 1}..."
                  f"{bundle.training.seed + opts.cell_seeds}, paired with the band's ({opts.cell_seeds} x "
                  f"{sum(1 for c in plan.runnable if not c.band)} cells)[/dim]", soft_wrap=True)
    auto = None
    if (opts.auto_band or opts.auto_seeds) and not opts.band_only and bundle.training.seed is not None:
        auto = AutoBands(opts.auto_band, opts.auto_seeds, bundle.training.seed, trial_env)
    out = results_dir(opts.out, bundle.root, prefix="band-" if opts.band_only else "")
    check_writable(out)
    lock = ResultsLock(out)
    try:
        if on_results_dir is not None:
            on_results_dir(out)
        refuse_another_runs_records(out, opts.resume)
        before_run = None
        if deferred and pre.layout is not None:
            from .preflight import check_weights

            before_run = functools.partial(check_weights, bundle, pre.layout)  # only once a cell must train
        return _execute_locked(opts, bundle, plan, out, report_opts, tol, band, data_sha256=pre.data_sha256,
                               before_run=before_run, auto_bands=auto)
    finally:
        lock.release()


def _execute_locked(opts: RunOptions, bundle: Any, plan: Plan, out: Path, report_opts: ReportOptions,
                    tol: Tolerances, band: list[ResultRecord] | None = None, data_sha256: str | None = None,
                    before_run: Any = None, auto_bands: AutoBands | None = None) -> Comparison:
    from .cache import CellCache

    job = Job(bundle_dir=bundle.root, data_path=bundle.data.resolved, data_dir=bundle.data.dir, results_dir=str(out),
              trainer=bundle.trainer.entrypoint if bundle.trainer else None,
              trainer_cmd=bundle.trainer.command if bundle.trainer else None,
              trainer_path=list(bundle.trainer.code_dirs) if bundle.trainer and bundle.trainer.code_dirs else None,
              trace=opts.trace, data_feed=opts.data_feed, seed_key=opts.seed_key,
              trainer_cwd=bundle.trainer.cwd if bundle.trainer else None,  # config.yaml's too: the cache needs it
              run_id=new_run_id(), timeout_s=opts.timeout,
              band_from=str(Path(opts.band_from).resolve()) if opts.band_from else None)
    backend = make_backend(plan, cold=opts.cold)
    cache = CellCache(bundle.root, data_sha256, job.trainer_path or (), reuse=opts.resume and not opts.force,
                      before_run=before_run)
    return execute_plan(plan, backend, job, report_opts, tol, progress_enabled=opts.progress, extra_records=band,
                        jobs=opts.jobs, cache=cache, auto_bands=auto_bands)
