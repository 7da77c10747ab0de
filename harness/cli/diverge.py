"""`harness diverge A B`: the first training step where two cells' runs part.

Wired into the main CLI by ``harness.cli`` through :func:`register`; the comparison is
:mod:`harness.diverge` (pure); reading the records and traces (hostile files: bounded,
no link followed) is :func:`harness.api.diverge`.
"""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_html, parting_exit


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "diverge", help="the first training step where two cells' runs part (loss bits, then parameters), the first "
                        "tensor that differs, and how far apart their metrics end; needs runs made with --trace",
        description="harness diverge A B (exit 0: never part; 3: they part, or evaluation-only drift)")
    p.add_argument("a", metavar="A", help="a cell directory of a run made with --trace (or its record.json)")
    p.add_argument("b", metavar="B", help="the other cell directory (or record.json)")
    p.add_argument("--json", dest="json_out", metavar="FILE", help="write the comparison as JSON")
    add_html(p, help="write one self-contained HTML page (opens offline): both loss curves per step, the step "
                     "where they part, the first differing tensor, how far apart the metrics end")
    p.set_defaults(func=cmd_diverge)


def cmd_diverge(args: argparse.Namespace) -> int:
    from ..api import diverge

    return parting_exit(diverge(args.a, args.b, json_out=args.json_out, html=args.html, show=True).parting)
