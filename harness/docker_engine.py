"""The one module that talks to the Docker engine.

Everything the harness asks of Docker goes through :class:`Engine`: the
connection, image facts, the one build routine, save/load, reading files and
package lists out of an image, and running a cell's container. Nothing else
under ``harness/`` imports the Docker SDK, so the rest of the package (and its
unit tests, through ``tests/fake_engine.py``) deals in plain data:

* :class:`ImageFacts`      what the engine says about an image,
* :class:`ContainerRequest` what a container gets (built by a pure function in
  :mod:`harness.backends.docker`),
* :class:`ContainerExit`    how it ended.

SDK exceptions become the harness error family here (:class:`BackendError`,
:class:`BuildFailed`), each one line naming the image or tag and the way out.
The SDK itself is imported lazily, so ``import harness`` stays quick.
"""

from __future__ import annotations

import copy
import functools
import gc
import hashlib
import json
import os
import posixpath
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import BackendError, BuildFailed, InputError

# Builds stream output, but a layer commit of a multi-GB venv can be silent for minutes.
DOCKER_TIMEOUT_S = 3600
CHUNK = 1 << 20
START_HINT = "start dockerd (e.g. `setsid dockerd >/var/log/dockerd.log 2>&1 &`) or set DOCKER_HOST"
UNREACHABLE_HINT = START_HINT + ", or retrain without containers with --backend local"


def unreachable(where: str, problem: str) -> BackendError:
    """The one-line error of an engine that does not answer; the hint names the way round it."""
    return BackendError(f"Docker engine not reachable at {where} ({problem})", hint=UNREACHABLE_HINT)


NO_NVIDIA_HINT = "install nvidia-container-toolkit, or run with --gpus none"

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_STEP = re.compile(r"^Step (\d+/\d+) : (\S+)")
_NONZERO = re.compile(r"returned a non-zero code: (\d+)")
# BuildKit's plain progress: "#7 [3/6] RUN ...", "#7 [builder 3/6] RUN ...", "#7 ERROR: ... exit code: 1".
_BK_STEP = re.compile(r"^#(\d+) \[(?:[^\]]*\s)?(\d+/\d+)\] (\S+)")
_BK_ERROR = re.compile(r"^#(\d+) ERROR: (.*)")
_BK_EXIT = re.compile(r"exit code: (\d+)")
# Which docker CLI builds with BuildKit: $HARNESS_DOCKER_CLI, else the first of these that can.
DOCKER_CLI_ENV = "HARNESS_DOCKER_CLI"
DOCKER_CLI_CANDIDATES = ("docker", "/usr/bin/docker", "/usr/local/bin/docker")
BUILDKIT_HINT = ("install the docker buildx plugin, or use a docker CLI older than 23 (it has BuildKit built in: "
                 "Debian 12's docker.io, /usr/bin/docker), or point $HARNESS_DOCKER_CLI at one")


def _sdk() -> Any:
    import docker
    import docker.errors
    import docker.types

    return docker


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(getattr(exc, "explanation", None) or exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


# ----------------------------------------------------------------------------- plain data


@dataclass(frozen=True)
class ImageFacts:
    """What the engine says about one image."""

    id: str
    tags: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    size: int | None = None
    repo_digests: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] | None = None
    user: str = ""
    workdir: str = ""

    @property
    def config(self) -> dict[str, Any]:
        """The image config's run settings, under Docker's own key names."""
        return {"Env": list(self.env), "Entrypoint": list(self.entrypoint) if self.entrypoint is not None else None,
                "User": self.user, "WorkingDir": self.workdir, "Labels": dict(self.labels)}


Mount = tuple[str, str, bool]  # (host source, container target, read_only)


@dataclass(frozen=True)
class ContainerRequest:
    """Everything a container gets, as plain data (no SDK types)."""

    image: str  # id or tag
    command: tuple[str, ...] = ()
    mounts: tuple[Mount, ...] = ()
    environment: dict[str, str] = field(default_factory=dict)
    user: str | None = None  # "uid:gid"; None: the image's user
    gpus: str = "none"  # "all" | "none" | "0,1"
    memory: str | None = None  # e.g. "8g"
    labels: dict[str, str] = field(default_factory=dict)
    network: str = "none"
    read_only: bool = True  # read-only root filesystem
    tmpfs: dict[str, str] = field(default_factory=dict)
    shm_size: str | None = None
    cap_drop: tuple[str, ...] = ("ALL",)  # Linux capabilities taken away
    security_opt: tuple[str, ...] = ("no-new-privileges",)  # setuid binaries gain nothing
    pids_limit: int | None = 4096  # a fork bomb stops here
    timeout_s: float | None = None  # killed when it runs longer
    cell: str = ""  # for messages: whose container this is
    tag: str | None = None  # for messages: the image's tag when ``image`` is an id
    cpuset: str | None = None  # cores it may run on ("0,1"; --jobs), None: any
    cpu_shares: int | None = None  # its CPU weight against other containers (the engine's default: 1024)
    # Writable mounts that get noexec,nosuid,nodev: target -> an empty host folder on the same file system as
    # the mount's source, for the overlay's work folders (a bind mount cannot be noexec; see :func:`overlay_mount`)
    noexec: dict[str, str] = field(default_factory=dict)
    log_max_size: str | None = "10m"  # the container's json-file log is rotated at this size ...
    log_max_files: int = 3  # ... keeping this many files (None size: the engine's default log, uncapped)


@dataclass(frozen=True)
class ContainerExit:
    """How a container ended: its exit status (None: it never ran), OOM, or why the engine refused it."""

    status: int | None
    oom_killed: bool = False
    error: str | None = None
    timed_out: bool = False  # killed at the request's timeout
    notes: tuple[str, ...] = ()  # what the caller should say (a mount that lost its noexec)
    stopped: str | None = None  # killed because the caller's ``watch`` said why (e.g. a cell over its disk limit)


@dataclass(frozen=True)
class ContainerFacts:
    """What the engine says about one container (for finding those a dead run left)."""

    id: str
    status: str  # created | running | exited | ...
    labels: dict[str, str] = field(default_factory=dict)


def failure_reason(error: str, last_step: str | None) -> str:
    """A short reason from the builder's error (which repeats the whole RUN script)."""
    m = _NONZERO.search(error)
    if m:
        return f"{last_step or 'a RUN step'} exited with code {m.group(1)}"
    return error.strip().splitlines()[-1][:300] if error.strip() else "unknown builder error"


def is_step_line(line: str) -> bool:
    """Whether a build log line starts a step (classic ``Step 3/9 : RUN``, BuildKit ``#7 [3/9] RUN``)."""
    return bool(_STEP.match(line) or _BK_STEP.match(line))


def buildkit_failure(lines: Iterable[str]) -> str | None:
    """The short reason of a failed BuildKit build from its plain log: the failing step and its exit code (pure)."""
    steps: dict[str, str] = {}
    first_error: str | None = None
    for line in lines:
        m = _BK_STEP.match(line)
        if m:
            steps[m.group(1)] = f"step {m.group(2)} ({m.group(3)})"
            continue
        e = _BK_ERROR.match(line)
        if e and first_error is None:
            code = _BK_EXIT.search(e.group(2))
            step = steps.get(e.group(1), "a build step")
            first_error = (f"{step} exited with code {code.group(1)}" if code
                           else f"{step}: {e.group(2).strip()[:240]}")
    return first_error


def cli_version_major(text: str) -> int | None:
    """The major version in ``docker --version`` output (``Docker version 20.10.24+dfsg1, build ...``), pure."""
    m = re.search(r"version (\d+)\.", text)
    return int(m.group(1)) if m else None


@functools.lru_cache(maxsize=None)
def buildkit_cli(explicit: str | None = None) -> tuple[str, ...] | None:
    """The argv that starts a BuildKit build (``docker buildx build --load`` or ``docker build``), or None.

    A CLI with the buildx plugin builds through it; one older than 23 has BuildKit built
    in (``DOCKER_BUILDKIT=1``); a newer one without buildx cannot build with BuildKit at all.
    """
    seen: set[str] = set()
    for name in ([explicit] if explicit else DOCKER_CLI_CANDIDATES):
        path = shutil.which(name)
        if not path or os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        try:
            if subprocess.run([path, "buildx", "version"], capture_output=True, timeout=30).returncode == 0:
                return (path, "buildx", "build", "--load")
            version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        major = cli_version_major(version)
        if major is not None and major < 23:
            return (path, "build")
    return None


def buildkit_command(cli: tuple[str, ...], context: str | Path, tag: str, buildargs: dict[str, str],
                     labels: dict[str, str], iidfile: str | Path, *, nocache: bool = False) -> list[str]:
    """The docker CLI command of a BuildKit build (pure): plain progress, image id to ``iidfile``, never pulls."""
    cmd = [*cli, "--progress=plain", "--iidfile", str(iidfile), "-t", tag, "-f", str(Path(context) / "Dockerfile")]
    for k in sorted(labels):
        cmd += ["--label", f"{k}={labels[k]}"]
    for k in sorted(buildargs):
        cmd += ["--build-arg", f"{k}={buildargs[k]}"]
    if nocache:
        cmd.append("--no-cache")
    return cmd + [str(context)]


@dataclass(frozen=True)
class ImageUsage:
    """One image's disk use as the engine reports it (``docker system df -v``)."""

    id: str
    tags: tuple[str, ...]
    labels: dict[str, str]
    size: int  # every layer of the image
    shared_size: int  # the part of it other images hold too (-1: the engine did not say)
    created: int = 0  # unix seconds

    @property
    def unique_size(self) -> int | None:
        """What removing this image alone would free; None when the engine did not say."""
        return self.size - self.shared_size if self.shared_size >= 0 else None


@dataclass(frozen=True)
class DiskUsage:
    """The engine's disk use: its images, all their layers counted once, and build cache no image holds."""

    images: list[ImageUsage]
    layers_size: int
    build_cache: int


def device_requests(gpus: str) -> list[Any]:
    """SDK device requests for a ``gpus`` spec (``all``, ``none``, ``0,1``)."""
    docker = _sdk()
    if gpus == "none":
        return []
    if gpus == "all":
        return [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    return [docker.types.DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]


LONGEST_LINE = 1 << 20  # container output: a longer line without a newline is passed on in pieces


def _mount_refused(error: str) -> bool:
    """Whether an engine's refusal is of a volume it could not mount (pure)."""
    return "mounting volume" in error or "failed to mount local volume" in error


OVERLAY_LOWER = "lower"  # in a noexec mount's work folder: the overlay's empty lower layer ...
OVERLAY_WORK = "work"  # ... and its work folder (the kernel makes work/work, owned by root, left empty)
_OVERLAY_UNSAFE = frozenset(",:\\=\n")  # what mount options cannot carry in a path


def overlay_mount(source: str, target: str, work: str) -> Any:
    """A writable mount of ``source`` at ``target`` that is ``noexec,nosuid,nodev``.

    Docker gives a bind mount no such flags, so it is an anonymous volume of the engine's ``local``
    driver: an overlay whose upper layer is ``source`` itself (what the container writes lands there,
    as with a bind mount) over an empty lower layer, with ``work`` (same file system) for its work
    folder. The engine mounts it when the container starts and removes it with the container.
    """
    docker = _sdk()
    options = (f"lowerdir={work}/{OVERLAY_LOWER},upperdir={source},workdir={work}/{OVERLAY_WORK},"
               "noexec,nosuid,nodev")
    return docker.types.Mount(target, None, type="volume", no_copy=True, driver_config=docker.types.DriverConfig(
        "local", {"type": "overlay", "device": "overlay", "o": options}))  # no_copy: nothing of the image lands there


def overlay_possible(source: str, work: str) -> bool:
    """Whether mount options can name ``source`` and ``work`` (pure): no comma, colon, backslash, = or newline."""
    return not (_OVERLAY_UNSAFE & set(source + work))


def _mount(req: ContainerRequest, source: str, target: str, ro: bool) -> Any:
    docker = _sdk()
    work = req.noexec.get(target)
    if work is not None and not ro:
        return overlay_mount(source, target, work)
    return docker.types.Mount(target, source, type="bind", read_only=ro)


def create_kwargs(req: ContainerRequest) -> dict[str, Any]:
    """``client.containers.create`` keyword arguments for a request."""
    docker = _sdk()
    kwargs: dict[str, Any] = {
        "image": req.image,
        "command": list(req.command),
        "mounts": [_mount(req, source, target, ro) for source, target, ro in req.mounts],
        "environment": dict(req.environment),
        "network_mode": req.network,
        "read_only": req.read_only,
        "labels": dict(req.labels),
        "detach": True,
    }
    if req.tmpfs:
        kwargs["tmpfs"] = dict(req.tmpfs)
    if req.shm_size:
        kwargs["shm_size"] = req.shm_size
    if req.user:
        kwargs["user"] = req.user
    if req.gpus != "none":
        kwargs["device_requests"] = device_requests(req.gpus)
    if req.memory:
        kwargs["mem_limit"] = req.memory
    if req.cpuset:
        kwargs["cpuset_cpus"] = req.cpuset
    if req.cpu_shares:
        kwargs["cpu_shares"] = req.cpu_shares
    if req.cap_drop:
        kwargs["cap_drop"] = list(req.cap_drop)
    if req.security_opt:
        kwargs["security_opt"] = list(req.security_opt)
    if req.pids_limit:
        kwargs["pids_limit"] = req.pids_limit
    if req.log_max_size:
        kwargs["log_config"] = docker.types.LogConfig(
            type="json-file", config={"max-size": req.log_max_size, "max-file": str(req.log_max_files)})
    return kwargs


def output_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """A container's output, line by line without the newline; a line without end is passed on in pieces."""
    buf = b""
    for chunk in chunks:
        buf += chunk
        while b"\n" in buf or len(buf) > LONGEST_LINE:
            line, _, buf = buf.partition(b"\n") if b"\n" in buf[:LONGEST_LINE + 1] else \
                (buf[:LONGEST_LINE], b"", buf[LONGEST_LINE:])
            yield line.decode("utf-8", "replace")
    if buf:
        yield buf.decode("utf-8", "replace")


def followed_output(container: Any) -> Iterator[str]:
    """A started container's output to its end, line by line (:func:`output_lines`), nothing lost.

    The engine's follow stream can close when the container stops before the last writes reach it
    (seen with Docker 20.10 and the json-file driver: a test's final line missing, about once in a
    full test run). Once that stream has ended, the container has stopped and its log is complete,
    so the log is read again, without following, from the byte the stream stopped at.
    """
    return output_lines(_followed_chunks(container))


def _followed_chunks(container: Any) -> Iterator[bytes]:
    seen = 0
    for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=True):
        seen += len(chunk)
        yield chunk
    try:
        container.wait(timeout=30)  # stopped: its output is all in the log now
        skip = seen
        for chunk in container.logs(stream=True, follow=False, stdout=True, stderr=True):
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            yield chunk[skip:]
            skip = 0
    except Exception:  # noqa: BLE001 - the stream read so far is what there is (a removed container, a closed engine)
        return


class Prestarted:
    """A container started ahead of its turn: created, started, and read up to its ready line.

    Its output before that line is kept (:attr:`before`) for the cell's log; the line itself is not.
    A reader thread does the creating and reading, so starting one never blocks the caller.
    """

    def __init__(self, request: ContainerRequest, ready_line: str) -> None:
        self.request = request
        self.ready_line = ready_line
        self.container: Any = None
        self.lines: Iterator[str] | None = None  # the output stream, read up to the ready line
        self.before: list[str] = []
        self.error: str | None = None  # why it will never be ready (the engine refused it, it ended)
        self.done = threading.Event()  # ready, or never will be
        self.created = threading.Event()  # the container exists (or never will: see ``error``)

    @property
    def ready(self) -> bool:
        return self.done.is_set() and self.error is None

    def wait(self, timeout: float | None) -> bool:
        """Whether it is ready within ``timeout`` seconds (False: not yet, or never)."""
        return self.done.wait(timeout) and self.error is None


def refusal(request: ContainerRequest, text: str) -> str:
    """One line for an engine that refused to create or start a container, with the way out."""
    what = request.tag or request.image
    if "could not select device driver" in text:
        who = f"cell {request.cell}" if request.cell else f"a container of {what}"
        return f"{who} asks for a GPU but this Docker engine has no NVIDIA runtime ({text}); {NO_NVIDIA_HINT}"
    if "No such image" in text:
        return f"image {what} vanished from the engine: {text}"
    return f"Docker engine refused to run {what}: {text}"


# ----------------------------------------------------------------------------- a saved image, without its names (pure)


SAVE_MANIFEST = "manifest.json"  # docker save: [{"Config": ..., "RepoTags": [...], "Layers": [...]}]
SAVE_REPOSITORIES = "repositories"  # the legacy {repository: {tag: id}} map; docker load tags from it too
SAVE_INDEX = "index.json"  # OCI layout (docker 25+): its manifests' name annotations name the image too
NAME_ANNOTATIONS = ("org.opencontainers.image.ref.name", "io.containerd.image.name")
SAVE_JSON_MAX = 1 << 20  # manifest.json, index.json of one image: a few KB
CONFIG_MAX = 16 << 20  # an image config is JSON of a few KB; larger members are layers and are not hashed
_SAVE_HINT = "the image archive was altered or was not written by `docker save`"


class ImageStreamRefused(InputError):
    """A ``docker save`` stream that :func:`untagged` does not pass on; ``problem`` says why, naming no file."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__("", problem, hint=_SAVE_HINT)


@dataclass(frozen=True)
class SavedImage:
    """A ``docker save`` stream and the id of the one image it must hold (:meth:`Engine.load` checks it)."""

    chunks: Iterable[bytes]
    image_id: str

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)


class _ChunkReader:
    """A ``read()``-only file over an iterator of byte chunks, for tarfile's stream mode."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = bytearray()

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            nxt = next(self._it, None)
            if nxt is None:
                break
            self._buf += nxt
        if n < 0:
            n = len(self._buf)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def drain(self) -> None:
        """Read the rest (the padding after the end-of-archive blocks), so the source's own checks run."""
        self._buf.clear()
        for _ in self._it:
            pass


def _unpacked_name(name: str) -> str:
    """A member's path as the engine unpacks it: ``./a//b``, ``/a/b`` and ``c/../a/b`` are all ``a/b``."""
    return posixpath.normpath("/" + name).lstrip("/")


def _parents(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _pad(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def _json_member(raw: bytes, name: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ImageStreamRefused(f"holds a {name} that is not JSON") from None


def _without_repo_tags(raw: bytes) -> tuple[bytes, str]:
    """``manifest.json`` with empty ``RepoTags``, and the member it names as the image config."""
    doc = _json_member(raw, SAVE_MANIFEST)
    if not isinstance(doc, list) or len(doc) != 1 or not isinstance(doc[0], dict):
        count = len(doc) if isinstance(doc, list) else type(doc).__name__
        raise ImageStreamRefused(f"holds a {SAVE_MANIFEST} that does not list exactly one image ({count})")
    entry = dict(doc[0])
    config = entry.get("Config")
    if not isinstance(config, str) or not config:
        raise ImageStreamRefused(f"holds a {SAVE_MANIFEST} that names no Config")
    entry["RepoTags"] = []
    return json.dumps([entry]).encode(), _unpacked_name(config)


def _without_names(raw: bytes) -> bytes:
    """OCI ``index.json`` without the annotations that name (tag) its images."""
    doc = _json_member(raw, SAVE_INDEX)
    manifests = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(manifests, list):
        raise ImageStreamRefused(f"holds a {SAVE_INDEX} that is not an OCI index")
    for node in [doc, *manifests]:
        notes = node.get("annotations") if isinstance(node, dict) else None
        if isinstance(notes, dict):
            for key in NAME_ANNOTATIONS:
                notes.pop(key, None)
    return json.dumps(doc).encode()


def _refuse_mismatch(got: str, want: str) -> ImageStreamRefused:
    return ImageStreamRefused(f"holds image {got}, not the expected {want}")


def untagged(chunks: Iterable[bytes], image_id: str | None = None) -> Iterator[bytes]:
    """A ``docker save`` tar stream as the engine may load it: without its names, holding ``image_id``.

    Rewritten member by member as it streams (memory holds a chunk, and manifest.json or
    index.json of at most 1 MB): ``manifest.json`` gets empty ``RepoTags``, ``repositories``
    is left out, ``index.json`` loses its name annotations; every other member passes with
    its metadata and bytes unchanged. The image id is the sha256 of the config member that
    ``manifest.json`` names (``<hex>.json``, or ``blobs/sha256/<hex>`` in OCI layout).

    Refused with :class:`ImageStreamRefused`, before the end-of-archive blocks are sent (so
    the engine loads nothing): input that is not a tar, a name twice, an entry below a link
    or a link in place of a directory, manifest.json or index.json that is not a small
    regular file, a manifest.json that lists other than one image, and, with ``image_id``,
    a config that is missing, not a regular file or of another id. Errors of ``chunks``
    itself reach the caller as they are, also before the end of the stream.
    """
    src = _ChunkReader(chunks)
    seen: set[str] = set()
    links: set[str] = set()
    parents: set[str] = set()
    digests: dict[str, str] = {}  # regular members up to CONFIG_MAX -> "sha256:..." of their bytes
    config: str | None = None
    try:
        tf = tarfile.open(fileobj=src, mode="r|")  # type: ignore[call-overload]  # noqa: SIM115 - read to its end below
        while True:
            info = tf.next()
            if info is None:
                break
            name = _unpacked_name(info.name)
            shown = repr(info.name)[1:-1][:200]
            if name in seen:
                raise ImageStreamRefused(f"holds {shown} twice")
            seen.add(name)
            above = _parents(name)
            link = next((p for p in above if p in links), None)
            if link is not None:
                raise ImageStreamRefused(f"holds {shown} below the link {link}")
            if info.issym() or info.islnk():
                if name in parents:
                    raise ImageStreamRefused(f"holds the link {shown} in place of a directory with entries")
                links.add(name)
            parents.update(above)
            if name == SAVE_REPOSITORIES:
                continue  # the legacy name map: left out, names and all
            if name in (SAVE_MANIFEST, SAVE_INDEX):
                if not info.isreg() or info.size > SAVE_JSON_MAX:
                    what = f"{info.size} bytes" if info.isreg() else "not a regular file"
                    raise ImageStreamRefused(f"holds a {name} that is {what} (a small regular file expected)")
                fobj = tf.extractfile(info)
                raw = fobj.read() if fobj is not None else b""
                if name == SAVE_MANIFEST:
                    raw, config = _without_repo_tags(raw)
                else:
                    raw = _without_names(raw)
                out = copy.copy(info)
                out.size = len(raw)
                out.pax_headers = {k: v for k, v in info.pax_headers.items() if k != "size"}
                yield out.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + raw + _pad(len(raw))
            else:
                yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
                if info.isreg():
                    sha = hashlib.sha256() if info.size <= CONFIG_MAX else None
                    fobj = tf.extractfile(info)
                    left = info.size
                    while left and fobj is not None:
                        block = fobj.read(min(CHUNK, left))
                        if not block:
                            raise ImageStreamRefused(f"ends inside {shown}")
                        left -= len(block)
                        if sha is not None:
                            sha.update(block)
                        yield block
                    yield _pad(info.size)
                    if sha is not None:
                        digests[name] = "sha256:" + sha.hexdigest()
        src.drain()
    except (tarfile.TarError, EOFError, ValueError, UnicodeError) as exc:
        text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ImageStreamRefused(f"is not a readable tar ({text})") from None
    if config is None:
        raise ImageStreamRefused(f"holds no {SAVE_MANIFEST} (every `docker save` writes one)")
    if image_id is not None:
        if config not in digests:
            raise ImageStreamRefused(f"holds no image config {config} (its {SAVE_MANIFEST}'s Config) "
                                     f"as a regular file of at most {CONFIG_MAX >> 20} MB")
        # the classic store's id is its config's digest; the containerd store's, that of a manifest or index blob
        blobs = {d for n, d in digests.items() if n.startswith("blobs/sha256/") and n != config}
        if digests[config] != image_id and image_id not in blobs:
            raise _refuse_mismatch(digests[config], image_id)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


# ----------------------------------------------------------------------------- the engine


class Engine:
    """A connected Docker engine; every SDK call of the harness goes through one of these."""

    def __init__(self, client: Any, builder: str = "auto") -> None:
        self.client = client
        # "auto": BuildKit through the docker CLI when one can, else the SDK's classic builder;
        # "buildkit" / "classic": that one only.
        self.builder = builder
        self._running: list[Any] = []  # containers started by run() and not yet removed
        self._lock = threading.Lock()  # run() is called from several threads at once (--jobs)
        self._no_overlay: str | None = None  # why this engine mounted no noexec overlay (then: bind mounts)

    @classmethod
    def connect(cls) -> "Engine":
        """Connect to ``$DOCKER_HOST`` (or the local socket), or raise a one-line BackendError."""
        docker = _sdk()
        where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        client, problem = None, None
        # A failed connect leaves the SDK's socket unclosed; silence and collect its ResourceWarning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            try:
                client = docker.from_env(timeout=DOCKER_TIMEOUT_S)
                client.ping()
            except docker.errors.DockerException as exc:
                problem = str(exc).splitlines()[0][:200]
                if client is not None:
                    client.close()
            gc.collect()
        if problem is not None:
            raise unreachable(where, problem) from None
        return cls(client)

    def close(self) -> None:
        """Stop and remove every container still running, then drop the connection."""
        self.stop_all()
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - closing twice is fine
            pass

    # ------------------------------------------------------------------ images

    def image(self, ref: str) -> ImageFacts | None:
        """Facts of the image ``ref`` (id or tag), or None when the engine has no such image."""
        docker = _sdk()
        try:
            img = self.client.images.get(ref)
        except docker.errors.ImageNotFound:
            return None
        except docker.errors.APIError as exc:
            raise BackendError(f"Docker engine failed to look up {ref}: {_first_line(exc)}") from exc
        attrs = img.attrs or {}
        config = attrs.get("Config") or {}
        entry = config.get("Entrypoint")
        return ImageFacts(
            id=img.id, tags=tuple(img.tags or ()), labels=dict(config.get("Labels") or {}),
            size=attrs.get("Size"), repo_digests=tuple(attrs.get("RepoDigests") or ()),
            env=tuple(config.get("Env") or ()), entrypoint=tuple(entry) if entry is not None else None,
            user=config.get("User") or "", workdir=config.get("WorkingDir") or "",
        )

    def image_exists(self, ref: str) -> bool:
        """Whether the engine holds an image with this id or tag."""
        docker = _sdk()
        try:
            self.client.images.get(ref)
            return True
        except docker.errors.ImageNotFound:
            return False
        except docker.errors.APIError as exc:
            raise BackendError(f"Docker engine failed to look up {ref}: {_first_line(exc)}") from exc

    def image_id(self, ref: str) -> str:
        """The id of ``ref``; a BackendError when it is not there."""
        facts = self.image(ref)
        if facts is None:
            raise BackendError(f"image {ref} is not in the Docker engine")
        return facts.id

    def tag(self, image_id: str, repository: str, tag: str) -> None:
        """Point ``repository:tag`` at ``image_id`` (moving it if it pointed elsewhere)."""
        docker = _sdk()
        try:
            self.client.api.tag(image_id, repository, tag, force=True)
        except docker.errors.DockerException as exc:
            raise BackendError(f"Docker engine failed to tag {image_id[:19]} as {repository}:{tag}: "
                               f"{_first_line(exc)}") from exc

    def images(self, repository: str | None = None) -> dict[str, list[str]]:
        """``{image id: [tags]}`` of one repository, or of every image (intermediates too) when None."""
        docker = _sdk()
        try:
            found = (self.client.images.list(name=repository) if repository
                     else self.client.images.list(all=True))
        except docker.errors.DockerException as exc:
            raise BackendError(f"Docker engine failed to list images: {_first_line(exc)}") from exc
        return {img.id: list(img.tags or ()) for img in found}

    def remove_image(self, ref: str, *, force: bool = False) -> bool:
        """Remove an image or one of its tags; False when it was not there."""
        docker = _sdk()
        try:
            self.client.images.remove(ref, force=force, noprune=False)
            return True
        except docker.errors.ImageNotFound:
            return False
        except docker.errors.DockerException as exc:
            raise BackendError(f"Docker engine failed to remove image {ref}: {_first_line(exc)}",
                               hint="a container may still use it (`docker ps -a`)") from exc

    def build(self, context: str | Path, tag: str, buildargs: dict[str, str], labels: dict[str, str] | None = None,
              *, nocache: bool = False, on_log: Callable[[str], None] | None = None, cell: str | None = None) -> str:
        """Build ``context``'s Dockerfile as ``tag`` with BuildKit (the docker CLI, never pulls); returns the image id.

        BuildKit leaves no intermediate images: bind-mounted wheels are in no layer and
        there are no stage images to dangle. Its copy of the build context (gigabytes of
        wheels) is dropped from the build cache afterwards. Without a BuildKit CLI, a
        Dockerfile that needs none (an archived classic recipe) goes through the SDK's
        classic builder. A failure raises :class:`BuildFailed` with a short reason (the
        failing step and its exit code) and the log tail.
        """
        cli = buildkit_cli(os.environ.get(DOCKER_CLI_ENV) or None) if self.builder != "classic" else None
        if cli is not None:
            return self._build_buildkit(cli, context, tag, buildargs, labels or {}, nocache=nocache, on_log=on_log,
                                        cell=cell)
        if self.builder != "classic" and "--mount=" in (Path(context) / "Dockerfile").read_text(errors="replace"):
            raise BackendError(f"building {tag} needs BuildKit (its Dockerfile bind-mounts the wheels), "
                               "and no docker CLI here builds with it", hint=BUILDKIT_HINT)
        return self._build_classic(context, tag, buildargs, labels, nocache=nocache, on_log=on_log, cell=cell)

    def _build_buildkit(self, cli: tuple[str, ...], context: str | Path, tag: str, buildargs: dict[str, str],
                        labels: dict[str, str], *, nocache: bool, on_log: Callable[[str], None] | None,
                        cell: str | None) -> str:
        log: deque[str] = deque(maxlen=200)
        seen: list[str] = []  # step and error lines, for the failure reason
        with tempfile.TemporaryDirectory(prefix="harness-iid-") as tmp:
            iidfile = Path(tmp) / "iid"
            cmd = buildkit_command(cli, context, tag, buildargs, labels, iidfile, nocache=nocache)
            env = {**os.environ, "DOCKER_BUILDKIT": "1"}
            try:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                        text=True, errors="replace", stdin=subprocess.DEVNULL)
            except OSError as exc:
                raise BackendError(f"could not start {cli[0]} to build {tag}: {exc}", hint=BUILDKIT_HINT) from exc
            assert proc.stdout is not None
            with proc:
                for raw in proc.stdout:
                    line = _ANSI.sub("", raw.rstrip("\n"))
                    if not line.strip():
                        continue
                    log.append(line)
                    if _BK_STEP.match(line) or _BK_ERROR.match(line):
                        seen.append(line)
                    if on_log:
                        on_log(line)
            image_id = iidfile.read_text().strip() if iidfile.exists() else ""
        if proc.returncode != 0 or not image_id:
            reason = buildkit_failure(seen) or (log[-1][:300] if log else f"{cli[0]} exited with {proc.returncode}")
            raise BuildFailed(cell, tag, reason, log)
        self.prune_build_cache(types=("source.local",))
        return image_id

    def _build_classic(self, context: str | Path, tag: str, buildargs: dict[str, str],
                       labels: dict[str, str] | None = None, *, nocache: bool = False,
                       on_log: Callable[[str], None] | None = None, cell: str | None = None) -> str:
        docker = _sdk()
        log: deque[str] = deque(maxlen=200)
        last_step: list[str] = []

        def emit(line: str) -> None:
            line = _ANSI.sub("", line)
            m = _STEP.match(line)
            if m:
                last_step[:] = [f"step {m.group(1)} ({m.group(2)})"]
            log.append(line)
            if on_log:
                on_log(line)

        try:
            stream = self.client.api.build(
                path=str(context), dockerfile="Dockerfile", tag=tag, buildargs=dict(buildargs),
                labels=dict(labels or {}), decode=True, rm=True, forcerm=True, pull=False, nocache=nocache,
            )
            failure: str | None = None
            # Read the stream to its end even after an error, so the SDK releases the socket.
            for chunk in stream:
                if "error" in chunk and failure is None:
                    error = str(chunk["error"])
                    failure = failure_reason(error, last_step[0] if last_step else None)
                    if not _NONZERO.search(error):
                        emit(error.rstrip())
                    continue
                text = chunk.get("stream") or chunk.get("status")
                if text:
                    for line in str(text).rstrip("\n").splitlines():
                        emit(line)
            if failure is not None:
                raise BuildFailed(cell, tag, failure, log)
        except docker.errors.APIError as exc:
            raise BuildFailed(cell, tag, str(exc.explanation or exc), log) from exc
        except docker.errors.DockerException as exc:
            raise BackendError(f"Docker engine failed while building {tag}: {exc}") from exc
        facts = self.image(tag)
        if facts is None:
            raise BuildFailed(cell, tag, "the build ended without producing the image", log)
        return facts.id

    def disk_usage(self) -> DiskUsage:
        """Every image's size and shared size, the layers' total, the build cache (``docker system df -v``)."""
        docker = _sdk()
        try:
            df = self.client.df()
        except docker.errors.DockerException as exc:
            raise BackendError(f"Docker engine failed to report disk usage: {_first_line(exc)}") from exc
        images = [
            ImageUsage(id=str(i.get("Id", "")), tags=tuple(t for t in (i.get("RepoTags") or ()) if t != "<none>:<none>"),
                       labels=dict(i.get("Labels") or {}), size=int(i.get("Size") or 0),
                       shared_size=int(i["SharedSize"]) if i.get("SharedSize") is not None else -1,
                       created=int(i.get("Created") or 0))
            for i in df.get("Images") or ()
        ]
        cache = sum(int(r.get("Size") or 0) for r in df.get("BuildCache") or () if not r.get("Shared"))
        return DiskUsage(images=images, layers_size=int(df.get("LayersSize") or 0), build_cache=cache)

    def layers(self, image_id: str) -> list[tuple[str, int]]:
        """The image's history as ``(key, bytes)`` from the bottom: equal keys are one layer two images share.

        A key hashes the entry and every entry below it, so it names a layer and its
        parents the way the layer store does, without reading the store.
        """
        import hashlib

        docker = _sdk()
        try:
            history = self.client.api.history(image_id)
        except docker.errors.DockerException as exc:
            raise BackendError(f"Docker engine failed to read the history of {image_id[:19]}: {_first_line(exc)}") from exc
        out, key = [], ""
        for entry in reversed(history or []):
            key = hashlib.sha256(f"{key}|{entry.get('Created')}|{entry.get('CreatedBy')}|{entry.get('Size')}"
                                 .encode()).hexdigest()
            out.append((key, int(entry.get("Size") or 0)))
        return out

    def prune_dangling_images(self, label: str, *, dry_run: bool = False) -> tuple[list[str], int]:
        """Remove untagged images carrying ``label``; the ids removed and the bytes freed."""
        docker = _sdk()
        try:
            if dry_run:
                found = self.client.images.list(filters={"dangling": True, "label": label})
                return [i.id for i in found], 0
            res = self.client.images.prune(filters={"dangling": True, "label": label})
        except docker.errors.DockerException as exc:
            raise BackendError(f"Docker engine failed to prune dangling images: {_first_line(exc)}") from exc
        deleted = [d.get("Deleted") for d in (res.get("ImagesDeleted") or ()) if d.get("Deleted")]
        return deleted, int(res.get("SpaceReclaimed") or 0)

    def prune_build_cache(self, types: tuple[str, ...] = ()) -> int:
        """Drop BuildKit cache that no image holds and no build uses (only of ``types`` when given); bytes freed.

        Best effort: an engine without BuildKit or without the filter frees nothing.
        """
        try:
            res = self.client.api.prune_builds(filters={"type": list(types)} if types else None)
        except Exception:  # noqa: BLE001 - an old engine without build-cache pruning
            return 0
        return int((res or {}).get("SpaceReclaimed") or 0)

    def pull(self, ref: str) -> None:
        """Pull ``ref`` (``repo@sha256:...``) from its registry; a BackendError when it cannot (no registry, no such digest).

        Only pinned base images are pulled (:func:`harness.images.build.ensure_base`), and the
        caller checks the pulled image's RepoDigests against the pin.
        """
        docker = _sdk()
        repo, sep, digest = ref.partition("@")
        problem: str | None = None
        try:
            stream = self.client.api.pull(repo, tag=digest if sep else None, stream=True, decode=True)
            for msg in stream:  # read to the end, so that the SDK releases the connection
                if isinstance(msg, dict) and msg.get("error") and problem is None:
                    problem = str(msg["error"])
        except docker.errors.DockerException as exc:
            raise BackendError(f"pulling {ref} failed: {_first_line(exc)}") from exc
        if problem is not None:
            raise BackendError(f"pulling {ref} failed: {problem.splitlines()[0][:300]}")

    def save(self, image_id: str, tag: str | None) -> Iterator[bytes]:
        """``docker save`` of one image, streamed; tagged with ``tag`` only (not every alias)."""
        docker = _sdk()
        try:
            image = self.client.images.get(image_id)
            yield from image.save(chunk_size=CHUNK, named=tag if tag else False)
        except docker.errors.DockerException as exc:
            raise BackendError(f"Docker engine failed to save image {tag or image_id}: {exc}") from exc

    def load(self, chunks: Iterable[bytes]) -> Iterator[str]:
        """``docker load`` of a saved image, without its names; yields each image ref the engine reports loaded.

        The stream reaches the engine through :func:`untagged`: the names it carries
        (``RepoTags``, ``repositories``, OCI name annotations) are dropped, so a load never
        points a tag at the image (containers are started by id). ``chunks`` that is a
        :class:`SavedImage` also has its image id checked while it streams: a stream that
        holds another image stops before its end, so the engine loads nothing.

        A generator, so a caller that has to clean up after a failure knows what was
        loaded before it. An error the engine reports is raised as a BackendError once
        the stream is read; errors of ``chunks`` itself (and :class:`ImageStreamRefused`)
        reach the caller as they are.
        """
        docker = _sdk()
        problem: str | None = None
        stream = untagged(chunks, chunks.image_id if isinstance(chunks, SavedImage) else None)
        try:
            for msg in self.client.api.load_image(stream):
                if not isinstance(msg, dict):
                    continue
                if msg.get("error") and problem is None:
                    problem = str(msg["error"])
                text = str(msg.get("stream") or "")
                for prefix in ("Loaded image ID: ", "Loaded image: "):
                    if text.startswith(prefix):
                        yield text[len(prefix):].strip()
        except docker.errors.DockerException as exc:
            raise BackendError(_first_line(exc)) from exc
        if problem is not None:
            raise BackendError(problem.splitlines()[0][:300] if problem.strip() else "the engine refused the image")

    def files(self, image_id: str, path: str) -> bytes:
        """A tar of ``path`` inside an image, read from a created (never started) container."""
        docker = _sdk()
        container = None
        try:
            container = self.client.containers.create(image_id, command=["true"], network_mode="none")
            stream, _ = container.get_archive(path)
            return b"".join(stream)
        except docker.errors.DockerException as exc:
            raise BackendError(f"Docker engine failed to read {path} from image {image_id[:19]}: {exc}") from exc
        finally:
            _remove_container(container)

    def run_command(self, image_id: str, argv: list[str]) -> str:
        """Run ``argv`` as the entrypoint of a throwaway container without network; its stdout."""
        docker = _sdk()
        try:
            out = self.client.containers.run(image_id, entrypoint=list(argv), network_mode="none",
                                             remove=True, stdout=True, stderr=False)
        except docker.errors.DockerException as exc:
            raise BackendError(f"running {argv[0]} in image {image_id[:19]} failed: {_first_line(exc, 200)}") from exc
        return out.decode("utf-8", "replace") if isinstance(out, bytes) else str(out)

    def free_bytes(self) -> tuple[str | None, int | None]:
        """The engine's DockerRootDir and its free bytes, when this process can see it."""
        try:
            root = self.client.info().get("DockerRootDir")
        except Exception:  # noqa: BLE001 - a remote engine need not say
            return None, None
        if not root:
            return None, None
        try:
            return root, shutil.disk_usage(root).free
        except OSError:
            return root, None

    # ------------------------------------------------------------------ containers

    def run(self, request: ContainerRequest, on_line: Callable[[str], None] | None = None, *,
            watch: Callable[[], str | None] | None = None, watch_every_s: float = 1.0,
            prestarted: Prestarted | None = None) -> ContainerExit:
        """Run a container to its end, passing each output line (without newline) to ``on_line``.

        ``watch``: asked every ``watch_every_s`` while the container runs (from a thread that ends
        with it); an answer kills the container as its timeout does, and ``stopped`` carries it.

        The container is removed afterwards whatever happened; while it runs,
        :meth:`stop_all` (Ctrl-C) stops and removes it. An engine refusal is
        returned as ``error``, in one line that says the way out.

        An engine that cannot mount a ``noexec`` overlay there (the results directory on NFS, on
        an overlay file system; a rootless engine) runs the container again with bind mounts, and
        ``notes`` says so; it is not tried again on this engine.
        """
        from dataclasses import replace

        if prestarted is not None:  # started ahead and given its turn (go): its mounts are settled
            return self._run(request, on_line, watch, watch_every_s, prestarted)
        if request.noexec and self._no_overlay is None:
            ended = self._run(request, on_line, watch, watch_every_s)
            if ended.status is not None or ended.error is None or not _mount_refused(ended.error):
                return ended
            self._no_overlay = ended.error
        if not request.noexec:
            return self._run(request, on_line, watch, watch_every_s)
        note = (f"{', '.join(sorted(request.noexec))} is mounted without noexec,nosuid,nodev: the engine cannot "
                f"mount an overlay over the cell's directory ({self._no_overlay.rsplit(': ', 1)[-1][:200]}; "
                "its file system may be NFS or an overlay, or the engine rootless)")
        if on_line:
            on_line(f"harness: {note}")
        ended = self._run(replace(request, noexec={}), on_line, watch, watch_every_s)
        return replace(ended, notes=(*ended.notes, note))

    def prestart(self, request: ContainerRequest, ready_line: str) -> Prestarted:
        """Create and start a container now, and read its output until it prints ``ready_line``.

        Returns at once; :meth:`Prestarted.wait` says when it is ready. Hand it to :meth:`run`
        (after :meth:`go`) to run it to its end, or to :meth:`discard`. While it waits,
        :meth:`stop_all` (Ctrl-C) stops and removes it like any container started here. An engine
        that cannot mount the ``noexec`` overlay fails it (``error``): its caller runs the cell
        with :meth:`run`, which knows the way around that.
        """
        docker = _sdk()
        pre = Prestarted(request, ready_line)
        if request.noexec and self._no_overlay is not None:  # run() mounts it another way, and says so
            pre.error = "this engine cannot mount the noexec overlay"
            pre.done.set()
            return pre

        def reading() -> None:
            try:
                container = self.client.containers.create(**create_kwargs(request))
                with self._lock:
                    self._running.append(container)
                pre.container = container
                pre.created.set()
                container.start()
                pre.lines = followed_output(container)
                for line in pre.lines:
                    if line == ready_line:
                        return
                    pre.before.append(line)
                    del pre.before[:-200]  # import warnings, at most: the tail is what a reader needs
                pre.error = "it ended before it was ready" + (f": {pre.before[-1][:300]}" if pre.before else "")
            except docker.errors.APIError as exc:
                pre.error = refusal(request, str(exc.explanation or exc))
            except docker.errors.DockerException as exc:
                pre.error = f"Docker engine failed while starting {request.tag or request.image}: {_first_line(exc)}"
            finally:
                pre.created.set()
                pre.done.set()

        threading.Thread(target=reading, name=f"prestart {request.cell or request.image}", daemon=True).start()
        return pre

    def go(self, pre: Prestarted, signal: str | int, *, cpuset: str | None, cpu_shares: int | None,
           wait_s: float | None) -> str | None:
        """Give a container started ahead its turn: its cores and CPU weight now (an import still running
        goes on at the cell's weight), then ``signal`` once it is ready; None, or why it cannot go."""
        docker = _sdk()
        pre.created.wait(wait_s)
        if pre.container is None:
            return pre.error or "its container was not created in time"
        try:
            changes: dict[str, Any] = {}
            if cpuset != pre.request.cpuset and cpuset:
                changes["cpuset_cpus"] = cpuset
            if cpu_shares and cpu_shares != pre.request.cpu_shares:
                changes["cpu_shares"] = cpu_shares
            if changes:
                pre.container.update(**changes)
            if not pre.wait(wait_s):
                return pre.error or f"it was still importing after {wait_s:.0f}s"
            pre.container.kill(signal=signal)
        except docker.errors.DockerException as exc:
            return f"the engine could not give it its turn: {_first_line(exc)}"
        return None

    def discard(self, pre: Prestarted) -> None:
        """Stop and remove a container started ahead that will not run (waits for it to exist, not to be ready)."""
        pre.created.wait(60)
        self._forget(pre.container)

    def _run(self, request: ContainerRequest, on_line: Callable[[str], None] | None,
             watch: Callable[[], str | None] | None = None, watch_every_s: float = 1.0,
             prestarted: Prestarted | None = None) -> ContainerExit:
        docker = _sdk()
        what = request.tag or request.image
        container = None
        timer = watcher = None
        expired, finished = threading.Event(), threading.Event()
        stopped: list[str] = []

        def why_stopped() -> str | None:  # once the container is gone: the watcher is done, it kills nothing more
            finished.set()
            if watcher is not None:
                watcher.join()
            return next(iter(stopped), None)

        def expire() -> None:
            expired.set()
            try:
                container.kill()  # the log stream below ends with it
            except Exception:  # noqa: BLE001 - it ended by itself meanwhile
                pass

        def watching() -> None:  # until the container ends, or the watch says why it must
            while not finished.wait(watch_every_s):
                try:
                    why = watch()  # type: ignore[misc]
                except Exception:  # noqa: BLE001 - a watch that fails stops nothing
                    continue
                if why:
                    stopped.append(why)
                    try:
                        container.kill()  # as at the timeout: the log stream ends, the container is removed
                    except Exception:  # noqa: BLE001 - it ended by itself meanwhile
                        pass
                    return

        try:
            if prestarted is None:
                container = self.client.containers.create(**create_kwargs(request))
                with self._lock:
                    self._running.append(container)
                container.start()
                lines = followed_output(container)
            else:  # given its turn by go(): its output so far, then the rest of the same stream
                container = prestarted.container
                lines = prestarted.lines or iter(())
                for line in prestarted.before:
                    if on_line:
                        on_line(line)
            if request.timeout_s:
                timer = threading.Timer(request.timeout_s, expire)
                timer.daemon = True
                timer.start()
            if watch is not None:
                watcher = threading.Thread(target=watching, name=f"watch {request.cell or what}", daemon=True)
                watcher.start()
            for line in lines:
                if on_line:
                    on_line(line)
            status = int(container.wait().get("StatusCode", -1))
            container.reload()
            oom = bool((container.attrs.get("State") or {}).get("OOMKilled"))
            return ContainerExit(status, oom_killed=oom, timed_out=expired.is_set(), stopped=why_stopped())
        except docker.errors.APIError as exc:
            return ContainerExit(None, error=refusal(request, str(exc.explanation or exc)), timed_out=expired.is_set(),
                                 stopped=why_stopped())
        except docker.errors.DockerException as exc:
            return ContainerExit(None, error=f"Docker engine failed while running {what}: {exc}",
                                 timed_out=expired.is_set(), stopped=why_stopped())
        finally:
            why_stopped()
            if timer is not None:
                timer.cancel()
            self._forget(container)

    def containers(self, label: str) -> list[ContainerFacts]:
        """Every container (running or not) carrying ``label`` (``key`` or ``key=value``)."""
        docker = _sdk()
        try:
            found = self.client.containers.list(all=True, filters={"label": label})
        except docker.errors.DockerException as exc:
            raise BackendError(f"Docker engine failed to list containers: {_first_line(exc)}") from exc
        return [ContainerFacts(id=c.id, status=str(c.status or ""), labels=dict(c.labels or {})) for c in found]

    def remove_container(self, container_id: str) -> bool:
        """Stop and remove one container; False when it was already gone."""
        docker = _sdk()
        try:
            self.client.containers.get(container_id).remove(force=True, v=True)  # v: its anonymous volumes too
            return True
        except docker.errors.NotFound:
            return False
        except docker.errors.DockerException as exc:
            raise BackendError(f"Docker engine failed to remove container {container_id[:12]}: "
                               f"{_first_line(exc)}") from exc

    def stop_all(self) -> None:
        """Stop and remove every container :meth:`run` started that is still there (Ctrl-C)."""
        with self._lock:
            running = list(self._running)
        for container in running:
            try:
                container.stop(timeout=5)
            except Exception:  # noqa: BLE001 - already stopped or gone
                pass
            self._forget(container)

    def _forget(self, container: Any) -> None:
        _remove_container(container)
        with self._lock:
            if container is not None and container in self._running:
                self._running.remove(container)


def _remove_container(container: Any) -> None:
    if container is None:
        return
    try:
        container.remove(force=True, v=True)  # v: its anonymous volumes (a noexec overlay) too
    except Exception:  # noqa: BLE001 - already gone
        pass
