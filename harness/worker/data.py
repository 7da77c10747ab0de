"""The on-disk dataset format, its digest, and the preprocessing the config asks for.

Format (documented in README.md, "The dataset format"): one ``.npz`` file with

* ``X``: float array, shape ``(samples, channels, time)``
* ``y``: float array, shape ``(samples, targets)`` (or ``(samples,)`` for one target)
* ``target_names`` (optional): string array of length ``targets``
* ``channel_names`` (optional): string array of length ``channels``

It is read with ``allow_pickle=False``, so loading it never executes code.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import DataSpec
from ..errors import InputError


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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _names(arr: np.ndarray | None, n: int, prefix: str, key: str, where: str) -> list[str]:
    if arr is None:
        return [f"{prefix}{i}" for i in range(n)]
    names = [str(v) for v in np.asarray(arr).reshape(-1)]
    if len(names) != n:
        raise InputError(where, f"{key} has {len(names)} names but the data has {n}", hint=f"give one name per {prefix.rstrip('_')}")
    if len(set(names)) != len(names):
        raise InputError(where, f"{key} has duplicate names {names}", hint="make every name unique")
    return names


def load_raw(path: str | Path) -> dict[str, np.ndarray]:
    """Load the arrays of a dataset file, with no pickled objects allowed."""
    p = Path(path)
    where = str(p)
    if not p.exists():
        raise InputError(where, "data file not found",
                         hint="fix data.path in config.yaml (relative paths are resolved from the optuna_best directory) or pass --data")
    if not p.is_file():
        raise InputError(where, "data path is not a file", hint="point data.path at the .npz file")
    try:
        with np.load(p, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise InputError(where, "is a single .npy array, not an .npz with X and y", hint="save with np.savez(path, X=X, y=y, target_names=names)")
            return {k: npz[k] for k in npz.files}
    except InputError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise InputError(where, f"cannot be read as an .npz dataset ({exc.__class__.__name__}: {exc})",
                         hint="write it with np.savez(path, X=X, y=y, target_names=names)") from None


def prepare(spec: DataSpec, arrays: dict[str, np.ndarray] | None = None) -> Dataset:
    """Load (unless given) and preprocess: channel exclusion, then downsampling by striding."""
    where = spec.resolved
    arrays = arrays if arrays is not None else load_raw(spec.resolved)
    for key in ("X", "y"):
        if key not in arrays:
            raise InputError(where, f"has no array {key!r} (has {sorted(arrays)})", hint="save X (samples x channels x time) and y (samples x targets)")
    X, y = arrays["X"], arrays["y"]
    if X.ndim != 3:
        raise InputError(where, f"X must be 3-D (samples x channels x time), got shape {X.shape}", hint="reshape to (n, channels, time); use channels=1 for a single series")
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2:
        raise InputError(where, f"y must be 2-D (samples x targets), got shape {y.shape}")
    if X.shape[0] != y.shape[0]:
        raise InputError(where, f"X has {X.shape[0]} samples but y has {y.shape[0]}", hint="X and y must have one row per sample")
    if not (np.issubdtype(X.dtype, np.number) and np.issubdtype(y.dtype, np.number)):
        raise InputError(where, f"X and y must be numeric, got {X.dtype} and {y.dtype}")
    n, channels, time = X.shape
    target_names = _names(arrays.get("target_names"), y.shape[1], "target_", "target_names", where)
    channel_names = _names(arrays.get("channel_names"), channels, "ch", "channel_names", where)

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
    Xp = X[:, keep, :: spec.downsample]
    if not (np.isfinite(Xp).all() and np.isfinite(y).all()):
        raise InputError(where, "contains NaN or infinite values", hint="clean the data before training")
    sizes = split_sizes(n, spec.split)
    if min(sizes[:2]) < 1:
        raise InputError(where, f"{n} samples give split sizes {sizes} (train, val, test)", hint="add samples or change data.split")
    return Dataset(
        X=np.ascontiguousarray(Xp, dtype=np.float32),
        y=np.ascontiguousarray(y, dtype=np.float32),
        target_names=target_names,
        channel_names=[channel_names[c] for c in keep],
        raw_shape=tuple(int(s) for s in X.shape),
    )


def split_sizes(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """Sizes handed to ``random_split``: train and val floored, test takes the rest."""
    n_train = int(n * ratios[0])
    n_val = int(n * ratios[1])
    return n_train, n_val, n - n_train - n_val
