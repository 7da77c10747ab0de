"""A Docker cell the real engine cannot run: its reason and the way out are said once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.test_cli import harness

pytestmark = pytest.mark.docker


@pytest.mark.parametrize("progress", [[], ["--no-progress"]])
def test_a_skipped_docker_cell_says_its_reason_once(docker_client, make_bundle, tmp_path: Path,
                                                    progress: list[str]) -> None:
    """A cell whose base image is not in the engine (and is not pinned, so never pulled) is skipped: its
    reason and the command that makes it buildable are said once, not by the image step and the progress too."""
    absent = "local/harness-absent-base:never"
    p = harness("matrix", str(make_bundle()), "--cells", "cu124-torch2.5", "--base-image", f"cu124-torch2.5={absent}",
                "--gpus", "none", "--out", str(tmp_path / "o"), *progress)
    text = p.stdout + p.stderr
    assert p.returncode == 1, text  # no cell could run
    assert text.count(f"{absent} is not in the engine") == 1, text
    assert text.count(f"docker pull {absent}") == 1, text
    assert "cu124-torch2.5" in p.stderr  # the image step still says the cell was skipped
