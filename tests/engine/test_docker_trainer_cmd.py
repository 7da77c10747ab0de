"""A script as the trainer inside a pinned image, on a real Docker engine: the user project's own
entry point (``python -m userproj.cli``) reproduces with only --trainer-cmd and --trainer-path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness import record
from harness.record import Status

from tests.conftest import TESTS, assert_reproduces
from tests.engine.test_docker_matrix import docker_args, harness

pytestmark = pytest.mark.docker

USERPROJ = TESTS / "userproj"


def test_a_command_trainer_reproduces_in_a_ci_image(docker_client, wheelhouse_root, base_image, tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    shutil.copytree(USERPROJ, proj, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "out"
    p = harness("run", str(proj / "optuna_best"), "--image", "cpu-torch2.13",
                "--trainer-cmd", "{python} -m userproj.cli {bundle} --out {out_dir} --data {data} --report yaml",
                "--trainer-path", str(proj), "--out", str(out), *docker_args(wheelhouse_root, base_image))
    assert p.returncode == 0, p.stdout + p.stderr
    (rec,) = record.load(out).records
    assert rec.status is Status.OK and rec.backend == "docker" and rec.env.in_container
    assert_reproduces(rec, p.stdout)  # bit for bit on the trial's CPU model, to numerical noise elsewhere
    # the command ran in the container, with the image's Python and the container's paths, seeded by the harness
    assert rec.trainer["argv"][0] == "/opt/venv/bin/python" and rec.trainer["cwd"] == "/harness/out"
    assert rec.trainer["seeded_by_harness"] is True
    (proc,) = rec.trainer["python_processes"]
    assert proc["torch"] == rec.env.torch and proc["determinism"]["deterministic_algorithms"] is True
    assert (out / "cpu-torch2.13" / "trainer.stdout.log").read_text().startswith("retraining /harness/bundle")


def test_an_unedited_project_gets_its_band_and_trace_in_a_ci_image(docker_client, wheelhouse_root, base_image,
                                                                   tmp_path: Path) -> None:
    """The second foreign project (class-based, gradient accumulation, bf16 autocast, torch.compile) as a command
    in the image: the torch hooks the harness puts in the command's own Python perturb it and trace it there."""
    from tests.cli.test_userproj2 import COMMAND, USERPROJ2, _steps

    proj = tmp_path / "proj"
    shutil.copytree(USERPROJ2, proj, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "out"
    p = harness("band", str(proj / "optuna_best"), "--image", "cpu-torch2.13", "--trainer-cmd", COMMAND,
                "--trainer-path", str(proj), "--n", "2", "--trace", "-o", str(out),
                *docker_args(wheelhouse_root, base_image))
    assert p.returncode == 0, p.stdout + p.stderr
    recs = {r.cell: r for r in record.load(out).records}
    assert set(recs) == {"band-ulp-1", "band-ulp-2"}
    for r in recs.values():
        assert r.backend == "docker" and r.env.in_container
        assert r.perturbation.applied is True and r.perturbation.updated is True and r.perturbation.process
        assert r.perturbation.tensor.startswith("_orig_mod.")
        assert r.trace.steps == _steps(proj) and (out / r.cell / "trace.jsonl").is_file()
    assert recs["band-ulp-1"].perturbation.index != recs["band-ulp-2"].perturbation.index or \
        recs["band-ulp-1"].perturbation.tensor != recs["band-ulp-2"].perturbation.tensor
    # the two members' traces, taken in the container, part where each one's own ulp sits: diverge names why
    p = harness("diverge", str(out / "band-ulp-1"), str(out / "band-ulp-2"))
    assert p.returncode == 3 and "cause: perturbed differently" in p.stdout, p.stdout + p.stderr
    assert f"band-ulp-1 moved {recs['band-ulp-1'].perturbation.tensor}" in p.stdout
