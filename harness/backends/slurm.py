"""Cells as Slurm jobs, submitted, watched and cancelled through submitit.

:meth:`SlurmBackend.prepare` submits every cell at once (one job array per distinct request:
partition, time, memory, GPU type ...), so the cluster runs them side by side while
:meth:`SlurmBackend.run` waits for one cell after the other. On the node the job runs the
first half of the usual skeleton (:func:`harness.backends.slurm_node.run_on_node`); here
the second half, :meth:`Backend.finish`, reads the worker's record from the cell directory
(a shared file system) or, when the job ended without one (cancelled, pre-empted, out of
time, the node failed), writes the row with the job's Slurm state and the tail of its log.

``OUT/slurm-jobs.json`` maps each cell to its job. With ``--resume`` a cell whose job
completed and left an ok record for the same request is not submitted again: its record
is reused; a job of an earlier run that is still queued or running is waited for again.
Ctrl-C cancels the jobs this run submitted (``scancel``, through submitit).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .. import record
from ..errors import BackendError, ErrorKind, HarnessError
from ..plan import Cell, Job
from ..record import ResultRecord, Status, read_worker_record
from ..safeio import atomic_write_text, fresh_dir, open_no_follow, read_no_follow, tail_no_follow
from ..slurm_site import SlurmSettings, gres_of, is_active, state_word, status_of
from ..worker import EVENT_PREFIX
from .base import Backend, CellRefused, EventFn, Launch, LineFn
from .slurm_node import NODE_PREFIX, run_on_node

JOBS_FILE = "slurm-jobs.json"
JOBS_SCHEMA = "harness.slurm-jobs/1"
SUBMITIT_DIR = ".slurm"  # OUT/.slurm/<run id>/: submitit's pickles and the jobs' logs, fresh per run
POLL_MAX_S = 2.0  # sacct at most every 2 s while a cell is waited for


def cell_key(cell: Cell, job: Job, params: dict[str, Any], runtime: str, python: str) -> str:
    """What a job's record depends on, as a digest: a rerun reuses a record only for the same key (pure)."""
    facts = {
        "cell": {k: v for k, v in dataclasses.asdict(cell).items() if k != "image"},
        "image": dataclasses.asdict(cell.image) if dataclasses.is_dataclass(cell.image) else None,
        "job": {k: v for k, v in dataclasses.asdict(job).items() if k != "run_id"},
        "params": params, "runtime": runtime, "python": python,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def read_jobs(results: Path) -> dict[str, dict[str, Any]]:
    """The cells' jobs of earlier runs in ``results`` ({} when none, or unreadable: they are resubmitted)."""
    try:
        raw = read_no_follow(results / JOBS_FILE, 16 << 20)
        data = json.loads(raw.decode("utf-8", "replace")) if raw else {}
    except (HarnessError, ValueError):
        return {}
    cells = data.get("cells") if isinstance(data, dict) and data.get("schema") == JOBS_SCHEMA else None
    return {str(k): v for k, v in cells.items() if isinstance(v, dict)} if isinstance(cells, dict) else {}


def sacct(job_id: str) -> dict[str, str]:
    """sacct's line for one job: State, NodeList, ExitCode, Elapsed, AllocTRES ({} when sacct has none yet)."""
    keys = ("JobID", "State", "NodeList", "ExitCode", "Elapsed", "AllocTRES")
    try:
        out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", ",".join(keys)],
                             capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    for line in out.splitlines():
        row = dict(zip(keys, line.split("|")))
        if row.get("JobID") == job_id:
            return row
    return {}


class LogFollower:
    """New complete lines of a job's log, read from where the last call stopped (never through a link)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def lines(self, final: bool = False) -> list[str]:
        try:
            fh = open_no_follow(self.path)  # a link in its place is not followed; only a regular file is read
        except OSError:
            return []
        with fh:
            fh.seek(self.offset)
            data = fh.read(1 << 22)
            self.offset += len(data)
        data = self.partial + data
        *done, self.partial = data.split(b"\n")
        if final and self.partial:
            done, self.partial = done + [self.partial], b""
        return [d.decode("utf-8", "replace") + "\n" for d in done]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:300]


class SlurmBackend(Backend):
    name = "slurm"

    def __init__(self, settings: SlurmSettings, builds: dict[str, Any] | None = None, *, offline: bool = False,
                 note: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.python = settings.python or sys.executable
        self.builds = dict(builds or {})  # image cell name -> images.build.BuildPlan (runtime docker)
        self.offline = offline
        self.jobs: dict[str, Any] = {}  # cell name -> submitit job, submitted by this run or reattached
        self.reused: dict[str, ResultRecord] = {}  # cell name -> the record of a completed job of an earlier run
        self.waited: set[str] = set()  # cells whose job has ended
        self.note = note or (lambda text: print(text, file=sys.stderr, flush=True))

    def host_slots(self) -> tuple[list[int] | None, list[str] | None]:
        """None: Slurm places the cells on its nodes, so nothing is pinned on the submitting host. Every job
        is submitted in :meth:`prepare`, so waiting for them one at a time costs no wall time."""
        return None, None

    # ---- submitting

    def prepare(self, cells: list[Cell], job: Job) -> dict[str, CellRefused]:
        import submitit

        results = Path(job.results_dir)
        folder = results / SUBMITIT_DIR / (job.run_id or f"run-{os.getpid()}")
        earlier = read_jobs(results)
        entries = dict(earlier)
        groups: dict[str, list[tuple[Cell, str]]] = {}
        for cell in cells:
            params = self.settings.job_params(cell.gpu, name=f"harness-{results.name}")
            key = cell_key(cell, job, params, self.settings.runtime, self.python)
            before = earlier.get(cell.name)
            if before is not None and before.get("key") == key and self._pick_up(cell, job, before):
                continue
            fresh_dir(job.cell_dir(cell))  # a job that never starts leaves no earlier record behind
            groups.setdefault(json.dumps(params, sort_keys=True), []).append((cell, key))
        failures: dict[str, CellRefused] = {}
        for params_text, group in groups.items():
            executor = submitit.SlurmExecutor(folder=folder, python=shlex.quote(self.python))
            executor.update_parameters(**json.loads(params_text))
            try:
                with executor.batch():
                    submitted = [executor.submit(run_on_node, self.settings.runtime, self.python, cell, job,
                                                 self._docker_args(cell)) for cell, _ in group]
            except Exception as exc:  # noqa: BLE001 - sbatch's refusal, whatever submitit wraps it in
                for cell, _ in group:
                    failures[cell.name] = CellRefused(BackendError(
                        f"Slurm refused the job of cell {cell.name}: {_one_line(exc)}",
                        hint="check the partition, account, QoS and GPU type (`sinfo -o '%P %G'`) in the flags "
                             "or the site file's slurm section"))
                continue
            for (cell, key), sub in zip(group, submitted):
                self.jobs[cell.name] = sub
                entries[cell.name] = {"job_id": str(sub.job_id), "folder": str(folder), "key": key, "run_id": job.run_id}
                self.note(f"cell {cell.name}: Slurm job {sub.job_id}"
                          + (f" on gpu:{self.settings.gpu_type(cell.gpu)}" if cell.gpu else ""))
        atomic_write_text(results / JOBS_FILE, record.dumps({"schema": JOBS_SCHEMA, "cells": entries}))
        return failures

    def _docker_args(self, cell: Cell) -> dict[str, Any] | None:
        if self.settings.runtime != "docker":
            return None
        ic = cell.image
        return {"builds": {ic.name: self.builds[ic.name]} if ic is not None and ic.name in self.builds else {},
                "offline": self.offline}

    def _pick_up(self, cell: Cell, job: Job, before: dict[str, Any]) -> bool:
        """An earlier run's job for the same request: its ok record reused, or the job still running waited for."""
        job_id = str(before.get("job_id") or "")
        path = job.cell_paths(cell).record
        try:
            rec = read_worker_record(path)
        except HarnessError:
            rec = None
        slurm = rec.slurm if rec is not None else None
        if rec is not None and rec.ok and slurm and state_word(slurm.state) == "COMPLETED" and slurm.job_id == job_id:
            rec.slurm = dataclasses.replace(slurm, reused_from=slurm.reused_from or rec.run_id)
            rec.run_id = job.run_id
            record.write(path, rec)
            self.reused[cell.name] = rec
            self.note(f"cell {cell.name}: Slurm job {job_id} completed in an earlier run; its record is reused")
            return True
        folder = before.get("folder")
        ours = isinstance(folder, str) and Path(folder).parent == Path(job.results_dir) / SUBMITIT_DIR
        if job_id and ours and is_active(sacct(job_id).get("State", "COMPLETED")):  # its pickles are unpickled here
            import submitit

            self.jobs[cell.name] = submitit.SlurmJob(folder=folder, job_id=job_id)
            self.note(f"cell {cell.name}: Slurm job {job_id} of an earlier run is still queued or running; waiting for it")
            return True
        return False

    # ---- waiting

    def run(self, cell: Cell, job: Job, on_event: EventFn | None = None, cache_key: str | None = None) -> ResultRecord:
        if cell.name in self.reused:
            rec = self.reused[cell.name]
            if cache_key is not None and rec.cache_key != cache_key:
                rec.cache_key = cache_key
                record.write(job.cell_paths(cell).record, rec)
            return rec
        t0 = time.perf_counter()

        def on_line(line: str) -> None:
            if line.startswith(EVENT_PREFIX) and on_event is not None:
                try:
                    on_event(json.loads(line[len(EVENT_PREFIX):]))
                except ValueError:
                    pass

        files = job.cell_paths(cell)
        launched = self.launch(cell, job, files.spec, on_line)
        sub = self.jobs[cell.name]
        tail = tail_no_follow(files.log) or tail_no_follow(Path(sub.paths.stdout)) or ""
        return self.finish(cell, job, launched, tail, time.perf_counter() - t0, cache_key)

    def launch(self, cell: Cell, job: Job, spec_path: Path, on_line: LineFn) -> Launch:
        """Wait for the cell's job, following its output; how it ended, with its Slurm facts."""
        sub = self.jobs[cell.name]
        follow = LogFollower(Path(sub.paths.stdout))
        node: dict[str, Any] = {}

        def relay(final: bool = False) -> None:
            for line in follow.lines(final):
                if line.startswith(NODE_PREFIX):
                    try:
                        node.update(json.loads(line[len(NODE_PREFIX):]))
                    except ValueError:
                        pass
                else:
                    on_line(line)

        poll = 0.25
        while True:
            relay()
            if Path(sub.paths.result_pickle).exists():
                break
            try:
                state = sub.get_info(mode="force").get("State")
            except Exception:  # noqa: BLE001 - sacct hiccup: ask again
                state = None
            if state and not is_active(state):
                break
            time.sleep(poll)
            poll = min(poll * 1.5, POLL_MAX_S)
        relay(final=True)
        self.waited.add(cell.name)
        outcome: Any = None
        if Path(sub.paths.result_pickle).exists():
            try:
                outcome = sub.result()
            except Exception as exc:  # noqa: BLE001 - the job raised on the node: its log says how
                outcome = exc
        info = self._final(str(sub.job_id))
        relay(final=True)
        default = "COMPLETED" if isinstance(outcome, Launch) else "FAILED"
        state = state_word(info.get("State") or default)
        nodelist = info.get("NodeList")
        slurm = {
            "job_id": str(sub.job_id), "state": state,
            "node": node.get("SLURMD_NODENAME") or (nodelist if nodelist not in (None, "", "None assigned") else None),
            "gpu_type": self.settings.gpu_type(cell.gpu) if cell.gpu else None,
            "gres": gres_of(info.get("AllocTRES")), "job_gpus": node.get("SLURM_JOB_GPUS"),
            "partition": node.get("SLURM_JOB_PARTITION"), "exit_code": info.get("ExitCode"),
            "elapsed": info.get("Elapsed"), "runtime": self.settings.runtime,
        }
        if isinstance(outcome, Launch):
            outcome.extra = {**outcome.extra, "slurm": slurm}
            if state == "COMPLETED" or outcome.exit_status == 0:
                return outcome
            # The job was stopped (scancel, the time limit) and the worker killed with it: the state says why.
        where = f" on {slurm['node']}" if slurm["node"] else " before it started"
        reason = f"Slurm job {sub.job_id} ended {state}{where}"
        if state == "TIMEOUT":
            reason += f" at its time limit ({self.settings.time_min} min; raise time: in the site file or --time)"
        elif isinstance(outcome, Exception):
            reason += f": {_one_line(outcome)}"
        elif state in ("FAILED", "NODE_FAIL", "OUT_OF_MEMORY") and info.get("ExitCode"):
            reason += f" (exit code {info['ExitCode']})"
        ran = outcome if isinstance(outcome, Launch) else Launch(None)
        return Launch(ran.exit_status, reason=reason, image=ran.image, status=Status(status_of(state)),
                      kind=ErrorKind.SLURM, extra={**ran.extra, "slurm": slurm})

    @staticmethod
    def _final(job_id: str, wait_s: float = 15.0) -> dict[str, str]:
        """sacct's final line for an ended job (it may lag the job's end by a moment)."""
        deadline = time.monotonic() + wait_s
        while True:
            info = sacct(job_id)
            if (info.get("State") and not is_active(info["State"])) or time.monotonic() > deadline:
                return info
            time.sleep(0.5)

    # ---- stopping

    def close(self) -> None:
        """Cancel the jobs of this run that have not ended (Ctrl-C, or a run stopped by bad input)."""
        for name, sub in list(self.jobs.items()):
            if name in self.waited:
                continue
            self.waited.add(name)
            try:
                sub.cancel(check=False)
                self.note(f"cancelled Slurm job {sub.job_id} (cell {name})")
            except Exception as exc:  # noqa: BLE001 - cancel the others regardless
                self.note(f"! could not cancel Slurm job {sub.job_id} (cell {name}): {_one_line(exc)}")
