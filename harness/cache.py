"""A cell's cache key, and whether a record already on disk can stand for a rerun (``--resume``).

A cell's result is determined by: the environment it runs in (the image's id, or for the
local backend the interpreter, its torch and numpy versions and the harness's own sources),
the run spec the worker reads, the bundle's files, the data's sha256 and the trainer's code.
:func:`cell_key` is the sha256 over exactly those (pure); the rest of this module reads the
files it needs (nothing is executed, and no link is followed but to a file a trainer command
names: those are the user's own).

It also covers what a backend adds as the cell's ``inputs`` (:meth:`CellCache.key`): the
variables of the worker's environment that can change its numbers (:func:`numeric_environment`),
and for a trainer command on the local backend, every file its words name (:func:`command_files`).

What the key does not cover, and so never triggers a rerun: files a trainer reads beside the
data under ``--data-dir`` (only the data file's digest is in it), and a trainer package that
is installed rather than found on ``--trainer-path`` / ``trainer.path``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .errors import HarnessError
from .safeio import NotRegularFile, sha256_file

KEY_VERSION = "harness.cellkey/2"
SKIP_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", ".venv", "venv", ".mypy_cache", ".pytest_cache",
                       ".tox", "node_modules"})


def key_document(*, environment: str, spec: dict[str, Any], bundle: str, data_sha256: str | None,
                 trainer: str | None, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a cell's key is the digest of (pure)."""
    return {"version": KEY_VERSION, "environment": environment, "spec": spec, "bundle": bundle,
            "data_sha256": data_sha256, "trainer": trainer, "inputs": inputs or {}}


def cell_key(*, environment: str, spec: dict[str, Any], bundle: str, data_sha256: str | None,
             trainer: str | None, inputs: dict[str, Any] | None = None) -> str:
    """sha256 over what determines a cell's result (pure): equal keys, equal inputs."""
    doc = key_document(environment=environment, spec=spec, bundle=bundle, data_sha256=data_sha256, trainer=trainer,
                       inputs=inputs)
    return _digest(doc)


def _digest(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


# The variables of a worker's environment that can change its numbers: torch's CPU instruction set
# (ATEN_CPU_CAPABILITY) and oneDNN's and MKL's, the thread pools and their settings of OpenMP, MKL,
# OpenBLAS and the like, cuBLAS/cuDNN/TF32 switches, which GPUs it sees and in which order
# (CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER), torch's own switches (TORCH_*, PYTORCH_*,
# TORCHINDUCTOR_*), and which native libraries load (LD_*). Taking one too many costs at
# most a rerun; one too few reuses a record measured under other numbers.
NUMERIC_PREFIXES = ("ATEN_", "ONEDNN_", "DNNL_", "MKL_", "MKLDNN_", "KMP_", "OMP_", "GOMP_", "OPENBLAS_", "GOTO_",
                    "BLIS_", "VECLIB_", "NUMEXPR_", "NPY_", "CUBLAS_", "CUBLASLT_", "CUDNN_", "CUDA_", "NVIDIA_",
                    "TORCH_", "PYTORCH_", "TORCHINDUCTOR_", "TRITON_", "XLA_")
# PYTHONPATH is not one: the code it finds is keyed where it matters (the interpreter's torch and
# numpy, --trainer-path), and the same code is often found through another PYTHONPATH.
NUMERIC_NAMES = frozenset({"PYTHONHASHSEED", "LD_PRELOAD", "LD_LIBRARY_PATH"})


def numeric_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``env`` that can change a cell's numbers (pure): what the worker is started with."""
    return {k: v for k, v in sorted(env.items()) if k in NUMERIC_NAMES or k.startswith(NUMERIC_PREFIXES)}


COMMAND_FILES_MAX = 10_000  # files named by a command (a folder counts its files) ...
COMMAND_BYTES_MAX = 2 << 30  # ... and their bytes, beyond which the cell is not keyed (never reused)


def command_files(words: Iterable[str], *, cwd: str, path: str | None,
                  covered: Iterable[str | None] = ()) -> tuple[dict[str, str], str | None]:
    """The digest of every existing file a command's words name, and why the cell cannot be keyed (None: it can).

    ``words``: the command after placeholder substitution. A word names a file when it is an
    existing path, absolute or relative to ``cwd`` (the command's working directory); the value of
    ``--opt=VALUE`` too; a word without a slash also when it is a program on ``path`` (``bash``,
    a script the command runs by name). What lies under ``covered`` (the bundle, the data, the
    trainer folders: in the key already; the cell's own directory: its output) is skipped, and so
    are devices and FIFOs (``/dev/null``). A folder is hashed as a tree (:func:`tree_digest`). These
    are the user's own files, so a link is followed to what it names. A file that cannot be read,
    or more than :data:`COMMAND_FILES_MAX` files or :data:`COMMAND_BYTES_MAX` bytes, is a reason.
    """
    skip = [os.path.realpath(c) for c in covered if c]
    found: dict[str, str] = {}
    budget = [COMMAND_FILES_MAX, COMMAND_BYTES_MAX]
    for word in words:
        for candidate in _path_candidates(word, cwd, path):
            real = os.path.realpath(candidate)
            if real in found or any(real == c or real.startswith(c.rstrip(os.sep) + os.sep) for c in skip):
                continue
            try:
                st = os.stat(real)
            except FileNotFoundError:
                continue
            except OSError as exc:
                return found, f"--trainer-cmd names {word!r}, which cannot be read ({exc.strerror or exc})"
            if stat.S_ISDIR(st.st_mode):
                digest = _bounded_tree_digest(Path(real), budget)
            elif stat.S_ISREG(st.st_mode):
                budget[0] -= 1
                budget[1] -= st.st_size
                digest = _file_sha256_following(real) if budget[0] >= 0 and budget[1] >= 0 else None
                if real.endswith(".py") and digest is not None and not digest.startswith("unreadable:"):
                    # A script imports what lies beside it (its folder is sys.path[0]): its sibling
                    # modules and packages are inputs too.
                    siblings = _script_siblings(real, skip, budget)
                    if siblings is None:
                        return found, (f"--trainer-cmd names {word!r}, whose folder holds more than "
                                       f"{COMMAND_FILES_MAX} files or {COMMAND_BYTES_MAX >> 30} GiB to hash")
                    if siblings.startswith("unreadable:"):
                        return found, f"--trainer-cmd names {word!r}, whose folder cannot be read ({siblings})"
                    digest = f"{digest}+{siblings}" if siblings else digest
            else:
                continue  # a device, a FIFO, a socket: no content to hash
            if digest is None:
                return found, (f"--trainer-cmd names {word!r}, more than {COMMAND_FILES_MAX} files or "
                               f"{COMMAND_BYTES_MAX >> 30} GiB to hash")
            if digest.startswith("unreadable:"):
                return found, f"--trainer-cmd names {word!r}, which cannot be read ({digest})"
            found[real] = digest
    return found, None


def _script_siblings(script: str, skip: list[str], budget: list[int]) -> str | None:
    """The digest of the modules a Python script can import from its own folder: its sibling ``*.py``
    files and package folders (a folder with ``__init__.py``), "" when none; None over ``budget``."""
    folder = os.path.dirname(script)
    if any(folder == c or folder.startswith(c.rstrip(os.sep) + os.sep) for c in skip):
        return ""  # in the key already (a trainer folder, the bundle)
    h = hashlib.sha256()
    hashed = 0
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        return f"unreadable:{exc.strerror or exc}"
    for name in names:
        full = os.path.join(folder, name)
        if full == script:
            continue
        if name.endswith(".py") and os.path.isfile(full):
            budget[0] -= 1
            budget[1] -= os.path.getsize(full)
            if budget[0] < 0 or budget[1] < 0:
                return None
            digest: str | None = _file_sha256_following(full)
        elif os.path.isfile(os.path.join(full, "__init__.py")):
            digest = _bounded_tree_digest(Path(full), budget)
            if digest is None:
                return None
        else:
            continue
        if digest.startswith("unreadable:"):
            return digest  # never keyed: an input that cannot be read cannot be said unchanged
        h.update(f"{name}\0{digest}\0".encode())
        hashed += 1
    return h.hexdigest() if hashed else ""


def trainer_command_files(command: str, *, python: str, cell: Any, job: Any,
                          path: str | None) -> tuple[dict[str, str], str | None]:
    """:func:`command_files` of a trainer command as a worker on this host runs it: its placeholders filled
    with this host's paths, in its working directory (the cell's, or trainer.cwd's), on the worker's ``path``."""
    from .bundle import split_command
    from .errors import InputError
    from .worker.trainer_cmd import substitute

    unknown = "\0"  # a value known only to the worker: {seed} of the bundle's config, the device "auto" becomes
    out_dir = str(job.cell_dir(cell))
    values = {"bundle": job.bundle_dir, "config": os.path.join(job.bundle_dir, "config.yaml"), "data": job.data_path,
              "out_dir": out_dir, "python": python, "code_dir": job.trainer_path[0] if job.trainer_path else None,
              "seed": str(cell.seed) if cell.seed is not None else unknown,
              "device": cell.device if cell.device != "auto" else unknown}
    try:
        words = substitute(split_command(command), values)
    except InputError:
        return {}, None  # the worker refuses it before anything trains
    for word in words:
        if unknown in word and os.sep in word:
            return {}, f"--trainer-cmd names a path through {{seed}} or {{device}} ({word.replace(unknown, '?')!r})"
    covered = [job.bundle_dir, job.data_path, job.data_dir, out_dir, *(job.trainer_path or ())]
    cwd = {"bundle": job.bundle_dir, "project": (job.trainer_path or [out_dir])[0]}.get(job.trainer_cwd or "", out_dir)
    return command_files([w for w in words if unknown not in w], cwd=cwd, path=path, covered=covered)


def _path_candidates(word: str, cwd: str, path: str | None) -> list[str]:
    if word.startswith("-"):  # an option: only the value of --opt=VALUE can name a file
        values = [word.split("=", 1)[1]] if "=" in word else []
    else:
        values = [word]
    out = []
    for value in values:
        if not value:
            continue
        out.append(value if os.path.isabs(value) else os.path.join(cwd, value))
        if os.sep not in value and path is not None:
            program = shutil.which(value, path=path)
            if program is not None:
                out.append(program)
    return out


_HASHED: dict[tuple[str, int, int, int, int], str] = {}  # (path, device, inode, size, mtime) -> digest: one read per run


def _file_sha256_following(path: str) -> str:
    """:func:`harness.safeio.sha256_file` of a file a command names (a link followed: the user's own),
    once per run; ``unreadable:REASON`` when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"unreadable:{exc.strerror or exc}"
    seen = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if seen in _HASHED:
        return _HASHED[seen]  # every cell of a matrix names the same interpreter
    try:
        _HASHED[seen] = sha256_file(path)
    except OSError as exc:
        return f"unreadable:{exc.strerror or exc}"
    return _HASHED[seen]


def _bounded_tree_digest(root: Path, budget: list[int]) -> str | None:
    """:func:`tree_digest` of ``root`` within ``budget`` ([files, bytes] left, spent here); None when over it."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            try:
                st = os.lstat(p)
            except OSError:
                continue
            budget[0] -= 1
            budget[1] -= st.st_size if stat.S_ISREG(st.st_mode) else 0
            if budget[0] < 0 or budget[1] < 0:
                return None
            h.update(p.relative_to(root).as_posix().encode() + b"\0")
            if stat.S_ISLNK(st.st_mode):
                h.update(b"link:" + os.readlink(p).encode() + b"\0")
            else:
                h.update(_file_sha256(p).encode() + b"\0")
    return h.hexdigest()


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
    """:func:`harness.safeio.sha256_file` of a file in a tree, a link in its place never followed; for the key,
    ``not-a-file`` (a FIFO, a device ...) or ``unreadable:ERRNO`` (a link, no permission) when it has no digest."""
    try:
        return sha256_file(path, follow_links=False)
    except NotRegularFile:
        return "not-a-file"
    except OSError as exc:
        return f"unreadable:{exc.errno}"


_HARNESS_ROOT = Path(__file__).resolve().parent


WORKER_SOURCES = ("__init__.py", "bundle.py", "errors.py", "options.py", "record.py", "safeio.py", "schedule.py",
                  "stats.py")  # beside worker/: what the worker imports (tests/unit/test_structure.py)


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
        self.documents: dict[str, dict[str, Any]] = {}  # key -> what it is the digest of

    def key(self, environment: str, spec: dict[str, Any], inputs: dict[str, Any] | None = None) -> str:
        """The cell's key; ``inputs``: what its backend adds (the worker's environment, a command's files)."""
        doc = key_document(environment=environment, spec=spec, bundle=self.bundle, data_sha256=self.data_sha256,
                           trainer=self.trainer, inputs=inputs)
        key = _digest(doc)
        self.documents[key] = doc
        return key

    def remember(self, results_dir: str | Path, key: str) -> None:
        """Keep what ``key`` is the digest of in ``RESULTS/.harness-keys/KEY.json`` (best effort), so that a later
        ``--resume`` can say what changed. The results directory itself is not mounted into a container."""
        doc = self.documents.get(key)
        if doc is None:
            return
        from .safeio import atomic_write_text

        path = Path(results_dir) / KEYS_DIR / f"{key}.json"
        try:
            path.parent.mkdir(exist_ok=True)
            if not path.is_file():
                atomic_write_text(path, json.dumps(doc, sort_keys=True, default=str))
        except OSError:
            pass

    def why_rerun(self, results_dir: str | Path, cell_dir: Path, cell: str, key: str) -> str | None:
        """In words, what changed since the finished record in ``cell_dir`` ran; None when there is no finished
        record of ``cell`` there, or it stands for a rerun with ``key``."""
        rec = _finished_record(cell_dir, cell)
        if rec is None or rec.cache_key == key:
            return None
        old = rec.cache_key
        if not isinstance(old, str) or len(old) != 64 or any(c not in "0123456789abcdef" for c in old):
            return "its record carries no cache key of this harness"
        before = _read_key_document(Path(results_dir) / KEYS_DIR / f"{old}.json")
        now = self.documents.get(key)
        changes = key_changes(before, now) if before is not None and now is not None else []
        return "; ".join(changes) if changes else "its inputs changed since it ran"


KEYS_DIR = ".harness-keys"
KEY_DOCUMENT_MAX = 4 << 20


def _read_key_document(path: Path) -> dict[str, Any] | None:
    """A document :meth:`CellCache.remember` wrote; None when absent or unusable (read without following a link)."""
    from .safeio import read_no_follow

    try:
        raw = read_no_follow(path, KEY_DOCUMENT_MAX)
        doc = json.loads(raw.decode("utf-8", "replace")) if raw is not None else None
    except (HarnessError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _shown(value: Any, longest: int = 60) -> str:
    """A value for a message: as it is when short and printable, else quoted and cut (pure)."""
    if value is None:
        return "unset"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    if text == "" or not text.isprintable() or len(text) > longest:
        text = repr(text[:longest - 3] + "..." if len(text) > longest else text)
    return text


def key_changes(old: Mapping[str, Any], new: Mapping[str, Any], most: int = 8) -> list[str]:
    """What differs between two key documents (:func:`key_document`), one phrase each (pure)."""
    def part(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
        value = doc.get(name)
        return value if isinstance(value, dict) else {}

    if old.get("version") != new.get("version"):
        return ["the harness keys its cells differently since it ran"]
    out: list[str] = []
    env_old, env_new = str(old.get("environment")), str(new.get("environment"))
    if env_old != env_new:
        if env_old.startswith("image:") and env_new.startswith("image:"):
            out.append(f"the image changed ({env_old[6:25]} -> {env_new[6:25]})")
        else:
            out.append("the interpreter, its torch or numpy, or the harness's worker sources changed")
    spec_old, spec_new = part(old, "spec"), part(new, "spec")
    for name in sorted(set(spec_old) | set(spec_new)):
        if spec_old.get(name) != spec_new.get(name):
            out.append(f"the run spec's {name} changed ({_shown(spec_old.get(name))} -> {_shown(spec_new.get(name))})")
    for name, what in (("bundle", "a file of the bundle changed"), ("data_sha256", "the data changed"),
                       ("trainer", "the code under --trainer-path changed")):
        if old.get(name) != new.get(name):
            out.append(what)
    inputs_old, inputs_new = part(old, "inputs"), part(new, "inputs")
    env_vars_old, env_vars_new = part(inputs_old, "environ"), part(inputs_new, "environ")
    for var in sorted(set(env_vars_old) | set(env_vars_new)):
        if env_vars_old.get(var) != env_vars_new.get(var):
            out.append(f"{var} changed ({_shown(env_vars_old.get(var))} -> {_shown(env_vars_new.get(var))})")
    files_old, files_new = part(inputs_old, "files"), part(inputs_new, "files")
    for name in sorted(set(files_old) | set(files_new)):
        if name not in files_old:
            out.append(f"--trainer-cmd now names {_shown(name, 300)}")
        elif name not in files_new:
            out.append(f"--trainer-cmd no longer names {_shown(name, 300)}")
        elif files_old[name] != files_new[name]:
            out.append(f"{_shown(name, 300)} (named by --trainer-cmd) changed")
    for name in sorted((set(inputs_old) | set(inputs_new)) - {"environ", "files"}):
        if inputs_old.get(name) != inputs_new.get(name):
            out.append(f"{name} changed ({_shown(inputs_old.get(name))} -> {_shown(inputs_new.get(name))})")
    return out[:most] + ([f"and {len(out) - most} more"] if len(out) > most else [])


def _finished_record(cell_dir: Path, cell: str) -> Any:
    """The ``ok`` record of ``cell`` in ``cell_dir``, else None (read as :func:`reusable` says)."""
    from .record import Status, read_worker_record
    from .safeio import CellPaths

    try:
        st = os.lstat(cell_dir)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    try:
        rec = read_worker_record(CellPaths(cell_dir).record)
    except HarnessError:
        return None
    if rec is None or rec.cell != cell or rec.status is not Status.OK:
        return None
    return rec


def reusable(cell_dir: Path, cell: str, key: str) -> Any:
    """The finished record in ``cell_dir`` when it stands for a rerun of ``cell`` with ``key``, else None.

    The directory is one a container could write, so the record is read without following a
    link and checked like any other: it must be a regular file of this schema, of this cell,
    with status ``ok`` (a failed, interrupted, timed-out or skipped record is rerun) and the same key.
    """
    rec = _finished_record(cell_dir, cell)
    if rec is None or rec.cache_key != key:
        return None
    return rec
