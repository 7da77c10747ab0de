"""The verdict ladder on constructed records: bitwise → numerically equal → same distribution → drifted.

Pure logic (harness.ladder, harness.judge.compare); calibration by simulation is in
tests/unit/test_calibrate.py, the real GPU records in tests/unit/test_gpu_records.py.
"""

from __future__ import annotations

import math

import pytest

from harness import stats
from harness.cli.common import verdict_exit
from harness.errors import EXIT_DRIFTED, EXIT_OK, EXIT_RUN_FAILED
from harness.judge import TRIAL, Verdict, compare, parse_tolerance
from harness.ladder import RUNG_LINES, Rung, Yardsticks, climb
from harness.record import ErrorInfo, ResultRecord, Status

from tests.records import member, record, seed_band, ulp_band

SEEDS = [0.88, 0.90, 0.92, 0.89, 0.91, 0.905, 0.895, 0.90]  # R² over 8 seeds: sd ~0.012


def test_every_rung_has_its_one_line() -> None:
    assert set(RUNG_LINES) == set(Rung) and all(line.startswith(r.value + ":") for r, line in RUNG_LINES.items())


# --------------------------------------------------------------------------- the reference is the trial


def test_a_cell_bitwise_equal_to_the_trial_is_reproduced_whatever_the_first_cell_did() -> None:
    """A first cell that differs from the trial no longer makes the trial's own result drift."""
    first = record("first", r2=0.9 + 3e-3, loss=0.1 + 1e-3, sha="w2")
    exact = record("exact", sha="w1")  # the trial's weights and metrics, bit for bit
    c = compare(ulp_band(n=4, width=1e-9) + [first, exact])
    j = c.cell("exact")
    assert j.ladder.reference == TRIAL and j.rung is Rung.BITWISE and j.verdict is Verdict.REPRODUCED
    assert "identical to the recorded trial's" in j.reason
    assert c.cell("first").ladder.reference == TRIAL  # the first cell is judged against the trial too


def test_weights_equal_to_the_archived_ones_are_bitwise() -> None:
    rec = record("c", sha="other")
    rec.weights_vs_archived = {"identical": True}
    j = compare([rec]).cell("c")
    assert j.rung is Rung.BITWISE and j.ladder.bitwise_to == "archived weights"


def test_without_a_trial_the_first_cell_is_the_reference() -> None:
    c = compare([record("a", recorded=False), record("b", recorded=False, sha="w1")])
    assert c.cell("a").ladder is None and c.cell("a").verdict is Verdict.UNRECORDED
    b = c.cell("b")
    assert b.ladder.reference == "a" and b.rung is Rung.BITWISE and b.verdict is Verdict.UNRECORDED
    assert c.overall is Verdict.UNRECORDED and verdict_exit(c) == EXIT_OK


# --------------------------------------------------------------------------- numerically equal


def test_inside_the_ulp_noise_is_numerically_equal() -> None:
    band = ulp_band(width=1e-4, n=11)
    sd = stats.summarize([0.9 - 5e-5 + 1e-4 * i / 10 for i in range(11)]).sd
    limit = stats.noise_limit(stats.Summary(11, 0.9, sd), 0.01)
    c = compare(band + [record("near", r2=0.9 + 0.9 * limit, sha="w2"), record("far", r2=0.9 + 1.1 * limit, sha="w3")])
    near, far = c.cell("near"), c.cell("far")
    assert near.rung is Rung.EQUAL and near.verdict is Verdict.REPRODUCED
    m = near.ladder.metrics["r2/a"]
    assert m.limit == pytest.approx(limit) and m.limit_from == "ulp band (n=11)"
    assert far.rung is Rung.DIFFERS  # beyond the noise, and no seed band to judge it by


def test_a_zero_width_band_never_makes_an_infinite_beyond() -> None:
    """Every member identical on a metric: float32 rounding is the floor, not zero."""
    band = ulp_band(width=0.0, n=4)
    tiny = record("tiny", r2=0.9 + 3 * stats.ulp32(0.9), sha="w2")
    c = compare(band + [tiny])
    j = c.cell("tiny")
    assert j.rung is Rung.EQUAL and j.ladder.metrics["r2/a"].limit_from.startswith("float32 rounding")
    assert all(m.limit is not None and math.isfinite(m.limit) for m in j.ladder.metrics.values())


# --------------------------------------------------------------------------- no seed band: not judged


def test_beyond_noise_without_a_seed_band_is_not_judged_and_says_how() -> None:
    from harness.report import band_note

    c = compare(ulp_band(n=4, width=1e-8) + [record("cuda", r2=0.905, loss=0.102, sha="w2")])
    j = c.cell("cuda")
    assert j.rung is Rung.DIFFERS and j.verdict is Verdict.UNJUDGED
    assert c.overall is Verdict.UNJUDGED and verdict_exit(c) == EXIT_OK
    assert c.differing == ["cuda"] and "--band-seeds 8" in band_note(c) and "no seed band" in c.reason


def test_no_default_tolerance_calls_a_cell_drifted() -> None:
    """R² 0.2 away from the trial: without a seed band the harness says it cannot judge, not "drifted"."""
    c = compare([record("a", r2=0.7, sha="w2")])
    assert c.cell("a").verdict is Verdict.UNJUDGED and c.tolerances == {}


# --------------------------------------------------------------------------- the seed band


def test_inside_the_prediction_interval_is_the_same_distribution() -> None:
    c = compare(ulp_band(n=4, width=1e-8) + seed_band(SEEDS) + [record("cuda", r2=0.915, loss=0.0925, sha="w2")])
    j = c.cell("cuda")
    assert j.rung is Rung.SAME and j.verdict is Verdict.REPRODUCED and verdict_exit(c) == EXIT_OK
    m = j.ladder.metrics["r2/a"]
    assert m.method == "prediction interval" and m.n == 8 and m.tested == "cell" and m.p_holm >= 0.01
    seeds = stats.summarize(SEEDS)
    assert m.delta_sd == pytest.approx(0.015 / seeds.sd)


def test_outside_the_prediction_interval_drifts_and_exits_3() -> None:
    c = compare(seed_band(SEEDS) + [record("slow", r2=0.80, loss=0.15, sha="w2")])
    j = c.cell("slow")
    assert j.rung is Rung.DRIFTED and j.verdict is Verdict.DRIFTED
    assert c.overall is Verdict.DRIFTED and verdict_exit(c) == EXIT_DRIFTED
    assert "p=" in j.reason and "α=0.01" in j.reason and j.ladder.deciding in ("r2/a", "val_loss")


def test_alpha_moves_the_edge() -> None:
    seeds = stats.summarize(SEEDS)
    at = stats.prediction_test(0.9, seeds, 0.05)
    edge = seeds.mean + 1.05 * at.half_width  # outside the 95 % interval, inside the 99 % one
    recs = seed_band(SEEDS) + [record("c", r2=edge, loss=0.1, sha="w2")]
    recs[-1].recorded = {"r2": {"a": 0.9}}  # one metric: no multiplicity
    assert compare(recs, alpha=0.05).cell("c").rung is Rung.DRIFTED
    assert compare(recs, alpha=0.01).cell("c").rung is Rung.SAME


def test_an_explicit_tolerance_gates_on_top() -> None:
    recs = seed_band(SEEDS) + [record("c", r2=0.915, loss=0.0925, sha="w2")]
    j = compare(recs, parse_tolerance("r2=abs:1e-3")).cell("c")
    assert j.rung is Rung.SAME and j.verdict is Verdict.DRIFTED and j.out_of_tolerance == ["r2/a"]
    assert "explicit tolerance" in j.reason
    assert compare(recs, parse_tolerance("r2=abs:0.1")).cell("c").verdict is Verdict.REPRODUCED


def test_a_nan_metric_the_trial_recorded_finite_drifts() -> None:
    rec = record("nan", sha="w2")
    rec.metrics["retrained"]["val_loss"] = None
    rec.nonfinite = ["metrics.retrained.val_loss"]
    c = compare([rec])
    j = c.cell("nan")
    assert j.rung is Rung.DRIFTED and j.verdict is Verdict.DRIFTED and verdict_exit(c) == EXIT_DRIFTED
    assert "val_loss is not a finite number" in j.reason and j.nonfinite == ["val_loss"]


def test_r2_and_mse_of_one_target_are_one_hypothesis() -> None:
    sticks = Yardsticks(seeds={k: stats.Summary(8, 0.5, 0.01) for k in ("val_loss", "r2/a", "mse/a", "mae/a")},
                        n_seed=8)
    deltas = {k: (0.5, 0.5 + 0.02) for k in ("val_loss", "r2/a", "mse/a", "mae/a")}
    lad = climb(TRIAL, deltas, sticks, test_values={k: 0.52 for k in deltas})
    assert lad.n_tested == 3
    assert lad.metrics["r2/a"].p_holm == lad.metrics["mse/a"].p_holm


# --------------------------------------------------------------------------- which value the seed band tests


def test_when_the_band_ran_where_the_cell_ran_the_trial_is_tested() -> None:
    """A CUDA band, a CPU trial: the CUDA cell is one of the band's own; the trial is the new draw."""
    cuda = 0.93
    band = [member("ulp", i, cuda + i * 1e-9) for i in (1, 2)] + seed_band([cuda + d for d in (-0.02, 0.01, 0.0, 0.015,
                                                                                             -0.01, 0.005)])
    c = compare(band + [record("cuda-cell", r2=cuda + 1e-9, loss=0.1, sha="w2")])
    m = c.cell("cuda-cell").ladder.metrics["r2/a"]
    assert m.tested == "reference"
    want = stats.prediction_test(0.9, stats.summarize([cuda + d for d in (-0.02, 0.01, 0.0, 0.015, -0.01, 0.005)]))
    assert m.stat == pytest.approx(want.stat)
    assert c.reference_in_band is not None and c.reference_in_band.n_seed == 6


def test_a_trial_outside_its_own_seed_band_is_said() -> None:
    c = compare(seed_band([0.95, 0.96, 0.955, 0.965, 0.958, 0.952]) + [record("a", sha="w1")])
    assert c.reference_in_band.outside
    assert any("the recorded trial lies outside this seed band" in w for w in c.warnings)


# --------------------------------------------------------------------------- the cell's own seeds (paired)


def _cell_seeds(name: str, r2s: list[float]) -> list[ResultRecord]:
    out = []
    for i, r in enumerate(r2s, 1):
        rec = member("seed", i, r, loss=0.1 + 0.5 * (0.9 - r), mse=0.2 + (0.9 - r), mae=0.3 + 0.5 * (0.9 - r))
        rec.cell = f"{name}-seed-{i}"
        rec.band = {"kind": "cell-seed", "member": i, "of": name, "seed": 42 + i}
        out.append(rec)
    return out


def test_paired_seeds_detect_a_shift_one_draw_cannot() -> None:
    shifted = [r - 0.03 for r in SEEDS]  # 2.5 seed sd lower, seed by seed, with its own jitter
    shifted = [r + j for r, j in zip(shifted, (0.002, -0.003, 0.001, 0.0, -0.002, 0.003, -0.001, 0.001))]
    cell = record("tf32", r2=0.9 - 0.03, loss=0.115, sha="w2")
    one = compare(seed_band(SEEDS) + [cell]).cell("tf32")
    assert one.rung is Rung.SAME  # one retrain 2.5 sd out: inside the 99 % prediction interval
    paired = compare(seed_band(SEEDS) + [cell] + _cell_seeds("tf32", shifted)).cell("tf32")
    m = paired.ladder.metrics["r2/a"]
    assert paired.rung is Rung.DRIFTED and m.method == "paired seeds" and m.n == 8
    assert m.shift == pytest.approx(-0.03, abs=0.002) and m.shift_ci[1] < 0
    assert [j.cell for j in compare(seed_band(SEEDS) + [cell] + _cell_seeds("tf32", shifted)).cells] == ["tf32"]


def test_paired_seeds_of_an_unshifted_cell_are_the_same_distribution() -> None:
    jitter = [r + j for r, j in zip(SEEDS, (0.002, -0.003, 0.001, 0.0, -0.002, 0.003, -0.001, 0.001))]
    cell = record("cpu", r2=0.9 + 0.004, loss=0.098, sha="w2")
    j = compare(seed_band(SEEDS) + [cell] + _cell_seeds("cpu", jitter)).cell("cpu")
    assert j.rung is Rung.SAME and j.ladder.metrics["r2/a"].method == "paired seeds"


# --------------------------------------------------------------------------- repeats, failures, a band alone


def repeat(name: str, k: int, r2: float, sha: str) -> ResultRecord:
    rec = record(f"{name}-r{k}", r2=r2, sha=sha)
    rec.labels = {"repeat": k}
    return rec


def test_bitwise_repeats_are_deterministic_and_bitwise() -> None:
    c = compare([repeat("cpu", 1, 0.9, "w1"), repeat("cpu", 2, 0.9, "w1")])
    (g,) = c.repeats
    assert (g.name, g.cells, g.distinct, g.deterministic, g.rung) == ("cpu", ["cpu-r1", "cpu-r2"], 1, True, Rung.BITWISE)
    assert c.cell("cpu-r2").repeat_group == "cpu"


def test_repeats_that_differ_are_their_cells_numerical_noise_without_an_ulp_band() -> None:
    recs = [repeat("b", 1, 0.9 + 2e-6, "w2"), repeat("b", 2, 0.9 + 3e-6, "w3")]
    c = compare(recs)
    b = c.repeats[0]
    assert not b.deterministic and b.distinct == 2 and b.spread["r2/a"].range == pytest.approx(1e-6)
    m = c.cell("b-r2").ladder.metrics["r2/a"]
    assert m.limit_from == "own repeats (n=2)" and c.cell("b-r2").rung is Rung.EQUAL


def test_a_failed_band_member_fails_the_run() -> None:
    bad = ResultRecord(cell="band-ulp-3", status=Status.FAILED, error=ErrorInfo(kind="run", message="boom"),
                       band={"kind": "ulp", "member": 3})
    c = compare(ulp_band(n=2) + [bad, record("base")])
    assert c.overall is Verdict.FAILED and verdict_exit(c) == EXIT_RUN_FAILED
    assert [j.cell for j in c.cells] == ["band-ulp-3", "base"]


def test_a_band_alone_is_no_cell_to_judge() -> None:
    c = compare(ulp_band())
    assert c.cells == [] and c.overall is Verdict.UNRECORDED and verdict_exit(c) == EXIT_OK
    c = compare([member("ulp", i, 0.9, applied=False) for i in (1, 2)])
    assert c.overall is Verdict.INCOMPLETE and "ulp band skipped" in c.reason and verdict_exit(c) == EXIT_RUN_FAILED


def test_unperturbed_ulp_members_leave_float32_rounding_as_the_noise() -> None:
    recs = [member("ulp", i, 0.9 + i * 1e-6, applied=False) for i in (1, 2, 3)]
    c = compare(recs + [record("base"), record("far", r2=0.95, sha="w2")])
    assert c.band is not None and not c.band.measured
    assert c.cell("far").rung is Rung.DIFFERS
    assert any(w.startswith("ulp band skipped: the trainer never called ctx.perturb") for w in c.warnings)
