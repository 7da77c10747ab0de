"""Measure the environment a retrain actually ran in (never what was requested)."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from .isa import read_host_levels


# Environment variables that change what a library's kernels compute, and that no other axis
# measures (thread counts: the ``threads`` axis; the ISA switches: ``isa``; CUBLAS_WORKSPACE_CONFIG
# and PYTHONHASHSEED: ``determinism``). Each is read where it is in effect, in the worker, and
# recorded only when set: two runs that differ in one differ in ``switches``, not in "nothing".
SWITCHES: dict[str, str] = {
    "MKL_CBWR": "MKL's code branch; any value but OFF turns on its conditional numerical reproducibility",
    "MKL_DYNAMIC": "whether MKL may run fewer threads than it was given",
    "MKL_NUM_STRIPES": "how MKL partitions a parallel matrix product among its threads",
    "MKL_DEBUG_CPU_TYPE": "the code path MKL takes on a CPU it does not dispatch for (MKL before 2020.1)",
    "OMP_DYNAMIC": "whether OpenMP may give a parallel region fewer threads than asked",
    "KMP_DETERMINISTIC_REDUCTION": "the order of Intel OpenMP's reductions",
    "ONEDNN_DEFAULT_FPMATH_MODE": "whether oneDNN may compute float32 in bf16, f16 or tf32",
    "DNNL_DEFAULT_FPMATH_MODE": "the same switch under oneDNN's older name",
    "NVIDIA_TF32_OVERRIDE": "0 keeps cuBLAS and cuDNN from TF32 whatever torch asks",
    "TORCH_BLAS_PREFER_CUBLASLT": "torch's CUDA matrix products through cuBLASLt rather than cuBLAS",
    "CUBLASLT_WORKSPACE_SIZE": "the workspace cuBLASLt may use, which limits the kernels it can pick",
    "TORCH_CUDNN_V8_API_DISABLED": "torch's convolutions through cuDNN's older API (other kernels)",
}


def switches(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The :data:`SWITCHES` set in ``environ`` (default: this process's environment), by name (pure on a mapping)."""
    env = os.environ if environ is None else environ
    return {name: env[name] for name in sorted(SWITCHES) if name in env}


def _affinity() -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        for tok in text.split():
            parts = tok.split(".")
            if len(parts) >= 2 and all(p.isdigit() for p in parts):
                return tok
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=False,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _net_interfaces() -> list[str] | None:
    """Network interfaces visible to the run (``["lo"]`` alone means no network)."""
    try:
        return sorted(os.listdir("/sys/class/net"))
    except OSError:
        return None


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        return None


def measure(device: str = "cpu") -> dict[str, Any]:
    """Python, torch, CUDA, cuDNN, device name, driver, threads, libraries."""
    import numpy as np
    import torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
        "cudnn": str(cudnn) if cudnn is not None else None,
        "numpy": np.__version__,
        "scikit_learn": _version("scikit-learn"),
        "joblib": _version("joblib"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "hostname": socket.gethostname(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": _affinity(),  # the cores it may run on (--jobs pins a cell to its own)
        "cpu_isa_levels": list(read_host_levels()),  # what this CPU can run: harness.worker.isa levels
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "switches": switches(),  # SWITCHES in effect here
        "cuda_available": bool(torch.cuda.is_available()),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "driver": None,
        "device_type": "cpu",
        "device": _cpu_model(),
        "compute_capability": None,
        "in_container": Path("/.dockerenv").exists(),
        "net_interfaces": _net_interfaces(),
        "executable": sys.executable,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(idx)
        env.update(
            device_type="cuda",
            device=torch.cuda.get_device_name(idx),
            compute_capability=f"{major}.{minor}",
            driver=_nvidia_driver(),
            cuda_arch_list=list(torch.cuda.get_arch_list()),
        )
    elif torch.cuda.is_available():
        env["driver"] = _nvidia_driver()
    return env


MIB = 1 << 20


def gpu_memory(torch: Any) -> dict[str, Any] | None:
    """What this process used of its GPU, measured after training (None when it never initialised CUDA).

    ``peak_reserved_mib``: the most torch's caching allocator held at once (what the cell needs of the
    device, beyond its CUDA context); ``peak_allocated_mib``: the most its tensors held;
    ``device_used_mib``: the whole device's use now (every process on it: this one's context and its
    cached blocks included); ``context_mib``: that use less what torch holds now, i.e. this process's
    context and libraries *when it ran alone on the GPU* (the scheduler reads it only then);
    ``total_mib``: the device's memory. The scheduler sizes how many cells share a GPU from these
    (harness.schedule.gpu_capacity).
    """
    try:
        if not torch.cuda.is_initialized():
            return None
        free, total = torch.cuda.mem_get_info()
        reserved = torch.cuda.memory_reserved()
        return {
            "total_mib": round(total / MIB, 1),
            "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / MIB, 1),
            "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / MIB, 1),
            "device_used_mib": round((total - free) / MIB, 1),
            "context_mib": round(max(0, total - free - reserved) / MIB, 1),
        }
    except Exception:  # noqa: BLE001 - a fact the scheduler can do without; never a failed cell
        return None
