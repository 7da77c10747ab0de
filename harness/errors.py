"""One error family for the whole harness, and the exit codes it maps to.

Every error the harness raises on purpose is a :class:`HarnessError`. Each
subclass carries an ``exit_code`` and builds a one-line message that names the
offending thing and the way out. ``harness.cli.main`` is the only place that
turns them into exit codes; the worker serialises them into the result record
so that an error raised inside a child process (or a container) reaches the
CLI with its kind intact.
"""

from __future__ import annotations

import enum
import errno
from typing import Any, Iterable

# Exit codes, in one place.
EXIT_OK = 0  # every cell that ran reproduced (skipped cells do not count against it)
EXIT_RUN_FAILED = 1  # a run (cell, build, container) failed, or the run is incomplete
EXIT_USAGE = 2  # bad input or usage; nothing was trained
EXIT_DRIFTED = 3  # everything ran, at least one metric is outside tolerance
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_TERMINATED = 143  # SIGTERM (128 + 15): handled like Ctrl-C, told apart for supervisors


class ErrorKind(str, enum.Enum):
    """What kind of failure a record's ``error`` is (``ErrorInfo.kind``), and an error's :attr:`HarnessError.kind`.

    A str: it compares equal to its word, and JSON holds the word. A word this version does not write (one an
    older or a newer harness wrote) is read as it is, never refused: ``ErrorKind("oom")`` is a kind of no
    member's, keeping its word, so a record reads, compares and is written back unchanged (``known`` is False).
    """

    ERROR = "error"  # a harness error of no narrower kind
    INPUT = "input"  # the bundle, its data, the trainer's input: nothing trains (exit 2)
    USAGE = "usage"  # how the harness was called (exit 2)
    RUN = "run"  # the cell failed while it ran, or its worker left no record
    BACKEND = "backend"  # the launcher (Docker engine, subprocess ...) could not do its job
    BUILD = "build"  # an image build failed
    IMAGE = "image"  # what the cell runs in could not be made (its image, wheelhouse, base image): it never started
    DIVERGED = "diverged"  # no epoch had a finite validation loss
    DISK = "disk"  # the disk filled up (or went read-only), or the cell wrote past its disk limit
    TIMEOUT = "timeout"  # it ran past --timeout and was killed
    SLURM = "slurm"  # Slurm ended its job (cancelled, out of time, node failure) and it left no record
    SKIPPED = "skipped"  # this host cannot run it; it never started
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM while it ran

    def __str__(self) -> str:
        return str(self.value)

    @property
    def known(self) -> bool:
        """One of the kinds this version writes (False: a word an older or a newer harness wrote)."""
        return any(self is member for member in type(self))

    @classmethod
    def _missing_(cls, value: object) -> ErrorKind | None:
        if not isinstance(value, str):
            return None
        other = str.__new__(cls, value)  # not a member: the word as read
        other._name_ = "OTHER"
        other._value_ = value
        return other


class HarnessError(Exception):
    """Base of every error the harness raises deliberately."""

    exit_code = EXIT_RUN_FAILED
    kind: ErrorKind = ErrorKind.ERROR

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The message a user reads: what is wrong, then how to fix it."""
        if self.hint:
            return f"{self.message}; {self.hint}"
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.one_line()}


class InputError(HarnessError):
    """Bad input: a file, key or value the user has to fix. Exit 2."""

    exit_code = EXIT_USAGE
    kind = ErrorKind.INPUT

    def __init__(self, where: str, message: str, *, hint: str | None = None) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message, hint=hint)


class UsageError(InputError):
    """Bad command-line usage. Exit 2."""

    kind = ErrorKind.USAGE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__("", message, hint=hint)


class RunFailed(HarnessError):
    """A run that was set up correctly failed while it ran. Exit 1."""

    exit_code = EXIT_RUN_FAILED
    kind = ErrorKind.RUN


class BackendError(RunFailed):
    """The backend (Docker engine, subprocess launcher ...) could not do its job."""

    kind = ErrorKind.BACKEND


BUILD_LOG_TAIL = 20  # lines of a failed build's log that its error carries


class BuildFailed(RunFailed):
    """An image build failed; carries the cell, the tag and the last lines of its log."""

    kind = ErrorKind.BUILD

    def __init__(self, cell: str | None, tag: str, reason: str, log_tail: Iterable[str] = ()) -> None:
        self.cell = cell
        self.tag = tag
        self.reason = reason
        self.log_tail = [line[:240] for line in log_tail if line.strip()][-BUILD_LOG_TAIL:]
        tail = " | ".join(line.strip() for line in self.log_tail)
        what = f"image build for cell {cell} ({tag})" if cell else f"image build of {tag}"
        again = f"rerun `harness images build --cells {cell}` to see the log" if cell else "rerun it to see the log"
        super().__init__(f"{what} failed: {reason}", hint=f"log tail: {tail}" if tail else again)


class BaseImageMissing(InputError):
    """A cell's base image is not in the local engine, and was not pulled.

    Only a base pinned by digest is pulled, and not with ``--offline``; ``why`` says
    which case this is (unpinned, offline, or the pull that failed).
    """

    def __init__(self, cell: str, image: str, why: str | None = None) -> None:
        self.cell = cell
        self.image = image
        why = why or "not pinned by digest, and the harness never pulls an unpinned base"
        super().__init__(
            f"cell {cell}",
            f"base image {image} is not in the local Docker engine ({why})",
            hint=(
                f"`docker pull {image}` or `docker load` it yourself, make one with "
                f"`tar -C ROOTFS -c . | docker import - NAME`, or pick another with "
                f"--base-image {cell}=IMAGE"
            ),
        )
        # This host cannot build the cell, which is not the cell failing: the runner records it as skipped.
        self.skip_reason = (f"base image {image} is not in the engine ({why}): `docker pull {image}`, "
                            f"or --base-image {cell}=IMAGE")


class BaseImageMismatch(RunFailed):
    """A base image pulled by its pinned digest is not that digest: refused, never built on."""

    kind = ErrorKind.IMAGE

    def __init__(self, cell: str, pinned: str, got: Iterable[str]) -> None:
        self.cell = cell
        got = list(got)
        super().__init__(
            f"cell {cell}: the base image pulled as {pinned} has RepoDigests {', '.join(got) or 'none'}, "
            f"not the pinned digest; it was removed and nothing was built on it",
            hint="check the registry or mirror the engine pulls from, or pin the digest it serves in images/")


class Interrupted(HarnessError):
    """Ctrl-C during a run: what finished is kept, the running cell is recorded as interrupted. Exit 130."""

    exit_code = EXIT_INTERRUPTED
    kind = ErrorKind.INTERRUPTED


# An OSError of the disk, not of the program: said in one line, without a traceback to read.
DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system"}


def disk_failure(exc: OSError) -> str | None:
    """The one line for a write that failed because of the disk, or None for any other OSError."""
    where = f" writing {exc.filename}" if exc.filename else ""
    if exc.errno == errno.EFBIG:  # not a full disk: a file size limit (ulimit -f) or the file system's
        return (f"file too large{where} (over this process's file size limit, `ulimit -f`, or the file "
                "system's); raise the limit or pass --out DIR on another disk, then rerun the cell")
    what = DISK_ERRNOS.get(exc.errno or 0)
    if what is None:
        return None
    return f"{what}{where}; free space or pass --out DIR on another disk, then rerun the cell"
