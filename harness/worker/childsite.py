"""The seeding hook of a trainer command's Python processes, run at interpreter start.

The worker copies this file as ``sitecustomize.py`` into a private folder that it
puts first on the command's ``PYTHONPATH``, so every Python process the command
starts (``{python} -m pkg.train``, a shell script's ``python train.py``, ...)
runs it before the user's code: it applies the same determinism switches as
:func:`harness.worker.determinism.apply` and then the same seeding as
:func:`harness.worker.determinism.set_seed`, both from the ``HARNESS_*``
variables, and leaves a small JSON marker (``HARNESS_CHILD_MARKERS/<pid>.json``)
that the worker reads, so the record says which processes the harness seeded.
A ``sitecustomize`` of the user's own (a project's, a distribution's) is then
imported as if this one were not there.

In an ulp band member (``HARNESS_PERTURB``) or under ``--trace`` (``HARNESS_TRACE``)
it also installs PyTorch's process-wide hooks (:mod:`harness.worker.hooks`, copied
beside it as the package ``_harness_hooks``), and at exit adds what they did to the
process's marker.

Self-contained on purpose: the command may run an interpreter that cannot
import harness. Nothing happens unless ``HARNESS_CHILD_MARKERS`` is set.
"""

from __future__ import annotations

import json
import os
import random
import sys

_MODES = ("strict", "warn", "default")
_PR_SET_PDEATHSIG = 1


def _die_with_the_worker() -> None:
    """Linux: SIGKILL this process when the worker that started it dies (only its direct child)."""
    parent = os.environ.get("HARNESS_WORKER_PID", "")
    if not sys.platform.startswith("linux") or not parent.isdigit() or os.getppid() != int(parent):
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != int(parent):  # the worker died before the call took effect
            os._exit(137)
    except (OSError, AttributeError):
        pass


def _apply_and_seed(seed: int, mode: str, threads: int | None, tf32: bool) -> dict:
    """determinism.apply(mode, tf32=tf32, threads=threads), then determinism.set_seed(seed)."""
    done: dict = {"seeded": [], "torch": None, "numpy": None}
    try:
        import numpy as np
    except ImportError:
        np = None
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        if threads:
            torch.set_num_threads(threads)
        if mode in ("strict", "warn"):
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        # in every mode (False is torch's default): it imports torch._dynamo before the user's code
        torch.use_deterministic_algorithms(mode in ("strict", "warn"), warn_only=(mode == "warn"))
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        torch.backends.cudnn.allow_tf32 = bool(tf32)
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
    random.seed(seed)
    done["seeded"].append("random")
    if np is not None:
        np.random.seed(seed)
        done["seeded"].append("numpy")
        done["numpy"] = np.__version__
    if torch is not None:
        torch.manual_seed(seed)
        done["seeded"].append("torch")
        if torch.cuda.is_available():
            torch.cuda.manual_seed(seed)
            torch.cuda.manual_seed_all(seed)
            done["seeded"].append("torch.cuda")
        done["torch"] = torch.__version__
        done["determinism"] = {
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
            "deterministic_warn_only": bool(torch.is_deterministic_algorithms_warn_only_enabled()),
            "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "num_threads": int(torch.get_num_threads()),
        }
    return done


def _write_marker(folder: str, facts: dict) -> None:
    path = os.path.join(folder, f"{os.getpid()}.json")
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(facts, fh)
        os.replace(tmp, path)
    except OSError:
        pass


def _install_hooks(folder: str, facts: dict) -> None:
    """The band member's perturbation and the trace, through torch's hooks; their outcome joins the marker at exit."""
    perturb = os.environ.get("HARNESS_PERTURB") or ""
    trace = os.environ.get("HARNESS_TRACE") or ""
    if not (perturb or trace) or "torch" not in sys.modules:  # a process without torch trains nothing
        return
    try:
        import atexit
        from pathlib import Path

        from _harness_hooks.hooks import TorchHooks
        from _harness_hooks.perturb import Perturber

        hooks = TorchHooks(perturber=Perturber(json.loads(perturb)) if perturb else None,
                           trace=Path(trace) if trace else None, trace_exclusive=True).install()
    except Exception as exc:  # noqa: BLE001 - recorded; the command still runs
        facts["hooks"] = {"error": f"{exc.__class__.__name__}: {exc}"}
        return

    def at_exit() -> None:
        try:
            facts["hooks"] = hooks.close()
        except Exception as exc:  # noqa: BLE001
            facts["hooks"] = {"error": f"{exc.__class__.__name__}: {exc}"}
        _write_marker(folder, facts)

    atexit.register(at_exit)


def _run() -> None:
    folder = os.environ.get("HARNESS_CHILD_MARKERS")
    if not folder:
        return
    _die_with_the_worker()
    facts: dict = {"pid": os.getpid(), "ppid": os.getppid(), "executable": sys.executable,
                   # the whole command line: sys.argv is not filled yet here (``-m pkg.main`` reads as ``-m``)
                   "argv": list(getattr(sys, "orig_argv", None) or sys.argv), "python": sys.version.split()[0],
                   "hash_randomization": bool(sys.flags.hash_randomization)}
    try:
        seed = int(os.environ["HARNESS_SEED"])
        mode = os.environ.get("HARNESS_DETERMINISM") or "strict"
        if mode not in _MODES:
            raise ValueError(f"HARNESS_DETERMINISM={mode!r} is not one of {', '.join(_MODES)}")
        threads_text = os.environ.get("HARNESS_THREADS") or ""
        threads = int(threads_text) if threads_text else None
        tf32 = os.environ.get("HARNESS_TF32") == "1"
        facts.update(seed=seed, mode=mode, threads=threads, tf32=tf32)
        facts.update(_apply_and_seed(seed, mode, threads, tf32))
    except Exception as exc:  # noqa: BLE001 - recorded, and said on stderr; the command still runs
        facts["error"] = f"{exc.__class__.__name__}: {exc}"
        print(f"harness: the seeding hook failed in {sys.executable}: {facts['error']}", file=sys.stderr)
    _install_hooks(folder, facts)
    _write_marker(folder, facts)


def _chain() -> None:
    """Import the ``sitecustomize`` this one shadows (a project's or the distribution's), if any.

    The hook's own folder leaves ``sys.path`` first, so the user's code sees the path it would see without it.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    ours = sys.modules.pop("sitecustomize", None)
    try:
        import importlib

        importlib.import_module("sitecustomize")
    except ModuleNotFoundError as exc:
        if exc.name != "sitecustomize":
            raise
        if ours is not None:  # none to chain to: the import system expects this module back in its place
            sys.modules["sitecustomize"] = ours


if __name__ == "sitecustomize":
    _run()
    _chain()
