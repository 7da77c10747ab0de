"""What a worker measures of where it ran (harness.worker.envinfo)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from harness.worker.envinfo import MIB, gpu_memory


def test_gpu_memory_is_none_on_a_process_that_never_initialised_cuda() -> None:
    assert gpu_memory(torch) is None  # this test process trains on no GPU


def test_gpu_memory_reports_the_peak_and_the_context_a_cell_leaves() -> None:
    """torch.cuda's counters stand in for a device here; benchmarks/bench_gpu.py reads the real ones."""
    cuda = SimpleNamespace(
        is_initialized=lambda: True,
        mem_get_info=lambda: (100_000 * MIB, 143_771 * MIB),  # free, total
        memory_reserved=lambda: 64 * MIB,
        max_memory_reserved=lambda: 96 * MIB,
        max_memory_allocated=lambda: 40 * MIB,
    )
    got = gpu_memory(SimpleNamespace(cuda=cuda))
    assert got == {"total_mib": 143771.0, "peak_reserved_mib": 96.0, "peak_allocated_mib": 40.0,
                   "device_used_mib": 43771.0, "context_mib": 43707.0}


def test_gpu_memory_never_fails_a_cell() -> None:
    def broken() -> bool:
        raise RuntimeError("CUDA driver gone")

    assert gpu_memory(SimpleNamespace(cuda=SimpleNamespace(is_initialized=broken))) is None


def test_switches_are_the_numeric_ones_set_and_no_other_axis_s() -> None:
    from harness.worker.envinfo import SWITCHES, switches
    from harness.worker.determinism import THREAD_VARS
    from harness.worker.isa import VARS

    env = {"MKL_CBWR": "AVX2", "OMP_DYNAMIC": "FALSE", "HOME": "/root", "OMP_NUM_THREADS": "2",
           "MKL_ENABLE_INSTRUCTIONS": "AVX2", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    assert switches(env) == {"MKL_CBWR": "AVX2", "OMP_DYNAMIC": "FALSE"}
    assert switches({}) == {}
    # each variable is measured by one axis only: threads, isa and determinism have their own
    assert not set(SWITCHES) & {*THREAD_VARS, *VARS, "CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED"}
