"""Comparison, tolerances and verdicts: pure functions of records."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.judge import (
    DRIFTED, FAILED, REPRODUCED, UNRECORDED, Tol, Tolerances, compare, delta_vs_recorded, diff, exit_code,
    flatten_recorded, flatten_split, load_tolerances, merge, parse_tolerance,
)
from harness.errors import InputError


def record(cell: str, r2: float = 0.9, loss: float = 0.1, sha: str = "w1", status: str = "ok", recorded: bool = True) -> dict:
    return {
        "cell": cell, "status": status, "weights_sha256": sha,
        "metrics": {"retrained": {"val_loss": loss, "val": {"r2": {"a": r2}, "mse": {"a": 0.2}, "mae": {"a": 0.3}},
                                  "test": {"r2": {"a": r2 - 0.1}, "mse": {"a": 0.2}, "mae": {"a": 0.3}}},
                    "archived": {"val_loss": 0.1, "val": {"r2": {"a": 0.9}}}},
        "recorded": {"value": 0.1, "r2": {"a": 0.9}, "weights_sha256": "w1"} if recorded else None,
        "error": None if status == "ok" else {"kind": "run", "message": "boom"},
    }


def test_flatten() -> None:
    flat = flatten_split(record("c")["metrics"]["retrained"], "val")
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
    assert d["r2/a"]["diff"] == pytest.approx(0.05) and d["r2/a"]["ok"] is False
    assert d["r2/b"] == {"old": 0.5, "new": None, "diff": None, "rel": None, "ok": False}


def test_reproduced_and_drifted() -> None:
    cmp = compare([record("a"), record("b", r2=0.9005), record("c", r2=0.8, sha="w2")])
    verdicts = {c["cell"]: c["verdict"] for c in cmp["cells"]}
    assert verdicts == {"a": REPRODUCED, "b": REPRODUCED, "c": DRIFTED}
    assert cmp["overall"] == DRIFTED and exit_code(cmp) == 3
    c = cmp["cells"][2]
    assert c["out_of_tolerance"] == ["r2/a"]
    assert c["weights_identical_to_first"] is False and c["weights_identical_to_recorded"] is False
    assert cmp["cells"][0]["weights_identical_to_recorded"] is True


def test_tolerance_override_changes_verdict() -> None:
    recs = [record("a", r2=0.8)]
    assert compare(recs)["overall"] == DRIFTED
    assert compare(recs, parse_tolerance("r2=abs:0.2"))["overall"] == REPRODUCED


def test_failed_cell_wins_exit_code() -> None:
    cmp = compare([record("a"), record("b", status="error"), record("c", r2=0.5)])
    assert [c["verdict"] for c in cmp["cells"]] == [REPRODUCED, FAILED, DRIFTED]
    assert cmp["overall"] == FAILED and exit_code(cmp) == 1


def test_no_recorded_trial_judges_against_first_cell() -> None:
    cmp = compare([record("a", recorded=False), record("b", recorded=False)])
    assert cmp["overall"] == UNRECORDED and exit_code(cmp) == 0
    cmp = compare([record("a", recorded=False), record("b", r2=0.5, recorded=False)])
    assert [c["verdict"] for c in cmp["cells"]] == [UNRECORDED, DRIFTED]
    assert exit_code(cmp) == 3


def test_first_cell_is_first_successful() -> None:
    cmp = compare([record("x", status="error"), record("a"), record("b")])
    assert cmp["first_cell"] == "a"


def test_delta_vs_recorded() -> None:
    rec = record("a", r2=0.91)
    d = delta_vs_recorded(rec["metrics"], rec["recorded"])
    assert d["r2/a"]["diff"] == pytest.approx(0.01)
    assert delta_vs_recorded(rec["metrics"], None) == {}


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
    a = [record("cpu")]
    b = [dict(record("cpu"), env={"hostname": "gpu-node"})]
    merged = merge([a, b])
    assert [r["cell"] for r in merged] == ["cpu", "cpu@gpu-node"]
