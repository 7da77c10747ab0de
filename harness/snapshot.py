"""Archived environment snapshots: one file that holds a run's image, recipe, inputs and records.

Container format (schema ``harness.snapshot/1``)
-----------------------------------------------
An **uncompressed** tar (GNU headers, one 512-byte header per member) whose members are
each compressed on their own with gzip level 1. Because every member is its own gzip
stream, a flipped byte or a cut is attributed to exactly one member, and any member can
be read without decompressing the others. Members, in order::

    manifest.json             JSON, uncompressed, first (space-padded to a fixed 64 KiB
                              slot so that it can be written last, once digests are known)
    record.json.gz            the result record of the archived run
    environment.json.gz       env, determinism, image facts, image Config.Env, host facts
    build/Dockerfile.gz       the Dockerfile the image was built from
    build/requirements.lock.gz  pip lock (every wheel pinned by version and sha256)
    build/buildargs.json.gz   the build args
    build/harness-src.tar.gz  /opt/harness/harness exactly as baked into the image
    bundle.tar.gz             the optuna_best directory
    data.gz                   the data file (absent with --no-data; its sha256 is in the manifest)
    image.tar.gz              ``docker save`` of the image, tagged with its content tag only

The manifest lists every other member with ``size``/``sha256`` of the *stored* (compressed)
bytes and ``raw_size``/``raw_sha256`` of the decompressed bytes, and carries
``manifest_sha256``: the sha256 of its own canonical JSON without that key, so that a
damaged manifest is reported as the manifest, not as the member whose digest it garbled.
Any tar tool can list the archive; ``gzip -d`` reads any member.

Pure parts (writing and verifying the container) need no Docker; the image
effects at the end (load, package list) go through a :class:`~harness.docker_engine.Engine`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Iterator

from . import __version__
from .errors import BackendError, HarnessError, InputError, RunFailed

if TYPE_CHECKING:
    from .docker_engine import Engine

SCHEMA = "harness.snapshot/1"
SCHEMA_PREFIX = "harness.snapshot/"
MANIFEST = "manifest.json"
MANIFEST_SLOT = 64 * 1024
CHUNK = 1 << 20
GZIP_LEVEL = 1  # fast: an image is mostly already-compressed shared objects
_GZIP_WBITS = 31  # zlib: gzip container

RECORD = "record.json.gz"
ENVIRONMENT = "environment.json.gz"
DOCKERFILE = "build/Dockerfile.gz"
LOCK = "build/requirements.lock.gz"
BUILDARGS = "build/buildargs.json.gz"
SOURCES = "build/harness-src.tar.gz"
BUNDLE = "bundle.tar.gz"
DATA = "data.gz"
IMAGE = "image.tar.gz"
IMAGE_SOURCES_PATH = "/opt/harness/harness"  # where Dockerfile.cuda copies the package


# =============================================================================== the container (pure)


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own ``manifest_sha256``."""
    return hashlib.sha256(_canonical({k: v for k, v in manifest.items() if k != "manifest_sha256"})).hexdigest()


class _Sink:
    """File-like that hashes and counts what passes through to ``fh``."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.size = 0
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> None:
        if data:
            self.fh.write(data)
            self.sha.update(data)
            self.size += len(data)


def _prefetched(chunks: Iterable[bytes], depth: int = 8) -> Iterator[bytes]:
    """Read ``chunks`` in a thread so that the producer (``docker save``) and the
    compressor (zlib releases the GIL) run at the same time; errors reach the caller."""
    import queue
    import threading

    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def pump() -> None:
        try:
            for chunk in chunks:
                while not stop.is_set():
                    try:
                        q.put(("chunk", chunk), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
            q.put(("error", exc))

    thread = threading.Thread(target=pump, name="snapshot-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = mtime
    info.type = tarfile.REGTYPE
    buf = info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    if len(buf) != tarfile.BLOCKSIZE:  # member names are ours and short; keep the seek-back exact
        raise ValueError(f"tar header for {name!r} is not one block")
    return buf


class SnapshotWriter:
    """Write a snapshot to ``path`` atomically: a temp file beside it, renamed when complete.

    Each member is streamed once: a placeholder header, the gzip stream, then the real
    header written back in place. Nothing is held in memory beyond one chunk.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent)
        self.tmp = Path(tmp)
        self.fh = os.fdopen(fd, "w+b")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp's 0600 is for the temp file, not the archive
        self.mtime = int(time.time())
        self.members: list[dict[str, Any]] = []
        # The manifest's slot comes first so that readers find it without a scan.
        self.fh.write(_header(MANIFEST, MANIFEST_SLOT, self.mtime))
        self.fh.write(b" " * MANIFEST_SLOT)

    def __enter__(self) -> "SnapshotWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()

    def add_chunks(self, name: str, chunks: Iterable[bytes]) -> dict[str, Any]:
        """Append one member from raw chunks, gzip-compressed; returns its manifest entry."""
        if any(m["name"] == name for m in self.members) or name == MANIFEST:
            raise ValueError(f"duplicate member {name}")
        start = self.fh.tell()
        self.fh.write(b"\0" * tarfile.BLOCKSIZE)
        sink = _Sink(self.fh)
        raw_sha, raw_size = hashlib.sha256(), 0
        comp = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, _GZIP_WBITS)
        for chunk in _prefetched(chunks):
            if not chunk:
                continue
            raw_sha.update(chunk)
            raw_size += len(chunk)
            sink.write(comp.compress(chunk))
        sink.write(comp.flush())
        pad = -sink.size % tarfile.BLOCKSIZE
        self.fh.write(b"\0" * pad)
        end = self.fh.tell()
        self.fh.seek(start)
        self.fh.write(_header(name, sink.size, self.mtime))
        self.fh.seek(end)
        entry = {"name": name, "size": sink.size, "sha256": sink.sha.hexdigest(), "raw_size": raw_size,
                 "raw_sha256": raw_sha.hexdigest(), "compression": "gzip"}
        self.members.append(entry)
        return entry

    def add_bytes(self, name: str, data: bytes) -> dict[str, Any]:
        return self.add_chunks(name, [data])

    def add_file(self, name: str, path: str | Path) -> dict[str, Any]:
        with open(path, "rb") as f:
            return self.add_chunks(name, iter(lambda: f.read(CHUNK), b""))

    def add_tree(self, name: str, root: str | Path, arcname: str) -> dict[str, Any]:
        """Append a directory as a tar (spooled to a temp file: bundles are small)."""
        with tempfile.TemporaryFile() as spool:
            with tarfile.open(fileobj=spool, mode="w", format=tarfile.PAX_FORMAT) as tf:
                tf.add(str(root), arcname=arcname, filter=_clean_tarinfo)
            spool.seek(0)
            return self.add_chunks(name, iter(lambda: spool.read(CHUNK), b""))

    def finish(self, manifest: dict[str, Any]) -> Path:
        """Write the manifest into its slot, close the tar, and move the file into place."""
        body = dict(manifest, schema=SCHEMA, members=list(self.members))
        body["manifest_sha256"] = manifest_digest(body)
        text = json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"
        if len(text) > MANIFEST_SLOT:
            raise RunFailed(f"snapshot manifest is {len(text)} bytes, more than its {MANIFEST_SLOT}-byte slot")
        self.fh.write(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
        self.fh.seek(tarfile.BLOCKSIZE)
        self.fh.write(text + b" " * (MANIFEST_SLOT - len(text)))
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.fh.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _clean_tarinfo(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if "__pycache__" in info.name.split("/"):
        return None
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# ------------------------------------------------------------------------------ reading and verifying


@dataclass
class Verified:
    """The outcome of :func:`verify`: the manifest and what was checked."""

    path: Path
    manifest: dict[str, Any]
    members: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total_size(self) -> int:
        return sum(m["size"] for m in self.members)

    def member(self, name: str) -> dict[str, Any] | None:
        return next((m for m in self.members if m["name"] == name), None)


def _open_tar(path: Path) -> tarfile.TarFile:
    if not path.exists():
        raise InputError(str(path), "not found", hint="pass a .harness.tar file written by `harness snapshot`")
    if not path.is_file():
        raise InputError(str(path), "is not a file", hint="pass a .harness.tar file written by `harness snapshot`")
    try:
        return tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as exc:
        raise InputError(str(path), f"is not a harness snapshot (not a tar archive: {exc})") from None


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """Check a manifest's schema and its own checksum; the first problem is an InputError."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InputError(where, f"{MANIFEST} is damaged (not valid JSON)", hint="the archive cannot be trusted") from None
    if not isinstance(manifest, dict):
        raise InputError(where, f"{MANIFEST} is not a snapshot manifest")
    schema = manifest.get("schema")
    if schema != SCHEMA:
        if isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX):
            raise InputError(where, f"has schema {schema}, this harness reads {SCHEMA}",
                             hint="upgrade harness to read it")
        raise InputError(where, f"is not a harness snapshot (manifest schema {schema!r})")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise InputError(where, f"{MANIFEST} is damaged (its checksum does not match its content)",
                         hint="the archive cannot be trusted")
    members = manifest.get("members")
    if not isinstance(members, list) or not all(isinstance(m, dict) and {"name", "size", "sha256"} <= set(m) for m in members):
        raise InputError(where, f"{MANIFEST} has no valid member list")
    return manifest


def _check_member(tf: tarfile.TarFile, info: tarfile.TarInfo, want: dict[str, Any], where: str) -> None:
    name = info.name
    if info.size != want["size"]:
        raise InputError(where, f"member {name} is {info.size} bytes, the manifest says {want['size']}",
                         hint="the archive is damaged")
    src = tf.extractfile(info)
    assert src is not None
    sha, size = hashlib.sha256(), 0
    raw_sha, raw_size = hashlib.sha256(), 0
    dec = zlib.decompressobj(_GZIP_WBITS)
    undecompressable: str | None = None
    try:
        while True:
            chunk = src.read(CHUNK)
            if not chunk:
                break
            sha.update(chunk)
            size += len(chunk)
            if undecompressable is None:
                try:
                    out = dec.decompress(chunk)
                    raw_sha.update(out)
                    raw_size += len(out)
                except zlib.error as exc:
                    undecompressable = str(exc)
    except (tarfile.ReadError, OSError, EOFError):
        raise InputError(where, f"member {name} is truncated ({size} of {want['size']} bytes)",
                         hint="the archive was cut short; copy it again") from None
    if size != want["size"]:
        raise InputError(where, f"member {name} is truncated ({size} of {want['size']} bytes)",
                         hint="the archive was cut short; copy it again")
    if sha.hexdigest() != want["sha256"]:
        raise InputError(where, f"member {name} differs from the manifest (sha256 {sha.hexdigest()[:12]}…, "
                                f"expected {want['sha256'][:12]}…)", hint="the archive is damaged or was altered")
    if undecompressable is None and not dec.eof:
        undecompressable = "gzip stream ends early"
    if undecompressable is not None:
        raise InputError(where, f"member {name} cannot be decompressed ({undecompressable})", hint="the archive is damaged")
    if "raw_sha256" in want and (raw_sha.hexdigest() != want["raw_sha256"] or raw_size != want.get("raw_size")):
        raise InputError(where, f"member {name} decompresses to other content than the manifest's",
                         hint="the archive is damaged or was altered")


def verify(path: str | Path) -> Verified:
    """Check every member against the manifest; raise an InputError naming the first that differs."""
    t0 = time.perf_counter()
    p = Path(path)
    where = str(p)
    with _open_tar(p) as tf:
        first = tf.next()
        if first is None or first.name != MANIFEST:
            raise InputError(where, "is not a harness snapshot "
                                    f"({'empty archive' if first is None else 'its first member is ' + first.name + ', not ' + MANIFEST})")
        fobj = tf.extractfile(first)
        assert fobj is not None
        try:
            raw = fobj.read()
        except (tarfile.ReadError, OSError, EOFError):
            raise InputError(where, f"{MANIFEST} is truncated", hint="the archive was cut short; copy it again") from None
        manifest = parse_manifest(raw, where)
        wanted = {m["name"]: m for m in manifest["members"]}
        seen: set[str] = set()
        while True:
            try:
                info = tf.next()
            except (tarfile.TarError, OSError) as exc:
                missing = [m["name"] for m in manifest["members"] if m["name"] not in seen]
                raise InputError(where, f"member {missing[0] if missing else '?'} cannot be read ({exc})",
                                 hint="the archive is damaged") from None
            if info is None:
                break
            if info.name not in wanted:
                raise InputError(where, f"member {info.name} is not in the manifest (extra member)",
                                 hint="the archive was altered")
            if info.name in seen:
                raise InputError(where, f"member {info.name} appears twice", hint="the archive was altered")
            _check_member(tf, info, wanted[info.name], where)
            seen.add(info.name)
        for m in manifest["members"]:
            if m["name"] not in seen:
                raise InputError(where, f"member {m['name']} is missing",
                                 hint="the archive is truncated or its tar header is damaged; copy it again")
    return Verified(p, manifest, list(manifest["members"]), time.perf_counter() - t0)


def member_chunks(path: str | Path, name: str) -> Iterator[bytes]:
    """The decompressed bytes of one member, chunk by chunk (verify the archive first)."""
    with tarfile.open(path, mode="r:") as tf:
        try:
            info = tf.getmember(name)
        except KeyError:
            raise InputError(str(path), f"member {name} is missing") from None
        src = tf.extractfile(info)
        assert src is not None
        dec = zlib.decompressobj(_GZIP_WBITS)
        for chunk in iter(lambda: src.read(CHUNK), b""):
            out = dec.decompress(chunk)
            if out:
                yield out
        tail = dec.flush()
        if tail:
            yield tail


def read_member(path: str | Path, name: str) -> bytes:
    """A small member's decompressed bytes."""
    return b"".join(member_chunks(path, name))


def extract_file(path: str | Path, name: str, dest: str | Path) -> Path:
    """Decompress one member to ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        for chunk in member_chunks(path, name):
            out.write(chunk)
    return dest


def extract_tree(path: str | Path, name: str, dest: str | Path) -> Path:
    """Unpack a tar member (bundle, sources) into ``dest`` with the safe ``data`` filter."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as spool:
        for chunk in member_chunks(path, name):
            spool.write(chunk)
        spool.seek(0)
        with tarfile.open(fileobj=spool, mode="r:") as tf:
            tf.extractall(dest, filter="data")
    return dest


def tar_bytes_files(data: bytes) -> dict[str, bytes]:
    """Regular files of an in-memory tar: ``{path: content}``."""
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for info in tf.getmembers():
            if info.isfile():
                f = tf.extractfile(info)
                assert f is not None
                out[info.name] = f.read()
    return out


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# =============================================================================== comparisons (pure)


def host_facts() -> dict[str, Any]:
    """The machine the CLI runs on: what a rerun compares against the archived run."""
    import platform
    import socket

    from .images import matrix
    from .worker.envinfo import _cpu_model

    host = matrix.detect_host()
    return {"hostname": socket.gethostname(), "cpu": _cpu_model(), "machine": platform.machine(),
            "driver": host.get("driver"), "gpus": [g.get("name") for g in host.get("gpus") or []]}


HOST_KEYS = (("hostname", "hostname"), ("cpu", "CPU"), ("gpus", "GPU"), ("driver", "driver"))


def host_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["hostname a → b", ...]`` for every host fact that differs (empty: same host)."""
    out = []
    for key, label in HOST_KEYS:
        a, b = old.get(key), new.get(key)
        if isinstance(a, list):
            a = ", ".join(a) or None
        if isinstance(b, list):
            b = ", ".join(b) or None
        if a != b:
            out.append(f"{label} {a or 'none'} → {b or 'none'}")
    return out


def package_differences(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Installed distributions that differ: missing, extra, or another version."""
    out = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        if a is None:
            out.append(f"{name} {b} only in the rebuilt image")
        elif b is None:
            out.append(f"{name} {a} missing from the rebuilt image")
        else:
            out.append(f"{name} {a} → {b}")
    return out


def disk_shortfall(free: int | None, need: int) -> int:
    """Bytes missing to hold ``need`` plus a 10% margin (0 when enough, or when unknown)."""
    if free is None:
        return 0
    want = int(need * 1.1)
    return max(0, want - free)


def human(n: float | int | None) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# =============================================================================== image effects (through the engine)


def without_bytecode(tar_data: bytes) -> bytes:
    """The same tar without ``__pycache__`` entries: images carry compiled bytecode
    (Dockerfile.cuda compiles it at build time), but the recipe is the sources."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(tar_data), mode="r:") as src, tarfile.open(fileobj=out, mode="w:") as dst:
        for info in src.getmembers():
            if "__pycache__" in info.name.split("/"):
                continue
            dst.addfile(info, src.extractfile(info) if info.isfile() else None)
    return out.getvalue()


PACKAGES_SCRIPT = (
    "import importlib.metadata as m, json; "
    "print(json.dumps({d.metadata['Name'].lower().replace('_', '-'): d.version for d in m.distributions()}))"
)


def image_packages(engine: Engine, image_id: str) -> dict[str, str]:
    """``{distribution: version}`` installed in an image, measured in a container without network."""
    try:
        out = engine.run_command(image_id, ["python", "-c", PACKAGES_SCRIPT])
        packages = json.loads(out.strip().splitlines()[-1])
    except BackendError as exc:
        raise BackendError(f"could not list the packages of image {image_id[:19]}: {exc.message}") from exc
    except (ValueError, IndexError) as exc:
        raise BackendError(f"could not list the packages of image {image_id[:19]}: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from exc
    if not isinstance(packages, dict):
        raise BackendError(f"could not list the packages of image {image_id[:19]}: not a JSON object")
    return packages


def load_image(engine: Engine, archive: str | Path, manifest: dict[str, Any],
               say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load the archived image into the engine unless it is there; check its id.

    Returns ``{"loaded": bool, "seconds": float}``. On any failure whatever this call
    loaded is removed again, and a one-line error says why.
    """
    image = manifest["image"]
    want = image["id"]
    t0 = time.perf_counter()
    if engine.image_exists(want):
        return {"loaded": False, "seconds": 0.0}
    entry = next((m for m in manifest["members"] if m["name"] == IMAGE), None)
    if entry is None:
        raise InputError(str(archive), f"member {IMAGE} is missing")
    root, free = engine.free_bytes()
    short = disk_shortfall(free, int(entry.get("raw_size") or 0))
    if short:
        raise RunFailed(f"not enough disk to load image {image.get('tag') or want[:19]}: {root} has {human(free)} free, "
                        f"the image needs about {human(int(entry['raw_size']) * 1.1)}",
                        hint=f"free {human(short)} in {root} (e.g. `docker image prune`)")
    if say:
        say(f"loading image {image.get('tag') or want[:19]} ({human(entry.get('raw_size'))}) into the engine")
    before = set(engine.images())
    loaded: list[str] = []
    problem: str | None = None
    try:
        for ref in engine.load(member_chunks(archive, IMAGE)):
            loaded.append(ref)
    except BackendError as exc:
        problem = exc.message
    except (zlib.error, OSError, tarfile.TarError) as exc:
        problem = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    except BaseException:
        _cleanup_loaded(engine, loaded, before)
        raise
    if problem is None and not engine.image_exists(want):
        got = [f.id for f in (_image_or_none(engine, ref) for ref in loaded) if f is not None]
        problem = (f"the loaded image is {', '.join(got) or 'unknown'}, not the archived {want}"
                   if got else f"the engine does not hold {want} after the load")
    if problem is not None:
        _cleanup_loaded(engine, loaded, before)
        raise BackendError(f"loading image {image.get('tag') or want[:19]} from {archive} failed: {problem}",
                           hint="nothing was left in the engine")
    return {"loaded": True, "seconds": time.perf_counter() - t0}


def _image_or_none(engine: Engine, ref: str) -> Any:
    try:
        return engine.image(ref)
    except Exception:  # noqa: BLE001 - cleanup and messages only
        return None


def _cleanup_loaded(engine: Engine, loaded: list[str], before: set[str]) -> None:
    """Remove the images a failed load left behind (those the engine did not hold before)."""
    for ref in loaded:
        facts = _image_or_none(engine, ref)
        if facts is None or facts.id in before:
            continue
        try:
            engine.remove_image(facts.id, force=True)
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass


def snapshot_error(exc: BaseException) -> HarnessError:
    """Any unexpected I/O failure while writing a snapshot, as one line."""
    if isinstance(exc, HarnessError):
        return exc
    if isinstance(exc, OSError):
        return RunFailed(f"writing the snapshot failed: {exc.strerror or exc} ({exc.filename or ''})".rstrip(" ()"),
                         hint="check free disk space and permissions of the output directory")
    return RunFailed(f"writing the snapshot failed: {type(exc).__name__}: {exc}")
