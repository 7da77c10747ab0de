"""Driver and GPU facts stated for planning where nvidia-smi cannot measure them, and host warnings in
`harness images list`: what was stated is printed as stated, never as measured."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import InputError
from harness.images.matrix import describe_host, load_matrix, parse_site_config

from tests.conftest import REPO, patience

CELLS = "cu126-torch2.6,cu128-torch2.7,cu130-torch2.9,cpu-torch2.13"


def images_list(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HARNESS_WHEELHOUSE", "HARNESS_SITE_CONFIG", "HARNESS_DEBUG")}
    env.update(COLUMNS="300", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "harness", "images", "list", "--cells", CELLS, *args],
                          capture_output=True, text=True, env=env, timeout=patience(120))


def row(out: str, cell: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(f"│ {cell} "))


def test_images_list_plans_for_a_stated_driver_and_shows_its_warnings() -> None:
    p = images_list("--driver", "560.28.03", "--gpu", "NVIDIA H200,9.0,2")
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "on the stated host" in out and "on this host" not in out
    assert "runs (cuda) with a warning (below)" in row(out, "cu126-torch2.6")
    assert "skip: driver 560.28.03 is below 580" in row(out, "cu130-torch2.9")
    assert row(out, "cpu-torch2.13").rstrip(" │").endswith("runs (cpu)")
    assert ("! cu126-torch2.6: driver 560.28.03 is older than 560.35.05 (CUDA 12.6's own minimum): runs through "
            "minor-version compatibility; kernels that need PTX JIT may fail") in out
    assert "! cu128-torch2.7: driver 560.28.03 is older than 570.124.06 (CUDA 12.8's own minimum)" in out
    assert "! cu130-torch2.9" not in out and "! cpu-torch2.13" not in out  # skipped, or not CUDA: no warning
    assert "host (stated in --driver and --gpu, not measured): driver 560.28.03, GPUs: 2 x NVIDIA H200 (9.0)" in out


def test_images_list_reads_the_stated_host_from_the_site_file(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text('host:\n  driver: "570.26"\n  gpus:\n    - {name: NVIDIA H100 80GB HBM3, capability: "9.0", count: 8}\n')
    p = images_list("--site-config", str(site))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "! cu128-torch2.7: driver 570.26 is older than 570.124.06" in p.stdout
    assert "! cu126-torch2.6" not in p.stdout
    assert (f"host (stated in {site} host, not measured): driver 570.26, GPUs: 8 x NVIDIA H100 80GB HBM3 (9.0)"
            in p.stdout)
    # A flag wins over its key, and says so.
    p = images_list("--site-config", str(site), "--driver", "580.95.05")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "! " not in p.stdout
    assert f"host (stated in {site} host and --driver, not measured): driver 580.95.05, GPUs: 8 x" in p.stdout


def test_without_a_statement_the_host_is_measured_here() -> None:
    p = images_list()
    assert p.returncode == 0, p.stdout + p.stderr
    assert "on this host" in p.stdout and "host (measured): driver " in p.stdout and "stated" not in p.stdout


@pytest.mark.parametrize("args, words", [
    (("--driver", "latest"), "harness: error: --driver: driver 'latest' is not a driver version such as \"570.124.06\""),
    (("--gpu", "H100,nine"), "harness: error: --gpu: GPU H100: capability 'nine' is not a compute capability"),
    (("--gpu", "H100,9.0,many"), "harness: error: --gpu: 'H100,9.0,many': count 'many' is not a number"),
    (("--gpu", ",9.0"), "harness: error: --gpu: a GPU needs a name"),
])
def test_a_bad_statement_is_one_line(args: tuple[str, ...], words: str) -> None:
    p = images_list(*args)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("harness: error:")]
    assert line.startswith(words), line


def test_site_file_host_section() -> None:
    got = parse_site_config({"host": {"driver": "570.124.06", "gpus": [{"name": "B200", "capability": 10.0, "count": 2},
                                                                        {"name": "L4"}]}}, "site.yaml")
    assert got["host"] == {"driver": "570.124.06", "stated": "site.yaml host",
                           "gpus": [{"name": "B200", "capability": "10.0"}] * 2 + [{"name": "L4", "capability": None}]}
    assert describe_host(got["host"]) == ("host (stated in site.yaml host, not measured): driver 570.124.06, "
                                          "GPUs: 2 x B200 (10.0), L4 (capability not stated)")
    assert parse_site_config({}, "site.yaml")["host"] is None
    for bad, words in (({"driver": 580.95}, "driver 580.95 is not a driver version"),  # YAML's float: quote it
                       ({"gpus": [{"name": "A100", "count": 0}]}, "count 0 is not a number of GPUs"),
                       ({"gpus": [{"name": "A100", "memory": "80G"}]}, "each of gpus is {name, capability, count}"),
                       ({"gpu": "A100"}, "unknown key(s) gpu"), ({"gpus": "A100"}, "gpus must be a list")):
        with pytest.raises(InputError) as ei:
            parse_site_config({"host": bad}, "site.yaml")
        assert ei.value.one_line().startswith("site.yaml host: ") and words in ei.value.one_line(), ei.value.one_line()


def test_a_stated_gpu_without_its_capability_is_never_skipped_for_its_architecture() -> None:
    from harness.images.matrix import host_skip_reason

    host = parse_site_config({"host": {"driver": "580.95.05", "gpus": [{"name": "Some GPU"}]}}, "s")["host"]
    assert all(host_skip_reason(c, host) is None for c in load_matrix())
