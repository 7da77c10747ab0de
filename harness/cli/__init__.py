"""The ``harness`` command line.

``harness matrix`` reads as its steps: load and validate the bundle -> resolve
cells -> prepare the backend (build images) -> run cells -> compare -> render.
:func:`main` is the only place where errors become exit codes.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys
import threading
import traceback
from typing import Any

from .. import __version__
from ..errors import EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, HarnessError, Interrupted
from ..options import RunOptions
from .common import (EXIT_CODES_HELP, add_allow_data_change, add_common, add_detail, add_docker, add_html, add_inputs, add_slurm,
                     add_tolerance_flags, image_values, report_options, slurm_values, tolerances, verdict_exit)

ISA_HELP = ("CPU instruction sets the CPU kernels may use, e.g. native,avx2,baseline (native, avx512, avx2, "
            "baseline; default: no ISA axis); a level this CPU lacks is skipped")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description="Rerun an optuna_best retrain and judge whether it reproduces.",
                                     epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"harness {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_run = sub.add_parser("run", help="retrain once, here (or in one pinned image), and compare with the recorded trial")
    add_common(p_run)
    p_run.add_argument("--device", default="auto", help="auto (cuda when visible), cpu, cuda, cuda:N")
    p_run.add_argument("--determinism", default="strict", help="strict, warn or default")
    p_run.add_argument("--threads", help="torch intra-op threads: N, or all (torch's default)")
    p_run.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on GPU")
    p_run.add_argument("--isa", default=None, help=ISA_HELP)
    p_run.add_argument("--image", metavar="CELL", help="run inside this matrix cell's image (docker backend)")
    add_docker(p_run)
    p_run.set_defaults(func=cmd_run)

    p_mat = sub.add_parser("matrix", help="run every cell of a matrix and tabulate how the environment moves the metrics")
    add_common(p_mat)
    p_mat.add_argument("--backend", choices=("docker", "local", "slurm"), default="docker",
                       help="docker: pinned images (default); local: axes that vary inside this environment; "
                            "slurm: each cell a Slurm job (see the slurm backend flags)")
    p_mat.add_argument("--cells", help="docker, slurm: comma-separated cell names (default: every cell of the matrix); "
                                       "slurm: CELL@GPU_TYPE routes a cell to a GPU type")
    p_mat.add_argument("--devices", help="local: comma-separated devices (default: cpu, plus cuda when visible)")
    p_mat.add_argument("--determinism", default=None,
                       help="modes to compare: strict, warn, default (local default: strict,default; docker: strict)")
    p_mat.add_argument("--threads", default=None, help="thread counts, e.g. 1,all (local default: 1 and all cores)")
    p_mat.add_argument("--tf32", default=None, help="CUDA cells: off, on or off,on (default off,on; CPU cells ignore it)")
    p_mat.add_argument("--isa", default=None, help=ISA_HELP)
    add_docker(p_mat)
    add_slurm(p_mat)
    p_mat.set_defaults(func=cmd_matrix)

    p_band = sub.add_parser(
        "band", help="measure the training's own instability: retrain the baseline N times, each with one initial "
                     "weight moved by one ulp (and optionally with other seeds); reuse it with --band-from DIR")
    add_inputs(p_band)
    p_band.add_argument("--n", default=8, help="ulp band members: retrains, each with one initial weight moved by one ulp (default 8)")
    p_band.add_argument("--band-seeds", default=0, metavar="N",
                        help="also retrain with N other training seeds (seed+1 ... seed+N): the seed band, the "
                             "distribution a cell is judged against (8 or more: docs/verdicts.md)")
    p_band.add_argument("--alpha", default=None, metavar="A", help="the false-alarm rate of 'drifted' (default 0.01)")
    p_band.add_argument("--backend", choices=("docker", "local"), default=None,
                        help="local: this environment (default); docker: inside the --image CELL's pinned image")
    p_band.add_argument("--device", default="auto", help="auto (cuda when visible), cpu, cuda, cuda:N")
    p_band.add_argument("--determinism", default="strict", help="strict, warn or default")
    p_band.add_argument("--threads", help="torch intra-op threads: N, or all (torch's default)")
    p_band.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on GPU")
    p_band.add_argument("--image", metavar="CELL", help="the baseline runs inside this matrix cell's image (docker backend)")
    add_docker(p_band)
    p_band.set_defaults(func=cmd_band)

    p_cmp = sub.add_parser("compare", help="re-render the comparison of result records (merge results from several machines)")
    p_cmp.add_argument("paths", nargs="+", help="results directories, record.json files or --json reports")
    p_cmp.add_argument("--json", dest="json_out", metavar="FILE", help="write the records plus the comparison as JSON")
    p_cmp.add_argument("--markdown", metavar="FILE", help="write a Markdown table (for a pull-request comment)")
    add_html(p_cmp)
    add_detail(p_cmp)
    add_tolerance_flags(p_cmp)
    add_allow_data_change(p_cmp)
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
    from . import diverge as cli_diverge
    from . import export as cli_export

    cli_export.register(sub)
    cli_diverge.register(sub)
    return parser


# --------------------------------------------------------------------------- arguments -> typed options


def run_options(args: argparse.Namespace, *, single: bool, band_only: bool = False) -> RunOptions:
    """``harness run`` / ``matrix`` / ``band`` arguments as :class:`RunOptions` (harness.api builds them)."""
    from ..api import build_run_options

    return build_run_options(
        args.bundle, command="band" if band_only else ("run" if single else "matrix"),
        backend=getattr(args, "backend", None), image=getattr(args, "image", None),
        device=getattr(args, "device", None), devices=getattr(args, "devices", None),
        cells=getattr(args, "cells", None), determinism=args.determinism, threads=args.threads, tf32=args.tf32,
        repeats=getattr(args, "repeats", 1), isa=getattr(args, "isa", None), n=getattr(args, "n", 8),
        band=getattr(args, "band", "auto"), band_seeds=args.band_seeds, cell_seeds=getattr(args, "cell_seeds", 0),
        band_from=getattr(args, "band_from", None), data=args.data, data_dir=args.data_dir, trainer=args.trainer,
        trainer_path=args.trainer_path, trainer_cmd=args.trainer_cmd, seed_key=getattr(args, "seed_key", None),
        trainer_cwd=getattr(args, "trainer_cwd", None), out=args.out, resume=args.resume, force=args.force,
        trace=args.trace, progress=not args.no_progress, jobs=args.jobs, cold=bool(getattr(args, "cold", False)),
        strict_config=getattr(args, "strict_config", False), timeout=args.timeout,
        data_path=getattr(args, "data_feed", None), **image_values(args), **slurm_values(args))


def resume_options(args: argparse.Namespace) -> tuple[str | None, bool]:
    """``--out`` and ``--resume [DIR]`` as (results directory, resume); ``--force`` needs ``--resume``."""
    from ..api import resume_options as resolve

    return resolve(args.out, args.resume, args.force)


# --------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    return _execute(args, run_options(args, single=True), tolerances(args))


def cmd_matrix(args: argparse.Namespace) -> int:
    return _execute(args, run_options(args, single=False), tolerances(args))


def cmd_band(args: argparse.Namespace) -> int:
    from ..judge import Tolerances

    return _execute(args, run_options(args, single=True, band_only=True), Tolerances())


def _execute(args: argparse.Namespace, opts: RunOptions, tol: Any) -> int:
    """Run, and when the run stops short (Ctrl-C, SIGTERM, cells interrupted or never recorded), say on
    stderr the command that finishes it: this one with ``--resume DIR``."""
    from ..record import Status
    from ..runner import execute

    held: list[Any] = []

    def command() -> str:  # the results directory as the user named it, else the one the harness chose
        return resume_command(getattr(args, "argv", None) or [], opts.out or str(held[-1]))

    try:
        comparison = execute(opts, report_options(args), tol, on_results_dir=held.append)
    except (KeyboardInterrupt, Interrupted) as exc:
        if held:  # said by _dispatch, after the line that says what was kept
            exc.resume_with = command()  # type: ignore[attr-defined]
        raise
    if held and (comparison.missing or any(c.status is Status.INTERRUPTED for c in comparison.cells)):
        _say_resume(command())
    return verdict_exit(comparison)


_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


def _is_value(word: str) -> bool:
    """Whether argparse takes ``word`` as a value rather than an option (a negative number, or words with a space)."""
    return not word.startswith("-") or word == "-" or " " in word or bool(_NUMBER.match(word))


def resume_command(argv: list[str], results: str) -> str:
    """The command that finishes an unfinished run, shell-quoted: ``harness`` and the user's own arguments,
    less ``--out``/``-o``, ``--resume [DIR]`` and ``--force`` (each with its value), plus ``--resume RESULTS``.

    ``argv`` is a line argparse accepted, so an abbreviated long option (``--res``) is unambiguous."""
    words: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":  # the rest is positional: --resume goes before it
            words += ["--resume", results, *argv[i - 1:]]
            return shlex.join(["harness", *words])
        name, eq, _ = word.partition("=")
        if len(name) > 2 and word.startswith("--") and "--out".startswith(name):
            i += 0 if eq else 1
        elif len(name) > 2 and word.startswith("--") and "--resume".startswith(name):
            i += 1 if not eq and i < len(argv) and _is_value(argv[i]) else 0
        elif len(name) > 2 and word.startswith("--") and "--force".startswith(name):
            pass
        elif word.startswith("-o") and not word.startswith("--"):  # -o DIR, -oDIR, -o=DIR
            i += 1 if word == "-o" else 0
        else:
            words.append(word)
    return shlex.join(["harness", *words, "--resume", results])


def _say_resume(command: str) -> None:
    """One plain line on stderr, never wrapped: a terminal or a log shows the command whole, to copy."""
    sys.stderr.write(f"resume with: {command}\n")
    sys.stderr.flush()


def cmd_compare(args: argparse.Namespace) -> int:
    from ..api import compare

    return verdict_exit(compare(*args.paths, json_out=args.json_out, markdown=args.markdown, html=args.html,
                                detail=args.detail, alpha=args.alpha, tol=args.tol, tolerances=args.tolerances,
                                allow_data_change=args.allow_data_change, show=True))


# --------------------------------------------------------------------------- entry point


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it takes Ctrl-C's way out (records, cleanup, report)."""


class _SigtermAsInterrupt:
    """While active, the first SIGTERM raises :class:`Terminated`; later ones are ignored so cleanup finishes."""

    def __init__(self) -> None:
        self.received = False
        self.previous: Any = None

    def __enter__(self) -> "_SigtermAsInterrupt":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received:
            return
        self.received = True
        raise Terminated()

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the line as given: what "resume with" repeats
    with _SigtermAsInterrupt() as term:
        try:
            return _dispatch(args, debug)
        except KeyboardInterrupt:  # a SIGTERM that came while an error was being reported
            return EXIT_TERMINATED if term.received else EXIT_INTERRUPTED


def _dispatch(args: argparse.Namespace, debug: bool) -> int:
    try:
        return int(args.func(args))
    except Interrupted as exc:
        terminated = isinstance(exc.__context__, Terminated)
        print(f"harness: {'terminated (SIGTERM); ' if terminated else ''}{exc.one_line()}", file=sys.stderr)
        _say_resume_of(exc)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except Terminated as exc:
        print("harness: terminated (SIGTERM); records already written are kept", file=sys.stderr)
        _say_resume_of(exc)
        return EXIT_TERMINATED
    except KeyboardInterrupt as exc:
        print("harness: interrupted; records already written are kept", file=sys.stderr)
        _say_resume_of(exc)
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


def _say_resume_of(exc: BaseException) -> None:
    command = getattr(exc, "resume_with", None)
    if command:
        _say_resume(command)


if __name__ == "__main__":
    sys.exit(main())
