"""--data-path fast in both CI images: the replayed batch order trains to the DataLoader's weights, bit for bit.

The fast path is proven at run time inside each image, against that image's
torch (2.13 and 2.14); this test holds the other half of the acceptance: the
weights trained on it equal the DataLoader path's in every CI image.

Marked `docker`: skipped locally without an engine, required under CI=true.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import record
from harness.record import Status

from tests.conftest import EXAMPLE, EXAMPLE_CONV, REPO

pytestmark = pytest.mark.docker

CELLS = ("cpu-torch2.13", "cu130-torch2.14")
EPOCHS = 4


@pytest.mark.parametrize("example", [EXAMPLE, EXAMPLE_CONV], ids=["mlp", "conv1d"])
def test_fast_and_loader_train_identical_weights_in_every_ci_image(tmp_path: Path, example: Path, docker_client,
                                                                    wheelhouse_root: Path, base_image: str) -> None:
    shutil.copytree(example, tmp_path / "examples" / example.name)
    shutil.copytree(REPO / "examples" / "data", tmp_path / "examples" / "data")
    # A few epochs are as telling as all of them: the fast path replays each epoch's shuffled order, and
    # the first differing batch of any epoch parts the weights. (The examples' full 25 and 30 epochs made
    # this the slowest test of the suite.)
    config = tmp_path / "examples" / example.name / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["training"]["epochs"] = EPOCHS
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    recs = {}
    for path in ("loader", "fast"):
        out = tmp_path / path
        p = subprocess.run([sys.executable, "-m", "harness", "matrix", str(tmp_path / "examples" / example.name),
                            "--cells", ",".join(CELLS), "--data-path", path, "--out", str(out),
                            "--band", "0", "--band-seeds", "0",  # the data paths are compared, not judged
                            "--wheelhouse", str(wheelhouse_root), "--base-image", base_image, "--no-progress"],
                           capture_output=True, text=True, env=dict(os.environ, COLUMNS="230"), timeout=1800)
        assert p.returncode in (0, 3), p.stdout + p.stderr  # reproduced, or drifted with numbers: never a failure
        recs[path] = {r.cell: r for r in record.load(out).records}
        assert list(recs[path]) == list(CELLS)
    for cell in CELLS:
        loader, fast = recs["loader"][cell], recs["fast"][cell]
        assert loader.status is Status.OK and fast.status is Status.OK, (loader.error, fast.error)
        assert loader.env.in_container and fast.env.in_container
        assert loader.spec["data_feed"] == "loader" and fast.spec["data_feed"] == "fast"
        assert loader.data_feed.effective == "loader"
        # proven inside the image, against its own torch, and taken
        assert fast.data_feed.effective == "fast", fast.data_feed
        assert fast.data_feed.torch == fast.env.torch and not fast.warnings
        assert fast.weights_sha256 == loader.weights_sha256, cell
        assert fast.last_weights_sha256 == loader.last_weights_sha256, cell
        assert [h["val_loss"] for h in fast.history] == [h["val_loss"] for h in loader.history]
        assert len(fast.history) == EPOCHS
    assert recs["fast"]["cpu-torch2.13"].env.torch.startswith("2.13")
    assert recs["fast"]["cu130-torch2.14"].env.torch.startswith("2.14")
