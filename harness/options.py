"""Typed options: what the user asked for, parsed once, for every command and backend.

The CLI turns its arguments into these dataclasses (and nothing else reads an
``argparse.Namespace``). The axis parsers here are the only ones: ``run`` and
``matrix``, the local and the Docker backend all read ``--threads 1,all`` or
``--determinism strict,default`` the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import InputError, UsageError
from .schedule import AUTO

MODES = ("strict", "warn", "default")  # determinism modes; the worker reads this list too
ISA_LEVELS = ("native", "avx512", "avx2", "baseline")  # CPU instruction sets, best first (harness.worker.isa)
ISA_ALIASES = {"default": "baseline", "avx512_core": "avx512", "sse41": "baseline", "sse4_2": "baseline"}
BACKENDS = ("docker", "local", "slurm")
# The reference trainer's data paths (harness.worker.feed): the seeded DataLoader, or its replay on
# tensors resident on the device. The replay is the default: it trains bitwise the DataLoader's
# weights in every CI image (tests/engine/test_docker_feed.py), and each run proves it again for its own
# torch, falling back to the DataLoader when it does not hold. The worker reads these too.
DATA_PATHS = ("loader", "fast")
DEFAULT_DATA_PATH = "fast"
# Where a custom trainer runs (config.yaml trainer.cwd, --trainer-cwd): the optuna_best directory, or its
# code directory (the first --trainer-path / trainer.code_dir), against which a relative data.path is then
# resolved too. Unset: a function runs in the worker's working directory, a command in its cell's directory
# (docs/trainer-cwd.md). The worker reads these too.
TRAINER_CWDS = ("bundle", "project")


def trainer_cwd_error(value: object, where: str) -> str | None:
    """One line when ``value`` is not a trainer.cwd (``where`` names the setting); None when it is (pure)."""
    if value is None or value in TRAINER_CWDS:
        return None
    return (f"{where} {value!r} is not one of {', '.join(TRAINER_CWDS)} (trainer.cwd: where your trainer runs, "
            "the optuna_best directory or its code directory)")


THREADS_ALL = ("all", "default", "auto")
DEFAULT_TIMEOUT_S = 6 * 3600.0  # per cell; generous, so only a hung trainer meets it
_UNITS = {"s": 1, "m": 60, "h": 3600}


# --------------------------------------------------------------------------- axis parsers (pure)


def _items(text: str | Sequence[str]) -> list[str]:
    parts = text.split(",") if isinstance(text, str) else list(text)
    return [p.strip() for p in parts if p and p.strip()]


def parse_jobs(value: Any, flag: str = "--jobs") -> int:
    """``--jobs N`` (N >= 1) or ``auto`` (:data:`harness.schedule.AUTO`)."""
    text = str(value).strip().lower() if value is not None else "auto"
    if text in ("auto", ""):
        return AUTO
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"{flag} {value!r} is neither a number nor auto", hint=f"e.g. {flag} 2, or {flag} auto") from None
    if n < 1:
        raise UsageError(f"{flag} must be >= 1, got {n}", hint=f"e.g. {flag} 2, or {flag} auto")
    return n


def parse_threads(text: str | Sequence[str], flag: str = "--threads") -> tuple[int | None, ...]:
    """``1,2`` or ``1,all``; ``all`` (or ``default``/``auto``) leaves torch's own default (None)."""
    out: list[int | None] = []
    for part in _items(text):
        if part in THREADS_ALL:
            out.append(None)
            continue
        try:
            v = int(part)
        except ValueError:
            raise UsageError(f"{flag} {part!r} is neither an integer nor 'all'", hint=f"e.g. {flag} 1,2 or {flag} 1,all") from None
        if v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}", hint=f"e.g. {flag} 1,all")
        out.append(v)
    if not out:
        raise UsageError(f"{flag} names no thread count", hint=f"e.g. {flag} 1,all")
    return tuple(dict.fromkeys(out))


def parse_modes(text: str | Sequence[str], flag: str = "--determinism") -> tuple[str, ...]:
    """``strict,default``: each one of :data:`MODES`."""
    modes = _items(text)
    for m in modes:
        if m not in MODES:
            raise UsageError(f"{flag} {m!r} is not one of {', '.join(MODES)}", hint=f"e.g. {flag} strict,default")
    if not modes:
        raise UsageError(f"{flag} names no mode", hint=f"e.g. {flag} strict,default")
    return tuple(dict.fromkeys(modes))


def parse_devices(text: str | Sequence[str], flag: str = "--devices") -> tuple[str, ...]:
    """``cpu,cuda`` or ``cuda:1``; ``auto`` is resolved by the planner."""
    devices = _items(text)
    for d in devices:
        if d not in ("cpu", "auto") and not (d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit())):
            raise UsageError(f"{flag} {d!r} is not cpu, cuda or cuda:N", hint=f"e.g. {flag} cpu,cuda")
    if not devices:
        raise UsageError(f"{flag} names no device", hint=f"e.g. {flag} cpu,cuda")
    return tuple(dict.fromkeys(devices))


def parse_tf32(text: str | Sequence[str], flag: str = "--tf32") -> tuple[bool, ...]:
    """``off``, ``on`` or ``off,on``."""
    out: list[bool] = []
    for part in _items(text):
        if part not in ("off", "on"):
            raise UsageError(f"{flag} {part!r} is neither off nor on", hint=f"e.g. {flag} off,on")
        out.append(part == "on")
    if not out:
        raise UsageError(f"{flag} names no setting", hint=f"e.g. {flag} off,on")
    return tuple(dict.fromkeys(out))


def parse_isa(text: str | Sequence[str], flag: str = "--isa") -> tuple[str, ...]:
    """``native,avx2,baseline``: each one of :data:`ISA_LEVELS` (``default`` is ``baseline``), in the order given."""
    out: list[str] = []
    for part in _items(text):
        level = ISA_ALIASES.get(part.lower(), part.lower())
        if level not in ISA_LEVELS:
            raise UsageError(f"{flag} {part!r} is not one of {', '.join(ISA_LEVELS)}", hint=f"e.g. {flag} native,baseline")
        out.append(level)
    if not out:
        raise UsageError(f"{flag} names no level", hint=f"e.g. {flag} native,baseline")
    return tuple(dict.fromkeys(out))


def parse_cells(text: str | None) -> tuple[str, ...] | None:
    """``a,b`` -> ``("a", "b")``; None or empty -> None (every cell)."""
    if not text:
        return None
    return tuple(dict.fromkeys(_items(text))) or None


def parse_repeats(value: Any, flag: str = "--repeats") -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{flag} {value!r} is not an integer", hint=f"e.g. {flag} 3") from None
    if n < 1:
        raise UsageError(f"{flag} must be >= 1, got {n}", hint=f"e.g. {flag} 3")
    return n


def parse_count(value: Any, flag: str, *, minimum: int = 0, example: str = "8") -> int:
    """A whole number of runs, at least ``minimum`` (``--band 8``, ``--band-seeds 4``)."""
    try:
        n = int(str(value).strip())
    except (TypeError, ValueError):
        raise UsageError(f"{flag} {value!r} is not an integer", hint=f"e.g. {flag} {example}") from None
    if n < minimum:
        raise UsageError(f"{flag} must be >= {minimum}, got {n}", hint=f"e.g. {flag} {example}")
    return n


AUTO_BAND = 4  # --band auto: the ulp band measured when a cell differs from its reference beyond float32 rounding


def parse_band_auto(value: Any, flag: str = "--band") -> tuple[int, int]:
    """``--band``: (ulp members to run up front, ulp members to run only if a cell differs); ``auto`` is
    (0, AUTO_BAND), a number N is (N, 0), 0 never."""
    if str(value).strip().lower() == "auto":
        return 0, AUTO_BAND
    return parse_band(value, flag), 0


def parse_band(value: Any, flag: str = "--band") -> int:
    """Ulp band members: 0 (no band) or at least 2 (a range needs two values)."""
    n = parse_count(value, flag)
    if n == 1:
        raise UsageError(f"{flag} 1 measures no spread: a band needs at least 2 members", hint=f"e.g. {flag} 8")
    return n


AUTO_SEEDS = 8  # --band-seeds auto: the seed band measured when a cell differs beyond numerical noise


def parse_band_seeds(value: Any, flag: str = "--band-seeds") -> tuple[int, int]:
    """``--band-seeds``: (seed members to run up front, seed members to run only if a cell differs).

    ``auto`` is (0, AUTO_SEEDS); a number N is (N, 0): measured whatever the cells do; 0 never.
    """
    if str(value).strip().lower() == "auto":
        return 0, AUTO_SEEDS
    n = parse_count(value, flag, example="8")
    if n == 1:
        raise UsageError(f"{flag} 1 measures no spread: a seed band needs at least 2 members", hint=f"e.g. {flag} 8")
    return n, 0


def parse_alpha(value: Any, flag: str = "--alpha") -> float:
    """The false-alarm rate of "drifted": a number in (0, 0.5]; None is the default (harness.stats.DEFAULT_ALPHA)."""
    from .stats import DEFAULT_ALPHA, check_alpha

    if value is None:
        return DEFAULT_ALPHA
    try:
        return check_alpha(float(str(value).strip()))
    except ValueError:
        raise UsageError(f"{flag} {value!r} is not a probability in (0, 0.5]", hint=f"e.g. {flag} 0.01") from None


def parse_timeout(value: Any, flag: str = "--timeout") -> float:
    """Seconds per cell: ``90``, ``90s``, ``30m`` or ``2h``; more than zero."""
    text = str(value).strip().lower()
    scale = _UNITS.get(text[-1:], None) if text else None
    try:
        seconds = float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        raise UsageError(f"{flag} {value!r} is not a number of seconds", hint=f"e.g. {flag} 3600 or {flag} 6h") from None
    if not seconds > 0 or seconds == float("inf"):
        raise UsageError(f"{flag} must be more than 0 seconds, got {value!r}", hint=f"e.g. {flag} 6h")
    return seconds


def base_image_overrides(values: Sequence[str] | None) -> dict[str, str]:
    """``--base-image IMAGE`` (every cell) and ``--base-image CELL=IMAGE`` into a mapping."""
    out: dict[str, str] = {}
    for v in values or []:
        cell, sep, image = v.partition("=")
        if sep and not (cell and image):
            raise InputError("--base-image", f"{v!r} is neither IMAGE nor CELL=IMAGE")
        out[cell if sep else "*"] = image if sep else v
    return out


# --------------------------------------------------------------------------- the options


@dataclass(frozen=True)
class Axes:
    """What varies between cells. ``None`` means "the backend's default"."""

    devices: tuple[str, ...] | None = None
    modes: tuple[str, ...] | None = None
    threads: tuple[int | None, ...] | None = None
    tf32: tuple[bool, ...] = (False,)
    repeats: int = 1
    isa: tuple[str, ...] | None = None  # CPU instruction sets; None: no ISA axis (the environment's own)


@dataclass(frozen=True)
class ImageOptions:
    """Where the Docker backend finds its matrix, base images and wheels."""

    matrix: Path | None = None
    compat: Path | None = None
    base_images: dict[str, str] = field(default_factory=dict)
    site_config: Path | None = None
    wheelhouses: tuple[str, ...] = ()
    gpus: str = "all"
    memory: str | None = None
    offline: bool = False  # never pull a missing base image, even one pinned by digest

    @staticmethod
    def wheelhouse_values(values: Sequence[str] | None) -> tuple[str, ...]:
        """``--wheelhouse`` values, or ``$HARNESS_WHEELHOUSE`` when none were given."""
        vals = tuple(values or ())
        if not vals and os.environ.get("HARNESS_WHEELHOUSE"):
            vals = (os.environ["HARNESS_WHEELHOUSE"],)
        return vals


@dataclass(frozen=True)
class SlurmFlags:
    """The Slurm backend's flags; each one given overrides the site file's ``slurm:`` key (harness.slurm_site)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    mem: str | None = None
    cpus_per_task: str | None = None
    runtime: str | None = None
    python: str | None = None
    gpu_types: tuple[str, ...] | None = None  # --gpu-types a100,h100: every cell on each type (the hardware axis)

    def given(self) -> dict[str, Any]:
        """The settings given as flags, as site-file keys (the axis aside)."""
        return {k: v for k, v in self.__dict__.items() if v is not None and k != "gpu_types"}

    @property
    def any(self) -> bool:
        return bool(self.given()) or self.gpu_types is not None


@dataclass(frozen=True)
class RunOptions:
    """One ``harness run`` or ``harness matrix`` invocation."""

    bundle: str
    backend: str = "local"
    single: bool = False  # `harness run`: one cell, named "run"
    cells: tuple[str, ...] | None = None  # docker: matrix cells to run
    cells_flag: str = "--cells"  # the option that named them (--image on run and band), said in its errors
    axes: Axes = field(default_factory=Axes)
    images: ImageOptions = field(default_factory=ImageOptions)
    data: str | None = None
    data_dir: str | None = None  # mounted whole (docker) and hashed: for trainers that read files beside the data
    trainer: str | None = None
    trainer_path: list[str] | None = None
    trainer_cmd: str | None = None  # a command as the trainer, instead of `trainer` (module:function)
    seed_key: str | None = None  # --seed-key: where the custom trainer reads its seed in config.yaml
    trainer_cwd: str | None = None  # --trainer-cwd: bundle | project (TRAINER_CWDS); None: config.yaml trainer.cwd
    out: str | None = None
    trace: bool = False
    progress: bool = True
    resume: bool = False  # reuse a results directory that holds another run's records
    timeout: float = DEFAULT_TIMEOUT_S  # seconds per cell
    strict_config: bool = False  # refuse keys the reference trainer does not read (exit 2)
    band: int = 0  # ulp band members to run for the baseline cell first (0: none)
    band_seeds: int = 0  # seed band members (other training seeds) to run with them
    auto_band: int = 0  # ulp members to run after the cells, only when one differs beyond float32 rounding
    auto_seeds: int = 0  # seed members to run after the cells, only when one differs beyond numerical noise
    cell_seeds: int = 0  # every cell also retrains with the first K band seeds (a paired test of its shift)
    band_from: str | None = None  # a band measured earlier, reused
    band_only: bool = False  # `harness band`: the band's members alone, no cells
    slurm: SlurmFlags = field(default_factory=SlurmFlags)  # --backend slurm: partition, time, runtime ...
    data_feed: str | None = None  # --data-path: "loader" | "fast" (None: DEFAULT_DATA_PATH)
    jobs: int = 0  # cells at once (harness.schedule); 0: as many as the host's cores and GPUs allow
    force: bool = False  # with --resume: rerun every cell, even those whose earlier record still stands
    cold: bool = False  # --cold: local cells start as fresh interpreters, not forked from a warm server

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.trainer and self.trainer_cmd:
            raise UsageError("--trainer and --trainer-cmd cannot be combined",
                             hint="name one trainer: a function (--trainer module:function) or a command (--trainer-cmd CMD)")
        if self.band_from and (self.band or self.band_seeds):
            raise UsageError("--band-from reuses a band; --band and --band-seeds measure a new one",
                             hint="give one or the other")
        if self.data_feed is not None and self.data_feed not in DATA_PATHS:
            raise UsageError(f"--data-path {self.data_feed!r} is not one of {', '.join(DATA_PATHS)}",
                             hint="e.g. --data-path fast")
        why = trainer_cwd_error(self.trainer_cwd, "--trainer-cwd")
        if why is not None:
            raise UsageError(why, hint="e.g. --trainer-cwd project")
        if self.cell_seeds and self.band_only:
            raise UsageError("harness band measures the band; --cell-seeds retrains the cells of run and matrix",
                             hint="use --band-seeds N here, and --cell-seeds K on harness matrix")
        if self.cell_seeds and not self.band_from and self.band_seeds < self.cell_seeds:
            raise UsageError(f"--cell-seeds {self.cell_seeds} pairs each cell's seeds with the band's: the band needs "
                             f"at least as many (--band-seeds {self.band_seeds})",
                             hint=f"add --band-seeds {self.cell_seeds}")


@dataclass(frozen=True)
class ReportOptions:
    """Where the comparison goes besides the terminal, and how it is judged."""

    json_out: str | None = None
    markdown: str | None = None
    tolerances: Any = None  # harness.judge.Tolerances
    allow_data_change: bool = False  # judge cells whose data digest differs from the trial's (else "not comparable")
    alpha: float = 0.01  # the false-alarm rate of "drifted" per cell (harness.stats.DEFAULT_ALPHA)
    html: str | None = None  # --html FILE: the self-contained page (harness.report_html)
    detail: bool = False  # --detail: every table on the terminal, not the first screen (harness.report_compact)
    command: str = ""  # the command that writes it (its title)
    trace_dirs: tuple[str, ...] = ()  # where else to look for OUT/<cell>/trace.jsonl (compare: the directories given)
    show: bool = True  # print the report on stdout (the CLI does; harness.api only when asked: show=True)
