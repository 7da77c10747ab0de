"""--jobs and --resume for real: cells side by side on their own cores, records reused when nothing changed."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

from harness import record
from harness.backends.local import pinned
from harness.record import Status
from harness.runner import LOCK_FILE

from tests.conftest import REPO, default_signals, patience
from tests.cli.test_cli import harness

LOCAL = ("--backend", "local", "--devices", "cpu", "--threads", "1")


def by_cell(out: Path) -> dict[str, record.ResultRecord]:
    return {r.cell: r for r in record.load(out).records}


def stamp(out: Path, cell: str) -> tuple[int, int]:
    st = os.stat(out / cell / "record.json")
    return st.st_ino, st.st_mtime_ns


def test_pinned_runs_a_process_on_the_given_core_only() -> None:
    core = sorted(os.sched_getaffinity(0))[-1]
    argv = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
    p = subprocess.run(pinned(argv, (core,)), capture_output=True, text=True, timeout=patience(60))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"[{core}]"


def test_two_one_thread_cells_run_at_once_on_disjoint_cores(make_bundle, tmp_path: Path) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        import pytest

        pytest.skip("needs two cores")
    # Long enough to train (seconds) that the two workers' import times (which differ by a second or
    # two on a busy 2-core machine) cannot hide the overlap of their training.
    bundle = make_bundle(training__epochs=1500)
    out = tmp_path / "out"
    p = harness("matrix", str(bundle), *LOCAL, "--determinism", "strict,default", "--jobs", "2", "--out", str(out),
                "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    a, b = by_cell(out).values()
    assert a.slot and b.slot and len(a.slot.cpus) == 1 and len(b.slot.cpus) == 1
    assert set(a.slot.cpus).isdisjoint(b.slot.cpus)
    assert a.env.threads == 1 and b.env.threads == 1  # the thread count is the cell's, as asked
    assert a.env.extra["cpu_affinity"] == a.slot.cpus and b.env.extra["cpu_affinity"] == b.slot.cpus
    span = {r.cell: (datetime.fromisoformat(r.started_at), datetime.fromisoformat(r.finished_at)) for r in (a, b)}
    (s1, e1), (s2, e2) = span.values()
    assert s1 < e2 and s2 < e1, span  # they overlapped: neither ended before the other began
    assert "cpus " in p.stderr  # each finished cell streamed its line with the cores it ran on
    # the final table keeps the matrix's order, whichever cell finished first
    assert p.stdout.index("cpu-strict-t1") < p.stdout.index("cpu-default-t1")


def test_resume_reuses_unchanged_cells_and_reruns_changed_ones(make_bundle, tmp_path: Path) -> None:
    bundle = make_bundle()
    out = tmp_path / "out"
    first = harness("matrix", str(bundle), *LOCAL, "--determinism", "strict,default", "--out", str(out))
    assert first.returncode == 0, first.stdout + first.stderr
    before = {c: stamp(out, c) for c in ("cpu-strict-t1", "cpu-default-t1")}
    keys = {c: r.cache_key for c, r in by_cell(out).items()}
    assert all(keys.values()) and len(set(keys.values())) == 2

    # nothing changed: every cell reused, its record file untouched, the rows say so
    again = harness("matrix", str(bundle), *LOCAL, "--determinism", "strict,default", "--resume", str(out))
    assert again.returncode == 0, again.stdout + again.stderr
    assert {c: stamp(out, c) for c in before} == before
    assert "Reused 2 of 2 cell(s)" in again.stdout and "reused" in again.stdout
    assert "--force" in again.stdout
    manifest = record.read_manifest(out)
    assert set(manifest.reused) == set(before)
    assert [r.cell for r in record.load(out).records] == ["cpu-strict-t1", "cpu-default-t1"]  # compare keeps them

    # one more cell: the two reused, only the new one runs
    more = harness("matrix", str(bundle), *LOCAL, "--determinism", "strict,default,warn", "--out", str(out), "--resume")
    assert more.returncode == 0, more.stdout + more.stderr
    assert {c: stamp(out, c) for c in before} == before
    recs = by_cell(out)
    assert recs["cpu-warn-t1"].run_id == record.read_manifest(out).run_id != recs["cpu-strict-t1"].run_id

    # --force: everything reruns
    forced = harness("matrix", str(bundle), *LOCAL, "--determinism", "strict,default", "--out", str(out),
                     "--resume", "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert all(stamp(out, c) != before[c] for c in before)
    assert "Reused" not in forced.stdout

    # the config changed: the key changed, every cell reruns
    after_force = {c: stamp(out, c) for c in before}
    cfg = yaml.safe_load((bundle / "config.yaml").read_text())
    cfg["training"]["epochs"] = 3
    (bundle / "config.yaml").write_text(yaml.safe_dump(cfg))
    changed = harness("matrix", str(bundle), *LOCAL, "--determinism", "strict,default", "--out", str(out), "--resume")
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert all(stamp(out, c) != after_force[c] for c in before)
    assert all(len(r.history) == 3 for c, r in by_cell(out).items() if c in before)


def test_a_record_that_does_not_match_its_cell_or_is_not_ok_is_rerun(make_bundle, tmp_path: Path) -> None:
    bundle = make_bundle()
    out = tmp_path / "out"
    assert harness("matrix", str(bundle), *LOCAL, "--determinism", "strict,default", "--out", str(out)).returncode == 0
    # a cell directory holding another cell's record (a container could write one) is not taken
    (out / "cpu-default-t1" / "record.json").write_text((out / "cpu-strict-t1" / "record.json").read_text())
    again = harness("matrix", str(bundle), *LOCAL, "--determinism", "strict,default", "--resume", str(out))
    assert again.returncode == 0, again.stdout + again.stderr
    recs = by_cell(out)
    assert set(record.read_manifest(out).reused) == {"cpu-strict-t1"}
    assert recs["cpu-default-t1"].run_id == record.read_manifest(out).run_id


def test_without_resume_a_used_directory_is_still_refused(make_bundle, tmp_path: Path) -> None:
    bundle = make_bundle()
    out = tmp_path / "out"
    assert harness("matrix", str(bundle), *LOCAL, "--out", str(out)).returncode == 0
    p = harness("matrix", str(bundle), *LOCAL, "--out", str(out))
    errors = [line for line in p.stderr.splitlines() if line.startswith("harness: error")]
    assert p.returncode == 2 and len(errors) == 1 and "--resume" in errors[0] and "Traceback" not in p.stderr
    q = harness("matrix", str(bundle), *LOCAL, "--out", str(out), "--force")
    assert q.returncode == 2 and "--force" in q.stderr


def test_an_interrupted_matrix_resumed_runs_only_the_missing_cells(make_bundle, tmp_path: Path) -> None:
    bundle = make_bundle()
    out = tmp_path / "out"
    args = [str(bundle), *LOCAL, "--determinism", "strict,default,warn", "--jobs", "1"]
    env = dict(os.environ, COLUMNS="220", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "harness", "matrix", *args, "--out", str(out), "--no-progress"],
                            preexec_fn=default_signals, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    first = out / "cpu-strict-t1" / "record.json"
    deadline = time.monotonic() + patience(240)
    while time.monotonic() < deadline and '"cache_key": "' not in (first.read_text() if first.exists() else ""):
        time.sleep(0.1)  # the host has keyed the first cell's record: it finished
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=patience(120))
    assert proc.returncode == 130, stdout + stderr
    assert not (out / LOCK_FILE).exists(), "an interrupted run left its lock file"
    recs = by_cell(out)
    assert recs["cpu-strict-t1"].status is Status.OK
    # what finished before the interrupt is the machine's business (a loaded one is slower to stop): the
    # resume must reuse exactly that and run exactly the rest
    done = {c for c, r in recs.items() if r.status is Status.OK}
    todo = {"cpu-strict-t1", "cpu-default-t1", "cpu-warn-t1"} - done
    assert todo, "every cell finished before the interrupt: nothing left to resume"
    kept = {c: stamp(out, c) for c in done}

    # it said, in one line after the one of what it kept, the command that finishes the run: the user's own
    # (here `python -m harness ...`, said as `harness ...`) with --out OUT turned into --resume OUT
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("resume with: ")]
    assert stderr.splitlines()[-1] == line and "interrupted" in stderr.splitlines()[-2], stderr
    words = shlex.split(line.removeprefix("resume with: "))
    assert words == ["harness", "matrix", *args, "--no-progress", "--resume", str(out)], words
    resumed = subprocess.run([sys.executable, "-m", "harness", *words[1:]], capture_output=True, text=True, env=env,
                             timeout=patience(300))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resume with:" not in resumed.stderr and not (out / LOCK_FILE).exists()
    assert {c: stamp(out, c) for c in done} == kept  # reused: the very files, untouched
    manifest = record.read_manifest(out)
    assert set(manifest.reused) == done
    recs = by_cell(out)
    assert [r.cell for r in record.load(out).records] == ["cpu-strict-t1", "cpu-default-t1", "cpu-warn-t1"]
    for cell in todo:  # the interrupted one and the missing ones ran
        assert recs[cell].status is Status.OK and recs[cell].run_id == manifest.run_id


# --------------------------------------------------------------------------- --resume: what else is in a cell's key


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess with exactly ``env`` (plus the repository on PYTHONPATH)."""
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                          env=dict(env, COLUMNS="220", PYTHONPATH=str(REPO)), timeout=patience(300))


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "HARNESS_DEBUG")}
    return env


def test_resume_reruns_a_cell_when_an_inherited_isa_variable_changes(make_bundle, tmp_path: Path) -> None:
    """A record measured under ATEN_CPU_CAPABILITY=default does not stand for a run without it: the cell reruns,
    and the run says why; with the environment unchanged it is reused."""
    bundle = make_bundle()
    out = tmp_path / "out"
    args = ("matrix", str(bundle), *LOCAL, "--determinism", "strict", "--out", str(out), "--no-progress")
    pinned_isa = dict(_base_env(), ATEN_CPU_CAPABILITY="default")
    first = _cli(*args, env=pinned_isa)
    assert first.returncode == 0, first.stdout + first.stderr
    kept = stamp(out, "cpu-strict-t1")

    same = _cli(*args, "--resume", env=pinned_isa)
    assert same.returncode == 0, same.stdout + same.stderr
    assert set(record.read_manifest(out).reused) == {"cpu-strict-t1"} and stamp(out, "cpu-strict-t1") == kept

    changed = _cli(*args, "--resume", env=_base_env())
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert record.read_manifest(out).reused == {} and stamp(out, "cpu-strict-t1") != kept
    assert "cpu-strict-t1: rerun: ATEN_CPU_CAPABILITY changed (default -> unset)" in changed.stderr
    assert by_cell(out)["cpu-strict-t1"].run_id == record.read_manifest(out).run_id


def test_resume_reruns_a_command_trainer_whose_script_outside_the_trainer_path_changed(make_bundle,
                                                                                      tmp_path: Path) -> None:
    """``--trainer-cmd "{python} /elsewhere/train.py"``: the script is in the cell's key, so an edit reruns the
    cell instead of reporting the old script's result."""
    bundle = make_bundle()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = elsewhere / "train.py"
    script.write_text('import json\nprint(json.dumps({"val_loss": 0.5, "r2": 0.9}))\n')
    out = tmp_path / "out"
    args = ("matrix", str(bundle), *LOCAL, "--determinism", "strict", "--trainer-cmd", f"{{python}} {script}",
            "--out", str(out), "--no-progress")
    first = _cli(*args, env=_base_env())
    assert first.returncode == 0, first.stdout + first.stderr
    rec = by_cell(out)["cpu-strict-t1"]
    assert rec.status is Status.OK and rec.retrained["val_loss"] == 0.5, first.stdout + first.stderr

    same = _cli(*args, "--resume", env=_base_env())
    assert set(record.read_manifest(out).reused) == {"cpu-strict-t1"}, same.stdout + same.stderr

    script.write_text('import json\nprint(json.dumps({"val_loss": 0.25, "r2": 0.9}))\n')
    edited = _cli(*args, "--resume", env=_base_env())
    assert record.read_manifest(out).reused == {}, edited.stdout + edited.stderr
    assert by_cell(out)["cpu-strict-t1"].retrained["val_loss"] == 0.25  # the edited script's result
    assert f"cpu-strict-t1: rerun: {script} (named by --trainer-cmd) changed" in edited.stderr
