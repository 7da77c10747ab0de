"""The on-disk dataset format, its digest, and the preprocessing the config asks for.

Format (documented in docs/your-own-project.md, "The dataset format"): one ``.npz`` file with

* ``X``: float array, shape ``(samples, channels, time)``
* ``y``: float array, shape ``(samples, targets)`` (or ``(samples,)`` for one target)
* ``target_names`` (optional): string array of length ``targets``
* ``channel_names`` (optional): string array of length ``channels``

It is read with ``allow_pickle=False``, so loading it never executes code.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import DataSpec
from ..errors import InputError
from ..safeio import NotRegularFile, hash_into, open_no_follow, refuse_links_leaving, sha256_file


@dataclass
class Dataset:
    X: np.ndarray  # (n, channels_kept, time_downsampled), float32
    y: np.ndarray  # (n, targets), float32, original units
    target_names: list[str]
    channel_names: list[str]  # of the kept channels
    raw_shape: tuple[int, ...]

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1] * self.X.shape[2])

    @property
    def n_targets(self) -> int:
        return int(self.y.shape[1])


def sha256_path(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of the data as bytes, whatever its format.

    A file: the sha256 of its bytes (:func:`harness.safeio.sha256_file`). A directory: a
    sorted walk of its files, hashing each relative path (``/``-separated) and
    its bytes, so renaming, adding or changing any file changes the digest. A directory
    holding a link that leaves it (or is absolute) is refused (InputError): its target is
    this machine's file, not the one a container mounting the directory would read. A FIFO, a
    device or a socket is refused (InputError), never read.
    """
    p = Path(path)
    if not p.is_dir():
        try:
            return sha256_file(p, chunk=chunk)
        except NotRegularFile as exc:
            raise InputError(str(p), f"{exc.strerror}; the data is hashed before it trains, so it is not read",
                             hint="point data.path (or --data) at a regular file or a directory") from None
    refuse_links_leaving(p, str(p))
    h = hashlib.sha256()
    files = sorted((f for f in p.rglob("*") if f.is_file()), key=lambda f: f.relative_to(p).as_posix())
    for f in files:
        rel = f.relative_to(p).as_posix().encode()
        h.update(len(rel).to_bytes(8, "big") + rel)
        h.update(f.stat().st_size.to_bytes(8, "big"))
        with open_no_follow(f, follow_links=True) as fh:
            hash_into(h, fh, chunk)
    return h.hexdigest()


_KINDS = {".csv": "a CSV", ".tsv": "a TSV", ".txt": "a text", ".parquet": "a Parquet", ".json": "a JSON",
          ".pkl": "a pickle", ".pickle": "a pickle", ".h5": "an HDF5", ".hdf5": "an HDF5", ".feather": "a Feather",
          ".pt": "a torch", ".pth": "a torch", ".xlsx": "an Excel"}


def require_npz(p: Path) -> None:
    """The reference trainer reads one ``.npz``: say what ``p`` is otherwise, and how to go on."""
    where = str(p)
    _require_file(p)
    if zipfile.is_zipfile(p):
        return
    with open(p, "rb") as fh:
        head = fh.read(4096)
    if head.startswith(b"\x93NUMPY"):
        raise InputError(where, "is a single .npy array, not an .npz with X and y", hint="save with np.savez(path, X=X, y=y, target_names=names)")
    if p.suffix.lower() == ".npz":  # named as one, but damaged
        raise InputError(where, "cannot be read as an .npz dataset (not a zip file)",
                         hint="write it with np.savez(path, X=X, y=y, target_names=names)")
    kind = _KINDS.get(p.suffix.lower())
    if kind is None:
        try:
            text = head.decode("utf-8")
            kind = "a CSV" if "," in text else "a text"
        except UnicodeDecodeError:
            kind = "an unrecognised binary"
    raise InputError(where, f"{p.name} is {kind} file, not an .npz; the reference trainer reads np.savez(path, X=X, y=y)",
                     hint="convert it, or name your own trainer with --trainer")


def _names(arr: np.ndarray | None, n: int, prefix: str, key: str, where: str) -> list[str]:
    if arr is None:
        return [f"{prefix}{i}" for i in range(n)]
    names = [str(v) for v in np.asarray(arr).reshape(-1)]
    if len(names) != n:
        raise InputError(where, f"{key} has {len(names)} names but the data has {n}", hint=f"give one name per {prefix.rstrip('_')}")
    if len(set(names)) != len(names):
        raise InputError(where, f"{key} has duplicate names {names}", hint="make every name unique")
    return names


def require_exists(path: str | Path, relative_to: str = "the optuna_best directory") -> None:
    """A custom trainer's data: a file or a directory, in any format; only its existence is checked here.

    ``relative_to``: where a relative data.path was resolved from, in words (trainer.cwd: project moves it)."""
    p = Path(path)
    if not p.exists():
        other = "" if "trainer.cwd" in relative_to else \
            "; trainer.cwd: project resolves them from your trainer's code directory"
        raise InputError(str(p), "data not found",
                         hint=f"fix data.path in config.yaml (relative paths are resolved from {relative_to}{other}) "
                              "or pass --data")


def _require_file(p: Path) -> None:
    if not p.exists():
        raise InputError(str(p), "data file not found",
                         hint="fix data.path in config.yaml (relative paths are resolved from the optuna_best directory) or pass --data")
    if not p.is_file():
        raise InputError(str(p), "data path is not a file", hint="point data.path at the .npz file")


# --------------------------------------------------------------------------- how big the data may expand

DATA_LIMIT_ENV = "HARNESS_DATA_LIMIT"
DEFAULT_DATA_LIMIT = 16 << 30  # what a dataset's members may expand to, in all (the pre-check's bound)
MAX_RATIO = 100  # a member this many times larger than its compressed bytes ...
RATIO_FLOOR = 64 << 20  # ... and at least this large is refused: ordinary numbers never compress so far
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def human_size(n: int) -> str:
    """``2.0 GiB``: binary units, one decimal."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop returns


def parse_size(text: str, where: str, example: str) -> int:
    """``16G``, ``500M``, ``1.5T`` or plain bytes (binary units); one line naming ``where`` otherwise."""
    m = _SIZE_RE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise InputError(where, f"is {text!r}, not a size", hint=f"give bytes or a size such as {example}")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def data_limit() -> int:
    """The bound on a dataset's expanded size: ``$HARNESS_DATA_LIMIT``, else 16 GiB."""
    raw = os.environ.get(DATA_LIMIT_ENV)
    return parse_size(raw, f"${DATA_LIMIT_ENV}", f"{DATA_LIMIT_ENV}=64G") if raw else DEFAULT_DATA_LIMIT


def available_memory() -> int | None:
    """What this process could still allocate: ``MemAvailable``, lowered by a cgroup's limit (a container's)."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap, used = Path(limit).read_text().strip(), int(Path(usage).read_text().strip())
        except (OSError, ValueError):
            continue
        if cap.isdigit() and int(cap) < 1 << 60:  # "max", or v1's "no limit" (a huge number)
            found.append(max(0, int(cap) - used))
        break
    return min(found) if found else None


def _npy_header(fh: Any) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of the ``.npy`` stream ``fh`` is at the start of (its header only)."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    return tuple(int(v) for v in shape), dtype, fh.tell()


def check_expansion(zf: zipfile.ZipFile, where: str, limit: int | None, memory: int | None = None) -> int:
    """Refuse an ``.npz`` whose members would expand beyond reason, before any array is read; the total.

    From the zip's directory and each ``.npy`` header only: a member whose declared size is not
    what its header's shape and dtype need (more: bytes hidden beside the array; less: truncated,
    and numpy would allocate the header's size first), a large member that expands more than
    ``MAX_RATIO`` times (a zip bomb), and a total over ``limit`` or over ``memory`` (what this
    process could allocate). ``hint`` names the way out in each case.
    """
    hint = "write it with np.savez(path, X=X, y=y, target_names=names)"
    total = 0
    for info in zf.infolist():
        name, size = info.filename, info.file_size
        if size >= RATIO_FLOOR and size > MAX_RATIO * max(info.compress_size, 1):
            raise InputError(where, f"member {name} expands {size // max(info.compress_size, 1)}-fold, from "
                                    f"{human_size(info.compress_size)} to {human_size(size)}: refused as a zip bomb",
                             hint="if the data really is that redundant, save it uncompressed with np.savez "
                                  "(not savez_compressed)")
        if name.endswith(".npy"):
            with zf.open(info) as fh:
                shape, dtype, offset = _npy_header(fh)
            need = offset + math.prod(shape) * dtype.itemsize
            if size != need and not dtype.hasobject:  # pickled objects: refused by name where they are read
                said = f"its header (shape {shape}, {dtype}) describes {need} bytes"
                raise InputError(where, f"member {name} declares {size} bytes uncompressed, but {said}" +
                                 ("" if size > need else ": truncated or crafted"), hint=hint)
        total += size
        if limit is not None and total > limit:
            raise InputError(where, f"expands to more than {human_size(limit)} (at member {name}, "
                                    f"{human_size(size)}), the bound on a dataset's size",
                             hint=f"raise it with {DATA_LIMIT_ENV}=SIZE (e.g. 64G) if the machines have the memory")
    if memory is not None and total > memory:
        raise InputError(where, f"expands to {human_size(total)}, but this process can allocate only "
                                f"{human_size(memory)} here", hint="free memory, or run it where there is more "
                                                                  "(a container: a larger --memory)")
    return total


def load_raw(path: str | Path) -> dict[str, np.ndarray]:
    """Load the arrays of a dataset file, with no pickled objects allowed.

    Its members' expanded sizes are checked first (:func:`check_expansion`): against the
    memory this process can allocate, and against ``$HARNESS_DATA_LIMIT`` when it is set.
    """
    p = Path(path)
    where = str(p)
    require_npz(p)
    try:
        with zipfile.ZipFile(p) as zf:
            check_expansion(zf, where, data_limit() if os.environ.get(DATA_LIMIT_ENV) else None, available_memory())
        with np.load(p, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise InputError(where, "is a single .npy array, not an .npz with X and y", hint="save with np.savez(path, X=X, y=y, target_names=names)")
            return {k: npz[k] for k in npz.files}
    except InputError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, RuntimeError, NotImplementedError) as exc:
        raise InputError(where, f"cannot be read as an .npz dataset ({exc.__class__.__name__}: {exc})",
                         hint="write it with np.savez(path, X=X, y=y, target_names=names)") from None


@dataclass(frozen=True)
class Layout:
    """What the shapes of a dataset say, checked against the config (no array data needed)."""

    raw_shape: tuple[int, ...]
    n_targets: int
    keep: list[int]  # kept channels
    n_features: int
    target_names: list[str]
    channel_names: list[str]  # of the kept channels


def check_layout(spec: DataSpec, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype],
                 names: dict[str, np.ndarray | None]) -> Layout:
    """Every check of the dataset that shapes and dtypes answer: shared by the pre-check and the worker."""
    where = spec.resolved
    for key in ("X", "y"):
        if key not in shapes:
            raise InputError(where, f"has no array {key!r} (has {sorted(shapes)})", hint="save X (samples x channels x time) and y (samples x targets)")
    xs, ys = tuple(shapes["X"]), tuple(shapes["y"])
    if len(xs) != 3:
        raise InputError(where, f"X must be 3-D (samples x channels x time), got shape {xs}", hint="reshape to (n, channels, time); use channels=1 for a single series")
    if len(ys) == 1:
        ys = (ys[0], 1)
    if len(ys) != 2:
        raise InputError(where, f"y must be 2-D (samples x targets), got shape {ys}")
    if xs[0] != ys[0]:
        raise InputError(where, f"X has {xs[0]} samples but y has {ys[0]}", hint="X and y must have one row per sample")
    if not (np.issubdtype(dtypes["X"], np.number) and np.issubdtype(dtypes["y"], np.number)):
        raise InputError(where, f"X and y must be numeric, got {dtypes['X']} and {dtypes['y']}")
    n, channels, time = xs
    target_names = _names(names.get("target_names"), ys[1], "target_", "target_names", where)
    channel_names = _names(names.get("channel_names"), channels, "ch", "channel_names", where)
    excl = sorted(set(spec.exclude_channels))
    bad = [c for c in excl if not 0 <= c < channels]
    if bad:
        raise InputError("config.yaml", f"data.exclude_channels {bad} out of range: the data has {channels} channels (0..{channels - 1})",
                         hint="fix data.exclude_channels")
    keep = [c for c in range(channels) if c not in excl]
    if not keep:
        raise InputError("config.yaml", f"data.exclude_channels removes all {channels} channels", hint="keep at least one channel")
    if spec.downsample > time:
        raise InputError("config.yaml", f"data.downsample is {spec.downsample} but the series have only {time} time steps",
                         hint=f"use a factor between 1 and {time}")
    sizes = split_sizes(n, spec.split)
    if min(sizes[:2]) < 1:
        raise InputError(where, f"{n} samples give split sizes {sizes} (train, val, test)", hint="add samples or change data.split")
    return Layout(raw_shape=tuple(int(v) for v in xs), n_targets=int(ys[1]), keep=keep,
                  n_features=len(keep) * len(range(0, time, spec.downsample)), target_names=target_names,
                  channel_names=[channel_names[c] for c in keep])


MAX_NAMES = 100_000  # name arrays longer than this are not read by the pre-check (the worker reads them)


def read_layout(spec: DataSpec) -> Layout:
    """Check a dataset from its ``.npy`` headers inside the ``.npz``, without loading X or y.

    The pre-check runs in the CLI process: a multi-GB dataset must not be loaded
    there just to learn its shapes. Only the small name arrays are read.
    """
    p = Path(spec.resolved)
    where = str(p)
    require_npz(p)
    hint = "write it with np.savez(path, X=X, y=y, target_names=names)"
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, np.dtype] = {}
    names: dict[str, np.ndarray | None] = {}
    try:
        if not zipfile.is_zipfile(p):
            with open(p, "rb") as fh:
                if fh.read(6) == b"\x93NUMPY":
                    raise InputError(where, "is a single .npy array, not an .npz with X and y", hint="save with np.savez(path, X=X, y=y, target_names=names)")
            raise InputError(where, "cannot be read as an .npz dataset (not a zip file)", hint=hint)
        with zipfile.ZipFile(p) as zf:
            check_expansion(zf, where, data_limit())  # the machines that load it may differ: no memory bound here
            for member in zf.namelist():
                if not member.endswith(".npy"):
                    continue
                key = member[:-4]
                with zf.open(member) as fh:
                    shape, dtype, _ = _npy_header(fh)
                    if dtype.hasobject:
                        raise InputError(where, f"array {key!r} holds Python objects (pickles), which are refused", hint=hint)
                    shapes[key], dtypes[key] = tuple(shape), dtype
                    if key in ("target_names", "channel_names"):
                        if int(np.prod(shape, dtype=np.int64)) > MAX_NAMES:
                            raise InputError(where, f"{key} has more than {MAX_NAMES} entries")
                        fh2 = zf.open(member)
                        with fh2:
                            names[key] = np.lib.format.read_array(fh2, allow_pickle=False)
    except InputError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, RuntimeError, NotImplementedError) as exc:
        raise InputError(where, f"cannot be read as an .npz dataset ({exc.__class__.__name__}: {exc})", hint=hint) from None
    return check_layout(spec, shapes, dtypes, names)


def prepare(spec: DataSpec, arrays: dict[str, np.ndarray] | None = None) -> Dataset:
    """Load (unless given) and preprocess: channel exclusion, then downsampling by striding."""
    where = spec.resolved
    arrays = arrays if arrays is not None else load_raw(spec.resolved)
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    dtypes = {k: v.dtype for k, v in arrays.items()}
    layout = check_layout(spec, shapes, dtypes, {k: arrays.get(k) for k in ("target_names", "channel_names")})
    X, y = arrays["X"], arrays["y"]
    if y.ndim == 1:
        y = y[:, None]
    Xp = X[:, layout.keep, :: spec.downsample]
    if not (np.isfinite(Xp).all() and np.isfinite(y).all()):
        raise InputError(where, "contains NaN or infinite values", hint="clean the data before training")
    return Dataset(
        X=np.ascontiguousarray(Xp, dtype=np.float32),
        y=np.ascontiguousarray(y, dtype=np.float32),
        target_names=layout.target_names,
        channel_names=layout.channel_names,
        raw_shape=layout.raw_shape,
    )


def split_sizes(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """Sizes handed to ``random_split``: train and val floored, test takes the rest."""
    n_train = int(n * ratios[0])
    n_val = int(n * ratios[1])
    return n_train, n_val, n - n_train - n_val
