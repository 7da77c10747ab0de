"""`harness matrix` on an engine that cannot build every cell: built cells run, the rest are skipped.

A fake engine (no Docker needed) with the two CI images already built under their
``harness:<cell>`` aliases, no wheelhouse given and no ``nvidia/cuda`` base image.
"""

from __future__ import annotations

from pathlib import Path

from harness import record as records
from harness.record import Status

from tests.fake_engine import FakeEngine, Outcome, connected_engine, ok_worker  # noqa: F401 - the engine fixture

CPU, GPU = "cpu-torch2.13", "cu130-torch2.14"
CUDA_CELL, CUDA_BASE = "cu124-torch2.5", "nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04"




def test_built_cells_run_without_a_wheelhouse_and_unbuildable_ones_are_skipped(engine: FakeEngine, make_bundle,
                                                                               tmp_path: Path, capsys) -> None:
    from harness.cli import main

    built = engine.add_image("cpu-built", f"harness:{CPU}")
    engine.outcomes.append(Outcome(0, worker=ok_worker))
    out = tmp_path / "out"
    rc = main(["matrix", str(make_bundle()), "--cells", f"{CPU},{CUDA_CELL}", "--out", str(out), "--no-progress",
               "--gpus", "none"])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    (req,) = engine.runs
    assert req.image == built.id and engine.builds == []
    err = " ".join(captured.err.split())
    assert (f"{CPU}: using the built image harness:{CPU} (not checked against its inputs: no wheelhouse given)"
            in err)
    ran = records.read(out / CPU / "record.json")
    assert ran.status is Status.OK and ran.image.tag == f"harness:{CPU}" and ran.image.id == built.id
    assert "no wheelhouse given" in (ran.image.note or "")
    skipped = records.read(out / CUDA_CELL / "record.json")
    assert skipped.status is Status.SKIPPED
    assert f"`docker pull {CUDA_BASE}`" in skipped.error.message
    assert f"--base-image {CUDA_CELL}=IMAGE" in skipped.error.message


def test_a_wheelhouse_cell_without_its_image_is_skipped_with_the_command(engine: FakeEngine, make_bundle,
                                                                         tmp_path: Path, capsys) -> None:
    from harness.cli import main

    engine.add_image("cpu-built", f"harness:{CPU}")
    engine.outcomes.append(Outcome(0, worker=ok_worker))
    out = tmp_path / "out"
    rc = main(["matrix", str(make_bundle()), "--cells", f"{CPU},{GPU}", "--out", str(out), "--no-progress",
               "--gpus", "none"])
    assert rc == 0, capsys.readouterr()
    skipped = records.read(out / GPU / "record.json")
    assert skipped.status is Status.SKIPPED
    assert f"harness images wheelhouse --cells {GPU}" in skipped.error.message


def test_no_runnable_cell_is_one_short_message_and_exit_1(engine: FakeEngine, make_bundle, tmp_path: Path,
                                                          capsys) -> None:
    from harness.cli import main

    rc = main(["matrix", str(make_bundle()), "--cells", f"{CPU},{CUDA_CELL}", "--out", str(tmp_path / "o"),
               "--no-progress", "--gpus", "none"])
    captured = capsys.readouterr()
    assert rc == 1
    text = captured.out + captured.err
    assert "--backend local" in text and f"docker pull {CUDA_BASE}" in text
    assert "Results" not in text  # no table of skips
    assert engine.runs == []


def test_a_build_that_was_attempted_and_failed_stays_failed(engine: FakeEngine, make_bundle, tmp_path: Path,
                                                            capsys) -> None:
    from harness.cli import main

    engine.add_image("base", "python:3.11-slim-bookworm")
    engine.fail_builds["cu118-torch2.3"] = ["pip: no matching distribution"]
    out = tmp_path / "o"
    main(["matrix", str(make_bundle()), "--cells", "cu118-torch2.3", "--out", str(out), "--no-progress",
          "--gpus", "none", "--base-image", "cu118-torch2.3=python:3.11-slim-bookworm"])
    assert records.read(out / "cu118-torch2.3" / "record.json").status is Status.FAILED
