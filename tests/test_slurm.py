"""The Slurm backend: its pure parts (site file, routing, states, cell names) without Slurm, and
end to end on a real cluster (marker ``slurm``: .ci/slurm-up.sh starts one with GPU types alpha and beta)."""

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
from harness.errors import InputError
from harness.images.matrix import ImageCell
from harness.plan import slurm_cells
from harness.record import Status
from harness.slurm_site import (SlurmSettings, gres_of, parse_settings, parse_time, settings, split_gpu, state_word,
                                status_of)

from .conftest import REPO, default_signals, patience

TRAINERS = Path(__file__).parent / "trainers"
CELL = "cpu-torch2.13"  # a CPU cell: the fake GPUs of the CI cluster are routing targets, not devices


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("text, minutes", [(90, 90), ("90", 90), ("30m", 30), ("2h", 120), ("1d", 1440),
                                           ("90s", 2), ("1s", 1), ("1:30:00", 90), ("5:00", 5), ("0:10", 1)])
def test_time_limits_are_whole_minutes(text, minutes):
    assert parse_time(text, "site.yaml") == minutes


@pytest.mark.parametrize("bad", ["0", "-5m", "soon", "1:2:3:4", True, "inf"])
def test_a_bad_time_limit_names_the_key(bad):
    with pytest.raises(InputError, match=r"site.yaml: slurm.time"):
        parse_settings({"time": bad}, "site.yaml")


def test_site_section_and_flags_merge_key_by_key():
    site = {"partition": "gpu", "account": "ml", "qos": "normal", "time": "2h", "mem": "16g", "cpus_per_task": 8,
            "runtime": "docker", "python": "/opt/venv/bin/python", "gpu_types": {"a100": "a100_80g"},
            "setup": ["module load cuda"]}
    s = settings(site, {"partition": "debug", "time": "30m", "runtime": None})
    assert (s.partition, s.account, s.qos, s.time_min, s.mem, s.cpus_per_task, s.runtime) == \
        ("debug", "ml", "normal", 30, "16G", 8, "docker")
    assert s.python == "/opt/venv/bin/python" and s.setup == ("module load cuda",)
    assert settings(None, {}) == SlurmSettings()


@pytest.mark.parametrize("data, key", [
    ({"partiton": "x"}, "unknown key.*partiton"), ({"partition": "a b"}, "slurm.partition"),
    ({"mem": "lots"}, "slurm.mem"), ({"cpus_per_task": 0}, "slurm.cpus_per_task"),
    ({"runtime": "apptainer"}, "slurm.runtime"), ({"gpu_request": "tres"}, "slurm.gpu_request"),
    ({"gpu_types": ["a100"]}, "slurm.gpu_types"), ({"setup": "module load x"}, "slurm.setup"),
    ({"python": ""}, "slurm.python"), (["partition"], "slurm must be a mapping"),
])
def test_bad_site_keys_are_one_line_errors_naming_the_key(data, key):
    with pytest.raises(InputError, match=key) as info:
        parse_settings(data, "site.yaml")
    assert "\n" not in info.value.one_line()


def test_gpu_routing_by_gres_or_gpus_with_the_sites_type_names():
    s = SlurmSettings(partition="p", time_min=10, gpu_types={"a100": "a100_80g"})
    params = s.job_params("a100")
    assert params["gres"] == "gpu:a100_80g:1" and params["partition"] == "p" and params["time"] == 10
    assert "gres" not in s.job_params(None) and "gpus" not in s.job_params(None)["additional_parameters"]
    by_gpus = SlurmSettings(gpu_request="gpus", gpus_per_cell=2).job_params("h100")
    assert by_gpus["additional_parameters"]["gpus"] == "h100:2" and "gres" not in by_gpus
    assert params["additional_parameters"]["signal"] == "CONT@30"  # no USR2 that would kill the worker early


@pytest.mark.parametrize("state, status", [
    ("COMPLETED", "failed"), ("FAILED", "failed"), ("NODE_FAIL", "failed"), ("OUT_OF_MEMORY", "failed"),
    ("CANCELLED by 0", "interrupted"), ("PREEMPTED", "interrupted"), ("TIMEOUT", "timeout"), (None, "failed"),
])
def test_slurm_end_states_map_to_record_statuses(state, status):
    assert status_of(state) == status
    assert Status(status)


def test_state_words_and_gres_from_sacct():
    assert state_word("CANCELLED by 0") == "CANCELLED" and state_word(None) == "UNKNOWN"
    assert gres_of("billing=1,cpu=1,gres/gpu:alpha=1,gres/gpu=1,mem=1G,node=1") == ["alpha"]
    assert gres_of("") == []


def test_cells_on_gpu_types_are_the_hardware_axis():
    ic = ImageCell(name="cu124-torch2.5", torch="2.5.1", variant="cu124", cuda="12.4", python="3.11", base_image="b",
                   source="index", index_url=None, min_driver=None, arch=(), device="auto")
    own = ImageCell(name="cpu-x", torch="2.5.1", variant="cpu", cuda=None, python="3.11", base_image="b",
                    source="index", index_url=None, min_driver=None, arch=(), device="cpu", gpu="h100")
    cells = slurm_cells([(ic, "a100", True), (ic, "h100", True), (own, own.gpu, False), (ic, "a100", True)],
                        ["strict"], [None], [False], 1)
    assert [c.name for c in cells] == ["cu124-torch2.5-a100", "cu124-torch2.5-h100", "cpu-x"]
    assert [c.gpu for c in cells] == ["a100", "h100", "h100"] and cells[0].labels["gpu"] == "a100"
    assert [c.device for c in cells] == ["auto", "auto", "cpu"]


def test_band_members_run_on_the_baselines_gpu_type():
    from harness.plan import band_cells

    ic = ImageCell(name="c", torch="2.5.1", variant="cpu", cuda=None, python="3.11", base_image="b", source="index",
                   index_url=None, min_driver=None, arch=(), device="cpu")
    base = slurm_cells([(ic, "a100", True)], ["strict"], [None], [False], 1)[0]
    assert {m.gpu for m in band_cells(base, 2, 1, 0)} == {"a100"}


def test_cells_name_a_gpu_type_with_at():
    assert split_gpu("cpu-torch2.13@alpha") == ("cpu-torch2.13", "alpha")
    assert split_gpu("cpu-torch2.13") == ("cpu-torch2.13", None)
    for bad in ("@alpha", "x@", "x@a b", "x@a@b"):
        with pytest.raises(InputError, match="--cells"):
            split_gpu(bad)


def harness(*args: str, cwd: Path | None = None, timeout: int = 600, **kw) -> subprocess.CompletedProcess[str]:
    """The CLI; ``timeout``: the seconds after which it hangs on an idle machine (scaled by the load)."""
    env = dict(os.environ, COLUMNS="220", PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    env.pop("HARNESS_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=patience(timeout), **kw)


@pytest.mark.parametrize("args, words", [
    (["--backend", "local", "--partition", "debug"], "only apply to the slurm backend"),
    (["--backend", "slurm", "--cells", f"{CELL}@a b"], "--cells"),
    (["--backend", "slurm", "--cells", CELL, "--time", "soon"], "slurm.time"),
    (["--backend", "slurm", "--cells", CELL, "--memory", "8g"], "--mem"),
    (["--backend", "slurm", "--cells", CELL, "--gpus", "0"], "--cells CELL@TYPE"),
])
def test_bad_slurm_flags_are_refused_in_one_line_before_anything_is_submitted(args, words, example, tmp_path):
    res = harness("matrix", str(example), "-o", str(tmp_path / "out"), *args)
    assert res.returncode == 2, res.stderr
    assert words in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "slurm-jobs.json").exists()


def test_a_bad_site_file_names_its_slurm_key(example, tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("slurm:\n  partition: debug\n  cpus: 4\n")
    res = harness("matrix", str(example), "--backend", "slurm", "--cells", CELL, "--site-config", str(site),
                  "-o", str(tmp_path / "out"))
    assert res.returncode == 2 and "site.yaml: slurm: unknown key(s) cpus" in res.stderr, res.stderr


def test_the_jobs_file_and_a_jobs_log_are_read_without_following_a_link(tmp_path: Path) -> None:
    from harness.backends.slurm import JOBS_FILE, JOBS_SCHEMA, LogFollower, read_jobs

    (tmp_path / JOBS_FILE).write_text(json.dumps({"schema": JOBS_SCHEMA, "cells": {"a": {"job_id": "7"}}}))
    assert read_jobs(tmp_path) == {"a": {"job_id": "7"}}
    elsewhere = tmp_path / "elsewhere.json"
    (tmp_path / JOBS_FILE).rename(elsewhere)
    (tmp_path / JOBS_FILE).symlink_to(elsewhere)
    assert read_jobs(tmp_path) == {}  # resubmitted, never read through the link
    log = tmp_path / "job.out"
    follow = LogFollower(log)
    assert follow.lines() == []
    log.write_text("one\ntw")
    assert follow.lines() == ["one\n"]
    assert follow.lines(final=True) == ["tw\n"]
    log.unlink()
    log.symlink_to(elsewhere)
    assert LogFollower(log).lines() == []


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
            "--site-config", str(site), "--no-progress", "-o", str(out), "--detail"]  # the Environment table
    res = harness(*args)
    assert res.returncode == 0, res.stdout + res.stderr
    recs = records(out)
    assert set(recs) == {f"{CELL}-alpha", f"{CELL}-beta"}
    for gpu in ("alpha", "beta"):
        rec = recs[f"{CELL}-{gpu}"]
        assert rec.ok and rec.backend == "slurm" and rec.labels["gpu"] == gpu
        assert rec.slurm["state"] == "COMPLETED" and rec.slurm["gres"] == [gpu] and rec.slurm["gpu_type"] == gpu
        assert rec.slurm["node"] and rec.env.hostname and rec.slurm["job_gpus"] is not None
    assert recs[f"{CELL}-alpha"].slurm["job_id"] != recs[f"{CELL}-beta"].slurm["job_id"]
    assert f"{CELL}-alpha" in res.stdout and f"{CELL}-beta" in res.stdout  # one table, both cells
    node = recs[f"{CELL}-alpha"].slurm["node"]
    assert f"slurm {node} gpu:alpha" in res.stdout and f"slurm {node} gpu:beta" in res.stdout
    jobs = jobs_of(out)

    again = harness(*args, "--resume")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stderr.count("its record is reused") == 2 and "Slurm job" in again.stderr
    assert jobs_of(out) == jobs  # nothing resubmitted
    rerun = records(out)
    assert all(r.slurm["reused_from"] == recs[c].run_id and r.run_id != recs[c].run_id for c, r in rerun.items())


@pytest.mark.slurm
def test_a_job_that_fails_on_the_node_is_a_failed_row_with_its_log(slurm_cluster, example, tmp_path):
    out = tmp_path / "out"
    res = harness("matrix", str(example), "--backend", "slurm", "--cells", f"{CELL}@alpha", "--partition",
                  slurm_cluster, "--python", str(tmp_path / "no-such-python"), "--no-progress", "-o", str(out))
    assert res.returncode == 1, res.stdout + res.stderr
    rec = records(out)[f"{CELL}-alpha"]
    assert rec.status is Status.FAILED and rec.slurm["state"] == "FAILED" and rec.error.kind == "slurm"
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
    assert rec.status is Status.INTERRUPTED and rec.slurm["state"] == "CANCELLED"
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
    assert rec.status is Status.TIMEOUT and rec.slurm["state"] == "TIMEOUT"
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
    assert rec.slurm["state"] == "COMPLETED" and rec.slurm["gres"] == ["alpha"] and rec.slurm["runtime"] == "docker"


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
    assert second.returncode == 1 and records(out)[f"{CELL}-alpha"].slurm["state"] == "CANCELLED"



@pytest.mark.slurm
def test_the_jobs_a_failing_test_leaves_are_cancelled_when_it_ends_and_no_others(slurm_cluster, tmp_path):
    """conftest's engine_tidy, after every slurm test: a test that fails with its job still running (here in a
    pytest run of its own) has the job cancelled, and off the node, by the time it has ended; a job this
    session did not submit (one whose script and working directory lie elsewhere) is left alone."""
    import shutil
    import tempfile

    from .conftest import inner_pytest

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
