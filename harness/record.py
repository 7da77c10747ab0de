"""The two plain-data documents that cross process and machine boundaries:

* :class:`RunSpec` -- what a backend hands the worker (one cell, one run)
* the result record -- one JSON file per run, schema ``harness.result/1``

Every table, JSON or Markdown report is built from result records alone, so
records written on other machines can be merged into one comparison.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from .errors import InputError

SCHEMA = "harness.result/1"
SPEC_SCHEMA = "harness.runspec/1"
REQUIRED_KEYS = (
    "schema", "cell", "status", "env", "determinism", "metrics", "recorded",
    "delta_vs_recorded", "weights_sha256", "data_sha256", "wall_s",
)
ENV_KEYS = ("torch", "cuda", "cudnn", "device", "python")


@dataclass
class RunSpec:
    """One run of one cell, as the worker sees it (paths are the worker's own)."""

    cell: str
    bundle_dir: str
    out_dir: str
    data_path: str | None = None
    device: str = "cpu"
    determinism: str = "strict"
    threads: int | None = None
    tf32: bool = False
    repeat: int = 0
    trainer: str | None = None
    trainer_path: str | None = None
    trace: bool = False
    backend: str = "local"
    image: dict[str, Any] = field(default_factory=dict)  # requested image (tag, cell pins), docker backend
    labels: dict[str, Any] = field(default_factory=dict)  # the cell's axis values, for tables
    schema: str = SPEC_SCHEMA

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def record_path(self) -> Path:
        return Path(self.out_dir) / "record.json"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; records are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=True) + "\n"


def write_record(path: str | Path, record: dict[str, Any]) -> None:
    atomic_write_text(path, dumps(record))


def error_record(cell: str, kind: str, message: str, *, spec: dict[str, Any] | None = None,
                 wall_s: float = 0.0, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A complete record for a run that never produced metrics."""
    rec: dict[str, Any] = {
        "schema": SCHEMA, "cell": cell, "status": "error",
        "error": {"kind": kind, "message": message},
        "env": {k: None for k in ENV_KEYS}, "determinism": {}, "metrics": {},
        "recorded": None, "delta_vs_recorded": {}, "weights_sha256": None,
        "data_sha256": None, "wall_s": wall_s, "spec": spec or {},
    }
    if extra:
        rec.update(extra)
    return rec


def validate(record: Any, where: str) -> dict[str, Any]:
    """Check that a loaded record is one this version understands."""
    if not isinstance(record, dict):
        raise InputError(where, "is not a result record (expected a JSON object)")
    schema = record.get("schema")
    if schema != SCHEMA:
        if isinstance(schema, str) and schema.startswith("harness.result/"):
            raise InputError(where, f"has schema {schema}, this harness reads {SCHEMA}", hint="upgrade harness to read it")
        raise InputError(where, f"is not a harness result record (schema {schema!r})")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise InputError(where, f"result record lacks keys {missing}")
    return record


def load_records(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Load records from files or directories (``*/record.json`` and ``*.json``)."""
    out: list[dict[str, Any]] = []
    for p in paths:
        p = Path(p)
        files = sorted(p.rglob("record.json")) if p.is_dir() else [p]
        if p.is_dir() and not files:
            raise InputError(str(p), "holds no record.json files", hint="point at a results directory written by harness")
        for f in files:
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise InputError(str(f), "not found") from None
            except (OSError, ValueError) as exc:
                raise InputError(str(f), f"cannot be read as JSON ({exc})") from None
            if isinstance(data, dict) and "records" in data and isinstance(data["records"], list):
                out.extend(validate(r, str(f)) for r in data["records"])
            else:
                out.append(validate(data, str(f)))
    return out
