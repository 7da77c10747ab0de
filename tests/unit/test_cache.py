"""The cache key of a cell and when a record on disk stands for a rerun (harness.cache)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from harness import record
from harness.backends.local import LocalBackend
from harness.cache import CellCache, cell_key, numeric_environment, reusable, trainer_command_files, tree_digest
from harness.plan import Cell, Job
from harness.record import ResultRecord, Status

from tests.records import record as compare_record

BASE = dict(environment="local:x", spec={"cell": "a", "threads": 1}, bundle="b", data_sha256="d", trainer=None)


def test_the_key_changes_with_each_input_and_only_then() -> None:
    key = cell_key(**BASE)
    assert cell_key(**BASE) == key
    for field, other in (("environment", "image:sha256:1"), ("spec", {"cell": "a", "threads": 2}),
                         ("bundle", "b2"), ("data_sha256", "d2"), ("trainer", "t")):
        assert cell_key(**{**BASE, field: other}) != key, field


def test_tree_digest_sees_content_and_names_and_never_follows_a_link(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    (root / "config.yaml").write_text("a: 1\n")
    first = tree_digest(root)
    (root / "config.yaml").write_text("a: 2\n")
    assert tree_digest(root) != first
    outside = tmp_path / "secret"
    outside.write_text("x")
    (root / "link").symlink_to(outside)
    with_link = tree_digest(root)
    outside.write_text("changed")
    assert tree_digest(root) == with_link  # the link's target text is hashed, not what it points at
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "m.pyc").write_bytes(b"\0")
    assert tree_digest(root) == with_link


def test_cell_cache_covers_the_bundle_and_the_trainer_folders(tmp_path: Path) -> None:
    bundle, code = tmp_path / "b", tmp_path / "code"
    bundle.mkdir()
    code.mkdir()
    (bundle / "config.yaml").write_text("a: 1\n")
    (code / "train.py").write_text("x = 1\n")
    key = CellCache(str(bundle), "d", [str(code)]).key("env", {"cell": "a"})
    (code / "train.py").write_text("x = 2\n")
    assert CellCache(str(bundle), "d", [str(code)]).key("env", {"cell": "a"}) != key


def _write(cell_dir: Path, rec: ResultRecord) -> None:
    cell_dir.mkdir(parents=True, exist_ok=True)
    record.write(cell_dir / "record.json", rec)


def test_only_an_ok_record_of_this_cell_with_this_key_is_reusable(tmp_path: Path) -> None:
    rec = compare_record("a", sha="w")
    rec.cache_key = "k"
    _write(tmp_path / "a", rec)
    assert reusable(tmp_path / "a", "a", "k") is not None
    assert reusable(tmp_path / "a", "a", "other") is None
    assert reusable(tmp_path / "a", "b", "k") is None  # another cell's record in this directory
    failed = ResultRecord.without_metrics("f", Status.INTERRUPTED, "interrupted", "stopped")
    failed.cache_key = "k"
    _write(tmp_path / "f", failed)
    assert reusable(tmp_path / "f", "f", "k") is None
    assert reusable(tmp_path / "none", "none", "k") is None


def test_a_linked_record_or_cell_directory_is_not_read(tmp_path: Path) -> None:
    rec = compare_record("a", sha="w")
    rec.cache_key = "k"
    _write(tmp_path / "elsewhere", rec)
    (tmp_path / "a").mkdir()
    os.symlink(tmp_path / "elsewhere" / "record.json", tmp_path / "a" / "record.json")
    assert reusable(tmp_path / "a", "a", "k") is None
    os.symlink(tmp_path / "elsewhere", tmp_path / "b")
    assert reusable(tmp_path / "b", "a", "k") is None


# --------------------------------------------------------------------------- what a backend adds to the key


def test_the_key_changes_with_the_inputs_a_backend_adds() -> None:
    key = cell_key(**BASE, inputs={"environ": {"ATEN_CPU_CAPABILITY": "avx512"}})
    assert cell_key(**BASE, inputs={"environ": {"ATEN_CPU_CAPABILITY": "avx512"}}) == key
    assert cell_key(**BASE, inputs={"environ": {}}) != key
    assert cell_key(**BASE, inputs={"environ": {}, "files": {"/x/train.py": "1"}}) != cell_key(**BASE)


def test_the_variables_that_can_change_the_numbers_are_taken_and_only_they() -> None:
    env = {"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "4", "OMP_PROC_BIND": "true", "MKL_CBWR": "AVX2",
           "OPENBLAS_CORETYPE": "Haswell", "CUBLAS_WORKSPACE_CONFIG": ":16:8", "NVIDIA_TF32_OVERRIDE": "0",
           "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1", "CUDA_VISIBLE_DEVICES": "1,0", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "LD_PRELOAD": "/x/libblas.so", "LD_LIBRARY_PATH": "/cuda/lib64",
           "HOME": "/root", "PWD": "/w", "HARNESS_CELL_TOKEN": "abc", "TERM": "xterm", "COLUMNS": "220",
           "PYTHONPATH": "/repo"}
    taken = numeric_environment(env)
    assert set(taken) == set(env) - {"HOME", "PWD", "HARNESS_CELL_TOKEN", "TERM", "COLUMNS", "PYTHONPATH"}
    assert list(taken) == sorted(taken)


def test_a_local_cells_key_follows_the_environment_its_worker_inherits(monkeypatch, tmp_path: Path) -> None:
    backend = LocalBackend()
    job = Job(bundle_dir=str(tmp_path), data_path=None, results_dir=str(tmp_path / "r"))
    cache = CellCache(str(tmp_path), None)

    def key(cell: Cell) -> str:
        return cache.key("local:x", {"cell": cell.name}, backend.key_inputs(cell, job))

    default_threads, one_thread, isa_axis = Cell("a", device="cpu"), Cell("b", device="cpu", threads=1), \
        Cell("c", device="cpu", isa="avx2")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    before = {c.name: key(c) for c in (default_threads, one_thread, isa_axis)}
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    assert key(default_threads) != before["a"] and key(one_thread) != before["b"]
    assert key(isa_axis) == before["c"]  # an --isa cell's level replaces the inherited one
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert key(default_threads) != before["a"]  # its thread pool is the inherited one
    assert key(one_thread) == before["b"]  # --threads 1 sets OMP_NUM_THREADS itself
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert key(default_threads) == before["a"]  # a variable that cannot change the numbers changes nothing


def test_a_docker_cells_key_follows_the_gpus_it_is_given(tmp_path: Path) -> None:
    from harness.backends.docker import DockerBackend
    from harness.record import ImageInfo

    from tests.fake_engine import FakeEngine

    job = Job(bundle_dir=str(tmp_path), data_path=None, results_dir=str(tmp_path / "r"))
    cell = Cell("g", device="cuda")
    inputs = {}
    for gpus in ("0,1", "1,0", "0,1"):
        backend = DockerBackend(FakeEngine(), {}, gpus=gpus)  # type: ignore[arg-type]
        backend.use_image("g", ImageInfo(id="sha256:1", tag="t"))
        inputs[gpus] = backend.key_inputs(cell, job)
    assert inputs["0,1"] != inputs["1,0"] and inputs["0,1"]["environ"]["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def _command_job(tmp_path: Path, command: str) -> tuple[Cell, Job]:
    (tmp_path / "b").mkdir(exist_ok=True)
    (tmp_path / "code").mkdir(exist_ok=True)
    return Cell("c", device="cpu"), Job(bundle_dir=str(tmp_path / "b"), data_path=str(tmp_path / "b" / "d.npz"),
                                        results_dir=str(tmp_path / "r"), trainer_cmd=command,
                                        trainer_path=[str(tmp_path / "code")])


def test_the_files_a_trainer_command_names_are_in_the_key(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "train.py").write_text("x = 1\n")
    (elsewhere / "conf").mkdir()
    (elsewhere / "conf" / "a.yaml").write_text("a: 1\n")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "prep.sh").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "prep.sh").chmod(0o755)
    cell, job = _command_job(tmp_path, f"{{python}} {elsewhere}/train.py --cfg={elsewhere}/conf {{bundle}}/x.py "
                                       "--out {out_dir} --log /dev/null --data {data} {code_dir}/m.py prep.sh results")
    files, why = trainer_command_files(job.trainer_cmd, python=sys.executable, cell=cell, job=job,
                                       path=str(tmp_path / "bin"))
    assert why is None
    named = {os.path.realpath(p) for p in (elsewhere / "train.py", elsewhere / "conf", tmp_path / "bin" / "prep.sh",
                                           sys.executable)}
    assert set(files) == named  # the bundle, the data, the trainer folder, the cell's own folder, /dev/null: not
    (elsewhere / "conf" / "a.yaml").write_text("a: 2\n")
    again, _ = trainer_command_files(job.trainer_cmd, python=sys.executable, cell=cell, job=job,
                                     path=str(tmp_path / "bin"))
    changed = {p for p in files if files[p] != again[p]}
    assert changed == {os.path.realpath(elsewhere / "conf")}


def test_a_trainer_command_whose_files_cannot_be_hashed_is_never_keyed(tmp_path: Path, monkeypatch) -> None:
    from harness import cache

    big = tmp_path / "big"
    big.mkdir()
    for i in range(3):
        (big / f"{i}.txt").write_text("x")
    cell, job = _command_job(tmp_path, f"sh -c true {big}")
    monkeypatch.setattr(cache, "COMMAND_FILES_MAX", 2)
    _, why = trainer_command_files(job.trainer_cmd, python=sys.executable, cell=cell, job=job, path=None)
    assert why is not None and str(big) in why and "more than 2 files" in why
    cell, job = _command_job(tmp_path, f"{{python}} {tmp_path}/run-{{seed}}/train.py")
    _, why = trainer_command_files(job.trainer_cmd, python=sys.executable, cell=cell, job=job, path=None)
    assert why is not None and "{seed}" in why


def test_why_a_finished_cell_reruns_is_said_from_what_its_key_covered(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir()
    results = tmp_path / "r"
    results.mkdir()
    old = CellCache(str(bundle), "d")
    key = old.key("local:x", {"cell": "a", "threads": 1}, {"environ": {"ATEN_CPU_CAPABILITY": "avx512"}})
    old.remember(results, key)
    rec = compare_record("a", sha="w")
    rec.cache_key = key
    _write(results / "a", rec)
    new = CellCache(str(bundle), "d")
    same = new.key("local:x", {"cell": "a", "threads": 1}, {"environ": {"ATEN_CPU_CAPABILITY": "avx512"}})
    assert new.why_rerun(results, results / "a", "a", same) is None  # it stands
    other = new.key("local:x", {"cell": "a", "threads": 2}, {"environ": {"OMP_PROC_BIND": "true"}})
    assert new.why_rerun(results, results / "a", "a", other) == (
        "the run spec's threads changed (1 -> 2); ATEN_CPU_CAPABILITY changed (avx512 -> unset); "
        "OMP_PROC_BIND changed (unset -> true)")
    (results / ".harness-keys" / f"{key}.json").unlink()  # an older run's record: what it covered is unknown
    assert new.why_rerun(results, results / "a", "a", other) == "its inputs changed since it ran"
    rec.cache_key = "../../etc/passwd"  # a container could write any record: its key never names a path
    _write(results / "a", rec)
    assert new.why_rerun(results, results / "a", "a", other) == "its record carries no cache key of this harness"


def test_a_trainer_scripts_sibling_modules_are_in_the_key(tmp_path: Path) -> None:
    """A script outside the trainer folders imports what lies beside it: an edit there reruns the cell."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "pkg").mkdir(parents=True)
    (elsewhere / "train.py").write_text("import helper, pkg\n")
    (elsewhere / "helper.py").write_text("LR = 0.1\n")
    (elsewhere / "pkg" / "__init__.py").write_text("")
    (elsewhere / "pkg" / "layers.py").write_text("W = 1\n")
    (elsewhere / "notes.txt").write_text("not code\n")
    cell, job = _command_job(tmp_path, f"{{python}} {elsewhere}/train.py --out {{out_dir}}")

    def digest() -> str:
        files, why = trainer_command_files(job.trainer_cmd, python=sys.executable, cell=cell, job=job, path=None)
        assert why is None
        return files[os.path.realpath(elsewhere / "train.py")]

    before = digest()
    (elsewhere / "notes.txt").write_text("still not code\n")
    assert digest() == before
    (elsewhere / "helper.py").write_text("LR = 0.2\n")
    after_helper = digest()
    assert after_helper != before
    (elsewhere / "pkg" / "layers.py").write_text("W = 2\n")
    assert digest() != after_helper


def test_a_fifo_or_a_link_in_a_keyed_tree_is_never_read(tmp_path: Path) -> None:
    import errno

    from harness.cache import _file_sha256

    root = tmp_path / "b"
    root.mkdir()
    (root / "config.yaml").write_text("a: 1\n")
    os.mkfifo(root / "pipe")  # hashed as what it is, without waiting for a writer
    assert _file_sha256(root / "pipe") == "not-a-file"
    (root / "link").symlink_to(root / "config.yaml")
    assert _file_sha256(root / "link") == f"unreadable:{errno.ELOOP}"  # ELOOP: a link in a file's place is not followed
    first = tree_digest(root)
    assert tree_digest(root) == first
