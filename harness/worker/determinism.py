"""Seeding and determinism: what the launcher must set before Python starts,
what the worker sets inside, and a record of what was actually in effect.

The seed document's conditions, and where each is enforced:

* ``set_seed``: torch, numpy, random, CUDA (all devices) -- :func:`set_seed`
* ``cudnn.benchmark=False``, ``cudnn.deterministic=True``,
  ``torch.use_deterministic_algorithms(True)`` -- :func:`apply`
* ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` and ``PYTHONHASHSEED=0`` -- :func:`launch_env`,
  set by the backend *before* the training interpreter starts (they have no
  effect when set from inside a running interpreter)
* seeded ``random_split`` and DataLoader generator, ``num_workers=0`` -- harness.train
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any

from ..options import MODES  # one list of modes for the CLI and the worker
CUBLAS_WORKSPACE_CONFIG = ":4096:8"
PYTHONHASHSEED = "0"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def launch_env(mode: str, threads: int | None) -> dict[str, str]:
    """Environment variables the launcher sets for a worker (pure)."""
    env: dict[str, str] = {}
    if mode in ("strict", "warn"):
        env["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
        env["PYTHONHASHSEED"] = PYTHONHASHSEED
    if threads:
        for var in THREAD_VARS:
            env[var] = str(threads)
    return env


def set_seed(seed: int) -> None:
    """One place that seeds every RNG the retrain touches."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)


def apply(mode: str, *, tf32: bool, threads: int | None) -> None:
    """Set the in-process determinism switches for ``mode``."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if mode in ("strict", "warn"):
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    # Called in every mode, False being torch's own default: the call imports torch._dynamo, which
    # torch.optim otherwise imports when the first optimizer is built, inside the timed training
    # (seconds on a cold many-core host: default mode looked 8-10x slower than strict).
    torch.use_deterministic_algorithms(mode in ("strict", "warn"), warn_only=(mode == "warn"))
    # TF32 is a separate axis: off unless asked for, in every mode, so that the
    # axis is measured rather than inherited from a torch version's default.
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def missing_launch_env(mode: str) -> list[str]:
    """Variables that ``mode`` needs set before start but which are not in effect."""
    missing = []
    if mode in ("strict", "warn"):
        if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
            missing.append("CUBLAS_WORKSPACE_CONFIG=:4096:8")
        if os.environ.get("PYTHONHASHSEED") != PYTHONHASHSEED or sys.flags.hash_randomization:
            missing.append("PYTHONHASHSEED=0")
    return missing


# Where torch (2.9 and later) keeps a float32 precision per backend and operation
# (``torch.backends[.<backend>[.<op>]].fp32_precision``): "ieee" is full float32, "tf32" and "bf16" are
# reduced, "none" inherits from the level above. A trainer can set one without the legacy
# ``torch.set_float32_matmul_precision``, which then no longer tells the whole story.
FP32_PRECISION_AT = ("generic", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn",
                     "mkldnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")


def fp32_precisions(torch: Any) -> dict[str, str]:
    """The per-backend float32 precisions in effect (:data:`FP32_PRECISION_AT`), by place; {} for a torch before 2.9."""
    out: dict[str, str] = {}
    for where in FP32_PRECISION_AT:
        node = torch.backends
        try:
            for part in (() if where == "generic" else where.split(".")):
                node = getattr(node, part)
            value = node.fp32_precision
        except (AttributeError, RuntimeError):
            continue
        if isinstance(value, str):
            out[where] = value
    return out


def matmul_precision(torch: Any) -> str | None:
    """``torch.get_float32_matmul_precision()``, or None where torch will not say: it raises once the per-backend
    API set a precision after the legacy one did (a trainer's own ``torch.backends.mkldnn.matmul.fp32_precision``)."""
    try:
        return str(torch.get_float32_matmul_precision())
    except RuntimeError:
        return None


def capture(mode: str, seed: int | None, reference: bool = True) -> dict[str, Any]:
    """The determinism settings actually in effect in this process.

    The data loading facts (``num_workers``, ``pin_memory``, the seeded split and loader
    generators) are the reference trainer's, which the harness wrote; for a custom trainer
    (``reference=False``) they are its own, unknown here: None, never a guess.
    """
    import torch

    known = True if reference else None

    return {
        "mode": mode,
        "seed": seed,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
        "deterministic_warn_only": bool(torch.is_deterministic_algorithms_warn_only_enabled()),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": matmul_precision(torch),
        "fp32_precision": fp32_precisions(torch),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED"),
        "hash_randomization": bool(sys.flags.hash_randomization),
        "num_threads": int(torch.get_num_threads()),
        "num_workers": 0 if reference else None,
        "pin_memory": False if reference else None,
        "split_generator_seeded": known,
        "loader_generator_seeded": known,
    }
