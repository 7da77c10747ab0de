"""A custom trainer's weights, wherever it writes them and in whatever format it saves them.

Where: ``trainer.weights`` in config.yaml (a path inside the cell's output directory)
declares the file; otherwise, when the trainer returned no state dict, ``weights/best.pt``
(the documented place), else the one ``*.pt``, ``*.pth``, ``*.ckpt`` or ``*.safetensors``
file of the output directory's tree (:func:`find`). The archived counterpart in the
bundle's ``weights/`` is the file of the same name, else the one weights file there, else
the bundle's best weights (:func:`archived_counterpart`).

What: a file is read as tensors only. ``torch.load(..., map_location="cpu",
weights_only=True)`` never unpickles arbitrary objects; ``.safetensors`` is read by a small
bounds-checked reader (no dependency: the worker runs in images that hold only torch,
numpy, pyyaml, joblib and scikit-learn). A project's own checkpoint format is flattened
into dotted names (:func:`tensors_of`): a ``model``/``state_dict``/``model_state_dict``/
``net`` sub-mapping of tensors when there is one, else every tensor found; other leaves
(an epoch number, a config) are ignored.

The output directory was writable by the trainer: nothing there is followed. Each path
component is opened with ``O_NOFOLLOW`` and only regular files are read.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from ..safeio import CellPaths

SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")
STATE_KEYS = ("model", "state_dict", "model_state_dict", "net")  # where checkpoints keep the model's state
BEST = CellPaths.BEST  # weights/best.pt: the documented place, where the harness also saves what it compared
SAFETENSORS_HEADER_MAX = 100 << 20
MAX_DEPTH = 32  # nesting of a checkpoint, and of the directory walk
MAX_ENTRIES = 10_000  # directory entries looked at when searching the output directory
CANDIDATES_SHOWN = 5


class Unreadable(Exception):
    """Why a file cannot be read as weights (one line, for the record)."""


# --------------------------------------------------------------------------- opening without following links


def open_inside(root: Path, rel: str, *, follow: bool = False) -> Any:
    """``root/rel`` opened for reading as a binary file object: a regular file, every component of ``rel``
    opened with O_NOFOLLOW unless ``follow``. FileNotFoundError when absent; :class:`Unreadable` otherwise."""
    parts = PurePosixPath(rel).parts
    if follow:
        fd = os.open(root.joinpath(*parts), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    else:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for i, part in enumerate(parts):
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                if i < len(parts) - 1:
                    flags |= os.O_DIRECTORY
                try:
                    nxt = os.open(part, flags, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR) or _is_link(part, fd):
                        raise Unreadable(f"{'/'.join(parts[:i + 1])} is a link (or not a directory); links in the "
                                         "output directory are not followed") from None
                    raise
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
    fh = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
        fh.close()
        raise Unreadable(f"{rel} is not a regular file")
    return fh


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


# --------------------------------------------------------------------------- reading tensors


def load(root: Path, rel: str, *, follow: bool = False) -> tuple[dict[str, Any], str | None]:
    """The tensors of ``root/rel`` by dotted name (CPU, detached), and the sub-mapping they came from
    (``model``, ``state_dict`` ... or None: the whole file). :class:`Unreadable` says why not."""
    try:
        with open_inside(root, rel, follow=follow) as fh:
            if rel.endswith(".safetensors"):
                return read_safetensors(fh, rel), None
            import torch

            try:
                obj = torch.load(fh, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - not weights torch.load(weights_only=True) can read
                first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
                raise Unreadable(f"{rel} cannot be read by torch.load(weights_only=True): {first}") from None
    except FileNotFoundError:
        raise Unreadable(f"{rel} does not exist") from None
    except OSError as exc:
        raise Unreadable(f"{rel} cannot be opened ({exc.strerror or exc})") from None
    state, source = tensors_of(obj)
    if not state:
        raise Unreadable(f"{rel} holds no tensors")
    return state, source


def tensors_of(obj: Any) -> tuple[dict[str, Any], str | None]:
    """A checkpoint's tensors by dotted name: those of its ``model``/``state_dict``/``model_state_dict``/``net``
    sub-mapping when it holds any, else every tensor in it; non-tensor leaves are ignored (pure)."""
    if isinstance(obj, Mapping):
        for key in STATE_KEYS:
            sub = obj.get(key)
            if isinstance(sub, Mapping):
                found = flatten(sub)
                if found:
                    return found, key
    return flatten(obj), None


def flatten(obj: Any, prefix: str = "", out: dict[str, Any] | None = None, depth: int = 0) -> dict[str, Any]:
    """Every tensor in nested mappings, lists and tuples, named by its dotted path (pure)."""
    out = {} if out is None else out
    if hasattr(obj, "detach") and hasattr(obj, "dtype"):
        out[prefix or "tensor"] = obj.detach().cpu()
    elif depth < MAX_DEPTH and isinstance(obj, Mapping):
        for k, v in obj.items():
            flatten(v, f"{prefix}.{k}" if prefix else str(k), out, depth + 1)
    elif depth < MAX_DEPTH and isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            flatten(v, f"{prefix}.{i}" if prefix else str(i), out, depth + 1)
    return out


def _dtypes() -> dict[str, Any]:
    import torch

    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
             "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
    return {k: getattr(torch, v) for k, v in names.items() if hasattr(torch, v)}


def read_safetensors(fh: Any, name: str = "weights.safetensors") -> dict[str, Any]:
    """A ``.safetensors`` file's tensors: an 8-byte little-endian header length, a JSON header mapping each
    name to ``{dtype, shape, data_offsets}``, then the data. Every length and offset is checked against the
    file; a header over 100 MB, an unknown dtype or an offset outside the data is :class:`Unreadable`."""
    import torch

    if sys.byteorder != "little":
        raise Unreadable(f"{name}: safetensors data is little-endian, and this host is not")
    size = os.fstat(fh.fileno()).st_size
    head = fh.read(8)
    if len(head) != 8:
        raise Unreadable(f"{name} is shorter than a safetensors header")
    n = int.from_bytes(head, "little")
    if n > SAFETENSORS_HEADER_MAX or n > size - 8:
        raise Unreadable(f"{name} declares a {n}-byte safetensors header, more than "
                         f"{'the file holds' if n > size - 8 else 'the 100 MB allowed'}")
    try:
        header = json.loads(fh.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Unreadable(f"{name} has a safetensors header that is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise Unreadable(f"{name} has a safetensors header that is not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    dtypes = _dtypes()
    out: dict[str, Any] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise Unreadable(f"{name}: tensor {key!r} has no dtype, shape and data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in dtypes:
            raise Unreadable(f"{name}: tensor {key!r} has dtype {dtype!r}, not one this torch reads "
                             f"({', '.join(sorted(dtypes))})")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                 for d in shape)):
            raise Unreadable(f"{name}: tensor {key!r} has shape {shape!r}, not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise Unreadable(f"{name}: tensor {key!r} has data_offsets {offsets!r} outside the file's "
                             f"{data_size} data bytes")
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=dtypes[dtype]).element_size()
        if offsets[1] - offsets[0] != numel * itemsize:
            raise Unreadable(f"{name}: tensor {key!r} holds {offsets[1] - offsets[0]} bytes, but {dtype} "
                             f"{shape} needs {numel * itemsize}")
        fh.seek(data_start + offsets[0])
        raw = bytearray(fh.read(offsets[1] - offsets[0]))
        if len(raw) != offsets[1] - offsets[0]:
            raise Unreadable(f"{name} ended inside tensor {key!r}")
        t = torch.frombuffer(raw, dtype=dtypes[dtype]) if raw else torch.empty(0, dtype=dtypes[dtype])
        out[key] = t.reshape(shape).clone()
    return out


# --------------------------------------------------------------------------- where


@dataclass
class Found:
    """The weights file to compare, or why there is none."""

    file: str | None  # relative to the output directory, POSIX
    how: str | None  # "declared" | "found"
    why: str | None = None  # when file is None: why no file was taken
    candidates: tuple[str, ...] = ()
    links: tuple[str, ...] = ()  # weights-named links met in the output directory, not followed


def candidates(out: Path) -> tuple[list[str], list[str]]:
    """The weights files of ``out``'s tree (relative, sorted), and the links met there (never followed)."""
    files: list[str] = []
    links: list[str] = []
    seen = 0

    def walk(d: Path, rel: str, depth: int) -> None:
        nonlocal seen
        if depth > MAX_DEPTH:
            return
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            seen += 1
            if seen > MAX_ENTRIES:
                return
            path = f"{rel}{e.name}"
            if e.is_symlink():
                if e.name.endswith(SUFFIXES):
                    links.append(path)
            elif e.is_dir(follow_symlinks=False):
                walk(Path(e.path), path + "/", depth + 1)
            elif e.is_file(follow_symlinks=False) and e.name.endswith(SUFFIXES):
                files.append(path)

    walk(out, "", 0)
    return sorted(files), sorted(links)


def find(out: Path, declared: str | None) -> Found:
    """The file to compare: ``declared`` (trainer.weights); else weights/best.pt; else the one weights file."""
    if declared is not None:
        return Found(declared, "declared")
    files, links = candidates(out)
    if BEST in files:
        return Found(BEST, "found", candidates=tuple(files), links=tuple(links))
    if len(files) == 1:
        return Found(files[0], "found", candidates=tuple(files), links=tuple(links))
    hint = "declare the file with trainer: {weights: PATH} (relative to the cell's output directory)"
    if not files:
        lk = f"; links not followed: {', '.join(links[:CANDIDATES_SHOWN])}" if links else ""
        return Found(None, None, f"the trainer returned no state_dict and left no {', '.join('*' + s for s in SUFFIXES)} "
                                 f"file in its output directory{lk}: the weights were not compared; if it writes them "
                                 f"elsewhere, {hint}", links=tuple(links))
    shown = ", ".join(files[:CANDIDATES_SHOWN]) + (f" (+{len(files) - CANDIDATES_SHOWN} more)"
                                                   if len(files) > CANDIDATES_SHOWN else "")
    return Found(None, None, f"the trainer left {len(files)} weights files ({shown}) and returned no state_dict: "
                             f"which one to compare is not guessed; {hint}", tuple(files), tuple(links))


def archived_counterpart(bundle_root: str, name: str | None, best: str | None) -> str | None:
    """The bundle's file to compare with: ``weights/<name>``, else the one weights file in ``weights/``,
    else ``best`` (the bundle's best weights); a path relative to the bundle, or None."""
    wdir = Path(bundle_root) / "weights"
    if name is not None and (wdir / name).is_file():
        return f"weights/{name}"
    try:
        files = sorted(p.name for p in wdir.iterdir() if p.is_file() and p.name.endswith(SUFFIXES))
    except OSError:
        files = []
    if len(files) == 1:
        return f"weights/{files[0]}"
    return None if best is None else Path(best).relative_to(bundle_root).as_posix()
