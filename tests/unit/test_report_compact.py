"""The first screen (harness.report_compact) read at 80, 100 and 200 columns.

The verdict on the first line, one line per cell, nothing past the terminal's width, cell names
and numbers whole, the units of every number said, and nothing that did not fail said as a warning.
"""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from harness.judge import compare
from harness.record import ResultRecord, Status
from harness.report import fnum
from harness.report_compact import print_compact

from tests.records import record, seed_band, ulp_band, with_env

CELLS = ["cpu-torch2.13-cpu-strict-t1-native", "cu130-torch2.14-cuda-strict-tdef-baseline",
         "cu130-torch2.14-cuda-default-tdef-native", "cu124-torch2.5-cuda-strict-t1-baseline"]


def matrix(drift: bool = True) -> list[ResultRecord]:
    out = []
    for i, name in enumerate(CELLS[:3]):
        r2 = 0.9 if i == 0 else 0.9 + 1e-3 * i
        if drift and i == 2:
            r2 = 0.5  # far outside every seed
        rec = with_env(record(name, r2=r2, loss=0.1 + 0.5 * (0.9 - r2), sha=f"w{i}"), "2.14.0+cu130" if i else
                       "2.13.0+cpu", "13.0" if i else None)
        out.append(rec)
    out.append(record(CELLS[3], status=Status.FAILED, message="CUDA error: no kernel image for sm_90"))
    band = ulp_band(0.9, 1e-6, 4) + seed_band([0.88, 0.90, 0.92, 0.89, 0.91, 0.905, 0.895, 0.90])
    return out + [with_env(m, "2.13.0+cpu", None) for m in band]


def render(recs: list[ResultRecord], width: int) -> str:
    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    print_compact(console, recs, compare(recs), trial_environment={"torch": "2.13.0+cpu", "device": "AMD EPYC"})
    return console.export_text()


@pytest.mark.parametrize("width", [80, 100, 200])
def test_the_verdict_comes_first_and_nothing_passes_the_width(width: int) -> None:
    recs = matrix()
    text = render(recs, width)
    lines = text.splitlines()
    assert lines[0].startswith("Overall: failed"), text  # one cell failed: the run did not complete its matrix
    assert len(lines) <= 60, text  # at 80 columns each cell and axis takes two lines
    assert all(len(ln.rstrip()) <= width for ln in lines), "\n".join(ln for ln in lines if len(ln.rstrip()) > width)
    tokens = {t for ln in lines for t in re.split(r"[\s│|]+", ln) if t}
    for name in CELLS:  # every cell's name whole, on one line (the failed one too)
        assert name in tokens, f"{name} not whole at {width} columns:\n{text}"
    for rec in recs[:3]:
        assert fnum(rec.retrained["val_loss"]) in tokens, text
    # one line per cell in the cells table, each with its verdict word
    rows = [ln for ln in lines if any(ln.startswith(n) or ln.lstrip().startswith(n) for n in CELLS[:3])]
    assert len(rows) >= 3
    assert "drifted" in text and "same distribution" in text
    # each word of a verdict says what it rests on, and every number its split and units
    assert "α = 0.01" in text and "band:" in text
    assert "validation split" in text and "scaled" in text
    assert "add --detail" in lines[-1]


def test_a_failed_cells_reason_is_never_cut() -> None:
    """A reason often ends in a command to copy: it is printed whole on one line (the terminal wraps it)."""
    recs = matrix(drift=False)
    long = "build it first: harness images build --cells cu124-torch2.5 --wheelhouse /very/long/path/to/wheelhouse"
    recs[3] = record(CELLS[3], status=Status.SKIPPED, message=long)
    text = render(recs, 80)
    assert f"  {long}" in text.splitlines(), text


def test_a_reproduced_run_prints_no_warning() -> None:
    """What did not fail never prints as a warning: no ≠, !, ✗ line when every cell reproduced."""
    recs = [with_env(record(f"cpu-strict-t{i}", r2=0.9, sha="w1"), "2.13.0+cpu", None) for i in (1, 2)]
    recs[1].weights_vs_archived = {"identical": False, "first_difference": "blocks.0.conv.bias", "max_abs_diff": 7e-6}
    text = render(recs, 100)
    assert text.startswith("Overall: reproduced"), text
    marks = [ln for ln in text.splitlines() if ln.lstrip()[:1] in ("≠", "!", "✗")]
    assert marks == [], text
    assert "blocks.0.conv.bias" not in text  # the tensor a retrain first parts at is a detail (--detail)


def test_the_trial_environment_is_said_beside_the_cells() -> None:
    text = render(matrix(), 100)
    assert "AMD EPYC" in text and "NVIDIA H200" in text


def test_only_a_cell_that_parts_gets_a_parting_line() -> None:
    """The traced cells' lines: the baseline parts from nothing, and a cell whose trace never parts from it
    gets no "parts from ... at never" line; one that parts is named with where."""
    recs = [with_env(record(f"cpu-strict-t{i}", r2=0.9, sha="w1"), "2.13.0+cpu", None) for i in (1, 2, 3)]
    console = Console(width=120, record=True, color_system=None, force_terminal=False)
    print_compact(console, recs, compare(recs),
                  parts_at={"cpu-strict-t1": "baseline", "cpu-strict-t2": "never", "cpu-strict-t3": "ep 2 (loss)"})
    lines = [ln.strip() for ln in console.export_text().splitlines() if ln.strip().startswith("↳")]
    assert lines == ["↳ cpu-strict-t3 parts from cpu-strict-t1 at ep 2 (loss)"], lines
