"""`harness snapshot ...` and `harness rerun`: archive a run's environment, check it, rerun it offline.

Wired into the main CLI by ``harness.cli`` through :func:`register`::

    harness snapshot OPTUNA_BEST --cell CELL -o FILE [--results DIR] [--no-data] [--sign KEY]
    harness snapshot verify FILE [--allowed-signers FILE [--identity PRINCIPAL]]
    harness snapshot rebuild FILE --wheelhouse DIR [--base-image IMAGE] [--allowed-signers FILE]
    harness rerun FILE [--out DIR] [--json F] [--markdown F] [--tol ...] [--data FILE] [--allowed-signers FILE]

Each command reads as its steps; the container format lives in :mod:`harness.snapshot`.
Handlers return an exit code and raise :class:`~harness.errors.HarnessError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import re
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import __version__, signing
from .. import snapshot as snap
from ..errors import EXIT_OK, EXIT_RUN_FAILED, InputError, RunFailed, UsageError
from ..options import ISA_LEVELS
from ..record import ResultRecord
from ..report import console as _console
from .common import image_options, report_options, tolerances, verdict_exit


def sha256_path(path: Any) -> str:
    """:func:`harness.worker.data.sha256_path`, imported when used: it brings numpy, which ``--help`` never needs."""
    from ..worker.data import sha256_path as digest

    return digest(path)


ACTIONS = ("verify", "rebuild")


# ----------------------------------------------------------------------------- wiring


def register(subparsers: Any) -> None:
    """Add ``snapshot`` and ``rerun`` to the main CLI's subparsers."""
    from .common import add_data_dir, add_docker

    p = subparsers.add_parser(
        "snapshot", help="archive a run's image, recipe, bundle, data and records in one file (or verify/rebuild one)",
        description="harness snapshot OPTUNA_BEST --cell CELL -o FILE | snapshot verify FILE | "
                    "snapshot rebuild FILE --wheelhouse DIR",
    )
    p.add_argument("target", metavar="OPTUNA_BEST|verify|rebuild", help="the bundle to snapshot, or an action")
    p.add_argument("archive", nargs="?", metavar="FILE", help="verify/rebuild: the snapshot file")
    p.add_argument("--cell", help="the matrix cell whose image and run are archived")
    p.add_argument("-o", "--output", metavar="FILE", help="the snapshot to write, e.g. run-2026-11.harness.tar")
    p.add_argument("--results", metavar="DIR", help="archive the run recorded in DIR/<cell>/record.json instead of running now")
    p.add_argument("--no-data", action="store_true", help="archive only the data file's sha256 and path, not the file")
    p.add_argument("--data", help="dataset file (overrides config.yaml data.path)")
    add_data_dir(p)
    p.add_argument("--out", help="results directory of the run made now (default: harness-results/<bundle>-<time>)")
    p.add_argument("--keep", action="store_true", help="rebuild: keep the rebuilt image in the engine")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--sign", metavar="KEY", help="sign the manifest with this SSH key (ssh-keygen -Y sign, "
                                                 f"namespace {signing.NAMESPACE})")
    _signature_options(p)
    add_docker(p)
    p.set_defaults(func=cmd_snapshot)

    r = subparsers.add_parser("rerun", help="verify a snapshot, load its image, rerun the retrain offline and compare")
    r.add_argument("archive", metavar="SNAPSHOT", help="a file written by `harness snapshot`")
    r.add_argument("--data", help="the data file (or directory), for snapshots made with --no-data (its sha256 is checked)")
    r.add_argument("--data-dir", metavar="DIR",
                   help="for --no-data snapshots of a run with --data-dir: the directory around the data (its digest is checked)")
    r.add_argument("--out", help="results directory (default: harness-results/rerun-<cell>-<time>)")
    r.add_argument("--json", dest="json_out", metavar="FILE", help="write both records plus the comparison as JSON")
    r.add_argument("--markdown", metavar="FILE", help="write a Markdown table")
    r.add_argument("--tol", action="append", default=[], metavar="METRIC=abs:X[,rel:Y]",
                   help="tolerance for val_loss, r2, mse or mae (repeatable), e.g. --tol r2=abs:1e-4")
    r.add_argument("--tolerances", metavar="FILE", help="YAML file of tolerances: {r2: {abs: 1e-4}, mse: {rel: 0.01}}")
    r.add_argument("--gpus", default="all", help="GPUs to request when the archived run used CUDA: all, none, or ids")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    _signature_options(r)
    r.set_defaults(func=cmd_rerun)


def _signature_options(p: Any) -> None:
    p.add_argument("--allowed-signers", metavar="FILE",
                   help="verify/rebuild/rerun: require a signature by a key in this OpenSSH allowed_signers file")
    p.add_argument("--identity", metavar="PRINCIPAL",
                   help="with --allowed-signers: require this principal (default: the one the file lists for the signing key)")


def _check_signature_flags(args: argparse.Namespace, writing: bool) -> None:
    if writing and getattr(args, "allowed_signers", None):
        raise UsageError("--allowed-signers is for verify, rebuild and rerun; sign a new snapshot with --sign KEY")
    if not writing and getattr(args, "sign", None):
        raise UsageError("--sign is for writing a snapshot (harness snapshot OPTUNA_BEST --cell C -o F --sign KEY)")
    if args.identity and not args.allowed_signers:
        raise UsageError("--identity needs --allowed-signers FILE (the keys trusted to sign)")
    if args.allowed_signers and not Path(args.allowed_signers).is_file():
        raise InputError(args.allowed_signers, "not found", hint="pass an OpenSSH allowed_signers file")


def _signature(args: argparse.Namespace, v: snap.Verified) -> str:
    """Check the signature when --allowed-signers asks for it; the line that says what was found."""
    if args.allowed_signers:
        principal, good = snap.check_signature(v, args.allowed_signers, args.identity)
        key = good.split(" with ", 1)[1] if " with " in good else ""
        return f"signature: good, signed by {principal}" + (f" with {key}" if key else "")
    if v.signature is None:
        return "signature: unsigned"
    return "signature: present, not checked (pass --allowed-signers FILE)"


def cmd_snapshot(args: argparse.Namespace) -> int:
    _check_signature_flags(args, writing=not (args.target in ACTIONS and args.archive))
    if args.target in ACTIONS and args.archive:
        return {"verify": cmd_verify, "rebuild": cmd_rebuild}[args.target](args)
    if args.target in ACTIONS and not Path(args.target).is_dir():
        raise UsageError(f"harness snapshot {args.target} needs the snapshot FILE",
                         hint=f"e.g. `harness snapshot {args.target} run.harness.tar`")
    if args.archive:
        raise UsageError(f"unexpected argument {args.archive!r}",
                         hint="harness snapshot OPTUNA_BEST --cell CELL -o FILE, or snapshot verify|rebuild FILE")
    return cmd_create(args)


def _say(text: str) -> None:
    from ..report import console as _console

    _console(stderr=True).print(f"[dim]{text}[/dim]")


# ----------------------------------------------------------------------------- snapshot


def _archived_run(args: argparse.Namespace, plan: Any, backend: Any, bundle: Any, tol: Any) -> ResultRecord:
    """The record to archive: from --results DIR, or from running the cell now."""
    from .. import record, runner
    from ..plan import Job

    cell = plan.cells[0]
    if args.results:
        path = Path(args.results) / args.cell / record.RECORD_FILE
        if not path.is_file():
            raise InputError(str(path), "not found",
                             hint=f"pass the results directory of a run of cell {args.cell}, or drop --results to run now")
        rec = record.read(path)
        if not rec.ok:
            raise InputError(str(path), f"records a {rec.status.value} run ({rec.error.message if rec.error else ''})",
                             hint="archive a run that succeeded")
        build = plan.builds[args.cell]
        found = backend.engine.image(build.tag)
        if found is None:
            raise InputError(f"cell {args.cell}", f"its image {build.tag} is not in the engine",
                             hint=f"build it with `harness images build --cells {args.cell}`, or drop --results")
        ran = rec.image.id if rec.image else None
        if ran != found.id:
            raise InputError(str(path), f"was run in image {ran}, but cell {args.cell}'s image {build.tag} is {found.id}",
                             hint="snapshot a run made with this image, or drop --results to run the cell now")
        return rec
    out = runner.results_dir(args.out, bundle.root)
    runner.check_writable(out)
    lock = runner.ResultsLock(out)  # as `run` does: one harness run writes a results directory at a time
    try:
        job = Job(bundle_dir=bundle.root, data_path=bundle.data.resolved, data_dir=bundle.data.dir,
                  results_dir=str(out), run_id=runner.new_run_id())
        runner.execute_plan(plan, backend, job, report_options(args), tol, progress_enabled=not args.no_progress)
        rec = record.read(job.cell_dir(cell) / record.RECORD_FILE)
    finally:
        lock.release()
    if not rec.ok:
        raise RunFailed(f"cell {args.cell} {rec.status.value}, nothing was archived: {rec.error.message if rec.error else ''}")
    return rec


def _recipe_matches(build: Any, image: Any, sources_tar: bytes) -> bool:
    """Whether this checkout's Dockerfile, build args, wheels and lock, with the harness source
    taken from the image itself, hash to the image's recorded input hash."""
    from ..images import build as imagebuild

    files = snap.tar_bytes_files(sources_tar)
    digest = imagebuild.input_hash(build.dockerfile.encode(), build.buildargs, build.wheels, files, build.lock)
    return digest == (image.labels or {}).get(imagebuild.LABEL_HASH)


def _tree_size(path: Path) -> int:
    if not path.is_dir():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _data_entry(bundle: Any, rec: ResultRecord, data_path: Path, data_dir: Path | None, data_sha: str,
                included: bool) -> dict[str, Any]:
    """The manifest's ``data``: the data (a file or a directory) and, with --data-dir, the directory around it."""
    entry: dict[str, Any] = {"file": data_path.name, "path": str(data_path), "config_path": bundle.data.path,
                             "sha256": data_sha, "size": _tree_size(data_dir or data_path), "included": included,
                             "kind": "directory" if data_path.is_dir() else "file"}
    if data_dir is not None:
        dir_sha = sha256_path(data_dir)
        ran = (rec.data or {}).get("dir_sha256")
        if ran and ran != dir_sha:
            raise InputError(str(data_dir), f"hashes to {dir_sha[:12]}…, but the archived run's --data-dir hashed to "
                                            f"{str(ran)[:12]}…", hint="point --data-dir at the directory that run used")
        entry["dir"] = {"name": data_dir.name, "sha256": dir_sha,
                        "in_dir": data_path.relative_to(data_dir).as_posix()}
    return entry


def cmd_create(args: argparse.Namespace) -> int:
    """Steps: check input -> resolve the cell -> the run (now or from --results) -> gather -> write."""
    if not args.cell:
        raise UsageError("harness snapshot needs --cell CELL (the matrix cell to archive)",
                         hint="e.g. --cell cpu-torch2.13; `harness images list` shows the cells")
    if not args.output:
        raise UsageError("harness snapshot needs -o FILE (where to write the archive)", hint="e.g. -o run.harness.tar")
    output = Path(args.output)
    if output.is_dir():
        raise InputError(str(output), "is a directory", hint="pass a file name, e.g. run.harness.tar")
    if args.sign:  # before the run: a missing key or tool is found in a second, not after the training
        if not Path(args.sign).is_file():
            raise InputError(args.sign, "not found", hint="pass an SSH private key, e.g. ~/.ssh/id_ed25519")
        signing.require_tool()
    from .. import runner
    from ..options import RunOptions
    from ..plan import make_plan

    tol = tolerances(args)
    opts = RunOptions(bundle=args.target, backend="docker", cells=(args.cell,), cells_flag="--cell",
                      images=image_options(args),
                      data=args.data, data_dir=args.data_dir, out=args.out, progress=not args.no_progress)
    bundle, _ = runner.load_and_check(opts)
    if bundle.data.resolved is None:
        raise InputError("config.yaml", "has no data.path, so there is no data to archive with the snapshot",
                         hint="add data.path (your trainer may keep reading its own key)")
    for code_dir in (bundle.trainer.code_dirs if bundle.trainer else ()):  # every folder, not only the first
        if not Path(code_dir).resolve().is_relative_to(Path(bundle.root)):
            raise InputError(str(bundle.root), f"its trainer code {code_dir} lies outside the bundle and would not be archived",
                             hint="move the trainer's code_dir into the optuna_best directory")
    plan = make_plan(opts)
    (cell,) = plan.cells
    if cell.skip_reason:
        raise InputError(f"cell {args.cell}", f"cannot run on this host: {cell.skip_reason}")
    if cell.name in plan.blocked:
        raise plan.blocked[cell.name]
    build = plan.builds[args.cell]
    backend = runner.make_backend(plan)
    rec = _archived_run(args, plan, backend, bundle, tol)
    t0 = time.perf_counter()
    engine = backend.engine
    image_id = rec.image.id if rec.image else ""
    image = engine.image(image_id)
    if image is None:
        raise InputError(f"cell {args.cell}", f"the image it ran in ({image_id[:19]}) is no longer in the engine",
                         hint="run the cell again (drop --results) and snapshot that run")
    tag = rec.image.tag if rec.image and rec.image.tag in image.tags else (image.tags[0] if image.tags else None)
    data_path = Path(bundle.data.resolved)
    data_dir = Path(bundle.data.dir) if bundle.data.dir else None
    data_sha = sha256_path(data_path)  # a file's bytes, or a directory's sorted walk
    if rec.data_sha256 and rec.data_sha256 != data_sha:
        raise InputError(str(data_path), f"hashes to {data_sha[:12]}…, but the archived run trained on {rec.data_sha256[:12]}…",
                         hint="point --data at the file that run used")
    data_entry = _data_entry(bundle, rec, data_path, data_dir, data_sha, included=not args.no_data)
    sources_tar = snap.without_bytecode(engine.files(image_id, snap.IMAGE_SOURCES_PATH))
    recipe_ok = _recipe_matches(build, image, sources_tar)
    if not recipe_ok:
        _console(stderr=True).print(
            f"[yellow]! the Dockerfile/lock/build args of this checkout do not hash to image {tag}'s input hash; "
            "`snapshot rebuild` of this archive may differ[/yellow]")
    host = snap.host_facts()
    environment = {
        "env": rec.env.to_dict(), "determinism": rec.determinism, "image": rec.to_dict()["image"],
        "image_config": image.config,
        "spec": rec.spec, "host": host,
    }
    manifest = {
        "harness_version": __version__, "created": snap.now_utc(), "cell": args.cell,
        "cell_spec": asdict(build.cell),
        "image": {"id": image_id, "tag": tag, "size": image.size,
                  "repo_digests": list(image.repo_digests),
                  "input_hash": (image.labels or {}).get("org.harness.input-hash")},
        "build": {"recipe_matches_image": recipe_ok, "input_hash": build.input_hash},
        "bundle": {"name": Path(bundle.root).name},
        "data": data_entry,
        "record": {"cell": rec.cell, "weights_sha256": rec.weights_sha256, "status": rec.status.value,
                   "schema": rec.schema},
        "host": host,
    }
    _say(f"writing {output} (image {tag}, {snap.human(image.size)})")
    try:
        with snap.SnapshotWriter(output) as w:
            w.add_bytes(snap.RECORD, rec.to_json().encode())
            w.add_bytes(snap.ENVIRONMENT, json.dumps(environment, indent=2, sort_keys=True).encode())
            w.add_bytes(snap.DOCKERFILE, build.dockerfile.encode())
            w.add_bytes(snap.LOCK, build.lock.encode())
            w.add_bytes(snap.BUILDARGS, json.dumps(build.buildargs, indent=2, sort_keys=True).encode())
            w.add_bytes(snap.SOURCES, sources_tar)
            w.add_tree(snap.BUNDLE, bundle.root, Path(bundle.root).name)
            if not args.no_data and data_dir is not None:
                w.add_tree(snap.DATA_TREE, data_dir, data_dir.name)
            elif not args.no_data and data_path.is_dir():
                w.add_tree(snap.DATA_TREE, data_path, data_path.name)
            elif not args.no_data:
                w.add_file(snap.DATA, data_path)
            w.add_chunks(snap.IMAGE, engine.save(image_id, tag))
            w.finish(manifest, sign=(lambda message: signing.sign(message, args.sign)) if args.sign else None)
    except Exception as exc:  # the writer removed its partial file; say what failed in one line
        raise snap.snapshot_error(exc) from exc
    size = output.stat().st_size
    _console().print(f"snapshot {output}: {snap.human(size)}, {len(w.members) + 1} members, cell {args.cell}, "
                     f"image {image_id[:19]} ({tag}), written in {time.perf_counter() - t0:.1f}s"
                     + (f", signed with {args.sign}" if args.sign else ", unsigned"))
    return EXIT_OK


# ----------------------------------------------------------------------------- verify


def cmd_verify(args: argparse.Namespace) -> int:
    from rich import box
    from rich.table import Table

    from ..report import console as _console

    v = snap.verify(args.archive)
    signature = _signature(args, v)
    m = v.manifest
    out = _console()
    table = Table(box=box.SIMPLE_HEAD, title=f"{args.archive}: OK", title_justify="left")
    for col in ("member", "stored", "content", "sha256"):
        table.add_column(col, no_wrap=True, justify="right" if col in ("stored", "content") else "left")
    for e in v.members:
        table.add_row(e["name"], snap.human(e["size"]), snap.human(e.get("raw_size")), e["sha256"][:16] + "…")
    out.print(table)
    data = m.get("data") or {}
    out.print(f"{len(v.members) + 1} members, {snap.human(v.total_size)} stored, verified in {v.seconds:.1f}s")
    out.print(f"cell {m.get('cell')}, image {m['image']['id']} ({m['image'].get('tag')})")
    out.print(f"created {m.get('created')} by harness {m.get('harness_version')}; data "
              + ("included" if data.get("included") else f"not included (sha256 {str(data.get('sha256'))[:12]}…)"))
    out.print(signature)
    return EXIT_OK


# ----------------------------------------------------------------------------- rerun


def _data_for(args: argparse.Namespace, v: snap.Verified, tmp: Path) -> tuple[Path, Path | None]:
    """The data (and, for a run with --data-dir, the directory around it) the rerun trains on, checked."""
    data = v.manifest["data"]
    where = str(v.path)
    around = data.get("dir")
    tree = around is not None or data.get("kind") == "directory"
    if data.get("included"):
        if args.data or getattr(args, "data_dir", None):
            raise UsageError("--data and --data-dir are only for snapshots made with --no-data; this one holds its data")
        name = snap.plain_name(data["file"], where, "data.file")
        if not tree:
            return snap.extract_file(v, snap.DATA, tmp / "data" / name, root=tmp / "data"), None
        root = snap.extract_tree(v, snap.DATA_TREE, tmp / "data")
        if around is None:
            path, data_dir = root / name, None
        else:
            data_dir = root / snap.plain_name(around["name"], where, "data.dir.name")
            path = data_dir / snap.relative_path(around["in_dir"], where, "data.dir.in_dir")
        for p in (path, data_dir):
            if p is not None:
                snap.inside(p, root, where, f"member {snap.DATA_TREE}'s {p.relative_to(root)}")
        if not path.exists() or (data_dir is not None and not data_dir.is_dir()):
            raise InputError(where, f"member {snap.DATA_TREE} holds no {path.relative_to(root)}", hint=snap.ALTERED)
    else:
        path, data_dir = _given_data(args, data, around)
    _check_digest(path, data["sha256"], data.get("file"), "trained on")
    if data_dir is not None:
        _check_digest(data_dir, around["sha256"], around.get("name"), "ran with the --data-dir")
    return path, data_dir


def _given_data(args: argparse.Namespace, data: dict[str, Any], around: dict[str, Any] | None) -> tuple[Path, Path | None]:
    """``--data`` / ``--data-dir`` for a snapshot made with --no-data."""
    if around is not None:
        if not getattr(args, "data_dir", None):
            raise UsageError(f"this snapshot holds no data (made with --no-data) of a run with --data-dir; pass "
                             f"--data-dir DIR (the original was {Path(str(data.get('path'))).parent}, "
                             f"data {around.get('in_dir')} inside it)")
        data_dir = Path(args.data_dir)
        if not data_dir.is_dir():
            raise InputError(str(data_dir), "is not a directory", hint="pass the directory the run used with --data-dir")
        path = Path(args.data) if args.data else data_dir / around["in_dir"]
        if not path.exists():
            raise InputError(str(path), "not found", hint=f"the data lay at {around.get('in_dir')} inside --data-dir")
        return path.resolve(), data_dir.resolve()
    if not args.data:
        raise UsageError(f"this snapshot holds no data file (made with --no-data); pass --data FILE "
                         f"(the original was {data.get('path')}, sha256 {data.get('sha256')})")
    path = Path(args.data)
    if not path.exists():
        raise InputError(str(path), "not found", hint=f"pass the data file the run used ({data.get('file')})")
    return path.resolve(), None


def _check_digest(path: Path, want: Any, name: Any, what: str) -> None:
    got = sha256_path(path)
    if got != want:
        raise InputError(str(path), f"hashes to {got[:12]}…, the archived run {what} {str(want)[:12]}…",
                         hint=f"pass the original data ({name})")


def cmd_rerun(args: argparse.Namespace) -> int:
    """Open the archive once; everything the rerun uses is read from that open file (see :func:`_rerun`)."""
    with snap.Archive(args.archive) as archive:
        return _rerun(args, archive)


def _rerun(args: argparse.Namespace, archive: snap.Archive) -> int:
    """Steps: verify -> load the image -> extract bundle + data -> lock the results -> rerun offline -> compare.

    Every member (record, data, image, bundle) is read from ``archive``, the file that was
    verified, and checked against the verified manifest again as it is read: a file swapped
    at the path, or written in place, after the check is never what runs.
    """
    from .. import record, runner
    from ..backends.docker import DockerBackend
    from ..bundle import load_bundle
    from ..docker_engine import Engine
    from ..plan import Cell, Job, Plan
    from ..record import ImageInfo, ResultRecord

    tol = tolerances(args)
    _check_signature_flags(args, writing=False)
    v = snap.verify(archive)
    signature = _signature(args, v)  # a bad signature stops here, before anything is loaded or run
    m = v.manifest
    _say(f"{args.archive}: {len(v.members) + 1} members verified in {v.seconds:.1f}s; {signature}")
    # The archived record is read first: a snapshot of another record schema is refused before any load.
    archived = ResultRecord.from_json(snap.read_json_member(v, snap.RECORD), f"{args.archive}: {snap.RECORD}")
    tmp = Path(tempfile.mkdtemp(prefix="harness-rerun-"))
    lock = None
    try:
        data_path, data_dir = _data_for(args, v, tmp)
        engine = Engine.connect()
        loaded = snap.load_image(engine, v, m, _say)
        if loaded["loaded"]:
            _say(f"image {m['image']['id'][:19]} loaded in {loaded['seconds']:.1f}s")
        bundle_dir = snap.extract_bundle(v, m, tmp / "bundle")
        # the archived bundle still validates here
        load_bundle(bundle_dir, data_override=str(data_path), data_dir=str(data_dir) if data_dir else None)
        cell_name = m["cell"]
        archived.cell = f"{cell_name}@archived"
        spec = archived.spec or {}
        cell = Cell(name=f"{cell_name}@rerun", device=spec.get("device") or "cpu",
                    determinism=spec.get("determinism") or "strict", threads=spec.get("threads"),
                    tf32=bool(spec.get("tf32")), labels=dict(archived.labels),
                    isa=spec.get("isa") if spec.get("isa") in ISA_LEVELS else None)  # its container gets the same switches
        backend = DockerBackend(engine, {}, gpus=args.gpus)
        image = archived.image or ImageInfo(id=m["image"]["id"])
        backend.use_image(cell.name, dataclasses.replace(image, id=m["image"]["id"],
                                                         tag=m["image"].get("tag") or m["image"]["id"], snapshot=str(v.path)),
                          spec=dict(spec, cell=cell.name))
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = runner.results_dir(args.out, f"rerun-{cell_name}-{stamp}")
        if not args.out:
            out = (Path.cwd() / "harness-results" / f"rerun-{cell_name}-{stamp}").resolve()
        runner.check_writable(out)
        lock = runner.ResultsLock(out)  # as `run` does: one harness run writes a results directory at a time
        record.write(out / archived.cell / record.RECORD_FILE, archived)
        job = Job(bundle_dir=str(bundle_dir), data_path=str(data_path), data_dir=str(data_dir) if data_dir else None,
                  results_dir=str(out), trainer=spec.get("trainer"), trainer_cmd=spec.get("trainer_cmd"),
                  seed_key=spec.get("seed_key"), trainer_cwd=spec.get("trainer_cwd"),
                  run_id=runner.new_run_id())
        comparison = runner.execute_plan(Plan("docker", [cell]), backend, job, report_options(args), tol,
                                         progress_enabled=not args.no_progress, extra_records=[archived])
        rerun = record.read(job.cell_dir(cell) / record.RECORD_FILE)
        console = _console()
        if rerun.ok:
            same_w = rerun.weights_sha256 == archived.weights_sha256
            console.print(f"weights: {'bitwise identical to' if same_w else 'DIFFER from'} the archived run's "
                          f"({str(rerun.weights_sha256)[:16]}…)")
            now = dict(snap.host_facts(), cpu=rerun.env.cpu)
            then = dict(m.get("host") or {}, cpu=archived.env.cpu)
            diffs = snap.host_differences(then, now)
            console.print("host: differs from the archived run's: " + "; ".join(diffs) if diffs
                          else f"host: same as the archived run's ({now.get('hostname')}, {now.get('cpu')})")
        return verdict_exit(comparison)
    finally:
        if lock is not None:
            lock.release()
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- rebuild


_LOCK_LINE = re.compile(r"^([A-Za-z0-9_.-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)\s*$")


def lock_entries(lock: str) -> list[tuple[str, str, set[str]]]:
    """``(name, version, {sha256, ...})`` for every pinned line of a requirements lock."""
    out = []
    for line in lock.splitlines():
        mt = _LOCK_LINE.match(line.strip())
        if mt:
            out.append((mt.group(1), mt.group(2), set(re.findall(r"sha256:([0-9a-f]{64})", mt.group(3)))))
    return out


def _wheelhouse_for(args: argparse.Namespace, cell: Any) -> Path:
    from ..plan import wheelhouse_dirs

    values = image_options(args).wheelhouses
    if not values:
        raise UsageError("harness snapshot rebuild needs --wheelhouse DIR (the wheels the lock pins)")
    if len(values) == 1 and "=" not in values[0] and any(Path(values[0]).glob("*.whl")):
        return Path(values[0])
    dirs = wheelhouse_dirs(values, [cell])
    if cell.name not in dirs:
        raise InputError("--wheelhouse", f"holds no wheels for cell {cell.name}",
                         hint=f"pass a directory of wheels, DIR with a {cell.name}/ subdirectory, or {cell.name}=DIR")
    return dirs[cell.name]


def _archived_cell(v: snap.Verified) -> Any:
    """The manifest's ``cell_spec`` as a matrix cell; anything else is one InputError."""
    from ..images.matrix import ImageCell

    spec = v.manifest.get("cell_spec")
    if not isinstance(spec, dict):
        raise InputError(str(v.path), f"{snap.MANIFEST}: key cell_spec is missing", hint="a rebuild needs the archived cell")
    spec = dict(spec)
    arch = spec.get("arch") or ()
    spec["arch"] = tuple(arch) if isinstance(arch, (list, tuple)) else arch
    try:
        cell = ImageCell(**spec)
    except (TypeError, ValueError) as exc:
        raise InputError(str(v.path), f"{snap.MANIFEST}: key cell_spec is not a matrix cell ({snap._short(exc)})",
                         hint=snap.ALTERED) from None
    if not isinstance(cell.name, str) or not snap.CELL_NAME.match(cell.name):
        raise InputError(str(v.path), f"{snap.MANIFEST}: key cell_spec.name is not a matrix cell name ({cell.name!r})",
                         hint=snap.ALTERED)
    return cell


def cmd_rebuild(args: argparse.Namespace) -> int:
    """Open the archive once; the recipe, sources and image are read from that open file (see :func:`_rebuild`)."""
    with snap.Archive(args.archive) as archive:
        return _rebuild(args, archive)


def _rebuild(args: argparse.Namespace, archive: snap.Archive) -> int:
    """Rebuild the archived image offline from its recipe and compare the installed packages."""
    from ..docker_engine import Engine
    from ..errors import BaseImageMissing
    from ..images import build as imagebuild

    t0 = time.perf_counter()
    v = snap.verify(archive)
    _say(_signature(args, v))
    m = v.manifest
    cell = _archived_cell(v)
    dockerfile = snap.read_member(v, snap.DOCKERFILE)
    try:
        lock = snap.read_member(v, snap.LOCK).decode()
    except UnicodeDecodeError:
        raise InputError(args.archive, f"member {snap.LOCK} is not text", hint=snap.ALTERED) from None
    buildargs = snap.read_json_member(v, snap.BUILDARGS)
    if not isinstance(buildargs, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in buildargs.items()) \
            or "BASE_IMAGE" not in buildargs:
        raise InputError(args.archive, f"member {snap.BUILDARGS} is not an object of strings with BASE_IMAGE",
                         hint=snap.ALTERED)
    overrides = image_options(args).base_images
    base = overrides.get(cell.name) or overrides.get("*")
    if base:
        buildargs["BASE_IMAGE"] = base
    wheels = imagebuild.resolve_wheels(cell, _wheelhouse_for(args, cell))
    have = {w.sha256 for w in wheels}
    for name, version, hashes in lock_entries(lock):
        if not hashes & have:
            raise InputError("--wheelhouse", f"lacks {name}=={version} (sha256 {sorted(hashes)[0][:12]}…) pinned by the archived lock",
                             hint="pass the wheelhouse the image was built from")
    engine = Engine.connect()
    if not engine.image_exists(buildargs["BASE_IMAGE"]):
        raise BaseImageMissing(cell.name, buildargs["BASE_IMAGE"])
    console = _console()
    tmp = Path(tempfile.mkdtemp(prefix="harness-rebuild-"))
    new_id: str | None = None
    plan = None
    try:
        src = snap.extract_tree(v, snap.SOURCES, tmp / "src")  # -> src/harness/...
        sources = {p.relative_to(src).as_posix(): p for p in sorted((src / "harness").rglob("*")) if p.is_file()}
        plan = imagebuild.recipe_plan(cell, f"harness-rebuild:{cell.name}-{int(time.time())}", dockerfile, buildargs,
                                      lock, wheels, sources)
        loaded = snap.load_image(engine, v, m, _say)
        archived_id = m["image"]["id"]
        _say(f"rebuilding {cell.name} from the archived recipe, without cache (base {buildargs['BASE_IMAGE']})")
        new_id = imagebuild.build_plan_image(engine, plan, nocache=True)
        old_pk = snap.image_packages(engine, archived_id)
        new_pk = snap.image_packages(engine, new_id)
        diffs = snap.package_differences(old_pk, new_pk)
        digest = plan.input_hash
        same_inputs = digest == m["image"].get("input_hash")
        console.print(f"archived image {archived_id[:19]}{' (loaded from the snapshot)' if loaded['loaded'] else ''}, "
                      f"rebuilt {new_id[:19]}: "
                      + ("identical ids" if new_id == archived_id else "ids differ, as expected (layer timestamps)"))
        console.print("build inputs: " + (f"identical to the archived image's (input hash {digest[:12]})" if same_inputs
                                          else f"differ from the archived image's input hash ({digest[:12]} vs "
                                               f"{str(m['image'].get('input_hash'))[:12]}){' — --base-image changed BASE_IMAGE' if base else ''}"))
        if diffs:
            for d in diffs:
                console.print(f"[red]package differs: {d}[/red]")
            console.print(f"rebuild check FAILED: {len(diffs)} package differences ({time.perf_counter() - t0:.1f}s)")
            return EXIT_RUN_FAILED
        console.print(f"rebuild check passed: the same {len(new_pk)} installed distributions "
                      f"({time.perf_counter() - t0:.1f}s)")
        return EXIT_OK
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if new_id is not None and plan is not None and not args.keep:
            try:
                engine.remove_image(plan.tag, force=True)
            except Exception:  # noqa: BLE001 - best effort
                pass
