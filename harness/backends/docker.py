"""Cells as containers of pinned images, run through :class:`~harness.docker_engine.Engine`.

Each cell's retrain runs in its image
with the bundle and data mounted read-only, a results directory writable,
no network, a read-only root filesystem, the determinism environment set,
and GPUs requested through device requests when the cell uses CUDA. The
record carries what was measured inside the container plus the image's id.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..docker_engine import (OVERLAY_LOWER, OVERLAY_WORK, ContainerFacts, ContainerRequest, Engine, Prestarted,
                             overlay_possible)
from ..errors import BackendError, ErrorKind, HarnessError, InputError
from ..plan import Cell, Job
from ..record import ImageInfo, RunSpec, Status
from ..safeio import CellPaths, fresh_dir
from ..worker import EVENT_PREFIX, determinism, isa
from ..worker.preload import GO_SIGNAL, READY_LINE
from .base import TAIL_LINES, Backend, CellRefused, Launch, LineFn
from .docker_ahead import TURN_CPU_SHARES, WORKER_AWAITS, WORKER_LABEL, ahead_request

BUNDLE = "/harness/bundle"
DATA_DIR = "/harness/data"
OUT = "/harness/out"
TRAINER = "/harness/trainer"
LABEL_RUN = "org.harness.run"
LABEL_PID = "org.harness.pid"  # the CLI that started the container: a dead one leaves an orphan
LABEL_HOST = "org.harness.host"
IMAGE_UID = 10001  # the image's non-root user (Dockerfile.cuda)
PIDS_LIMIT = 4096
MEMORY_SHARE = 0.9  # of the host's memory, when --memory is not given
TMPFS = "rw,noexec,nosuid,nodev,size=2g"  # the worker compiles nothing, so nothing runs from /tmp
LOG_MAX_SIZE, LOG_MAX_FILES = "10m", 3  # the engine's log of a container: rotated, at most 30 MB
OUTPUT_KEEP = 64 << 20  # bytes of a container's output the host keeps in worker.log (then its last lines)
DISK_LIMIT_VAR = "HARNESS_CELL_DISK_LIMIT"
DISK_LIMIT = 20 << 30  # what a cell may leave in its directory (allocated bytes), unless $HARNESS_CELL_DISK_LIMIT
DISK_FILES_MAX = 1_000_000  # ... and how many files and folders
DISK_WATCH_S = 1.0  # while a cell runs, its directory is measured about this often ...
DISK_WATCH_SHARE = 0.2  # ... its walks taking at most this share of the time (a big directory: less often)
MOUNTS_DIR = ".harness-mounts"  # in the results directory: the work folders of the cells' noexec overlays


# --------------------------------------------------------------------------- pure: what a container gets


def gpu_spec(gpus: str | None) -> str:
    """``--gpus all|none|0,1`` normalised (``"0, 1"`` -> ``"0,1"``); an InputError when it names no GPU."""
    gpus = (gpus or "all").strip()
    if gpus in ("all", "none"):
        return gpus
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids:
        raise InputError("--gpus", f"{gpus!r} names no GPU", hint="use all, none, or ids like 0,1")
    return ",".join(ids)


def hostname() -> str:
    return socket.gethostname()


def default_memory_limit(meminfo: str) -> str | None:
    """90% of ``MemTotal`` from /proc/meminfo text, in bytes (``"123b"``); None when it says none (pure)."""
    for line in meminfo.splitlines():
        key, _, rest = line.partition(":")
        if key.strip() == "MemTotal":
            parts = rest.split()
            try:
                kib = int(parts[0])
            except (IndexError, ValueError):
                return None
            return f"{int(kib * 1024 * 9 // 10)}b"
    return None


def host_memory_limit() -> str | None:
    """The default memory limit of a container on this host (None where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as fh:
            return default_memory_limit(fh.read())
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    except OSError:
        return False
    return True


def dead_containers(found: Iterable[ContainerFacts], host: str,
                    alive: Callable[[int], bool] = pid_alive) -> list[ContainerFacts]:
    """The harness containers whose run is over (pure but for ``alive``).

    Started from this host: the CLI's pid is gone. Started elsewhere (or before
    containers carried a pid): the container is no longer running.
    """
    dead = []
    for f in found:
        if LABEL_RUN not in f.labels:
            continue
        pid_text = f.labels.get(LABEL_PID, "")
        if f.labels.get(LABEL_HOST) == host and pid_text.isdigit():
            if not alive(int(pid_text)):
                dead.append(f)
        elif f.status != "running":
            dead.append(f)
    return dead


def remove_dead_containers(engine: Engine, *, dry_run: bool = False) -> list[ContainerFacts]:
    """Remove the containers runs that are no longer alive left behind (SIGKILL, a crash); what was removed."""
    dead = dead_containers(engine.containers(LABEL_RUN), hostname())
    if not dry_run:
        for f in dead:
            engine.remove_container(f.id)
    return dead


def container_spec(cell: Cell, job: Job, image: str, *, gpus: str = "all", memory: str | None = None,
                   host_uid: int | None = None, run_id: str = "", tag: str | None = None,
                   overlay_work: str | None = None, cpu_shares: int | None = None) -> ContainerRequest:
    """What the cell's container gets (plain data, testable without Docker).

    Whatever a trainer or a pickle does in there: no network, no capabilities, no
    privilege gain through setuid files, a read-only root, a PID and a memory limit
    (``memory``, else 90% of the host's), a time limit (``job.timeout_s``) and a capped log.
    ``overlay_work``: an empty folder beside the cell's directory, for the overlay that mounts
    that directory ``noexec,nosuid,nodev`` (:func:`harness.docker_engine.overlay_mount`).
    """
    mounts = [(job.bundle_dir, BUNDLE, True)]
    if job.data_dir is not None:
        mounts.append((job.data_dir, DATA_DIR, True))  # the whole directory: files beside the data too
    elif job.data_path is not None:
        mounts.append((job.data_path, f"{DATA_DIR}/{Path(job.data_path).name}", True))
    mounts.append((str(job.cell_dir(cell)), OUT, False))
    for i, path in enumerate(job.trainer_path or ()):
        mounts.append((path, f"{TRAINER}/{i}", True))
    env = {"PYTHONUNBUFFERED": "1", "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1",
           **determinism.launch_env(cell.determinism, cell.threads), **isa.launch_env(cell.isa)}
    if cell.determinism == "default":
        # The image bakes the strict variables in; the default mode must not inherit them.
        env["CUBLAS_WORKSPACE_CONFIG"] = ""
        env["PYTHONHASHSEED"] = "random"
    return ContainerRequest(
        image=image,
        command=("--spec", f"{OUT}/{CellPaths.SPEC}"),
        mounts=tuple(mounts),
        environment=env,
        # a non-root caller owns what the container writes
        user=f"{host_uid}:{os.getgid()}" if host_uid else None,
        # --jobs: its own GPU (device_ids) and cores (cpuset_cpus)
        gpus=("none" if not cell.device.startswith("cuda") else
              cell.slot.gpu if cell.slot is not None and cell.slot.gpu is not None else gpu_spec(gpus)),
        cpuset=cell.slot.cpuset if cell.slot is not None else None,
        cpu_shares=cpu_shares,
        memory=memory or host_memory_limit(),
        labels={LABEL_RUN: run_id, "org.harness.cell": cell.name, LABEL_PID: str(os.getpid()),
                LABEL_HOST: hostname()},
        network="none",
        read_only=True,
        tmpfs={"/tmp": TMPFS},
        shm_size="1g",
        cap_drop=("ALL",),
        security_opt=("no-new-privileges",),
        pids_limit=PIDS_LIMIT,
        timeout_s=job.timeout_s,
        cell=cell.name,
        tag=tag,
        noexec={OUT: overlay_work} if overlay_work else {},
        log_max_size=LOG_MAX_SIZE,
        log_max_files=LOG_MAX_FILES,
    )


def parse_size(text: str) -> int | None:
    """Bytes from ``20g``, ``512m``, ``100k``, ``4096`` (binary units, any case); None when it is not a size (pure)."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}.get(t[-1:], 1)
    number = t[:-1] if scale > 1 else t
    try:
        value = float(number)
    except ValueError:
        return None
    return int(value * scale) if value > 0 and value * scale < 1 << 62 else None


def disk_limit(env: Mapping[str, str]) -> int:
    """What a cell may leave in its directory: ``$HARNESS_CELL_DISK_LIMIT`` or 20 GiB (pure)."""
    text = env.get(DISK_LIMIT_VAR)
    if text is None or not text.strip():
        return DISK_LIMIT
    size = parse_size(text)
    if size is None:
        raise InputError(DISK_LIMIT_VAR, f"{text!r} is not a size", hint="give one like 20g, 500m or a byte count")
    return size


def cell_usage(root: Path, most_bytes: int, most_files: int, *,
               vanished_ok: bool = False) -> tuple[int, int, str | None]:
    """The bytes (allocated blocks) and files under ``root``, never following a link, and a folder it could not
    read (then the usage is unknown); the walk stops once over either bound. ``vanished_ok``: a folder that
    is gone (or no longer a folder) by the time it is read is no unreadable one (the cell is still running)."""
    used = files = 0
    seen: set[tuple[int, int]] = set()
    unreadable: list[str] = []

    def failed(e: OSError) -> None:
        if not (vanished_ok and isinstance(e, (FileNotFoundError, NotADirectoryError))):
            unreadable.append(os.path.relpath(e.filename, root) if e.filename else "?")

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=failed):
        if unreadable:
            break
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            files += 1
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            used += st.st_blocks * 512
            if used > most_bytes or files > most_files:
                return used, files, None
    return used, files, unreadable[0] if unreadable else None


def over_disk_limit(used: int, files: int, unreadable: str | None, limit: int, most_files: int = DISK_FILES_MAX,
                 where: Path | str | None = None, stopped: bool = False) -> str | None:
    """One line when a cell's directory (``where``) holds more than it may, or cannot be measured; None when
    within. ``stopped``: its container was stopped for it while running (pure)."""
    at = f" {where}" if where is not None else ""
    then = " and was stopped" if stopped else ""
    if unreadable is not None:
        return f"the cell made {unreadable!r} in its directory{at} unreadable, so its size cannot be checked{then}"
    if used > limit:
        return (f"the cell wrote more than {_human(limit)} into its directory{at}{then} (its limit; "
                f"{DISK_LIMIT_VAR}={_size_text(2 * limit)} in the environment of `harness` raises it)")
    if files > most_files:
        return f"the cell wrote more than {most_files} files into its directory{at}{then}"
    return None


def _size_text(n: int) -> str:
    """``n`` bytes as :func:`parse_size` reads them, rounded up to a whole unit (``40g``, ``512k``)."""
    for unit, shift in (("g", 30), ("m", 20), ("k", 10)):
        if n >= 1 << shift:
            return f"{-(-n // (1 << shift))}{unit}"
    return str(n)


class DiskWatch:
    """A running cell's directory, measured as after the run (:func:`cell_usage`: allocated blocks, no link
    followed, at most :data:`DISK_FILES_MAX` entries a walk) each time the engine asks, but resting after a
    walk so that walks take at most :data:`DISK_WATCH_SHARE` of the time; one line once it holds too much."""

    def __init__(self, root: Path, limit: int, most_files: int = DISK_FILES_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root, self.limit, self.most_files, self.clock = root, limit, most_files, clock
        self.rest_until = float("-inf")
        self.walks = 0

    def __call__(self) -> str | None:
        start = self.clock()
        if start < self.rest_until:
            return None
        used, files, unreadable = cell_usage(self.root, self.limit, self.most_files, vanished_ok=True)
        self.walks += 1
        self.rest_until = start + (self.clock() - start) / DISK_WATCH_SHARE
        return over_disk_limit(used, files, unreadable, self.limit, self.most_files, where=self.root, stopped=True)


def _human(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.3g} {unit}"
    return f"{n} bytes"


class CappedOutput:
    """A container's output lines, passed on until ``keep`` bytes, then only its last lines (at the end).

    Progress events always pass (they are not kept on disk); what is dropped is counted, and
    :meth:`close` passes on a line that says so and then the last :data:`TAIL_LINES` lines.
    """

    def __init__(self, on_line: LineFn, keep: int | None = None) -> None:
        self.on_line, self.keep = on_line, OUTPUT_KEEP if keep is None else keep
        self.left = self.keep
        self.dropped, self.dropped_bytes = 0, 0
        self.last: deque[str] = deque(maxlen=TAIL_LINES)

    def line(self, text: str) -> None:
        if text.startswith(EVENT_PREFIX) or len(text) + 1 <= self.left:
            if not text.startswith(EVENT_PREFIX):
                self.left -= len(text) + 1
            self.on_line(text + "\n")
            return
        self.left = 0
        self.dropped += 1
        self.dropped_bytes += len(text) + 1
        self.last.append(text[:4096])

    def close(self) -> None:
        if not self.dropped:
            return
        shown = len(self.last)
        self.on_line(f"harness: output beyond its first {self.keep / (1 << 20):g} MiB: {self.dropped - shown} "
                     f"line(s) ({self.dropped_bytes} bytes in all) not kept, the last {shown} follow\n")
        for text in self.last:
            self.on_line(text + "\n")


def make_overlay_work(out: Path, cell: str) -> tuple[Path | None, str | None]:
    """An empty folder beside the results (same file system as ``out``) with the overlay's lower and work
    folders; or None and why the cell's directory cannot be mounted noexec."""
    work = out.parent / MOUNTS_DIR / f"{cell}-{os.getpid()}-{time.time_ns()}"
    if not overlay_possible(str(out), str(work)):
        return None, f"its path cannot be a mount option (it holds , : = or \\): {out}"
    try:
        (work / OVERLAY_LOWER).mkdir(parents=True)
        (work / OVERLAY_WORK).mkdir()
    except OSError as exc:
        return None, f"{work} cannot be made ({exc.strerror or exc})"
    return work, None


def remove_overlay_work(work: Path) -> None:
    """Remove what :func:`make_overlay_work` made, once the container is gone (the kernel's empty, root-owned
    ``work/work`` is removed as any empty folder in a folder of ours); best effort."""
    for folder in (work / OVERLAY_WORK, work):
        try:
            names = os.listdir(folder)
        except OSError:
            names = []
        for name in names:
            try:
                os.rmdir(folder / name)
            except OSError:
                pass
        try:
            os.rmdir(folder)
        except OSError:
            pass
    try:
        os.rmdir(work.parent)  # the last cell's: the folder of them all
    except OSError:
        pass


def container_data_path(job: Job) -> str | None:
    """Where the worker in the container finds the data: beside its siblings under --data-dir, else alone."""
    if job.data_path is None:
        return None
    if job.data_dir is not None:
        rel = Path(job.data_path).relative_to(job.data_dir).as_posix()
        return DATA_DIR if rel == "." else f"{DATA_DIR}/{rel}"
    return f"{DATA_DIR}/{Path(job.data_path).name}"


def container_run_spec(cell: Cell, job: Job, image: ImageInfo) -> RunSpec:
    """The RunSpec as the worker inside the container sees it (container paths)."""
    return RunSpec(
        cell=cell.name, bundle_dir=BUNDLE, out_dir=OUT, data_path=container_data_path(job),
        data_dir=DATA_DIR if job.data_dir is not None else None,
        device=cell.device, determinism=cell.determinism, threads=cell.threads, tf32=cell.tf32, repeat=cell.repeat,
        isa=cell.isa, trainer=job.trainer,
        trainer_path=[f"{TRAINER}/{i}" for i in range(len(job.trainer_path))] if job.trainer_path else None,
        trainer_cmd=job.trainer_cmd, trace=job.trace,
        backend="docker", image={"id": image.id, "tag": image.tag}, labels=cell.labels,
        seed=cell.seed, perturb=cell.perturb, band=cell.band, data_feed=job.data_feed, seed_key=job.seed_key,
        trainer_cwd=job.trainer_cwd,  # the worker resolves it to /harness/bundle or /harness/trainer/0
    )


def exit_reason(status: int, oom: bool, memory: str | None) -> str:
    if oom:
        return f"container was OOM-killed (exit {status}{', memory limit ' + memory if memory else ''})"
    if status == 137:
        return "container was killed (exit 137: SIGKILL, often the kernel's OOM killer)"
    return f"container exited with status {status}"


# --------------------------------------------------------------------------- effects


LABEL_INPUT_HASH = "org.harness.input-hash"  # images.build.LABEL_HASH
LABEL_BASE_DIGEST = "org.harness.base-digest"  # images.build.LABEL_BASE_DIGEST


class DockerBackend(Backend):
    name = "docker"

    def __init__(self, engine: Engine, plans: dict[str, Any], *, gpus: str = "all", memory: str | None = None,
                 aliases: dict[str, str] | None = None, offline: bool = False, disk: int | None = None,
                 ahead: bool = True, cold_reason: str | None = None) -> None:
        self.engine = engine
        self.cold_reason = cold_reason or "--cold"  # why no cell starts ahead, when ``ahead`` is off
        # Cells' containers started ahead of their turn (harness.backends.docker_ahead); off with --cold.
        self.ahead_on = ahead
        self.queue: list[tuple[Cell, Job]] = []  # the cells about to run, in order (expect)
        self.ahead: dict[str, Ahead] = {}  # cell -> its container started ahead
        self.launched: set[str] = set()
        self.turns = 0  # cells running now
        self.busy = 0  # cores they hold (an unpinned cell with torch's default threads: all of them)
        self._ahead_lock = threading.Lock()
        self._awaits: dict[str, bool] = {}  # image id -> whether its worker can wait for its turn
        self.disk = disk if disk is not None else disk_limit(os.environ)  # what a cell may leave in its directory
        self._said: set[str] = set()  # notes already printed (one engine, many cells)
        self.offline = offline  # a missing base pinned by digest is not pulled (the cell is skipped)
        self.plans = plans  # cell name -> images.build.BuildPlan
        self.aliases = dict(aliases or {})  # image cell name -> harness:<cell>, used as found (no wheelhouse given)
        self.gpus = gpus
        self.memory = memory
        self.images: dict[str, ImageInfo] = {}  # cell name -> the image it runs in, from prepare() or use_image()
        self.fixed_specs: dict[str, dict[str, Any]] = {}  # cell name -> archived spec (harness rerun)
        self.run_id = f"{os.getpid()}-{int(time.time())}"

    def prepare(self, cells: list[Cell], job: Job) -> dict[str, CellRefused]:
        from rich.console import Console

        from ..images import build as imagebuild

        err = Console(stderr=True, highlight=False)

        def progress(cell: str, event: str, text: str) -> None:
            if event == "start":
                err.print(f"[dim]image {cell}: {text}[/dim]")
            elif event in ("built", "cached"):
                err.print(f"[dim]image {cell}: {'built' if event == 'built' else 'up to date'} ({text})[/dim]")
            elif event == "failed":
                err.print(f"[red]image {cell}: {text}[/red]", soft_wrap=True)
            elif event == "log" and text.startswith("pulling base image"):
                err.print(f"[dim]image {cell}: {text}[/dim]", soft_wrap=True)
            elif event == "skipped":  # why, and the command that makes it buildable: once, in the report
                err.print(f"[yellow]image {cell}: cannot be built here, skipped (why: below)[/yellow]",
                          soft_wrap=True)

        try:
            for f in remove_dead_containers(self.engine):
                err.print(f"[dim]removed container {f.id[:12]} of a run that is gone "
                          f"({f.labels.get('org.harness.cell', '?')}, run {f.labels.get(LABEL_RUN, '?')})[/dim]")
        except HarnessError as exc:
            err.print(f"[yellow]! could not look for containers of dead runs: {exc.one_line()}[/yellow]")
        wanted = [self.plans[c.image.name] for c in cells if c.image is not None and c.image.name in self.plans]
        unique = list({p.cell.name: p for p in wanted}.values())
        results = imagebuild.ensure_images(self.engine, unique, progress, offline=self.offline)
        failures: dict[str, CellRefused] = {}
        for c in cells:
            if c.image is not None and c.image.name not in self.plans and c.image.name in self.aliases:
                found = self.use_alias(c, err)
                if isinstance(found, CellRefused):
                    failures[c.name] = found
                continue
            r = results.get(c.image.name) if c.image is not None else None
            if isinstance(r, HarnessError):
                failures[c.name] = CellRefused.of(r)
            elif r is not None:
                self.images[c.name] = self.describe(c, r)
        return failures

    def environment_digest(self, cell: Cell) -> str | None:
        info = self.images.get(cell.name)
        return f"image:{info.id}" if info is not None and info.id else None

    def key_inputs(self, cell: Cell, job: Job) -> dict[str, object]:
        """What the cell's key adds (harness.cache): the container's variables that can change its numbers (the
        image's own are in its id) and the GPUs it is given. A trainer command's words name paths in the
        container: the image's (its id) or the mounted folders (in the key already)."""
        from ..cache import numeric_environment

        # (a memory limit changes no number: "-" spares reading the host's)
        request = container_spec(cell, job, self.images[cell.name].id, gpus=self.gpus, memory=self.memory or "-")
        return {"environ": numeric_environment(request.environment), "gpus": request.gpus}

    def host_slots(self) -> tuple[list[int] | None, list[str] | None]:
        """This host's cores and GPUs, when the engine runs here (a remote engine's are unknown: one at a time)."""
        from .base import usable_cpus

        where = os.environ.get("DOCKER_HOST", "")
        if where and not where.startswith("unix://"):
            return None, None
        spec = gpu_spec(self.gpus)
        if spec == "none":
            return usable_cpus(), []
        if spec != "all":
            return usable_cpus(), spec.split(",")
        from ..images import matrix

        try:
            found = matrix.detect_host().get("gpus")
        except Exception:  # noqa: BLE001 - unsure: CUDA cells take turns
            return usable_cpus(), None
        return usable_cpus(), [str(i) for i in range(len(found))] if isinstance(found, list) else None

    def use_alias(self, cell: Cell, err: Any) -> ImageInfo | CellRefused:
        """The image already built under ``harness:<cell>``, for a wheelhouse cell given no wheelhouse.

        Without the wheelhouse its inputs cannot be hashed, so the image is used as found and
        the record says so; with no such image the cell is skipped, naming the command that
        makes it buildable.
        """
        from ..errors import InputError

        ic = cell.image
        alias = self.aliases[ic.name]
        img = self.engine.image(alias)
        if img is None:
            exc = InputError(f"cell {ic.name}", f"builds from a wheelhouse, none was given and {alias} is not built",
                             hint=f"pass --wheelhouse {ic.name}=DIR")
            return CellRefused(exc, skip_reason=(f"no wheelhouse given and no built image {alias}: "
                                                 f"`harness images wheelhouse --cells {ic.name} --dest DIR`, "
                                                 f"then --wheelhouse {ic.name}=DIR"))
        note = "not checked against its inputs: no wheelhouse given"
        if ic.name not in getattr(self, "_alias_noted", set()):
            self._alias_noted = getattr(self, "_alias_noted", set()) | {ic.name}
            err.print(f"[yellow]{ic.name}: using the built image {alias} ({note})[/yellow]", soft_wrap=True)
        info = ImageInfo(
            id=img.id, tag=alias, cell=ic.name, repo_digests=list(img.repo_digests),
            input_hash=img.labels.get(LABEL_INPUT_HASH), torch=ic.torch, variant=ic.variant, cuda=ic.cuda,
            python=ic.python, base_image=ic.base_image, base_digest=img.labels.get(LABEL_BASE_DIGEST),
            source="wheelhouse", size_bytes=img.size, note=note)
        self.images[cell.name] = info
        return info

    def describe(self, cell: Cell, built: Any) -> ImageInfo:
        """The image facts a record carries (what ran, not what was asked for)."""
        plan = self.plans[cell.image.name]
        img = self.engine.image(built.id)
        if img is None:
            raise BackendError(f"image {built.tag} of cell {cell.image.name} vanished from the engine",
                               hint=f"build it again with `harness images build --cells {cell.image.name}`")
        return ImageInfo(
            id=img.id, tag=built.tag, cell=cell.image.name, repo_digests=list(img.repo_digests),
            input_hash=plan.input_hash, torch=cell.image.torch, variant=cell.image.variant, cuda=cell.image.cuda,
            python=cell.image.python, base_image=cell.image.base_image,
            base_digest=img.labels.get(LABEL_BASE_DIGEST) or cell.image.base_digest,
            source=plan.buildargs.get("INSTALL_SOURCE"),
            size_bytes=img.size, built_seconds=built.seconds if built.built else None,
        )

    def use_image(self, cell_name: str, info: ImageInfo, spec: dict[str, Any] | None = None) -> None:
        """Run ``cell_name`` in an image that is already in the engine (e.g. loaded from a snapshot).

        ``spec``: the run spec exactly as that image's worker read it before (an archived
        run's), handed to it unchanged so an older worker never sees today's spec.
        """
        self.images[cell_name] = info
        if spec is not None:
            self.fixed_specs[cell_name] = dict(spec)

    def spec_document(self, cell: Cell, job: Job) -> dict[str, Any]:
        if cell.name in self.fixed_specs:
            return self.fixed_specs[cell.name]
        return container_run_spec(cell, job, self.images[cell.name]).to_dict()

    def make_cell_dir(self, out: Path) -> None:
        with self._ahead_lock:
            started = [name for name, a in self.ahead.items() if a.out == out]
        if started and _empty_dir(out):
            return  # made fresh when its container was started ahead, and nothing of the cell has run since
        for name in started:  # something is there: that container is not used, the directory is made anew
            self._drop_ahead(name)
        _fresh_cell_dir(out)

    # ------------------------------------------------------------------ containers started ahead of their turn

    def expect(self, cells: list[Cell], job: Job) -> None:
        """The cells about to run, in order: the first gets its container now, the next ones as cells run."""
        if not self.ahead_on:
            return
        with self._ahead_lock:
            self.queue = [(c, job) for c in cells]
        self._top_up()

    def _request(self, cell: Cell, job: Job, work: Path | None) -> ContainerRequest:
        """The container the cell gets (cold, with its slot's cores and GPU when it has one)."""
        info = self.images[cell.name]
        uid = _uid()
        return container_spec(cell, job, info.id, gpus=self.gpus, memory=self.memory, host_uid=uid or None,
                              run_id=self.run_id, tag=info.tag, overlay_work=str(work) if work is not None else None,
                              cpu_shares=TURN_CPU_SHARES)

    def _cannot_await(self, cell: Cell) -> str | None:
        """Why the cell's container cannot be started ahead (its image's worker cannot wait); None: it can."""
        info = self.images.get(cell.name)
        if info is None:
            return "its image is not ready"
        if info.id not in self._awaits:
            facts = self.engine.image(info.id)
            self._awaits[info.id] = facts is not None and facts.labels.get(WORKER_LABEL) == WORKER_AWAITS
        if not self._awaits[info.id]:
            return (f"its image {info.tag or info.id[:19]} was built before its worker could wait for its turn "
                    "(rebuild it to start its cells ahead)")
        return None

    def _top_up(self) -> None:
        """Start the containers of the next cells in the queue: as many waiting as cells run (at least one)."""
        from .docker_ahead import next_ahead
        from .warm import _default_max_servers

        with self._ahead_lock:
            if not self.ahead_on:
                return
            names = next_ahead([c.name for c, _ in self.queue], self.launched, set(self.ahead), self.turns,
                               _default_max_servers(), idle=max(0, self._cores - self.busy))
            jobs = {c.name: (c, j) for c, j in self.queue}
            for name in names:
                cell, job = jobs[name]
                if self._cannot_await(cell) is not None:
                    self.launched.add(name)  # it starts cold; launch() says why
                    continue
                out = job.cell_dir(cell)
                _fresh_cell_dir(out)
                work, why_not = make_overlay_work(out, cell.name)
                request = ahead_request(self._request(replace(cell, slot=None), job, work))
                self.ahead[name] = Ahead(self.engine.prestart(request, READY_LINE), out, work, why_not)

    def _drop_ahead(self, name: str) -> None:
        """Remove the container started ahead for ``name``, if there is one: it will not run."""
        with self._ahead_lock:
            got = self.ahead.pop(name, None)
        if got is not None:
            self._discard(got)

    def _discard(self, got: Ahead) -> None:
        """Remove a container started ahead that will not run, and its overlay's work folder."""
        self.engine.discard(got.pre)
        if got.work is not None:
            remove_overlay_work(got.work)

    def _take_ahead(self, cell: Cell, job: Job, now: ContainerRequest,
                    timeout_s: float | None) -> tuple[Ahead | None, str | None]:
        """The cell's container started ahead, given its turn; or None and why it starts cold."""
        from .docker_ahead import mismatch

        with self._ahead_lock:
            got = self.ahead.pop(cell.name, None)
            self.launched.add(cell.name)
        if got is None:
            if not self.ahead_on:
                return None, self.cold_reason
            queued = any(c.name == cell.name for c, _job in self.queue)
            return None, self._cannot_await(cell) or (
                "its turn came before a container was started ahead for it (the first cells of a run)" if queued
                else "no cells were queued before it: it started at its turn")
        why = mismatch(got.pre.request, now, threads=cell.threads, only_gpu=self._only_gpu,
                       all_cores=self._every_core)
        if why is None:
            why = self.engine.go(got.pre, GO_SIGNAL, cpuset=now.cpuset, cpu_shares=now.cpu_shares, wait_s=timeout_s)
            if why is not None:
                why = f"its container started ahead could not take its turn: {why}"
        if why is not None:
            self._discard(got)
            return None, why
        return got, None

    @functools.cached_property
    def _cores(self) -> int:
        """How many cores cells share here (what an idle core is counted against)."""
        cpus = self.host_slots()[0]
        return len(cpus) if cpus else (os.cpu_count() or 1)

    @functools.cached_property
    def _every_core(self) -> list[int] | None:
        """The host's cores, when this process may use every one: what a container without a cpuset (one
        started ahead) sees, so a cell pinned to all of them gets torch's same default thread count."""
        cpus = self.host_slots()[0]
        return cpus if cpus and set(cpus) == set(range(os.cpu_count() or 0)) else None

    @functools.cached_property
    def _only_gpu(self) -> str | None:
        """The host's GPU id when it has exactly one (``all`` is then that GPU); None otherwise."""
        gpus = self.host_slots()[1]
        return gpus[0] if gpus is not None and len(gpus) == 1 else None

    def launch(self, cell: Cell, job: Job, spec_path: Path, on_line: LineFn) -> Launch:
        info = self.images[cell.name]
        out = job.cell_dir(cell)
        with self._ahead_lock:
            got = self.ahead.get(cell.name)
        if got is None:
            work, why_not = make_overlay_work(out, cell.name)  # the cell's directory: noexec,nosuid,nodev
        else:
            work, why_not = got.work, got.why_not
        request = self._request(cell, job, work)
        taken, cold_why = self._take_ahead(cell, job, request, job.timeout_s)
        if taken is None and got is not None:  # its overlay work folder went with it: a new one for a cold start
            work, why_not = make_overlay_work(out, cell.name)
            request = self._request(cell, job, work)
        start = ({"start": "warm", "start_reason": None} if taken is not None else
                 {"start": "cold", "start_reason": cold_why})
        output = CappedOutput(on_line)
        if why_not is not None:
            output.line(f"harness: {OUT} is mounted without noexec,nosuid,nodev: {why_not}")
        n = self._cores
        held = (len(cell.slot.cpus) if cell.slot is not None and cell.slot.cpus is not None else
                1 if cell.device.startswith("cuda") else min(n, cell.threads or n))
        with self._ahead_lock:
            self.turns += 1
            self.busy += held
        self._top_up()  # the next cells' containers import while this one runs
        try:  # over its disk limit while it runs, the container is killed as at its timeout, and removed
            ended = self.engine.run(request, output.line, watch=DiskWatch(out, self.disk), watch_every_s=DISK_WATCH_S,
                                    **({"prestarted": taken.pre} if taken is not None else {}))
        finally:
            with self._ahead_lock:
                self.turns -= 1
                self.busy -= held
            output.close()
            if work is not None:
                remove_overlay_work(work)

        self._say([*ended.notes, *([f"{OUT} is mounted without noexec,nosuid,nodev: {why_not}"] if why_not else [])])
        rc, reason = ended.status, ended.error
        if reason is None and rc is not None and rc != 0 and (ended.oom_killed or rc == 137):
            reason = exit_reason(rc, ended.oom_killed, request.memory)
        status = kind = None
        if ended.stopped is not None:  # over its disk limit while running: what it wrote is not read
            _remove_record(out)
            reason, status, kind = ended.stopped, Status.FAILED, ErrorKind.DISK
        elif ended.status is not None and not ended.timed_out:
            over = over_disk_limit(*cell_usage(out, self.disk, DISK_FILES_MAX), self.disk, where=out)
            if over is not None:
                # the cell fails whatever its worker wrote: its record is not read
                _remove_record(out)
                reason, status, kind = over, Status.FAILED, ErrorKind.DISK
        return Launch(rc, reason=reason, image=info, timed_out=ended.timed_out and ended.stopped is None,
                      status=status, kind=kind,
                      extra={**start, "host_paths": {"bundle": job.bundle_dir, "data": job.data_path, "data_dir": job.data_dir,
                                            "trainer_path": list(job.trainer_path or []) or None}})

    def _say(self, notes: Iterable[str]) -> None:
        """Each note once per run, on stderr."""
        from rich.console import Console

        for note in notes:
            if note not in self._said:
                self._said.add(note)
                Console(stderr=True, highlight=False).print(f"! {note}", style="yellow", markup=False, soft_wrap=True)

    def close(self) -> None:
        """Stop and remove every container this backend started that is still there (Ctrl-C), those started
        ahead of a turn that never came included."""
        with self._ahead_lock:
            self.ahead_on = False  # nothing more starts ahead
            names = list(self.ahead)
        for name in names:
            self._drop_ahead(name)
        self.engine.stop_all()


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0


@dataclass
class Ahead:
    """A cell's container started ahead of its turn (harness.backends.docker_ahead), and what it mounts."""

    pre: Prestarted
    out: Path  # the cell's directory, made empty for it
    work: Path | None  # its noexec overlay's work folder (None: a bind mount, ``why_not``)
    why_not: str | None = None


def _fresh_cell_dir(out: Path) -> None:
    """The cell's directory, empty, and the image user's when this runs as root."""
    fresh_dir(out)
    if _uid() == 0:
        os.chown(out, IMAGE_UID, IMAGE_UID)  # the image's non-root user writes here, nobody else


def _empty_dir(out: Path) -> bool:
    """Whether ``out`` is a directory (not a link to one) with nothing in it."""
    try:
        if not os.path.isdir(out) or os.path.islink(out):
            return False
        with os.scandir(out) as it:
            return next(it, None) is None
    except OSError:
        return False


def _remove_record(out: Path) -> None:
    """Unlink the worker's record in ``out`` (a name in a folder the cell wrote: never followed)."""
    try:
        os.unlink(CellPaths(out).record)
    except OSError:
        pass
