"""Running a plan for real (local child processes): skips, missing cells and what a run writes."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from harness import record
from harness.backends.local import LocalBackend
from harness.cli.common import verdict_exit
from harness.judge import Tolerances, Verdict
from harness.options import ReportOptions
from harness.plan import Cell, Job, Plan
from harness.record import Status
from harness.runner import execute_plan, load_and_check
from harness.options import RunOptions


def test_a_skipped_cell_beside_a_reproduced_one_exits_0_and_says_why(example: Path, tmp_path: Path, capsys,
                                                                     monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "220")
    bundle, _ = load_and_check(RunOptions(bundle=str(example)))
    plan = Plan("local", [
        Cell("cpu-strict-t1", threads=1),
        Cell("cu124-torch2.5", device="cuda", skip_reason="driver 470.57.02 is below 525.60.13, the oldest that runs "
                                                           "CUDA 12.x wheels (minor-version compatibility)"),
    ])
    out = tmp_path / "out"
    job = Job(bundle_dir=bundle.root, data_path=bundle.data.resolved, results_dir=str(out), run_id="r1")
    comparison = execute_plan(plan, LocalBackend(), job, ReportOptions(json_out=str(tmp_path / "r.json")),
                              Tolerances(), progress_enabled=False)
    assert comparison.overall is Verdict.REPRODUCED and verdict_exit(comparison) == 0
    text = capsys.readouterr().out
    assert "- cu124-torch2.5 skipped: driver 470.57.02 is below 525.60.13" in text
    assert "Overall: reproduced" in text and "1 skipped" in text
    skipped = record.read(out / "cu124-torch2.5" / "record.json")
    assert skipped.status is Status.SKIPPED and skipped.run_id == "r1" and "525.60.13" in skipped.error.message
    # run.json lists both planned cells in order; report.json judges them
    assert record.read_manifest(out).cells == ["cpu-strict-t1", "cu124-torch2.5"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert [c["verdict"] for c in report["comparison"]["cells"]] == ["reproduced", "skipped"]


def test_report_json_round_trips_through_compare(example: Path, tmp_path: Path) -> None:
    """A report written by one run is read back as typed records by another (harness compare r.json)."""
    bundle, _ = load_and_check(RunOptions(bundle=str(example)))
    out = tmp_path / "out"
    job = Job(bundle_dir=bundle.root, data_path=bundle.data.resolved, results_dir=str(out), run_id="r2")
    execute_plan(Plan("local", [Cell("a", threads=1)]), LocalBackend(), job, ReportOptions(), Tolerances(),
                 progress_enabled=False)
    rs = record.load(out / "report.json")
    assert [r.cell for r in rs.records] == ["a"] and rs.records[0].ok
    assert rs.records[0] == record.read(out / "a" / "record.json")
