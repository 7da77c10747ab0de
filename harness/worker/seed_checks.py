"""The seed document's checks, for any trainer: the split and the target scaler refit.

The reference trainer makes the split itself; a custom trainer tells the harness
what it can (see :class:`harness.worker.trainer_api.TrainerContext`):

* the split the harness handed out (``ctx.split(n)``), or the dataset length
  (``ctx.declare_length(n)`` / a returned ``n_samples``), from which the seeded
  ``random_split`` is re-derived with ``data.split`` and ``training.seed``;
* the split it actually used (``ctx.report_split`` / a returned ``split_indices``),
  compared with the seeded one;
* its train-split targets (``ctx.check_scaler`` / a returned ``y_train``), on which a
  clone of the archived scaler is refitted and compared with it.

Everything here measures and records; nothing judges (a mismatch becomes a
warning in :mod:`harness.judge` and :mod:`harness.report`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import InputError

SPLITS = ("train", "val", "test")


def sha_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode()).hexdigest()


def split_digest(parts: Sequence[Sequence[int]]) -> dict[str, Any]:
    """The record's split fields: sizes and a digest of the (ordered) indices of train, val and test."""
    lists = [[int(i) for i in p] for p in parts]
    return {"sizes": [len(p) for p in lists], "indices_sha256": sha_json(lists)}


def as_indices(value: Any, where: str) -> list[int]:
    """Sample indices from what trainers hold: a list, a range, an integer array or tensor, a torch ``Subset``."""
    import numpy as np

    # a torch.utils.data.Subset (what random_split returns) holds its dataset and indices
    idx = value.indices if hasattr(value, "dataset") and hasattr(value, "indices") else value
    if hasattr(idx, "detach"):
        idx = idx.detach().cpu().numpy()
    try:
        arr = np.asarray(list(idx) if isinstance(idx, range) else idx)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.ndim != 1 or (arr.size and (arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer))):
        raise InputError("trainer", f"{where} is not a sequence of sample indices ({type(value).__name__})",
                         hint="pass integer indices (a list, an array, or the Subset random_split returned); "
                              "for a boolean mask pass np.flatnonzero(mask)")
    return [int(v) for v in arr]


@dataclass
class Checks:
    """What a custom trainer told the harness while it ran (filled by its TrainerContext)."""

    handed: tuple[int, list[list[int]]] | None = None  # the last ctx.split(n): n and its train/val/test indices
    declared_n: int | None = None
    reported: list[list[int]] | None = None  # train, val, test as the trainer used them
    scaler: dict[str, Any] | None = None  # ctx.check_scaler's record


def declared_length(n: Any, where: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError("trainer", f"{where} must be the dataset's number of samples (an int >= 1), got {n!r}")
    return n


def compare_split(seeded: Sequence[Sequence[int]], reported: Sequence[Sequence[int]]) -> dict[str, Any]:
    """``matches``; the first of train/val/test that differs; whether it holds the same samples in another order."""
    for name, a, b in zip(SPLITS, seeded, reported):
        if list(a) != list(b):
            return {"matches": False, "first_difference": name, "same_samples": sorted(a) == sorted(b)}
    return {"matches": True, "first_difference": None, "same_samples": True}


def split_record(checks: Checks, ratios: tuple[float, float, float], ratios_note: str | None,
                 seed: int) -> dict[str, Any]:
    """The record's ``split`` for a custom trainer.

    ``sizes``/``indices_sha256`` (the reference trainer's fields) describe the seeded
    split: the one ``ctx.split`` handed out (``source: "ctx.split"``), else the one
    re-derived from ``data.split`` and ``training.seed`` for the declared length
    (``source: "re-derived"``). ``reported`` holds the trainer's own split and whether
    it matches. Without either, ``why`` says what the trainer could do.
    """
    from .train import split_indices

    rec: dict[str, Any] = {}
    seeded: list[list[int]] | None = None
    n = checks.declared_n
    if checks.handed is not None:
        n_handed, seeded = checks.handed
        rec.update(source="ctx.split", n=n_handed, ratios=list(ratios))
        if n is not None and n != n_handed:
            rec["declared_n"] = n  # the record shows both; the handed-out split is what the trainer got
    else:
        n_from = "declared"
        if n is None and checks.reported is not None:
            n, n_from = sum(len(p) for p in checks.reported), "reported"  # a split partitions the dataset
        if n is not None and ratios_note is None:
            s = split_indices(n, ratios, seed)
            seeded = [s.train, s.val, s.test]
            rec.update(source="re-derived", n=n, n_from=n_from, ratios=list(ratios))
        elif n is not None:
            rec.update(source=None, n=n, why=f"{ratios_note}: the seeded split cannot be re-derived")
        else:
            rec.update(source=None, why="the trainer neither took ctx.split(n) nor declared the dataset length "
                                        "(ctx.declare_length(n) or a returned n_samples)")
    if seeded is not None:
        rec.update(split_digest(seeded))
    if checks.reported is not None:
        rep: dict[str, Any] = split_digest(checks.reported)
        if seeded is not None:
            rep.update(compare_split(seeded, checks.reported))
        else:
            rep.update(matches=None, first_difference=None, same_samples=None)
        rec["reported"] = rep
    return rec


# --------------------------------------------------------------------------- scaler


def targets_2d(y: Any, where: str) -> Any:
    """Train targets as a samples x targets array (a tensor, an array, a list; 1-D is one target).

    The dtype is kept: the refit must see what the archived scaler was fitted on
    (a float32 fit and a float64 fit of the same numbers differ in the last bits).
    """
    import numpy as np

    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    try:
        arr = np.asarray(y)
    except (TypeError, ValueError) as exc:
        arr, why = None, str(exc)
    else:
        why = f"dtype {arr.dtype}"
    if arr is None or arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise InputError("trainer", f"{where} cannot be read as an array of targets ({why})",
                         hint="pass the train split's targets in original units, samples x targets")
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise InputError("trainer", f"{where} has shape {arr.shape}, not samples x targets",
                         hint="pass the train split's targets in original units, samples x targets")
    return arr


def scaler_check(archived: Any, y_train: Any) -> tuple[Any, dict[str, Any]]:
    """Refit a fresh scaler on the reproduced train split; compare with the archived one.

    A match is direct evidence that the split (and the data) reproduced.
    """
    import numpy as np
    from sklearn.base import clone
    from sklearn.preprocessing import StandardScaler

    fresh = clone(archived) if archived is not None else StandardScaler()
    fresh.fit(y_train)
    info: dict[str, Any] = {"archived": archived is not None, "class": type(fresh).__name__}
    if archived is None:
        info.update(refit_matches=None, max_abs_diff=None, used="refit")
        return fresh, info
    try:
        a = np.asarray(archived.transform(y_train), dtype=np.float64)
        b = np.asarray(fresh.transform(y_train), dtype=np.float64)
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        params = {}
        for attr in ("mean_", "scale_", "var_", "min_", "data_min_", "data_max_", "center_"):
            if hasattr(archived, attr) and hasattr(fresh, attr):
                params[attr] = float(np.max(np.abs(np.asarray(getattr(archived, attr), dtype=np.float64)
                                                    - np.asarray(getattr(fresh, attr), dtype=np.float64))))
        info.update(refit_matches=bool(diff <= 1e-9 and all(v <= 1e-9 for v in params.values())),
                    max_abs_diff=diff, param_max_abs_diff=params, used="archived")
    except Exception as exc:  # noqa: BLE001
        raise InputError("target_scaler.joblib", f"does not fit the data's {y_train.shape[1]} targets ({exc})",
                         hint="archive the scaler fitted on this dataset's targets") from None
    return archived, info


def custom_scaler_check(archived: Any, y_train: Any, source: str) -> dict[str, Any]:
    """The record's ``scaler`` for a custom trainer's train targets (``source``: how they reached the harness)."""
    y = targets_2d(y_train, source)
    if archived is None:
        return {"archived": False, "class": None, "refit_matches": None, "max_abs_diff": None, "source": source,
                "why": "no target_scaler.joblib in the bundle: nothing to compare a refit with"}
    lacks = [a for a in ("fit", "transform") if not callable(getattr(archived, a, None))]
    if lacks:  # the project's own object (a dict of statistics ...): handed over as it is, not refused
        return {"archived": True, "class": type(archived).__name__, "refit_matches": None, "max_abs_diff": None,
                "source": source, "why": f"target_scaler.joblib holds a {type(archived).__name__}, which has no "
                                         f"{'() or '.join(lacks)}(): the harness cannot refit it and compare (the "
                                         "trainer got it as it is, ctx.scaler)"}
    _, info = scaler_check(archived, y)
    info.pop("used", None)  # which scaler a custom trainer used is its own business
    info["source"] = source
    return info


NO_SCALER_CHECK = ("the trainer did not hand the harness its train targets "
                   "(ctx.check_scaler(y_train) or a returned y_train): the scaler refit was not checked")
