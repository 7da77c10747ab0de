"""After a stop: the command that finishes the run (``resume with: ...``), and no lock file left behind.

A run stopped by Ctrl-C, or one that ends with cells interrupted or never recorded, says on
stderr, in one line, the user's own command with ``--resume DIR`` (a real run interrupted and
finished with that line: tests/cli/test_jobs.py). ``OUT/.harness.lock`` is removed when a run ends,
however it ends, without giving up one run per results directory.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from harness.cli import build_parser, main, resume_command
from harness.errors import InputError
from harness.record import Status
from harness.runner import LOCK_FILE, ResultsLock

from tests.cli.test_cli import harness


def _resume_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("resume with: ")]


@pytest.mark.parametrize("argv, results, expected", [
    (["matrix", "my bundle", "--backend", "local", "-o", "runs/m", "--threads", "1,2"], "runs/m",
     "harness matrix 'my bundle' --backend local --threads 1,2 --resume runs/m"),
    (["matrix", "b", "--out=runs/m", "--resume", "--force", "--json", "r.json"], "runs/m",
     "harness matrix b --json r.json --resume runs/m"),
    (["matrix", "b", "--res", "runs/m", "--forc", "--ou", "runs/m"], "runs/m", "harness matrix b --resume runs/m"),
    (["matrix", "b", "-oruns/m", "--resume=runs/m", "--band", "0"], "runs/m",
     "harness matrix b --band 0 --resume runs/m"),
    (["--debug", "run", "--resume", "--out", "o", "--", "b"], "o", "harness --debug run --resume o -- b"),
    (["band", "b", "--n", "4"], "/abs/harness-results/band-b-1", "harness band b --n 4 --resume /abs/harness-results/band-b-1"),
])
def test_the_resume_command_is_the_users_line_with_resume_dir(argv, results, expected) -> None:
    assert resume_command(argv, results) == expected
    given = build_parser().parse_args(argv)
    again = build_parser().parse_args(shlex.split(expected)[1:])
    assert again.resume == results and again.out is None and not again.force
    same = {k: v for k, v in vars(given).items() if k not in ("resume", "out", "force", "func")}
    assert same == {k: v for k, v in vars(again).items() if k not in ("resume", "out", "force", "func")}


# --------------------------------------------------------------------------- the lock file


def test_a_failing_or_refused_run_leaves_no_lock_file(make_bundle, tmp_path: Path) -> None:
    bundle, out = make_bundle(), tmp_path / "out"
    common = ["matrix", str(bundle), "--backend", "local", "--devices", "cpu", "--determinism", "strict",
              "--threads", "1", "--band", "0", "--band-seeds", "0", "--no-progress", "-o", str(out)]
    failed = harness(*common, "--trainer-cmd", "{python} -c 'raise SystemExit(3)'")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert not _resume_lines(failed.stderr)  # a failed cell is not an unfinished run: resuming reruns it anyway
    assert not (out / LOCK_FILE).exists(), "a failing run left its lock file"
    refused = harness(*common)  # the directory holds a run's records and there is no --resume: exit 2, in the lock
    assert refused.returncode == 2 and "--resume" in refused.stderr, refused.stderr
    assert not (out / LOCK_FILE).exists(), "a refused run left its lock file"


def test_a_lock_taken_on_a_file_its_holder_just_removed_is_taken_again(tmp_path: Path, monkeypatch) -> None:
    """The race removing the lock file opens: a run opens the file, its holder ends (and removes it), the run
    locks the removed file; it must not count that as the lock, or a third run would lock a fresh file too."""
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    holder = ResultsLock(out)
    real_flock = fcntl.flock
    flocked: list[int] = []

    def holder_ends_first(fd: int, op: int) -> None:
        if not flocked:
            holder.release()  # between the second run's open and its flock
        flocked.append(os.fstat(fd).st_nlink)
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", holder_ends_first)
    second = ResultsLock(out)
    monkeypatch.setattr(fcntl, "flock", real_flock)
    assert flocked == [0, 1]  # it locked the removed file, let it go, and locked the one in the directory
    assert os.stat(out / LOCK_FILE).st_ino == os.fstat(second.fd).st_ino
    with pytest.raises(InputError, match=r"is in use by another harness run \(pid \d+\)"):
        ResultsLock(out)  # a third run is refused: the file in the directory is held
    second.release()
    assert not (out / LOCK_FILE).exists()
    ResultsLock(out).release()  # and the directory can be locked again


def test_release_removes_only_its_own_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    lock = ResultsLock(out)
    (out / LOCK_FILE).unlink()
    (out / LOCK_FILE).write_text("another run's\n")  # replaced meanwhile (by hand, or by a container)
    lock.release()
    assert (out / LOCK_FILE).read_text() == "another run's\n"
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    lock = ResultsLock(out)  # the stale file is locked as it is, and removed at the end
    lock.release()
    assert not (out / LOCK_FILE).exists()
    (out / LOCK_FILE).symlink_to(target)  # a link is refused, never followed, and never removed
    with pytest.raises(InputError, match="is a symbolic link"):
        ResultsLock(out)
    assert (out / LOCK_FILE).is_symlink() and target.read_text() == "keep me\n"


@pytest.mark.parametrize("status, says", [(Status.INTERRUPTED, True), (None, True), (Status.FAILED, False),
                                          (Status.OK, False)])
def test_a_run_that_ends_unfinished_says_how_to_finish_it(status, says, monkeypatch, tmp_path: Path, capsys) -> None:
    """Without a Ctrl-C here: a cell the backend saw interrupted (a Slurm job cancelled on the cluster), or one
    that left no record, makes the run incomplete, and the line is said after the report; not otherwise."""
    from harness import runner
    from harness.judge import compare

    from tests.records import record as a_record

    def execute(opts, report_opts, tol, on_results_dir=None):
        on_results_dir(tmp_path / "default-out")
        recs = [a_record("a")] + ([a_record("b", status=status)] if status is not None else [])
        return compare(recs, missing=[] if status is not None else ["b"])

    monkeypatch.setattr(runner, "execute", execute)
    rc = main(["matrix", str(tmp_path / "bundle"), "--backend", "local", "--threads", "1,2"])
    err = capsys.readouterr().err
    if says:
        said = (f"resume with: harness matrix {tmp_path / 'bundle'} --backend local --threads 1,2 "
                f"--resume {tmp_path / 'default-out'}")
        assert rc == 1 and _resume_lines(err) == [said], err
    else:
        assert not _resume_lines(err), err
