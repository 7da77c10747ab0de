"""The CPU instruction-set axis: parsed like the other axes, set before the interpreter starts,
skipped where the CPU lacks the level, and measured (not assumed) in every record."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import UsageError
from harness.options import Axes, RunOptions, parse_isa
from harness.plan import Job, image_run_cells, isa_skips, local_cells, make_plan
from harness.worker import isa

from tests.conftest import EXAMPLE, REPO

AVX512_HOST = "processor\t: 0\nflags\t\t: fpu sse sse2 sse4_1 sse4_2 avx avx2 fma avx512f avx512dq avx512bw avx512vl\n"
AVX2_HOST = "processor\t: 0\nflags\t\t: fpu sse sse2 sse4_1 sse4_2 avx avx2 fma\n"
OLD_HOST = "processor\t: 0\nflags\t\t: fpu sse sse2 sse4_1 sse4_2 avx\n"


def test_parse_isa_levels_aliases_and_refusals() -> None:
    assert parse_isa("native,avx2,baseline") == ("native", "avx2", "baseline")
    assert parse_isa("default, NATIVE,baseline") == ("baseline", "native")  # default is baseline; duplicates once
    with pytest.raises(UsageError, match="--isa 'sse9' is not one of native, avx512, avx2, baseline"):
        parse_isa("native,sse9")
    with pytest.raises(UsageError, match="names no level"):
        parse_isa(" , ")


def test_host_levels_from_cpu_flags() -> None:
    assert isa.host_levels(AVX512_HOST, "x86_64") == ("native", "avx512", "avx2", "baseline")
    assert isa.host_levels(AVX2_HOST, "x86_64") == ("native", "avx2", "baseline")
    assert isa.host_levels(OLD_HOST, "x86_64") == ("native", "baseline")
    assert isa.host_levels(AVX512_HOST, "aarch64") == ("native",)  # the levels are x86-64 ones
    assert isa.host_levels("", "x86_64") == ("native",)  # no flags line: claim nothing


def test_a_level_above_the_host_is_a_skip_with_its_reason() -> None:
    levels = isa.host_levels(AVX2_HOST, "x86_64")
    assert isa.unsupported_reason("native", levels) is None and isa.unsupported_reason(None, levels) is None
    assert isa.unsupported_reason("baseline", levels) is None
    why = isa.unsupported_reason("avx512", levels, "x86_64")
    assert why is not None and "lacks avx512" in why and "avx512f" in why and "supports avx2, baseline" in why
    assert "only --isa native" in (isa.unsupported_reason("avx2", ("native",), "aarch64") or "")
    cells = local_cells(["cpu"], ["strict"], [1], isa=["native", "avx512", "baseline"])
    isa_skips(cells, levels, "x86_64")
    assert [c.skip_reason is None for c in cells] == [True, False, True]


def test_each_level_sets_the_three_libraries_switches_and_native_clears_inherited_ones() -> None:
    assert isa.launch_env("baseline") == {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                                          "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
    assert isa.launch_env("avx2") == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                      "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert isa.launch_env("avx512")["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE"
    inherited = {"ATEN_CPU_CAPABILITY": "avx2", "PATH": "/bin"}
    assert isa.child_env(inherited, "native") == {"PATH": "/bin"}  # native: each library picks the CPU's best
    assert isa.child_env(inherited, None) == inherited  # no ISA axis: the caller's environment as it is
    assert isa.child_env(inherited, "baseline")["ATEN_CPU_CAPABILITY"] == "default"


def test_the_local_child_and_the_container_get_the_switches_before_start(tmp_path: Path) -> None:
    from harness.backends.docker import container_spec
    from harness.backends.local import child_env

    base, native = local_cells(["cpu"], ["strict"], [1], isa=["baseline", "native"])
    env = child_env(base, {"PATH": "/bin", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert (env["ATEN_CPU_CAPABILITY"], env["ONEDNN_MAX_CPU_ISA"], env["MKL_ENABLE_INSTRUCTIONS"]) == \
        ("default", "SSE41", "SSE4_2")
    assert not set(isa.VARS) & set(child_env(native, {"PATH": "/bin", "ONEDNN_MAX_CPU_ISA": "AVX2"}))
    job = Job(bundle_dir=str(tmp_path), data_path=None, results_dir=str(tmp_path / "out"))
    req = container_spec(base, job, "sha256:x", memory="1g")
    assert req.environment["ATEN_CPU_CAPABILITY"] == "default" and req.environment["MKL_ENABLE_INSTRUCTIONS"] == "SSE4_2"
    assert not set(isa.VARS) & set(container_spec(native, job, "sha256:x", memory="1g").environment)


def test_isa_is_a_cell_axis_with_a_suffix() -> None:
    cells = local_cells(["cpu"], ["strict", "default"], [1], isa=["native", "baseline"])
    assert [c.name for c in cells] == ["cpu-strict-t1-native", "cpu-strict-t1-baseline",
                                       "cpu-default-t1-native", "cpu-default-t1-baseline"]
    assert [c.isa for c in cells] == ["native", "baseline"] * 2 and cells[1].labels["isa"] == "baseline"
    assert [c.name for c in local_cells(["cpu"], ["strict"], [1])] == ["cpu-strict-t1"]  # no axis, no suffix

    class IC:
        name, torch, variant = "cpu-torch2.13", "2.13.0", "cpu"

    kw = dict(devices={"cpu-torch2.13": "cpu"}, skips={}, warnings={})
    assert [c.name for c in image_run_cells([IC], ["strict"], [None], [False], 1, isa=["native", "avx2"], **kw)] == \
        ["cpu-torch2.13-native", "cpu-torch2.13-avx2"]
    assert [c.name for c in image_run_cells([IC], ["strict"], [None], [False], 1, isa=["baseline"], **kw)] == \
        ["cpu-torch2.13-baseline"]
    assert [c.name for c in image_run_cells([IC], ["strict"], [None], [False], 1, isa=["native"], **kw)] == \
        ["cpu-torch2.13"]


def test_the_planner_skips_levels_the_host_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(isa, "read_host_levels", lambda: isa.host_levels(AVX2_HOST, "x86_64"))
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    plan = make_plan(RunOptions(bundle=str(EXAMPLE), backend="local",
                                axes=Axes(devices=("cpu",), modes=("strict",), threads=(1,),
                                          isa=("native", "avx512"))))
    assert [c.name for c in plan.runnable] == ["cpu-strict-t1-native"]
    assert [c.name for c in plan.skipped] == ["cpu-strict-t1-avx512"]
    assert "lacks avx512" in (plan.skipped[0].skip_reason or "")


def test_a_mismatch_between_requested_and_effective_is_a_warning() -> None:
    assert isa.mismatch("baseline", "DEFAULT") is None and isa.mismatch("native", "AVX512") is None
    assert isa.mismatch(None, "AVX2") is None and isa.mismatch("avx2", None) is None
    assert "asked for AVX512" in (isa.mismatch("avx512", "AVX2") or "")


def test_an_unsupported_level_is_a_skipped_row_not_a_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from harness.judge import Tolerances, Verdict
    from harness.options import ReportOptions
    from harness.record import Status, load
    from harness.runner import execute

    monkeypatch.setattr(isa, "read_host_levels", lambda: ("native", "baseline"))
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    opts = RunOptions(bundle=str(EXAMPLE), backend="local", out=str(tmp_path / "out"), progress=False,
                      axes=Axes(devices=("cpu",), modes=("strict",), threads=(1,), isa=("native", "avx2")))
    comparison = execute(opts, ReportOptions(), Tolerances())
    assert comparison.overall is Verdict.REPRODUCED  # the skip does not count against the run
    recs = {r.cell: r for r in load(tmp_path / "out").records}
    skipped = recs["cpu-strict-t1-avx2"]
    assert skipped.status is Status.SKIPPED and skipped.error is not None and "lacks avx2" in skipped.error.message
    assert recs["cpu-strict-t1-native"].ok
    assert "cpu-strict-t1-avx2 skipped" in capsys.readouterr().out


@pytest.mark.skipif("baseline" not in isa.read_host_levels(), reason="an x86-64 host with CPU flags is needed")
def test_native_and_baseline_record_different_capabilities(tmp_path: Path) -> None:
    """The bundled example under --isa native,baseline: the levels torch's kernels took differ, and are recorded."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "harness", "matrix", str(EXAMPLE), "--backend", "local",
                        "--isa", "native,baseline", "--threads", "1", "--determinism", "strict", "--out", str(out),
                        "--no-progress", "--detail", "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr
    records = {r["cell"]: r for r in json.loads((tmp_path / "r.json").read_text())["records"]}
    native, base = records["cpu-strict-t1-native"]["env"], records["cpu-strict-t1-baseline"]["env"]
    assert base["cpu_capability"] == "DEFAULT" and native["cpu_capability"] in ("AVX2", "AVX512")
    assert (native["isa_requested"], base["isa_requested"]) == ("native", "baseline")
    assert native["isa_env"] == {} and base["isa_env"] == {"ATEN_CPU_CAPABILITY": "default",
                                                          "ONEDNN_MAX_CPU_ISA": "SSE41",
                                                          "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
    assert f"{native['cpu_capability']} (native)" in p.stdout and "DEFAULT (baseline)" in p.stdout  # Environment table
    assert "isa" in p.stdout and "Attribution" in p.stdout
    # both weights comparisons are recorded, whatever they say on this CPU
    assert all(records[c]["weights_vs_archived"] is not None for c in records)
