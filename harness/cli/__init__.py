"""The ``harness`` command line.

``harness matrix`` reads as its steps: load and validate the bundle -> resolve
cells -> prepare the backend (build images) -> run cells -> compare -> render.
:func:`main` is the only place where errors become exit codes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import EXIT_INTERRUPTED, EXIT_USAGE, HarnessError, InputError, UsageError

# --------------------------------------------------------------------------- options shared by run and matrix


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="the optuna_best directory")
    p.add_argument("--data", help="dataset file (overrides config.yaml data.path)")
    p.add_argument("--trainer", help="your own trainer as module:function (overrides config.yaml trainer.entrypoint)")
    p.add_argument("--trainer-path", help="directory holding the trainer's module")
    p.add_argument("--out", help="results directory (default: harness-results/<bundle>-<time>)")
    p.add_argument("--json", dest="json_out", metavar="FILE", help="write all records plus the comparison as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write a Markdown table (for a pull-request comment)")
    p.add_argument("--tol", action="append", default=[], metavar="METRIC=abs:X[,rel:Y]",
                   help="tolerance for val_loss, r2, mse or mae (repeatable), e.g. --tol r2=abs:1e-4")
    p.add_argument("--tolerances", metavar="FILE", help="YAML file of tolerances: {r2: {abs: 1e-4}, mse: {rel: 0.01}}")
    p.add_argument("--trace", action="store_true", help="write every training step's loss to trace.jsonl")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--repeats", type=int, default=1, help="run each cell N times")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def _add_docker(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("docker backend")
    g.add_argument("--matrix", type=Path, default=None, metavar="FILE", help="version matrix (default images/matrix.yaml)")
    g.add_argument("--compat", type=Path, default=None, metavar="FILE", help="compatibility data (default images/compat.yaml)")
    g.add_argument("--base-image", action="append", default=[], metavar="[CELL=]IMAGE",
                   help="build on this base image instead of the matrix's (every cell, or CELL=IMAGE)")
    g.add_argument("--site-config", type=Path, default=os.environ.get("HARNESS_SITE_CONFIG") or None, metavar="FILE",
                   help="YAML with base_images: {'*': IMAGE, CELL: IMAGE} (env HARNESS_SITE_CONFIG)")
    g.add_argument("--wheelhouse", action="append", default=[], metavar="[CELL=]DIR",
                   help="offline wheels: a directory with one sub-directory per cell, or CELL=DIR (env HARNESS_WHEELHOUSE)")
    g.add_argument("--gpus", default="all", help="GPUs to request for CUDA cells: all, none, or device ids like 0,1")
    g.add_argument("--memory", help="memory limit per container, e.g. 8g")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description="Rerun an optuna_best retrain and judge whether it reproduces.")
    parser.add_argument("--version", action="version", version=f"harness {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_run = sub.add_parser("run", help="retrain once, here (or in one pinned image), and compare with the recorded trial")
    _add_common(p_run)
    p_run.add_argument("--device", default="auto", help="auto (cuda when visible), cpu, cuda, cuda:N")
    p_run.add_argument("--determinism", default="strict", help="strict, warn or default")
    p_run.add_argument("--threads", type=int, help="torch intra-op threads")
    p_run.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on GPU")
    p_run.add_argument("--image", metavar="CELL", help="run inside this matrix cell's image (docker backend)")
    _add_docker(p_run)
    p_run.set_defaults(func=cmd_run)

    p_mat = sub.add_parser("matrix", help="run every cell of a matrix and tabulate how the environment moves the metrics")
    _add_common(p_mat)
    p_mat.add_argument("--backend", choices=("docker", "local"), default="docker",
                       help="docker: pinned images (default); local: axes that vary inside this environment")
    p_mat.add_argument("--cells", help="docker: comma-separated cell names (default: every cell this host can run)")
    p_mat.add_argument("--devices", help="local: comma-separated devices (default: cpu, plus cuda when visible)")
    p_mat.add_argument("--determinism", default=None,
                       help="modes to compare: strict, warn, default (local default: strict,default; docker: strict)")
    p_mat.add_argument("--threads", default=None, help="thread counts, e.g. 1,all (local default: 1 and all cores)")
    p_mat.add_argument("--tf32", default="off,on", help="local, CUDA cells: off, on or off,on")
    _add_docker(p_mat)
    p_mat.set_defaults(func=cmd_matrix)

    p_cmp = sub.add_parser("compare", help="re-render the comparison of result records (merge results from several machines)")
    p_cmp.add_argument("paths", nargs="+", help="results directories, record.json files or --json reports")
    p_cmp.add_argument("--json", dest="json_out", metavar="FILE")
    p_cmp.add_argument("--markdown", metavar="FILE")
    p_cmp.add_argument("--tol", action="append", default=[])
    p_cmp.add_argument("--tolerances", metavar="FILE")
    p_cmp.set_defaults(func=cmd_compare)

    try:
        from . import images as cli_images
    except ImportError:  # pragma: no cover - the image tooling is optional in stripped installs
        cli_images = None  # type: ignore[assignment]
    if cli_images is not None:
        cli_images.register(sub)
    try:
        from . import snapshot as cli_snapshot
    except ImportError:
        cli_snapshot = None  # type: ignore[assignment]
    if cli_snapshot is not None:
        cli_snapshot.register(sub)
    return parser


# --------------------------------------------------------------------------- steps


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    width = None
    if not sys.stdout.isatty():
        width = int(os.environ.get("COLUMNS", "200"))
    return Console(stderr=stderr, width=width, highlight=False, soft_wrap=False)


def load_tolerances(args: argparse.Namespace) -> Any:
    from ..judge import Tolerances, load_tolerances as load_file, parse_tolerance

    tol = Tolerances()
    if getattr(args, "tolerances", None):
        tol = load_file(args.tolerances, tol)
    for t in getattr(args, "tol", []) or []:
        tol = parse_tolerance(t, tol)
    return tol


def load_and_check(args: argparse.Namespace) -> tuple[Any, Any]:
    """Step 1: read and validate the bundle and its data; nothing trains before this passes."""
    from .. import preflight
    from ..bundle import load_bundle

    bundle = load_bundle(args.bundle, data_override=args.data, trainer_override=args.trainer, trainer_path=args.trainer_path)
    return bundle, preflight.check(bundle)


def results_dir(args: argparse.Namespace, bundle: Any) -> Path:
    if args.out:
        return Path(args.out).resolve()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return (Path.cwd() / "harness-results" / f"{Path(bundle.root).name}-{stamp}").resolve()


def plan_local(args: argparse.Namespace, single: bool) -> Any:
    """Step 2 (local): expand the axes into cells."""
    from ..backends.base import Plan
    from ..backends.local import LocalBackend
    from ..plan import local_cells, parse_threads

    import torch

    has_cuda = torch.cuda.is_available()
    if single:
        device = args.device
        if device == "auto":
            device = "cuda" if has_cuda else "cpu"
        cells = local_cells([device], [args.determinism], [args.threads], [bool(args.tf32)], args.repeats)
        if args.repeats == 1:
            cells[0].name = "run"
    else:
        devices = args.devices.split(",") if args.devices else (["cpu", "cuda"] if has_cuda else ["cpu"])
        modes = [m.strip() for m in (args.determinism or "strict,default").split(",") if m.strip()]
        ncpu = os.cpu_count() or 1
        threads = parse_threads(args.threads) if args.threads else ([1, None] if ncpu > 1 else [None])
        tf32_axis = {"off": [False], "on": [True], "off,on": [False, True], "on,off": [True, False]}.get(args.tf32.replace(" ", ""))
        if tf32_axis is None:
            raise UsageError(f"--tf32 {args.tf32!r} is not off, on or off,on")
        cells = local_cells(devices, modes, threads, tf32_axis, args.repeats)
    for c in cells:
        if c.device.startswith("cuda") and not has_cuda:
            raise UsageError(f"cell {c.name} asks for {c.device}, but torch sees no CUDA device here",
                             hint="drop cuda from --devices, or run where a GPU is visible")
    return Plan(LocalBackend(), cells)


def plan_docker(args: argparse.Namespace, names: list[str] | None) -> Any:
    """Step 2 (docker): resolve matrix cells, their base images and host fitness."""
    from ..backends.docker import plan_cells

    return plan_cells(args, names)


def run_cells(plan: Any, job: Any, progress: bool) -> list[dict[str, Any]]:
    """Steps 3-4: prepare the backend, then run each cell; a failed cell does not stop the others."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..record import error_record, write_record

    records: list[dict[str, Any]] = []
    for c in plan.skipped:
        rec = error_record(c.name, "skipped", f"skipped: {c.skip_reason}")
        write_record(job.cell_dir(c) / "record.json", rec)
        records.append(rec)
    err_console = _console(stderr=True)
    failures = dict(plan.failures)
    failures.update(plan.backend.prepare([c for c in plan.cells if c.name not in failures], job))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, disable=not progress, transient=True) as bar:
        cells_task = bar.add_task("cells", total=len(plan.cells))
        epoch_task = bar.add_task("epochs", total=None)

        def on_event(ev: dict[str, Any]) -> None:
            if ev.get("event") == "start":
                bar.reset(epoch_task, total=ev.get("epochs"), description=f"  {ev.get('cell')} epochs")
            elif ev.get("event") == "epoch":
                bar.update(epoch_task, completed=ev.get("epoch"), total=ev.get("epochs"))

        try:
            for cell in plan.cells:
                bar.update(cells_task, description=f"cell {cell.name}")
                if cell.name in failures:
                    # A cell that cannot start (its image, its wheelhouse) fails alone.
                    exc = failures[cell.name]
                    rec = error_record(cell.name, "image", exc.one_line(), extra={"backend": plan.backend.name})
                    write_record(job.cell_dir(cell) / "record.json", rec)
                else:
                    rec = plan.backend.run(cell, job, on_event)
                records.append(rec)
                bar.advance(cells_task)
                err = rec.get("error") or {}
                if rec.get("status") != "ok" and err.get("kind") in ("input", "usage"):
                    # The same bad input fails every cell: stop, keep what ran, exit 2.
                    raise InputError("", err.get("message", "bad input"))
                if not progress:
                    err_console.print(f"[dim]{cell.name}: {rec.get('status')}[/dim]")
        finally:
            plan.backend.close()
    return records


def render(args: argparse.Namespace, records: list[dict[str, Any]], results: Path | None, tol: Any) -> int:
    """Steps 5-6: compare, print, write the reports; return the verdict's exit code."""
    from ..judge import compare, exit_code
    from ..record import atomic_write_text, dumps
    from ..report import json_report, markdown, print_report

    comparison = compare(records, tol)
    print_report(_console(), records, comparison)
    report = json_report(records, comparison)
    if results is not None:
        atomic_write_text(results / "report.json", dumps(report))
    if getattr(args, "json_out", None):
        atomic_write_text(args.json_out, dumps(report))
    if getattr(args, "markdown", None):
        atomic_write_text(args.markdown, markdown(records, comparison))
    if results is not None:
        _console(stderr=True).print(f"[dim]records: {results}[/dim]")
    return exit_code(comparison)


def _execute(args: argparse.Namespace, plan_fn: Any) -> int:
    from ..backends.base import Job

    tol = load_tolerances(args)
    bundle, pre = load_and_check(args)
    err = _console(stderr=True)
    for w in pre.warnings:
        err.print(f"[bold red]! {w}[/bold red]" if "MISMATCH" in w else f"[yellow]! {w}[/yellow]")
    plan = plan_fn()
    if not plan.cells and not plan.skipped:
        raise UsageError("no cells to run", hint="check --cells / --devices")
    out = results_dir(args, bundle)
    out.mkdir(parents=True, exist_ok=True)
    job = Job(bundle_dir=bundle.root, data_path=bundle.data.resolved, results_dir=str(out),
              trainer=bundle.trainer.entrypoint if bundle.trainer else None,
              trainer_path=bundle.trainer.code_dir if bundle.trainer else None, trace=args.trace)
    records = run_cells(plan, job, progress=not args.no_progress)
    return render(args, records, out, tol)


# --------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    if args.image:
        args.cells = args.image
        return _execute(args, lambda: plan_docker(args, [args.image]))
    return _execute(args, lambda: plan_local(args, single=True))


def cmd_matrix(args: argparse.Namespace) -> int:
    if args.backend == "local":
        return _execute(args, lambda: plan_local(args, single=False))
    names = [c.strip() for c in args.cells.split(",") if c.strip()] if args.cells else None
    return _execute(args, lambda: plan_docker(args, names))


def cmd_compare(args: argparse.Namespace) -> int:
    from ..judge import merge
    from ..record import load_records

    tol = load_tolerances(args)
    groups = [load_records([p]) for p in args.paths]
    return render(args, merge(groups), None, tol)


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Parse, dispatch, and map every outcome to an exit code (the only place that does)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    debug = args.debug or os.environ.get("HARNESS_DEBUG") == "1"
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("harness: interrupted; records already written are kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except HarnessError as exc:
        if debug:
            traceback.print_exc()
        print(f"harness: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - an unexpected failure still gets one line and exit 1
        if debug:
            traceback.print_exc()
        print(f"harness: internal error: {exc.__class__.__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
