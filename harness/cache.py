"""A cell's cache key, and whether a record already on disk can stand for a rerun (``--resume``).

A cell's result is determined by: the environment it runs in (the image's id, or for the
local backend the interpreter, its torch and numpy versions and the harness's own sources),
the run spec the worker reads, the bundle's files, the data's sha256 and the trainer's code.
:func:`cell_key` is the sha256 over exactly those (pure); the rest of this module reads the
files it needs (no link is followed, nothing is executed).

What the key does not cover, and so never triggers a rerun: files a trainer reads beside the
data under ``--data-dir`` (only the data file's digest is in it), and a trainer package that
is installed rather than found on ``--trainer-path`` / ``trainer.path``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import HarnessError

KEY_VERSION = "harness.cellkey/1"
SKIP_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", ".venv", "venv", ".mypy_cache", ".pytest_cache",
                       ".tox", "node_modules"})


def cell_key(*, environment: str, spec: dict[str, Any], bundle: str, data_sha256: str | None,
             trainer: str | None) -> str:
    """sha256 over what determines a cell's result (pure): equal keys, equal inputs."""
    doc = {"version": KEY_VERSION, "environment": environment, "spec": spec, "bundle": bundle,
           "data_sha256": data_sha256, "trainer": trainer}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def tree_digest(root: str | Path, suffixes: tuple[str, ...] | None = None) -> str:
    """sha256 over every regular file under ``root`` (relative path and content), in name order.

    A link is hashed as its target's text, never followed; version-control and cache folders
    are skipped; ``suffixes`` keeps only files ending so (``(".py",)``).
    """
    h = hashlib.sha256()
    root = Path(root)
    for rel, path in _files(root, suffixes):
        h.update(rel.encode() + b"\0")
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode):
            h.update(b"link:" + os.readlink(path).encode() + b"\0")
            continue
        h.update(_file_sha256(path).encode() + b"\0")
    return h.hexdigest()


def _files(root: Path, suffixes: tuple[str, ...] | None) -> Iterable[tuple[str, Path]]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in filenames:
            if suffixes and not name.endswith(suffixes):
                continue
            path = Path(dirpath) / name
            found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return f"unreadable:{exc.errno}"
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return "not-a-file"
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_HARNESS_ROOT = Path(__file__).resolve().parent


WORKER_SOURCES = ("__init__.py", "bundle.py", "errors.py", "options.py", "preflight.py", "record.py")  # beside worker/: what the worker imports


def harness_source_digest() -> str:
    """sha256 over the harness sources a worker runs: ``harness/worker/`` and the modules it imports.

    The host side (tables, judging, scheduling) does not change a result, so editing it reruns nothing.
    """
    h = hashlib.sha256(tree_digest(_HARNESS_ROOT / "worker", (".py",)).encode())
    for name in WORKER_SOURCES:
        h.update(name.encode() + b"\0" + _file_sha256(_HARNESS_ROOT / name).encode())
    return h.hexdigest()


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def local_environment_digest(python: str | None = None) -> str:
    """What the local backend's cells run in: the interpreter, its torch and numpy, and the harness's sources.

    Versions come from the installed distributions' metadata (nothing is imported).
    """
    doc = {"python": python or sys.executable, "version": sys.version, "torch": _version("torch"),
           "numpy": _version("numpy"), "harness": harness_source_digest()}
    return "local:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class CellCache:
    """The parts of every cell's key that a run shares, read once; :meth:`key` adds a cell's own.

    ``reuse``: whether a finished cell's record with an unchanged key stands for a rerun
    (``--resume`` without ``--force``). ``before_run``: checks deferred until a cell must train.
    """

    def __init__(self, bundle_dir: str, data_sha256: str | None, trainer_dirs: Iterable[str] = (),
                 reuse: bool = False, before_run: Callable[[], None] | None = None) -> None:
        self.bundle = tree_digest(bundle_dir)
        self.data_sha256 = data_sha256
        dirs = list(trainer_dirs)
        self.trainer = hashlib.sha256("\0".join(tree_digest(d) for d in dirs).encode()).hexdigest() if dirs else None
        self.reuse = reuse
        self.before_run = before_run  # called once before the first cell that is not reused trains

    def key(self, environment: str, spec: dict[str, Any]) -> str:
        return cell_key(environment=environment, spec=spec, bundle=self.bundle, data_sha256=self.data_sha256,
                        trainer=self.trainer)


def reusable(cell_dir: Path, cell: str, key: str) -> Any:
    """The finished record in ``cell_dir`` when it stands for a rerun of ``cell`` with ``key``, else None.

    The directory is one a container could write, so the record is read without following a
    link and checked like any other: it must be a regular file of this schema, of this cell,
    with status ``ok`` (a failed, interrupted, timed-out or skipped record is rerun) and the same key.
    """
    from .backends.base import read_record_no_follow
    from .record import RECORD_FILE, Status

    try:
        st = os.lstat(cell_dir)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    try:
        rec = read_record_no_follow(cell_dir / RECORD_FILE)
    except HarnessError:
        return None
    if rec is None or rec.cell != cell or rec.status is not Status.OK or rec.cache_key != key:
        return None
    return rec
