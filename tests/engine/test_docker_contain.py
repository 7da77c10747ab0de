"""What a cell's container cannot do, on a real Docker engine: run a program it wrote into its own
directory (mounted noexec,nosuid,nodev), keep an uncapped log, or write into its directory past its disk limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import record
from harness.backends import docker as dockerbackend
from harness.backends.docker import container_spec, make_overlay_work, remove_overlay_work
from harness.docker_engine import ContainerRequest, Engine, create_kwargs
from harness.plan import Cell, Job
from harness.record import Status

from tests.conftest import patience
from tests.engine.test_docker_matrix import docker_args, harness

pytestmark = pytest.mark.docker

WRITE_AND_RUN = "printf '#!/bin/sh\\necho ran\\n' > x.sh && chmod +x x.sh && ./x.sh"


def _cell_dir(tmp_path: Path) -> Path:
    out = tmp_path / "r" / "c"
    out.mkdir(parents=True)
    os.chmod(out, 0o777)  # whichever user the base image runs as may write here
    return out


def test_a_program_a_trainer_command_writes_into_its_directory_cannot_run(docker_client, wheelhouse_root, base_image,
                                                                          make_bundle, tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = harness("run", str(make_bundle()), "--image", "cpu-torch2.13", "--trainer-cmd", f"sh -c {WRITE_AND_RUN!r}",
                "--out", str(out), *docker_args(wheelhouse_root, base_image))
    (rec,) = record.load(out).records
    assert rec.status is Status.FAILED, p.stdout + p.stderr
    assert "exited with status 126" in rec.error.message and "Permission denied" in rec.error.message
    assert (out / "cpu-torch2.13" / "x.sh").is_file()  # written, where the host finds it; not run
    assert "ran" not in (out / "cpu-torch2.13" / "trainer.stdout.log").read_text().split()
    assert not (out / dockerbackend.MOUNTS_DIR).exists()  # the overlay's work folder went with the container


def test_a_trainer_command_that_writes_forever_is_stopped_at_the_disk_limit(docker_client, wheelhouse_root, base_image,
                                                                             make_bundle, tmp_path: Path) -> None:
    out = tmp_path / "out"
    forever = "sh -c 'while :; do head -c 1048576 /dev/zero >> grow.bin; sleep 0.1; done'"  # about 10 MB/s
    # --timeout: without the watch, a timeout record (not this test's hang)
    p = harness("run", str(make_bundle()), "--image", "cpu-torch2.13", "--trainer-cmd", forever,
                "--timeout", str(int(patience(120))),
                "--out", str(out), *docker_args(wheelhouse_root, base_image), env={"HARNESS_CELL_DISK_LIMIT": "8m"})
    (rec,) = record.load(out).records
    assert rec.status is Status.FAILED and rec.error.kind == "disk", p.stdout + p.stderr
    cell = out / "cpu-torch2.13"
    assert f"wrote more than 8 MiB into its directory {cell} and was stopped" in rec.error.message
    assert "HARNESS_CELL_DISK_LIMIT=16m" in rec.error.message and rec.error.exit_status == 137
    assert (cell / "grow.bin").stat().st_size > 8 << 20  # what it wrote stays there to look at
    assert not (out / dockerbackend.MOUNTS_DIR).exists()  # removed as at a timeout, with the container


def test_the_engine_mounts_the_cell_directory_noexec_and_caps_the_log(docker_client, base_image,
                                                                      tmp_path: Path) -> None:
    engine = Engine(docker_client)
    out = _cell_dir(tmp_path)
    work, why_not = make_overlay_work(out, "c")
    assert why_not is None and work is not None
    job = Job(bundle_dir=str(tmp_path / "r"), data_path=None, results_dir=str(tmp_path / "r"))
    request = container_spec(Cell("c"), job, base_image, memory="512m", overlay_work=str(work))
    created = docker_client.containers.create(**create_kwargs(request))
    try:
        created.reload()
        host = created.attrs["HostConfig"]
        assert host["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}}
    finally:
        created.remove(force=True, v=True)
    lines: list[str] = []
    script = f"grep ' /out ' /proc/mounts; {WRITE_AND_RUN}; echo status $?; sh x.sh"
    ended = engine.run(ContainerRequest(image=base_image, command=("sh", "-c", f"cd /out && {script}"),
                                        mounts=((str(out), "/out", False),), noexec={"/out": str(work)},
                                        timeout_s=120), lines.append)
    remove_overlay_work(work)
    assert ended.status == 0 and ended.error is None and not ended.notes, lines
    (mount,) = [line.split() for line in lines if " /out " in line]  # stdout and stderr come in either order
    assert mount[2] == "overlay" and {"noexec", "nosuid", "nodev"} <= set(mount[3].split(",")), lines
    assert any("Permission denied" in line for line in lines) and "status 126" in lines
    assert "ran" in lines  # a script is still read by its interpreter: noexec stops programs, not data
    assert (out / "x.sh").is_file() and not (tmp_path / "r" / dockerbackend.MOUNTS_DIR).exists()


def test_an_engine_that_cannot_mount_the_overlay_binds_the_directory_and_says_so(docker_client, base_image,
                                                                                  tmp_path: Path) -> None:
    engine = Engine(docker_client)  # its own: it remembers that the overlay failed
    out = _cell_dir(tmp_path)
    lines: list[str] = []
    request = ContainerRequest(image=base_image, command=("sh", "-c", "grep ' /out ' /proc/mounts; touch /out/made"),
                               mounts=((str(out), "/out", False),), noexec={"/out": str(tmp_path / "missing")},
                               timeout_s=120)
    ended = engine.run(request, lines.append)
    assert ended.status == 0, (ended, lines)
    assert len(ended.notes) == 1 and "/out is mounted without noexec,nosuid,nodev" in ended.notes[0]
    assert lines[0].startswith("harness: /out is mounted without noexec")
    (mount,) = [line for line in lines[1:] if " /out " in line]
    assert mount.split()[2] != "overlay"
    assert (out / "made").is_file()
    assert engine.run(request, lines.append).notes == ended.notes  # not tried again, said again


def test_a_line_without_end_reaches_the_host_in_bounded_pieces(docker_client, base_image) -> None:
    lines: list[str] = []
    ended = Engine(docker_client).run(ContainerRequest(
        image=base_image, command=("sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x; echo; echo after"),
        timeout_s=120), lines.append)
    assert ended.status == 0, (ended, [line[:80] for line in lines])
    assert [len(line) for line in lines] == [1 << 20, 1 << 20, 3000000 - (2 << 20), 5] and lines[-1] == "after"
