"""What a cell can (not) do to the host, SIGTERM, timeouts, container limits and build locks.

The fake engine stands in for Docker; the local backend and the CLI run for real.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TESTS, default_signals, patience

from harness import record as records
from harness import safeio
from harness.backends import docker as dockerbackend
from harness.backends.docker import DockerBackend, container_spec
from harness.docker_engine import create_kwargs
from harness.images import build as imagebuild
from harness.plan import Cell, Job
from harness.record import ImageInfo, Status

from tests.fake_engine import FakeEngine, Outcome
from tests.records import record as compare_record

TRAINERS = TESTS / "trainers"
CPU = "cpu-torch2.13"


def job(tmp_path: Path, **kw) -> Job:
    (tmp_path / "b").mkdir(exist_ok=True)
    return Job(bundle_dir=str(tmp_path / "b"), data_path=str(tmp_path / "signals.npz"),
               results_dir=str(tmp_path / "r"), **kw)


def backend_with_image(fake: FakeEngine, cell: Cell, **kw) -> DockerBackend:
    img = fake.add_image("cell-image", f"harness:{CPU}-abcdef012345")
    backend = DockerBackend(fake, {}, **kw)  # type: ignore[arg-type]
    backend.use_image(cell.name, ImageInfo(id=img.id, tag=f"harness:{CPU}-abcdef012345"))
    return backend


# ----------------------------------------------------------------------------- 1. the host follows no link a cell planted


def test_a_planted_worker_log_symlink_is_not_followed_on_the_next_run(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("host secret\n")
    fake, cell = FakeEngine(), Cell("c")
    backend = backend_with_image(fake, cell)

    def plant(out: Path, req) -> None:  # a hostile pickle inside the container
        (out / "worker.log").unlink()
        (out / "worker.log").symlink_to(victim)
        (out / "leftover.bin").write_text("x")

    fake.outcomes.append(Outcome(1, lines=["first"], worker=plant))
    backend.run(cell, job(tmp_path))
    fake.outcomes.append(Outcome(1, lines=["second run output"]))
    rec = backend.run(cell, job(tmp_path))
    assert victim.read_text() == "host secret\n"
    log = tmp_path / "r" / "c" / "worker.log"
    assert not log.is_symlink() and log.read_text() == "second run output\n"
    assert not (tmp_path / "r" / "c" / "leftover.bin").exists()  # what the previous container left is gone
    assert rec.status is Status.FAILED


def test_a_symlinked_record_is_a_failed_cell_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    records.write(elsewhere, compare_record("c", sha="forged"))
    fake, cell = FakeEngine(), Cell("c")
    backend = backend_with_image(fake, cell)
    fake.outcomes.append(Outcome(0, worker=lambda out, req: (out / "record.json").symlink_to(elsewhere)))
    rec = backend.run(cell, job(tmp_path))
    assert rec.status is Status.FAILED and rec.weights_sha256 != "forged"
    assert "not a regular file" in rec.error.message
    assert json.loads(elsewhere.read_text())["weights_sha256"] == "forged"  # not overwritten either
    assert not (tmp_path / "r" / "c" / "record.json").is_symlink()


def test_a_fifo_record_does_not_hang_the_host(tmp_path: Path) -> None:
    fake, cell = FakeEngine(), Cell("c")
    backend = backend_with_image(fake, cell)
    fake.outcomes.append(Outcome(0, worker=lambda out, req: os.mkfifo(out / "record.json")))
    rec = backend.run(cell, job(tmp_path))
    assert rec.status is Status.FAILED and "not a regular file" in rec.error.message


def test_write_no_follow_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "spec.json").symlink_to(victim)
    safeio.atomic_write_text(tmp_path / "spec.json", "{}")
    assert victim.read_text() == "keep" and (tmp_path / "spec.json").read_text() == "{}"
    assert not (tmp_path / "spec.json").is_symlink()


def test_cell_dirs_belong_to_the_image_user_and_are_not_world_writable(tmp_path: Path, monkeypatch) -> None:
    chowned = []
    monkeypatch.setattr(dockerbackend, "_uid", lambda: 0)
    monkeypatch.setattr(dockerbackend.os, "chown", lambda p, u, g: chowned.append((str(p), u, g)))
    fake, cell = FakeEngine(), Cell("c")
    backend = backend_with_image(fake, cell)
    fake.outcomes.append(Outcome(0))
    backend.run(cell, job(tmp_path))
    out = tmp_path / "r" / "c"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert (str(out), dockerbackend.IMAGE_UID, dockerbackend.IMAGE_UID) in chowned


# ----------------------------------------------------------------------------- 2. SIGTERM and orphaned containers


def test_containers_carry_the_run_pid_and_host(tmp_path: Path) -> None:
    req = container_spec(Cell("c"), job(tmp_path), "img", run_id="r1")
    assert req.labels[dockerbackend.LABEL_RUN] == "r1"
    assert req.labels[dockerbackend.LABEL_PID] == str(os.getpid())
    assert req.labels[dockerbackend.LABEL_HOST]


def facts(cid: str, status: str, pid: int | None, host: str = "h"):
    from harness.docker_engine import ContainerFacts

    labels = {dockerbackend.LABEL_RUN: "r", dockerbackend.LABEL_HOST: host}
    if pid is not None:
        labels[dockerbackend.LABEL_PID] = str(pid)
    return ContainerFacts(id=cid, status=status, labels=labels)


def test_dead_containers_are_those_whose_cli_is_gone() -> None:
    from harness.backends.docker import dead_containers

    alive = {1}
    found = [facts("live", "running", 1), facts("orphan", "running", 2), facts("exited-live", "exited", 1),
             facts("other-host", "running", 2, host="elsewhere"), facts("other-exited", "exited", 2, host="elsewhere"),
             facts("nolabel-running", "running", None), facts("nolabel-exited", "exited", None)]
    dead = dead_containers(found, "h", lambda pid: pid in alive)
    assert [f.id for f in dead] == ["orphan", "other-exited", "nolabel-exited"]


def test_a_docker_run_starts_by_removing_orphans(tmp_path: Path) -> None:
    fake, cell = FakeEngine(), Cell("c")
    fake.leftover["old"] = facts("old", "running", 2**22 + 12345, host=dockerbackend.hostname())
    backend = backend_with_image(fake, cell)
    backend.prepare([cell], job(tmp_path))
    assert "old" in fake.removed_containers and "old" not in fake.leftover


def test_sigterm_writes_an_interrupted_record_and_exits_143(make_bundle, tmp_path: Path) -> None:
    root = make_bundle("plain")
    out = tmp_path / "o"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(preexec_fn=default_signals, args=[sys.executable, "-m", "harness", "run", str(root), "--trainer", "hang:train",
                             "--trainer-path", str(TRAINERS), "--out", str(out), "--device", "cpu", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        log = out / "run" / "worker.log"
        wait_s = patience(120)
        deadline = time.monotonic() + wait_s
        while not (log.exists() and "about to hang" in log.read_text()):
            assert proc.poll() is None, "the run ended before its trainer hung: " + proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, f"the trainer did not print 'about to hang' within {wait_s:.0f}s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=patience(60))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()  # reap it and close its pipes
    assert proc.returncode == 143, err
    rec = records.read(out / "run" / "record.json")
    assert rec.status is Status.INTERRUPTED and "about to hang" in rec.error.log_tail
    assert (out / "report.json").exists()
    assert not (out / ".harness.lock").exists()  # the run removed its lock file on its way out
    assert err.splitlines()[-2].startswith("harness: terminated (SIGTERM)"), err
    assert err.splitlines()[-1] == "resume with: " + shlex.join([
        "harness", "run", str(root), "--trainer", "hang:train", "--trainer-path", str(TRAINERS), "--device", "cpu",
        "--no-progress", "--resume", str(out)]), err


# ----------------------------------------------------------------------------- 3. timeouts


def test_a_hanging_local_trainer_times_out_with_its_output(make_bundle, tmp_path: Path) -> None:
    root = make_bundle("plain")
    out = tmp_path / "o"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "harness", "run", str(root), "--trainer", "hang:train",
                        "--trainer-path", str(TRAINERS), "--out", str(out), "--device", "cpu", "--no-progress",
                        "--timeout", "20"], capture_output=True, text=True, env=env, timeout=patience(180))
    took = time.monotonic() - t0
    assert p.returncode == 1, p.stdout + p.stderr
    rec = records.read(out / "run" / "record.json")
    assert rec.status is Status.TIMEOUT and rec.error.kind == "timeout"
    assert "20" in rec.error.message and "about to hang" in rec.error.log_tail
    assert rec.timeout_s == 20
    assert took < 20 + patience(60)  # its --timeout ended it: not left running long past it


def test_a_hanging_container_times_out_and_the_next_cell_runs(tmp_path: Path) -> None:
    fake = FakeEngine()
    a, b = Cell("a"), Cell("b")
    backend = backend_with_image(fake, a)
    backend.use_image("b", backend.images["a"])
    fake.outcomes += [Outcome(block=True, lines=["stuck here"]), Outcome(0)]
    j = job(tmp_path, timeout_s=0.5)
    t0 = time.monotonic()
    rec = backend.run(a, j)
    assert time.monotonic() - t0 < patience(10)
    assert rec.status is Status.TIMEOUT and "stuck here" in rec.error.log_tail and rec.timeout_s == 0.5
    assert fake.runs[0].timeout_s == 0.5 and fake.running == {}
    assert backend.run(b, j).status is Status.FAILED  # ran (and wrote no record), not blocked


def test_timeout_flag_parses_and_defaults() -> None:
    from harness.cli import build_parser
    from harness.cli.__init__ import run_options
    from harness.options import DEFAULT_TIMEOUT_S, parse_timeout

    assert parse_timeout("90") == 90 and parse_timeout("30m") == 1800 and parse_timeout("2h") == 7200
    with pytest.raises(Exception):
        parse_timeout("0")
    args = build_parser().parse_args(["run", "b"])
    assert run_options(args, single=True).timeout == DEFAULT_TIMEOUT_S == 6 * 3600
    args = build_parser().parse_args(["matrix", "b", "--timeout", "5"])
    assert run_options(args, single=False).timeout == 5


def test_timeout_is_a_failed_verdict() -> None:
    from harness.judge import Tolerances, Verdict, compare

    rec = records.ResultRecord.without_metrics("c", Status.TIMEOUT, "timeout", "timed out")
    assert compare([rec], Tolerances()).overall is Verdict.FAILED


# ----------------------------------------------------------------------------- 4. container limits


def test_containers_drop_capabilities_and_privileges(tmp_path: Path) -> None:
    req = container_spec(Cell("c"), job(tmp_path), "img", memory=None)
    assert req.cap_drop == ("ALL",) and req.security_opt == ("no-new-privileges",)
    assert req.pids_limit == 4096 and req.memory  # a default limit from the host
    assert "noexec" in req.tmpfs["/tmp"] and "nosuid" in req.tmpfs["/tmp"]
    kw = create_kwargs(req)
    assert kw["cap_drop"] == ["ALL"] and kw["security_opt"] == ["no-new-privileges"]
    assert kw["pids_limit"] == 4096 and kw["mem_limit"] == req.memory
    assert container_spec(Cell("c"), job(tmp_path), "img", memory="8g").memory == "8g"


def test_default_memory_limit_is_most_of_memtotal() -> None:
    from harness.backends.docker import default_memory_limit

    meminfo = "MemTotal:       16384000 kB\nMemFree:         1000 kB\n"
    assert default_memory_limit(meminfo) == f"{16384000 * 1024 * 9 // 10}b"
    assert default_memory_limit("nothing here") is None


def test_the_image_strips_setuid_bits() -> None:
    text = (REPO / "Dockerfile.cuda").read_text()
    final = text[text.rindex("\nFROM "):]
    assert "-perm /6000" in final and "chmod a-s" in final


# ----------------------------------------------------------------------------- 5. one build per tag at a time


def test_concurrent_builds_of_one_tag_build_once(tmp_path: Path, monkeypatch) -> None:
    from harness.images.matrix import load_matrix

    monkeypatch.setenv("HARNESS_LOCK_DIR", str(tmp_path / "locks"))
    fake = FakeEngine()
    cell = next(c for c in load_matrix() if c.name == CPU)
    fake.add_image("base", cell.base_image)
    plan = imagebuild.BuildPlan(cell=cell, tag=f"harness:{CPU}-0123456789ab", buildargs={"BASE_IMAGE": cell.base_image},
                                dockerfile="FROM x\n", context_files=(), lock="", input_hash="0" * 64)
    real = fake.build

    def slow_build(*a, **kw):
        time.sleep(0.5)
        return real(*a, **kw)

    fake.build = slow_build  # type: ignore[method-assign]
    results = []
    threads = [threading.Thread(target=lambda: results.append(imagebuild.build(fake, plan))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=patience(30))
    assert len(fake.builds) == 1
    assert sorted(r.built for r in results) == [False, True]


def test_a_stale_dir_the_worker_made_unreadable_is_moved_aside(tmp_path: Path) -> None:
    from harness.safeio import fresh_dir

    out = tmp_path / "r" / "c"
    (out / "locked").mkdir(parents=True)
    (out / "locked" / "f").write_text("x")
    os.chmod(out / "locked", 0)
    try:
        fresh_dir(out)
        assert list(out.iterdir()) == []
    finally:
        for p in tmp_path.rglob("*"):
            if p.is_dir() and not p.is_symlink():
                os.chmod(p, 0o755)


def test_prune_lists_and_removes_dead_containers() -> None:
    from harness.backends.docker import hostname, remove_dead_containers

    fake = FakeEngine()
    fake.leftover["gone"] = facts("gone", "running", 2**22 + 54321, host=hostname())
    fake.leftover["mine"] = facts("mine", "running", os.getpid(), host=hostname())
    assert [f.id for f in remove_dead_containers(fake, dry_run=True)] == ["gone"] and "gone" in fake.leftover
    assert [f.id for f in remove_dead_containers(fake)] == ["gone"]
    assert list(fake.leftover) == ["mine"]


# ----------------------------------------------------------------------------- the cell's directory: noexec, bounded


def test_a_cells_directory_is_a_noexec_overlay_and_its_log_is_capped(tmp_path: Path) -> None:
    req = container_spec(Cell("c"), job(tmp_path), "img", memory="1g", overlay_work="/w/c-1")
    assert req.noexec == {dockerbackend.OUT: "/w/c-1"}
    assert (req.log_max_size, req.log_max_files) == ("10m", 3)
    kw = create_kwargs(req)
    assert kw["log_config"]["Type"] == "json-file" and kw["log_config"]["Config"] == {"max-size": "10m",
                                                                                     "max-file": "3"}
    mounts = {m["Target"]: m for m in kw["mounts"]}
    out = mounts[dockerbackend.OUT]
    assert out["Type"] == "volume" and out["VolumeOptions"]["NoCopy"] is True
    driver = out["VolumeOptions"]["DriverConfig"]
    assert driver["Name"] == "local" and driver["Options"]["type"] == "overlay"
    options = driver["Options"]["o"].split(",")
    assert {"noexec", "nosuid", "nodev"} <= set(options)
    assert f"upperdir={tmp_path / 'r' / 'c'}" in options  # what the container writes lands in the cell's directory
    assert "lowerdir=/w/c-1/lower" in options and "workdir=/w/c-1/work" in options
    bundle = mounts[dockerbackend.BUNDLE]
    assert bundle["Type"] == "bind" and bundle["ReadOnly"] is True
    # without a work folder (a path mount options cannot carry) it is a plain bind mount
    plain = {m["Target"]: m for m in create_kwargs(container_spec(Cell("c"), job(tmp_path), "img", memory="1g"))["mounts"]}
    assert plain[dockerbackend.OUT]["Type"] == "bind"


def test_each_launch_gets_its_own_overlay_work_folder_and_leaves_none(tmp_path: Path) -> None:
    fake, cell = FakeEngine(), Cell("c")
    backend = backend_with_image(fake, cell)
    seen = []

    def look(out: Path, req) -> None:
        work = Path(req.noexec[dockerbackend.OUT])
        seen.append((work.parent == out.parent / dockerbackend.MOUNTS_DIR, sorted(os.listdir(work))))
        (out / "record.json").write_text(compare_record("c", sha="w").to_json())

    fake.outcomes += [Outcome(0, worker=look), Outcome(0, worker=look)]
    backend.run(cell, job(tmp_path))
    backend.run(cell, job(tmp_path))
    assert seen == [(True, ["lower", "work"])] * 2
    assert len({r.noexec[dockerbackend.OUT] for r in fake.runs}) == 2
    assert not (tmp_path / "r" / dockerbackend.MOUNTS_DIR).exists()


def test_a_cell_that_writes_more_than_its_disk_limit_fails_in_one_line(tmp_path: Path) -> None:
    fake, cell = FakeEngine(), Cell("c")
    backend = backend_with_image(fake, cell, disk=256 << 10)

    def fill(out: Path, req) -> None:  # an ok record, and a megabyte beside it
        (out / "record.json").write_text(compare_record("c", sha="w").to_json())
        (out / "blob.bin").write_bytes(os.urandom(1 << 20))

    fake.outcomes.append(Outcome(0, worker=fill))
    rec = backend.run(cell, job(tmp_path))
    assert rec.status is Status.FAILED and rec.error.kind == "disk"
    assert "wrote more than 256 KiB into its directory" in rec.error.message and "HARNESS_CELL_DISK_LIMIT" in rec.error.message
    assert "\n" not in rec.error.message
    assert records.read(tmp_path / "r" / "c" / "record.json").error.kind == "disk"  # the worker's record is not it
    fake.outcomes.append(Outcome(0, worker=lambda out, req: (out / "record.json").write_text(
        compare_record("c", sha="w").to_json())))
    assert backend.run(cell, job(tmp_path)).status is Status.OK  # within the limit


def test_a_cell_that_keeps_writing_past_its_disk_limit_is_stopped_while_it_runs(tmp_path: Path,
                                                                               monkeypatch) -> None:
    monkeypatch.setattr(dockerbackend, "DISK_WATCH_S", 0.05)
    fake, cell = FakeEngine(), Cell("c")
    backend = backend_with_image(fake, cell, disk=256 << 10)
    out = tmp_path / "r" / "c"

    def keep_writing(out: Path, req) -> None:  # an ok record, then more and more; then it would hang
        (out / "record.json").write_text(compare_record("c", sha="w").to_json())
        (me,) = fake.running.values()
        with open(out / "grow.bin", "wb") as fh:
            while not me.stopped.is_set() and fh.tell() < 16 << 20:
                fh.write(os.urandom(64 << 10))
                fh.flush()

    # no --timeout: without the watch the fake container blocks until its guard (30 s, scaled) fails the test
    fake.outcomes.append(Outcome(block=True, lines=["writing"], worker=keep_writing))
    rec = backend.run(cell, job(tmp_path))
    assert rec.status is Status.FAILED and rec.error.kind == "disk", rec.error
    message = rec.error.message
    assert "\n" not in message and f"wrote more than 256 KiB into its directory {out} and was stopped" in message
    assert "HARNESS_CELL_DISK_LIMIT=512k" in message and rec.error.exit_status == 137 and "writing" in rec.error.log_tail
    assert records.read(out / "record.json").error.kind == "disk"  # the harness's record, not the worker's
    # cleaned up as at a timeout: the container is gone, and so is its overlay's work folder
    assert fake.running == {} and fake.removed_containers == ["c1"]
    assert not (tmp_path / "r" / dockerbackend.MOUNTS_DIR).exists()
    fake.outcomes.append(Outcome(0, worker=lambda out, req: (out / "record.json").write_text(
        compare_record("c", sha="w").to_json())))
    assert backend.run(cell, job(tmp_path)).status is Status.OK  # the next run starts from an empty directory


def test_the_disk_watch_follows_no_link_and_rests_after_a_long_walk(tmp_path: Path) -> None:
    from harness.backends.docker import DiskWatch, cell_usage

    root, outside = tmp_path / "c", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "big.bin").write_bytes(os.urandom(2 << 20))
    (root / "to-file").symlink_to(outside / "big.bin")
    (root / "to-dir").symlink_to(outside)
    (root / "small.bin").write_bytes(os.urandom(150 << 10))
    os.link(root / "small.bin", root / "same.bin")  # one file, two names: counted once
    times = iter([0.0, 1.0, 2.0, 6.0, 6.1])
    watch = DiskWatch(root, 256 << 10, clock=lambda: next(times))
    assert watch() is None and watch.walks == 1  # the walk took 1 s (of the clock): it rests 5 s
    (root / "more.bin").write_bytes(os.urandom(200 << 10))
    assert watch() is None and watch.walks == 1  # resting, nothing walked
    over = watch()
    assert watch.walks == 2 and over is not None and f"more than 256 KiB into its directory {root} and was stopped" in over
    # a folder gone by the time it is read is no unreadable one while the cell runs; after it, it is
    assert cell_usage(tmp_path / "gone", 1 << 20, 10, vanished_ok=True) == (0, 0, None)
    assert cell_usage(tmp_path / "gone", 1 << 20, 10)[2] == "."


def test_the_disk_limit_is_read_from_the_environment_and_a_bad_one_is_one_line() -> None:
    from harness.backends.docker import DISK_LIMIT, disk_limit
    from harness.errors import InputError

    assert disk_limit({}) == DISK_LIMIT == 20 << 30
    assert disk_limit({"HARNESS_CELL_DISK_LIMIT": "5g"}) == 5 << 30
    assert disk_limit({"HARNESS_CELL_DISK_LIMIT": "512MiB"}) == 512 << 20
    assert disk_limit({"HARNESS_CELL_DISK_LIMIT": "4096"}) == 4096
    for bad in ("lots", "-1g", "0"):
        with pytest.raises(InputError) as exc:
            disk_limit({"HARNESS_CELL_DISK_LIMIT": bad})
        assert "HARNESS_CELL_DISK_LIMIT" in exc.value.one_line() and "20g" in exc.value.one_line()


def test_a_container_that_floods_its_output_keeps_the_first_part_and_the_last_lines(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    monkeypatch.setattr(dockerbackend, "OUTPUT_KEEP", 1000)
    fake, cell = FakeEngine(), Cell("c")
    backend = backend_with_image(fake, cell)
    fake.outcomes.append(Outcome(1, lines=[f"line {i:05d}" for i in range(5000)]))
    rec = backend.run(cell, job(tmp_path))
    log = (tmp_path / "r" / "c" / "worker.log").read_text().splitlines()
    assert log[0] == "line 00000" and log[-1] == "line 04999" and len(log) < 200
    assert any("not kept, the last 40 follow" in line for line in log)
    assert "line 04999" in rec.error.message  # the failure still names the last thing it printed


def test_a_bad_disk_limit_stops_the_run_in_one_line(make_bundle, tmp_path: Path, monkeypatch, capsys) -> None:
    from harness.cli import main
    from harness.docker_engine import Engine

    fake = FakeEngine()
    fake.add_image("cpu-built", f"harness:{CPU}")
    monkeypatch.setattr(Engine, "connect", classmethod(lambda cls: fake))
    monkeypatch.setenv("HARNESS_CELL_DISK_LIMIT", "plenty")
    rc = main(["matrix", str(make_bundle()), "--cells", CPU, "--out", str(tmp_path / "out"), "--no-progress",
               "--gpus", "none"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "HARNESS_CELL_DISK_LIMIT" in line]
    assert rc == 2 and len(errors) == 1 and "'plenty' is not a size" in errors[0] and "Traceback" not in err
    assert fake.runs == []


def test_a_directory_mounted_without_noexec_is_said_once_on_stderr(tmp_path: Path, capsys) -> None:
    from harness.docker_engine import ContainerExit

    fake, cell = FakeEngine(), Cell("c")
    backend = backend_with_image(fake, cell)
    note = "/harness/out is mounted without noexec,nosuid,nodev: the engine cannot mount an overlay (test)"
    fake.run = lambda request, on_line=None, **kw: ContainerExit(1, notes=(note,))  # type: ignore[method-assign]
    backend.run(cell, job(tmp_path))
    backend.run(cell, job(tmp_path))
    assert capsys.readouterr().err.count(note) == 1
