"""`harness export RESULTS_DIR [--cell NAME] -o DIR`: a run's cell as a new optuna_best/ directory.

Wired into the main CLI by ``harness.cli`` through :func:`register`; the work is in
:mod:`harness.export`.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from ..errors import EXIT_OK, UsageError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export", help="write one cell of a run as a new optuna_best/ (config, trial_info, scaler, weights) to start from",
        description="harness export RESULTS_DIR [--cell NAME] -o DIR")
    p.add_argument("results", metavar="RESULTS_DIR", help="the --out directory of a harness run or matrix")
    p.add_argument("--cell", help="the cell to export (default: the first cell that ran ok, in run order)")
    p.add_argument("-o", "--output", metavar="DIR", help="the optuna_best directory to write (new or empty)")
    p.add_argument("--force", action="store_true", help="replace -o when it is not empty")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import export
    from ..report import console

    if not args.output:
        raise UsageError("harness export needs -o DIR (the optuna_best directory to write)",
                         hint="e.g. harness export harness-results/run-1 -o optuna_best_v2")
    done = export(args.results, args.output, args.cell, force=args.force)
    err = console(stderr=True)
    for w in done.warnings:
        err.print(f"! {w}", style="yellow", soft_wrap=True, markup=False, highlight=False)
    out = console()
    out.print(f"exported cell {done.cell} to {done.out}: {', '.join(done.files)}", soft_wrap=True, markup=False,
              highlight=False)
    out.print(f"target_scaler.joblib: {done.scaler}", soft_wrap=True, markup=False, highlight=False)
    again = f"harness run {shlex.quote(str(done.out))}"
    if done.data_dir:
        again += f" --data-dir {shlex.quote(done.data_dir)}"
    out.print(f"rerun it: {again}", soft_wrap=True, markup=False, highlight=False)
    return EXIT_OK
