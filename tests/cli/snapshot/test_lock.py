"""`rerun` and `snapshot` write a results directory only while they hold its lock, as `run` does.

The lock is held by a real process (what a running `harness run` is): a second command into the
same directory is refused at once, in one line naming that process, and writes nothing there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main
from harness.record import ImageInfo

from tests.conftest import REPO, patience
from tests.fake_engine import FakeEngine, Outcome
from tests.records import record as compare_record
from tests.records import with_env
from tests.unit.backends.test_docker_fake_engine import BASE, CPU, PACKAGES, make_archive, patched, wheelhouse  # noqa: F401 - patched is a fixture

HOLD = ("import sys; from pathlib import Path; from harness.runner import ResultsLock; "
        "out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True); ResultsLock(out); "
        "print('locked', flush=True); sys.stdin.read()")


@pytest.fixture
def held(tmp_path: Path):
    """(a results directory, the pid of the process that holds its lock until the test ends)."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        ready, _, _ = select.select([proc.stdout], [], [], patience(60))
        assert ready and proc.stdout.readline() == "locked\n", "the lock holder did not start"
        yield out, proc.pid
    finally:
        proc.stdin.close()
        proc.wait(timeout=patience(30))
        proc.stdout.close()


def error_line(err: str) -> str:
    assert "Traceback" not in err and "internal error" not in err, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("harness: error:")]
    return line


def archived_record():
    rec = with_env(compare_record(CPU), "2.13.0+cpu", None)
    rec.spec = {"device": "cpu", "determinism": "strict", "schema": "harness.runspec/3", "cell": CPU}
    rec.image = ImageInfo(id="sha256:old", tag="t")
    return rec


def test_rerun_into_a_locked_results_directory_is_refused(patched: FakeEngine, make_bundle, held, tmp_path: Path,
                                                          capsys) -> None:
    out, pid = held
    archived = archived_record()
    archive, _, _ = make_archive(tmp_path, patched, packages=PACKAGES, bundle=make_bundle(), record=archived)
    rc = main(["rerun", str(archive), "--out", str(out), "--no-progress"])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and f"{out}: is in use by another harness run (pid {pid})" in line, line
    assert patched.runs == []  # nothing ran
    assert sorted(p.name for p in out.iterdir()) == [".harness.lock"]  # and nothing was written there


def test_rerun_into_a_free_results_directory_still_runs(patched: FakeEngine, make_bundle, tmp_path: Path) -> None:
    """The lock is taken, used and let go: the same directory can be rerun into again afterwards."""
    archived = archived_record()
    archive, _, _ = make_archive(tmp_path, patched, packages=PACKAGES, bundle=make_bundle(), record=archived)

    def worker(cell_out: Path, req) -> None:
        from harness import record as records

        spec = json.loads((cell_out / "spec.json").read_text())
        records.write(cell_out / "record.json", dataclasses.replace(archived, cell=spec["cell"]))

    for _ in range(2):
        patched.outcomes.append(Outcome(0, worker=worker))
        assert main(["rerun", str(archive), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert len(patched.runs) == 2


def test_snapshot_into_a_locked_results_directory_is_refused(patched: FakeEngine, make_bundle, held, tmp_path: Path,
                                                             capsys) -> None:
    out, pid = held
    archive = tmp_path / "s.harness.tar"
    rc = main(["snapshot", str(make_bundle()), "--cell", CPU, "-o", str(archive), "--out", str(out),
               "--wheelhouse", str(wheelhouse(tmp_path).parent), "--base-image", BASE, "--no-progress"])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and f"{out}: is in use by another harness run (pid {pid})" in line, line
    assert patched.runs == [] and patched.builds == []  # refused before any build or run
    assert sorted(p.name for p in out.iterdir()) == [".harness.lock"]
    assert not archive.exists() and not list(tmp_path.glob(".s.harness.tar.*"))
