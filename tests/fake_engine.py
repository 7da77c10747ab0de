"""An in-memory stand-in for :class:`harness.docker_engine.Engine`, for unit tests without Docker.

It has the Engine's public methods and keeps what they would touch in plain
dicts: ``store`` (image id -> :class:`FakeImage`), ``tags`` (ref -> id), the containers
running now, and a log of every call in ``calls``. Container runs follow scripted
:class:`Outcome` s (exit status, OOM, an engine refusal such as the missing NVIDIA
runtime, output lines, and a ``worker`` callback that writes files into the mounted
results directory like the real worker would); builds succeed unless the tag's cell
is listed in ``fail_builds``.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pytest

from harness import record as record_io
from harness.docker_engine import ContainerExit, ContainerFacts, ContainerRequest, Engine, ImageFacts, refusal
from harness.errors import BackendError, BuildFailed

from .conftest import patience
from .records import record as compare_record

NO_NVIDIA = 'could not select device driver "" with capabilities: [[gpu]]'
OUT = "/harness/out"


@dataclass
class FakeImage:
    id: str
    tags: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    size: int = 1_000_000
    packages: dict[str, str] = field(default_factory=dict)  # what image_packages reports
    files: dict[str, bytes] = field(default_factory=dict)  # path in the image -> tar of it
    repo_digests: list[str] = field(default_factory=list)  # "repo@sha256:..." for images pulled from a registry


@dataclass
class Outcome:
    """How one scripted container run ends."""

    status: int | None = 0
    oom_killed: bool = False
    error: str | None = None  # an engine refusal (raw engine text, e.g. NO_NVIDIA)
    lines: list[str] = field(default_factory=list)  # what the container prints
    worker: Callable[[Path, ContainerRequest], None] | None = None  # writes into the results dir
    block: bool = False  # keep running until stop_all() (for Ctrl-C tests), its timeout or its watch says stop


@dataclass
class FakeContainer:
    id: str
    request: ContainerRequest
    stopped: threading.Event = field(default_factory=threading.Event)
    removed: bool = False


def image_id_for(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def tar_of(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


class FakeEngine:
    """Same public methods as Engine; state in memory; every call recorded in ``calls``."""

    def __init__(self, *, nvidia: bool = True, free: int | None = 10**12) -> None:
        self.store: dict[str, FakeImage] = {}  # image id -> image
        self.tags: dict[str, str] = {}
        self.nvidia = nvidia  # False: GPU requests are refused like an engine without the NVIDIA runtime
        self.free = free
        self.outcomes: list[Outcome] = []  # consumed in order by run(); empty: exit 0, no output
        self.fail_builds: dict[str, list[str]] = {}  # cell -> log lines of its failing build
        self.build_packages: dict[str, str] = {}  # what a newly built image reports installed
        self.calls: list[tuple[str, Any]] = []
        self.builds: list[dict[str, Any]] = []
        self.runs: list[ContainerRequest] = []
        self.running: dict[str, FakeContainer] = {}
        self.removed_containers: list[str] = []
        self.stopped_containers: list[str] = []
        self.leftover: dict[str, ContainerFacts] = {}  # containers of earlier runs (containers() lists them)
        # What pull() finds: ref -> the RepoDigests the pulled image has (a ref not listed: no registry answers)
        self.registry: dict[str, list[str]] = {}
        self.pulls: list[str] = []
        self.closed = False
        self._seq = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ setup helpers

    def add_image(self, name: str, *tags: str, **kw: Any) -> FakeImage:
        img = FakeImage(id=image_id_for(name), tags=list(tags), **kw)
        self.store[img.id] = img
        for t in tags:
            self.tags[t] = img.id
        return img

    def _find(self, ref: str) -> FakeImage | None:
        return self.store.get(self.tags.get(ref, ref))

    # ------------------------------------------------------------------ Engine API

    @classmethod
    def connect(cls) -> "FakeEngine":
        return cls()

    def close(self) -> None:
        self.calls.append(("close", None))
        self.stop_all()
        self.closed = True

    def image(self, ref: str) -> ImageFacts | None:
        self.calls.append(("image", ref))
        img = self._find(ref)
        if img is None:
            return None
        return ImageFacts(id=img.id, tags=tuple(img.tags), labels=dict(img.labels), size=img.size,
                          repo_digests=tuple(img.repo_digests))

    def image_exists(self, ref: str) -> bool:
        self.calls.append(("image_exists", ref))
        return self._find(ref) is not None

    def image_id(self, ref: str) -> str:
        img = self._find(ref)
        if img is None:
            raise BackendError(f"image {ref} is not in the Docker engine")
        return img.id

    def tag(self, image_id: str, repository: str, tag: str) -> None:
        self.calls.append(("tag", (image_id, repository, tag)))
        ref = f"{repository}:{tag}"
        old = self.tags.get(ref)
        if old and old in self.store and ref in self.store[old].tags:
            self.store[old].tags.remove(ref)
        self.tags[ref] = image_id
        self.store[image_id].tags.append(ref)

    def images(self, repository: str | None = None) -> dict[str, list[str]]:
        self.calls.append(("images", repository))
        return {i.id: list(i.tags) for i in self.store.values()
                if repository is None or any(t.split(":")[0] == repository for t in i.tags)}

    def remove_image(self, ref: str, *, force: bool = False) -> bool:
        self.calls.append(("remove_image", ref))
        img = self._find(ref)
        if img is None:
            return False
        if ref in self.tags and len(img.tags) > 1:  # untag only
            img.tags.remove(ref)
            del self.tags[ref]
            return True
        for t in [t for t, i in self.tags.items() if i == img.id]:
            self.tags.pop(t, None)
        del self.store[img.id]
        return True

    def build(self, context: str | Path, tag: str, buildargs: dict[str, str], labels: dict[str, str] | None = None,
              *, nocache: bool = False, on_log: Callable[[str], None] | None = None, cell: str | None = None) -> str:
        ctx = Path(context)
        files = sorted(p.relative_to(ctx).as_posix() for p in ctx.rglob("*") if p.is_file())
        self.builds.append({"tag": tag, "buildargs": dict(buildargs), "labels": dict(labels or {}),
                            "nocache": nocache, "cell": cell, "files": files,
                            "dockerfile": (ctx / "Dockerfile").read_bytes()})
        lines = ["Step 1/9 : ARG BASE_IMAGE", f"Step 2/9 : FROM {buildargs.get('BASE_IMAGE')}"]
        failing = self.fail_builds.get(cell or "")
        if failing is not None:
            lines += ["Step 5/9 : RUN check-python", *failing]
        for line in lines:
            if on_log:
                on_log(line)
        if failing is not None:
            raise BuildFailed(cell, tag, "step 5/9 (RUN) exited with code 1", lines)
        img = self.add_image(f"built:{tag}:{len(self.builds)}", tag, labels=dict(labels or {}),
                             packages=dict(self.build_packages))
        return img.id

    def pull(self, ref: str) -> None:
        """Like ``docker pull repo@sha256:...``: the image resolves under ``ref`` afterwards (whatever it is)."""
        self.calls.append(("pull", ref))
        self.pulls.append(ref)
        if ref not in self.registry:
            raise BackendError(f"pulling {ref} failed: Get https://registry-1.docker.io/v2/: dial tcp: no route to host")
        img = self.add_image(f"pulled:{ref}", repo_digests=list(self.registry[ref]))
        for ref_ in [ref, *img.repo_digests]:
            self.tags[ref_] = img.id

    def save(self, image_id: str, tag: str | None) -> Iterator[bytes]:
        img = self._find(image_id)
        if img is None:
            raise BackendError(f"Docker engine failed to save image {tag or image_id}: no such image")
        yield json.dumps({"id": img.id, "tags": [tag] if tag else [], "labels": img.labels,
                          "packages": img.packages}).encode()

    def load(self, chunks: Iterable[bytes]) -> Iterator[str]:
        data = json.loads(b"".join(chunks))
        self.calls.append(("load", data["id"]))
        img = FakeImage(id=data["id"], tags=list(data["tags"]), labels=data["labels"], packages=data["packages"])
        self.store[img.id] = img
        for t in img.tags:
            self.tags[t] = img.id
        yield img.id

    def files(self, image_id: str, path: str) -> bytes:
        img = self._find(image_id)
        if img is None:
            raise BackendError(f"Docker engine failed to read {path} from image {image_id[:19]}: no such image")
        return img.files.get(path, tar_of({}))

    def run_command(self, image_id: str, argv: list[str]) -> str:
        self.calls.append(("run_command", (image_id, list(argv))))
        img = self._find(image_id)
        if img is None:
            raise BackendError(f"running {argv[0]} in image {image_id[:19]} failed: No such image")
        if "importlib.metadata" in " ".join(argv):
            return json.dumps(img.packages) + "\n"
        return ""

    def free_bytes(self) -> tuple[str | None, int | None]:
        return "/var/lib/docker", self.free

    def run(self, request: ContainerRequest, on_line: Callable[[str], None] | None = None, *,
            watch: Callable[[], str | None] | None = None, watch_every_s: float = 1.0) -> ContainerExit:
        self.runs.append(request)
        outcome = self.outcomes.pop(0) if self.outcomes else Outcome()
        if request.gpus != "none" and not self.nvidia:
            return ContainerExit(None, error=refusal(request, NO_NVIDIA))
        if outcome.error:
            return ContainerExit(None, error=refusal(request, outcome.error))
        if self._find(request.image) is None:
            return ContainerExit(None, error=refusal(request, f"No such image: {request.image}"))
        with self._lock:
            self._seq += 1
            container = FakeContainer(f"c{self._seq}", request)
            self.running[container.id] = container
        stopped: list[str] = []
        finished = threading.Event()

        def watching() -> None:  # as Engine: asked while the container runs; an answer kills it
            while not finished.wait(watch_every_s):
                why = watch()  # type: ignore[misc]
                if why:
                    stopped.append(why)
                    container.stopped.set()
                    return

        watcher = threading.Thread(target=watching, daemon=True) if watch is not None else None
        if watcher is not None:
            watcher.start()

        def why_stopped() -> str | None:
            finished.set()
            if watcher is not None:
                watcher.join()
            return next(iter(stopped), None)

        try:
            for line in outcome.lines:
                if on_line:
                    on_line(line)
            if outcome.worker is not None:
                out = next(Path(src) for src, target, _ in request.mounts if target == OUT)
                outcome.worker(out, request)
            if outcome.block:
                # a --timeout under 30 s is the engine's own limit (a timed-out exit); otherwise the test
                # stops the container, and a wait that long (scaled by the load) means it never will
                limit = request.timeout_s if request.timeout_s and request.timeout_s < 30 else None
                if not container.stopped.wait(timeout=limit or patience(30)):
                    if limit:
                        return ContainerExit(137, timed_out=True, stopped=why_stopped())  # killed at its timeout
                    raise AssertionError("the blocked container was never stopped")
                return ContainerExit(137, stopped=why_stopped())
            return ContainerExit(outcome.status, oom_killed=outcome.oom_killed, stopped=why_stopped())
        finally:
            why_stopped()
            self._remove(container)

    def containers(self, label: str) -> list[ContainerFacts]:
        self.calls.append(("containers", label))
        key, _, value = label.partition("=")
        with self._lock:
            running = [ContainerFacts(c.id, "running", dict(c.request.labels)) for c in self.running.values()]
        return [f for f in [*self.leftover.values(), *running]
                if key in f.labels and (not value or f.labels[key] == value)]

    def remove_container(self, container_id: str) -> bool:
        self.calls.append(("remove_container", container_id))
        if self.leftover.pop(container_id, None) is not None:
            self.removed_containers.append(container_id)
            return True
        with self._lock:
            container = self.running.get(container_id)
        if container is None:
            return False
        container.stopped.set()
        self._remove(container)
        return True

    def stop_all(self) -> None:
        self.calls.append(("stop_all", None))
        with self._lock:
            running = list(self.running.values())
        for container in running:
            self.stopped_containers.append(container.id)
            container.stopped.set()
            self._remove(container)

    def _remove(self, container: FakeContainer) -> None:
        with self._lock:
            if self.running.pop(container.id, None) is not None:
                container.removed = True
                self.removed_containers.append(container.id)


# --------------------------------------------------------------------------- through `harness matrix`


@pytest.fixture(name="engine")
def connected_engine(monkeypatch: pytest.MonkeyPatch) -> FakeEngine:
    """A FakeEngine that ``Engine.connect()`` returns: the CLI runs against it in-process (shadows the real one)."""
    fake = FakeEngine()
    monkeypatch.setattr(Engine, "connect", classmethod(lambda cls: fake))
    return fake


def ok_worker(out: Path, req: Any) -> None:
    """A container's worker that writes an ok record for the cell its spec names."""
    spec = json.loads((out / "spec.json").read_text())
    record_io.write(out / "record.json", compare_record(spec["cell"]))
