"""What a container gets, as plain data (no engine needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.plan import Cell, Job
from harness.record import ImageInfo
from harness.backends.docker import container_run_spec, container_spec, exit_reason, gpu_spec, host_memory_limit
from harness.docker_engine import ContainerRequest, create_kwargs
from harness.errors import InputError


def job(tmp_path: Path, trainer: bool = False) -> Job:
    return Job(bundle_dir=str(tmp_path / "b"), data_path=str(tmp_path / "d" / "signals.npz"), results_dir=str(tmp_path / "r"),
               trainer="m:f" if trainer else None, trainer_path=[str(tmp_path / "code"), str(tmp_path / "lib")] if trainer else None)


def mounts(spec: ContainerRequest) -> dict[str, tuple[str, bool]]:
    return {target: (source, ro) for source, target, ro in spec.mounts}


def test_strict_cpu_cell(tmp_path: Path) -> None:
    spec = container_spec(Cell("c", device="cpu", threads=2), job(tmp_path), "sha256:abc", run_id="r1")
    assert spec.image == "sha256:abc" and spec.network == "none" and spec.read_only is True
    assert spec.command == ("--spec", "/harness/out/spec.json")
    m = mounts(spec)
    assert m["/harness/bundle"] == (str(tmp_path / "b"), True)
    assert m["/harness/data/signals.npz"] == (str(tmp_path / "d" / "signals.npz"), True)
    assert m["/harness/out"] == (str(tmp_path / "r" / "c"), False)
    env = spec.environment
    assert env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and env["PYTHONHASHSEED"] == "0"
    assert env["OMP_NUM_THREADS"] == "2"
    assert spec.gpus == "none" and spec.user is None and spec.memory == host_memory_limit()
    assert spec.labels["org.harness.run"] == "r1" and spec.labels["org.harness.cell"] == "c"
    assert spec.tmpfs == {"/tmp": "rw,noexec,nosuid,nodev,size=2g"} and spec.shm_size == "1g"
    # what the SDK gets
    kw = create_kwargs(spec)
    assert kw["network_mode"] == "none" and kw["read_only"] is True and kw["detach"] is True
    assert "device_requests" not in kw and "user" not in kw and kw.get("mem_limit") == spec.memory
    assert {m["Target"]: (m["Source"], m["ReadOnly"], m["Type"]) for m in kw["mounts"]}["/harness/out"] == (
        str(tmp_path / "r" / "c"), False, "bind")


def test_default_mode_unsets_the_baked_in_variables(tmp_path: Path) -> None:
    env = container_spec(Cell("c", determinism="default"), job(tmp_path), "img").environment
    assert env["CUBLAS_WORKSPACE_CONFIG"] == "" and env["PYTHONHASHSEED"] == "random"


def test_cuda_cell_requests_gpus(tmp_path: Path) -> None:
    spec = container_spec(Cell("g", device="cuda"), job(tmp_path), "img", gpus="0, 1", memory="8g", host_uid=1000)
    assert spec.gpus == "0,1" and spec.memory == "8g" and spec.user.startswith("1000:")
    kw = create_kwargs(spec)
    (req,) = kw["device_requests"]
    assert req["DeviceIDs"] == ["0", "1"] and req["Capabilities"] == [["gpu"]]
    assert kw["mem_limit"] == "8g" and kw["user"].startswith("1000:")
    none = container_spec(Cell("g", device="cuda"), job(tmp_path), "img", gpus="none")
    assert none.gpus == "none" and "device_requests" not in create_kwargs(none)
    assert create_kwargs(container_spec(Cell("g", device="cuda"), job(tmp_path), "img"))["device_requests"][0]["Count"] == -1


def test_gpu_spec_forms() -> None:
    assert gpu_spec("all") == "all" and gpu_spec(None) == "all" and gpu_spec(" none ") == "none"
    assert gpu_spec("1,") == "1"
    with pytest.raises(InputError):
        gpu_spec(",")


def test_trainer_code_is_mounted_read_only(tmp_path: Path) -> None:
    j = job(tmp_path, trainer=True)
    mounted = mounts(container_spec(Cell("c"), j, "img"))
    assert mounted["/harness/trainer/0"] == (str(tmp_path / "code"), True)
    assert mounted["/harness/trainer/1"] == (str(tmp_path / "lib"), True)
    rs = container_run_spec(Cell("c"), j, ImageInfo(id="sha256:x", tag="harness:c-1"))
    assert rs.trainer == "m:f" and rs.trainer_path == ["/harness/trainer/0", "/harness/trainer/1"]
    assert rs.bundle_dir == "/harness/bundle" and rs.data_path == "/harness/data/signals.npz" and rs.backend == "docker"


def test_exit_reasons() -> None:
    assert "OOM-killed" in exit_reason(137, True, "48m") and "48m" in exit_reason(137, True, "48m")
    assert "SIGKILL" in exit_reason(137, False, None)
    assert exit_reason(1, False, None) == "container exited with status 1"


class _Stopped:
    """A container whose follow stream closed before its last writes (what Docker 20.10's json-file follower can do)."""

    def __init__(self, log: list[bytes], followed: int, reread_fails: bool = False) -> None:
        self.log, self.followed, self.reread_fails = log, followed, reread_fails
        self.waited = False

    def logs(self, *, stream: bool, follow: bool, stdout: bool, stderr: bool):
        assert stream and stdout and stderr
        if not follow and self.reread_fails:
            raise RuntimeError("container removed")
        return iter(self.log[:self.followed] if follow else self.log)

    def wait(self, timeout: float | None = None) -> dict:
        self.waited = True
        return {"StatusCode": 0}


def test_the_output_a_follow_stream_missed_is_read_from_the_log_once_the_container_stopped() -> None:
    from harness.docker_engine import followed_output

    log = [b"one\nt", b"wo\nthr", b"ee\n", b"after"]
    for followed in range(len(log) + 1):  # the stream closed after any chunk, the last piece without its newline
        c = _Stopped(log, followed)
        assert list(followed_output(c)) == ["one", "two", "three", "after"], followed
        assert c.waited
    # where the log cannot be read again, what was followed is what there is: no error, nothing invented
    assert list(followed_output(_Stopped(log, 2, reread_fails=True))) == ["one", "two", "thr"]
