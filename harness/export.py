"""``harness export``: one cell of a run, as a new ``optuna_best/`` to start the next retrain from.

Steps: read the results directory strictly -> pick the cell -> gather what the run used
(the source bundle's config and files, the scaler, the weights the worker wrote) -> write
the new bundle into a temporary directory beside ``-o`` -> check it -> move it into place.

The results directory is treated as hostile input. A cell's directory was writable by
what ran in it (a container runs the bundle's pickles), so nothing there is followed:
``run.json`` and every ``record.json`` are read as regular files only (a link, a FIFO or
an oversized file is refused), the cell directory, its ``weights/`` and each file in them
are opened with ``O_NOFOLLOW`` one component at a time, and the weights are checked
against the record's tensor digest after the copy. Paths are never taken from a record for
what lies in the results directory: the cell directory is ``RESULTS/<cell>``, and a local
record whose ``spec.out_dir`` names anything else is refused.

What the export copies is read from the source bundle alone, the one the run's ``run.json``
names (the CLI writes it; a worker cannot), and only while its ``config.yaml`` still has the
digest the record carries; a record naming another bundle is refused. That bundle is copied
without following a link (a link, FIFO, device or socket in it is left out, with a warning).
A scaler the run refitted is never copied: whatever a worker wrote is data, and a pickle is
code. The data is hashed only when it is a regular file (or a directory) reached without a link.

Pure parts (choosing the cell, the new ``trial_info.yaml`` and ``config.yaml``) are plain
functions of records and mappings; effects are in :func:`export` and the readers.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import yaml

from . import __version__, record
from .bundle import (AGGREGATE, CONFIG, MAX_YAML_BYTES, SCALER, TRIAL_INFO, WEIGHTS_DIR, config_digest, load_bundle,
                     parse_yaml_text)
from .errors import InputError
from .record import ResultRecord, RunManifest
from .safeio import CellPaths, atomic_write_text, hash_into, kind_of, open_regular, read_bytes

CONTAINER_BUNDLE = "/harness/bundle"  # harness.backends.docker.BUNDLE
CONTAINER_TRAINER = "/harness/trainer"  # harness.backends.docker.TRAINER
MANAGED = {CONFIG, TRIAL_INFO, SCALER, WEIGHTS_DIR}  # what export writes; the rest of the source bundle is copied
ENV_KEYS = ("python", "torch", "cuda", "cudnn", "device", "device_type", "driver", "compute_capability", "threads",
            "numpy", "cpu", "hostname", "in_container")


# --------------------------------------------------------------------------- reading the results directory


RESULTS_HINT = "export a results directory written by harness"


def read_text_no_follow(root: Path, *parts: str, limit: int = 64 << 20) -> str | None:
    """A small regular file under ``root``, no link followed on the way (:func:`harness.safeio.read_bytes`);
    None when it is absent."""
    raw = read_bytes(root.joinpath(*parts), limit, within=root, hint=RESULTS_HINT)
    return None if raw is None else raw.decode("utf-8", "replace")


WEIGHTS_LIMIT_ENV = "HARNESS_WEIGHTS_LIMIT"
DEFAULT_WEIGHTS_LIMIT = 16 << 30  # the largest file export copies out of a cell directory
SPARSE_FLOOR = 16 << 20  # a file at least this long ...
SPARSE_RATIO = 4  # ... with less than 1/SPARSE_RATIO of it allocated is sparse: torch.save never writes one


def weights_limit() -> int:
    """``$HARNESS_WEIGHTS_LIMIT`` (``32G``, ``500M``, bytes), else 16 GiB."""
    from .worker.data import parse_size

    raw = os.environ.get(WEIGHTS_LIMIT_ENV)
    return parse_size(raw, f"${WEIGHTS_LIMIT_ENV}", f"{WEIGHTS_LIMIT_ENV}=64G") if raw else DEFAULT_WEIGHTS_LIMIT


def check_copy_size(st: os.stat_result, where: str, dest_dir: Path, limit: int) -> None:
    """Refuse, before a byte is copied, a file over ``limit``, a sparse one, or one the destination has no room for."""
    from .worker.data import human_size

    size, allocated = st.st_size, st.st_blocks * 512
    if size > limit:
        raise InputError(where, f"is {human_size(size)}, over the {human_size(limit)} export copies",
                         hint=f"raise it with {WEIGHTS_LIMIT_ENV}=SIZE if these weights really are that large")
    if size >= SPARSE_FLOOR and allocated * SPARSE_RATIO < size:
        raise InputError(where, f"is sparse: {human_size(size)} long, {human_size(allocated)} of it on disk; "
                                "the worker never writes such a file (something else made it in the cell directory)",
                         hint="rerun the cell, then export")
    free = shutil.disk_usage(dest_dir).free
    if size > free:
        raise InputError(where, f"is {human_size(size)}, but only {human_size(free)} is free at {dest_dir}",
                         hint="free space, or export to -o on another disk")


def copy_no_follow(root: Path, parts: tuple[str, ...], dest: Path, limit: int | None = None) -> bool:
    """Copy the regular file ``root/parts...`` (no link followed) to ``dest``; False when it is absent.

    Its size is checked on the open file first (:func:`check_copy_size`, ``limit`` default
    :func:`weights_limit`), and no more than it said is copied: a file that grows meanwhile is refused.
    """
    limit = weights_limit() if limit is None else limit
    fd = open_regular(root.joinpath(*parts), within=root, hint=RESULTS_HINT)
    if fd is None:
        return False
    with os.fdopen(fd, "rb") as src:
        st = os.fstat(src.fileno())
        where = str(root.joinpath(*parts))
        check_copy_size(st, where, dest.parent, limit)
        with open(dest, "xb") as out:
            left = st.st_size
            while left > 0:
                block = src.read(min(left, 1 << 20))
                if not block:
                    break
                out.write(block)
                left -= len(block)
            if src.read(1):
                raise InputError(where, "grew while it was copied", hint="export when no run is writing to it")
    return True


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InputError(where, f"is not JSON ({exc.__class__.__name__})", hint="export a results directory written by harness") from None


def _plain(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


@dataclass
class Results:
    """A results directory read strictly: its run and the records of that run, in run order."""

    root: Path
    manifest: RunManifest | None
    records: list[ResultRecord]
    warnings: list[str] = field(default_factory=list)


def read_results(path: str | Path) -> Results:
    """``run.json`` and every ``<cell>/record.json`` of ``path``, none of them through a link."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(str(root), "is not a results directory" if root.exists() else "not found",
                         hint="pass the --out directory of a harness run or matrix")
    root = root.resolve()
    text = read_text_no_follow(root, record.RUN_FILE)
    manifest = RunManifest.from_json(_json(text, str(root / record.RUN_FILE)), str(root / record.RUN_FILE)) if text else None
    found: list[ResultRecord] = []
    with os.scandir(root) as entries:
        names = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))
    for name in names:
        text = read_text_no_follow(root, name, record.RECORD_FILE)
        if text is None:
            continue
        where = str(root / name / record.RECORD_FILE)
        rec = ResultRecord.from_json(_json(text, where), where)
        if rec.cell != name:
            raise InputError(where, f"records cell {rec.cell!r}, but lies in directory {name!r}",
                             hint="export a results directory written by harness (records are not moved between cells)")
        found.append(rec)
    if not found and manifest is None:
        raise InputError(str(root), "holds no record.json files", hint="pass the --out directory of a harness run or matrix")
    warnings = []
    if manifest is not None:
        other = [r for r in found if r.run_id is not None and r.run_id != manifest.run_id]
        if other:
            warnings.append(f"ignored {len(other)} record(s) of another run: {', '.join(r.cell for r in other)}")
            found = [r for r in found if r not in other]
        rank = {c: i for i, c in enumerate(manifest.cells)}
        found.sort(key=lambda r: (rank.get(r.cell, len(rank)), r.started_at or "", r.cell))
    else:
        found.sort(key=lambda r: (r.started_at or "", r.cell))
    return Results(root, manifest, found, warnings)


# --------------------------------------------------------------------------- pure: which cell, what to write


def pick_cell(records: list[ResultRecord], wanted: str | None, where: str) -> ResultRecord:
    """``--cell NAME`` when given (it must have run ok), else the first ok cell in run order. Band members
    are the band's, never cells of the table: they come first in a run that measured a band after its
    cells (run.json lists them first), so the default skips them; ``--cell band-seed-1`` still names one."""
    if wanted is not None:
        rec = next((r for r in records if r.cell == wanted), None)
        if rec is None:
            raise InputError(where, f"has no cell {wanted!r}", hint=f"cells: {', '.join(r.cell for r in records) or 'none'}")
        if not rec.ok:
            why = f": {rec.error.message}" if rec.error and rec.error.message else ""
            raise InputError(where, f"cell {wanted} is {rec.status.value}{why.splitlines()[0] if why else ''}",
                             hint="export a cell that ran ok")
        return rec
    ok = [r for r in records if r.ok and not r.band]
    if not ok:
        states = ", ".join(f"{r.cell} {r.status.value}" for r in records if not r.band) or "no records"
        raise InputError(where, f"has no cell that ran ok ({states})", hint="rerun it, then export")
    return ok[0]


def _metric_map(values: Any) -> Any:
    """Per-target numbers as trial_info.yaml holds them; an aggregate (target ``*``) as one number."""
    if not isinstance(values, Mapping):
        return None
    clean = {str(k): float(v) for k, v in values.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}  # NaN is no recorded value
    if not clean:
        return None
    if set(clean) == {AGGREGATE}:
        return clean[AGGREGATE]
    return clean


def environment_of(rec: ResultRecord) -> dict[str, Any]:
    """The environment the retrain ran in, as trial_info.yaml's ``environment`` records it."""
    env = rec.env.to_dict()
    out = {k: env.get(k) for k in ENV_KEYS if env.get(k) is not None}
    out["backend"] = rec.backend
    if rec.image is not None:
        out["image"] = rec.image.tag or rec.image.id
        out["image_id"] = rec.image.id
    return out


def trial_info(rec: ResultRecord, results: Path, now: str) -> dict[str, Any]:
    """The new trial_info.yaml: the retrained metrics, digests and environment of ``rec`` (pure)."""
    retrained = rec.retrained
    recorded = rec.recorded or {}
    info: dict[str, Any] = {}
    if isinstance(recorded.get("number"), int):
        info["number"] = recorded["number"]
    if isinstance(retrained.get("val_loss"), (int, float)):
        info["value"] = float(retrained["val_loss"])
    info["params"] = dict(recorded.get("params") or {})
    val = retrained.get("val") if isinstance(retrained.get("val"), Mapping) else {}
    for fam in ("r2", "mse", "mae"):
        m = _metric_map(val.get(fam))
        if m is not None:
            info[fam] = m
    attrs: dict[str, Any] = {}
    test = retrained.get("test") if isinstance(retrained.get("test"), Mapping) else {}
    for fam in ("r2", "mse", "mae"):
        m = _metric_map(test.get(fam))
        if m is not None:
            attrs[f"test_{fam}"] = m
    if isinstance(retrained.get("best_epoch"), int):
        attrs["best_epoch"] = retrained["best_epoch"]
    if attrs:
        info["user_attrs"] = attrs
    if rec.data_sha256:
        info["data_sha256"] = rec.data_sha256
    # A trainer with its own digest convention is compared by its own digest (docs/your-own-project.md, "Weights.").
    own = rec.user_weights.sha256 if rec.user_weights else None
    if own or rec.weights_sha256:
        info["weights_sha256"] = own or rec.weights_sha256
    info["environment"] = environment_of(rec)
    info["exported_from"] = {"results": str(results), "cell": rec.cell, "run_id": rec.run_id,
                             "harness_version": rec.harness_version, "exported_at": now,
                             "exported_by": f"harness {__version__}"}
    return info


def _host_path(path: str | None, src_bundle: Path, host_trainer: list[str] | None) -> Path | None:
    """A path as the worker saw it, as a host path (containers see /harness/bundle and /harness/trainer/N)."""
    if not path:
        return None
    p = PurePosixPath(path)
    if p == PurePosixPath(CONTAINER_BUNDLE) or p.is_relative_to(CONTAINER_BUNDLE):
        return src_bundle / p.relative_to(CONTAINER_BUNDLE)
    if p.is_relative_to(CONTAINER_TRAINER):
        parts = p.relative_to(CONTAINER_TRAINER).parts
        if parts and parts[0].isdigit() and host_trainer and int(parts[0]) < len(host_trainer):
            return Path(host_trainer[int(parts[0])]).joinpath(*parts[1:])
        return None
    return Path(path)


def _relocated(path: Path, src_bundle: Path) -> str:
    """How the new bundle names ``path``: relative when it lies in the (copied) source bundle, else absolute."""
    if path == src_bundle or path.is_relative_to(src_bundle):
        rel = path.relative_to(src_bundle).as_posix()
        return rel or "."
    return str(path)


def export_config(cfg: Mapping[str, Any], src_bundle: Path, data: Path | None, data_sha256: str | None,
                  trainer: tuple[str, list[Path]] | None) -> dict[str, Any]:
    """The new config.yaml: the source's, with the data and trainer the run used, placed for the new bundle (pure)."""
    out = json.loads(json.dumps(cfg))  # a deep copy of plain YAML data
    if data is not None:
        section = dict(out.get("data") or {})
        section["path"] = _relocated(data, src_bundle)
        if data_sha256:
            section["sha256"] = data_sha256
        out["data"] = section
    if trainer is not None:
        entry, dirs = trainer
        section = dict(out.get("trainer") or {})
        section["entrypoint"] = entry
        placed = [_relocated(d, src_bundle) for d in dirs]
        if placed:
            section["code_dir"] = placed[0] if len(placed) == 1 else placed
        else:
            section.pop("code_dir", None)
        out["trainer"] = section
    return out


# --------------------------------------------------------------------------- effects


@dataclass
class Exported:
    out: Path
    cell: str
    files: list[str]
    scaler: str  # where target_scaler.joblib came from
    data_dir: str | None  # the rerun needs --data-dir this
    warnings: list[str]


def _source_paths(rec: ResultRecord, cell_dir: Path) -> tuple[Path, Path | None, Path | None, list[str] | None]:
    """The source bundle, data, data directory and trainer folders of the run, as host paths."""
    hp = rec.host_paths or {}
    spec = rec.spec or {}
    where = str(cell_dir / record.RECORD_FILE)
    if rec.backend == "local":
        out_dir = spec.get("out_dir")
        if not isinstance(out_dir, str) or Path(out_dir).resolve() != cell_dir:
            raise InputError(where, f"says the run wrote its results to {out_dir!r}, not {cell_dir}",
                             hint="export the results directory the run wrote (records are not moved or edited)")
        bundle, data, data_dir = spec.get("bundle_dir"), spec.get("data_path"), spec.get("data_dir")
        trainer_path = spec.get("trainer_path")
    else:
        bundle, data, data_dir = hp.get("bundle"), hp.get("data"), hp.get("data_dir")
        trainer_path = hp.get("trainer_path")
    for key, value in (("bundle", bundle), ("data", data), ("data_dir", data_dir)):
        if value is not None and (not isinstance(value, str) or not os.path.isabs(value)):
            raise InputError(where, f"names {key} {value!r}, not an absolute path", hint="export a results directory written by harness")
    if not isinstance(bundle, str):
        raise InputError(where, "does not name the bundle it ran", hint="export a results directory written by harness")
    if trainer_path is not None and not (isinstance(trainer_path, list) and all(isinstance(t, str) for t in trainer_path)):
        raise InputError(where, "names trainer folders that are not a list of paths")
    return (Path(bundle), Path(data) if data else None, Path(data_dir) if data_dir else None, trainer_path)


def _check_out(out: Path, force: bool, keep: dict[str, Path]) -> None:
    """``-o`` may be new or an empty directory (any directory with --force), never a link, and never
    overlap what the export reads: replacing it must not remove the run, its bundle, data or code."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise InputError(str(out), "is a symbolic link; not written through", hint="pass a directory path for -o")
        if not stat.S_ISDIR(st.st_mode):
            raise InputError(str(out), "exists and is not a directory", hint="pass a new directory for -o")
        if any(out.iterdir()) and not force:
            raise InputError(str(out), "is not empty", hint="pass --force to replace it, or another -o")
    real = out.resolve()
    for what, there in keep.items():
        there = there.resolve()
        if real == there or real.is_relative_to(there) or there.is_relative_to(real):
            raise InputError(str(out), f"overlaps {what} ({there})", hint="export to a directory of its own")


def _run_bundle(res: Results, rec: ResultRecord, named: Path, where: str) -> tuple[Path, Mapping[str, Any]]:
    """The bundle the run ran, as its ``run.json`` names it, and its parsed config.yaml: only while that
    config still has the digest the record carries, never reached through a link, and only when the
    record names the same bundle (a record is the worker's; run.json is the CLI's)."""
    run_file = str(res.root / record.RUN_FILE)
    hint = "export a results directory written by harness"
    if res.manifest is None:
        raise InputError(run_file, "not found; export reads the bundle the run's own run.json names", hint=hint)
    if rec.run_id != res.manifest.run_id:
        raise InputError(where, f"is of run {rec.run_id!r}, not of run {res.manifest.run_id} that {record.RUN_FILE} "
                                "describes", hint=hint)
    bundle = Path(res.manifest.bundle)
    if not bundle.is_absolute():
        raise InputError(run_file, f"names bundle {str(bundle)!r}, not an absolute path", hint=hint)
    if os.path.normpath(named) != os.path.normpath(bundle):
        raise InputError(where, f"names bundle {named}, but {record.RUN_FILE} says the run ran {bundle}",
                         hint="export a results directory written by harness (records are not moved or edited)")
    real = os.path.realpath(bundle)
    if real != os.path.normpath(bundle):
        raise InputError(str(bundle), f"is reached through a symbolic link (it resolves to {real}); export follows "
                                      "no links", hint="export a run of the bundle by its real path")
    gone = "export on the machine where the run was made, with its bundle in place"
    fd = open_regular(bundle / CONFIG, hint=gone)
    if fd is None:
        raise InputError(str(bundle), f"the bundle cell {rec.cell} ran has no {CONFIG} any more", hint=gone)
    with os.fdopen(fd, "rb") as fh:
        raw = fh.read(MAX_YAML_BYTES + 1)
    if len(raw) > MAX_YAML_BYTES:
        raise InputError(str(bundle / CONFIG), f"is over {MAX_YAML_BYTES >> 20} MB", hint="bundle files are small")
    try:
        cfg = parse_yaml_text(raw.decode("utf-8"), str(bundle / CONFIG))
    except UnicodeDecodeError:
        raise InputError(str(bundle / CONFIG), "is not UTF-8 text", hint=gone) from None
    if not isinstance(cfg, Mapping):
        raise InputError(str(bundle / CONFIG), "is not a mapping")
    want = (rec.bundle or {}).get("config_sha256")
    if not isinstance(want, str):
        raise InputError(where, "records no config digest (bundle.config_sha256) to check the bundle against",
                         hint="run the cell again with this harness, then export that run")
    got = config_digest(cfg)
    if got != want:
        raise InputError(str(bundle / CONFIG), f"has changed since the run (config digest {got[:12]}…, the run's "
                                               f"{want[:12]}…)", hint="restore the bundle the run used, or run it "
                                                                      "again and export that run")
    return bundle, cfg


def _data_digest(path: Path) -> str:
    """The digest of the data a record names (as :func:`harness.worker.data.sha256_path`): a regular file
    or a directory, reached without a link. A device, FIFO or socket is refused, never read."""
    from .worker.data import sha256_path

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise InputError(str(path), "the data the run trained on is gone", hint="restore it, then export") from None
    real = os.path.realpath(path)
    if real != os.path.normpath(path):
        raise InputError(str(path), f"is reached through a symbolic link (it resolves to {real}); export follows no "
                                    "links", hint="export a results directory written by harness")
    if stat.S_ISDIR(mode):
        return sha256_path(path)
    fd = open_regular(path, hint="a run trains on a regular file or a directory; export a results directory "
                                 "written by harness")
    if fd is None:
        raise InputError(str(path), "the data the run trained on is gone", hint="restore it, then export")
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as fh:
        hash_into(h, fh)  # the file checked, not whatever is at its name by now
    return h.hexdigest()


def _copy_entry(path: Path, target: Path, rel: str, skipped: list[str]) -> bool:
    """Copy a regular file, or a directory of them, never through a link; anything else is named in ``skipped``."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(mode):
        target.mkdir()
        with os.scandir(path) as entries:
            names = sorted(e.name for e in entries if e.name != "__pycache__")
        for name in names:
            _copy_entry(path / name, target / name, f"{rel}/{name}", skipped)
        shutil.copystat(path, target, follow_symlinks=False)
        return True
    if not stat.S_ISREG(mode):
        skipped.append(f"{rel} ({kind_of(mode)})")
        return False
    fd = open_regular(path, hint="export again once nothing changes the bundle")  # a file a moment ago, a link now?
    if fd is None:
        return False
    with os.fdopen(fd, "rb") as src, open(target, "xb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    shutil.copystat(path, target, follow_symlinks=False)
    return True


def _copy_source_files(src: Path, dest: Path, skipped: list[str]) -> list[str]:
    """Everything of the source bundle but what export writes itself (config, trial info, scaler, weights):
    regular files and directories, never through a link; what is neither is named in ``skipped``."""
    copied = []
    with os.scandir(src) as entries:
        names = sorted(e.name for e in entries)
    for name in names:
        if name in MANAGED or name == "__pycache__":
            continue
        if _copy_entry(src / name, dest / name, name, skipped):
            copied.append(name + ("/" if (dest / name).is_dir() else ""))
    return copied


def _weights_digest(path: Path) -> str:
    import torch

    from .worker.model import state_sha256

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure: not weights the run wrote
        raise InputError(str(path), f"cannot be loaded as weights ({exc.__class__.__name__})") from None
    from .worker.checkpoint import tensors_of

    state, _ = tensors_of(state)  # a trainer's own checkpoint (its model sub-mapping), as the worker digested it
    if not state:
        raise InputError(str(path), "does not hold a state_dict")
    return state_sha256(state)


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def export(results_dir: str | Path, out: str | Path, cell: str | None = None, *, force: bool = False) -> Exported:
    """Write one ok cell of ``results_dir`` as a new optuna_best directory ``out``."""
    res = read_results(results_dir)
    rec = pick_cell(res.records, cell, str(res.root))
    cell_dir = res.root / rec.cell
    where = str(cell_dir / record.RECORD_FILE)
    if not _plain(rec.cell):
        raise InputError(where, f"cell {rec.cell!r} is not a plain directory name")
    named, data, data_dir, host_trainer = _source_paths(rec, cell_dir)
    src_bundle, cfg = _run_bundle(res, rec, named, where)
    if data_dir is not None and (os.path.realpath(data_dir) != os.path.normpath(data_dir) or not data_dir.is_dir()):
        raise InputError(str(data_dir), "is not a directory reached without a link (the run's --data-dir)",
                         hint="export a results directory written by harness")
    out = Path(out).expanduser().absolute()
    keep = {"the bundle the run came from": src_bundle, "the results directory": res.root}
    keep.update({f"the data {p}": p for p in (data, data_dir) if p is not None})
    keep.update({f"the trainer folder {t}": Path(t) for t in host_trainer or []})
    _check_out(out, force, keep)
    if data is not None and rec.data_sha256:
        now = _data_digest(data)
        if now != rec.data_sha256:
            raise InputError(str(data), f"hashes to {now[:12]}…, but the run trained on {rec.data_sha256[:12]}…",
                             hint="restore the data the run used, then export")
    trainer = None
    if rec.trainer:
        entry = rec.trainer.get("entrypoint")
        seen = rec.trainer.get("code_dirs") or []
        dirs = ([Path(d) if isinstance(d, str) else None for d in seen] if rec.backend == "local"
                else [_host_path(d, src_bundle, host_trainer) if isinstance(d, str) else None for d in seen])
        if not isinstance(entry, str) or any(d is None for d in dirs):
            raise InputError(where, "names a trainer whose folders cannot be found on this host")
        trainer = (entry, [Path(d).resolve() for d in dirs if d is not None])
    new_cfg = export_config(cfg, src_bundle, data.resolve() if data else None, rec.data_sha256, trainer)
    seed_key = (rec.spec or {}).get("seed_key")
    if trainer is not None and isinstance(seed_key, str):  # --seed-key: the new bundle says it itself
        new_cfg["trainer"]["seed_key"] = seed_key
    trainer_cwd = (rec.spec or {}).get("trainer_cwd")
    if trainer is not None and trainer_cwd in ("bundle", "project"):  # where it ran: the new bundle says it too
        new_cfg["trainer"]["cwd"] = trainer_cwd
        if trainer_cwd == "project" and data is not None:  # a relative data.path would be the project's
            new_cfg["data"]["path"] = str(data.resolve())
    info = trial_info(rec, res.root, now_utc())

    warnings = list(res.warnings)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        skipped: list[str] = []
        files = _copy_source_files(src_bundle, tmp, skipped)
        atomic_write_text(tmp / CONFIG, yaml.safe_dump(new_cfg, sort_keys=False))
        atomic_write_text(tmp / TRIAL_INFO, yaml.safe_dump(info, sort_keys=False))
        files[:0] = [CONFIG, TRIAL_INFO]
        used = (rec.scaler or {}).get("used")
        if used != "none" and _copy_entry(src_bundle / SCALER, tmp / SCALER, SCALER, skipped):
            scaler = f"the bundle's ({src_bundle / SCALER})"
        elif used == "refit":  # a pickle the run wrote (in its container, or by its trainer) is data, never code here
            scaler = (f"not exported: the run refitted it ({rec.cell}/{SCALER}), and what a run writes is data, never "
                      "code the host loads; a run of the export refits it on the same train split")
        else:
            scaler = "none"
        if skipped:
            warnings.append(f"not copied from the source bundle {src_bundle}: {', '.join(skipped)} (export copies "
                            "regular files and directories only, never through a link)")
        if (tmp / SCALER).is_file():
            files.append(SCALER)
        (tmp / WEIGHTS_DIR).mkdir()
        for rel, digest in ((CellPaths.BEST, rec.weights_sha256), (CellPaths.LAST, rec.last_weights_sha256)):
            dest = tmp / rel  # the bundle's weights/ as the cell's: weights/best.pt, weights/last.pt
            if not copy_no_follow(res.root, (rec.cell, *PurePosixPath(rel).parts), dest):
                if rel == CellPaths.BEST and rec.weights_sha256:
                    raise InputError(str(cell_dir / rel), "is missing, but the record has its digest",
                                     hint="export a results directory written by harness")
                continue
            got = _weights_digest(dest)
            if digest and got != digest:
                raise InputError(str(cell_dir / rel), f"holds weights with digest {got[:12]}…, but the record "
                                                      f"says {digest[:12]}…",
                                 hint="the weights were changed after the run; rerun the cell")
            files.append(rel)
        if not any(f.startswith(WEIGHTS_DIR + "/") for f in files):
            (tmp / WEIGHTS_DIR).rmdir()
            warnings.append(f"cell {rec.cell} left no weights in its output: the exported bundle has no "
                            f"{WEIGHTS_DIR}/ (the source bundle's are not copied: they are not this cell's)")
        # The new bundle must load as any bundle does (data.path, trainer folders).
        load_bundle(tmp, data_dir=str(data_dir) if data_dir else None)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Exported(out=out, cell=rec.cell, files=files, scaler=scaler,
                    data_dir=str(data_dir) if data_dir else None, warnings=warnings)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished bundle to ``out``; a replaced one (--force) is removed only afterwards."""
    os.chmod(tmp, 0o755)
    old = None
    if os.path.lexists(out):
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

