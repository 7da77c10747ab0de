"""The planner and the axis parsers: pure, and the same for every command and backend."""

from __future__ import annotations

import os

import pytest

from harness.errors import UsageError
from harness.images.matrix import load_matrix, select
from harness.options import (Axes, ImageOptions, RunOptions, parse_devices, parse_modes, parse_repeats, parse_tf32,
                             parse_threads)
from harness.plan import image_run_cells, local_cells, make_plan, refuse_inapplicable


def test_threads_parser_is_shared_and_accepts_all() -> None:
    assert parse_threads("1,all") == (1, None)
    assert parse_threads("2, default, 2") == (2, None)  # duplicates collapse, order kept
    assert parse_threads("auto") == (None,)
    for bad, needle in (("0", "must be >= 1"), ("x", "neither an integer nor 'all'"), ("", "names no thread count")):
        with pytest.raises(UsageError, match=needle):
            parse_threads(bad)


def test_other_axis_parsers() -> None:
    assert parse_modes("strict,default") == ("strict", "default")
    assert parse_devices("cpu,cuda:1") == ("cpu", "cuda:1")
    assert parse_tf32("off,on") == (False, True)
    assert parse_repeats("3") == 3
    for fn, bad in ((parse_modes, "fast"), (parse_devices, "tpu"), (parse_devices, "cuda:x"), (parse_tf32, "maybe"),
                    (parse_repeats, "0")):
        with pytest.raises(UsageError):
            fn(bad)


def test_local_cells_strictest_first_tf32_only_on_cuda() -> None:
    cells = local_cells(["cpu", "cuda"], ["strict", "default"], [1, None], [False, True])
    names = [c.name for c in cells]
    assert names[0] == "cpu-strict-t1"
    assert "cpu-strict-t1-tf32" not in " ".join(names) and not any(n.startswith("cpu") and "tf32" in n for n in names)
    assert "cuda-strict-t1-tf32" in names and "cuda-strict-t1-fp32" in names
    assert len(names) == len(set(names)) == 4 + 8


def test_image_cells_name_only_the_axes_that_vary() -> None:
    ics = select(load_matrix(), ["cpu-torch2.13", "cu130-torch2.14"])
    devices = {"cpu-torch2.13": "cpu", "cu130-torch2.14": "cuda"}
    one = image_run_cells(ics, ["strict"], [None], [False], 1, devices, {}, {})
    assert [c.name for c in one] == ["cpu-torch2.13", "cu130-torch2.14"]
    many = image_run_cells(ics, ["strict", "default"], [1, None], [False, True], 2, devices,
                           {"cu130-torch2.14": "driver too old"}, {})
    names = [c.name for c in many]
    assert "cpu-torch2.13-strict-t1-r1" in names and "cpu-torch2.13-default-tdef-r2" in names
    # TF32 only varies where the device is CUDA
    assert not any(n.startswith("cpu-") and ("tf32" in n or "fp32" in n) for n in names)
    assert "cu130-torch2.14-strict-t1-tf32-r1" in names
    assert {c.threads for c in many} == {1, None}
    assert all(c.skip_reason == "driver too old" for c in many if c.image.name == "cu130-torch2.14")


def test_options_that_do_not_apply_are_refused() -> None:
    with pytest.raises(UsageError, match="--cells names image cells"):
        refuse_inapplicable(RunOptions(bundle="b", backend="local", cells=("cpu-torch2.13",)))
    with pytest.raises(UsageError, match="--wheelhouse only apply to the docker backend"):
        refuse_inapplicable(RunOptions(bundle="b", backend="local", images=ImageOptions(wheelhouses=("w",))))
    with pytest.raises(UsageError, match="--devices is for the local backend"):
        refuse_inapplicable(RunOptions(bundle="b", backend="docker", axes=Axes(devices=("cpu",))))


def test_local_plan_defaults(monkeypatch) -> None:
    plan = make_plan(RunOptions(bundle="b", backend="local"))
    expected = ["cpu-strict-t1", "cpu-strict-tdef", "cpu-default-t1", "cpu-default-tdef"] if (os.cpu_count() or 1) > 1 \
        else ["cpu-strict-tdef", "cpu-default-tdef"]
    assert [c.name for c in plan.cells] == expected
    single = make_plan(RunOptions(bundle="b", backend="local", single=True, axes=Axes(threads=(None,))))
    assert [c.name for c in single.cells] == ["run"] and single.cells[0].threads is None


def test_docker_plan_threads_axis() -> None:
    # `--threads 1,all` with the docker backend crashed (int("all")); it is an axis like the local one.
    plan = make_plan(RunOptions(bundle="b", backend="docker", cells=("cpu-torch2.13",), axes=Axes(threads=(1, None))))
    assert [(c.name, c.threads) for c in plan.cells] == [("cpu-torch2.13-t1", 1), ("cpu-torch2.13-tdef", None)]
