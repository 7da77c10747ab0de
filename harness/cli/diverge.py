"""`harness diverge A B`: the first training step where two cells' runs part.

Wired into the main CLI by ``harness.cli`` through :func:`register`; the comparison is
:mod:`harness.diverge` (pure); reading the records and traces (hostile files: bounded,
no link followed) is here.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import InputError
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


def _cell(path: str, label: str) -> tuple[Any, Any]:
    """The record and parsed trace of one cell; one line naming which and how when there is no trace."""
    from ..diverge import TRACE_FILE, read_trace
    from ..record import RECORD_FILE, read

    p = Path(path)
    rec_path = p / RECORD_FILE if p.is_dir() else p
    rec = read(rec_path)  # hostile input, like the trace: harness.safeio
    trace_path = rec_path.parent / TRACE_FILE
    how = "rerun the cell with --trace (harness run/matrix ... --trace)"
    if rec.trace is not None and rec.trace.get("file") is None and rec.trace.get("why"):
        raise InputError(f"{label} {path}", f"has no trace: {rec.trace['why']}", hint=how)
    try:
        trace = read_trace(trace_path)
    except InputError as exc:
        raise InputError("", exc.message, hint=exc.hint or how) from None
    if trace is None:
        raise InputError(f"{label} {path}", f"has no {TRACE_FILE} (the run was made without --trace)", hint=how)
    return rec, trace


def cmd_diverge(args: argparse.Namespace) -> int:
    from ..diverge import diverge, render
    from ..record import atomic_write_text, dumps
    from ..report import console

    if args.html:
        from ..report_html import check_target

        check_target(args.html)
    rec_a, trace_a = _cell(args.a, "A")
    rec_b, trace_b = _cell(args.b, "B")
    result = diverge(trace_a, trace_b, rec_a.retrained, rec_b.retrained, f"{rec_a.cell} ({args.a})",
                     f"{rec_b.cell} ({args.b})")
    from ..causes import classify

    finding = classify(rec_a, rec_b, result)
    result.cause = finding.to_dict() if finding is not None else None
    out = console()
    for line in render(result):
        out.print(line, soft_wrap=True, markup=False, highlight=False)
    if args.json_out:
        atomic_write_text(args.json_out, dumps(result.to_dict()))
    if args.html:
        from ..report_html import diverge_page, write_page

        write_page(args.html, diverge_page(result, trace_a, trace_b))
    return parting_exit(result.parting)
