"""A weights write that fails for want of room is a `disk` record, not torch's "unexpected pos".

torch's zip writer reports a short write as ``RuntimeError: [enforce fail at
inline_container.cc] ... unexpected pos``. These tests make the write fail for real, in a
worker started as a backend starts it: on a full file system (a tiny tmpfs; root only) and
over the process's file size limit (``RLIMIT_FSIZE``: EFBIG, which is said as such, not as
a full disk).
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from harness import record
from harness.record import Status

from tests.conftest import IN_CI, REPO, patience

# The worker's launch environment (harness.worker.determinism.launch_env("strict", 1)).
WORKER_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
              "PYTHONDONTWRITEBYTECODE": "1"}


def worker(bundle: Path, out: Path, preexec=None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), **WORKER_ENV)
    return subprocess.run([sys.executable, "-m", "harness.worker", "--bundle", str(bundle), "--out", str(out),
                           "--cell", "c", "--device", "cpu"], capture_output=True, text=True, env=env,
                          preexec_fn=preexec, timeout=patience(120))


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A cell directory whose ``weights/`` is a 4 KiB tmpfs (one page): smaller than any best.pt.
    Mounting needs root, as CI runs the tests."""
    where = tmp_path / "cell" / "weights"
    where.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root; test_weights_over_the_file_size_limit covers the rest)")
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k,mode=0755", "tmpfs", str(where)],
                         capture_output=True, text=True)
    if got.returncode != 0:
        reason = f"cannot mount a tmpfs here: {got.stderr.strip()}"
        if IN_CI:
            pytest.fail(f"{reason} (required because CI=true)", pytrace=False)
        pytest.skip(reason)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_weights_on_a_full_disk_are_a_disk_record(make_bundle, tmp_path: Path, tiny_tmpfs: Path) -> None:
    # About 280 KB of weights, written past torch's buffer: there the short write became "unexpected pos".
    bundle = make_bundle(model__hidden=256)
    out = tiny_tmpfs.parent  # the record lands beside weights/, on a disk with room
    p = worker(bundle, out)
    assert p.returncode == 1, p.stderr
    rec = record.read(out / "record.json")
    assert rec.status is Status.FAILED and rec.error is not None
    assert rec.error.kind == "disk", rec.error
    assert rec.error.message.startswith(f"no space left on device writing {out / 'weights' / 'best.pt'}; free space"), rec.error
    assert rec.error.traceback is None and "unexpected pos" not in p.stderr
    assert p.stderr.strip().splitlines() == [f"harness.worker: {rec.error.message}"]
    assert os.listdir(tiny_tmpfs) == []  # no half-written file, no temporary left


def _file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return apply


def test_weights_over_the_file_size_limit_are_a_disk_record(make_bundle, tmp_path: Path) -> None:
    bundle = make_bundle(model__hidden=64)
    out = tmp_path / "cell"
    # Above what the worker writes before the weights (the refitted scaler) and the failure record,
    # below best.pt; Python ignores SIGXFSZ, so the write fails with EFBIG.
    p = worker(bundle, out, preexec=_file_size_limit(12_000))
    assert p.returncode == 1, p.stderr
    rec = record.read(out / "record.json")
    assert rec.error is not None and rec.error.kind == "disk", rec.error
    assert rec.error.message.startswith(f"file too large writing {out / 'weights' / 'best.pt'} "
                                        "(over this process's file size limit, `ulimit -f`"), rec.error
    assert "unexpected pos" not in p.stderr and "Traceback" not in p.stderr
    assert sorted(os.listdir(out / "weights")) == []


def test_a_runtime_error_that_is_not_the_disk_stays_itself(tmp_path: Path, monkeypatch) -> None:
    import torch

    from harness.worker import retrain

    calls = []

    def broken(obj, fh, *a, **k):
        calls.append(fh)
        raise RuntimeError("not a disk problem")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="not a disk problem"):
        retrain.save_weights({"w": torch.zeros(2)}, tmp_path / "best.pt")
    assert len(calls) == 2  # the second try, in memory, raised it again
    assert os.listdir(tmp_path) == []


def test_disk_failure_lines() -> None:
    from harness.errors import disk_failure

    assert disk_failure(OSError(errno.ENOSPC, "No space left on device", "/o/w.pt")).startswith(
        "no space left on device writing /o/w.pt; free space or pass --out DIR")
    assert disk_failure(OSError(errno.EFBIG, "File too large", "/o/w.pt")).startswith("file too large writing /o/w.pt")
    assert disk_failure(OSError(errno.EACCES, "Permission denied")) is None
