"""Reading files that something else wrote: the one home of hostile-file reading on the host.

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

Each refusal is one :class:`~harness.errors.InputError` naming the file (exit 2). Standard library
only, and nothing from the harness but :mod:`harness.errors`: the worker may import it too.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError

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
