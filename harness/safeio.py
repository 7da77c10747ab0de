"""Files that something else wrote, or may have replaced: the one home of hostile-file handling.

A results directory is written by workers (a container, a user's trainer) and copied between
machines, so nothing in it is trusted: ``record.json``, ``run.json``, ``report.json``,
``trace.jsonl``, a band directory, a rerun's records. Every read here

* opens the file with ``O_NOFOLLOW | O_NONBLOCK``: a symbolic link in its place is refused, not
  followed, and a FIFO cannot block the open;
* checks with ``fstat`` that what it opened is a regular file (a FIFO, a device, a socket or a
  directory is refused) and that its size is within the caller's cap, before reading a byte;
* reads at most the cap (a file that grows while it is read is refused too);
* below a directory the caller trusts (``within``), opens every further path component without
  following a link either, so ``OUT/<cell>`` that is a link is refused, not followed.

Two families of refusal: a file the user handed the harness (a record to compare, a report) is one
:class:`~harness.errors.InputError` naming the file (exit 2: :func:`read_bytes`, :func:`read_json`,
:func:`read_lines`); a file a worker left in its cell directory (:class:`CellPaths`) is the run's
failure, :class:`~harness.errors.RunFailed` (:func:`read_no_follow`, :func:`tail_no_follow`).

Writes never go through a link either: a cell directory starts empty (:func:`fresh_dir`), a log is
created afresh (:func:`create_no_follow`), a document is replaced whole (:func:`atomic_write`).
And :func:`sha256_file` is the one digest of a file's bytes.

Standard library only, and nothing from the harness but :mod:`harness.errors`: the worker imports it too.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, TextIO

from .errors import InputError, RunFailed

JSON_MAX_BYTES = 64 << 20  # record.json, run.json: beyond this it is not a harness file
REPORT_MAX_BYTES = 256 << 20  # report.json holds every record of a run

_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC


def kind_of(mode: int) -> str:
    """What a file of this mode is, in words ("a FIFO", "a character device" ...)."""
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


def _refusal(path: Path, exc: OSError, dir_fd: int | None, name: str, hint: str | None) -> InputError:
    """The one line for an open that failed: a link, something that is not a file, or the OS's reason."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        mode = None
    if exc.errno == errno.ELOOP or (mode is not None and stat.S_ISLNK(mode)):
        return InputError(str(path), "is a symbolic link; not followed", hint=hint)
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        return InputError(str(path), f"is {kind_of(mode)}, not a regular file; not read", hint=hint)
    if exc.errno == errno.ENOTDIR:
        return InputError(str(path), "is not a directory", hint=hint)
    return InputError(str(path), f"cannot be opened ({exc.strerror or exc})", hint=hint)


def open_regular(path: str | os.PathLike[str], *, within: str | os.PathLike[str] | None = None,
                 hint: str | None = None) -> int | None:
    """A read-only fd of the regular file at ``path``, or None when nothing is there.

    The last component is never followed when it is a link; with ``within`` (a directory that
    ``path`` lies below, which is itself trusted), neither is any component below it. Anything but a
    regular file (a link, a FIFO, a device, a socket, a directory) is one InputError naming ``path``.
    """
    path = Path(path)
    if within is not None:
        parts = path.relative_to(within).parts
        base = Path(within)
    else:
        parts = (path.name,)
        base = path.parent
    if not parts or any(p in ("", ".", "..") for p in parts):
        raise InputError(str(path), "is not a file name below its directory", hint=hint)
    try:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputError(str(base), f"cannot be opened as a directory ({exc.strerror or exc})", hint=hint) from None
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                nxt = os.open(part, _OPEN if last else _OPEN_DIR, dir_fd=fd)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise _refusal(base.joinpath(*parts[: i + 1]), exc, fd, part, hint) from None
            os.close(fd)
            fd = nxt
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InputError(str(path), f"is {kind_of(mode)}, not a regular file; not read", hint=hint)
        out, fd = fd, -1
        return out
    finally:
        if fd >= 0:
            os.close(fd)


def _too_big(path: Path, size: int, limit: int, hint: str | None) -> InputError:
    return InputError(str(path), f"is {size} bytes, more than the {limit} bytes it may hold; not read", hint=hint)


def read_bytes(path: str | os.PathLike[str], limit: int, *, within: str | os.PathLike[str] | None = None,
               hint: str | None = None) -> bytes | None:
    """The bytes of the regular file at ``path`` (at most ``limit``), or None when it is absent.

    The size is checked on the open file before anything is read: a larger file (or one that
    grows past ``limit`` while it is read) is refused, never read whole.
    """
    path = Path(path)
    fd = open_regular(path, within=within, hint=hint)
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise _too_big(path, size, limit, hint)
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise _too_big(path, len(data), limit, hint)
    return data


def read_json(path: str | os.PathLike[str], limit: int = JSON_MAX_BYTES, *,
              within: str | os.PathLike[str] | None = None, hint: str | None = None,
              missing_ok: bool = False) -> Any:
    """The JSON document in the regular file at ``path``; None when absent and ``missing_ok``,
    else "not found". Not UTF-8, not JSON or nested too deep: one InputError naming the file."""
    path = Path(path)
    raw = read_bytes(path, limit, within=within, hint=hint)
    if raw is None:
        if missing_ok:
            return None
        raise InputError(str(path), "not found", hint=hint)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(str(path), "is not UTF-8 text, so not JSON", hint=hint) from None
    except (ValueError, RecursionError) as exc:
        raise InputError(str(path), f"cannot be read as JSON ({exc.__class__.__name__}: {exc})", hint=hint) from None


def read_lines(path: str | os.PathLike[str], limit: int, max_line: int, *,
               within: str | os.PathLike[str] | None = None, hint: str | None = None) -> Iterator[bytes] | None:
    """The lines of the regular file at ``path``, one at a time (``\\n`` kept), or None when it is absent.

    The file is opened and checked now (a link, a FIFO, more than ``limit`` bytes: refused before a
    line is read); the lines are read as they are consumed, so memory holds one line of at most
    ``max_line`` bytes. A longer line, or a file that grows past ``limit``, is refused when it is met
    (``PATH:LINE``). Close the iterator (or exhaust it) to close the file.
    """
    path = Path(path)
    fd = open_regular(path, within=within, hint=hint)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise _too_big(path, size, limit, hint)
    except BaseException:
        os.close(fd)
        raise
    return _lines(fd, path, limit, max_line, hint)


def _lines(fd: int, path: Path, limit: int, max_line: int, hint: str | None) -> Iterator[bytes]:
    with os.fdopen(fd, "rb") as fh:
        total = 0
        number = 0
        while True:
            line = fh.readline(max_line + 2)
            if not line:
                return
            number += 1
            total += len(line)
            if len(line) - line.endswith(b"\n") > max_line:
                raise InputError(f"{path}:{number}", f"is longer than {max_line} bytes; not read", hint=hint)
            if total > limit:
                raise _too_big(path, total, limit, hint)
            yield line


def links_leaving(root: str | os.PathLike[str], limit: int = 1000) -> list[str]:
    """The symbolic links inside the directory ``root`` (``rel -> target``) whose target is absolute or
    resolves outside ``root``: what another machine, or a container that mounts ``root`` alone, would
    resolve to other files than this one does. Never follows a link into a directory; at most ``limit``."""
    top = os.path.realpath(root)
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                continue
            try:
                target = os.readlink(full)
            except OSError:
                continue
            real = os.path.realpath(full)
            if os.path.isabs(target) or os.path.commonpath([top, real]) != top:
                out.append(f"{os.path.relpath(full, top)} -> {target}")
                if len(out) >= limit:
                    return out
        dirnames.sort()
    return out


def refuse_links_leaving(root: str | os.PathLike[str], where: str, hint: str | None = None) -> None:
    """One InputError (``where``) naming the links in ``root`` that leave it (see :func:`links_leaving`)."""
    found = links_leaving(root, limit=4)
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise InputError(where, f"holds a link that leaves it or is absolute ({shown}): it would be hashed "
                                "as this machine's file but resolve to another where the directory is mounted or "
                                "unpacked alone",
                         hint=hint or "replace each link with the file it points to (cp -L), or make it a relative "
                                      "link to a file inside the directory")


# --------------------------------------------------------------------------- a cell's directory


class CellPaths:
    """The files of one cell's directory (``OUT/<cell>``), named in one place.

    What each holds, and who writes it: a backend writes ``spec.json`` (the run spec the worker
    reads) and relays the worker's output into ``worker.log``; the worker writes ``record.json``
    (:func:`harness.record.write`), ``trace.jsonl`` (``--trace``), its weights (``weights/best.pt``,
    ``weights/last.pt``), the target scaler it fitted when the bundle has none, and a seed band
    member's config for a trainer command. A trainer command's own files are named in
    :mod:`harness.worker.trainer_cmd`. Everything here was writable by what ran in the cell, so the
    host reads it with the functions of this module, never following a link.
    """

    SPEC = "spec.json"
    LOG = "worker.log"
    RECORD = "record.json"
    TRACE = "trace.jsonl"
    WEIGHTS = "weights"
    BEST = f"{WEIGHTS}/best.pt"  # the best epoch's weights; also where a custom trainer's are saved to compare
    LAST = f"{WEIGHTS}/last.pt"
    SCALER = "target_scaler.joblib"  # the scaler this run fitted (the bundle had none)
    MEMBER_CONFIG = "harness-config.yaml"  # a seed band member's config.yaml, for a trainer command

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def __repr__(self) -> str:
        return f"CellPaths({str(self.folder)!r})"

    @property
    def spec(self) -> Path:
        return self.folder / self.SPEC

    @property
    def log(self) -> Path:
        return self.folder / self.LOG

    @property
    def record(self) -> Path:
        return self.folder / self.RECORD

    @property
    def trace(self) -> Path:
        return self.folder / self.TRACE

    @property
    def weights(self) -> Path:
        return self.folder / self.WEIGHTS

    @property
    def best(self) -> Path:
        return self.folder / self.BEST

    @property
    def last(self) -> Path:
        return self.folder / self.LAST

    @property
    def scaler(self) -> Path:
        return self.folder / self.SCALER

    @property
    def member_config(self) -> Path:
        return self.folder / self.MEMBER_CONFIG


# --------------------------------------------------------------------------- files a worker leaves
#
# What a worker (a container runs untrusted pickles) leaves in its cell directory is read by the
# launcher, which never follows a link there: a file is opened with O_NOFOLLOW | O_NONBLOCK and read
# only when it is a regular file. Its failures are the run's (RunFailed), not the user's input.


class NotRegularFile(OSError):
    """What is at a path is not a regular file (a FIFO, a device, a socket, a directory): never read."""


def open_no_follow(path: str | os.PathLike[str], *, follow_links: bool = False) -> BinaryIO:
    """The regular file at ``path``, opened for reading in binary; a FIFO is never waited on.

    A link in its place is not followed (an OSError with errno ``ELOOP``) unless ``follow_links``
    (a user's own file: ``--data``, a wheel). FileNotFoundError when nothing is there;
    :class:`NotRegularFile` when something other than a regular file is. (:func:`open_regular` is its
    counterpart for a file the user handed the harness: one InputError naming it.)
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            code = errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL
            raise NotRegularFile(code, f"is {kind_of(mode)}, not a regular file", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_no_follow(path: str | os.PathLike[str], limit: int, *, shown: str | None = None) -> bytes | None:
    """The bytes of the regular file a worker left at ``path`` (at most ``limit``); None when nothing is there.

    A link in its place, anything but a regular file, or more than ``limit`` bytes (also a file
    that grows past it while it is read) is one :class:`~harness.errors.RunFailed` naming it as
    ``shown`` (default: the path).
    """
    shown = str(path) if shown is None else shown
    try:
        fh = open_no_follow(path)
    except FileNotFoundError:
        return None
    except NotRegularFile:
        raise RunFailed(f"{shown} is not a regular file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunFailed(f"{shown} is a symbolic link, not a regular file; not followed") from None
        raise RunFailed(f"{shown} cannot be opened ({exc.strerror or exc})") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        data = fh.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise RunFailed(f"{shown} is {max(size, len(data))} bytes, more than the {limit} bytes it may hold")
    return data


def tail_no_follow(path: str | os.PathLike[str], chars: int = 2000) -> str | None:
    """The last ``chars`` characters of a log (UTF-8, undecodable bytes replaced), without following a link
    in its place; None when it is absent, empty, not a regular file or cannot be read."""
    try:
        with open_no_follow(path) as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - chars * 4))  # a character is at most 4 bytes of UTF-8
            return fh.read().decode("utf-8", "replace")[-chars:] or None
    except OSError:
        return None


# --------------------------------------------------------------------------- writing


def fresh_dir(out: Path) -> None:
    """Make ``out`` an empty directory, removing whatever a previous run's worker left there."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            try:
                shutil.rmtree(out)  # fd-based on Linux: does not follow links inside
            except OSError:
                # e.g. a directory the worker made unreadable: move the lot out of the way
                os.rename(out, out.with_name(f".{out.name}.stale-{time.time_ns()}"))
        else:
            out.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.mkdir(mode=0o755)
    os.chmod(out, 0o755)  # whatever the umask says: writable by its owner alone


def create_new(path: Path) -> int:
    """A write-only fd of a new file at ``path``; a link (or anything) already there is removed, never followed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            path.unlink()
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


def create_no_follow(path: Path) -> TextIO:
    """:func:`create_new` as a line-buffered UTF-8 text file: a log is current while it is written."""
    return os.fdopen(create_new(path), "w", encoding="utf-8", buffering=1)


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Write a file so that readers see the old one or the new one, never half.

    ``write`` fills a temp file in the same directory, which is fsynced and renamed
    over ``path``: a full disk or a kill mid-write leaves the previous file (or none).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
            # mkstemp makes 0600; results are meant to be read by others. fchmod, not chmod:
            # in a directory a container can write, the name may be a link by now.
            os.fchmod(fh.fileno(), 0o644)
        os.replace(tmp, path)  # replaces a link at ``path`` itself; never writes through it
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write` of UTF-8 text."""
    data = text.encode("utf-8")
    atomic_write(path, lambda fh: fh.write(data))


# --------------------------------------------------------------------------- digests

HASH_CHUNK = 1 << 20


def hash_into(h: Any, fh: BinaryIO, chunk: int = HASH_CHUNK) -> None:
    """Feed what is left of the open binary file ``fh`` into the hash ``h``, ``chunk`` bytes at a time."""
    for block in iter(lambda: fh.read(chunk), b""):
        h.update(block)


def sha256_file(path: str | os.PathLike[str], *, follow_links: bool = True, chunk: int = HASH_CHUNK) -> str:
    """Hex sha256 of a regular file's bytes (as ``sha256sum`` prints it), streamed.

    Opened as :func:`open_no_follow` opens it: a FIFO, a device or a directory is refused
    (:class:`NotRegularFile`), never read; a link in its place is followed only with ``follow_links``.
    """
    h = hashlib.sha256()
    with open_no_follow(path, follow_links=follow_links) as fh:
        hash_into(h, fh, chunk)
    return h.hexdigest()
