"""harness.api: the commands from Python, judged against the command line on the same inputs.

Real runs of tiny bundles on the local backend; the command line it is held against runs as a user
runs it (a child process), or in-process through ``harness.cli.main`` where only an error line is read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from harness import api, record
from harness.cli import main
from harness.causes import Cause
from harness.diverge import Divergence, Parting
from harness.errors import HarnessError, InputError, UsageError
from harness.judge import Comparison, Verdict

from tests.records import record as make_record
from tests.records import seed_band, ulp_band
from tests.cli.test_cli import harness
from tests.conftest import REPO

TRIAL = {"number": 1, "value": 0.5, "params": {}}  # far from any retrain of the tiny bundle


def comparison_data(records: list[Any], comparison: Comparison) -> dict[str, Any]:
    """The comparison as the command line writes it to --json (its verdicts, evidence, band), as plain data."""
    from harness.report import json_report

    return json.loads(record.dumps(json_report(records, comparison)))["comparison"]


def written(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())["comparison"]


# --------------------------------------------------------------------------- run, matrix, band: real runs


def test_matrix_returns_the_verdicts_the_cli_reports_and_prints_nothing(make_bundle, tmp_path: Path, capfd) -> None:
    bundle = make_bundle(trial_info=TRIAL)
    got = api.matrix(bundle, backend="local", devices="cpu", determinism=("strict", "default"), threads=(1,),
                     band=0, band_seeds=0, tol="val_loss=abs:1e-3", out=tmp_path / "api")
    assert capfd.readouterr().out == ""  # a notebook's or a CI script's stdout stays its own
    assert isinstance(got, Comparison)
    p = harness("matrix", str(bundle), "--backend", "local", "--devices", "cpu", "--determinism", "strict,default",
                "--threads", "1", "--band", "0", "--band-seeds", "0", "--tol", "val_loss=abs:1e-3",
                "--out", str(tmp_path / "cli"), "--json", str(tmp_path / "cli.json"), "--no-progress")
    assert p.returncode == 3, p.stdout + p.stderr
    records = record.load(tmp_path / "api").records
    assert [r.cell for r in records] == ["cpu-strict-t1", "cpu-default-t1"]
    mine = comparison_data(records, got)
    assert mine == written(tmp_path / "cli.json")  # every verdict, rung, reason and number the CLI reports
    assert mine == written(tmp_path / "api" / "report.json")  # and what this run wrote beside its records
    assert got.overall is Verdict.DRIFTED and {c.verdict for c in got.cells} == {Verdict.DRIFTED}
    assert api.exit_code(got) == p.returncode
    # the finished results directory, judged again
    again = api.compare(tmp_path / "api", tol=["val_loss=abs:1e-3"])
    assert comparison_data(records, again) == mine
    assert api.compare(tmp_path / "api").overall is Verdict.UNJUDGED  # no gate, no seed band: not judged
    assert capfd.readouterr().out == ""


def test_band_returns_the_band_it_measured(make_bundle, tmp_path: Path, capfd) -> None:
    got = api.band(make_bundle(), n=2, device="cpu", threads=1, out=tmp_path / "b", json_out=tmp_path / "b.json")
    assert capfd.readouterr().out == ""
    assert got.band is not None and got.band.n_ulp == 2 and got.band.n_seed == 0
    # a member whose change training rounded away (this bundle's band-ulp-2: a weight of -4.8e-4, lr 0.01) is left
    # out and drawn again: the band returned has the two members asked for, and names the one replaced
    used = [m.cell for m in got.band.members if m.used]
    assert len(used) == 2 and [m.cell for m in got.band.members if not m.used] == got.band.redrawn
    assert json.loads((tmp_path / "b" / "run.json").read_text())["cells"] == [m.cell for m in got.band.members]
    assert comparison_data(record.load(tmp_path / "b").records, got) == written(tmp_path / "b.json")
    assert api.exit_code(got) == 0


def test_diverge_of_two_traced_cells_is_what_the_cli_finds(make_bundle, tmp_path: Path, capfd,
                                                           monkeypatch) -> None:
    out = tmp_path / "r"
    ran = api.run(make_bundle(), device="cpu", threads=1, band=2, band_seeds=0, trace=True, out=out)
    assert [c.cell for c in ran.cells] == ["run"] and ran.band is not None and ran.band.n_ulp == 2
    base, member = out / "run", out / "band-ulp-1"
    got = api.diverge(base, member, json_out=tmp_path / "d.json")
    assert capfd.readouterr().out == ""
    assert isinstance(got, Divergence) and got.parting is Parting.TRAINING  # one ulp moved: the runs part
    assert got.parts_at is not None and got.parts_at["step"] >= 1
    assert got.cause is not None and got.cause["cause"] == Cause.PERTURBED.value  # the cause, as the CLI says it
    monkeypatch.setenv("COLUMNS", "220")  # the CLI's width, as test_cli.harness gives it
    p = harness("diverge", str(base), str(member), "--json", str(tmp_path / "cli.json"))
    assert p.returncode == api.exit_code(got) == 3, p.stdout + p.stderr
    mine = json.loads(record.dumps(got.to_dict()))
    assert mine == json.loads((tmp_path / "cli.json").read_text())  # where they part, the tensor, the cause
    assert mine == json.loads((tmp_path / "d.json").read_text())
    assert f"A: run ({base})" in p.stdout and "parts at: " in p.stdout, p.stdout
    api.diverge(base, member, show=True)
    assert capfd.readouterr().out == p.stdout  # show=True prints what the command prints


# --------------------------------------------------------------------------- compare: records written by hand


def _write(dir_: Path, recs: list[Any]) -> Path:
    for r in recs:
        record.write(dir_ / r.cell / "record.json", r)
    return dir_


def test_compare_returns_what_the_cli_judges_and_show_prints_what_it_prints(tmp_path: Path, capfd,
                                                                             monkeypatch) -> None:
    cells = _write(tmp_path / "cells", [make_record("base", started_at="1"),
                                        make_record("far", r2=0.8, loss=0.15, sha="w2", started_at="2")])
    band = _write(tmp_path / "band", ulp_band(width=1e-5) + seed_band([0.88, 0.90, 0.92, 0.89, 0.91, 0.905, 0.895, 0.9]))
    got = api.compare(cells, band, json_out=tmp_path / "api.json")
    assert capfd.readouterr().out == ""
    assert got.overall is Verdict.DRIFTED and got.cell("far").verdict is Verdict.DRIFTED
    monkeypatch.setenv("COLUMNS", "220")
    p = harness("compare", str(cells), str(band), "--json", str(tmp_path / "cli.json"))
    assert p.returncode == api.exit_code(got) == 3, p.stdout + p.stderr
    assert written(tmp_path / "api.json") == written(tmp_path / "cli.json")
    assert "≠ far drifted vs the recorded trial:" in p.stdout, p.stdout
    api.compare(str(cells), str(band), show=True)
    assert capfd.readouterr().out == p.stdout


# --------------------------------------------------------------------------- bad input: the CLI's error, raised


def _cell_without_trace(root: Path) -> Path:
    cell = root / "bare"
    cell.mkdir(parents=True)
    (cell / "record.json").write_text(json.dumps({"schema": "harness.result/2", "cell": "bare", "status": "ok",
                                                  "metrics": {"retrained": {"val_loss": 0.5}}}))
    return cell


BAD: list[tuple[str, Callable[..., Any], dict[str, Any], list[str], type[HarnessError]]] = [
    # (id, api function, its keywords besides the bundle, the same on the command line, the error raised)
    ("threads", api.run, {"threads": (1, "x")}, ["run", "{b}", "--threads", "1,x"], UsageError),
    ("band-1", api.run, {"band": 1}, ["run", "{b}", "--band", "1"], UsageError),
    ("cell-seeds", api.matrix, {"backend": "local", "cell_seeds": 2, "band_seeds": 0},
     ["matrix", "{b}", "--backend", "local", "--cell-seeds", "2", "--band-seeds", "0"], UsageError),
    ("force", api.run, {"force": True}, ["run", "{b}", "--force"], UsageError),
    ("resume-out", api.run, {"out": "{o}/a", "resume": "{o}/b"}, ["run", "{b}", "--out", "{o}/a", "--resume", "{o}/b"],
     UsageError),
    ("tf32", api.matrix, {"backend": "local", "tf32": "maybe"}, ["matrix", "{b}", "--backend", "local", "--tf32", "maybe"],
     UsageError),
    ("band-n-0", api.band, {"n": 0}, ["band", "{b}", "--n", "0"], UsageError),
    ("band-docker", api.band, {"backend": "docker"}, ["band", "{b}", "--backend", "docker"], UsageError),
    ("tol", api.run, {"tol": "r2"}, ["run", "{b}", "--tol", "r2"], InputError),
    ("alpha", api.run, {"alpha": 0.7}, ["run", "{b}", "--alpha", "0.7"], UsageError),
    ("html-dir", api.run, {"html": "{o}"}, ["run", "{b}", "--html", "{o}"], InputError),
    ("bundle", api.run, {"bundle": "{o}/nowhere"}, ["run", "{o}/nowhere"], InputError),
    ("strict-config", api.run, {"strict_config": True, "device": "cpu"},
     ["run", "{b}", "--strict-config", "--device", "cpu"], InputError),
    ("compare", api.compare, {"paths": ["{o}/nowhere"]}, ["compare", "{o}/nowhere"], InputError),
    ("diverge", api.diverge, {"paths": ["{c}", "{c}"]}, ["diverge", "{c}", "{c}"], InputError),
]


@pytest.mark.parametrize(("fn", "kwargs", "argv", "kind"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_raises_the_error_the_cli_prints(make_bundle, tmp_path: Path, capsys, monkeypatch, fn,
                                                   kwargs: dict[str, Any], argv: list[str],
                                                   kind: type[HarnessError]) -> None:
    monkeypatch.chdir(tmp_path)  # a default results directory, were one made, lands here
    bundle = make_bundle(model__hiden=8)  # a misspelt key: only strict_config refuses it
    out = tmp_path / "o"
    out.mkdir()
    where = {"b": str(bundle), "o": str(out), "c": str(_cell_without_trace(tmp_path))}
    kw = {k: v.format(**where) if isinstance(v, str) else v for k, v in kwargs.items()}
    paths = [p.format(**where) for p in kw.pop("paths", [])] or [kw.pop("bundle", str(bundle))]
    with pytest.raises(HarnessError) as raised:
        fn(*paths, **kw)
    assert capsys.readouterr().out == ""
    assert type(raised.value) is kind, raised.value
    code = main([a.format(**where) for a in argv])
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("harness: error:"))
    assert line == f"harness: error: {raised.value.one_line()}" == f"harness: error: {raised.value}"
    assert code == raised.value.exit_code == 2
    assert [p.parent.name for p in tmp_path.rglob("record.json")] == ["bare"]  # nothing trained


def test_what_the_command_line_refuses_before_parsing_is_refused_too(make_bundle, capsys) -> None:
    with pytest.raises(UsageError, match="harness compare needs a results directory"):
        api.compare()  # harness compare takes one PATH or more
    with pytest.raises(UsageError, match="harness band --backend 'slurm' is not one of docker, local"):
        api.band(make_bundle(), backend="slurm")  # harness band's --backend choices
    assert capsys.readouterr().out == ""


def test_a_typo_in_a_keyword_is_a_type_error_not_a_silent_default(make_bundle) -> None:
    with pytest.raises(TypeError, match="thread"):
        api.run(make_bundle(), thread=1)  # type: ignore[call-arg]


# --------------------------------------------------------------------------- the module itself


def test_importing_the_api_imports_nothing_heavy() -> None:
    code = ("import sys, harness.api\n"
            "print(sorted(m for m in ('torch', 'numpy', 'scipy', 'sklearn', 'rich', 'docker', 'matplotlib', "
            "'harness.runner', 'harness.judge') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_every_public_name_has_a_docstring() -> None:
    missing = [name for name in api.__all__ if not (getattr(api, name).__doc__ or "").strip()]
    assert missing == []
    assert api.__doc__ and "sys.exit(api.exit_code(" in api.__doc__
