"""The version matrix: loading, refusals with reasons, selection, base images, host skips."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from harness.errors import InputError
from harness.images.matrix import (
    DEFAULT_COMPAT,
    ImageCell,
    apply_base_images,
    effective_device,
    host_skip_reason,
    load_matrix,
    load_site_config,
    parse_compat,
    parse_nvidia_smi,
    select,
    validate,
)

REQUIRED = {
    "cu118-torch2.3": ("2.3.1", "cu118"),
    "cu121-torch2.4": ("2.4.1", "cu121"),
    "cu124-torch2.5": ("2.5.1", "cu124"),
    "cu126-torch2.6": ("2.6.0", "cu126"),
    "cu128-torch2.7": ("2.7.1", "cu128"),
    "cu130-torch2.9": ("2.9.1", "cu130"),
    "cpu-torch2.13": ("2.13.0", "cpu"),
    "cu130-torch2.14": ("2.14.1", "cu130"),
}
H200 = {"driver": "580.95.05", "gpus": [{"name": "NVIDIA H200", "capability": "9.0"}]}


def write_matrix(tmp_path: Path, cells: dict, defaults: dict | None = None) -> Path:
    path = tmp_path / "matrix.yaml"
    data = {"schema": "harness.matrix/1", "cells": cells}
    if defaults is not None:
        data["defaults"] = defaults
    path.write_text(yaml.safe_dump(data))
    return path


def one(tmp_path: Path, **spec) -> ImageCell:
    return load_matrix(write_matrix(tmp_path, {"c": spec}))[0]


def compat():
    return parse_compat(yaml.safe_load(DEFAULT_COMPAT.read_text()))


# ----------------------------------------------------------------------------- loading


def test_repo_matrix_has_the_required_cells_with_real_pins():
    cells = {c.name: c for c in load_matrix()}
    for name, (torch, variant) in REQUIRED.items():
        assert (cells[name].torch, cells[name].variant) == (torch, variant)
    assert cells["cpu-torch2.13"].source == "wheelhouse"
    assert cells["cu130-torch2.14"].source == "wheelhouse"
    assert cells["cu124-torch2.5"].source == "index"


def test_cells_are_resolved_against_compat():
    cells = {c.name: c for c in load_matrix()}
    c = cells["cu124-torch2.5"]
    assert c.cuda == "12.4"
    assert c.min_driver == "550.54.14"
    assert c.index_url == "https://download.pytorch.org/whl/cu124"
    assert "9.0" in c.arch and c.python == "3.11" and c.device == "auto"
    assert c.base_image == "nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04"
    cpu = cells["cpu-torch2.13"]
    assert (cpu.cuda, cpu.min_driver, cpu.arch, cpu.device) == (None, None, (), "cpu")
    assert cpu.index_url == "https://download.pytorch.org/whl/cpu"


def test_defaults_apply_and_cpu_base_is_templated(tmp_path):
    c = one(tmp_path, torch="2.5.1", variant="cpu", python="3.12")
    assert c.base_image == "python:3.12-slim-bookworm"
    assert (c.source, c.device) == ("index", "auto")


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"torch": "1.13.1", "variant": "cu117"}, ["torch 1.13.1 is unknown", "2.3.1"]),
        ({"torch": "2.9.1", "variant": "cu118"}, ["variant cu118 is not published for torch 2.9.1", "cu126"]),
        ({"torch": "2.3.1", "variant": "cu121", "python": "3.13"}, ["python 3.13 is not supported by torch 2.3.1", "3.12"]),
        ({"torch": "2.5.1", "variant": "cu124", "source": "conda"}, ["source must be one of"]),
        ({"torch": "2.5.1", "variant": "cu124", "device": "tpu"}, ["device must be one of"]),
        ({"variant": "cu124"}, ["torch is missing"]),
    ],
)
def test_impossible_cells_are_refused_with_the_reason(tmp_path, spec, words):
    with pytest.raises(InputError) as err:
        one(tmp_path, **spec)
    msg = str(err.value)
    assert "cells.c" in msg and str(tmp_path) in msg and "\n" not in msg
    for w in words:
        assert w in msg
    assert err.value.exit_code == 2


def test_validate_is_a_plain_function():
    assert validate("x", {"torch": "2.6.0", "variant": "cu126", "python": "3.11", "source": "index", "device": "auto"}, compat()) is None
    assert "not published" in validate("x", {"torch": "2.6.0", "variant": "cu121", "python": "3.11"}, compat())


def test_unknown_cell_key_and_bad_schema_are_refused(tmp_path):
    with pytest.raises(InputError, match="unknown key.*cuda_version"):
        one(tmp_path, torch="2.5.1", variant="cu124", cuda_version="12.4")
    bad = tmp_path / "m.yaml"
    bad.write_text("schema: something/9\ncells: {}\n")
    with pytest.raises(InputError, match="schema must be harness.matrix/1"):
        load_matrix(bad)
    with pytest.raises(InputError, match="file not found"):
        load_matrix(tmp_path / "nope.yaml")
    bad.write_text("cells: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML at line"):
        load_matrix(bad)


def test_cell_names_must_be_docker_tag_safe(tmp_path):
    with pytest.raises(InputError, match="becomes a Docker tag"):
        load_matrix(write_matrix(tmp_path, {"Bad Name": {"torch": "2.5.1", "variant": "cpu"}}))


def test_compat_is_checked(tmp_path):
    with pytest.raises(InputError, match="schema must be harness.compat/1"):
        parse_compat({"schema": "x"}, "compat.yaml")
    with pytest.raises(InputError, match="cuda '9.9' is not under"):
        parse_compat({"schema": "harness.compat/1", "cuda": {},
                      "torch": {"2.0.0": {"python": ["3.11"], "variants": {"cu999": {"cuda": "9.9"}}}}}, "compat.yaml")


# ----------------------------------------------------------------------------- select / base images


def test_select_keeps_requested_order_and_refuses_unknown_names():
    cells = load_matrix()
    assert [c.name for c in select(cells, ["cu130-torch2.14", "cpu-torch2.13"])] == ["cu130-torch2.14", "cpu-torch2.13"]
    assert select(cells, None) == cells
    with pytest.raises(InputError) as err:
        select(cells, ["cpu-torch2.13", "cu999-torch9"])
    assert "cu999-torch9" in str(err.value) and "known: cu118-torch2.3" in str(err.value)


def test_base_image_substitution_star_and_per_cell():
    cells = select(load_matrix(), ["cu124-torch2.5", "cu126-torch2.6"])
    out = apply_base_images(cells, {"*": "local/debian-py:bookworm", "cu126-torch2.6": "site/cuda:12.6"})
    assert [c.base_image for c in out] == ["local/debian-py:bookworm", "site/cuda:12.6"]
    assert cells[0].base_image.startswith("nvidia/cuda")  # inputs untouched (frozen)
    assert apply_base_images(cells, {}) == cells
    with pytest.raises(InputError, match="unknown cell"):
        apply_base_images(cells, {"nope": "x"})


def test_site_config(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text('base_images:\n  "*": local/debian-py:bookworm\n  cu124-torch2.5: site/cuda:12.4\n')
    assert load_site_config(path) == {"base_images": {"*": "local/debian-py:bookworm", "cu124-torch2.5": "site/cuda:12.4"}}
    path.write_text("bases: {}\n")
    with pytest.raises(InputError, match="unknown key.*bases"):
        load_site_config(path)


# ----------------------------------------------------------------------------- host


def cells_by_name():
    return {c.name: c for c in load_matrix()}


def test_no_gpu_host_never_skips_and_runs_on_cpu():
    host = {"driver": None, "gpus": []}
    for c in load_matrix():
        assert host_skip_reason(c, host) is None
        assert effective_device(c, host) == "cpu"


def test_old_driver_skips_newer_cuda():
    cells = cells_by_name()
    host = {"driver": "550.54.14", "gpus": [{"name": "NVIDIA H200", "capability": "9.0"}]}
    assert host_skip_reason(cells["cu124-torch2.5"], host) is None  # exactly the minimum
    reason = host_skip_reason(cells["cu126-torch2.6"], host)
    assert "driver 550.54.14 is older than 560.28.03" in reason and "CUDA 12.6" in reason
    # Numeric, not string, comparison: 570.26 < 570.124.06 < 580.
    host["driver"] = "570.124.06"
    assert host_skip_reason(cells["cu128-torch2.7"], host) is None
    assert host_skip_reason(cells["cu130-torch2.9"], host) is not None
    assert host_skip_reason(cells["cpu-torch2.13"], host) is None


def test_gpu_arch_not_in_the_wheel_skips():
    cells = cells_by_name()
    volta = {"driver": "580.95.05", "gpus": [{"name": "Tesla V100", "capability": "7.0"}]}
    reason = host_skip_reason(cells["cu130-torch2.9"], volta)
    assert "Tesla V100 (7.0)" in reason and "7.5" in reason
    assert host_skip_reason(cells["cu126-torch2.6"], volta) is None
    # sm_86 cubins run on an 8.9 GPU (same major); 10.0/12.0 match; PTX 12.0 JITs on 12.1.
    assert host_skip_reason(cells["cu124-torch2.5"], {"driver": "580.1", "gpus": [{"name": "L4", "capability": "8.9"}]}) is None
    blackwell = {"driver": "580.95.05", "gpus": [{"name": "B200", "capability": "10.0"}]}
    assert host_skip_reason(cells["cu124-torch2.5"], blackwell) is not None
    assert host_skip_reason(cells["cu128-torch2.7"], blackwell) is None
    spark = {"driver": "580.95.05", "gpus": [{"name": "GB10", "capability": "12.1"}]}
    assert host_skip_reason(cells["cu130-torch2.14"], spark) is None


def test_h200_runs_every_cuda_cell_with_a_new_driver():
    for c in load_matrix():
        assert host_skip_reason(c, H200) is None
        assert effective_device(c, H200) == ("cpu" if c.device == "cpu" or not c.cuda else "cuda")


def test_parse_nvidia_smi():
    text = "NVIDIA H200, 9.0, 570.124.06\nNVIDIA H200, 9.0, 570.124.06\n"
    assert parse_nvidia_smi(text) == {"driver": "570.124.06", "gpus": [{"name": "NVIDIA H200", "capability": "9.0"}] * 2}
    assert parse_nvidia_smi("") == {"driver": None, "gpus": []}


def test_cells_are_frozen():
    c = load_matrix()[0]
    with pytest.raises(Exception):
        c.torch = "0"  # type: ignore[misc]
    assert replace(c, torch="x").torch == "x"


# ----------------------------------------------------------------------------- CLI arguments


def test_cli_base_image_and_wheelhouse_arguments(tmp_path):
    from harness.cli.images import base_image_overrides, split_cells, wheelhouse_dirs

    assert split_cells("a, b,,") == ["a", "b"] and split_cells("") is None
    assert base_image_overrides(["img:1", "cu124-torch2.5=site/cuda:12.4"]) == {
        "*": "img:1", "cu124-torch2.5": "site/cuda:12.4"}
    with pytest.raises(InputError, match="neither IMAGE nor CELL=IMAGE"):
        base_image_overrides(["=x"])
    cells = select(load_matrix(), ["cpu-torch2.13", "cu130-torch2.14", "cu124-torch2.5"])
    (tmp_path / "root" / "cpu-torch2.13").mkdir(parents=True)
    (tmp_path / "root" / "cu130-torch2.14").mkdir()
    (tmp_path / "other").mkdir()
    got = wheelhouse_dirs([str(tmp_path / "root"), f"cu130-torch2.14={tmp_path / 'other'}"], cells)
    assert got == {"cpu-torch2.13": tmp_path / "root" / "cpu-torch2.13", "cu130-torch2.14": tmp_path / "other"}
    with pytest.raises(InputError, match="not a directory"):
        wheelhouse_dirs([str(tmp_path / "nope")], cells)
    with pytest.raises(InputError, match="not a selected cell"):
        wheelhouse_dirs(["cu999=/x"], cells)
