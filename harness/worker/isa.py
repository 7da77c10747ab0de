"""The CPU instruction-set (ISA) axis: which SIMD level the CPU kernels may use.

A level is set through the libraries' own switches, in the environment, before
the training interpreter starts (they are read once, when each library loads):

=========  ======================  ====================  ==========================
level      ``ATEN_CPU_CAPABILITY``  ``ONEDNN_MAX_CPU_ISA``  ``MKL_ENABLE_INSTRUCTIONS``
=========  ======================  ====================  ==========================
native     (unset)                 (unset)               (unset)
avx512     ``avx512``              ``AVX512_CORE``       ``AVX512``
avx2       ``avx2``                ``AVX2``              ``AVX2``
baseline   ``default``             ``SSE41``             ``SSE4_2``
=========  ======================  ====================  ==========================

``native`` lets each library pick the best the CPU has (and clears what the
caller's environment may have set). A level the CPU does not have cannot be
forced: the planner skips such a cell (:func:`unsupported_reason`), and the
worker records the level the libraries actually took (:func:`capture`), so a
request that was not honoured is visible, never assumed.

Pure but for :func:`read_host_levels` and :func:`capture`.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Mapping


VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")

_SETTINGS: dict[str, dict[str, str]] = {
    "native": {},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}

# What torch.backends.cpu.get_cpu_capability() says when the level is honoured.
EXPECTED_CAPABILITY = {"avx512": "AVX512", "avx2": "AVX2", "baseline": "DEFAULT"}

# The CPU flags (/proc/cpuinfo) each level needs: what ATen checks before it uses its kernels.
_NEEDS: dict[str, tuple[str, ...]] = {
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"),
    "avx2": ("avx2", "fma"),
    "baseline": (),
}
_X86 = ("x86_64", "amd64", "i386", "i686")


def launch_env(level: str | None) -> dict[str, str]:
    """The variables a launcher sets for ``level`` (pure); None: no ISA axis, nothing set."""
    if level is None:
        return {}
    return dict(_SETTINGS[level])


def child_env(env: Mapping[str, str], level: str | None) -> dict[str, str]:
    """``env`` with the ISA variables of ``level``: inherited ones are removed first (pure).

    Without an ISA axis (None) the caller's environment is kept as it is.
    """
    out = dict(env)
    if level is None:
        return out
    for var in VARS:
        out.pop(var, None)
    out.update(launch_env(level))
    return out


def host_levels(cpuinfo: str, machine: str) -> tuple[str, ...]:
    """The levels this CPU can run, from /proc/cpuinfo's text and the machine name (pure).

    ``native`` always; the x86-64 levels only on an x86-64 CPU whose flags include what
    each needs. Without a flags line (not Linux) only ``native`` is claimed.
    """
    if machine.lower() not in _X86:
        return ("native",)
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            break
    if not flags:
        return ("native",)
    return ("native",) + tuple(lvl for lvl in ("avx512", "avx2", "baseline") if set(_NEEDS[lvl]) <= flags)


def read_host_levels() -> tuple[str, ...]:
    """:func:`host_levels` of this machine (reads /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        text = ""
    return host_levels(text, platform.machine())


def unsupported_reason(level: str | None, supported: tuple[str, ...], machine: str = "") -> str | None:
    """Why a cell asking for ``level`` cannot run on a host that supports ``supported`` (None: it can)."""
    if level is None or level in supported:
        return None
    if machine and machine.lower() not in _X86:
        return (f"--isa {level} is an x86-64 level and this host is {machine}; only --isa native applies here")
    missing = ", ".join(_NEEDS.get(level, ()))
    have = ", ".join(s for s in supported if s != "native") or "none of the forced levels"
    return (f"this CPU lacks {level} ({missing}); it supports {have}: a level above the host's cannot be forced, "
            f"only lowered")


def capture(requested: str | None) -> dict[str, Any]:
    """The ISA facts in effect in this process: the level torch's kernels use, and the variables set."""
    import torch

    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    try:
        effective = str(get()) if get is not None else None
    except Exception:  # noqa: BLE001 - an old torch without the query: not measured
        effective = None
    return {
        "cpu_capability": effective,
        "isa_requested": requested,
        "isa_env": {var: os.environ[var] for var in VARS if var in os.environ},
    }


def mismatch(requested: str | None, effective: str | None) -> str | None:
    """A warning when the level asked for is not the one torch's kernels took (pure)."""
    want = EXPECTED_CAPABILITY.get(requested or "")
    if want is None or effective is None or effective.upper() == want:
        return None
    return (f"--isa {requested} asked for {want} kernels, but torch reports {effective}: "
            "this torch build or CPU did not honour ATEN_CPU_CAPABILITY")
