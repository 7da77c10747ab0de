"""The Slurm backend's pure parts without Slurm: the site file, routing, states, cell names, and the flags
refused before anything is submitted. On a real cluster: tests/engine/test_slurm.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import InputError
from harness.images.matrix import ImageCell
from harness.plan import slurm_cells
from harness.record import Status
from harness.slurm_site import (SlurmSettings, gres_of, parse_settings, parse_time, settings, split_gpu, state_word,
                                status_of)

from tests.conftest import REPO, TESTS, patience

TRAINERS = TESTS / "trainers"
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
