"""The scheduler behind --jobs: which cells run at once, on which cores and GPU (pure)."""

from __future__ import annotations

import pytest

from harness.errors import UsageError
from harness.plan import Cell
from harness.options import parse_jobs
from harness.schedule import AUTO, AUTO_PER_GPU, CONTEXT_MIB, Slot, SlotPool, gpu_capacity, need, next_to_start


def cpu(name: str, threads: int | None) -> Cell:
    return Cell(name, device="cpu", threads=threads)


def cuda(name: str, threads: int | None = None, device: str = "cuda") -> Cell:
    return Cell(name, device=device, threads=threads)


def start_all(pool: SlotPool, cells: list[Cell]) -> list[tuple[Cell, Slot]]:
    return next_to_start(cells, pool)


def test_one_thread_cells_get_disjoint_single_cores_up_to_the_cores() -> None:
    pool = SlotPool(cpus=[0, 1, 2, 3], gpus=[])
    started = start_all(pool, [cpu(f"c{i}", 1) for i in range(6)])
    assert [c.name for c, _ in started] == ["c0", "c1", "c2", "c3"]
    sets = [s.cpus for _, s in started]
    assert all(s is not None and len(s) == 1 for s in sets)
    assert len({c for s in sets for c in s}) == 4  # disjoint
    assert pool.take("cpu", 1) is None  # a fifth waits


def test_thread_counts_are_honoured_and_never_sum_past_the_cores() -> None:
    pool = SlotPool(cpus=range(8), gpus=[])
    cells = [cpu("a", 3), cpu("b", 2), cpu("c", 4), cpu("d", 2), cpu("e", 1)]
    started = start_all(pool, cells)
    sizes = {c.name: len(s.cpus) for c, s in started}
    assert all(sizes[c.name] == c.threads for c, _ in started)  # a cell's threads, exactly
    assert sum(sizes.values()) <= 8
    used = [cpu_ for _, s in started for cpu_ in s.cpus]
    assert len(used) == len(set(used))  # no core held twice
    assert "c" not in sizes  # 3 + 2 held: 4 does not fit, the smaller ones behind it backfill
    assert sizes == {"a": 3, "b": 2, "d": 2, "e": 1}


def test_a_default_thread_cell_holds_every_core_and_runs_alone() -> None:
    pool = SlotPool(cpus=[0, 1], gpus=[])
    first = pool.take("cpu", None)
    assert first is not None and first.cpus == (0, 1)
    assert pool.take("cpu", 1) is None
    pool.give_back(first, "cpu")
    one = pool.take("cpu", 1)
    assert one is not None and one.cpus == (0,)
    assert pool.take("cpu", None) is None  # waits for every core


def test_cores_come_back_when_a_cell_ends() -> None:
    pool = SlotPool(cpus=[4, 5], gpus=[])
    a, b = pool.take("cpu", 1), pool.take("cpu", 1)
    assert a and b and {a.cpus, b.cpus} == {(4,), (5,)}
    pool.give_back(a, "cpu")
    again = pool.take("cpu", 1)
    assert again is not None and again.cpus == a.cpus


def test_more_threads_than_cores_holds_all_of_them() -> None:
    assert need("cpu", 16, 4, []).cores == 4
    pool = SlotPool(cpus=[0, 1, 2, 3], gpus=[])
    slot = pool.take("cpu", 16)
    assert slot is not None and slot.cpus == (0, 1, 2, 3)


def test_cuda_cells_get_one_gpu_each() -> None:
    pool = SlotPool(cpus=range(8), gpus=["0", "1"])
    started = start_all(pool, [cuda("g1", 1), cuda("g2", 1), cuda("g3", 1)])
    gpus = [s.gpu for _, s in started]
    assert gpus == ["0", "1"]  # the third waits for a GPU
    pool.give_back(started[0][1], "cuda")
    third = pool.take("cuda", 1)
    assert third is not None and third.gpu == "0"


def test_a_default_thread_cuda_cell_is_not_pinned_but_holds_a_core() -> None:
    pool = SlotPool(cpus=[0, 1], gpus=["0", "1"])
    g = pool.take("cuda", None)
    assert g is not None and g.cpus is None and g.gpu == "0" and g.cores == 1
    c = pool.take("cpu", 1)
    assert c is not None and c.cpus == (0,)
    assert pool.take("cpu", 1) is None  # the CUDA cell's core is held: no oversubscription


def test_a_cuda_n_cell_holds_gpu_n() -> None:
    pool = SlotPool(cpus=range(4), gpus=["2", "3"])
    slot = pool.take("cuda:1", 1)
    assert slot is not None and slot.gpu == "3"
    assert pool.take("cuda:1", 1) is None
    other = pool.take("cuda", 1)
    assert other is not None and other.gpu == "2"


def test_unknown_gpus_make_cuda_cells_take_turns() -> None:
    pool = SlotPool(cpus=range(4), gpus=None)
    first = pool.take("cuda", 1)
    assert first is not None and first.gpu is None
    assert pool.take("cuda", 1) is None
    assert pool.take("cpu", 1) is not None  # CPU cells still run beside it


def test_jobs_caps_the_cells_at_once() -> None:
    pool = SlotPool(cpus=range(8), gpus=[], jobs=2)
    assert len(start_all(pool, [cpu(f"c{i}", 1) for i in range(5)])) == 2


def test_one_job_or_unknown_cores_run_one_cell_unpinned() -> None:
    for pool in (SlotPool(cpus=range(4), gpus=[], jobs=1), SlotPool(cpus=None, gpus=None)):
        started = start_all(pool, [cpu("a", 1), cpu("b", 1)])
        assert [(c.name, s.cpus) for c, s in started] == [("a", None)]
        assert not pool.pinning


def test_most_at_once() -> None:
    pool = SlotPool(cpus=[0, 1], gpus=[])
    assert pool.most_at_once([("cpu", 1), ("cpu", 1), ("cpu", None)]) == 2


def test_parse_jobs() -> None:
    assert parse_jobs("auto") == AUTO and parse_jobs(None) == AUTO and parse_jobs("3") == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(UsageError):
            parse_jobs(bad)


def test_a_slot_as_the_record_keeps_it() -> None:
    assert Slot(cpus=(2, 3), gpu="1", cores=2).to_record() == {"cpus": [2, 3], "gpu": "1"}
    assert Slot(cpus=(2, 3)).cpuset == "2,3" and Slot().cpuset is None


def test_backends_apply_a_slot(tmp_path) -> None:
    from harness.backends.docker import container_spec
    from harness.backends.local import child_env, worker_command
    from harness.docker_engine import create_kwargs
    from harness.plan import Job

    job = Job(bundle_dir=str(tmp_path / "b"), data_path=None, results_dir=str(tmp_path / "r"))
    placed = Cell("g", device="cuda", threads=1, slot=Slot(cpus=(2,), gpu="1", cores=1))
    kw = create_kwargs(container_spec(placed, job, "img"))
    assert kw["cpuset_cpus"] == "2"
    assert kw["device_requests"][0]["DeviceIDs"] == ["1"]
    assert "cpuset_cpus" not in create_kwargs(container_spec(Cell("c", threads=1), job, "img"))
    assert child_env(placed, base={})["CUDA_VISIBLE_DEVICES"] == "1"
    assert child_env(Cell("c", device="cpu", slot=Slot(cpus=(0,))), base={})["CUDA_VISIBLE_DEVICES"] == ""
    cmd = worker_command("/py", tmp_path / "spec.json", (3,))
    assert cmd[:2] == ["/py", "-c"] and "sched_setaffinity(0, [3])" in cmd[2] and "harness.worker" in cmd[2]
    assert worker_command("/py", tmp_path / "spec.json") == ["/py", "-m", "harness.worker", "--spec",
                                                              str(tmp_path / "spec.json")]


# ---- several cells per GPU (--jobs applies per device)

H200 = {"total_mib": 143771.0, "peak_reserved_mib": 40.0, "context_mib": 520.0}


def test_a_gpu_holds_one_cell_until_a_finished_cell_measured_its_memory() -> None:
    assert gpu_capacity([], AUTO) == (1, "no CUDA cell has measured its memory yet")
    n, why = gpu_capacity([{**H200, "alone": True}], AUTO)
    assert n == AUTO_PER_GPU and "520 MiB context per cell" in why and f"at most {AUTO_PER_GPU}" in why
    assert gpu_capacity([{**H200, "alone": True}], 3)[0] == 3  # --jobs 3: three per GPU
    assert gpu_capacity([{**H200, "alone": True}], 1)[0] == 1


def test_the_capacity_is_what_fits_the_memory_with_a_margin() -> None:
    big = {"total_mib": 10000.0, "peak_reserved_mib": 2000.0, "context_mib": 500.0, "alone": True}
    # 2000 x 1.25 + 500 = 3000 MiB a cell; 90 % of 10000 MiB holds 3
    assert gpu_capacity([big], 16)[0] == 3
    # a context measured beside other cells counts all of them: not used, the assumed one is
    shared = {**big, "alone": False, "context_mib": 4000.0}
    n, why = gpu_capacity([shared], 16)
    assert n == int(9000 // (2500 + CONTEXT_MIB)) and "(assumed)" in why
    # the largest peak and the smallest device decide
    assert gpu_capacity([big, {**big, "peak_reserved_mib": 3600.0}], 16)[0] == 1
    assert gpu_capacity([{**big, "total_mib": 80000.0}, big], 16)[0] == 3
    # a cell larger than the device still runs, alone
    assert gpu_capacity([{**big, "peak_reserved_mib": 50000.0}], 16)[0] == 1


def test_cells_share_a_gpu_once_sized_and_the_least_loaded_gpu_comes_first() -> None:
    pool = SlotPool(cpus=range(16), gpus=["0", "1"], jobs=AUTO)
    first = start_all(pool, [cuda(f"g{i}", 1) for i in range(6)])
    assert [s.gpu for _, s in first] == ["0", "1"] and all(s.gpu_shared == 1 for _, s in first)
    assert pool.size_gpus({"total_mib": 10000.0, "peak_reserved_mib": 2000.0, "context_mib": 500.0}, alone=True)
    assert pool.per_gpu == 3
    more = start_all(pool, [cuda(f"h{i}", 1) for i in range(6)])
    assert [s.gpu for _, s in more] == ["0", "1", "0", "1"]  # two more on each: three per GPU
    assert sorted(s.gpu_shared for _, s in more) == [2, 2, 3, 3]
    assert more[0][1].to_record() == {"cpus": [2], "gpu": "0", "gpu_shared": 2}
    pool.give_back(more[0][1], "cuda")
    again = pool.take("cuda", 1)
    assert again is not None and again.gpu == "0" and again.gpu_shared == 3
    assert pool.take("cuda:1", 1) is None  # GPU 1 is full


def test_jobs_caps_the_cells_on_each_gpu_and_the_cpu_cells_apart() -> None:
    pool = SlotPool(cpus=range(16), gpus=["0"], jobs=2)
    pool.size_gpus(H200, alone=True)
    cells = [cuda(f"g{i}", 1) for i in range(4)] + [cpu(f"c{i}", 1) for i in range(4)]
    started = start_all(pool, cells)
    assert [c.name for c, _ in started] == ["g0", "g1", "c0", "c1"]


def test_out_of_memory_beside_others_stops_the_sharing() -> None:
    pool = SlotPool(cpus=range(8), gpus=["0"], jobs=AUTO)
    pool.size_gpus(H200, alone=True)
    assert pool.per_gpu == AUTO_PER_GPU
    pool.alone_on_gpus("g3 ran out of GPU memory")
    assert pool.per_gpu == 1 and not pool.size_gpus(H200, alone=True)  # stays off for the run
    assert len(start_all(pool, [cuda("a", 1), cuda("b", 1)])) == 1
