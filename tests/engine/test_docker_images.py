"""Real images: build the two offline cells from wheelhouses, run them, rebuild nothing.

Needs a Docker engine, the base image and the wheelhouses (see tests/conftest.py);
the first run builds about 7 GB of images (several minutes), later runs reuse them
because tags are content-addressed. Images are kept on purpose; containers are removed.
"""

from __future__ import annotations

import time

import pytest

from harness.images.build import BaseImageMissing, BuiltImage, ensure_images, plan_build
from harness.images.matrix import REPO_ROOT, apply_base_images, load_matrix, select

from tests.conftest import patience

pytestmark = pytest.mark.docker

CELLS = {"cpu-torch2.13": "2.13.0+cpu", "cu130-torch2.14": "2.14.1+cu130"}
PROBE = (
    "import os, sys, torch; "
    "print(torch.__version__, os.getuid(), bool(os.path.isdir('/wheels') and os.listdir('/wheels')), sys.executable, "
    "torch.nn.Linear(2, 1)(torch.ones(1, 2)).shape[-1])"
)


@pytest.fixture(scope="module")
def plans(wheelhouse_root, base_image):
    cells = apply_base_images(select(load_matrix(), list(CELLS)), {"*": base_image})
    return [plan_build(c, REPO_ROOT, wheelhouse_root / c.name) for c in cells]


@pytest.fixture(scope="module")
def built(engine, plans):
    start = time.monotonic()
    res = ensure_images(engine, plans)
    print(f"\nensure_images (first): {time.monotonic() - start:.1f}s "
          + ", ".join(f"{k}: {'built' if getattr(v, 'built', False) else v} {getattr(v, 'seconds', 0):.1f}s"
                      for k, v in res.items()))
    return res


def test_images_build_offline(built, plans, docker_client):
    for plan in plans:
        img = built[plan.cell.name]
        assert isinstance(img, BuiltImage), f"{plan.cell.name}: {img}"
        labels = docker_client.images.get(plan.tag).labels
        assert labels["org.harness.cell"] == plan.cell.name
        assert labels["org.harness.input-hash"] == plan.input_hash
        assert docker_client.images.get(plan.alias).id == img.id  # the compose alias


@pytest.mark.parametrize("cell", list(CELLS))
def test_image_runs_torch_as_non_root_without_network(built, plans, docker_client, cell):
    plan = next(p for p in plans if p.cell.name == cell)
    out = docker_client.containers.run(
        plan.tag, entrypoint=["python", "-c", PROBE], network_mode="none", remove=True,
    ).decode().split()
    version, uid, has_wheels, exe, width = out
    assert version == CELLS[cell]
    assert uid == "10001"
    assert has_wheels == "False"  # the wheels were bind-mounted: only the empty mount point is left
    assert exe == "/opt/venv/bin/python" and width == "1"


def test_second_ensure_builds_nothing(built, plans, engine):
    start = time.monotonic()
    again = ensure_images(engine, plans)
    took = time.monotonic() - start
    print(f"\nensure_images (warm): {took:.2f}s")
    assert all(isinstance(r, BuiltImage) and not r.built for r in again.values())
    assert {r.id for r in again.values()} == {r.id for r in built.values()}
    assert took < patience(30)


def test_missing_base_image_is_refused_without_pulling(engine, wheelhouse_root):
    cell = apply_base_images(select(load_matrix(), ["cpu-torch2.13"]), {"*": "harness-test/absent-base:0"})[0]
    res = ensure_images(engine, [plan_build(cell, REPO_ROOT, wheelhouse_root / cell.name)])
    assert isinstance(res[cell.name], BaseImageMissing)
    assert "harness-test/absent-base:0" in str(res[cell.name])


def test_failed_build_carries_the_log_tail_and_others_still_build(docker_client, engine, base_image, wheelhouse_root,
                                                                  plans):
    import io

    from harness.images.build import BuildFailed

    broken = "harness-test/nopython:0"
    docker_client.images.build(
        fileobj=io.BytesIO(f"FROM {base_image}\nRUN rm -f /usr/bin/python3.11 /usr/bin/python3\n".encode()),
        tag=broken, rm=True,
    )
    try:
        cell = apply_base_images(select(load_matrix(), ["cpu-torch2.13"]), {"*": broken})[0]
        bad = plan_build(cell, REPO_ROOT, wheelhouse_root / cell.name)
        res = ensure_images(engine, [bad, plans[1]])
        err = res["cpu-torch2.13"]
        assert isinstance(err, BuildFailed) and err.tag == bad.tag
        assert any("lacks python3.11" in line for line in err.log_tail)
        assert "step 2/" in str(err) and "exited with code 1" in str(err)  # the Python check
        assert isinstance(res["cu130-torch2.14"], BuiltImage)
    finally:
        docker_client.images.remove(broken, force=True)


# ----------------------------------------------------------------------------- lean images


def test_build_leaves_no_dangling_stage_and_cells_share_their_base_layers(built, plans, docker_client):
    hashes = {p.input_hash for p in plans}
    dangling = docker_client.images.list(filters={"dangling": True, "label": "org.harness.cell"})
    assert not [i.id for i in dangling if i.labels.get("org.harness.input-hash") in hashes]
    cpu, cu = (docker_client.images.get(p.tag) for p in plans)
    assert not any("wheelhouse" in (h.get("CreatedBy") or "") and "COPY" in (h.get("CreatedBy") or "")
                   for h in cu.history())  # the wheels were bind-mounted, never copied into a layer
    base = len(docker_client.images.get(plans[0].cell.base_ref).attrs["RootFS"]["Layers"])
    a, b = cpu.attrs["RootFS"]["Layers"], cu.attrs["RootFS"]["Layers"]
    assert a[: base + 1] == b[: base + 1]  # the base and its Python check are one layer for both cells


def _cli(*args: str, env_extra: dict[str, str] | None = None) -> str:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "HARNESS_WHEELHOUSE"}
    env.update({"COLUMNS": "250", "PYTHONPATH": str(REPO_ROOT), **(env_extra or {})})
    res = subprocess.run([sys.executable, "-m", "harness", "images", *args], capture_output=True, text=True,
                         env=env, timeout=patience(300))
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_images_list_shows_sizes_states_and_a_total(built, plans, wheelhouse_root, base_image):
    out = _cli("list", "--cells", ",".join(CELLS), "--wheelhouse", str(wheelhouse_root), "--base-image", base_image)
    assert "harness images in the engine" in out
    for p in plans:
        row = next(line for line in out.splitlines() if p.tag in line)
        assert "current" in row and (" GB" in row or " MB" in row), row
    assert "total:" in out and "shared layers counted once" in out


def test_prune_removes_a_harness_dangling_image_it_planted(docker_client, base_image):
    import io
    import uuid

    mark = f"prune-test-{uuid.uuid4().hex[:8]}"
    image, _ = docker_client.images.build(
        fileobj=io.BytesIO(f"FROM {base_image}\nRUN echo {mark} > /planted\n".encode()),
        labels={"org.harness.cell": mark}, rm=True,
    )
    try:
        assert not image.tags  # untagged: dangling, like a stage a build left behind
        # No wheelhouse: no cell's current tag is known, so no stale tag is touched (others' images stay).
        dry = _cli("prune", "--cells", "cpu-torch2.13", "--dry-run")
        assert f"would remove dangling image {image.id.split(':')[-1][:12]}" in dry
        assert docker_client.images.list(filters={"label": f"org.harness.cell={mark}"})
        out = _cli("prune", "--cells", "cpu-torch2.13")
        assert f"removed dangling image {image.id.split(':')[-1][:12]}" in out and "freed" in out
        assert not docker_client.images.list(filters={"label": f"org.harness.cell={mark}"})
    finally:
        for img in docker_client.images.list(filters={"label": f"org.harness.cell={mark}"}):
            docker_client.images.remove(img.id, force=True)
