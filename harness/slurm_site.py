"""What the Slurm backend asks the scheduler for: the site file's ``slurm:`` section and the flags (pure).

A site file (``--site-config FILE``, the same file that substitutes base images) may hold::

    slurm:
      partition: gpu
      account: ml-team
      qos: normal
      time: 2h                  # minutes, 90s / 30m / 2h / 1d, or H:MM:SS
      mem: 16G
      cpus_per_task: 8
      runtime: python           # python: the node's interpreter runs the worker; docker: the cell's image
      python: /opt/harness/venv/bin/python
      gpu_request: gres         # gres: --gres=gpu:<type>:N   gpus: --gpus=<type>:N
      gpus_per_cell: 1
      gpu_types: {a100: a100_80g, h100: h100}   # a cell's gpu name -> this site's GRES type
      array_parallelism: 16
      setup: ["module load cuda/12.4"]

Flags override the file key by key. Nothing here talks to Slurm: :meth:`SlurmSettings.job_params`
is what :mod:`harness.backends.slurm` hands submitit, and :func:`status_of` maps a job's
final Slurm state to the record's status.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from .errors import InputError

RUNTIMES = ("python", "docker")
GPU_REQUESTS = ("gres", "gpus")
DEFAULT_TIME_MIN = 60
SITE_KEYS = ("partition", "account", "qos", "time", "mem", "cpus_per_task", "runtime", "python", "gpu_request",
             "gpus_per_cell", "gpu_types", "array_parallelism", "setup")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")  # a partition, account, QoS or GRES type name
_MEM_RE = re.compile(r"^[0-9]+[KMGT]?B?$", re.IGNORECASE)
_UNITS_MIN = {"s": 1 / 60, "m": 1, "h": 60, "d": 1440}

# The end states of a Slurm job (sacct) and what the record says of a job that ended so without a record.
# COMPLETED: the worker's own record says how the cell went.
FAILED_STATES = ("FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
STOPPED_STATES = ("CANCELLED", "PREEMPTED", "REVOKED")
TIMEOUT_STATES = ("TIMEOUT",)
ACTIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED",
                 "REQUEUE_FED", "REQUEUE_HOLD", "SIGNALING", "STAGE_OUT", "STOPPED", "READY", "UNKNOWN")


@dataclass(frozen=True)
class SlurmSettings:
    """One run's Slurm request, the site file merged with the flags."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = DEFAULT_TIME_MIN
    mem: str | None = None
    cpus_per_task: int | None = None
    runtime: str = "python"
    python: str | None = None  # the node's interpreter (None: the one running the harness)
    gpu_request: str = "gres"
    gpus_per_cell: int = 1
    gpu_types: dict[str, str] = field(default_factory=dict)
    array_parallelism: int | None = None
    setup: tuple[str, ...] = ()

    def gpu_type(self, gpu: str) -> str:
        """The site's GRES type for a cell's ``gpu`` name (itself unless ``gpu_types`` maps it)."""
        return self.gpu_types.get(gpu, gpu)

    def job_params(self, gpu: str | None, name: str = "harness") -> dict[str, Any]:
        """submitit ``SlurmExecutor`` parameters for a cell that asks for ``gpu`` (None: no GPU)."""
        # submitit asks Slurm to signal every process of the job (USR2) before its time limit, which
        # would kill the worker early and end the job COMPLETED; a harmless signal instead lets the
        # time limit end it as TIMEOUT.
        extra: dict[str, Any] = {"signal": "CONT@30"}
        params: dict[str, Any] = {"job_name": name, "time": self.time_min, "stderr_to_stdout": True,
                                  "additional_parameters": extra}
        for key in ("partition", "account", "qos", "mem", "cpus_per_task", "array_parallelism"):
            value = getattr(self, key)
            if value is not None:
                params[key] = value
        if self.setup:
            params["setup"] = list(self.setup)
        if gpu:
            kind = self.gpu_type(gpu)
            if self.gpu_request == "gres":
                params["gres"] = f"gpu:{kind}:{self.gpus_per_cell}"
            else:
                extra["gpus"] = f"{kind}:{self.gpus_per_cell}"
        return params


def parse_time(value: Any, where: str, key: str = "time") -> int:
    """A Slurm time limit in whole minutes (at least 1): ``90`` (minutes), ``90s``, ``30m``, ``2h``, ``1d``,
    ``MM:SS`` or ``H:MM:SS``."""
    hint = f"e.g. {key}: 30m, 2h or 1:30:00"
    if isinstance(value, bool) or value is None:
        raise InputError(where, f"{key} {value!r} is not a time limit", hint=hint)
    text = str(value).strip().lower()
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) > 3 or any(p < 0 for p in parts):
                raise ValueError
            seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
            minutes = seconds / 60
        elif text[-1:] in _UNITS_MIN:
            minutes = float(text[:-1]) * _UNITS_MIN[text[-1]]
        else:
            minutes = float(text)
    except ValueError:
        raise InputError(where, f"{key} {value!r} is not a time limit", hint=hint) from None
    if not minutes > 0 or math.isinf(minutes):
        raise InputError(where, f"{key} must be more than 0, got {value!r}", hint=hint)
    return max(1, math.ceil(minutes - 1e-9))  # Slurm counts whole minutes


def _name(value: Any, where: str, key: str) -> str:
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not _NAME_RE.match(str(value)):
        raise InputError(where, f"{key} {value!r} is not a Slurm name (letters, digits, '_', '.', '+', '-')")
    return str(value)


def _count(value: Any, where: str, key: str) -> int:
    try:
        n = int(str(value).strip())
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or n < 1:
        raise InputError(where, f"{key} must be a whole number >= 1, got {value!r}", hint=f"e.g. {key}: 4")
    return n


def parse_settings(data: Any, where: str, base: SlurmSettings | None = None) -> SlurmSettings:
    """Check a ``slurm:`` mapping (from a site file, or the flags as one) and lay it over ``base``."""
    out = base or SlurmSettings()
    if data is None:
        return out
    if not isinstance(data, Mapping):
        raise InputError(where, "slurm must be a mapping", hint="e.g. slurm: {partition: gpu, time: 2h}")
    unknown = sorted(str(k) for k in data if k not in SITE_KEYS)
    if unknown:
        raise InputError(where, f"slurm: unknown key(s) {', '.join(unknown)}", hint=f"allowed: {', '.join(SITE_KEYS)}")
    got: dict[str, Any] = {}
    for key, value in data.items():
        if value is None:
            continue
        here = f"slurm.{key}"
        if key in ("partition", "account", "qos"):
            got[key] = _name(value, where, here)
        elif key == "time":
            got["time_min"] = parse_time(value, where, here)
        elif key == "mem":
            if not _MEM_RE.match(str(value)):
                raise InputError(where, f"{here} {value!r} is not a Slurm memory size", hint=f"e.g. {here}: 16G")
            got[key] = str(value).upper()
        elif key in ("cpus_per_task", "gpus_per_cell", "array_parallelism"):
            got[key] = _count(value, where, here)
        elif key == "runtime":
            if value not in RUNTIMES:
                raise InputError(where, f"{here} {value!r} is not one of {', '.join(RUNTIMES)}",
                                 hint=f"{here}: python (the node's interpreter) or docker (the cell's image)")
            got[key] = value
        elif key == "python":
            if not isinstance(value, str) or not value.strip() or "\n" in value:
                raise InputError(where, f"{here} must be the path of the node's python", hint=f"e.g. {here}: /opt/venv/bin/python")
            got[key] = value.strip()
        elif key == "gpu_request":
            if value not in GPU_REQUESTS:
                raise InputError(where, f"{here} {value!r} is not one of {', '.join(GPU_REQUESTS)}",
                                 hint="gres: --gres=gpu:<type>:N; gpus: --gpus=<type>:N")
            got[key] = value
        elif key == "gpu_types":
            if not isinstance(value, Mapping):
                raise InputError(where, f"{here} must map a cell's gpu name to this site's GRES type",
                                 hint=f"e.g. {here}: {{a100: a100_80g}}")
            got[key] = {**out.gpu_types, **{_name(k, where, f"{here} key"): _name(v, where, f"{here}.{k}")
                                            for k, v in value.items()}}
        elif key == "setup":
            if not isinstance(value, list) or not all(isinstance(s, str) and "\n" not in s for s in value):
                raise InputError(where, f"{here} must be a list of shell lines", hint=f'e.g. {here}: ["module load cuda"]')
            got[key] = tuple(value)
    return replace(out, **got)


def settings(site: Any, flags: Mapping[str, Any] | None, site_where: str = "site config") -> SlurmSettings:
    """The site file's ``slurm:`` section, then the flags given (a flag wins over the file)."""
    merged = parse_settings(site, site_where)
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    return parse_settings(given, "flags", merged) if given else merged


def split_gpu(entry: str) -> tuple[str, str | None]:
    """``cell@a100`` -> ``("cell", "a100")``; ``cell`` -> ``("cell", None)``."""
    name, sep, gpu = entry.partition("@")
    if not sep:
        return entry, None
    if not name or not _NAME_RE.match(gpu) or "@" in gpu:
        raise InputError("--cells", f"{entry!r} is neither CELL nor CELL@GPU_TYPE", hint="e.g. --cells cpu-torch2.13@a100")
    return name, gpu


def state_word(state: str | None) -> str:
    """``CANCELLED by 0`` -> ``CANCELLED``; None -> ``UNKNOWN``."""
    return (state or "UNKNOWN").split()[0].upper().rstrip("+") or "UNKNOWN"


def is_active(state: str | None) -> bool:
    return state_word(state) in ACTIVE_STATES


def status_of(state: str | None) -> str:
    """What a job that ended in ``state`` and left no record is: ``failed``, ``interrupted`` or ``timeout``."""
    word = state_word(state)
    if word in TIMEOUT_STATES:
        return "timeout"
    if word in STOPPED_STATES:
        return "interrupted"
    return "failed"


def gres_of(tres: str | None) -> list[str]:
    """The GPU types a job was given, from sacct's AllocTRES (``...,gres/gpu:alpha=1,gres/gpu=1,...``)."""
    out = []
    for part in (tres or "").split(","):
        key = part.partition("=")[0]
        if key.startswith("gres/gpu:"):
            out.append(key[len("gres/gpu:"):])
    return out
