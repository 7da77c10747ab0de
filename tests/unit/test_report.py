"""Rendering at a fixed width into a colourless console, read as a person would."""

from __future__ import annotations

from rich.console import Console

from harness.judge import compare
from harness.record import ErrorInfo, ResultRecord, Status
from harness.report import markdown, print_report

from tests.records import record, seed_band, with_env


def render(records: list[ResultRecord], missing: list[str] | None = None) -> str:
    console = Console(width=220, record=True, color_system=None, force_terminal=False)
    print_report(console, records, compare(records, missing=missing or []))
    return console.export_text()


def test_tables_say_what_a_person_needs() -> None:
    recs = [with_env(record("cpu-torch2.13"), "2.13.0+cpu", None),
            with_env(record("cu130-torch2.14", r2=0.85, sha="w2"), "2.14.1+cu130", "13.0")]
    recs += seed_band([0.88, 0.90, 0.92, 0.89, 0.91, 0.905, 0.895, 0.90])
    text = render(recs)
    assert "Environment (measured inside each run)" in text
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.strip().startswith(("cpu-torch", "cu130-torch"))}
    assert "2.13.0+cpu" in text and "2.14.1+cu130" in text and "NVIDIA H200" in text and "580.65.06" in text
    assert "strict" in text and "det-algos" not in text  # the mode's own switches go without saying
    result_rows = [ln for ln in text.splitlines() if ln.strip().startswith("cu130-torch2.14") and "drifted" in ln]
    assert result_rows, text
    assert "≠trial ≠first" in result_rows[0]
    assert "-5.00e-02" in text  # ΔR² of the drifted target
    assert "Overall: drifted" in text
    assert lines
    # each rung the cells reached is said in one line, and so is the false-alarm rate behind "drifted"
    assert "bitwise: the retrained weights are identical to the reference's" in text
    assert "drifted: outside that interval" in text and "α = 0.01: the chance that a cell" in text
    assert "|Δ|/seed sd" in text and "p=" in result_rows[0]


def test_without_a_seed_band_a_difference_is_not_called_drifted() -> None:
    text = render([with_env(record("cu130-torch2.14", r2=0.85, sha="w2"), "2.14.1+cu130", "13.0")])
    assert "Overall: not judged" in text and "drifted" not in text.split("Overall")[1]
    assert "not judged: 1 cell(s) beyond numerical noise" in text
    assert "--band-seeds 8" in text


def test_failure_reason_is_shown() -> None:
    bad = record("broken", status=Status.FAILED)
    bad.error = ErrorInfo(kind="run", message="container OOM-killed (exit 137)")
    text = render([with_env(record("ok"), "2.13.0", None), bad])
    assert "✗ broken: container OOM-killed (exit 137)" in text
    assert "Overall: failed" in text


def test_skip_and_missing_cells_are_shown_with_their_reasons() -> None:
    skipped = record("cu124-torch2.5", status=Status.SKIPPED, message="driver 470.1 is below 525.60.13")
    text = render([with_env(record("cpu"), "2.13.0", None), skipped], missing=["cpu-default-t1"])
    assert "- cu124-torch2.5 skipped: driver 470.1 is below 525.60.13" in text
    assert "… cpu-default-t1 incomplete: planned, but left no record" in text
    assert "Overall: incomplete" in text and "1 skipped" in text


def test_per_target_table_is_not_printed_empty() -> None:
    text = render([record("a", status=Status.FAILED)])
    assert "Per target" not in text


def test_markdown_is_a_valid_table() -> None:
    md = markdown([with_env(record("a"), "2.13.0", None)], compare([record("a")]))
    tables = [block.splitlines() for block in md.split("\n\n") if block.startswith("|")]
    assert len(tables) == 2, md  # results, then per target
    for rows in tables:
        widths = {ln.replace("\\|", "").count("|") for ln in rows}
        assert len(widths) == 1, md  # every row of a table has the same number of columns
    assert "**reproduced**" in md


def test_the_determinism_column_names_only_what_differs_from_the_mode() -> None:
    from harness.report import determinism_label

    full = {"mode": "strict", "deterministic_algorithms": True, "cudnn_deterministic": True,
            "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONHASHSEED": "0", "matmul_allow_tf32": False}
    assert determinism_label(full) == "strict"
    assert determinism_label({**full, "cudnn_deterministic": False}) == "strict (cudnn-default)"
    assert determinism_label({**full, "matmul_allow_tf32": True, "PYTHONHASHSEED": None}) == "strict (+TF32, hashseed unset)"
    default = {**full, "mode": "default", "deterministic_algorithms": False, "cudnn_deterministic": False,
               "CUBLAS_WORKSPACE_CONFIG": None, "PYTHONHASHSEED": None}
    assert determinism_label(default) == "default"
    assert determinism_label({**default, "PYTHONHASHSEED": "0"}) == "default (hashseed 0)"
    assert determinism_label({}) == "—"
