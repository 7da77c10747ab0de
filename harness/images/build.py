"""Build one Docker image per matrix cell, content-addressed so nothing is rebuilt twice.

Pure part: :func:`plan_build` turns a cell (+ its wheelhouse) into a :class:`BuildPlan`:
build args, the pip lock, the files of the build context and the tag
``harness:<cell>-<12 hex>`` hashed over everything that goes into the image.
Effects part: :func:`build` / :func:`ensure_images` build through a
:class:`~harness.docker_engine.Engine` (BuildKit), and :func:`make_wheelhouse`
runs ``pip download`` on the host. :func:`write_context` lays out the build context;
``snapshot rebuild`` goes through the same :func:`recipe_plan` and :func:`build_plan_image`.

Every built image is also tagged with the stable alias ``harness:<cell>``, which is
what compose.yaml refers to.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping

from ..errors import (BackendError, BaseImageMismatch, BaseImageMissing, BuildFailed, HarnessError, InputError,
                      RunFailed)
from ..safeio import sha256_file
from .matrix import ImageCell, same_image_digest

if TYPE_CHECKING:
    from ..docker_engine import Engine

__all__ = ["BaseImageMismatch", "BaseImageMissing", "BuildFailed"]  # re-exported: raised by builds, defined with the error family

REPOSITORY = "harness"
DOCKERFILE = "Dockerfile.cuda"
DIGEST_CACHE = ".harness-wheel-digests.json"
# What the worker imports inside the image, besides the harness source.
IMAGE_PACKAGES = ("numpy", "pyyaml", "joblib", "scikit-learn")
LABEL_CELL = "org.harness.cell"
LABEL_HASH = "org.harness.input-hash"
LABEL_BASE = "org.harness.base-image"
LABEL_BASE_DIGEST = "org.harness.base-digest"  # only on images built on a base pinned by digest


@dataclass(frozen=True)
class Wheel:
    """One wheel file of a wheelhouse."""

    filename: str
    path: Path
    sha256: str
    name: str  # canonical project name
    version: str


@dataclass(frozen=True)
class BuildPlan:
    """Everything needed to build one cell's image, decided before touching Docker."""

    cell: ImageCell
    tag: str  # harness:<cell>-<hash12>
    buildargs: dict[str, str]
    dockerfile: str  # Dockerfile text
    context_files: tuple[str, ...]  # paths inside the build context
    lock: str  # requirements.lock text
    input_hash: str  # full sha256 hex
    wheels: tuple[Wheel, ...] = ()
    sources: dict[str, Path] = field(default_factory=dict)  # context path -> file on disk

    @property
    def alias(self) -> str:
        """The stable tag compose.yaml uses: ``harness:<cell>``."""
        return f"{REPOSITORY}:{self.cell.name}"

    @property
    def labels(self) -> dict[str, str]:
        labels = {
            LABEL_CELL: self.cell.name,
            LABEL_HASH: self.input_hash,
            "org.harness.torch": self.cell.torch,
            "org.harness.variant": self.cell.variant,
            LABEL_BASE: self.cell.base_image,
        }
        if self.cell.base_digest:
            labels[LABEL_BASE_DIGEST] = self.cell.base_digest
        return labels


@dataclass(frozen=True)
class BuiltImage:
    """A cell's image in the engine: built now (``built``) or found already there."""

    tag: str
    id: str
    cell: str
    seconds: float
    built: bool


# ----------------------------------------------------------------------------- pure


def canonical_name(name: str) -> str:
    """PEP 503 project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_wheel_filename(filename: str) -> tuple[str, str, str]:
    """``(canonical name, version, python tag)`` of a wheel file name."""
    parts = filename[: -len(".whl")].split("-")
    if not filename.endswith(".whl") or len(parts) not in (5, 6):
        raise InputError(filename, "not a wheel file name (name-version[-build]-python-abi-platform.whl)")
    return canonical_name(parts[0]), parts[1], parts[-3]


def _python_tag_fits(tag: str, python: str) -> bool:
    # cp311 wheels only fit 3.11; py3/py2.py3 (and abi3 cp3X, rare here) fit any.
    want = "cp" + python.replace(".", "")
    return any(not t.startswith("cp") or t == want for t in tag.split("."))


def lock_text(cell: ImageCell, wheels: Iterable[Wheel]) -> str:
    """A pip requirements file pinning every wheel by version and sha256 (index builds: pins only)."""
    head = f"# requirements.lock for harness cell {cell.name}: torch {cell.torch} ({cell.variant}), python {cell.python}\n"
    wheels = list(wheels)
    if not wheels:
        # Index builds resolve at build time; only torch is pinned, so they are not reproducible
        # byte for byte. Use a wheelhouse for that.
        reqs = [f"torch=={cell.torch}", *IMAGE_PACKAGES]
        return head + "# index build: resolved at build time\n" + "\n".join(reqs) + "\n"
    groups: dict[tuple[str, str], list[str]] = {}
    versions: dict[str, set[str]] = {}
    for w in wheels:
        groups.setdefault((w.name, w.version), []).append(w.sha256)
        versions.setdefault(w.name, set()).add(w.version)
    clash = sorted(n for n, v in versions.items() if len(v) > 1)
    if clash:
        raise InputError(
            f"wheelhouse of {cell.name}",
            f"several versions of {', '.join(clash)}",
            hint="keep one version per project in a cell's wheelhouse",
        )
    lines = [head, f"# {len(wheels)} wheels; install with pip --no-index --require-hashes\n"]
    for (name, version), hashes in sorted(groups.items()):
        opts = " ".join(f"--hash=sha256:{h}" for h in sorted(set(hashes)))
        lines.append(f"{name}=={version} {opts}\n")
    return "".join(lines)


def is_cuda_wheel(name: str) -> bool:
    """Whether a project is one of CUDA's own libraries (``nvidia-*``, ``cuda-*``): the same for
    every torch of one CUDA version, so it goes into the layer those cells share."""
    return name.startswith(("nvidia-", "cuda-"))


def cuda_lock_text(lock: str, wheels: Iterable[Wheel]) -> str:
    """The lines of ``lock`` that pin CUDA libraries (``cuda/requirements.lock``); empty without any (pure).

    No header: two cells of one CUDA version must get byte-identical text to share the layer.
    """
    cuda = {w.name for w in wheels if is_cuda_wheel(w.name)}
    lines = [ln for ln in lock.splitlines(keepends=True)
             if not ln.startswith("#") and ln.split("==", 1)[0].strip() in cuda]
    return "".join(lines)


def build_args(cell: ImageCell, source: str) -> dict[str, str]:
    """The Dockerfile.cuda build args for a cell (``source``: wheelhouse | index).

    A base pinned by digest is named by it (``repo@sha256:...``), so the digest is hashed
    into the image's tag and the build cannot use another image of the same name.
    """
    return {
        "BASE_IMAGE": cell.base_ref,
        "PYTHON": cell.python,
        "INSTALL_SOURCE": source,
        "TORCH_INDEX_URL": cell.index_url or "",
        "TORCH_VERSION": cell.torch,
    }


def input_hash(dockerfile: bytes, buildargs: dict[str, str], wheels: Iterable[Wheel],
               sources: dict[str, bytes], lock: str) -> str:
    """sha256 over everything that shapes the image (order-independent where order is not meaningful)."""
    h = hashlib.sha256()
    h.update(b"dockerfile\0" + dockerfile + b"\0")
    for k in sorted(buildargs):
        h.update(f"arg\0{k}={buildargs[k]}\0".encode())
    for w in sorted(wheels, key=lambda w: w.filename):
        h.update(f"wheel\0{w.filename}\0{w.sha256}\0".encode())
    for rel in sorted(sources):
        h.update(f"src\0{rel}\0".encode() + hashlib.sha256(sources[rel]).hexdigest().encode() + b"\0")
    h.update(b"lock\0" + lock.encode())
    return h.hexdigest()


def harness_sources(repo_root: Path) -> dict[str, Path]:
    """The package source copied into the image: ``harness/**/*.py`` + ``py.typed``."""
    pkg = repo_root / "harness"
    if not pkg.is_dir():
        raise InputError(str(pkg), "the harness package source is missing", hint="run from a harness checkout")
    out = {}
    for p in sorted(pkg.rglob("*")):
        if p.is_file() and (p.suffix == ".py" or p.name == "py.typed") and "__pycache__" not in p.parts:
            out[p.relative_to(repo_root).as_posix()] = p
    return out


# ----------------------------------------------------------------------------- wheels


def wheel_digests(wheelhouse: Path) -> dict[str, str]:
    """sha256 of every wheel, cached in a JSON beside them keyed by name, size and mtime."""
    cache_path = wheelhouse / DIGEST_CACHE
    try:
        cache = json.loads(cache_path.read_text()).get("wheels", {})
    except (OSError, ValueError, AttributeError):
        cache = {}
    out, fresh, dirty = {}, {}, False
    for p in sorted(wheelhouse.glob("*.whl")):
        st = p.stat()
        hit = cache.get(p.name)
        if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            digest = hit["sha256"]
        else:
            digest, dirty = sha256_file(p), True
        out[p.name] = digest
        fresh[p.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    if dirty or set(fresh) != set(cache):
        try:
            tmp = cache_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"version": 1, "wheels": fresh}, indent=1, sort_keys=True))
            os.replace(tmp, cache_path)
        except OSError:
            pass  # a read-only wheelhouse only costs re-hashing next time
    return out


def resolve_wheels(cell: ImageCell, wheelhouse: Path) -> tuple[Wheel, ...]:
    """The wheels of ``wheelhouse`` that fit the cell's Python; checks torch is there and pinned right."""
    where = str(wheelhouse)
    if not wheelhouse.is_dir():
        raise InputError(where, f"wheelhouse for cell {cell.name} does not exist",
                         hint=f"make it with `harness images wheelhouse --cells {cell.name} --dest DIR`")
    digests = wheel_digests(wheelhouse)
    wheels = []
    for fname, digest in digests.items():
        name, version, pytag = parse_wheel_filename(fname)
        if _python_tag_fits(pytag, cell.python):
            wheels.append(Wheel(fname, wheelhouse / fname, digest, name, version))
    torches = [w for w in wheels if w.name == "torch"]
    if not torches:
        raise InputError(where, f"no torch wheel for python {cell.python} (cell {cell.name})",
                         hint=f"make it with `harness images wheelhouse --cells {cell.name} --dest DIR`")
    found = {w.version.split("+")[0] for w in torches}
    if found != {cell.torch}:
        raise InputError(where, f"holds torch {', '.join(sorted(found))} but cell {cell.name} pins {cell.torch}",
                         hint="point --wheelhouse at the right directory")
    return tuple(sorted(wheels, key=lambda w: w.filename))


def plan_build(cell: ImageCell, repo_root: str | Path, wheelhouse_dir: str | Path | None) -> BuildPlan:
    """Decide the tag, build args, lock and context of a cell's image.

    With a wheelhouse the image installs offline from it, whatever the cell's
    ``source``; a ``source: wheelhouse`` cell without one is refused.
    """
    root = Path(repo_root)
    if wheelhouse_dir is None and cell.source == "wheelhouse":
        raise InputError(
            f"cell {cell.name}", "builds from a wheelhouse (source: wheelhouse) but none was given",
            hint=f"pass --wheelhouse DIR (one subdir per cell) or --wheelhouse {cell.name}=DIR",
        )
    wheels = resolve_wheels(cell, Path(wheelhouse_dir)) if wheelhouse_dir is not None else ()
    source = "wheelhouse" if wheelhouse_dir is not None else "index"
    try:
        dockerfile = (root / DOCKERFILE).read_bytes()
    except OSError:
        raise InputError(str(root / DOCKERFILE), "not found", hint="run from a harness checkout") from None
    return recipe_plan(cell, None, dockerfile, build_args(cell, source), lock_text(cell, wheels), wheels,
                       harness_sources(root))


def recipe_plan(cell: ImageCell, tag: str | None, dockerfile: bytes, buildargs: dict[str, str], lock: str,
                wheels: Iterable[Wheel], sources: Mapping[str, Path]) -> BuildPlan:
    """The plan for a recipe: Dockerfile, build args, lock, wheels and harness sources (context path -> file).

    :func:`plan_build` makes one from this checkout; ``snapshot rebuild`` from an archive.
    ``tag`` defaults to the content tag ``harness:<cell>-<hash12>``.
    """
    wheels = tuple(sorted(wheels, key=lambda w: w.filename))
    sources = dict(sorted(sources.items()))
    digest = input_hash(dockerfile, buildargs, wheels, {k: p.read_bytes() for k, p in sources.items()}, lock)
    cuda = [f"cuda/{w.filename}" for w in wheels if is_cuda_wheel(w.name)]
    files = ("Dockerfile", "requirements.lock", *(f"wheelhouse/{w.filename}" for w in wheels),
             *(["cuda/requirements.lock", *cuda] if cuda else []), *sources)
    return BuildPlan(
        cell=cell, tag=tag or f"{REPOSITORY}:{cell.name}-{digest[:12]}", buildargs=dict(buildargs),
        dockerfile=dockerfile.decode(), context_files=files, lock=lock, input_hash=digest,
        wheels=wheels, sources=sources,
    )


# ----------------------------------------------------------------------------- effects


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # a 3 GB wheelhouse costs nothing this way
    except OSError:
        shutil.copy2(src, dst)


def write_context(plan: BuildPlan, dest: Path) -> None:
    """Lay out the build context in ``dest``: Dockerfile, lock, wheelhouse/, cuda/, harness/.

    ``cuda/`` holds the CUDA libraries' wheels again (hard links) with their own lock, so the
    layer that installs them depends on nothing else. Archived classic recipes ignore it.
    """
    (dest / "Dockerfile").write_bytes(plan.dockerfile.encode())
    (dest / "requirements.lock").write_text(plan.lock)
    for sub in ("wheelhouse", "cuda"):
        (dest / sub).mkdir()
        # An empty directory is fine, but keep one file so every tar tool keeps the dir.
        (dest / sub / ".keep").write_text("")
    for w in plan.wheels:
        _link_or_copy(w.path, dest / "wheelhouse" / w.filename)
        if is_cuda_wheel(w.name):
            _link_or_copy(w.path, dest / "cuda" / w.filename)
    cuda_lock = cuda_lock_text(plan.lock, plan.wheels)
    if cuda_lock:
        (dest / "cuda" / "requirements.lock").write_text(cuda_lock)
    for rel, path in plan.sources.items():
        _link_or_copy(path, dest / rel)


def build_plan_image(engine: Engine, plan: BuildPlan, *, nocache: bool = False,
                     on_log: Callable[[str], None] | None = None) -> str:
    """Write the plan's context to a temporary directory and build it as ``plan.tag``; the image id.

    No check of the tag or the base image first: see :func:`build` for that.
    """
    ctx = Path(tempfile.mkdtemp(prefix=f"harness-build-{plan.cell.name}-"))
    try:
        write_context(plan, ctx)
        return engine.build(ctx, plan.tag, plan.buildargs, plan.labels, nocache=nocache, on_log=on_log,
                            cell=plan.cell.name)
    finally:
        shutil.rmtree(ctx, ignore_errors=True)


def lock_dir() -> Path:
    """Where build locks live: ``$HARNESS_LOCK_DIR``, else a private directory of this user's.

    ``$XDG_RUNTIME_DIR/harness-build-locks`` or ``<tmp>/harness-build-locks-<uid>``, made 0700
    and refused when it is a link or someone else's (a shared /tmp must not steer the lock file).
    """
    explicit = os.environ.get("HARNESS_LOCK_DIR")
    if explicit:
        path = Path(explicit)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "harness-build-locks"
    else:
        path = Path(tempfile.gettempdir()) / f"harness-build-locks-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or (not explicit and st.st_uid != os.getuid()):
        raise BackendError(f"build lock directory {path} is not a directory of this user",
                           hint="remove it, or set HARNESS_LOCK_DIR to a private directory")
    return path


@contextlib.contextmanager
def build_lock(tag: str) -> Iterator[None]:
    """Hold the per-tag build lock: a second build of one tag (another thread or process) waits for the first."""
    name = hashlib.sha256(tag.encode()).hexdigest()[:32] + ".lock"
    fd = os.open(lock_dir() / name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def ensure_base(engine: Engine, cell: ImageCell, *, offline: bool = False,
                say: Callable[[str], None] | None = None) -> bool:
    """Make sure the cell's base image is in the engine; True when it was pulled now.

    A base pinned by digest that is missing is pulled by that digest (not with
    ``offline``), and the pulled image must carry the digest in its RepoDigests: another
    one is removed again and refused (:class:`BaseImageMismatch`). A base that is missing
    and cannot be pulled (unpinned, offline, or the pull failed: no registry reachable)
    raises :class:`BaseImageMissing`, which skips the cell with the command that fixes it.
    """
    ref = cell.base_ref
    if engine.image_exists(ref):
        return False
    if not cell.base_digest:
        raise BaseImageMissing(cell.name, ref)
    if offline:
        raise BaseImageMissing(cell.name, ref, "--offline: pinned bases are not pulled")
    if say:
        say(f"pulling base image {ref}")
    try:
        engine.pull(ref)
    except BackendError as exc:
        raise BaseImageMissing(cell.name, ref, f"the pull failed: {exc.message}") from None
    facts = engine.image(ref)
    got = list(facts.repo_digests) if facts is not None else []
    if facts is None or not same_image_digest(got, ref):
        if facts is not None:
            try:
                engine.remove_image(facts.id, force=True)
            except HarnessError:
                pass
        raise BaseImageMismatch(cell.name, ref, got)
    return True


def build(engine: Engine, plan: BuildPlan, on_log: Callable[[str], None] | None = None, *,
          offline: bool = False) -> BuiltImage:
    """Build the plan's image unless its tag exists; always (re)point ``harness:<cell>`` at it.

    Under the tag's build lock, and the tag is looked up after taking it: two runs
    that need one new image build it once (the second finds it), instead of both
    building and leaving an untagged image and builder stages behind.
    """
    start = time.monotonic()
    name = plan.cell.name
    built = False
    with build_lock(plan.tag):
        found = engine.image(plan.tag)
        image_id = found.id if found is not None else None
        if image_id is None:
            ensure_base(engine, plan.cell, offline=offline, say=on_log)
            image_id = build_plan_image(engine, plan, on_log=on_log)
            built = True
        engine.tag(image_id, REPOSITORY, name)
    return BuiltImage(plan.tag, image_id, name, time.monotonic() - start, built=built)


Progress = Callable[[str, str, str], None]  # (cell, event, text); event: start|log|cached|built|failed|skipped


def ensure_images(engine: Engine, plans: Iterable[BuildPlan], progress: Progress | None = None, *,
                  offline: bool = False) -> dict[str, BuiltImage | HarnessError]:
    """Build every missing image; a failure is recorded for its cell and the rest go on.

    ``offline``: a missing base image pinned by digest is not pulled (the cell is skipped).
    """
    results: dict[str, BuiltImage | HarnessError] = {}
    say = progress or (lambda cell, event, text: None)
    for plan in plans:
        name = plan.cell.name
        say(name, "start", plan.tag)
        try:
            img = build(engine, plan, on_log=lambda line, n=name: say(n, "log", line), offline=offline)
        except HarnessError as exc:
            results[name] = exc
            # this host cannot build it (no base image): not a failure
            skip = exc.skip_reason if isinstance(exc, BaseImageMissing) else None
            say(name, "skipped" if skip else "failed", skip or exc.one_line())
            continue
        except Exception as exc:  # an SDK/transport error must not stop the other cells
            err = BackendError(f"building {plan.tag}: {type(exc).__name__}: {exc}")
            results[name] = err
            say(name, "failed", err.one_line())
            continue
        results[name] = img
        say(name, "built" if img.built else "cached", f"{img.tag} in {img.seconds:.1f}s")
    return results


def wheelhouse_command(cell: ImageCell, dest: str | Path, python_exe: str,
                       index_url: str | None = None) -> list[str]:
    """The ``pip download`` command that fills a cell's wheelhouse."""
    cmd = [python_exe, "-m", "pip", "download", "--only-binary=:all:", "--python-version", cell.python,
           "-d", str(dest)]
    if index_url:
        cmd += ["--index-url", index_url, "--extra-index-url", "https://pypi.org/simple"]
    return cmd + [f"torch=={cell.torch}", *IMAGE_PACKAGES]


def make_wheelhouse(cell: ImageCell, dest: str | Path, python_exe: str = sys.executable,
                    index_url: str | None = None) -> Path:
    """Download the cell's wheels (torch + worker deps, binary only) into ``dest`` with pip.

    pip takes the host's index configuration; pass ``index_url`` (e.g. ``cell.index_url``)
    on a connected machine to get a specific CUDA variant. Run it on the host, then
    build offline: containers here cannot reach package indexes.
    """
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    cmd = wheelhouse_command(cell, out, python_exe, index_url)
    try:
        subprocess.run(cmd, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RunFailed(f"wheelhouse for {cell.name}: `{' '.join(cmd)}` failed ({exc})",
                        hint="check that pip can reach an index holding these wheels") from exc
    return out
