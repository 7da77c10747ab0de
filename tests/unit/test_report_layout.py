"""The report read at 80, 100 and 200 columns: no cell name or number is cut or wrapped."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from harness.judge import compare
from harness.record import ResultRecord
from harness.report import fnum, print_report

from tests.records import record, with_env

CELLS = ["cpu-strict-t1", "cpu-strict-tdef", "cpu-default-t1", "cpu-default-tdef", "cu130-torch2.14-strict-tf32"]


def records() -> list[ResultRecord]:
    out = []
    for i, name in enumerate(CELLS):
        rec = with_env(record(name, r2=0.9 - 0.0123456 * i, sha="w1" if i == 0 else f"w{i}"), "2.13.0+cpu", None)
        rec.retrained["val"]["r2"]["b"] = 0.498765 + i
        rec.retrained["val"]["mse"]["b"] = 498.123
        rec.retrained["val_loss"] = 0.123456789 + i
        out.append(rec)
    return out


def render(width: int) -> str:
    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    recs = records()
    print_report(console, recs, compare(recs))
    return console.export_text()


def numbers(recs: list[ResultRecord]) -> set[str]:
    out = set()
    for rec in recs:
        out.add(fnum(rec.retrained["val_loss"]))
        for fam in ("r2", "mse", "mae"):
            for v in rec.retrained["val"][fam].values():
                out.add(fnum(v, 5))
    return out


@pytest.mark.parametrize("width", [80, 100, 200])
def test_cell_names_and_numbers_are_whole(width: int) -> None:
    text = render(width)
    lines = text.splitlines()
    assert all(len(ln.rstrip()) <= width for ln in lines)
    tokens = {t for ln in lines for t in re.split(r"[\s│|]+", ln) if t}
    for name in CELLS:
        assert name in tokens, f"{name} not whole at {width} columns:\n{text}"
    for n in numbers(records()):
        assert n in tokens, f"{n} not whole at {width} columns:\n{text}"
    for word in ("reproduced", "drifted", "verdict"):
        assert not any(ln.strip().endswith(word[:4]) for ln in lines if word not in ln)
    # t1 and tdef rows of the per-target detail stay distinguishable
    assert sum("cpu-strict-tdef" in ln for ln in lines) >= 2


def test_wide_layout_is_the_tables_narrow_is_stacked() -> None:
    assert "max|ΔR²| rec" in render(200)
    narrow = render(80)
    assert "Results" in narrow and "verdict:" in narrow


@pytest.mark.parametrize("width", [80, 200])
def test_max_abs_columns_have_no_sign(width: int) -> None:
    recs = [with_env(record("a"), "2.13.0", None), with_env(record("b", r2=0.85, sha="w2"), "2.13.0", None)]
    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    print_report(console, recs, compare(recs))
    text = console.export_text()
    results = text[text.index("Results"):text.index("Per target") if "Per target" in text else None]
    assert "+5.00e-02" not in results and "-5.00e-02" not in results and "5.00e-02" in results


def test_a_command_in_a_skip_reason_is_not_wrapped() -> None:
    from harness.record import Status

    cmd = "`docker pull nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04`"
    skipped = record("cu124-torch2.5", status=Status.SKIPPED,
                     message=f"base image nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 is not in the engine: {cmd}, "
                             "or --base-image cu124-torch2.5=IMAGE")
    recs = [with_env(record("cpu"), "2.13.0", None), skipped]
    console = Console(width=80, record=True, color_system=None, force_terminal=False)
    print_report(console, recs, compare(recs))
    text = console.export_text()
    assert any(cmd in ln and "--base-image cu124-torch2.5=IMAGE" in ln for ln in text.splitlines()), text


TRIAL_ENV = {"python": "3.11.7", "torch": "2.12.0+cpu", "cuda": None, "device": "AMD EPYC", "threads": 2,
             "hostname": "trainbox"}


@pytest.mark.parametrize("width", [80, 200])
def test_the_trials_recorded_environment_is_a_row_beside_the_cells(width: int) -> None:
    recs = [with_env(record("cpu-torch2.13"), "2.13.0+cpu", None)]
    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    print_report(console, recs, compare(recs), trial_environment=TRIAL_ENV)
    text = console.export_text()
    env = text[:text.index("Results")]
    assert "trial (recorded)" in env and "2.12.0+cpu" in env and "trainbox" in env and "2.13.0+cpu" in env


def test_markdown_carries_caption_bundle_per_target_and_the_trial_environment() -> None:
    from harness.report import markdown

    recs = [with_env(record("cpu-torch2.13"), "2.13.0+cpu", None)]
    md = markdown(recs, compare(recs), bundle="optuna_best", trial_environment=TRIAL_ENV)
    assert "optuna_best" in md and "validation split;" in md and "original units" in md
    assert "trial (recorded)" in md and "2.12.0+cpu" in md
    per_target = [ln for ln in md.splitlines() if ln.startswith("| cpu-torch2.13 | a |")]
    assert per_target, md


def test_render_reads_the_trials_environment_from_the_bundle(make_bundle, tmp_path, capsys) -> None:
    from harness.judge import Tolerances
    from harness.options import ReportOptions
    from harness.runner import render as run_render

    root = make_bundle(trial_info={"number": 0, "value": 0.1, "environment": TRIAL_ENV})
    recs = [with_env(record("cpu-torch2.13"), "2.13.0+cpu", None)]
    run_render(recs, [], Tolerances(), None, ReportOptions(detail=True), bundle_dir=str(root))
    assert "trial (recorded)" in capsys.readouterr().out
    run_render(recs, [], Tolerances(), None, ReportOptions(), bundle_dir=str(root))  # the first screen
    assert "the trial (as trial_info.yaml records it)" in capsys.readouterr().out


def test_compare_reads_the_trials_environment_from_the_records(capsys) -> None:
    """Without the bundle at hand (harness compare), the trial's environment comes from the records."""
    from harness.judge import Tolerances
    from harness.options import ReportOptions
    from harness.runner import render as run_render

    rec = with_env(record("cpu-torch2.13"), "2.13.0+cpu", None)
    rec.recorded = {**(rec.recorded or {}), "environment": TRIAL_ENV}
    run_render([rec], [], Tolerances(), None, ReportOptions(detail=True))
    assert "trial (recorded)" in capsys.readouterr().out


def band_records() -> list[ResultRecord]:
    """The layout records, judged against a band of four ulp members and two seed members (a wide interval)."""
    out = []
    for i, (kind, r2) in enumerate([("ulp", 0.9), ("ulp", 0.90004), ("ulp", 0.90001), ("ulp", 0.90002),
                                    ("seed", 0.85), ("seed", 0.88)]):
        n = i + 1 if kind == "ulp" else i - 3
        rec = with_env(record(f"band-{kind}-{n}", r2=r2, loss=0.1 + 1e-6 * i, sha=f"b{i}"), "2.13.0+cpu", None)
        rec.band = {"kind": kind, "member": n, "seed": 42}
        rec.perturbation = {"applied": True, "tensor": "input.weight", "index": 100 + i, "direction": "+inf"} if kind == "ulp" else None
        out.append(rec)
    return out + records()


@pytest.mark.parametrize("width", [80, 100, 200])
def test_the_band_and_its_column_fit_every_width(width: int) -> None:
    from harness.report import markdown

    recs = band_records()
    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    comparison = compare(recs)
    print_report(console, recs, comparison)
    text = console.export_text()
    lines = text.splitlines()
    assert all(len(ln.rstrip()) <= width for ln in lines), text
    tokens = {t for ln in lines for t in re.split(r"[\s│|]+", ln) if t}
    for name in CELLS:
        assert name in tokens, f"{name} not whole at {width} columns:\n{text}"
    assert "Band: 4 retrains of the baseline" in " ".join(text.split())
    assert "evidence" in text and "same distribution" in text and "bitwise" not in text.split("Results")[0]
    assert "band-ulp-1" not in text.split("Band:")[0].split("Results")[1]  # members are the band's, not result rows
    if width == 200:
        assert "max|ΔR²| rec" in text and "|Δ|/seed sd" in text  # the tables themselves
    else:
        assert "evidence:" in text  # stacked
    md = markdown(recs, comparison)
    assert "| evidence |" in md and "Band: 4 retrains" in md and "| r2/a |" in md
