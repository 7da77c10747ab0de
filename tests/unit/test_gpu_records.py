"""Verdicts and causes on records a real NVIDIA H200 wrote (tests/data/gpu-h200, see its README).

Every CUDA cell of the Conv1d matrix used to be judged drifted, although CPU→CUDA moves
val_loss by less than half of what another seed does. Judged against the recorded trial
and the seed band, no cell is drifted; each pair of cells that parts is given the cause
its settings and traces support.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import record
from harness.causes import Cause, classify
from harness.cli import main
from harness.diverge import diverge, parse_trace
from harness.judge import TRIAL, Verdict, compare, merge
from harness.ladder import Rung
from harness.record import Status
from tests.conftest import TESTS

DATA = TESTS / "data" / "gpu-h200"
CONV = DATA / "conv-matrix"


def _conv() -> list:
    return merge([record.load(CONV), record.load(DATA / "conv-seed-band.json")]).records


def test_no_cuda_tf32_or_default_mode_cell_is_drifted_against_the_seed_band(capsys) -> None:
    assert main(["compare", str(CONV), str(DATA / "conv-seed-band.json")]) == 0
    out = capsys.readouterr().out
    assert "Overall: reproduced" in out
    c = compare(_conv())
    assert c.overall is Verdict.REPRODUCED and c.band.n_seed == 4
    rungs = {j.cell: j.rung for j in c.cells}
    assert all(j.ladder.reference == TRIAL for j in c.cells)  # every cell against the CPU-recorded trial
    for cell, rung in rungs.items():
        if cell.startswith("cuda-"):
            assert rung is Rung.SAME, (cell, c.cell(cell).reason)
        else:  # the CPU cells reproduce the CPU-recorded trial to float32 rounding
            assert rung is Rung.EQUAL, (cell, c.cell(cell).reason)
    # CPU→CUDA moves val loss by 0.74 seed sd: the magnitude the band shows beside the verdict
    m = c.cell("cuda-strict-tdef-fp32-r1").ladder.metrics["val_loss"]
    assert m.delta == pytest.approx(8.9e-4, rel=0.01) and m.delta_sd == pytest.approx(0.74, abs=0.01)
    # the CUDA fp32 cells ran where the band ran (on the GPU): the trial is the draw tested against it
    assert m.tested == "reference"
    assert c.cell("cuda-strict-tdef-tf32-r1").ladder.metrics["val_loss"].tested == "cell"


def test_strict_repeats_are_bitwise_and_default_ones_are_not() -> None:
    groups = {g.name: g for g in compare(_conv()).repeats}
    for name in ("cuda-strict-tdef-fp32", "cuda-strict-tdef-tf32", "cpu-strict-tdef", "cpu-default-tdef"):
        assert groups[name].deterministic and groups[name].rung is Rung.BITWISE
    assert groups["cuda-default-tdef-fp32"].rung is Rung.EQUAL  # cuDNN's atomics move it by ~1e-8
    assert groups["cuda-default-tdef-tf32"].rung is Rung.SAME  # with TF32 the repeats part for good


def test_the_mlp_on_cuda_is_the_same_distribution_as_its_cpu_trial() -> None:
    """The small example of docs/getting-started.md on a GPU host: R² moves by 5e-2, and no cell is drifted."""
    sets = [record.load(DATA / "mlp-matrix.json"), record.load(DATA / "mlp-seed-band.json")]
    recs = [r for r in merge(sets).records if r.status is not Status.INTERRUPTED]  # one seed member was stopped
    c = compare(recs)
    assert c.overall is Verdict.REPRODUCED, c.reason
    assert {j.rung for j in c.cells if j.cell.startswith("cuda")} == {Rung.SAME}
    assert {j.rung for j in c.cells if j.cell.startswith("cpu")} == {Rung.EQUAL}


def test_the_old_verdict_of_this_matrix_is_what_the_ladder_replaces() -> None:
    """Against the first cell and the ulp band alone every cell is beyond numerical noise: not judged,
    never drifted (the ulp band measures one trajectory's noise, not what another retrain gives)."""
    recs = [r for r in record.load(CONV).records]
    for r in recs:
        r.recorded = None
    c = compare(recs)
    assert c.overall is Verdict.UNJUDGED and not any(j.verdict is Verdict.DRIFTED for j in c.cells)


# --------------------------------------------------------------------------- causes, where they are known


def _pair(a: str, b: str):
    ra, rb = record.read(CONV / a / "record.json"), record.read(CONV / b / "record.json")
    ta = parse_trace((CONV / a / "trace.jsonl").read_text(), a)
    tb = parse_trace((CONV / b / "trace.jsonl").read_text(), b)
    return ra, rb, diverge(ta, tb, ra.retrained, rb.retrained, a, b)


def test_cpu_and_cuda_draw_different_dropout_masks_at_the_first_step() -> None:
    ra, rb, d = _pair("cuda-strict-tdef-fp32-r1", "cpu-strict-tdef-r1")
    f = classify(ra, rb, d)
    assert f.cause is Cause.RANDOM and f.step == 1 and f.relative == pytest.approx(9.0e-3, rel=0.05)
    assert "CPU and CUDA generators" in f.evidence
    assert classify(ra, rb) is None  # without the traces the settings alone support no class


def test_tf32_is_reduced_precision() -> None:
    ra, rb, d = _pair("cuda-strict-tdef-fp32-r1", "cuda-strict-tdef-tf32-r1")
    f = classify(ra, rb, d)
    assert f.cause is Cause.PRECISION and f.relative == pytest.approx(1e-5, rel=0.1)
    assert "TF32 matmuls are on in cuda-strict-tdef-tf32-r1" in f.evidence
    assert classify(ra, rb).cause is Cause.PRECISION  # from the settings alone: they differ only in TF32


def test_default_mode_repeats_that_differ_are_a_nondeterministic_reduction() -> None:
    ra, rb, d = _pair("cuda-default-tdef-tf32-r1", "cuda-default-tdef-tf32-r2")
    f = classify(ra, rb, d)
    assert f.cause is Cause.NONDETERMINISM and "every setting they measured is equal" in f.evidence
    ra, rb, d = _pair("cuda-strict-tdef-fp32-r1", "cuda-default-tdef-fp32-r1")
    assert classify(ra, rb, d).cause is Cause.NONDETERMINISM
    ra, rb, d = _pair("cuda-strict-tdef-fp32-r1", "cuda-strict-tdef-fp32-r2")
    assert classify(ra, rb, d) is None  # strict repeats never part


def test_diverge_names_the_cause(tmp_path: Path, capsys) -> None:
    assert main(["diverge", str(CONV / "cuda-strict-tdef-fp32-r1"), str(CONV / "cpu-strict-tdef-r1"),
                 "--json", str(tmp_path / "d.json")]) == 3
    out = capsys.readouterr().out
    assert "cause: random draws differ: the first step's loss differs by 0.009 (relative)" in out
    assert json.loads((tmp_path / "d.json").read_text())["cause"]["cause"] == "random draws differ"


def test_the_table_and_the_report_name_each_cells_cause(tmp_path: Path, capsys) -> None:
    assert main(["compare", str(CONV), str(DATA / "conv-seed-band.json"), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    causes = {cell: c["cause"] for cell, c in json.loads((tmp_path / "r.json").read_text())["causes"].items()}
    assert causes["cpu-strict-tdef-r1"] == "random draws differ"
    assert causes["cuda-strict-tdef-tf32-r1"] == "reduced precision"
    assert causes["cuda-default-tdef-fp32-r1"] == "nondeterministic reduction"
    assert "cuda-strict-tdef-fp32-r2" not in causes  # bitwise with the first cell: nothing to explain
    # the first screen: a line per cell that parts from the first, with its cause
    parts = [ln for ln in out.splitlines() if ln.startswith("↳ ")]
    assert sum("random draws differ" in ln for ln in parts) == 4, out  # the four CPU cells
    assert main(["compare", str(CONV), str(DATA / "conv-seed-band.json"), "--detail"]) == 0
    out = capsys.readouterr().out
    assert out.count("cause: random draws differ") == 4  # the four CPU cells, in the Results table
