"""Acceptance: a foreign project written like real user code reproduces with only
``--trainer module:function --trainer-path DIR`` (no adapter, no edits).

tests/userproj/ holds the project (its own CSV loader, split, loop and weights
digest), its data (a CSV) and an optuna_best/ made by running the project's own
code once (tests/userproj/make_optuna_best.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from harness import record
from harness.record import Status

from tests.conftest import ON_TRIAL_CPU, TESTS, assert_reproduces
from tests.cli.test_cli import harness

USERPROJ = TESTS / "userproj"


def _copy(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    shutil.copytree(USERPROJ, proj, ignore=shutil.ignore_patterns("__pycache__"))
    return proj


def test_user_project_reproduces_with_run(tmp_path: Path) -> None:
    proj = _copy(tmp_path)
    out = tmp_path / "out"
    p = harness("run", str(proj / "optuna_best"), "--trainer", "userproj.train:retrain", "--trainer-path", str(proj),
                "--out", str(out), "--device", "cpu", "--detail")
    assert p.returncode == 0, p.stdout + p.stderr
    (rec,) = record.load(out).records
    assert rec.status is Status.OK
    assert_reproduces(rec, p.stdout)
    assert rec.user_weights.identical_to_recorded is ON_TRIAL_CPU  # the project's own digest convention
    assert rec.data_sha256  # the CSV is hashed as bytes
    val = rec.retrained["val"]
    assert set(val["r2"]) == {"*"} and isinstance(val["mse"]["*"], float)
    # unmodified, it tells the harness nothing beyond its metrics: each check says why it was not made
    assert rec.archived is None and "archived Δ —: config.yaml names no trainer.model_fn/trainer.predict" in p.stdout
    assert rec.split["source"] is None and rec.scaler["refit_matches"] is None


def test_user_project_reproduces_in_a_matrix(tmp_path: Path) -> None:
    proj = _copy(tmp_path)
    out = tmp_path / "out"
    p = harness("matrix", str(proj / "optuna_best"), "--trainer", "userproj.train:retrain", "--trainer-path", str(proj),
                "--backend", "local", "--devices", "cpu", "--threads", "1,all", "--determinism", "strict",
                "--out", str(out), "--detail")
    assert p.returncode == 0, p.stdout + p.stderr
    recs = record.load(out).records
    assert len(recs) == 2 and all(r.status is Status.OK for r in recs)
    for r in recs:
        assert_reproduces(r)
    assert p.stdout.count("=archived") >= (2 if ON_TRIAL_CPU else 0)


def add_glue(proj: Path) -> Path:
    """Archive the project's target scaler with its own code and name its hooks in config.yaml; the bundle."""
    import sys

    import yaml

    bundle = proj / "optuna_best"
    cfg = yaml.safe_load((bundle / "config.yaml").read_text())
    sys.path.insert(0, str(proj))
    try:
        from userproj.checks import archive_scaler

        archive_scaler(cfg, str(bundle))  # the scaler such a project archives beside its weights
    finally:
        sys.path.remove(str(proj))
        for name in [m for m in sys.modules if m == "userproj" or m.startswith("userproj.")]:
            del sys.modules[name]
    cfg["trainer"] = {"model_fn": "userproj.checks:build_model", "predict": "userproj.checks:predict"}
    (bundle / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return bundle


def assert_seed_checks(rec: record.ResultRecord, stdout: str) -> None:
    """Split recorded and matching, scaler refit matching, archived weights evaluated with zero archived Δ."""
    from harness import judge, report

    assert_reproduces(rec, stdout)
    assert "archived Δ —" not in stdout
    assert rec.split["source"] == "re-derived" and rec.split["sizes"] == [204, 43, 45]
    assert rec.split["reported"]["matches"] is True
    assert rec.scaler["refit_matches"] is True and rec.scaler["max_abs_diff"] == 0.0  # the scaler sees no float noise
    assert rec.trainer["archived"]["evaluated"] is True
    comparison = judge.compare([rec])
    (cell,) = comparison.cells
    if ON_TRIAL_CPU:  # the archived weights, evaluated here, give the recorded metrics bit for bit
        assert rec.archived["val"]["r2"] == rec.recorded["r2"]
        assert cell.archived_inference and all(d.diff == 0 for d in cell.archived_inference.values())
        assert report.rows([rec], comparison)[0]["d_archived"] == "0"
    else:  # another CPU model's kernels round the same inference differently, at float32 noise
        assert cell.archived_inference and all(abs(d.diff) < 1e-5 for d in cell.archived_inference.values())


def test_user_project_with_its_optional_glue_gets_the_seed_checks(tmp_path: Path) -> None:
    """userproj/checks.py: the split and train targets told through ctx, the archived weights through hooks."""
    bundle = add_glue(_copy(tmp_path))
    out = tmp_path / "out"
    p = harness("run", str(bundle), "--trainer", "userproj.checks:retrain_checked", "--trainer-path",
                str(bundle.parent), "--out", str(out), "--device", "cpu", "--detail")
    assert p.returncode == 0, p.stdout + p.stderr
    (rec,) = record.load(out).records
    assert_seed_checks(rec, p.stdout)


def test_a_model_fn_that_does_not_fit_the_archived_weights_is_one_line(tmp_path: Path) -> None:
    import yaml

    proj = _copy(tmp_path)
    (proj / "userproj" / "narrow.py").write_text("from .train import MLP\n\n\ndef build(config):\n    return MLP(32, 2, 16)\n")
    bundle = proj / "optuna_best"
    cfg = yaml.safe_load((bundle / "config.yaml").read_text())
    cfg["trainer"] = {"model_fn": "userproj.narrow:build"}
    (bundle / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    p = harness("run", str(bundle), "--trainer", "userproj.train:retrain", "--trainer-path", str(proj),
                "--out", str(tmp_path / "out"), "--device", "cpu")
    assert p.returncode == 2, p.stdout + p.stderr
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("harness: error:")]  # besides "records: OUT"
    assert line.startswith("harness: error: config.yaml: trainer.model_fn userproj.narrow:build builds a model whose "
                           "state does not fit weights/best.pt: shape net.0.bias (32,) vs (16,)")
    assert "Traceback" not in p.stdout + p.stderr


def test_the_project_unedited_gets_a_band_and_traces_as_a_function_and_as_a_command(tmp_path: Path) -> None:
    """PyTorch's hooks reach the project in the worker (function) and in the command's own process
    (sitecustomize): the same perturbation, the same trace, bit for bit; and diverge reads them."""
    proj = _copy(tmp_path)
    ways = {"function": ["--trainer", "userproj.train:retrain"],
            "command": ["--trainer-cmd", "{python} -m userproj.cli {bundle} --out {out_dir} --data {data}"]}
    got = {}
    for way, args in ways.items():
        out = tmp_path / way
        p = harness("band", str(proj / "optuna_best"), *args, "--trainer-path", str(proj), "--n", "2", "--trace",
                    "--device", "cpu", "--threads", "1", "-o", str(out), "--no-progress")
        assert p.returncode == 0, p.stdout + p.stderr
        got[way] = {r.cell: r for r in record.load(out).records}
        for r in got[way].values():
            assert r.perturbation.applied is True and r.perturbation.updated is True
            assert "forward pre-hook on MLP" in r.perturbation.via
            assert r.trace.steps > 0 and r.trace.file == "trace.jsonl"
    assert got["command"]["band-ulp-1"].perturbation.process  # it happened in the command's own process
    keys = ("tensor", "index", "direction", "old", "new")
    # on some CPUs (an AMD EPYC) Adam's first step rounds a member's change away: it is drawn again, alike in both
    assert list(got["function"]) == list(got["command"])
    for cell in got["function"]:
        f, c = got["function"][cell], got["command"][cell]
        assert {k: getattr(f.perturbation, k) for k in keys} == {k: getattr(c.perturbation, k) for k in keys}
        assert f.weights_sha256 == c.weights_sha256 and f.labels.get("redraw_of") == c.labels.get("redraw_of")
        assert (tmp_path / "function" / cell / "trace.jsonl").read_text() == \
            (tmp_path / "command" / cell / "trace.jsonl").read_text()
    distinct = list({r.weights_sha256: cell for cell, r in got["function"].items()}.values())
    assert len(distinct) >= 2  # the band measured something: two members that trained different weights
    p = harness("diverge", str(tmp_path / "function" / distinct[0]), str(tmp_path / "command" / distinct[1]))
    assert p.returncode == 3 and "first differ at" in p.stdout, p.stdout + p.stderr  # 3: they part
    assert "cause: perturbed differently" in p.stdout
