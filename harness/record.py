"""The typed documents that cross process and machine boundaries.

* :class:`RunSpec` -- what a backend hands the worker (one cell, one run),
  schema ``harness.runspec/4`` (4: ``trainer_cmd``; ``seed``, ``perturb`` and ``band`` for band members;
  later, optional: ``data_dir``, ``data_feed``, ``seed_key``, ``trainer_cwd``)
* :class:`ResultRecord` -- one JSON file per run, ``OUT/<cell>/record.json``,
  schema ``harness.result/3`` (3: ``trace``, what ``--trace`` wrote or why nothing; records of
  ``harness.result/2`` are still read: they have no trace)

Both are dataclasses with ``to_json``/``from_json``. ``from_json`` refuses a
document of another schema version with one line (an :class:`InputError`,
exit 2) instead of guessing at fields it does not know. This module is the
only one that writes ``record.json`` (:func:`write`), always atomically.

A record *measures*; it never judges. Verdicts are computed from records by
:mod:`harness.judge`, so a record's content cannot contradict the verdict
printed for it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

from . import safeio
from .errors import ErrorKind, HarnessError, InputError
from .options import DATA_PATHS, trainer_cwd_error
from .safeio import CellPaths, atomic_write_text

SCHEMA = "harness.result/3"
READS_RESULT = (SCHEMA, "harness.result/2")  # /2 is /3 without ``trace``
SPEC_SCHEMA = "harness.runspec/4"
RUN_SCHEMA = "harness.run/1"
REPORT_SCHEMA = "harness.report/2"
RECORD_FILE = CellPaths.RECORD  # record.json
RUN_FILE = "run.json"  # what one invocation planned, in order: the basis for "missing"
# `harness rerun` runs cell X as "X@rerun" and writes the archived run's record beside it as "X@archived"
RERUN_SUFFIX = "@rerun"
ARCHIVED_SUFFIX = "@archived"
LOG_TAIL_CHARS = 4000


class Status(str, enum.Enum):
    """How a cell's run ended. Only ``ok`` carries metrics."""

    OK = "ok"
    FAILED = "failed"  # it ran (or tried to) and broke: a build, a container, the trainer
    SKIPPED = "skipped"  # this host cannot run it (no GPU fit, driver too old); never started
    INTERRUPTED = "interrupted"  # Ctrl-C (or the launcher died) while it ran
    TIMEOUT = "timeout"  # it ran past --timeout and was killed

    def __str__(self) -> str:
        return self.value


class BandKind(str, enum.Enum):
    """What kind of band member a run is (see :mod:`harness.band`)."""

    ULP = "ulp"  # the baseline with one initial parameter value moved by one ulp
    SEED = "seed"  # the baseline with another training seed
    CELL_SEED = "cell-seed"  # a cell (not the baseline) with one of the band's seeds: --cell-seeds

    def __str__(self) -> str:
        return self.value


PERTURB_KINDS = ("ulp",)


# --------------------------------------------------------------------------- helpers


def _refuse_schema(data: Any, want: str, where: str, what: str, also: tuple[str, ...] = ()) -> dict[str, Any]:
    """``data`` when its schema is ``want`` (or one of ``also``, older versions still read); one line otherwise."""
    if not isinstance(data, dict):
        raise InputError(where, f"is not a {what} (expected a JSON object)")
    schema = data.get("schema")
    if schema == want or (schema in also and isinstance(schema, str)):
        return data
    family = want.rsplit("/", 1)[0]
    if isinstance(schema, str) and schema.startswith(family + "/"):
        reads = " and ".join([want, *(a for a in also if a != want)])
        raise InputError(where, f"has schema {schema}, this harness reads {reads}",
                         hint="read it with the harness version that wrote it, or rerun the cell with this one")
    raise InputError(where, f"is not a {what} (schema {schema!r}, expected {want})")


def _take(cls: type, data: Mapping[str, Any], where: str, *, extra_field: str | None = None) -> dict[str, Any]:
    """The keyword arguments of ``cls`` found in ``data``; unknown keys go to ``extra_field`` or are refused."""
    names = {f.name for f in fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown and extra_field is None:
        raise InputError(where, f"has unknown key(s) {', '.join(sorted(unknown))} for {cls.__name__}",
                         hint="it was written by another harness version")
    out = {k: v for k, v in data.items() if k in names and k != extra_field}
    types = {f.name: str(f.type) for f in fields(cls)}
    required = [f.name for f in fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in out]
    if required:
        raise InputError(where, f"{cls.__name__} lacks {', '.join(repr(n) for n in required)}",
                         hint="it was written by another harness version, or edited")
    for k, v in out.items():
        _check_type(k, v, types[k], where)
    if extra_field is not None:
        extra_in = data.get(extra_field) or {}
        if not isinstance(extra_in, Mapping):
            raise InputError(where, f"{extra_field} must be an object, got {type(extra_in).__name__}")
        extra = dict(extra_in)
        extra.update({k: data[k] for k in unknown})
        out[extra_field] = extra
    return out


_SIMPLE_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def _check_type(key: str, value: Any, annotation: str, where: str) -> None:
    """Refuse a value whose JSON type does not fit the field's annotation (one line, exit 2)."""
    optional = annotation.endswith(" | None")
    base = annotation[: -len(" | None")] if optional else annotation
    if value is None:
        if optional or base not in _SIMPLE_TYPES and not base.startswith(("dict", "list")):
            return
        raise InputError(where, f"{key} must not be null")
    if base.startswith("dict"):
        ok = isinstance(value, Mapping)
    elif base.startswith("list"):
        ok = isinstance(value, list)
    elif base in _SIMPLE_TYPES:
        ok = isinstance(value, _SIMPLE_TYPES[base]) and (base == "bool" or not isinstance(value, bool))
    else:
        return  # nested documents (ErrorInfo, Env, ImageInfo, Status) are checked by their own readers
    if not ok:
        what = "an object" if base.startswith("dict") else "a list" if base.startswith("list") else \
            {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}[base]
        raise InputError(where, f"{key} must be {what}"
                                f"{' or null' if optional else ''}, got {type(value).__name__}")


def flatten_split(metrics: Mapping[str, Any] | None, split: str = "val") -> dict[str, float]:
    """``{"val_loss": .., "r2/t": .., "mse/t": .., "mae/t": ..}`` of one evaluation."""
    if not metrics:
        return {}
    out: dict[str, float] = {}
    if _metric_number(metrics.get("val_loss")):
        out["val_loss"] = float(metrics["val_loss"])
    per = metrics.get(split) or {}
    if not isinstance(per, Mapping):
        return out
    for fam in ("r2", "mse", "mae"):
        values = per.get(fam) or {}
        if not isinstance(values, Mapping):
            continue
        for target, v in values.items():
            if _metric_number(v):
                out[f"{fam}/{target}"] = float(v)
    return out


def _metric_number(v: Any) -> bool:
    """A metric value that can be judged: a number that is not bool (None, text ... are missing)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _jsonable(value: Any) -> Any:
    """Plain JSON data: enums by value, dataclasses as dicts (non-finite floats kept; see :func:`strict`)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Part):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def strict(value: Any, path: str = "", found: list[str] | None = None) -> Any:
    """``value`` with every NaN or infinity replaced by None; their dotted paths are appended to ``found``."""
    if isinstance(value, float) and not math.isfinite(value):
        if found is not None:
            found.append(path)
        return None
    if isinstance(value, dict):
        return {k: strict(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()}
    if isinstance(value, list):
        return [strict(v, f"{path}.{i}" if path else str(i), found) for i, v in enumerate(value)]
    return value


def dumps(data: Any) -> str:
    """Strict JSON: non-finite floats become null (records also list where, in ``nonfinite``)."""
    return json.dumps(strict(_jsonable(data)), indent=2, sort_keys=True, allow_nan=False) + "\n"


# --------------------------------------------------------------------------- typed parts of a record


class Part:
    """A typed part of a spec or record: a small document that crosses a boundary (the worker, perhaps in
    a container, writes it; the launcher, the judge and the report read it), so it is read with its
    types checked, one line and exit 2 when they are wrong, and written with its unset optional keys
    left out, which keeps the JSON what it was when the part was a free dict."""

    @classmethod
    def read(cls, data: Any, where: str, name: str) -> Any:
        """``data`` as this part (None stays None); anything else than an object is refused in one line."""
        if data is None or isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise InputError(where, f"{name} must be an object or null, got {type(data).__name__}")
        return cls(**_take(cls, data, f"{where}: {name}" if where else name))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)  # type: ignore[arg-type]
                if getattr(self, f.name) is not None or f.default is dataclasses.MISSING}


@dataclass(frozen=True)
class BandMember(Part):
    """What band a run belongs to, and which member it is. Band members are the band's, never cells
    of the table; the seed is the training seed it ran with (the record's, not the spec's)."""

    kind: BandKind
    member: int  # 1, 2, ...
    seed: int | None = None
    of: str | None = None  # a cell-seed member: the cell whose own repeats it is
    seed_via: list[str] | None = None  # where a seed member's seed reaches its trainer, in words

    def __post_init__(self) -> None:
        check_band({"kind": _jsonable(self.kind), "member": self.member}, "band")
        object.__setattr__(self, "kind", BandKind(self.kind))

    @classmethod
    def read(cls, data: Any, where: str, name: str = "band") -> "BandMember | None":
        if isinstance(data, Mapping):
            check_band(data, where)  # the kind and member named in the old words
        return super().read(data, where, name)


@dataclass(frozen=True)
class Perturbation(Part):
    """What an ulp band member's one-ulp change was (harness.worker.perturb), or that it was skipped and why."""

    applied: bool
    kind: str | None = None  # "ulp"
    seed: int | None = None  # the private RNG's seed that chose the value
    via: str | None = None  # where it was applied: the reference trainer, a forward pre-hook on ...
    skipped: str | None = None  # not applied: why
    module: str | None = None  # the model's class
    tensor: str | None = None  # the parameter, by name
    index: int | None = None  # the flat index of the value moved
    shape: list[int] | None = None
    dtype: str | None = None
    old: str | None = None  # float.hex of the value before
    new: str | None = None  # and after
    direction: str | None = None  # "+inf" | "-inf"
    process: int | None = None  # a trainer command's: the pid of the process that applied it
    updated: bool | None = None  # hooks: an optimizer step followed (the change was not overwritten first)

    def where(self) -> str | None:
        """``tensor[index] direction``, in words; None when nothing was applied."""
        return f"{self.tensor}[{self.index}] {self.direction}" if self.applied else None


@dataclass(frozen=True)
class WeightsDiff(Part):
    """The retrained best weights against the bundle's ``weights/best.pt``, tensor by tensor."""

    identical: bool
    first_difference: str | None = None  # the first differing tensor, by sorted name
    max_abs_diff: float | None = None  # None: a tensor missing or of another shape or dtype


@dataclass(frozen=True)
class UserWeights(Part):
    """A trainer's own weights digest (its convention) against trial_info's ``weights_sha256``."""

    sha256: str
    recorded: str | None = None
    identical_to_recorded: bool | None = None  # None: the trial recorded no digest


@dataclass(frozen=True)
class TraceInfo(Part):
    """What ``--trace`` wrote (``file``, ``steps``, ``truncated``), or why there is none (``why``)."""

    file: str | None = None  # trace.jsonl beside the record; None: no trace, and ``why`` says why
    steps: int = 0
    truncated: bool = False
    schema: str | None = None  # the trace file's (harness.trace/1)
    why: str | None = None
    process: int | None = None  # a trainer command's: the pid of the process whose steps it holds


@dataclass(frozen=True)
class SlotInfo(Part):
    """Where ``--jobs`` ran the cell (harness.schedule.Slot, as the record keeps it)."""

    cpus: list[int] | None = None  # the cores it was pinned to; None: not pinned
    gpu: str | None = None
    gpu_shared: int | None = None  # cells on its GPU when it started, itself included


@dataclass(frozen=True)
class GpuMemory(Part):
    """A CUDA cell's use of its GPU, in MiB (harness.worker.envinfo.gpu_memory says what each is)."""

    total_mib: float | None = None
    peak_reserved_mib: float | None = None
    peak_allocated_mib: float | None = None
    device_used_mib: float | None = None
    context_mib: float | None = None


@dataclass(frozen=True)
class SlurmJob(Part):
    """The Slurm backend's job for the cell, from sacct and the node (see docs/clusters.md)."""

    job_id: str
    state: str | None = None  # sacct's word: COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    node: str | None = None
    gpu_type: str | None = None  # the GRES type asked for
    gres: list[str] | None = None  # the GPU types sacct says it was given
    job_gpus: str | None = None  # SLURM_JOB_GPUS on the node
    partition: str | None = None
    exit_code: str | None = None  # sacct's ExitCode, "code:signal"
    elapsed: str | None = None
    runtime: str | None = None  # python | docker
    reused_from: str | None = None  # the run whose record this is, when a rerun reused it


@dataclass(frozen=True)
class DataFeed(Part):
    """The reference trainer's data path: asked for, used, and what decided it (harness.worker.feed)."""

    requested: str  # loader | fast
    effective: str
    proof: str
    torch: str | None = None
    fell_back: bool = False


# --------------------------------------------------------------------------- the run spec


@dataclass
class RunSpec:
    """One run of one cell, as the worker sees it (paths are the worker's own)."""

    cell: str
    bundle_dir: str
    out_dir: str
    data_path: str | None = None
    data_dir: str | None = None  # --data-dir: the directory holding data_path, hashed into the record
    device: str = "cpu"
    determinism: str = "strict"
    threads: int | None = None
    tf32: bool = False
    repeat: int = 0
    isa: str | None = None  # the CPU instruction-set level its launcher set (harness.worker.isa); None: none
    trainer: str | None = None
    trainer_path: list[str] | None = None  # folders put on sys.path, in order
    trainer_cmd: str | None = None  # a command as the trainer (harness.worker.trainer_cmd), instead of `trainer`
    trace: bool = False
    backend: str = "local"
    image: dict[str, Any] = field(default_factory=dict)  # the image the cell runs in (docker backend)
    labels: dict[str, Any] = field(default_factory=dict)  # the cell's axis values, for tables
    seed: int | None = None  # overrides config.yaml training.seed (a seed band member)
    # {"kind": "ulp", "seed": s}: move one initial parameter value by one ulp, chosen by
    # a private RNG seeded with s (an ulp band member); see harness.worker.perturb
    perturb: dict[str, Any] | None = None
    band: BandMember | None = None  # a band member's kind and number: copied into the record
    # --data-path: the reference trainer's data path, "loader" | "fast"; None: the default
    # (options.DEFAULT_DATA_PATH). Not ``data_path``: that name is the dataset file's.
    data_feed: str | None = None
    seed_key: str | None = None  # --seed-key: where a custom trainer reads its seed in config.yaml (trainer.seed_key)
    trainer_cwd: str | None = None  # where a custom trainer runs: bundle | project (--trainer-cwd, else trainer.cwd)
    schema: str = SPEC_SCHEMA

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "band" and value is not None and not isinstance(value, BandMember):
            value = BandMember.read(value, "spec")  # its JSON data, read as the part (see ResultRecord)
        object.__setattr__(self, name, value)

    def to_json(self) -> str:
        return dumps(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        d = _jsonable(self)
        for key in self.LATER_KEYS:  # unset: left out, so that a worker of an older image still reads the spec
            if d.get(key) is None:
                d.pop(key, None)
        return d

    # Added to runspec/4 after its first release, all optional and left out when unset, so a spec
    # that does not use them reads the same to every /4 worker (an image built before them, a snapshot).
    # A worker that predates a key refuses a spec that sets it (one line, exit 2) rather than ignore it.
    LATER_KEYS = ("data_dir", "data_feed", "seed_key", "trainer_cwd")

    @classmethod
    def from_json(cls, data: Any, where: str = CellPaths.SPEC) -> "RunSpec":
        """A spec of this version; another version or an unknown key is refused (exit 2)."""
        data = _refuse_schema(data, SPEC_SCHEMA, where, "harness run spec")
        kw = _take(cls, data, where)
        kw["band"] = BandMember.read(kw.get("band"), where)
        spec = cls(**kw)
        check_perturb(spec.perturb, where)
        if spec.data_feed is not None and spec.data_feed not in DATA_PATHS:
            raise InputError(where, f"data_feed must be one of {', '.join(DATA_PATHS)}, got {spec.data_feed!r}")
        why = trainer_cwd_error(spec.trainer_cwd, "trainer_cwd")
        if why is not None:
            raise InputError(where, why)
        return spec

    @property
    def record_path(self) -> Path:
        return Path(self.out_dir) / RECORD_FILE


def check_perturb(perturb: Any, where: str) -> None:
    """``perturb`` is None or ``{"kind": "ulp", "seed": int}`` (one line, exit 2, otherwise)."""
    if perturb is None:
        return
    if not isinstance(perturb, Mapping) or perturb.get("kind") not in PERTURB_KINDS:
        raise InputError(where, f"perturb must be {{\"kind\": \"ulp\", \"seed\": N}}, got {perturb!r}")
    seed = perturb.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(where, f"perturb.seed must be an integer >= 0, got {seed!r}")


def check_band(band: Any, where: str) -> None:
    """``band`` is None or ``{"kind": "ulp" | "seed" | "cell-seed", "member": int >= 1, ...}``."""
    if band is None:
        return
    kinds = [k.value for k in BandKind]
    if not isinstance(band, Mapping) or band.get("kind") not in kinds:
        raise InputError(where, f"band.kind must be one of {', '.join(kinds)}, got {band!r}")
    member = band.get("member")
    if isinstance(member, bool) or not isinstance(member, int) or member < 1:
        raise InputError(where, f"band.member must be an integer >= 1, got {member!r}")


# --------------------------------------------------------------------------- the result record


@dataclass
class ErrorInfo:
    """Why a cell has no metrics: what kind of failure, in one line, and its evidence."""

    kind: ErrorKind  # a word: input | usage | run | disk | image | skipped | ...; any other word an older harness wrote
    message: str
    exit_status: int | None = None  # the worker's (or container's) exit status, when it had one
    image: str | None = None  # the image tag the cell ran in, when it ran in one
    log_tail: str | None = None  # the last lines the worker printed
    traceback: str | None = None

    def __post_init__(self) -> None:
        self.kind = ErrorKind(self.kind)  # a word given as a str is its kind (any word: see ErrorKind)

    @classmethod
    def from_json(cls, data: Any, where: str) -> "ErrorInfo":
        if not isinstance(data, Mapping):
            raise InputError(where, "error must be an object {kind, message, ...}")
        kw = _take(cls, data, where)
        _check_type("kind", kw["kind"], "str", where)
        return cls(**kw)


@dataclass
class Env:
    """The environment measured inside the run (never the one asked for)."""

    python: str | None = None
    torch: str | None = None
    cuda: str | None = None
    cudnn: str | None = None
    device: str | None = None  # device model: CPU model or GPU name
    device_type: str | None = None  # cpu | cuda
    driver: str | None = None
    compute_capability: str | None = None
    threads: int | None = None
    numpy: str | None = None
    cpu: str | None = None
    hostname: str | None = None
    in_container: bool | None = None
    cpu_capability: str | None = None  # the SIMD level torch's CPU kernels use (torch.backends.cpu.get_cpu_capability())
    isa_requested: str | None = None  # the --isa level the cell asked for (None: no ISA axis)
    isa_env: dict[str, Any] = field(default_factory=dict)  # ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS as set
    # The numeric switches in effect (harness.worker.envinfo.SWITCHES: MKL_CBWR, OMP_DYNAMIC, ...), by name,
    # those set only; None: not measured (a record from before they were).
    switches: dict[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # every other measured fact, kept as measured

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Env":
        if not isinstance(data, Mapping):
            raise InputError(where, "env must be an object")
        return cls(**_take(cls, data, where, extra_field="extra"))

    def to_dict(self) -> dict[str, Any]:
        """Flat: the known facts and the extra ones side by side."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out


@dataclass
class ImageInfo:
    """The image a container cell ran in: what ran, not what was asked for."""

    id: str
    tag: str | None = None
    cell: str | None = None
    repo_digests: list[str] = field(default_factory=list)
    input_hash: str | None = None
    torch: str | None = None
    variant: str | None = None
    cuda: str | None = None
    python: str | None = None
    base_image: str | None = None
    base_digest: str | None = None  # the base image's pinned digest (images/), when the cell pins one
    source: str | None = None
    size_bytes: int | None = None
    built_seconds: float | None = None
    snapshot: str | None = None  # the archive it was loaded from (harness rerun)
    note: str | None = None  # e.g. an existing image used without checking it against its inputs

    @classmethod
    def from_json(cls, data: Any, where: str) -> "ImageInfo":
        if not isinstance(data, Mapping) or not data.get("id"):
            raise InputError(where, "image must be an object with an id")
        return cls(**_take(cls, data, where))


@dataclass
class ResultRecord:
    """One run of one cell: what ran, where, and what it measured.

    ``metrics`` is ``{"retrained": M, "archived": M | None}`` where ``M`` is
    ``{"val_loss": x, "best_epoch": n, "val": {"r2": {target: x}, "mse": ...,
    "mae": ...}, "test": {...}}`` in original target units. ``recorded`` is the
    trial as read from ``trial_info.yaml``. Nothing here is a verdict.
    """

    cell: str
    status: Status
    error: ErrorInfo | None = None
    backend: str = "local"
    harness_version: str | None = None
    run_id: str | None = None  # the invocation that wrote it (see run.json)
    started_at: str | None = None
    finished_at: str | None = None
    spec: dict[str, Any] = field(default_factory=dict)  # the RunSpec the worker ran, as it read it
    labels: dict[str, Any] = field(default_factory=dict)
    image: ImageInfo | None = None
    env: Env = field(default_factory=Env)
    determinism: dict[str, Any] = field(default_factory=dict)
    bundle: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    data_sha256: str | None = None
    expected_data_sha256: dict[str, str] = field(default_factory=dict)  # where the bundle records one -> digest
    split: dict[str, Any] = field(default_factory=dict)
    scaler: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    recorded: dict[str, Any] | None = None
    weights_sha256: str | None = None
    last_weights_sha256: str | None = None
    archived_weights_sha256: str | None = None
    weights_vs_archived: WeightsDiff | None = None  # the retrained best weights vs the bundle's weights/best.pt
    user_weights: UserWeights | None = None  # a trainer's own weights digest vs trial_info's weights_sha256
    history: list[dict[str, Any]] = field(default_factory=list)
    # a custom trainer: what ran and how ({entrypoint | command, code_dirs, seed_key, weights, ...}); since
    # trainer.cwd, also "cwd" (the working directory it ran in, as the worker saw it: a container path in a
    # container) and "cwd_mode" ("bundle" | "project" | "default"), in a failed record too; older records lack them
    trainer: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    host_paths: dict[str, Any] = field(default_factory=dict)
    wall_s: float | None = None  # the worker's own wall time
    train_s: float | None = None
    launcher_wall_s: float | None = None  # as the launcher saw it (start-up included)
    nonfinite: list[str] = field(default_factory=list)  # dotted paths of values that were NaN/inf (written as null)
    timeout_s: float | None = None  # the launcher's --timeout for this cell
    band: BandMember | None = None  # None for an ordinary cell
    # what an ulp perturbation did: {"kind", "seed", "applied": True, "tensor", "index", "shape", "dtype",
    # "old", "new" (float.hex), "direction" ("+inf" | "-inf")}, or {"applied": False, "skipped": why}
    perturbation: Perturbation | None = None
    trace: TraceInfo | None = None  # None when no trace was asked for
    slurm: SlurmJob | None = None  # the Slurm backend's job; None for the other backends
    data_feed: DataFeed | None = None  # the reference trainer's data path (--data-path); None for custom trainers
    slot: SlotInfo | None = None  # where it ran with --jobs; None: not scheduled
    # sha256 over what determines the result (harness.cache.cell_key): a rerun with --resume reuses the
    # record when its key is unchanged
    cache_key: str | None = None
    # how the local backend started its worker: "warm" (forked from a server that imported torch once,
    # harness.backends.warm) or "cold" (a fresh interpreter), and for "cold", why when it could have been
    # warm (--cold, a trainer command, a server that failed to start); None: older records, other backends
    start: str | None = None
    start_reason: str | None = None
    gpu_memory: GpuMemory | None = None  # a CUDA cell's use of its GPU; None: no CUDA, a trainer command, older records
    schema: str = SCHEMA

    def __setattr__(self, name: str, value: Any) -> None:
        """A typed part given as its JSON data (the worker's wire format, a child process's report) is
        read as that part, checked, on construction and on assignment alike (like a validating model)."""
        part = PARTS.get(name)
        if part is not None and value is not None and not isinstance(value, part):
            value = part.read(value, "record", name)
        object.__setattr__(self, name, value)

    # ---- construction

    @classmethod
    def without_metrics(cls, cell: str, status: Status, kind: ErrorKind | str, message: str,
                        **kw: Any) -> "ResultRecord":
        """A complete record for a run that produced no metrics (failed, skipped, interrupted)."""
        err_keys = {f.name for f in fields(ErrorInfo)} - {"kind", "message"}
        err = ErrorInfo(kind=kind, message=message, **{k: kw.pop(k) for k in list(kw) if k in err_keys})
        return cls(cell=cell, status=status, error=err, **kw)

    # ---- (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON data: NaN and infinities are None, and ``nonfinite`` names where they were."""
        d = _jsonable(self)
        d["env"] = _jsonable(self.env.to_dict())
        found: list[str] = []
        d = strict(d, "", found)
        kept = d.get("nonfinite") if isinstance(d.get("nonfinite"), list) else []
        d["nonfinite"] = sorted({x for x in kept if isinstance(x, str)} | set(found))  # a read record may hold anything
        return d

    def to_json(self) -> str:
        return dumps(self.to_dict())

    @classmethod
    def from_json(cls, data: Any, where: str = RECORD_FILE) -> "ResultRecord":
        """A record of this schema version; another version is refused with one line (exit 2)."""
        data = _refuse_schema(data, SCHEMA, where, "harness result record", READS_RESULT)
        kw = _take(cls, data, where)
        for key in ("cell", "status"):
            if key not in kw:
                raise InputError(where, f"result record lacks {key!r}")
        try:
            kw["status"] = Status(kw["status"])
        except ValueError:
            raise InputError(where, f"status {kw['status']!r} is not one of {', '.join(s.value for s in Status)}") from None
        if kw.get("error") is not None:
            kw["error"] = ErrorInfo.from_json(kw["error"], where)
        if kw.get("image") is not None:
            kw["image"] = ImageInfo.from_json(kw["image"], where)
        kw["env"] = Env.from_json(kw.get("env") or {}, where)
        if kw["status"] is Status.OK and not kw.get("metrics"):
            raise InputError(where, "an ok record carries no metrics")
        if kw["status"] is not Status.OK and kw.get("error") is None:
            raise InputError(where, f"a {kw['status'].value} record carries no error")
        for name, part in PARTS.items():
            kw[name] = part.read(kw.get(name), where, name)
        return cls(**kw)

    @property
    def band_kind(self) -> BandKind | None:
        """The kind of band member this record is, or None for an ordinary cell."""
        return self.band.kind if self.band else None

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @property
    def retrained(self) -> dict[str, Any]:
        value = (self.metrics or {}).get("retrained")
        return value if isinstance(value, Mapping) else {}

    @property
    def archived(self) -> dict[str, Any] | None:
        value = (self.metrics or {}).get("archived")
        return value if isinstance(value, Mapping) else None


# the record's fields that are typed parts, read (and checked) by ResultRecord.from_json
PARTS: dict[str, type[Part]] = {"weights_vs_archived": WeightsDiff, "user_weights": UserWeights, "band": BandMember,
                                "perturbation": Perturbation, "slurm": SlurmJob,
                                "trace": TraceInfo, "data_feed": DataFeed, "slot": SlotInfo, "gpu_memory": GpuMemory}


# --------------------------------------------------------------------------- what one invocation planned


@dataclass
class RunManifest:
    """``OUT/run.json``: the cells one invocation planned, in order, written before any runs.

    ``harness compare`` keeps this order and names the planned cells that left
    no record (an interrupted or killed run) as missing.
    """

    run_id: str
    cells: list[str]
    backend: str
    bundle: str
    started_at: str
    harness_version: str | None = None
    band_from: str | None = None  # a band measured earlier (--band-from DIR), judged with this run's cells
    # cell -> run id of the earlier run whose record this run reused (--resume, unchanged cache key)
    reused: dict[str, str] = field(default_factory=dict)
    schema: str = RUN_SCHEMA

    def to_json(self) -> str:
        data = _jsonable(self)
        if not data.get("reused"):
            data.pop("reused", None)  # left out when empty: an older harness still reads the manifest
        return dumps(data)

    @classmethod
    def from_json(cls, data: Any, where: str = RUN_FILE) -> "RunManifest":
        data = _refuse_schema(data, RUN_SCHEMA, where, "harness run manifest")
        kw = _take(cls, data, where)
        if not isinstance(kw.get("cells"), list) or not all(isinstance(c, str) for c in kw["cells"]):
            raise InputError(where, "cells must be a list of cell names")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in (kw.get("reused") or {}).items()):
            raise InputError(where, "reused must map cell names to run ids")
        return cls(**kw)


# --------------------------------------------------------------------------- files


def write(path: str | Path, record: ResultRecord) -> None:
    """Write ``record.json`` atomically (:func:`harness.safeio.atomic_write`): the one place that does."""
    atomic_write_text(path, record.to_json())


RECORD_MAX_BYTES = 64 << 20


def read_worker_record(path: Path) -> ResultRecord | None:
    """The record a worker left at ``path`` (a cell directory's ``record.json``), read without following a
    link (:func:`harness.safeio.read_no_follow`); None when it left none. A link, a FIFO, an oversized file
    or one that is not JSON is a :class:`~harness.errors.HarnessError` naming the file (the run's failure,
    exit 1); a record of another schema an :class:`~harness.errors.InputError`."""
    raw = safeio.read_no_follow(path, RECORD_MAX_BYTES, shown=path.name)
    if raw is None:
        return None
    try:
        data = json.loads(raw.decode("utf-8", "replace"))
    except ValueError as exc:
        raise HarnessError(f"{path.name} is not JSON ({exc})") from None
    return ResultRecord.from_json(data, str(path))


def read(path: str | Path, *, within: str | Path | None = None) -> ResultRecord:
    """One ``record.json``; a missing, unreadable or foreign file is one clear line (exit 2).

    Read as hostile input (:mod:`harness.safeio`): a link in its place (or, below ``within``, anywhere
    on its path), a FIFO, a device or a file over 64 MiB is refused, never followed or read whole.
    """
    p = Path(path)
    return ResultRecord.from_json(safeio.read_json(p, safeio.JSON_MAX_BYTES, within=within), str(p))


def write_manifest(results_dir: str | Path, manifest: RunManifest) -> None:
    atomic_write_text(Path(results_dir) / RUN_FILE, manifest.to_json())


def read_manifest(results_dir: str | Path) -> RunManifest | None:
    """``run.json`` of a results directory, None when it has none (read as hostile input, like a record)."""
    p = Path(results_dir) / RUN_FILE
    data = safeio.read_json(p, safeio.JSON_MAX_BYTES, missing_ok=True)
    return None if data is None else RunManifest.from_json(data, str(p))


@dataclass
class RecordSet:
    """Records read from one place, in the run's order, with the planned cells that left none."""

    records: list[ResultRecord]
    missing: list[str] = field(default_factory=list)
    source: str = ""
    warnings: list[str] = field(default_factory=list)  # e.g. records of another run that were left out


def _ordered(records: list[ResultRecord], manifest: RunManifest | None) -> tuple[list[ResultRecord], list[str]]:
    if manifest is None:
        # No plan to follow: the order the cells started in (a run starts them in plan order).
        return sorted(records, key=lambda r: (r.started_at or "", r.cell)), []
    rank = {name: i for i, name in enumerate(manifest.cells)}
    ordered = sorted(records, key=lambda r: (rank.get(r.cell, len(rank)), r.started_at or "", r.cell))
    have = {r.cell for r in records}
    return ordered, [c for c in manifest.cells if c not in have]


def load(path: str | Path, *, follow_band: bool = True) -> RecordSet:
    """Records from a results directory, a ``record.json`` or a JSON report.

    A directory is read in the order of its ``run.json`` (else the cells'
    start times); planned cells without a record are listed as missing. When
    ``run.json`` names a band reused from elsewhere (``band_from``), its band
    members are added (``follow_band``; one level, never that band's own).
    """
    p = Path(path)
    if p.is_dir():
        warnings: list[str] = []
        found = _cell_records(p, warnings)
        manifest = read_manifest(p)
        if not found and manifest is None:
            raise InputError(str(p), "holds no record.json files", hint="point at a results directory written by harness")
        archived: list[ResultRecord] = []
        if manifest is not None:
            # A rerun judged its cell against the archived run's record, which it wrote beside it:
            # that record is of the run being reproduced, and of this comparison.
            archived = [r for r in found if r.cell.endswith(ARCHIVED_SUFFIX)
                        and r.cell[: -len(ARCHIVED_SUFFIX)] + RERUN_SUFFIX in manifest.cells]
            # Only the records of the run that run.json describes: another run's (a --resume
            # into this directory, or an older harness) are not this run's results, nor is a record
            # without a run id: the harness gives every record it keeps its run's id, so one without was
            # written by a worker whose harness never finished it (the worker of a killed run). A record
            # --resume reused carries the earlier run's id, and run.json names it.
            other = [r for r in found if r.run_id != manifest.run_id
                     and (r.run_id is None or manifest.reused.get(r.cell) != r.run_id)
                     and not any(r is a for a in archived)]
            if other:
                found = [r for r in found if r not in other]
                runs = ", ".join(sorted({r.run_id or "no run id" for r in other}))
                warnings.append(f"{p}: ignored {len(other)} record(s) of another run ({runs}), not run "
                                f"{manifest.run_id} of run.json: {', '.join(r.cell for r in other)}")
        records, missing = _ordered([r for r in found if not any(r is a for a in archived)], manifest)
        records = sorted(archived, key=lambda r: r.cell) + records  # first, as the rerun judged them
        if follow_band and manifest is not None and manifest.band_from:
            records += _band_from(manifest.band_from, {r.cell for r in records}, warnings)
        return RecordSet(records, missing, str(p), warnings)
    data = safeio.read_json(p, safeio.JSON_MAX_BYTES if p.name == RECORD_FILE else safeio.REPORT_MAX_BYTES)
    if isinstance(data, dict) and isinstance(data.get("records"), list):
        _refuse_schema(data, REPORT_SCHEMA, str(p), "harness report")
        records = [ResultRecord.from_json(r, f"{p}: records[{i}]") for i, r in enumerate(data["records"])]
        missing = [str(c) for c in (data.get("comparison") or {}).get("missing") or []]
        return RecordSet(records, missing, str(p))
    return RecordSet([ResultRecord.from_json(data, str(p))], [], str(p))


def _cell_records(results: Path, warnings: list[str]) -> list[ResultRecord]:
    """The record of each cell directory of ``results`` (``<cell>/record.json``), by cell directory name.

    Every file is read as hostile input (:mod:`harness.safeio`, no link followed below ``results``); a cell
    directory that is a link is left out, named in a warning, never followed.
    """
    try:
        with os.scandir(results) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise InputError(str(results), f"cannot be listed ({exc.strerror or exc})") from None
    out: list[ResultRecord] = []
    links: list[str] = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            links.append(entry.name)
        elif entry.is_dir(follow_symlinks=False):
            path = results / entry.name / RECORD_FILE
            data = safeio.read_json(path, safeio.JSON_MAX_BYTES, within=results, missing_ok=True)
            if data is not None:
                out.append(ResultRecord.from_json(data, str(path)))
    if links:
        warnings.append(f"{results}: left out {len(links)} link(s), not followed: {', '.join(links[:5])}"
                        f"{', ...' if len(links) > 5 else ''}")
    return out


def _band_from(path: str, have: set[str], warnings: list[str]) -> list[ResultRecord]:
    """The band members of the band a run reused (``run.json`` ``band_from``); a warning when it is gone."""
    try:
        found = load(path, follow_band=False)
    except InputError as exc:
        warnings.append(f"the band this run reused ({path}) cannot be read ({exc.one_line()}): judged without it")
        return []
    return [r for r in found.records if r.band and r.cell not in have]


def load_many(paths: Iterable[str | Path]) -> list[RecordSet]:
    return [load(p) for p in paths]
