"""Cells as containers of pinned images, run through :class:`~harness.docker_engine.Engine`.

Each cell's retrain runs in its image
with the bundle and data mounted read-only, a results directory writable,
no network, a read-only root filesystem, the determinism environment set,
and GPUs requested through device requests when the cell uses CUDA. The
record carries what was measured inside the container plus the image's id.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from ..docker_engine import ContainerFacts, ContainerRequest, Engine
from ..errors import BackendError, HarnessError, InputError
from ..plan import Cell, Job
from ..record import ImageInfo, RunSpec
from ..worker import determinism, isa
from .base import Backend, Launch, LineFn, fresh_dir

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
                   host_uid: int | None = None, run_id: str = "", tag: str | None = None) -> ContainerRequest:
    """What the cell's container gets (plain data, testable without Docker).

    Whatever a trainer or a pickle does in there: no network, no capabilities, no
    privilege gain through setuid files, a read-only root, a PID and a memory limit
    (``memory``, else 90% of the host's), and a time limit (``job.timeout_s``).
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
        command=("--spec", f"{OUT}/spec.json"),
        mounts=tuple(mounts),
        environment=env,
        # a non-root caller owns what the container writes
        user=f"{host_uid}:{os.getgid()}" if host_uid else None,
        # --jobs: its own GPU (device_ids) and cores (cpuset_cpus)
        gpus=("none" if not cell.device.startswith("cuda") else
              cell.slot.gpu if cell.slot is not None and cell.slot.gpu is not None else gpu_spec(gpus)),
        cpuset=cell.slot.cpuset if cell.slot is not None else None,
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
    )


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
                 aliases: dict[str, str] | None = None, offline: bool = False) -> None:
        self.engine = engine
        self.offline = offline  # a missing base pinned by digest is not pulled (the cell is skipped)
        self.plans = plans  # cell name -> images.build.BuildPlan
        self.aliases = dict(aliases or {})  # image cell name -> harness:<cell>, used as found (no wheelhouse given)
        self.gpus = gpus
        self.memory = memory
        self.images: dict[str, ImageInfo] = {}  # cell name -> the image it runs in, from prepare() or use_image()
        self.fixed_specs: dict[str, dict[str, Any]] = {}  # cell name -> archived spec (harness rerun)
        self.run_id = f"{os.getpid()}-{int(time.time())}"

    def prepare(self, cells: list[Cell], job: Job) -> dict[str, HarnessError]:
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
            elif event == "skipped":
                err.print(f"[yellow]image {cell}: cannot be built here, skipped: {text}[/yellow]", soft_wrap=True)

        try:
            for f in remove_dead_containers(self.engine):
                err.print(f"[dim]removed container {f.id[:12]} of a run that is gone "
                          f"({f.labels.get('org.harness.cell', '?')}, run {f.labels.get(LABEL_RUN, '?')})[/dim]")
        except HarnessError as exc:
            err.print(f"[yellow]! could not look for containers of dead runs: {exc.one_line()}[/yellow]")
        wanted = [self.plans[c.image.name] for c in cells if c.image is not None and c.image.name in self.plans]
        unique = list({p.cell.name: p for p in wanted}.values())
        results = imagebuild.ensure_images(self.engine, unique, progress, offline=self.offline)
        failures: dict[str, HarnessError] = {}
        for c in cells:
            if c.image is not None and c.image.name not in self.plans and c.image.name in self.aliases:
                found = self.use_alias(c, err)
                if isinstance(found, HarnessError):
                    failures[c.name] = found
                continue
            r = results.get(c.image.name) if c.image is not None else None
            if isinstance(r, HarnessError):
                failures[c.name] = r
            elif r is not None:
                self.images[c.name] = self.describe(c, r)
        return failures

    def environment_digest(self, cell: Cell) -> str | None:
        info = self.images.get(cell.name)
        return f"image:{info.id}" if info is not None and info.id else None

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

    def use_alias(self, cell: Cell, err: Any) -> ImageInfo | HarnessError:
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
            exc.skip_reason = (f"no wheelhouse given and no built image {alias}: "  # type: ignore[attr-defined]
                               f"`harness images wheelhouse --cells {ic.name} --dest DIR`, "
                               f"then --wheelhouse {ic.name}=DIR")
            return exc
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
        fresh_dir(out)
        if _uid() == 0:
            os.chown(out, IMAGE_UID, IMAGE_UID)  # the image's non-root user writes here, nobody else

    def launch(self, cell: Cell, job: Job, spec_path: Path, on_line: LineFn) -> Launch:
        info = self.images[cell.name]
        uid = _uid()
        request = container_spec(cell, job, info.id, gpus=self.gpus, memory=self.memory,
                                 host_uid=uid or None, run_id=self.run_id, tag=info.tag)
        ended = self.engine.run(request, lambda line: on_line(line + "\n"))
        rc, reason = ended.status, ended.error
        if reason is None and rc is not None and rc != 0 and (ended.oom_killed or rc == 137):
            reason = exit_reason(rc, ended.oom_killed, request.memory)
        return Launch(rc, reason=reason, image=info, timed_out=ended.timed_out,
                      extra={"host_paths": {"bundle": job.bundle_dir, "data": job.data_path, "data_dir": job.data_dir,
                                            "trainer_path": list(job.trainer_path or []) or None}})

    def close(self) -> None:
        """Stop and remove every container this backend started that is still there (Ctrl-C)."""
        self.engine.stop_all()


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0
