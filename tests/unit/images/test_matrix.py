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
    host_warning,
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
        ({"torch": "1.13.1", "variant": "cu117"}, ["torch 1.13.1 is unknown", "known: 2.0.0 to 2.14.1"]),
        ({"torch": "2.99.0", "variant": "cu130"}, ["torch 2.99.0 is unknown", "known: 2.0.0 to 2.14.1"]),
        ({"torch": "2.9.1", "variant": "cu118"}, ["variant cu118 was last published with torch 2.7.1", "torch 2.9.1 has", "cu126"]),
        ({"torch": "2.0.1", "variant": "cu121"}, ["variant cu121 was first published with torch 2.1.0", "torch 2.0.1 has", "cu117, cu118"]),
        ({"torch": "2.3.1", "variant": "cu121", "python": "3.13"}, ["python 3.13 was first supported by torch 2.5.0", "3.12"]),
        ({"torch": "2.1.2", "variant": "cu118", "python": "3.12"}, ["python 3.12 was first supported by torch 2.2.0"]),
        ({"torch": "2.9.1", "variant": "cu126", "python": "3.9"}, ["python 3.9 was last supported by torch 2.8.0"]),
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
    assert "last published with torch 2.5.1" in validate("x", {"torch": "2.6.0", "variant": "cu121", "python": "3.11"}, compat())


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
    assert load_site_config(path) == {"base_images": {"*": "local/debian-py:bookworm", "cu124-torch2.5": "site/cuda:12.4"},
                                      "slurm": None, "host": None}
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


def test_old_driver_runs_newer_minor_with_a_warning_and_skips_newer_major():
    cells = cells_by_name()
    host = {"driver": "550.54.14", "gpus": [{"name": "NVIDIA H200", "capability": "9.0"}]}
    assert host_skip_reason(cells["cu124-torch2.5"], host) is None  # exactly the minimum
    assert host_warning(cells["cu124-torch2.5"], host) is None
    # CUDA 12.6 wheels run on a 12.x driver through minor-version compatibility.
    assert host_skip_reason(cells["cu126-torch2.6"], host) is None
    warning = host_warning(cells["cu126-torch2.6"], host)
    assert "driver 550.54.14 is older than 560.35.05" in warning and "CUDA 12.6" in warning
    # Numeric, not string, comparison: 570.26 < 570.124.06 < 580.
    host["driver"] = "570.124.06"
    assert host_skip_reason(cells["cu128-torch2.7"], host) is None
    assert host_warning(cells["cu128-torch2.7"], host) is None  # exactly the minimum
    assert host_skip_reason(cells["cu130-torch2.9"], host) is not None
    assert host_skip_reason(cells["cpu-torch2.13"], host) is None


def test_the_minimums_are_those_of_the_base_images_cuda_updates():
    # NVIDIA's release notes, Table 3 (Linux x86_64): the cells' bases are 12.6.3 and 12.8.1, whose
    # toolkits (12.6 Update 3, 12.8 Update 1) need 560.35.05 and 570.124.06; the GA numbers
    # (560.28.03, 570.26) are older. Between a GA and its update's minimum the cell now warns.
    cells = cells_by_name()
    cu126, cu128 = cells["cu126-torch2.6"], cells["cu128-torch2.7"]
    assert cu126.base_image.startswith("nvidia/cuda:12.6.3-") and cu126.min_driver == "560.35.05"
    assert cu128.base_image.startswith("nvidia/cuda:12.8.1-") and cu128.min_driver == "570.124.06"
    for cell, ga in ((cu126, "560.28.03"), (cu128, "570.26")):
        host = {"driver": ga, "gpus": [{"name": "NVIDIA H200", "capability": "9.0"}]}
        assert host_skip_reason(cell, host) is None
        assert f"driver {ga} is older than {cell.min_driver} (CUDA {cell.cuda}'s own minimum)" in host_warning(cell, host)


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
    from harness.options import base_image_overrides, parse_cells
    from harness.plan import wheelhouse_dirs

    assert parse_cells("a, b,,") == ("a", "b") and parse_cells("") is None
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


# ----------------------------------------------------------------------------- compat data and driver judgement


def test_compat_data_is_internally_consistent():
    data = yaml.safe_load(DEFAULT_COMPAT.read_text())
    v = lambda s: tuple(int(p) for p in str(s).split("."))  # noqa: E731
    for ver, info in data["cuda"].items():
        assert isinstance(ver, str) and isinstance(info["min_driver"], str), ver
        assert isinstance(info["compat_floor"], str), ver
        assert v(info["min_driver"]) >= v(info["compat_floor"]), ver
        assert info["base_image"].startswith("nvidia/cuda:" + ver), ver
    floors = {ver.split(".")[0]: info["compat_floor"] for ver, info in data["cuda"].items()}
    assert floors == {"11": "450.80.02", "12": "525.60.13", "13": "580"}
    releases = list(data["torch"])
    assert releases == sorted(releases, key=v), "torch releases are listed oldest first"
    for ver, info in data["torch"].items():
        py = info["python"]
        assert all(isinstance(p, str) for p in py), ver
        assert py == sorted(set(py), key=v), f"torch {ver}: python list must be sorted and unique"
        assert "cpu" in info["variants"], ver
        for var, vinfo in info["variants"].items():
            if var == "cpu":
                continue
            assert var == "cu" + vinfo["cuda"].replace(".", ""), (ver, var)
            assert vinfo["cuda"] in data["cuda"], (ver, var)
            arch = vinfo["arch"]
            assert arch and arch == sorted(set(arch), key=v), (ver, var)
            assert vinfo.get("ptx") in (None, *arch), (ver, var)
    parse_compat(data)


def test_compat_covers_every_release_from_2_0():
    c = compat()
    for t in ("2.0.0", "2.0.1", "2.1.0", "2.1.1", "2.1.2", "2.2.0", "2.2.1", "2.2.2", "2.3.0", "2.4.0",
              "2.5.0", "2.7.0", "2.9.0", "2.10.0", "2.12.0", "2.13.0", "2.14.0"):
        assert t in c.torch, t
    assert set(c.torch["2.0.1"]["variants"]) == {"cpu", "cu117", "cu118"}
    assert set(c.torch["2.1.2"]["variants"]) == {"cpu", "cu118", "cu121"}
    assert c.torch["2.1.2"]["python"] == ["3.8", "3.9", "3.10", "3.11"]
    assert "3.12" in c.torch["2.2.0"]["python"]
    assert c.torch["2.0.0"]["variants"]["cu118"]["arch"] == ["3.7", "5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "9.0"]
    assert c.cuda["11.7"]["min_driver"] == "515.43.04"


def test_old_release_cells_now_resolve(tmp_path):
    c = one(tmp_path, torch="2.1.2", variant="cu118", python="3.10")
    assert (c.cuda, c.min_driver, c.compat_floor) == ("11.8", "520.61.05", "450.80.02")
    assert "3.7" in c.arch and c.index_url.endswith("/cu118")
    c = one(tmp_path, torch="2.0.1", variant="cu117")
    assert (c.cuda, c.min_driver, c.base_image) == ("11.7", "515.43.04", "nvidia/cuda:11.7.1-cudnn8-runtime-ubuntu22.04")


def test_reasons_are_derived_from_the_data():
    c = parse_compat({"schema": "harness.compat/1", "cuda": {"12.1": {"min_driver": "530.30.02"}},
                      "torch": {"2.1.0": {"python": ["3.11"], "variants": {"cpu": {}, "cu121": {"cuda": "12.1"}}},
                                "2.2.0": {"python": ["3.11"], "variants": {"cpu": {}}},
                                "2.3.0": {"python": ["3.12"], "variants": {"cpu": {}, "cu121": {"cuda": "12.1"}}}}})
    spec = {"torch": "2.2.0", "variant": "cu121", "python": "3.11", "source": "index", "device": "auto"}
    assert "published with torch 2.1.0 to 2.3.0, but not by torch 2.2.0" in validate("x", spec, c)
    assert "last supported by torch 2.2.0" in validate("x", {**spec, "torch": "2.3.0", "variant": "cpu"}, c)
    assert "never published" in validate("x", {**spec, "variant": "cu999"}, c)


def test_compat_floor_above_min_driver_is_refused():
    with pytest.raises(InputError, match="compat_floor 600 is above min_driver"):
        parse_compat({"schema": "harness.compat/1", "cuda": {"12.4": {"min_driver": "550.54.14", "compat_floor": "600"}},
                      "torch": {}}, "compat.yaml")


def gpu(driver: str, capability: str = "9.0", name: str = "NVIDIA H200") -> dict:
    return {"driver": driver, "gpus": [{"name": name, "capability": capability}]}


def test_cuda12_cell_on_an_older_12x_driver_runs_with_a_warning():
    cu124 = cells_by_name()["cu124-torch2.5"]
    host = gpu("535.104.05")
    assert host_skip_reason(cu124, host) is None
    warning = host_warning(cu124, host)
    assert "driver 535.104.05 is older than 550.54.14 (CUDA 12.4's own minimum)" in warning
    assert "minor-version compatibility" in warning and "PTX JIT may fail" in warning
    assert effective_device(cu124, host) == "cuda"


def test_driver_below_the_compat_floor_skips_naming_both_numbers():
    cu124 = cells_by_name()["cu124-torch2.5"]
    for driver in ("470.57.02", "450.51"):
        reason = host_skip_reason(cu124, gpu(driver))
        assert f"driver {driver} is below 525.60.13" in reason
        assert "CUDA 12.x wheels (minor-version compatibility)" in reason and "550.54.14" in reason
        assert host_warning(cu124, gpu(driver)) is None


def test_cuda13_needs_a_580_driver():
    cu130 = cells_by_name()["cu130-torch2.9"]
    reason = host_skip_reason(cu130, gpu("575.57.08"))
    assert "below 580" in reason and "CUDA 13.x" in reason
    for driver in ("580.65.06", "580.95.05"):
        assert host_skip_reason(cu130, gpu(driver)) is None
        assert host_warning(cu130, gpu(driver)) is None


def test_cuda11_on_a_460_driver_warns(tmp_path):
    cell = one(tmp_path, torch="2.1.2", variant="cu118")
    host = gpu("460.32.03", "8.0", "A100")
    assert host_skip_reason(cell, host) is None
    warning = host_warning(cell, host)
    assert "460.32.03 is older than 520.61.05 (CUDA 11.8's own minimum)" in warning
    reason = host_skip_reason(cell, gpu("450.51.06", "8.0", "A100"))
    assert "below 450.80.02" in reason and "CUDA 11.x" in reason


def test_ptx_only_cell_between_floor_and_minimum_is_skipped():
    # A wheel with sm_50..sm_90 cubins and compute_90 PTX: a 10.0 GPU runs it only by PTX JIT.
    cell = replace(cells_by_name()["cu124-torch2.5"], ptx="9.0")
    b200 = gpu("535.104.05", "10.0", "B200")
    reason = host_skip_reason(cell, b200)
    assert "B200 (10.0) runs this wheel only by PTX JIT" in reason
    assert "550.54.14 (CUDA 12.4's own minimum)" in reason and "driver 535.104.05" in reason
    assert host_warning(cell, b200) is None
    assert host_skip_reason(cell, gpu("550.54.15", "10.0", "B200")) is None  # own minimum: PTX JIT works
    # A GPU with a matching cubin runs on the same old driver, with the warning only.
    h200 = gpu("535.104.05", "9.0")
    assert host_skip_reason(cell, h200) is None and host_warning(cell, h200) is not None
    # One GPU with a cubin is enough for the cell to run.
    mixed = {"driver": "535.104.05", "gpus": [{"name": "B200", "capability": "10.0"}, {"name": "H200", "capability": "9.0"}]}
    assert host_skip_reason(cell, mixed) is None
    # sm_120 cubins cover a 12.1 GPU (same major): no PTX JIT needed, so only a warning.
    cu128 = cells_by_name()["cu128-torch2.7"]
    assert host_skip_reason(cu128, gpu("550.54.14", "12.1", "GB10")) is None
    assert "570.124.06" in host_warning(cu128, gpu("550.54.14", "12.1", "GB10"))


def test_archived_cells_without_compat_floor_derive_it_from_the_major():
    cu124 = replace(cells_by_name()["cu124-torch2.5"], compat_floor=None)
    spec = {k: v for k, v in cu124.__dict__.items() if k != "compat_floor"}
    archived = ImageCell(**spec)
    assert archived.compat_floor is None
    assert host_skip_reason(archived, gpu("535.104.05")) is None
    assert "525.60.13" in host_skip_reason(archived, gpu("470.57.02"))
    odd = replace(archived, cuda="14.0", min_driver="600.1")  # unknown major: own minimum is the floor
    assert "below 600.1" in host_skip_reason(odd, gpu("590.1"))


def test_no_gpu_or_cpu_cell_never_warns():
    for c in load_matrix():
        assert host_warning(c, {"driver": None, "gpus": []}) is None
        assert host_warning(c, H200) is None
    assert host_warning(cells_by_name()["cpu-torch2.13"], gpu("450.51")) is None
