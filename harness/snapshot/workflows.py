"""What ``harness snapshot``, ``snapshot verify``, ``snapshot rebuild`` and ``harness rerun`` do, as functions.

Each workflow takes a typed options object and returns a typed result; it raises the
:class:`~harness.errors.HarnessError` family and prints nothing itself (a run it makes prints its
progress and report as :func:`harness.runner.execute_plan` does: ``progress`` and
``ReportOptions.show`` decide). Short notes while it works
(``loading image ...``) go to the ``say`` callback, warnings to ``warn``; the CLI
(:mod:`harness.cli.snapshot`) turns both, and the result, into the lines a user reads.

* :func:`create` -- check the input, resolve the cell, take the run (now, or from ``results``),
  gather the members and write the archive (:class:`CreateOptions` -> :class:`CreateResult`);
* :func:`verify_archive` -- every member against the manifest, and the signature when asked
  (:class:`VerifyOptions` -> :class:`VerifyResult`);
* :func:`rerun` -- verify, load the image, extract bundle and data, rerun offline, compare
  (:class:`RerunOptions` -> :class:`RerunResult`);
* :func:`rebuild` -- rebuild the image from the archived recipe without cache and compare its
  installed packages (:class:`RebuildOptions` -> :class:`RebuildResult`).

The rerun and the rebuild open the archive once (:class:`~harness.snapshot.container.Archive`) and read
every member from that open file, each checked against the verified manifest as it is read.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import __version__, signing
from ..errors import InputError, RunFailed, UsageError
from ..options import ISA_LEVELS, ImageOptions, ReportOptions
from ..record import ResultRecord
from . import container as fmt
from .manifest import (ALTERED, CELL_NAME, MANIFEST, BuildEntry, BundleEntry, DataDir, DataEntry, ImageEntry,
                       Manifest, RecordEntry, plain_name, relative_path)

Say = Callable[[str], None]


def _silent(_: str) -> None:
    pass


def sha256_path(path: Any) -> str:
    """:func:`harness.worker.data.sha256_path`, imported when used: it brings numpy, which ``--help`` never needs."""
    from ..worker.data import sha256_path as digest

    return digest(path)


# ----------------------------------------------------------------------------- signatures


@dataclass(frozen=True)
class Signers:
    """Whose signature an archive must carry: keys in an OpenSSH ``allowed_signers`` file, optionally one principal.

    No file: the signature (if any) is reported, not checked.
    """

    allowed_signers: str | None = None
    identity: str | None = None

    def check(self) -> None:
        """Refuse an identity without a file, or a file that is not there (one line each)."""
        if self.identity and not self.allowed_signers:
            raise UsageError("--identity needs --allowed-signers FILE (the keys trusted to sign)")
        if self.allowed_signers and not Path(self.allowed_signers).is_file():
            raise InputError(self.allowed_signers, "not found", hint="pass an OpenSSH allowed_signers file")


@dataclass(frozen=True)
class SignatureStatus:
    """What was found about an archive's signature: ``good`` (checked), ``unsigned``, or ``unchecked``."""

    state: str
    principal: str | None = None
    key: str = ""

    def line(self) -> str:
        if self.state == "good":
            return f"signature: good, signed by {self.principal}" + (f" with {self.key}" if self.key else "")
        if self.state == "unsigned":
            return "signature: unsigned"
        return "signature: present, not checked (pass --allowed-signers FILE)"


def signature_status(v: fmt.Verified, signers: Signers) -> SignatureStatus:
    """Check the signature when ``signers`` names a file (a bad or missing one is an InputError)."""
    if signers.allowed_signers:
        principal, good = fmt.check_signature(v, signers.allowed_signers, signers.identity)
        return SignatureStatus("good", principal, good.split(" with ", 1)[1] if " with " in good else "")
    return SignatureStatus("unsigned" if v.signature is None else "unchecked")


# ----------------------------------------------------------------------------- create


@dataclass(frozen=True)
class CreateOptions:
    """``harness snapshot BUNDLE --cell CELL -o OUTPUT``: archive a run of one matrix cell."""

    bundle: str
    cell: str
    output: str | Path
    results: str | None = None  # archive the run recorded in results/<cell>/record.json instead of running now
    include_data: bool = True  # False: only the data's sha256 and path (--no-data)
    data: str | None = None
    data_dir: str | None = None
    out: str | None = None  # results directory of the run made now
    sign: str | None = None  # an SSH private key to sign the manifest with
    images: ImageOptions = field(default_factory=ImageOptions)
    report: ReportOptions = field(default_factory=ReportOptions)
    tolerances: Any = None  # harness.judge.Tolerances of the run made now
    progress: bool = True


@dataclass(frozen=True)
class CreateResult:
    output: Path
    size: int  # bytes of the archive
    members: int  # including the manifest
    cell: str
    image_id: str
    tag: str | None
    seconds: float  # gathering and writing (not the run)
    signed_with: str | None
    recipe_matches_image: bool
    manifest: Manifest


def create(opts: CreateOptions, *, say: Say = _silent, warn: Say = _silent) -> CreateResult:
    """Steps: check input -> resolve the cell -> the run (now or from ``results``) -> gather -> write."""
    output = Path(opts.output)
    if output.is_dir():
        raise InputError(str(output), "is a directory", hint="pass a file name, e.g. run.harness.tar")
    if opts.sign:  # before the run: a missing key or tool is found in a second, not after the training
        if not Path(opts.sign).is_file():
            raise InputError(opts.sign, "not found", hint="pass an SSH private key, e.g. ~/.ssh/id_ed25519")
        signing.require_tool()
    from .. import runner
    from ..options import RunOptions
    from ..plan import make_plan

    run_opts = RunOptions(bundle=opts.bundle, backend="docker", cells=(opts.cell,), cells_flag="--cell",
                          images=opts.images, data=opts.data, data_dir=opts.data_dir, out=opts.out,
                          progress=opts.progress)
    bundle, _ = runner.load_and_check(run_opts)
    if bundle.data.resolved is None:
        raise InputError("config.yaml", "has no data.path, so there is no data to archive with the snapshot",
                         hint="add data.path (your trainer may keep reading its own key)")
    for code_dir in (bundle.trainer.code_dirs if bundle.trainer else ()):  # every folder, not only the first
        if not Path(code_dir).resolve().is_relative_to(Path(bundle.root)):
            raise InputError(str(bundle.root), f"its trainer code {code_dir} lies outside the bundle and would not be archived",
                             hint="move the trainer's code_dir into the optuna_best directory")
    plan = make_plan(run_opts)
    (cell,) = plan.cells
    if cell.skip_reason:
        raise InputError(f"cell {opts.cell}", f"cannot run on this host: {cell.skip_reason}")
    if cell.name in plan.blocked:
        raise plan.blocked[cell.name]
    build = plan.builds[opts.cell]
    backend = runner.make_backend(plan)
    rec = _archived_run(opts, plan, backend, bundle)
    t0 = time.perf_counter()
    engine = backend.engine
    image_id = rec.image.id if rec.image else ""
    image = engine.image(image_id)
    if image is None:
        raise InputError(f"cell {opts.cell}", f"the image it ran in ({image_id[:19]}) is no longer in the engine",
                         hint="run the cell again (drop --results) and snapshot that run")
    tag = rec.image.tag if rec.image and rec.image.tag in image.tags else (image.tags[0] if image.tags else None)
    data_path = Path(bundle.data.resolved)
    data_dir = Path(bundle.data.dir) if bundle.data.dir else None
    data_sha = sha256_path(data_path)  # a file's bytes, or a directory's sorted walk
    if rec.data_sha256 and rec.data_sha256 != data_sha:
        raise InputError(str(data_path), f"hashes to {data_sha[:12]}…, but the archived run trained on {rec.data_sha256[:12]}…",
                         hint="point --data at the file that run used")
    data_entry = _data_entry(bundle, rec, data_path, data_dir, data_sha, included=opts.include_data)
    sources_tar = fmt.without_bytecode(engine.files(image_id, fmt.IMAGE_SOURCES_PATH))
    recipe_ok = _recipe_matches(build, image, sources_tar)
    if not recipe_ok:
        warn(f"! the Dockerfile/lock/build args of this checkout do not hash to image {tag}'s input hash; "
             "`snapshot rebuild` of this archive may differ")
    host = fmt.host_facts()
    environment = {
        "env": rec.env.to_dict(), "determinism": rec.determinism, "image": rec.to_dict()["image"],
        "image_config": image.config,
        "spec": rec.spec, "host": host,
    }
    manifest = Manifest(
        harness_version=__version__, created=fmt.now_utc(), cell=opts.cell,
        cell_spec=asdict(build.cell),
        image=ImageEntry(id=image_id, tag=tag, size=image.size, repo_digests=tuple(image.repo_digests),
                         input_hash=(image.labels or {}).get("org.harness.input-hash")),
        build=BuildEntry(recipe_matches_image=recipe_ok, input_hash=build.input_hash),
        bundle=BundleEntry(name=Path(bundle.root).name),
        data=data_entry,
        record=RecordEntry(cell=rec.cell, weights_sha256=rec.weights_sha256, status=rec.status.value, schema=rec.schema),
        host=host,
    )
    say(f"writing {output} (image {tag}, {fmt.human(image.size)})")
    try:
        with fmt.SnapshotWriter(output) as w:
            w.add_bytes(fmt.RECORD, rec.to_json().encode())
            w.add_bytes(fmt.ENVIRONMENT, json.dumps(environment, indent=2, sort_keys=True).encode())
            w.add_bytes(fmt.DOCKERFILE, build.dockerfile.encode())
            w.add_bytes(fmt.LOCK, build.lock.encode())
            w.add_bytes(fmt.BUILDARGS, json.dumps(build.buildargs, indent=2, sort_keys=True).encode())
            w.add_bytes(fmt.SOURCES, sources_tar)
            w.add_tree(fmt.BUNDLE, bundle.root, Path(bundle.root).name)
            if opts.include_data and data_dir is not None:
                w.add_tree(fmt.DATA_TREE, data_dir, data_dir.name)
            elif opts.include_data and data_path.is_dir():
                w.add_tree(fmt.DATA_TREE, data_path, data_path.name)
            elif opts.include_data:
                w.add_file(fmt.DATA, data_path)
            w.add_chunks(fmt.IMAGE, engine.save(image_id, tag))
            sign = opts.sign
            w.finish(manifest, sign=(lambda message: signing.sign(message, sign)) if sign else None)
    except Exception as exc:  # the writer removed its partial file; say what failed in one line
        raise fmt.snapshot_error(exc) from exc
    return CreateResult(output=output, size=output.stat().st_size, members=len(w.members) + 1, cell=opts.cell,
                        image_id=image_id, tag=tag, seconds=time.perf_counter() - t0, signed_with=opts.sign,
                        recipe_matches_image=recipe_ok, manifest=manifest)


def _archived_run(opts: CreateOptions, plan: Any, backend: Any, bundle: Any) -> ResultRecord:
    """The record to archive: from ``opts.results``, or from running the cell now."""
    from .. import record, runner
    from ..plan import Job

    cell = plan.cells[0]
    if opts.results:
        path = Path(opts.results) / opts.cell / record.RECORD_FILE
        if not path.is_file():
            raise InputError(str(path), "not found",
                             hint=f"pass the results directory of a run of cell {opts.cell}, or drop --results to run now")
        rec = record.read(path)
        if not rec.ok:
            raise InputError(str(path), f"records a {rec.status.value} run ({rec.error.message if rec.error else ''})",
                             hint="archive a run that succeeded")
        build = plan.builds[opts.cell]
        found = backend.engine.image(build.tag)
        if found is None:
            raise InputError(f"cell {opts.cell}", f"its image {build.tag} is not in the engine",
                             hint=f"build it with `harness images build --cells {opts.cell}`, or drop --results")
        ran = rec.image.id if rec.image else None
        if ran != found.id:
            raise InputError(str(path), f"was run in image {ran}, but cell {opts.cell}'s image {build.tag} is {found.id}",
                             hint="snapshot a run made with this image, or drop --results to run the cell now")
        return rec
    out = runner.results_dir(opts.out, bundle.root)
    runner.check_writable(out)
    lock = runner.ResultsLock(out)  # as `run` does: one harness run writes a results directory at a time
    try:
        job = Job(bundle_dir=bundle.root, data_path=bundle.data.resolved, data_dir=bundle.data.dir,
                  results_dir=str(out), run_id=runner.new_run_id())
        runner.execute_plan(plan, backend, job, opts.report, opts.tolerances, progress_enabled=opts.progress)
        rec = record.read(job.cell_dir(cell) / record.RECORD_FILE)
    finally:
        lock.release()
    if not rec.ok:
        raise RunFailed(f"cell {opts.cell} {rec.status.value}, nothing was archived: {rec.error.message if rec.error else ''}")
    return rec


def _recipe_matches(build: Any, image: Any, sources_tar: bytes) -> bool:
    """Whether this checkout's Dockerfile, build args, wheels and lock, with the harness source
    taken from the image itself, hash to the image's recorded input hash."""
    from ..images import build as imagebuild

    files = fmt.tar_bytes_files(sources_tar)
    digest = imagebuild.input_hash(build.dockerfile.encode(), build.buildargs, build.wheels, files, build.lock)
    return digest == (image.labels or {}).get(imagebuild.LABEL_HASH)


def _tree_size(path: Path) -> int:
    if not path.is_dir():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _data_entry(bundle: Any, rec: ResultRecord, data_path: Path, data_dir: Path | None, data_sha: str,
                included: bool) -> DataEntry:
    """The manifest's ``data``: the data (a file or a directory) and, with --data-dir, the directory around it."""
    around = None
    if data_dir is not None:
        dir_sha = sha256_path(data_dir)
        ran = (rec.data or {}).get("dir_sha256")
        if ran and ran != dir_sha:
            raise InputError(str(data_dir), f"hashes to {dir_sha[:12]}…, but the archived run's --data-dir hashed to "
                                            f"{str(ran)[:12]}…", hint="point --data-dir at the directory that run used")
        around = DataDir(name=data_dir.name, sha256=dir_sha, in_dir=data_path.relative_to(data_dir).as_posix())
    return DataEntry(file=data_path.name, path=str(data_path), config_path=bundle.data.path, sha256=data_sha,
                     size=_tree_size(data_dir or data_path), included=included,
                     kind="directory" if data_path.is_dir() else "file", dir=around)


# ----------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class VerifyOptions:
    archive: str | Path
    signers: Signers = field(default_factory=Signers)


@dataclass(frozen=True)
class VerifyResult:
    verified: fmt.Verified
    signature: SignatureStatus

    @property
    def manifest(self) -> Manifest:
        return self.verified.parsed


def verify_archive(opts: VerifyOptions) -> VerifyResult:
    """Every member against the manifest (the first that differs is an InputError), then the signature."""
    opts.signers.check()
    v = fmt.verify(opts.archive)
    return VerifyResult(v, signature_status(v, opts.signers))


# ----------------------------------------------------------------------------- rerun


@dataclass(frozen=True)
class RerunOptions:
    """``harness rerun ARCHIVE``: the archived run, again, offline, in the archived image."""

    archive: str | Path
    data: str | None = None  # for --no-data snapshots: the data file (or directory); its sha256 is checked
    data_dir: str | None = None  # for --no-data snapshots of a run with --data-dir: the directory around the data
    out: str | None = None  # results directory (default: harness-results/rerun-<cell>-<time>)
    report: ReportOptions = field(default_factory=ReportOptions)
    tolerances: Any = None  # harness.judge.Tolerances
    gpus: str = "all"
    progress: bool = True
    signers: Signers = field(default_factory=Signers)


@dataclass(frozen=True)
class RerunResult:
    comparison: Any  # harness.judge.Comparison of the archived run and the rerun
    archived: ResultRecord
    rerun: ResultRecord
    out: Path
    signature: SignatureStatus
    host_then: dict[str, Any]  # the archived run's host facts (its CPU from its record)
    host_now: dict[str, Any]  # this host's, with the rerun's CPU

    @property
    def weights_identical(self) -> bool:
        return self.rerun.weights_sha256 == self.archived.weights_sha256

    @property
    def host_differences(self) -> list[str]:
        return fmt.host_differences(self.host_then, self.host_now)


def rerun(opts: RerunOptions, *, say: Say = _silent) -> RerunResult:
    """Open the archive once; everything the rerun uses is read from that open file (see :func:`_rerun`)."""
    with fmt.Archive(opts.archive) as archive:
        return _rerun(opts, archive, say)


def _rerun(opts: RerunOptions, archive: fmt.Archive, say: Say) -> RerunResult:
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
    from ..record import ImageInfo

    opts.signers.check()
    v = fmt.verify(archive)
    signature = signature_status(v, opts.signers)  # a bad signature stops here, before anything is loaded or run
    m = v.parsed
    say(f"{opts.archive}: {len(v.members) + 1} members verified in {v.seconds:.1f}s; {signature.line()}")
    # The archived record is read first: a snapshot of another record schema is refused before any load.
    archived = ResultRecord.from_json(fmt.read_json_member(v, fmt.RECORD), f"{opts.archive}: {fmt.RECORD}")
    tmp = Path(tempfile.mkdtemp(prefix="harness-rerun-"))
    lock = None
    try:
        data_path, data_dir = _data_for(opts, v, tmp)
        engine = Engine.connect()
        loaded = fmt.load_image(engine, v, v.manifest, say)
        if loaded["loaded"]:
            say(f"image {m.image.id[:19]} loaded in {loaded['seconds']:.1f}s")
        bundle_dir = fmt.extract_bundle(v, v.manifest, tmp / "bundle")
        # the archived bundle still validates here
        load_bundle(bundle_dir, data_override=str(data_path), data_dir=str(data_dir) if data_dir else None)
        cell_name = m.cell
        archived.cell = f"{cell_name}@archived"
        spec = archived.spec or {}
        cell = Cell(name=f"{cell_name}@rerun", device=spec.get("device") or "cpu",
                    determinism=spec.get("determinism") or "strict", threads=spec.get("threads"),
                    tf32=bool(spec.get("tf32")), labels=dict(archived.labels),
                    isa=spec.get("isa") if spec.get("isa") in ISA_LEVELS else None)  # its container gets the same switches
        backend = DockerBackend(engine, {}, gpus=opts.gpus)
        image = archived.image or ImageInfo(id=m.image.id)
        backend.use_image(cell.name, dataclasses.replace(image, id=m.image.id, tag=m.image.tag or m.image.id,
                                                         snapshot=str(v.path)),
                          spec=dict(spec, cell=cell.name))
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = runner.results_dir(opts.out, f"rerun-{cell_name}-{stamp}")
        if not opts.out:
            out = (Path.cwd() / "harness-results" / f"rerun-{cell_name}-{stamp}").resolve()
        runner.check_writable(out)
        lock = runner.ResultsLock(out)  # as `run` does: one harness run writes a results directory at a time
        record.write(out / archived.cell / record.RECORD_FILE, archived)
        job = Job(bundle_dir=str(bundle_dir), data_path=str(data_path), data_dir=str(data_dir) if data_dir else None,
                  results_dir=str(out), trainer=spec.get("trainer"), trainer_cmd=spec.get("trainer_cmd"),
                  seed_key=spec.get("seed_key"), trainer_cwd=spec.get("trainer_cwd"),
                  run_id=runner.new_run_id())
        comparison = runner.execute_plan(Plan("docker", [cell]), backend, job, opts.report, opts.tolerances,
                                         progress_enabled=opts.progress, extra_records=[archived])
        again = record.read(job.cell_dir(cell) / record.RECORD_FILE)
        return RerunResult(comparison=comparison, archived=archived, rerun=again, out=Path(out), signature=signature,
                           host_then=dict(m.host or {}, cpu=archived.env.cpu),
                           host_now=dict(fmt.host_facts(), cpu=again.env.cpu) if again.ok else {})
    finally:
        if lock is not None:
            lock.release()
        shutil.rmtree(tmp, ignore_errors=True)


def _data_for(opts: RerunOptions, v: fmt.Verified, tmp: Path) -> tuple[Path, Path | None]:
    """The data (and, for a run with --data-dir, the directory around it) the rerun trains on, checked."""
    data = v.parsed.data
    where = str(v.path)
    around = data.dir
    if data.included:
        if opts.data or opts.data_dir:
            raise UsageError("--data and --data-dir are only for snapshots made with --no-data; this one holds its data")
        name = plain_name(data.file, where, "data.file")
        if not data.is_tree:
            return fmt.extract_file(v, fmt.DATA, tmp / "data" / name, root=tmp / "data"), None
        root = fmt.extract_tree(v, fmt.DATA_TREE, tmp / "data")
        if around is None:
            path, data_dir = root / name, None
        else:
            data_dir = root / plain_name(around.name, where, "data.dir.name")
            path = data_dir / relative_path(around.in_dir, where, "data.dir.in_dir")
        for p in (path, data_dir):
            if p is not None:
                fmt.inside(p, root, where, f"member {fmt.DATA_TREE}'s {p.relative_to(root)}")
        if not path.exists() or (data_dir is not None and not data_dir.is_dir()):
            raise InputError(where, f"member {fmt.DATA_TREE} holds no {path.relative_to(root)}", hint=ALTERED)
    else:
        path, data_dir = _given_data(opts, data, around)
    _check_digest(path, data.sha256, data.file, "trained on")
    if data_dir is not None and around is not None:
        _check_digest(data_dir, around.sha256, around.name, "ran with the --data-dir")
    return path, data_dir


def _given_data(opts: RerunOptions, data: DataEntry, around: DataDir | None) -> tuple[Path, Path | None]:
    """``data`` / ``data_dir`` of the options, for a snapshot made with --no-data."""
    if around is not None:
        if not opts.data_dir:
            raise UsageError(f"this snapshot holds no data (made with --no-data) of a run with --data-dir; pass "
                             f"--data-dir DIR (the original was {Path(str(data.path)).parent}, "
                             f"data {around.in_dir} inside it)")
        data_dir = Path(opts.data_dir)
        if not data_dir.is_dir():
            raise InputError(str(data_dir), "is not a directory", hint="pass the directory the run used with --data-dir")
        path = Path(opts.data) if opts.data else data_dir / around.in_dir
        if not path.exists():
            raise InputError(str(path), "not found", hint=f"the data lay at {around.in_dir} inside --data-dir")
        return path.resolve(), data_dir.resolve()
    if not opts.data:
        raise UsageError(f"this snapshot holds no data file (made with --no-data); pass --data FILE "
                         f"(the original was {data.path}, sha256 {data.sha256})")
    path = Path(opts.data)
    if not path.exists():
        raise InputError(str(path), "not found", hint=f"pass the data file the run used ({data.file})")
    return path.resolve(), None


def _check_digest(path: Path, want: Any, name: Any, what: str) -> None:
    got = sha256_path(path)
    if got != want:
        raise InputError(str(path), f"hashes to {got[:12]}…, the archived run {what} {str(want)[:12]}…",
                         hint=f"pass the original data ({name})")


# ----------------------------------------------------------------------------- rebuild


@dataclass(frozen=True)
class RebuildOptions:
    """``harness snapshot rebuild ARCHIVE --wheelhouse DIR``: the archived image, rebuilt offline from its recipe."""

    archive: str | Path
    images: ImageOptions = field(default_factory=ImageOptions)  # its wheelhouses and base-image overrides are used
    keep: bool = False  # keep the rebuilt image in the engine
    signers: Signers = field(default_factory=Signers)


@dataclass(frozen=True)
class RebuildResult:
    cell: str
    signature: SignatureStatus
    archived_id: str
    loaded: bool  # whether the archived image was loaded from the snapshot (it was not in the engine)
    rebuilt_id: str
    input_hash: str  # of the rebuild's inputs
    archived_input_hash: str | None
    base_overridden: bool  # BASE_IMAGE was replaced (ImageOptions.base_images)
    package_differences: list[str]
    packages: int  # installed distributions in the rebuilt image
    seconds: float

    @property
    def same_inputs(self) -> bool:
        return self.input_hash == self.archived_input_hash

    @property
    def ok(self) -> bool:
        return not self.package_differences


_LOCK_LINE = re.compile(r"^([A-Za-z0-9_.-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)\s*$")


def lock_entries(lock: str) -> list[tuple[str, str, set[str]]]:
    """``(name, version, {sha256, ...})`` for every pinned line of a requirements lock."""
    out = []
    for line in lock.splitlines():
        mt = _LOCK_LINE.match(line.strip())
        if mt:
            out.append((mt.group(1), mt.group(2), set(re.findall(r"sha256:([0-9a-f]{64})", mt.group(3)))))
    return out


def _wheelhouse_for(images: ImageOptions, cell: Any) -> Path:
    from ..plan import wheelhouse_dirs

    values = images.wheelhouses
    if not values:
        raise UsageError("harness snapshot rebuild needs --wheelhouse DIR (the wheels the lock pins)")
    if len(values) == 1 and "=" not in values[0] and any(Path(values[0]).glob("*.whl")):
        return Path(values[0])
    dirs = wheelhouse_dirs(values, [cell])
    if cell.name not in dirs:
        raise InputError("--wheelhouse", f"holds no wheels for cell {cell.name}",
                         hint=f"pass a directory of wheels, DIR with a {cell.name}/ subdirectory, or {cell.name}=DIR")
    return dirs[cell.name]


def archived_cell(v: fmt.Verified) -> Any:
    """The manifest's ``cell_spec`` as a :class:`~harness.images.matrix.ImageCell`; anything else is one InputError."""
    from ..images.matrix import ImageCell

    spec = v.parsed.cell_spec
    if spec is None:
        raise InputError(str(v.path), f"{MANIFEST}: key cell_spec is missing", hint="a rebuild needs the archived cell")
    spec = dict(spec)
    arch = spec.get("arch") or ()
    spec["arch"] = tuple(arch) if isinstance(arch, (list, tuple)) else arch
    try:
        cell = ImageCell(**spec)
    except (TypeError, ValueError) as exc:
        raise InputError(str(v.path), f"{MANIFEST}: key cell_spec is not a matrix cell ({fmt._short(exc)})",
                         hint=ALTERED) from None
    if not isinstance(cell.name, str) or not CELL_NAME.match(cell.name):
        raise InputError(str(v.path), f"{MANIFEST}: key cell_spec.name is not a matrix cell name ({cell.name!r})",
                         hint=ALTERED)
    return cell


def rebuild(opts: RebuildOptions, *, say: Say = _silent) -> RebuildResult:
    """Open the archive once; the recipe, sources and image are read from that open file (see :func:`_rebuild`)."""
    with fmt.Archive(opts.archive) as archive:
        return _rebuild(opts, archive, say)


def _rebuild(opts: RebuildOptions, archive: fmt.Archive, say: Say) -> RebuildResult:
    """Rebuild the archived image offline from its recipe and compare the installed packages."""
    from ..docker_engine import Engine
    from ..errors import BaseImageMissing
    from ..images import build as imagebuild

    t0 = time.perf_counter()
    opts.signers.check()
    v = fmt.verify(archive)
    signature = signature_status(v, opts.signers)
    say(signature.line())
    m = v.parsed
    cell = archived_cell(v)
    dockerfile = fmt.read_member(v, fmt.DOCKERFILE)
    try:
        lock = fmt.read_member(v, fmt.LOCK).decode()
    except UnicodeDecodeError:
        raise InputError(str(opts.archive), f"member {fmt.LOCK} is not text", hint=ALTERED) from None
    buildargs = fmt.read_json_member(v, fmt.BUILDARGS)
    if not isinstance(buildargs, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in buildargs.items()) \
            or "BASE_IMAGE" not in buildargs:
        raise InputError(str(opts.archive), f"member {fmt.BUILDARGS} is not an object of strings with BASE_IMAGE",
                         hint=ALTERED)
    overrides = opts.images.base_images
    base = overrides.get(cell.name) or overrides.get("*")
    if base:
        buildargs["BASE_IMAGE"] = base
    wheels = imagebuild.resolve_wheels(cell, _wheelhouse_for(opts.images, cell))
    have = {w.sha256 for w in wheels}
    for name, version, hashes in lock_entries(lock):
        if not hashes & have:
            raise InputError("--wheelhouse", f"lacks {name}=={version} (sha256 {sorted(hashes)[0][:12]}…) pinned by the archived lock",
                             hint="pass the wheelhouse the image was built from")
    engine = Engine.connect()
    if not engine.image_exists(buildargs["BASE_IMAGE"]):
        raise BaseImageMissing(cell.name, buildargs["BASE_IMAGE"])
    tmp = Path(tempfile.mkdtemp(prefix="harness-rebuild-"))
    new_id: str | None = None
    plan = None
    try:
        src = fmt.extract_tree(v, fmt.SOURCES, tmp / "src")  # -> src/harness/...
        sources = {p.relative_to(src).as_posix(): p for p in sorted((src / "harness").rglob("*")) if p.is_file()}
        plan = imagebuild.recipe_plan(cell, f"harness-rebuild:{cell.name}-{int(time.time())}", dockerfile, buildargs,
                                      lock, wheels, sources)
        loaded = fmt.load_image(engine, v, v.manifest, say)
        archived_id = m.image.id
        say(f"rebuilding {cell.name} from the archived recipe, without cache (base {buildargs['BASE_IMAGE']})")
        new_id = imagebuild.build_plan_image(engine, plan, nocache=True)
        old_pk = fmt.image_packages(engine, archived_id)
        new_pk = fmt.image_packages(engine, new_id)
        return RebuildResult(cell=cell.name, signature=signature, archived_id=archived_id, loaded=loaded["loaded"],
                             rebuilt_id=new_id, input_hash=plan.input_hash, archived_input_hash=m.image.input_hash,
                             base_overridden=bool(base), package_differences=fmt.package_differences(old_pk, new_pk),
                             packages=len(new_pk), seconds=time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if new_id is not None and plan is not None and not opts.keep:
            try:
                engine.remove_image(plan.tag, force=True)
            except Exception:  # noqa: BLE001 - best effort
                pass
