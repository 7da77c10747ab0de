"""The terminal's loss column: curves and deltas as block characters (pure), and where the table shows them."""

from __future__ import annotations

import io
import math

from rich.console import Console

from harness.judge import compare
from harness.report import print_report
from harness.spark import BLOCKS, SAME, delta_line, delta_mark, loss_columns, sparkline

from tests.records import record, with_env


def test_sparkline_spans_lowest_to_highest() -> None:
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert sparkline([8, 1]) == "█▁"
    assert sparkline([3.0, 3.0, 3.0]) == "▁▁▁"  # flat: no made-up shape


def test_sparkline_squeezes_to_its_width_by_bucket_means() -> None:
    line = sparkline([float(i) for i in range(100)], width=10)
    assert len(line) == 10 and line[0] == "▁" and line[-1] == "█"
    assert list(line) == sorted(line, key=BLOCKS.index)
    assert sparkline([0, 0, 10, 10], width=2) == "▁█"


def test_sparkline_blanks_what_is_not_a_number() -> None:
    assert sparkline([1.0, None, math.nan, 2.0]) == "▁  █"
    assert sparkline([1.0]) == "" and sparkline([]) == "" and sparkline([math.inf, 1.0]) == ""
    assert sparkline(["1", True, 2.0, 3.0]) == "  ▁█"


def test_delta_marks_are_on_a_fixed_log_scale() -> None:
    assert delta_mark(0.5, 0.5) == SAME
    assert delta_mark(1.0, math.nextafter(1.0, 2.0)) == "▁"  # one ulp
    assert delta_mark(1.0, 1.0 + 3e-9) == "▄"   # 1e-10 <= rel < 1e-8
    assert delta_mark(1.0, 1.0 + 3e-7) == "▅"
    assert delta_mark(1.0, 2.0) == "█"
    assert delta_mark(None, 1.0) == " "
    assert delta_mark(0.0, 1e-30) == "█"  # relative to the larger: a zero against anything is far


def test_delta_line_shows_where_curves_part_and_keeps_the_worst_of_each_bucket() -> None:
    base = [1.0 / e for e in range(1, 9)]
    moved = base[:5] + [x * (1 + 1e-5) for x in base[5:]]
    assert delta_line(moved, base) == "·····▆▆▆"
    assert delta_line(base, base) == "·" * 8
    one_bad = base[:]
    one_bad[3] *= 2
    assert delta_line(one_bad, base, width=2) == "█·"  # a difference is never averaged away
    assert delta_line([1.0, 2.0, 3.0], [1.0]) == "·"  # only where both have a value
    assert delta_line([], base) == "" and delta_line([None], [1.0]) == ""


def test_loss_columns_baseline_curve_and_others_deltas() -> None:
    h0 = [{"epoch": e, "val_loss": 1.0 / e} for e in range(1, 5)]
    h1 = [{"epoch": e, "val_loss": 1.0 / e + (0.0 if e < 3 else 1e-3)} for e in range(1, 5)]
    key, col = loss_columns({"a": h0, "b": h1, "c": []}, "a")
    assert key == "val_loss" and col["a"] == sparkline([1.0 / e for e in range(1, 5)])
    assert col["b"] == "··▇▇" and col["c"] == ""
    # no baseline curve: each row draws its own; no loss anywhere: nothing
    key, col = loss_columns({"a": [], "b": [{"loss": 2.0}, {"loss": 1.0}]}, "a")
    assert key == "loss" and col == {"a": "", "b": "█▁"}
    assert loss_columns({"a": [{"epoch": 1}], "b": []}, "a") == (None, {})
    assert loss_columns({"a": [{"val_loss": "x"}, "not a row"]}, "a") == (None, {})  # type: ignore[list-item]


def _records() -> list:
    recs = []
    for i, name in enumerate(("cpu-strict-t1", "cpu-strict-t2")):
        rec = with_env(record(name, r2=0.9 - 0.01 * i, sha=f"w{i}"), "2.13.0+cpu", None)
        rec.history = [{"epoch": e, "val_loss": 1.0 / e + (1e-6 * e if i and e > 2 else 0.0)} for e in range(1, 9)]
        recs.append(rec)
    return recs


def _render(width: int, recs: list, **kw: object) -> str:
    console = Console(width=width, record=True, color_system=None, force_terminal=False, **kw)  # type: ignore[arg-type]
    print_report(console, recs, compare(recs))
    return console.export_text()


def test_the_results_table_draws_the_loss_column_where_it_fits() -> None:
    recs = _records()
    wide = _render(200, recs)
    assert "val loss/epoch" in wide and sparkline([1.0 / e for e in range(1, 9)]) in wide
    assert "··▆▆▆▆▆▆" in wide and "each other cell's relative |Δ|" in wide
    assert all(len(ln.rstrip()) <= 200 for ln in wide.splitlines())
    narrow = _render(100, recs)  # the stacked layout has no room for it: left out, not wrapped
    assert "val loss/epoch" not in narrow and "··▆" not in narrow and "verdict:" in narrow
    for rec in recs:
        rec.history = []
    assert "val loss/epoch" not in _render(200, recs)


class _AsciiFile(io.StringIO):
    encoding = "ascii"


def test_no_loss_column_on_a_console_without_unicode() -> None:
    assert "val loss/epoch" not in _render(200, _records(), file=_AsciiFile())
    assert "val loss/epoch" in _render(200, _records(), file=io.StringIO())
