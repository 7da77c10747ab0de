"""``--html FILE``: the page builder (pure), its escaping, and the CLI's handling of the file.

The page in a real browser is tests/engine/test_report_html_browser.py.
"""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import record as record_mod
from harness.cli import main
from harness.diverge import Step, Trace, diverge
from harness.errors import InputError
from harness.judge import Tolerances, compare
from harness.record import ResultRecord, Status
from harness.report_html import (NO_BAND, NO_TRACES, RunPage, check_target, diverge_page, esc, plot_label, run_page,
                                 write_page)
from harness.worker.trace import TRACE_SCHEMA

from tests.conftest import REPO, patience
from tests.records import record, with_env

HOSTILE = '<script>alert("x")</script>$\\frac{'  # HTML and matplotlib's mathtext both read this
EXTERNAL = re.compile(r"""(?:src|href|action|poster|data)\s*=\s*["']?\s*(?:https?:)?//""", re.I)


def external_refs(page: str) -> list[str]:
    """Anything a browser would fetch: an http(s) or protocol-relative URL in an attribute, a CSS url() or @import."""
    return EXTERNAL.findall(page) + re.findall(r"url\((?!['\"]?#)|@import", page, re.I)


def _trace(losses: list[float], states: list[str] | None = None) -> Trace:
    states = states or ["0" * 32] * len(losses)
    return Trace(source="reference", steps=[Step(1 + i // 4, i + 1, v.hex(), s)
                                            for i, (v, s) in enumerate(zip(losses, states))], tensors={})


def _cells() -> list[ResultRecord]:
    a = with_env(record("cpu-strict-t1", r2=0.9), "2.13.0+cpu", None)
    b = with_env(record(HOSTILE, r2=0.9 + 2e-7, sha="w2"), "2.13.0+cpu", None)
    b.env.threads = 2
    for r in (a, b):
        r.trace = {"file": "trace.jsonl", "steps": 8}
    return [a, b]


def _band(n: int = 3) -> list[ResultRecord]:
    out = []
    for i in range(1, n + 1):
        m = with_env(record(f"band-ulp-{i}", r2=0.9 + i * 1e-7, loss=0.1 + i * 1e-8, sha=f"b{i}"), "2.13.0+cpu", None)
        m.band = {"kind": "ulp", "member": i}
        m.perturbation = {"applied": True, "tensor": "w", "index": 0, "direction": "+inf"}
        out.append(m)
    return out


def _page(records: list[ResultRecord], traces: dict | None = None, parts: dict | None = None) -> str:
    comparison = compare(records, Tolerances())
    return run_page(RunPage(command="matrix", records=records, comparison=comparison, bundle="optuna_best",
                            traces=traces or {}, parts_at=parts or {}))


def test_a_matrix_page_has_every_section_and_its_figures() -> None:
    recs = _cells()
    losses = [1.0, 0.8, 0.6, 0.5, 0.45, 0.4, 0.38, 0.35]
    other = losses[:3] + [v + 1e-7 for v in losses[3:]]
    page = _page(_band() + recs, {recs[0].cell: _trace(losses), recs[1].cell: _trace(other)})
    for heading in ("Environment (measured inside each run)", "Results (validation split", "Loss curves",
                    "Δ per metric against the reference, and the seed band", "Attribution: which axis moved the metrics"):
        assert heading in page, heading
    assert page.count("<svg") == 3  # loss curves, deltas, attribution
    assert "parts at step 4" in page  # the hostile cell's curve is labelled where it parts
    assert "Band: 3 retrains of the baseline" in page and NO_BAND in page  # ulp members only: no interval drawn
    assert 'class="verdict ok"' in page  # the verdict column is coloured
    assert "run" in page and "Overall:" in page
    assert external_refs(page) == [] and "<script" not in page.lower() and "<link" not in page.lower()


def test_a_hostile_cell_name_is_escaped_everywhere_and_never_injects() -> None:
    recs = _cells()
    recs[1].warnings.append('</li><img src=x onerror="alert(1)">')
    page = _page(recs, {r.cell: _trace([1.0, 0.5, 0.4, 0.3]) for r in recs})
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page  # shown, as text
    assert "onerror=&quot;alert(1)&quot;" in page
    # in the figures (inline SVG), the name is text too: matplotlib escapes it, and never parses it as mathtext
    svg = page[page.index("<svg"):]
    assert "&lt;script&gt;" in svg and "<script" not in svg


def test_plot_labels_cannot_reach_matplotlibs_parsers() -> None:
    assert plot_label("$x^2$") == r"\$x^2\$"
    assert plot_label("_hidden").startswith("\u200b")  # a leading _ would hide it from the legend
    assert plot_label("a\x00b\nc") == "a?b?c"
    assert len(plot_label("x" * 500)) <= 48


def test_each_section_says_plainly_when_it_has_nothing() -> None:
    one = [with_env(record("only"), "2.13.0+cpu", None)]
    page = _page(one)
    assert NO_TRACES in page
    assert "no attribution: fewer than two cells ran" in page
    assert NO_BAND in page
    assert page.count("<svg") == 1  # its Δ against the recorded trial: the one figure one cell gives
    unrecorded = [with_env(record("only", recorded=False), "2.13.0+cpu", None)]
    assert "fewer than two cells ran: no Δ to draw" in _page(unrecorded) and "<svg" not in _page(unrecorded)


def test_cells_without_a_trace_draw_their_per_epoch_history() -> None:
    recs = _cells()
    for r in recs:
        r.trace = None
        r.history = [{"epoch": 1, "train_loss": 0.9, "val_loss": 0.8}, {"epoch": 2, "train_loss": 0.5, "val_loss": 0.6}]
    page = _page(recs)
    assert NO_TRACES in page and "per-epoch losses as each record holds them" in page
    assert page.count("<svg") == 3


def test_a_traced_run_names_the_cells_that_have_no_trace() -> None:
    recs = _cells()
    recs[1].trace = {"file": None, "why": "the trainer never called ctx.on_step"}
    page = _page(recs, {recs[0].cell: _trace([1.0, 0.5]), recs[1].cell: None})
    assert "no trace (the trainer never called ctx.on_step)" in page


def test_a_failed_cell_keeps_its_row_and_reason() -> None:
    recs = _cells() + [record("broken", status=Status.FAILED, message="CUDA error <oops>")]
    page = _page(recs)
    assert 'class="verdict bad"' in page and "CUDA error &lt;oops&gt;" in page


def test_a_band_on_its_own_shows_its_members_against_their_mean() -> None:
    page = _page(_band(4))
    assert "Band members (one retrain each)" in page and "band-ulp-4" in page
    assert "Δ vs the band" in page.replace("&#x27;", "'") or "the band's mean" in page.replace("&#x27;", "'")
    assert page.count("<svg") >= 1


def test_the_diverge_page_shows_both_curves_the_parting_step_and_the_tensor() -> None:
    a = _trace([1.0, 0.8, 0.6, 0.5], ["a" * 32] * 4)
    b = _trace([1.0, 0.8, 0.61, 0.5], ["a" * 32, "a" * 32, "b" * 32, "b" * 32])
    a.tensors[3] = {"<b>layer</b>.weight": "1" * 32}
    b.tensors[3] = {"<b>layer</b>.weight": "2" * 32}
    result = diverge(a, b, {"val_loss": 0.5}, {"val_loss": 0.51}, "A <x>", "B")
    page = diverge_page(result, a, b)
    assert "parts at step" in page and ">3<" in page
    assert "&lt;b&gt;layer&lt;/b&gt;.weight (step 3)" in page and "<b>" not in page
    assert page.count("<svg") == 1 and "A &lt;x&gt;" in page
    assert external_refs(page) == []


# --------------------------------------------------------------------------- the file


def test_the_file_is_refused_when_a_directory_or_a_link(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "target").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(InputError, match="is a directory.*--html report.html"):
        check_target(str(tmp_path / "d"))
    with pytest.raises(InputError, match="symbolic link"):
        write_page(str(tmp_path / "link"), "<p>x</p>")
    assert (tmp_path / "target").read_text() == "keep"
    write_page(str(tmp_path / "new" / "r.html"), "<p>x</p>")
    assert (tmp_path / "new" / "r.html").read_text() == "<p>x</p>"


def test_a_page_that_cannot_be_written_is_one_line_naming_the_records(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError) as exc:
        write_page(str(tmp_path / "file" / "r.html"), "<p/>", records_at="/res")
    line = exc.value.one_line()
    assert "could not be written" in line and "records are kept in /res" in line and "\n" not in line


def _results(tmp_path: Path, recs: list[ResultRecord], traces: dict[str, list[float]]) -> Path:
    out = tmp_path / "res"
    record_mod.write_manifest(out, record_mod.RunManifest(run_id="r1", cells=[r.cell for r in recs], backend="local",
                                                          bundle="/x/optuna_best", started_at="2026"))
    for r in recs:
        r.run_id = "r1"
        (out / r.cell).mkdir(parents=True, exist_ok=True)
        record_mod.write(out / r.cell / record_mod.RECORD_FILE, r)
    for cell, losses in traces.items():
        lines = [json.dumps({"schema": TRACE_SCHEMA, "source": "reference"})]
        lines += [json.dumps({"epoch": 1, "step": i + 1, "loss": v.hex(), "state": "0" * 32})
                  for i, v in enumerate(losses)]
        (out / cell / "trace.jsonl").write_text("\n".join(lines) + "\n")
    return out


def test_compare_writes_the_page_with_the_traces_beside_the_records(tmp_path: Path, capsys) -> None:
    a = with_env(record("cpu-a"), "2.13.0+cpu", None)
    b = with_env(record("cpu-b", r2=0.95, sha="w9"), "2.13.0+cpu", None)  # drifted: R² moved by 0.05
    for r in (a, b):
        r.trace = {"file": "trace.jsonl", "steps": 3}
        r.spec = {"bundle_dir": "/x/optuna_best"}
    out = _results(tmp_path, [a, b], {"cpu-a": [1.0, 0.5, 0.25], "cpu-b": [1.0, 0.5, 0.3]})
    page = tmp_path / "report.html"
    assert main(["compare", str(out), "--html", str(page), "--tol", "r2=abs:0.01"]) == 3  # the verdict's, page or not
    text = page.read_text()
    assert "drifted" in text and "parts at step 3" in text and text.count("<svg") == 3
    assert "harness compare: optuna_best" in text


def test_compare_refuses_a_directory_as_the_page_in_one_line(tmp_path: Path, capsys) -> None:
    out = _results(tmp_path, [record("cpu-a"), record("cpu-b")], {})
    assert main(["compare", str(out), "--html", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a directory" in err[0] and "--html" in err[0]


def test_a_page_that_cannot_be_written_exits_2_and_keeps_the_records(tmp_path: Path, capsys) -> None:
    out = _results(tmp_path, [record("cpu-a"), record("cpu-b")], {})
    (tmp_path / "blocker").write_text("")
    assert main(["compare", str(out), "--html", str(tmp_path / "blocker" / "r.html")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("harness:")]
    assert len(err) == 1 and "could not be written" in err[0]
    assert (out / "cpu-a" / "record.json").is_file()


def test_matplotlib_is_imported_only_for_a_page() -> None:
    code = ("import sys, harness.cli, harness.runner, harness.report, harness.report_html, harness.cli.diverge; "
            "from harness.cli import build_parser; build_parser(); assert 'matplotlib' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=patience(120))


def test_every_command_that_judges_has_html(capsys) -> None:
    for cmd in ("run", "matrix", "band", "compare", "diverge"):
        assert main([cmd, "--help"]) == 0
        assert "--html FILE" in capsys.readouterr().out, cmd


def test_diverge_writes_its_page_and_keeps_its_exit_code(tmp_path: Path, capsys) -> None:
    a, b = record("cpu-a"), record("cpu-b", r2=0.91)
    for r in (a, b):
        r.trace = {"file": "trace.jsonl", "steps": 3}
    out = _results(tmp_path, [a, b], {"cpu-a": [1.0, 0.5, 0.25], "cpu-b": [1.0, 0.5, 0.3]})
    page = tmp_path / "d.html"
    assert main(["diverge", str(out / "cpu-a"), str(out / "cpu-b"), "--html", str(page)]) == 3
    text = page.read_text()
    assert "harness diverge: cpu-a" in text and ">3<" in text and text.count("<svg") == 1
    assert main(["diverge", str(out / "cpu-a"), str(out / "cpu-b"), "--html", str(tmp_path)]) == 2


def test_a_curve_equal_to_one_drawn_is_named_not_drawn_twice() -> None:
    recs = _cells()
    same = _trace([1.0, 0.5, 0.25, 0.2])
    page = _page(recs, {recs[0].cell: same, recs[1].cell: _trace([1.0, 0.5, 0.25, 0.2])})
    assert "loss = cpu-strict-t1&#x27;s" in page or "loss = cpu-strict-t1's" in page


def test_a_long_trace_keeps_the_page_small() -> None:
    import random

    rng = random.Random(0)
    recs = _cells()
    long = [1.0 / (1 + i / 100) + rng.random() * 0.01 for i in range(100_000)]
    page = _page(recs, {recs[0].cell: _trace(long), recs[1].cell: _trace([v * (1 + 1e-6) for v in long])})
    assert "one step in 50 drawn" in page
    assert len(page.encode()) < 600_000, len(page.encode())


def _abs_report_line(err: str, page: Path) -> list[str]:
    return [ln for ln in err.splitlines() if ln == f"report: {page}"]


def test_compare_says_where_it_wrote_the_page_as_an_absolute_path(tmp_path: Path) -> None:
    # A real process, given a relative --html, as a user types it: the line names the absolute path.
    out = _results(tmp_path, [record("cpu-a"), record("cpu-b")], {})
    run = subprocess.run([sys.executable, "-m", "harness", "compare", str(out), "--html", "pages/report.html"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=patience(120),
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-2000:]
    page = tmp_path / "pages" / "report.html"
    assert page.is_file() and _abs_report_line(run.stderr, page), run.stderr[-2000:]
    assert "report:" not in run.stdout  # stdout stays the report itself


def test_diverge_says_where_it_wrote_the_page_and_nothing_when_refused(tmp_path: Path, capsys,
                                                                        monkeypatch) -> None:
    a, b = record("cpu-a"), record("cpu-b", r2=0.91)
    for r in (a, b):
        r.trace = {"file": "trace.jsonl", "steps": 3}
    out = _results(tmp_path, [a, b], {"cpu-a": [1.0, 0.5, 0.25], "cpu-b": [1.0, 0.5, 0.3]})
    monkeypatch.chdir(tmp_path)
    main(["diverge", str(out / "cpu-a"), str(out / "cpu-b"), "--html", "./sub/../d.html"])
    assert _abs_report_line(capsys.readouterr().err, tmp_path / "d.html")
    assert main(["diverge", str(out / "cpu-a"), str(out / "cpu-b"), "--html", str(tmp_path)]) == 2
    assert "report:" not in capsys.readouterr().err  # refused: no page, no line saying there is one


def _header_of(page: str, heading: str) -> list[str]:
    """The header cells of the first table after ``heading``."""
    rest = page[page.index(heading):]
    head = rest[rest.index("<thead>"):rest.index("</thead>")]
    return [html.unescape(h) for h in re.findall(r"<th(?:\s[^>]*)?>(.*?)</th>", head)]


def test_the_results_table_leads_with_the_verdict_and_keeps_rare_columns_behind_each_name() -> None:
    recs = _cells()
    page = _page(recs, {r.cell: _trace([1.0, 0.5, 0.4, 0.3]) for r in recs},
                 {recs[0].cell: "baseline", recs[1].cell: "ep 1 step 4 (loss)"})
    head = _header_of(page, "Results (validation split")
    assert head[:3] == ["verdict", "cell", "evidence"], head
    assert "parts at" in head and "max|Δ| first" in head  # the evidence stays in view
    for rare in ("MSE val", "MAE val", "weights", "archived Δ", "wall"):
        assert rare not in head, rare
        assert f"<dt>{esc(rare)}</dt>" in page, rare  # ... one click away, in each row's disclosure
    assert page.count('<details class="more"><summary>') == 2
    assert "<summary>&lt;script&gt;" in page  # the hostile name is text in the disclosure too
    assert 'data-label="verdict"' in page  # each cell names its column, for the stacked (narrow) layout
