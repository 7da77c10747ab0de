"""`harness band` on a real Docker engine: the example's band measured inside the cpu-torch2.13 image.

Marked `docker`: skipped locally without an engine, required under CI=true.
"""

from __future__ import annotations

import json
import shutil

import pytest

from harness import record
from harness.record import ImageInfo, Status

from tests.conftest import EXAMPLE, REPO
from tests.engine.test_docker_matrix import docker_args, harness

pytestmark = pytest.mark.docker

CELL = "cpu-torch2.13"


@pytest.fixture(scope="module")
def docker_band(tmp_path_factory, docker_client, wheelhouse_root, base_image):
    root = tmp_path_factory.mktemp("dband")
    shutil.copytree(EXAMPLE, root / "examples" / "optuna_best")
    shutil.copytree(REPO / "examples" / "data", root / "examples" / "data")
    bundle = root / "examples" / "optuna_best"
    out = root / "band"
    p = harness("band", str(bundle), "--backend", "docker", "--image", CELL, "--n", "2", "-o", str(out),
                "--json", str(root / "band.json"), *docker_args(wheelhouse_root, base_image))
    return {"root": root, "bundle": bundle, "out": out, "proc": p}


def test_band_members_run_in_the_image(docker_band) -> None:
    p = docker_band["proc"]
    assert p.returncode == 0, p.stdout + p.stderr
    recs = record.load(docker_band["out"]).records
    assert [r.cell for r in recs] == ["band-ulp-1", "band-ulp-2"]
    for i, rec in enumerate(recs, 1):
        assert rec.status is Status.OK, rec.error
        assert rec.backend == "docker" and isinstance(rec.image, ImageInfo) and rec.image.cell == CELL
        assert rec.env.in_container is True and rec.env.torch == "2.13.0+cpu"
        assert rec.spec["perturb"] == {"kind": "ulp", "seed": i} and rec.spec["schema"] == "harness.runspec/4"
        assert rec.band.to_dict() == {"kind": "ulp", "member": i, "seed": 42}
        assert rec.perturbation.applied is True and rec.perturbation.tensor
    assert recs[0].weights_sha256 != recs[1].weights_sha256
    assert recs[0].image.id == recs[1].image.id
    text = " ".join(p.stdout.split())
    assert "Band: 2 retrains of the baseline" in text and f"image harness:{CELL}" in text
    band = json.loads((docker_band["root"] / "band.json").read_text())["comparison"]["band"]
    assert band["n_ulp"] == 2 and band["ulp"]["val_loss"]["n"] == 2
