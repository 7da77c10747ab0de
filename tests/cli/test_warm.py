"""The warm worker (harness.backends.warm): a cell's worker forked from a server that imported torch once.

It must be the cold worker in all but its start: the same record and weights bit for bit, the same
session, cores, token and output, the same ways to be stopped; one server per worker environment;
a cold start, said in the record, where it cannot be warm; and no server left when the run ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import record
from harness.backends import warm as warmmod
from harness.backends.base import usable_cpus
from harness.backends.local import CELL_TOKEN_VAR, LocalBackend, child_env
from harness.backends.warm import server_env, server_key, warm_unusable
from harness.backends.warm_server import TOKEN_PLACEHOLDER
from harness.worker.preload import watch_cuda as _watch_cuda
from harness.plan import Cell, Job
from harness.record import ResultRecord, Status
from harness.schedule import Slot

from tests.conftest import EXAMPLE, REPO, TESTS, patience, tiny_config, write_dataset

TRAINERS = TESTS / "trainers"
NOT_COMPARED = ("cell", "started_at", "finished_at", "wall_s", "train_s", "launcher_wall_s", "start", "start_reason")


def _alive(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return raw[raw.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def _gone(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + patience(seconds)
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(_alive(p) for p in pids)


def servers_of(launcher: int) -> list[int]:
    """The warm servers a launcher started that still run (by their command line)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"harness.backends.warm_server" in argv and b"--launcher" in argv:
            at = argv.index(b"--launcher")
            if at + 1 < len(argv) and argv[at + 1] == str(launcher).encode() and _alive(int(name)):
                found.append(int(name))
    return found


def comparable(rec: ResultRecord) -> dict[str, Any]:
    """A record without what differs between any two runs of one cell (its name, times, how it started)."""
    d = rec.to_dict()
    for key in NOT_COMPARED:
        d.pop(key, None)
    d["spec"] = {k: v for k, v in d["spec"].items() if k not in ("cell", "out_dir")}
    return d


def tiny_bundle(root: Path) -> Path:
    root.mkdir(parents=True)
    write_dataset(root / "signals.npz")
    (root / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    return root


def harness_cli(*args: str, cwd: Path, **popen: Any) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("HARNESS_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**env, **popen.pop("env", {})}, **popen)


# --------------------------------------------------------------------------- pure parts


def test_one_server_per_environment_but_not_per_token_or_gpu() -> None:
    base = {"PATH": "/bin", "OMP_NUM_THREADS": "7"}
    t1 = child_env(Cell("a", threads=1), base)
    key = server_key("/py", {**t1, CELL_TOKEN_VAR: "a" * 32}, Cell("a", threads=1))
    assert key == server_key("/py", {**t1, CELL_TOKEN_VAR: "b" * 32, "CUDA_VISIBLE_DEVICES": "3"}, Cell("b", threads=1))
    assert key != server_key("/py", child_env(Cell("c", threads=2), base), Cell("c", threads=2))  # OMP_NUM_THREADS
    assert key != server_key("/py", child_env(Cell("d", threads=1, determinism="default"), base), Cell("d", threads=1))
    assert key != server_key("/other/python", t1, Cell("a", threads=1))
    # every --isa level shares it: the child sets its level's variables, which the server never has
    base_isa = child_env(Cell("i", threads=1, isa="baseline"), base)
    assert base_isa["ATEN_CPU_CAPABILITY"] == "default" and key == server_key("/py", base_isa, Cell("i", threads=1))
    assert "ATEN_CPU_CAPABILITY" not in server_env(base_isa)
    # a pinned cell with its own thread count shares a server whatever its cores; with torch's default
    # count its cores are what that default counts (when torch loads), so they are the server's too
    assert server_key("/py", t1, Cell("a", threads=1, slot=Slot(cpus=(0,)))) == \
        server_key("/py", t1, Cell("a", threads=1, slot=Slot(cpus=(1,))))
    tdef = child_env(Cell("t", threads=None), base)
    assert server_key("/py", tdef, Cell("t", slot=Slot(cpus=(0, 1)))) != server_key("/py", tdef, Cell("t", slot=Slot(cpus=(2, 3))))
    env = server_env({**t1, CELL_TOKEN_VAR: "a" * 32, "CUDA_VISIBLE_DEVICES": ""})
    assert env[CELL_TOKEN_VAR] == TOKEN_PLACEHOLDER and len(TOKEN_PLACEHOLDER) == 32 and "CUDA_VISIBLE_DEVICES" not in env
    assert env["PYTHONHASHSEED"] == "0" and env["OMP_NUM_THREADS"] == "1"  # set before the server's interpreter starts


def test_a_trainer_command_never_starts_warm(tmp_path: Path) -> None:
    job = Job(bundle_dir=str(tmp_path), data_path=None, results_dir=str(tmp_path / "r"))
    assert warm_unusable(job) is None
    why = warm_unusable(Job(bundle_dir=str(tmp_path), data_path=None, results_dir=str(tmp_path / "r"),
                            trainer_cmd="python train.py"))
    assert why is not None and "--trainer-cmd" in why


def test_a_module_that_asks_for_cuda_while_the_server_imports_is_caught() -> None:
    # A module that asks torch for the CUDA devices at import initialises the driver in the server, and
    # a child forked from it could not use the GPU: the server refuses to serve (its cells start cold).
    class C:
        calls = 0

        @staticmethod
        def _cuda_getDeviceCount() -> int:
            C.calls += 1
            return 1

    class FakeTorch:
        _C = C

    original = C._cuda_getDeviceCount
    asked: list[str] = []
    undo = _watch_cuda(FakeTorch, asked, "some.module")
    assert FakeTorch._C._cuda_getDeviceCount() == 1 and asked == ["some.module"] and C.calls == 1
    undo()
    assert FakeTorch._C._cuda_getDeviceCount is original


def test_records_without_a_start_still_load_and_new_ones_keep_it(tmp_path: Path) -> None:
    old = TESTS / "data" / "gpu-h200" / "conv-matrix" / "cpu-strict-tdef-r1" / "record.json"
    assert "start" not in json.loads(old.read_text())
    rec = record.read(old)
    assert rec.start is None and rec.start_reason is None
    rec.start, rec.start_reason = "cold", "--cold"
    record.write(tmp_path / "record.json", rec)
    again = record.read(tmp_path / "record.json")
    assert (again.start, again.start_reason) == ("cold", "--cold")


def test_cold_is_a_flag_of_run_matrix_and_band() -> None:
    from harness.cli import build_parser, run_options
    from harness.plan import Plan
    from harness.runner import make_backend

    parser = build_parser()
    for argv, single, band_only in ((["run", "b"], True, False), (["matrix", "b", "--backend", "local"], False, False),
                                    (["band", "b", "--n", "2"], True, True)):
        assert run_options(parser.parse_args(argv), single=single, band_only=band_only).cold is False
        assert run_options(parser.parse_args([*argv, "--cold"]), single=single, band_only=band_only).cold is True
    cold = make_backend(Plan("local", []), cold=True)
    assert cold.warm is None and cold._cold_reason == "--cold"
    warm = make_backend(Plan("local", []))
    assert warm.warm is not None
    warm.close()


# --------------------------------------------------------------------------- the same cell, cold and warm


@pytest.fixture(scope="module")
def cold_and_warm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The bundled example (3 epochs) retrained cold once and warm twice (one server), and what the server said
    of itself after forking them."""
    base = tmp_path_factory.mktemp("example")
    shutil.copytree(EXAMPLE, base / "optuna_best")
    shutil.copytree(REPO / "examples" / "data", base / "data")
    cfg = yaml.safe_load((base / "optuna_best" / "config.yaml").read_text())
    cfg["training"]["epochs"] = 3
    (base / "optuna_best" / "config.yaml").write_text(yaml.safe_dump(cfg))
    job = Job(bundle_dir=str(base / "optuna_best"), data_path=str(base / "data" / "signals.npz"),
              results_dir=str(base / "out"), timeout_s=patience(60))  # a worker hung after its fork fails, not hangs
    cold, warm = LocalBackend(cold_reason="--cold"), LocalBackend(warm=True)
    try:
        # torch's default thread count (every core): an OpenMP pool the server had started would show
        got: dict[str, Any] = {"cold": cold.run(Cell("cold"), job)}
        got["warm1"] = warm.run(Cell("warm1"), job)
        got["warm2"] = warm.run(Cell("warm2"), job)
        got["servers"] = [s.proc.pid for s in warm.warm.started]
        got["facts"] = warm.warm.started[0].ask()
    finally:
        warm.close()
        cold.close()
    return got


def test_a_warm_cell_records_the_same_weights_and_metrics_as_a_cold_one(cold_and_warm: dict[str, Any]) -> None:
    cold, warm1, warm2 = cold_and_warm["cold"], cold_and_warm["warm1"], cold_and_warm["warm2"]
    assert cold.ok and warm1.ok and warm2.ok, [r.error for r in (cold, warm1, warm2)]
    assert cold.weights_sha256 == warm1.weights_sha256 == warm2.weights_sha256
    assert cold.last_weights_sha256 == warm1.last_weights_sha256 == warm2.last_weights_sha256
    assert cold.metrics == warm1.metrics == warm2.metrics
    # and everything else the record measures: environment, determinism, hash seed, threads, data, history
    assert comparable(cold) == comparable(warm1) == comparable(warm2)
    assert (cold.start, cold.start_reason) == ("cold", "--cold")
    assert (warm1.start, warm1.start_reason) == (warm2.start, warm2.start_reason) == ("warm", None)
    assert len(cold_and_warm["servers"]) == 1  # both warm cells were forked from one server


def test_the_server_never_initialised_cuda_nor_kept_a_thread_pool(cold_and_warm: dict[str, Any]) -> None:
    facts = cold_and_warm["facts"]
    assert facts["pid"] == cold_and_warm["servers"][0] and facts["children"] == []
    assert facts["cuda_initialized"] is False
    # One thread after forking: the BLAS libraries' idle threads stop at a fork, and a pool of OpenMP
    # threads (which a torch operation in the server would have started, on a host of 2 cores or more)
    # would not.
    assert facts["threads"] == 1
    assert facts["hash_randomization"] is False  # PYTHONHASHSEED=0 was set before the server started
    assert not _alive(facts["pid"])  # stopped with its backend


# --------------------------------------------------------------------------- how a warm worker starts


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A matrix of two thread counts x two repeats, warm, with a trainer that writes down how its process
    started; and the same cell cold (--cold)."""
    base = tmp_path_factory.mktemp("probe")
    root = tiny_bundle(base / "bundle")
    common = ["--trainer", "warm_probe:train", "--trainer-path", str(TRAINERS), "--determinism", "strict",
              "--band", "0", "--band-seeds", "0", "--no-progress"]
    matrix = harness_cli("matrix", str(root), "--backend", "local", "--threads", "1,2", "--repeats", "2",
                         "--out", str(base / "warm"), *common, cwd=base)
    out, err = matrix.communicate(timeout=patience(600))
    assert matrix.returncode == 0, out + err
    left = servers_of(matrix.pid)
    cold = harness_cli("run", str(root), "--threads", "1", "--cold", "--out", str(base / "cold"), *common, cwd=base)
    out2, err2 = cold.communicate(timeout=patience(300))
    assert cold.returncode == 0, out2 + err2
    runs: dict[str, Any] = {}
    for rec_path in sorted((base / "warm").glob("*/record.json")) + [base / "cold" / "run" / "record.json"]:
        name = "cold" if rec_path.parent.parent.name == "cold" else rec_path.parent.name
        runs[name] = (record.read(rec_path), json.loads((rec_path.parent / "probe.json").read_text()))
    return {"cwd": str(base), "left": left, "runs": runs}


def test_two_thread_counts_in_one_matrix_get_two_servers(probed: dict[str, Any]) -> None:
    cells = {k: v for k, v in probed["runs"].items() if k != "cold"}
    assert sorted(cells) == ["cpu-strict-t1-r1", "cpu-strict-t1-r2", "cpu-strict-t2-r1", "cpu-strict-t2-r2"]
    assert all(rec.start == "warm" for rec, _ in cells.values())
    parents = {name: probe["ppid"] for name, (_, probe) in cells.items()}
    assert parents["cpu-strict-t1-r1"] == parents["cpu-strict-t1-r2"]
    assert parents["cpu-strict-t2-r1"] == parents["cpu-strict-t2-r2"]
    assert parents["cpu-strict-t1-r1"] != parents["cpu-strict-t2-r1"]
    # the run ended: no server is left, nor any worker
    assert probed["left"] == [] and _gone(list(parents.values()), 10)
    assert _gone([probe["pid"] for _, probe in cells.values()], 10)


def test_a_warm_worker_starts_as_a_cold_one_does(probed: dict[str, Any]) -> None:
    cold_rec, cold = probed["runs"]["cold"]
    assert (cold_rec.start, cold_rec.start_reason) == ("cold", "--cold")
    tokens = set()
    for name, (rec, probe) in probed["runs"].items():
        assert rec.ok, rec.error
        assert probe["session_leader"] and probe["group_leader"], name  # its own session: stopped as a group
        assert probe["token"] and len(probe["token"]) == 32 and probe["token"] != TOKEN_PLACEHOLDER
        # the token is in the process's own environment block, which whatever it forks inherits
        assert probe["proc_token"] == probe["token"], name
        tokens.add(probe["token"])
        assert probe["cuda_visible_devices"] == ""  # a CPU cell sees no GPU
        assert probe["cwd"] == probed["cwd"]
        slot_cpus = rec.slot.cpus if rec.slot else None
        assert probe["cpus"] == (slot_cpus if slot_cpus else usable_cpus()), name
        assert probe["num_threads"] == rec.spec["threads"]
        assert probe["cuda_initialized"] is False
        # nothing of the server's RNG or hash state reaches the cell: the worker seeded every RNG, and
        # the hash seed is the one PYTHONHASHSEED fixed before the server's interpreter started
        for fact in ("random", "numpy", "torch", "torch_initial_seed", "hash", "hash_randomization"):
            assert probe[fact] == cold[fact], (name, fact)
        assert rec.weights_sha256 == cold_rec.weights_sha256
    assert len(tokens) == 5  # one per cell


# --------------------------------------------------------------------------- when it cannot be warm


def test_a_server_that_cannot_start_means_a_cold_cell_that_says_why(tmp_path: Path, monkeypatch) -> None:
    root = tiny_bundle(tmp_path / "b")
    monkeypatch.setattr(warmmod, "SERVER_MODULE", "harness.backends.no_such_server")
    job = Job(bundle_dir=str(root), data_path=str(root / "signals.npz"), results_dir=str(tmp_path / "r"))
    backend = LocalBackend(warm=True)
    try:
        rec = backend.run(Cell("c", threads=1), job)
    finally:
        backend.close()
    assert rec.ok, rec.error
    assert rec.start == "cold" and "its warm server could not start" in rec.start_reason
    assert "No module named harness.backends.no_such_server" in rec.start_reason  # the server's last line


def test_a_trainer_command_starts_cold_and_says_why(tmp_path: Path) -> None:
    root = tiny_bundle(tmp_path / "b")
    job = Job(bundle_dir=str(root), data_path=str(root / "signals.npz"), results_dir=str(tmp_path / "r"),
              trainer_cmd=f"{sys.executable} -c \"print('no metrics')\"")
    backend = LocalBackend(warm=True)
    try:
        rec = backend.run(Cell("c", threads=1), job)
        assert backend.warm.started == []  # no server was started for it
    finally:
        backend.close()
    assert rec.start == "cold" and "trainer command" in rec.start_reason


# --------------------------------------------------------------------------- stopping


def _hanging_warm_cell(tmp_path: Path, monkeypatch) -> tuple[LocalBackend, threading.Thread, dict[str, Any], Path]:
    """A warm cell whose trainer writes its pid to ``tmp_path/strays/worker.pid`` and hangs, run in a thread."""
    where = tmp_path / "strays"
    where.mkdir()
    monkeypatch.setenv("STRAYS_DIR", str(where))
    monkeypatch.setenv("STRAYS_MODE", "hang")
    monkeypatch.setenv("STRAYS", "session")
    root = tiny_bundle(tmp_path / "b")
    job = Job(bundle_dir=str(root), data_path=str(root / "signals.npz"), results_dir=str(tmp_path / "r"),
              trainer="strays:train", trainer_path=[str(TRAINERS)])
    backend = LocalBackend(warm=True)
    got: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: got.update(rec=backend.run(Cell("c", threads=1), job)))
    thread.start()
    deadline = time.monotonic() + patience(120)
    while not (where / "worker.pid").exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (where / "worker.pid").exists(), got
    return backend, thread, got, where


def test_a_warm_worker_dies_with_its_server(tmp_path: Path, monkeypatch) -> None:
    backend, thread, got, where = _hanging_warm_cell(tmp_path, monkeypatch)
    worker = int((where / "worker.pid").read_text())
    try:
        server = backend.warm.started[0].proc.pid
        assert int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1]) == server
        os.kill(server, signal.SIGKILL)  # nothing runs in the server to stop its children: the kernel does
        thread.join(timeout=patience(30))
        assert not thread.is_alive()
        assert _gone([worker], 10)
        rec = got["rec"]
        assert rec.status is Status.FAILED and "server ended while the cell ran" in rec.error.message
        assert rec.start == "warm"
    finally:
        backend.close()
        thread.join(timeout=patience(30))
        for name in ("worker", "session"):
            if (where / f"{name}.pid").exists() and _alive(int((where / f"{name}.pid").read_text())):
                os.kill(int((where / f"{name}.pid").read_text()), signal.SIGKILL)
    assert _gone([int((where / "session.pid").read_text())], 10)  # found by its token when the cell ended


def test_closing_the_backend_stops_its_cells_and_servers(tmp_path: Path, monkeypatch) -> None:
    # What Ctrl-C and SIGTERM do (the runner closes the backend): the cell and what it started end,
    # then the server.
    backend, thread, got, where = _hanging_warm_cell(tmp_path, monkeypatch)
    server = backend.warm.started[0].proc.pid
    pids = [int((where / f"{n}.pid").read_text()) for n in ("worker", "session")]
    try:
        backend.close()
        thread.join(timeout=patience(30))
        assert not thread.is_alive()
        assert got["rec"].status is Status.FAILED and got["rec"].error.exit_status == -signal.SIGTERM
        assert _gone([server, *pids], 10)
        assert servers_of(os.getpid()) == []
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_expected_cells_get_their_servers_early_and_a_server_stops_when_its_cells_are_done(tmp_path: Path) -> None:
    # The runner says which cells will run: their servers start at once on idle cores (their imports
    # overlap what runs), and a server whose expected cells have all run is stopped (its memory freed).
    root = tiny_bundle(tmp_path / "b")
    job = Job(bundle_dir=str(root), data_path=str(root / "signals.npz"), results_dir=str(tmp_path / "r"))
    cells = [Cell("a", threads=1), Cell("b", threads=2)]
    backend = LocalBackend(warm=True)
    try:
        backend.expect(cells, job)
        early = list(backend.warm.started)
        assert len(early) == min(2, len(usable_cpus() or [0]))  # one import per idle core, nothing runs yet
        first = backend.run(cells[0], job)
        assert first.ok and first.start == "warm", first.error
        assert _gone([early[0].proc.pid], 10)  # no cell of its environment is left to run
        second = backend.run(cells[1], job)
        assert second.ok and second.start == "warm", second.error
        assert len(backend.warm.started) == 2 and backend.warm.servers == {}
        assert _gone([s.proc.pid for s in backend.warm.started], 10)
    finally:
        backend.close()


# --------------------------------------------------------------------------- one server for every --isa level


def test_the_isa_levels_of_an_environment_share_a_server_and_each_cell_gets_its_own(tmp_path: Path) -> None:
    """ATen, oneDNN and MKL read their instruction-set switches at their first kernel, after the fork:
    a cell forked from a native server with --isa baseline runs baseline kernels, by each library's own
    verbose report, and trains the weights a cold baseline cell trains."""
    root = tiny_bundle(tmp_path / "bundle")
    common = ["--trainer", "isa_probe:train", "--trainer-path", str(TRAINERS), "--threads", "1",
              "--band", "0", "--band-seeds", "0", "--no-progress"]
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "MKL_VERBOSE": "1"}
    warm = harness_cli("matrix", str(root), "--backend", "local", "--determinism", "strict", "--isa", "native,baseline",
                       "--out", str(tmp_path / "warm"), *common, cwd=tmp_path, env=env)
    out, err = warm.communicate(timeout=patience(600))
    assert warm.returncode == 0, out + err
    cold = harness_cli("run", str(root), "--isa", "baseline", "--cold", "--out", str(tmp_path / "cold"), *common,
                       cwd=tmp_path, env=env)
    out2, err2 = cold.communicate(timeout=patience(300))
    assert cold.returncode == 0, out2 + err2
    cells = {p.parent.name: record.read(p) for p in (tmp_path / "warm").glob("*/record.json")}
    native, baseline = (next(r for name, r in cells.items() if name.endswith(level)) for level in ("native", "baseline"))
    cold_rec = record.read(tmp_path / "cold" / "run" / "record.json")
    assert native.start == baseline.start == "warm" and cold_rec.start == "cold"
    assert baseline.env.cpu_capability == cold_rec.env.cpu_capability == "DEFAULT"
    assert native.env.cpu_capability != "DEFAULT"
    assert not any("did not honour" in w for w in baseline.warnings)
    log = {name: (tmp_path / "warm" / name / "worker.log").read_text() for name in cells}
    base_log = next(text for name, text in log.items() if name.endswith("baseline"))
    native_log = next(text for name, text in log.items() if name.endswith("native"))
    assert "isa:Intel SSE4.1" in base_log and "isa:Intel SSE4.1" not in native_log  # oneDNN
    # A torch build with MKL, on a CPU MKL names its instruction set for (an Intel one: on an AMD EPYC MKL says
    # "Intel(R) Architecture processors" at every level)
    if "MKL_VERBOSE oneMKL" in native_log and ") enabled processors" in native_log:
        assert "(Intel(R) SSE4.2) enabled processors" in base_log
        assert "(Intel(R) SSE4.2) enabled processors" not in native_log
    assert baseline.weights_sha256 == cold_rec.weights_sha256
    probes = {name: json.loads((tmp_path / "warm" / name / "isa.json").read_text()) for name in cells}
    assert {p["aten"] for p in probes.values()} == {native.env.cpu_capability, "DEFAULT"}
    assert len({p["ppid"] for p in probes.values()}) == 1  # both forked from one server
