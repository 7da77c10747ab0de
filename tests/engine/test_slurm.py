"""The Slurm backend end to end on a real cluster (marker ``slurm``: .ci/slurm-up.sh starts one with GPU
types alpha and beta). Its pure parts: tests/unit/backends/test_slurm.py."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import record
from harness.record import Status

from tests.conftest import REPO, TESTS, default_signals, patience
from tests.unit.backends.test_slurm import CELL, harness

TRAINERS = TESTS / "trainers"


# --------------------------------------------------------------------------- on a real cluster


def records(out: Path) -> dict[str, record.ResultRecord]:
    return {r.cell: r for r in record.load(out).records}


def jobs_of(out: Path) -> dict[str, str]:
    path = out / "slurm-jobs.json"
    if not path.exists():
        return {}
    try:
        return {c: e["job_id"] for c, e in json.loads(path.read_text())["cells"].items()}
    except ValueError:
        return {}  # being written


def squeue_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                          timeout=patience(60)).stdout.strip()


def wait_running(out: Path, cells: int, timeout: float = 120) -> dict[str, str]:
    """The cells' job ids, once every job runs and its worker has started (the hang trainer printed)."""
    deadline = time.monotonic() + patience(timeout)
    while time.monotonic() < deadline:
        jobs = jobs_of(out)
        if len(jobs) == cells and all(squeue_state(j) == "RUNNING" for j in jobs.values()) and \
                all("hang: about to hang" in _read(out / c / "worker.log") for c in jobs):
            return jobs
        time.sleep(0.5)
    raise AssertionError(f"jobs did not start: {jobs_of(out)}")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _end(proc: subprocess.Popen, out: Path) -> None:
    """A CLI the test gave up on: killed and reaped, and its jobs cancelled, so that no job blocks the next test."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate()
        for job_id in jobs_of(out).values():
            subprocess.run(["scancel", job_id], capture_output=True)


def hang_args(example: Path, out: Path, cells: str, partition: str, *more: str) -> list[str]:
    return ["matrix", str(example), "--backend", "slurm", "--cells", cells, "--partition", partition,
            "--trainer", "hang:train", "--trainer-path", str(TRAINERS), "--no-progress", "-o", str(out), *more]


@pytest.mark.slurm
def test_two_cells_on_two_gpu_types_then_a_rerun_reuses_their_records(slurm_cluster, example, tmp_path):
    out = tmp_path / "out"
    site = tmp_path / "site.yaml"
    site.write_text(f"slurm:\n  partition: {slurm_cluster}\n  time: 10m\n  runtime: python\n  python: {sys.executable}\n")
    args = ["matrix", str(example), "--backend", "slurm", "--cells", f"{CELL}@alpha,{CELL}@beta",
            "--site-config", str(site), "--no-progress", "-o", str(out), "--detail",  # the Environment table
            # no automatic band: off the trial's CPU model the cells differ beyond float32 rounding, and
            # its eight seed jobs would make this a test of bands, not of GPU types and reuse
            "--band", "0", "--band-seeds", "0"]
    res = harness(*args)
    assert res.returncode == 0, res.stdout + res.stderr
    recs = records(out)
    assert set(recs) == {f"{CELL}-alpha", f"{CELL}-beta"}
    for gpu in ("alpha", "beta"):
        rec = recs[f"{CELL}-{gpu}"]
        assert rec.ok and rec.backend == "slurm" and rec.labels["gpu"] == gpu
        assert rec.slurm.state == "COMPLETED" and rec.slurm.gres == [gpu] and rec.slurm.gpu_type == gpu
        assert rec.slurm.node and rec.env.hostname and rec.slurm.job_gpus is not None
    assert recs[f"{CELL}-alpha"].slurm.job_id != recs[f"{CELL}-beta"].slurm.job_id
    assert f"{CELL}-alpha" in res.stdout and f"{CELL}-beta" in res.stdout  # one table, both cells
    node = recs[f"{CELL}-alpha"].slurm.node
    assert f"slurm {node} gpu:alpha" in res.stdout and f"slurm {node} gpu:beta" in res.stdout
    jobs = jobs_of(out)

    again = harness(*args, "--resume")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stderr.count("its record is reused") == 2 and "Slurm job" in again.stderr
    assert jobs_of(out) == jobs  # nothing resubmitted
    rerun = records(out)
    assert all(r.slurm.reused_from == recs[c].run_id and r.run_id != recs[c].run_id for c, r in rerun.items())


@pytest.mark.slurm
def test_a_job_that_fails_on_the_node_is_a_failed_row_with_its_log(slurm_cluster, example, tmp_path):
    out = tmp_path / "out"
    res = harness("matrix", str(example), "--backend", "slurm", "--cells", f"{CELL}@alpha", "--partition",
                  slurm_cluster, "--python", str(tmp_path / "no-such-python"), "--no-progress", "-o", str(out))
    assert res.returncode == 1, res.stdout + res.stderr
    rec = records(out)[f"{CELL}-alpha"]
    assert rec.status is Status.FAILED and rec.slurm.state == "FAILED" and rec.error.kind == "slurm"
    assert "no-such-python" in (rec.error.log_tail or "")
    assert "Traceback" not in res.stderr


@pytest.mark.slurm
def test_a_cancelled_job_is_a_cancelled_row_and_the_run_exits_1(slurm_cluster, example, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "harness", *hang_args(example, out, f"{CELL}@alpha", slurm_cluster)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, COLUMNS="220", PYTHONPATH=str(REPO)), preexec_fn=default_signals)
    try:
        jobs = wait_running(out, 1)
        subprocess.run(["scancel", jobs[f"{CELL}-alpha"]], check=True)
        stdout, stderr = proc.communicate(timeout=patience(120))
    finally:
        _end(proc, out)
    assert proc.returncode == 1, stdout + stderr
    rec = records(out)[f"{CELL}-alpha"]
    assert rec.status is Status.INTERRUPTED and rec.slurm.state == "CANCELLED"
    assert "CANCELLED" in rec.error.message and "hang: about to hang" in (rec.error.log_tail or "")
    assert "CANCELLED" in stdout
    # the run is incomplete without a Ctrl-C here: it says the command that finishes it, -o OUT as --resume OUT
    args = hang_args(example, out, f"{CELL}@alpha", slurm_cluster)
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("resume with: ")]
    assert shlex.split(line.removeprefix("resume with: ")) == ["harness", *args[:-2], "--resume", str(out)], line


@pytest.mark.slurm
def test_ctrl_c_cancels_the_jobs_the_run_submitted(slurm_cluster, example, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "harness",
                             *hang_args(example, out, f"{CELL}@alpha,{CELL}@beta", slurm_cluster)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, COLUMNS="220", PYTHONPATH=str(REPO)), preexec_fn=default_signals)
    try:
        jobs = wait_running(out, 2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=patience(120))
    finally:
        _end(proc, out)
    assert proc.returncode == 130, stdout + stderr
    for job_id in jobs.values():
        assert f"cancelled Slurm job {job_id}" in stderr
    deadline = time.monotonic() + patience(30)
    while any(squeue_state(j) for j in jobs.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(squeue_state(j) for j in jobs.values()), "a job outlived the run that submitted it"
    assert records(out)[f"{CELL}-alpha"].status is Status.INTERRUPTED


@pytest.mark.slurm
def test_a_job_past_its_time_limit_is_a_timeout_row(slurm_cluster, example, tmp_path):
    # Slurm's time limits are whole minutes: this test takes a little over one.
    out = tmp_path / "out"
    res = harness(*hang_args(example, out, f"{CELL}@beta", slurm_cluster, "--time", "1"), timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    rec = records(out)[f"{CELL}-beta"]
    assert rec.status is Status.TIMEOUT and rec.slurm.state == "TIMEOUT"
    assert "time limit" in rec.error.message and "hang: about to hang" in (rec.error.log_tail or "")


@pytest.mark.slurm
@pytest.mark.docker
def test_runtime_docker_runs_the_cell_in_its_image_on_the_node(slurm_cluster, docker_client, wheelhouse_root,
                                                                base_image, example, tmp_path):
    out = tmp_path / "out"
    res = harness("matrix", str(example), "--backend", "slurm", "--runtime", "docker", "--cells", f"{CELL}@alpha",
                  "--partition", slurm_cluster, "--time", "30", "--wheelhouse", str(wheelhouse_root),
                  "--base-image", base_image, "--no-progress", "-o", str(out), timeout=1800)
    assert res.returncode == 0, res.stdout + res.stderr
    rec = records(out)[f"{CELL}-alpha"]
    assert rec.ok and rec.env.in_container and rec.image is not None and rec.image.tag.startswith("harness:")
    assert rec.slurm.state == "COMPLETED" and rec.slurm.gres == ["alpha"] and rec.slurm.runtime == "docker"


@pytest.mark.slurm
def test_a_rerun_waits_again_for_a_job_a_killed_run_left_running(slurm_cluster, example, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, COLUMNS="220", PYTHONPATH=str(REPO))
    args = hang_args(example, out, f"{CELL}@alpha", slurm_cluster)
    first = subprocess.Popen([sys.executable, "-m", "harness", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env)
    try:
        jobs = wait_running(out, 1)
    finally:
        first.kill()  # SIGKILL: no chance to cancel its job
        first.wait()
    job_id = jobs[f"{CELL}-alpha"]
    assert squeue_state(job_id) == "RUNNING"
    err_path = tmp_path / "second.err"
    with open(err_path, "w") as err:
        second = subprocess.Popen([sys.executable, "-m", "harness", *args, "--resume"], stdout=subprocess.PIPE,
                                  stderr=err, text=True, env=env)
    try:
        deadline = time.monotonic() + patience(120)
        while "still queued or running" not in _read(err_path) and second.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        subprocess.run(["scancel", job_id], check=True)
        second.communicate(timeout=patience(120))
    finally:
        if second.poll() is None:
            second.kill()
    stderr = _read(err_path)
    assert f"Slurm job {job_id} of an earlier run is still queued or running" in stderr, stderr
    assert jobs_of(out)[f"{CELL}-alpha"] == job_id  # not resubmitted
    assert second.returncode == 1 and records(out)[f"{CELL}-alpha"].slurm.state == "CANCELLED"



@pytest.mark.slurm
def test_the_jobs_a_failing_test_leaves_are_cancelled_when_it_ends_and_no_others(slurm_cluster, tmp_path):
    """conftest's engine_tidy, after every slurm test: a test that fails with its job still running (here in a
    pytest run of its own) has the job cancelled, and off the node, by the time it has ended; a job this
    session did not submit (one whose script and working directory lie elsewhere) is left alone."""
    import shutil
    import tempfile

    from tests.conftest import inner_pytest

    elsewhere = Path(tempfile.mkdtemp(prefix="harness-not-this-session-"))
    other = subprocess.run(["sbatch", "--parsable", "--partition", slurm_cluster, "--time", "2", "--chdir",
                            str(elsewhere), "--wrap", "sleep 600"], capture_output=True, text=True,
                           timeout=patience(60))
    assert other.returncode == 0, other.stderr
    other_id = other.stdout.strip().split(";")[0]
    try:
        res = inner_pytest(tmp_path, "slurm_cluster", f"""
            import subprocess

            import pytest

            @pytest.mark.slurm
            def test_fails_with_its_job_running(slurm_cluster, tmp_path):
                sub = subprocess.run(["sbatch", "--parsable", "--partition", slurm_cluster, "--time", "2",
                                      "--chdir", str(tmp_path), "--wrap", "sleep 600"],
                                     capture_output=True, text=True, check=True)
                open({str(tmp_path / "job")!r}, "w").write(sub.stdout.strip().split(";")[0])
                assert False, "a test that fails with its job still running"
            """)
        job = (tmp_path / "job").read_text()
        assert res.returncode == 1 and "1 failed" in res.stdout, res.stdout + res.stderr
        assert f"engine_tidy: cancelled Slurm job(s) {job} left by" in res.stdout, res.stdout
        assert squeue_state(job) == ""  # gone, not merely cancelling: the node is free for the next test
        assert squeue_state(other_id) in ("PENDING", "RUNNING")
    finally:
        subprocess.run(["scancel", other_id], capture_output=True)
        shutil.rmtree(elsewhere, ignore_errors=True)
