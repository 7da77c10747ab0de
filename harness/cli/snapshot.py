"""`harness snapshot ...` and `harness rerun`: the arguments of the snapshot workflows, and what they print.

Wired into the main CLI by ``harness.cli`` through :func:`register`::

    harness snapshot OPTUNA_BEST --cell CELL -o FILE [--results DIR] [--no-data] [--sign KEY]
    harness snapshot verify FILE [--allowed-signers FILE [--identity PRINCIPAL]]
    harness snapshot rebuild FILE --wheelhouse DIR [--base-image IMAGE] [--allowed-signers FILE]
    harness rerun FILE [--out DIR] [--json F] [--markdown F] [--tol ...] [--data FILE] [--allowed-signers FILE]

This module only parses arguments into the typed options of :mod:`harness.snapshot` (whose
workflows do the work, raise :class:`~harness.errors.HarnessError` and print nothing) and
renders the results they return. Handlers return an exit code.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import signing
from .. import snapshot as snap
from ..errors import EXIT_OK, EXIT_RUN_FAILED, UsageError
from ..report import console as _console
from .common import image_options, report_options, tolerances, verdict_exit

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
    _signers(args).check()


def _signers(args: argparse.Namespace) -> snap.Signers:
    return snap.Signers(allowed_signers=args.allowed_signers, identity=args.identity)


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
    _console(stderr=True).print(f"[dim]{text}[/dim]")


def _warn(text: str) -> None:
    _console(stderr=True).print(f"[yellow]{text}[/yellow]")


# ----------------------------------------------------------------------------- snapshot


def cmd_create(args: argparse.Namespace) -> int:
    if not args.cell:
        raise UsageError("harness snapshot needs --cell CELL (the matrix cell to archive)",
                         hint="e.g. --cell cpu-torch2.13; `harness images list` shows the cells")
    if not args.output:
        raise UsageError("harness snapshot needs -o FILE (where to write the archive)", hint="e.g. -o run.harness.tar")
    opts = snap.CreateOptions(bundle=args.target, cell=args.cell, output=args.output, results=args.results,
                              include_data=not args.no_data, data=args.data, data_dir=args.data_dir, out=args.out,
                              sign=args.sign, images=image_options(args), report=report_options(args),
                              tolerances=tolerances(args), progress=not args.no_progress)
    r = snap.create(opts, say=_say, warn=_warn)
    _console().print(f"snapshot {r.output}: {snap.human(r.size)}, {r.members} members, cell {r.cell}, "
                     f"image {r.image_id[:19]} ({r.tag}), written in {r.seconds:.1f}s"
                     + (f", signed with {r.signed_with}" if r.signed_with else ", unsigned"))
    return EXIT_OK


# ----------------------------------------------------------------------------- verify


def cmd_verify(args: argparse.Namespace) -> int:
    from rich import box
    from rich.table import Table

    r = snap.verify_archive(snap.VerifyOptions(args.archive, _signers(args)))
    v, m = r.verified, r.manifest
    out = _console()
    table = Table(box=box.SIMPLE_HEAD, title=f"{args.archive}: OK", title_justify="left")
    for col in ("member", "stored", "content", "sha256"):
        table.add_column(col, no_wrap=True, justify="right" if col in ("stored", "content") else "left")
    for e in m.members:
        table.add_row(e.name, snap.human(e.size), snap.human(e.raw_size), e.sha256[:16] + "…")
    out.print(table)
    out.print(f"{len(m.members) + 1} members, {snap.human(v.total_size)} stored, verified in {v.seconds:.1f}s")
    out.print(f"cell {m.cell}, image {m.image.id} ({m.image.tag})")
    out.print(f"created {m.created} by harness {m.harness_version}; data "
              + ("included" if m.data.included else f"not included (sha256 {str(m.data.sha256)[:12]}…)"))
    out.print(r.signature.line())
    return EXIT_OK


# ----------------------------------------------------------------------------- rerun


def cmd_rerun(args: argparse.Namespace) -> int:
    tol = tolerances(args)
    _check_signature_flags(args, writing=False)
    opts = snap.RerunOptions(archive=args.archive, data=args.data, data_dir=args.data_dir, out=args.out,
                             report=report_options(args), tolerances=tol, gpus=args.gpus,
                             progress=not args.no_progress, signers=_signers(args))
    r = snap.rerun(opts, say=_say)
    if r.rerun.ok:
        console = _console()
        console.print(f"weights: {'bitwise identical to' if r.weights_identical else 'DIFFER from'} the archived run's "
                      f"({str(r.rerun.weights_sha256)[:16]}…)")
        diffs = r.host_differences
        console.print("host: differs from the archived run's: " + "; ".join(diffs) if diffs
                      else f"host: same as the archived run's ({r.host_now.get('hostname')}, {r.host_now.get('cpu')})")
    return verdict_exit(r.comparison)


# ----------------------------------------------------------------------------- rebuild


def cmd_rebuild(args: argparse.Namespace) -> int:
    r = snap.rebuild(snap.RebuildOptions(archive=args.archive, images=image_options(args), keep=args.keep,
                                         signers=_signers(args)), say=_say)
    console = _console()
    console.print(f"archived image {r.archived_id[:19]}{' (loaded from the snapshot)' if r.loaded else ''}, "
                  f"rebuilt {r.rebuilt_id[:19]}: "
                  + ("identical ids" if r.rebuilt_id == r.archived_id else "ids differ, as expected (layer timestamps)"))
    console.print("build inputs: " + (f"identical to the archived image's (input hash {r.input_hash[:12]})" if r.same_inputs
                                      else f"differ from the archived image's input hash ({r.input_hash[:12]} vs "
                                           f"{str(r.archived_input_hash)[:12]}){' — --base-image changed BASE_IMAGE' if r.base_overridden else ''}"))
    if not r.ok:
        for d in r.package_differences:
            console.print(f"[red]package differs: {d}[/red]")
        console.print(f"rebuild check FAILED: {len(r.package_differences)} package differences ({r.seconds:.1f}s)")
        return EXIT_RUN_FAILED
    console.print(f"rebuild check passed: the same {r.packages} installed distributions ({r.seconds:.1f}s)")
    return EXIT_OK
