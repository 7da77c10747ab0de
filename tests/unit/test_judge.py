"""Comparison, tolerances and verdicts: pure functions of typed records."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import verdict_exit
from harness.errors import InputError
from harness.judge import (
    MetricDiff, Tol, Tolerances, Verdict, compare, diff, flatten_recorded, flatten_split, load_tolerances, merge,
    parse_tolerance,
)
from harness.ladder import Rung
from harness.record import Env, RecordSet, Status

from tests.records import record, seed_band
from tests.unit.backends.test_docker_fake_engine import patched  # noqa: F401 - a fixture: the fake Docker engine, for a rerun


def test_flatten() -> None:
    flat = flatten_split(record("c").retrained, "val")
    assert flat == {"val_loss": 0.1, "r2/a": 0.9, "mse/a": 0.2, "mae/a": 0.3}
    assert flatten_recorded({"value": 1.0, "r2": {"a": 0.5}}) == {"val_loss": 1.0, "r2/a": 0.5}


def test_tol_semantics() -> None:
    assert Tol(abs=1e-3).allows(0.9, 0.9009)
    assert not Tol(abs=1e-3).allows(0.9, 0.902)
    assert Tol(rel=0.01).allows(100.0, 100.9)
    assert not Tol(rel=0.01).allows(100.0, 101.1)
    assert Tol().allows(1.0, 1.0) and not Tol().allows(1.0, 1.0 + 1e-15)


def test_diff_shape() -> None:
    d = diff({"r2/a": 0.9, "r2/b": 0.5}, {"r2/a": 0.95}, Tolerances())
    assert d["r2/a"].diff == pytest.approx(0.05) and d["r2/a"].ok is True  # no explicit gate: nothing to fail
    assert d["r2/b"] == MetricDiff(old=0.5, new=None, diff=None, rel=None, ok=False)
    assert diff({"r2/a": 0.9}, {"r2/a": 0.95}, parse_tolerance("r2=abs:1e-3"))["r2/a"].ok is False


def test_reproduced_and_drifted() -> None:
    seeds = seed_band([0.88, 0.90, 0.92, 0.89, 0.91, 0.905, 0.895, 0.90])
    cmp = compare(seeds + [record("a"), record("b", r2=0.9005), record("c", r2=0.8, sha="w2")])
    assert {c.cell: c.verdict for c in cmp.cells} == {"a": Verdict.REPRODUCED, "b": Verdict.REPRODUCED, "c": Verdict.DRIFTED}
    assert cmp.overall is Verdict.DRIFTED and verdict_exit(cmp) == 3
    c = cmp.cells[2]
    assert c.out_of_tolerance == [] and c.rung is Rung.DRIFTED
    assert c.weights_identical_to_first is False and c.weights_identical_to_recorded is False
    assert cmp.cells[0].weights_identical_to_recorded is True


def test_an_explicit_tolerance_is_a_gate() -> None:
    recs = [record("a", r2=0.8, sha="w2")]
    assert compare(recs).overall is Verdict.UNJUDGED  # no seed band, no default tolerance: not judged
    assert compare(recs, parse_tolerance("r2=abs:0.01")).overall is Verdict.DRIFTED
    assert compare(recs, parse_tolerance("r2=abs:0.2")).overall is Verdict.UNJUDGED  # a gate passed is no verdict


def test_failed_cell_wins_exit_code() -> None:
    cmp = compare([record("a"), record("b", status=Status.FAILED), record("c", r2=0.5)], parse_tolerance("r2=abs:0.1"))
    assert [c.verdict for c in cmp.cells] == [Verdict.REPRODUCED, Verdict.FAILED, Verdict.DRIFTED]
    assert cmp.overall is Verdict.FAILED and verdict_exit(cmp) == 1


def test_skipped_cell_does_not_fail_the_run() -> None:
    # Before typed statuses a skipped cell was an error record: reproduced + skipped -> failed, exit 1.
    cmp = compare([record("a"), record("cu124", status=Status.SKIPPED, message="driver 470 is below 525.60.13")])
    assert [c.verdict for c in cmp.cells] == [Verdict.REPRODUCED, Verdict.SKIPPED]
    assert cmp.overall is Verdict.REPRODUCED and verdict_exit(cmp) == 0
    assert "1 skipped" in cmp.reason
    assert cmp.cell("cu124").reason == "driver 470 is below 525.60.13"


def test_only_skipped_cells_is_not_a_reproduction() -> None:
    cmp = compare([record("a", status=Status.SKIPPED)])
    assert cmp.overall is Verdict.INCOMPLETE and verdict_exit(cmp) == 1
    assert "no cell ran" in cmp.reason


def test_interrupted_or_missing_cells_make_the_run_incomplete() -> None:
    cmp = compare([record("a"), record("b", status=Status.INTERRUPTED)])
    assert cmp.cell("b").verdict is Verdict.INCOMPLETE
    assert cmp.overall is Verdict.INCOMPLETE and verdict_exit(cmp) == 1
    # Planned cells that left no record are never counted as reproduced.
    cmp = compare([record("a")], missing=["b", "c"])
    assert cmp.overall is Verdict.INCOMPLETE and cmp.missing == ["b", "c"] and verdict_exit(cmp) == 1
    assert cmp.counts()[Verdict.INCOMPLETE] == 2


def test_no_recorded_trial_judges_against_first_cell() -> None:
    cmp = compare([record("a", recorded=False), record("b", recorded=False)])
    assert cmp.overall is Verdict.UNRECORDED and verdict_exit(cmp) == 0
    seeds = seed_band([0.88, 0.90, 0.92, 0.89, 0.91, 0.905, 0.895, 0.90])
    for s in seeds:
        s.recorded = None
    cmp = compare(seeds + [record("a", recorded=False), record("b", r2=0.5, loss=0.3, recorded=False, sha="w2")])
    assert [c.verdict for c in cmp.cells] == [Verdict.UNRECORDED, Verdict.DRIFTED]
    assert cmp.cell("b").ladder.reference == "a" and verdict_exit(cmp) == 3


def test_first_cell_is_first_successful() -> None:
    cmp = compare([record("x", status=Status.FAILED), record("a"), record("b")])
    assert cmp.first_cell == "a"


def test_data_mismatch_is_judged_from_the_record() -> None:
    rec = record("a")
    rec.data_sha256 = "1" * 64
    rec.expected_data_sha256 = {"config.yaml data.sha256": "0" * 64}
    cmp = compare([rec])
    assert any("DATA MISMATCH" in w and "config.yaml data.sha256" in w for w in cmp.warnings)


@pytest.mark.parametrize("text", ["r2", "foo=abs:1", "r2=abs:x", "r2=max:1", "r2=abs:-1"])
def test_bad_tolerance_flags(text: str) -> None:
    with pytest.raises(InputError):
        parse_tolerance(text)


def test_tolerance_file(tmp_path: Path) -> None:
    p = tmp_path / "tol.yaml"
    p.write_text("r2: {abs: 0.5}\nmse: {rel: 0.1}\n")
    tol = load_tolerances(p)
    assert tol.by_family["r2"] == Tol(abs=0.5, rel=0.0)
    assert tol.by_family["mse"].rel == 0.1
    p.write_text("r2: 3\n")
    with pytest.raises(InputError, match="r2 must be a mapping"):
        load_tolerances(p)


def test_merge_keeps_names_unique() -> None:
    b = record("cpu")
    b.env = Env(hostname="gpu-node")
    merged = merge([RecordSet([record("cpu")]), RecordSet([b], missing=["gpu"])])
    assert [r.cell for r in merged.records] == ["cpu", "cpu@gpu-node"]
    assert merged.missing == ["gpu"]


def test_compare_of_a_rerun_directory_judges_as_the_rerun_did(patched, make_bundle, tmp_path: Path, capsys) -> None:
    """`harness rerun` judges its cell against the archived run's record, which it writes beside it (a record of
    another run: the one being reproduced). `harness compare` of that directory keeps it, first, as the rerun did."""
    import dataclasses
    import json

    from harness import record as records
    from harness.cli import main

    from tests.fake_engine import Outcome
    from tests.unit.backends.test_docker_fake_engine import CPU, PACKAGES, make_archive

    fake = patched  # the fake Docker engine (tests/fake_engine.py)
    archived = record(CPU, r2=0.9)
    archived.run_id = "20260101-000000-archived"  # the run the snapshot was made of
    archived.spec = {"device": "cpu", "determinism": "strict", "cell": CPU}
    archive, _, _ = make_archive(tmp_path, fake, packages=PACKAGES, bundle=make_bundle(), record=archived)

    def worker(out: Path, req) -> None:  # the rerun drifts from the archived run
        spec = json.loads((out / "spec.json").read_text())
        records.write(out / "record.json", dataclasses.replace(record(spec["cell"], r2=0.5, sha="w2"),
                                                               spec=spec))

    fake.outcomes.append(Outcome(0, worker=worker))
    out = tmp_path / "rerun"
    rerun_rc = main(["rerun", str(archive), "--out", str(out), "--no-progress"])
    said = capsys.readouterr()
    assert (out / "report.json").is_file(), said.out + said.err
    printed = json.loads((out / "report.json").read_text())
    assert [r["cell"] for r in printed["records"]] == [f"{CPU}@archived", f"{CPU}@rerun"]
    again = tmp_path / "again.json"
    rc = main(["compare", str(out), "--json", str(again)])
    err = capsys.readouterr().err
    assert "another run" not in err, err
    assert rc == rerun_rc
    compared = json.loads(again.read_text())
    assert [r["cell"] for r in compared["records"]] == [r["cell"] for r in printed["records"]]
    assert compared["comparison"] == printed["comparison"]
