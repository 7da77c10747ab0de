"""The snapshot container: one file that holds a run's image, recipe, inputs and records.

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
    data.tar.gz               instead of data.gz, when the data is a directory or was run with
                              --data-dir: a tar of that directory (manifest ``data.kind``/``data.dir``)
    image.tar.gz              ``docker save`` of the image, tagged with its content tag only (a load
                              drops every name the member lists and checks its id: :func:`load_image`)
    manifest.sig              optional, last, *not* compressed and not listed in the manifest:
                              an OpenSSH signature (``ssh-keygen -Y sign``, namespace
                              ``harness-snapshot``, armored text) of the manifest's canonical
                              JSON (see :func:`signed_message`)

The manifest lists every other member with ``size``/``sha256`` of the *stored* (compressed)
bytes and ``raw_size``/``raw_sha256`` of the decompressed bytes, and carries
``manifest_sha256``: the sha256 of its own canonical JSON without that key, so that a
damaged manifest is reported as the manifest, not as the member whose digest it garbled.
Any tar tool can list the archive; ``gzip -d`` reads any member.

Reading is hostile-input safe: the manifest is checked for shape (types, required keys) and
every name it gives that becomes a path (``cell``, ``bundle.name``, ``data.file``, member
names) must be a plain name that stays inside the extraction directory; the tar members
inside ``bundle.tar.gz`` and ``build/harness-src.tar.gz`` are unpacked with tarfile's
``data`` filter after a check that refuses absolute names, ``..``, devices and links that
leave the directory. Every refusal is one :class:`~harness.errors.InputError` (exit 2).
A command that uses an archive opens it once (:class:`Archive`), verifies that open file and
reads every member from it, each checked against the verified manifest again as it is read.

Signatures: the signed message is the manifest's canonical JSON (sorted keys, no
whitespace, ASCII, ``manifest_sha256`` included). The manifest lists every member's
sha256, so the signature covers every byte of the archive. A signature member is
optional (unsigned archives stay valid) and nothing may follow it. Harness versions
before signing refuse a signed archive (``manifest.sig`` is an extra member to them).

Pure parts (writing and verifying the container) need no Docker; the image
effects at the end (load, package list) go through a :class:`~harness.docker_engine.Engine`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Iterator

from ..errors import BackendError, HarnessError, InputError, RunFailed
from .manifest import (ALTERED, MANIFEST, SCHEMA, SIGNATURE, Manifest, manifest_digest, parse_manifest, plain_name,
                       signed_message)

if TYPE_CHECKING:
    from ..docker_engine import Engine

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
DATA_TREE = "data.tar.gz"  # the data as a directory: a directory data.path, or the --data-dir around the data file
IMAGE = "image.tar.gz"
IMAGE_SOURCES_PATH = "/opt/harness/harness"  # where Dockerfile.cuda copies the package
SIGNATURE_MAX = 64 * 1024


# =============================================================================== the container (pure)


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

    def finish(self, manifest: Manifest | dict[str, Any], sign: Callable[[bytes], bytes] | None = None) -> Path:
        """Write the manifest into its slot, close the tar, and move the file into place.

        ``sign`` (e.g. ``lambda msg: signing.sign(msg, key)``) gets :func:`signed_message` of
        the final manifest and returns the armored signature stored as :data:`SIGNATURE`.
        """
        if isinstance(manifest, Manifest):
            manifest = manifest.body()
        body = dict(manifest, schema=SCHEMA, members=list(self.members))
        body["manifest_sha256"] = manifest_digest(body)
        text = json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"
        if len(text) > MANIFEST_SLOT:
            raise RunFailed(f"snapshot manifest is {len(text)} bytes, more than its {MANIFEST_SLOT}-byte slot")
        if sign is not None:
            sig = sign(signed_message(body))
            if not sig or len(sig) > SIGNATURE_MAX:
                raise RunFailed(f"the signature is {len(sig)} bytes; at most {SIGNATURE_MAX} fit in {SIGNATURE}")
            self.fh.write(_header(SIGNATURE, len(sig), self.mtime))
            self.fh.write(sig + b"\0" * (-len(sig) % tarfile.BLOCKSIZE))
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
    signature: bytes | None = None  # the armored SSH signature, when the archive carries one (unchecked)
    archive: Archive | None = None  # the open file that was verified, when verify was given one

    @property
    def parsed(self) -> Manifest:
        """The manifest, typed (``manifest`` is the document as read: what its digest and signature cover)."""
        if self._parsed is None:
            self._parsed = Manifest.from_json(self.manifest, str(self.path))
        return self._parsed

    _parsed: Manifest | None = field(default=None, repr=False, compare=False)

    @property
    def total_size(self) -> int:
        return sum(m["size"] for m in self.members)

    def member(self, name: str) -> dict[str, Any] | None:
        return next((m for m in self.members if m["name"] == name), None)


class _PinnedRaw(io.RawIOBase):
    """Reads of one descriptor at this reader's own offset (``pread``): readers never move each other."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = os.pread(self._fd, len(buf), self._pos)
        buf[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: os.fstat(self._fd).st_size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


class Archive:
    """A snapshot file opened once: what :func:`verify` checks and every later read is this one file.

    The path is looked up once. A file moved, replaced or re-created at the path afterwards is
    not read (the descriptor still names the file that was opened), and reads through a
    :class:`Verified` check each member's bytes against the verified manifest again, so a
    file written in place after the check is refused rather than used. Close it (or use it
    as a context manager) when done.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        where = str(self.path)
        hint = "pass a .harness.tar file written by `harness snapshot`"
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO cannot block the open
        except FileNotFoundError:
            raise InputError(where, "not found", hint=hint) from None
        except OSError as exc:
            raise InputError(where, f"cannot be opened ({exc.strerror or exc})", hint=hint) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InputError(where, "is not a file", hint=hint)
        self.fd: int | None = fd

    def reader(self) -> BinaryIO:
        """A new buffered reader of the file, at offset 0 (its own offset)."""
        if self.fd is None:
            raise ValueError(f"{self.path} was closed")
        return io.BufferedReader(_PinnedRaw(self.fd), CHUNK)  # type: ignore[return-value]

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def _where(source: Any) -> str:
    return str(source.path if isinstance(source, Verified) else source)


def _open_tar(fileobj: BinaryIO, where: str) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=fileobj, mode="r:")
    except (tarfile.TarError, OSError, ValueError, UnicodeError, EOFError) as exc:
        raise InputError(where, f"is not a harness snapshot (not a tar archive: {_short(exc)})") from None


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return text or type(exc).__name__


# ------------------------------------------------------------------------------ verify


_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a character device",
          tarfile.BLKTYPE: "a block device", tarfile.DIRTYPE: "a directory", tarfile.FIFOTYPE: "a FIFO"}


def _kind(info: tarfile.TarInfo) -> str:
    return _KINDS.get(info.type, f"of tar type {info.type!r}")


def _check_member(tf: tarfile.TarFile, info: tarfile.TarInfo, want: dict[str, Any], where: str) -> None:
    name = info.name
    if info.size != want["size"]:
        raise InputError(where, f"member {name} is {info.size} bytes, the manifest says {want['size']}",
                         hint="the archive is damaged")
    src = tf.extractfile(info)
    if src is None:
        raise InputError(where, f"member {name} cannot be read", hint="the archive is damaged")
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
    except (tarfile.TarError, OSError, EOFError):
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


def verify(source: str | Path | Archive) -> Verified:
    """Check every member against the manifest; raise an InputError naming the first that differs.

    A signature member is read (not checked: see :func:`check_signature`). Given an open
    :class:`Archive`, the returned :class:`Verified` reads its members from that file
    alone (pass it, not its path, to the readers below).
    """
    t0 = time.perf_counter()
    archive = source if isinstance(source, Archive) else Archive(source)
    where = str(archive.path)
    try:
        with archive.reader() as fh, _open_tar(fh, where) as tf:
            try:
                manifest, signature = _verify_members(tf, where)
            except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeError, zlib.error, RecursionError) as exc:
                raise InputError(where, f"cannot be read as a snapshot ({_short(exc)})",
                                 hint="the archive is damaged") from None
    finally:
        if archive is not source:
            archive.close()
    return Verified(archive.path, manifest, list(manifest["members"]), time.perf_counter() - t0, signature,
                    archive=source if isinstance(source, Archive) else None)


def _verify_members(tf: tarfile.TarFile, where: str) -> tuple[dict[str, Any], bytes | None]:
    first = tf.next()
    if first is None or first.name != MANIFEST:
        raise InputError(where, "is not a harness snapshot "
                                f"({'empty archive' if first is None else 'its first member is ' + repr(first.name)[1:-1] + ', not ' + MANIFEST})")
    if not first.isreg() or first.size > MANIFEST_SLOT:
        raise InputError(where, f"{MANIFEST} is {_kind(first) if not first.isreg() else f'{first.size} bytes'}, "
                                f"not a manifest of at most {MANIFEST_SLOT} bytes", hint=ALTERED)
    fobj = tf.extractfile(first)
    assert fobj is not None
    try:
        raw = fobj.read()
    except (tarfile.ReadError, OSError, EOFError):
        raise InputError(where, f"{MANIFEST} is truncated", hint="the archive was cut short; copy it again") from None
    if len(raw) != first.size:
        raise InputError(where, f"{MANIFEST} is truncated", hint="the archive was cut short; copy it again")
    manifest = parse_manifest(raw, where)
    wanted = {m["name"]: m for m in manifest["members"]}
    seen: set[str] = set()
    signature: bytes | None = None
    while True:
        try:
            info = tf.next()
        except (tarfile.TarError, OSError) as exc:
            missing = [m["name"] for m in manifest["members"] if m["name"] not in seen]
            raise InputError(where, f"member {missing[0] if missing else '?'} cannot be read ({_short(exc)})",
                             hint="the archive is damaged") from None
        if info is None:
            break
        shown = repr(info.name)[1:-1]
        if signature is not None:
            raise InputError(where, f"member {shown} follows {SIGNATURE}, which must be last", hint=ALTERED)
        if info.name == SIGNATURE:
            signature = _read_signature(tf, info, where)
            continue
        if info.name not in wanted:
            raise InputError(where, f"member {shown} is not in the manifest (extra member)",
                             hint="the archive was altered")
        if info.name in seen:
            raise InputError(where, f"member {shown} appears twice", hint="the archive was altered")
        if not info.isreg():
            raise InputError(where, f"member {shown} is {_kind(info)}, not a file", hint=ALTERED)
        _check_member(tf, info, wanted[info.name], where)
        seen.add(info.name)
    for m in manifest["members"]:
        if m["name"] not in seen:
            raise InputError(where, f"member {m['name']} is missing",
                             hint="the archive is truncated or its tar header is damaged; copy it again")
    return manifest, signature


def _read_signature(tf: tarfile.TarFile, info: tarfile.TarInfo, where: str) -> bytes:
    if not info.isreg() or not 0 < info.size <= SIGNATURE_MAX:
        raise InputError(where, f"member {SIGNATURE} is {_kind(info) if not info.isreg() else f'{info.size} bytes'}, "
                                f"not a signature of at most {SIGNATURE_MAX} bytes", hint=ALTERED)
    src = tf.extractfile(info)
    assert src is not None
    try:
        data = src.read()
    except (tarfile.TarError, OSError, EOFError):
        data = b""
    if len(data) != info.size:
        raise InputError(where, f"member {SIGNATURE} is truncated", hint="the archive was cut short; copy it again")
    return data


def check_signature(v: Verified, allowed_signers: str | Path, identity: str | None = None) -> tuple[str, str]:
    """Check the archive's signature with ``ssh-keygen -Y verify``; returns ``(principal, detail)``.

    A missing or bad signature is an InputError (exit 2).
    """
    from .. import signing

    where = str(v.path)
    if v.signature is None:
        raise InputError(where, f"is not signed (it has no {SIGNATURE}), but --allowed-signers asks for a signature",
                         hint="ask its maker for a signed snapshot (`harness snapshot ... --sign KEY`), "
                              "or drop --allowed-signers to check integrity only")
    return signing.verify(signed_message(v.manifest), v.signature, allowed_signers, identity, where, SIGNATURE)


# ------------------------------------------------------------------------------ reading members (after verify)


CHANGED = "the file changed after it was verified; copy it where nobody else writes, and rerun"


def member_chunks(source: str | Path | Verified, name: str) -> Iterator[bytes]:
    """The decompressed bytes of one member, chunk by chunk (verify the archive first).

    ``source`` is a path, or what :func:`verify` returned: then the member is read from the
    very file that was verified (when verify was given an :class:`Archive`), and its stored
    bytes must hash to the manifest's sha256 again. The last bytes are held back until they
    do, so a consumer never sees the end of a member that differs from what was verified.
    """
    where = _where(source)
    want = source.member(name) if isinstance(source, Verified) else None
    if isinstance(source, Verified) and want is None:
        raise InputError(where, f"member {name} is not in the manifest", hint=ALTERED)
    try:
        with (source.archive.reader() if isinstance(source, Verified) and source.archive is not None
              else open(source.path if isinstance(source, Verified) else source, "rb")) as fh:
            with _open_tar(fh, where) as tf:
                try:
                    info = tf.getmember(name)
                except KeyError:
                    raise InputError(where, f"member {name} is missing") from None
                src = tf.extractfile(info) if info.isreg() else None
                if src is None:
                    raise InputError(where, f"member {name} is {_kind(info)}, not a file", hint=ALTERED)
                if want is not None and info.size != want["size"]:
                    raise InputError(where, f"member {name} is {info.size} bytes, not the {want['size']} verified",
                                     hint=CHANGED)
                sha = hashlib.sha256()
                dec = zlib.decompressobj(_GZIP_WBITS)
                held = b""
                for chunk in iter(lambda: src.read(CHUNK), b""):
                    sha.update(chunk)
                    out = dec.decompress(chunk)
                    if out:
                        if held:
                            yield held
                        held = out
                held += dec.flush()
                if want is not None and sha.hexdigest() != want["sha256"]:
                    raise InputError(where, f"member {name} differs from the verified manifest "
                                            f"(sha256 {sha.hexdigest()[:12]}…)", hint=CHANGED)
                if held:
                    yield held
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise InputError(where, f"member {name} cannot be read ({_short(exc)})", hint="the archive is damaged") from None


def read_member(source: str | Path | Verified, name: str) -> bytes:
    """A small member's decompressed bytes."""
    return b"".join(member_chunks(source, name))


def read_json_member(source: str | Path | Verified, name: str) -> Any:
    """A JSON member, parsed; not JSON is an InputError naming the member."""
    try:
        return json.loads(read_member(source, name).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InputError(_where(source), f"member {name} is not valid JSON", hint=ALTERED) from None


def inside(path: str | Path, root: str | Path, where: str, what: str) -> Path:
    """``path`` resolved, refused unless it lies under ``root`` (resolved)."""
    p, r = Path(path).resolve(), Path(root).resolve()
    if p != r and not p.is_relative_to(r):
        raise InputError(where, f"{what} resolves to {p}, outside {r}", hint=ALTERED)
    return p


def extract_file(source: str | Path | Verified, name: str, dest: str | Path, root: str | Path | None = None) -> Path:
    """Decompress one member to ``dest`` (which must lie inside ``root`` when given)."""
    dest = Path(dest)
    if root is not None:
        inside(dest, root, _where(source), f"member {name}'s destination")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        for chunk in member_chunks(source, name):
            out.write(chunk)
    return dest


def _check_entry(info: tarfile.TarInfo, root: str, where: str, member: str) -> None:
    """Refuse a nested tar entry that is not a plain path inside ``root`` (before tarfile's own filter)."""
    name = info.name
    shown = repr(name)[1:-1]

    def refuse(why: str) -> InputError:
        return InputError(where, f"member {member} holds entry {shown} {why}", hint=ALTERED)

    if not name or "\0" in name:
        raise refuse("with an empty or NUL name")
    if name.startswith("/") or os.path.isabs(name):
        raise refuse("with an absolute name")
    if ".." in name.split("/"):
        raise refuse("that climbs out with ..")
    if not (info.isreg() or info.isdir() or info.issym() or info.islnk()):
        raise refuse(f"that is {_kind(info)}")
    if info.issym() or info.islnk():
        link = info.linkname
        if not link or "\0" in link or os.path.isabs(link):
            raise refuse(f"linking to {link!r}, outside its directory")
        base = os.path.dirname(name) if info.issym() else ""
        target = os.path.normpath(os.path.join(root, base, link))
        if target != root and not target.startswith(root + os.sep):
            raise refuse(f"linking to {link!r}, outside its directory")


def extract_tree(source: str | Path | Verified, name: str, dest: str | Path) -> Path:
    """Unpack a tar member (bundle, sources) into ``dest``: every entry checked to stay inside,
    then tarfile's ``data`` filter, then every extracted path resolved under ``dest``."""
    where = _where(source)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = str(dest.resolve())
    with tempfile.TemporaryFile() as spool:
        for chunk in member_chunks(source, name):
            spool.write(chunk)
        spool.seek(0)
        try:
            with tarfile.open(fileobj=spool, mode="r:") as tf:
                entries = tf.getmembers()
                for info in entries:
                    _check_entry(info, root, where, name)
                tf.extractall(dest, members=entries, filter="data")
        except tarfile.FilterError as exc:
            bad = exc.tarinfo.name if getattr(exc, "tarinfo", None) is not None else "?"
            raise InputError(where, f"member {name} holds entry {bad!r} that tarfile's data filter refuses ({_short(exc)})",
                             hint=ALTERED) from None
        except (tarfile.TarError, EOFError, ValueError, UnicodeError) as exc:
            raise InputError(where, f"member {name} is not a readable tar ({_short(exc)})", hint=ALTERED) from None
    for top, dirs, files in os.walk(dest):
        for entry in dirs + files:
            p = os.path.join(top, entry)
            real = os.path.realpath(p)
            if real != root and not real.startswith(root + os.sep):
                raise InputError(where, f"member {name} holds {os.path.relpath(p, dest)}, which resolves outside "
                                        f"its directory", hint=ALTERED)
    return dest


def extract_bundle(source: str | Path | Verified, manifest: dict[str, Any], dest: str | Path) -> Path:
    """Unpack the archived optuna_best directory under ``dest``; returns its (real) directory."""
    where = _where(source)
    name = plain_name(manifest["bundle"]["name"], where, "bundle.name")
    root = extract_tree(source, BUNDLE, dest)
    bundle = root / name
    if bundle.is_symlink() or not bundle.is_dir():
        raise InputError(where, f"member {BUNDLE} holds no directory {name} (the manifest's bundle.name)", hint=ALTERED)
    return inside(bundle, root, where, f"member {BUNDLE}'s {name}")


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


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# =============================================================================== comparisons (pure)


def host_facts() -> dict[str, Any]:
    """The machine the CLI runs on: what a rerun compares against the archived run."""
    import platform
    import socket

    from ..images import matrix
    from ..worker.envinfo import _cpu_model

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


def load_image(engine: Engine, archive: str | Path | Verified, manifest: dict[str, Any],
               say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load the archived image into the engine unless it is there; check its id.

    The image is loaded without a name (:meth:`Engine.load` drops the tags the archive
    lists: no existing tag is ever moved), and its id is checked as it streams (an
    archive of another image is refused before the engine has loaded it) and again
    after the load. Returns ``{"loaded": bool, "seconds": float}``. On any failure
    whatever this call loaded is removed again, and a one-line error says why.
    """
    from ..docker_engine import ImageStreamRefused, SavedImage

    image = manifest["image"]
    want = image["id"]
    t0 = time.perf_counter()
    if engine.image_exists(want):
        return {"loaded": False, "seconds": 0.0}
    entry = next((m for m in manifest["members"] if m["name"] == IMAGE), None)
    if entry is None:
        raise InputError(_where(archive), f"member {IMAGE} is missing")
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
        for ref in engine.load(SavedImage(member_chunks(archive, IMAGE), want)):
            loaded.append(ref)
    except ImageStreamRefused as exc:
        _cleanup_loaded(engine, loaded, before)
        raise InputError(_where(archive), f"member {IMAGE} {exc.problem}", hint=ALTERED) from None
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
        raise BackendError(f"loading image {image.get('tag') or want[:19]} from {_where(archive)} failed: {problem}",
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
