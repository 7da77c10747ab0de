"""Attribution on synthetic records with known per-axis effects: each axis gets what the cells support, no more."""

from __future__ import annotations

import itertools
import json

import pytest
from rich.console import Console

from harness.attribution import CONFOUNDED, MEASURED, NOT_ENOUGH, _tf32, attribute
from harness.judge import compare
from harness.record import ResultRecord, Status
from harness.report import json_report, markdown, print_report

from tests.records import record, with_env

THREADS_EFFECT = 3e-8  # R² moves this much from 1 to 4 threads
ISA_EFFECT = 5e-7  # and this much from AVX512 to DEFAULT


def cell(name: str, *, threads: int = 1, cap: str = "AVX512", mode: str = "strict", torch: str = "2.13.0+cpu",
         cuda: str | None = None, device_type: str = "cpu", r2: float = 0.9, sha: str | None = None,
         tf32: bool = False) -> ResultRecord:
    rec = with_env(record(name, r2=r2, sha=sha or name), torch, cuda)
    rec.env.threads = threads
    rec.env.cpu = "AMD EPYC"
    rec.env.numpy = "2.4.6"
    rec.env.device_type = device_type
    rec.env.device = "NVIDIA H200" if device_type == "cuda" else "AMD EPYC"
    rec.env.compute_capability = "9.0" if device_type == "cuda" else None
    rec.env.cpu_capability = cap
    rec.env.isa_requested = {"AVX512": "native", "DEFAULT": "baseline"}.get(cap)
    rec.env.isa_env = {"ATEN_CPU_CAPABILITY": "default"} if cap == "DEFAULT" else {}
    rec.determinism = {**rec.determinism, "mode": mode, "matmul_allow_tf32": tf32}
    rec.data_sha256 = "844a62a5e74e" + "0" * 52
    return rec


def factorial() -> list[ResultRecord]:
    """threads x ISA, additive effects on R²; determinism fixed. The first cell is the baseline."""
    out = []
    for t, cap in itertools.product((1, 4), ("AVX512", "DEFAULT")):
        r2 = 0.9 + (THREADS_EFFECT if t == 4 else 0.0) + (ISA_EFFECT if cap == "DEFAULT" else 0.0)
        out.append(cell(f"t{t}-{cap.lower()}", threads=t, cap=cap, r2=r2, sha=f"w-{t}-{cap}"))
    return out


def test_each_axis_gets_its_own_effect_from_pairs_that_differ_only_in_it() -> None:
    attr = attribute(factorial())
    threads, isa = attr.axis("threads"), attr.axis("isa")
    assert threads.status == isa.status == MEASURED
    assert threads.max_abs["r2/a"] == pytest.approx(THREADS_EFFECT, rel=1e-6)
    assert isa.max_abs["r2/a"] == pytest.approx(ISA_EFFECT, rel=1e-6)
    assert threads.n_pairs["r2/a"] == isa.n_pairs["r2/a"] == 2  # the diagonal pairs differ in both: not used
    assert sorted(map(tuple, isa.pairs)) == [("t1-avx512", "t1-default"), ("t4-avx512", "t4-default")]
    assert isa.values == ["AVX512 (native)", "DEFAULT (baseline)"]
    assert threads.max_abs["val_loss"] == 0.0  # the loss did not move: an exact zero, not a missing number
    assert (isa.weights_identical, isa.weights_compared) == (0, 2)
    det = attr.axis("determinism")
    assert det.status == NOT_ENOUGH and det.max_abs == {} and det.values == ["strict"]
    assert attr.axis("gpu").status == NOT_ENOUGH and attr.axis("gpu").values == []  # no CUDA cell
    assert attr.same_environment is None


def test_a_confounded_design_is_reported_confounded_with_no_number() -> None:
    """Two cells, torch and CUDA both changed: neither axis can be separated, and nothing is attributed."""
    a = cell("cpu-torch2.13", torch="2.13.0+cpu", cuda=None)
    b = cell("cu130-torch2.14", torch="2.14.1+cu130", cuda="13.0", r2=0.91)
    attr = attribute([a, b])
    torch, cuda = attr.axis("torch"), attr.axis("cuda")
    assert torch.status == cuda.status == CONFOUNDED
    assert torch.confounded_with == ["cuda", "cudnn"] and "torch" in cuda.confounded_with
    for e in (torch, cuda):
        assert e.max_abs == {} and e.pairs == [] and e.family_max("r2") is None
    assert attr.axis("threads").status == NOT_ENOUGH


def test_confounded_in_one_pair_and_measured_in_another_keeps_only_the_clean_pairs() -> None:
    a = cell("a", threads=1, mode="strict")
    b = cell("b", threads=4, mode="default", r2=0.95)  # threads and mode at once
    c = cell("c", threads=4, mode="strict", r2=0.9 + 1e-7)  # differs from a in threads alone
    attr = attribute([a, b, c])
    assert attr.axis("threads").status == MEASURED and attr.axis("threads").pairs == [["a", "c"]]
    assert attr.axis("threads").max_abs["r2/a"] == pytest.approx(1e-7)
    mode = attr.axis("determinism")  # b vs c differs in mode alone
    assert mode.status == MEASURED and mode.pairs == [["b", "c"]]


def test_repeats_are_the_same_environment_row_and_identical_weights_are_counted() -> None:
    a, b = cell("r1", sha="w"), cell("r2", sha="w")
    attr = attribute([a, b])
    same = attr.same_environment
    assert same is not None and same.pairs == [["r1", "r2"]] and same.max_abs["r2/a"] == 0.0
    assert (same.weights_identical, same.weights_compared) == (1, 1)
    assert all(e.status == NOT_ENOUGH for e in attr.axes)


def test_a_fact_measured_in_one_cell_only_makes_the_pair_unusable() -> None:
    a, b = cell("a", threads=1), cell("b", threads=4, r2=0.95)
    b.env.cpu_capability = None  # an older record: the ISA was not measured there
    attr = attribute([a, b])
    assert attr.uncertain_pairs == 1
    assert attr.axis("threads").status == CONFOUNDED and attr.axis("threads").max_abs == {}


def test_cuda_only_axes_do_not_confound_the_device_axis() -> None:
    cpu = cell("cpu", torch="2.14.1+cu130", cuda="13.0")
    gpu = cell("cuda", torch="2.14.1+cu130", cuda="13.0", device_type="cuda", r2=0.9 + 2e-6)
    gpu_tf32 = cell("cuda-tf32", torch="2.14.1+cu130", cuda="13.0", device_type="cuda", tf32=True, r2=0.9 + 9e-5)
    attr = attribute([cpu, gpu, gpu_tf32])
    device, tf32 = attr.axis("device"), attr.axis("tf32")
    assert device.status == MEASURED and device.pairs == [["cpu", "cuda"]]
    assert device.max_abs["r2/a"] == pytest.approx(2e-6)
    assert tf32.status == MEASURED and tf32.max_abs["r2/a"] == pytest.approx(9e-5 - 2e-6)
    assert attr.axis("gpu").status == NOT_ENOUGH  # one GPU model among the CUDA cells


def test_a_metric_missing_from_a_pair_gets_no_number_and_a_band_width_gives_ratios() -> None:
    recs = factorial()
    del recs[0].retrained["val"]["mae"]  # t1-avx512 has no MAE
    attr = attribute(recs, width=lambda key: 1e-7 if key == "r2/a" else None)
    isa = attr.axis("isa")
    assert isa.n_pairs["mae/a"] == 1 and isa.n_pairs["r2/a"] == 2
    assert isa.ratio["r2/a"] == pytest.approx(ISA_EFFECT / 1e-7) and "mse/a" not in isa.ratio
    assert attr.axis("threads").family_ratio("r2") == pytest.approx(THREADS_EFFECT / 1e-7)
    assert attribute(recs).axis("isa").ratio == {}  # no band: no ratio


def test_only_ok_cells_count() -> None:
    recs = factorial() + [record("broken", status=Status.FAILED)]
    assert "broken" not in attribute(recs).cells


@pytest.mark.parametrize("width", [80, 200])
def test_the_report_has_an_attribution_table_from_two_ok_cells(width: int) -> None:
    recs = factorial()
    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    print_report(console, recs, compare(recs), width=lambda key: 1e-7)
    text = console.export_text()
    part = text[text.index("Attribution"):]
    table = part[:part.index("not judged:")]  # the note lines under it are printed whole: a command to copy
    assert all(len(ln.rstrip()) <= width for ln in table.splitlines())
    tokens = {t for ln in part.splitlines() for t in ln.split()}
    assert "5.00e-07" in tokens and "3.00e-08" in tokens and "(5" in part and "sd)" in tokens  # ISA, threads, in seed sd
    assert "isa" in tokens and "threads" in tokens and "not enough cells" in part and "determinism strict" in part

    one = Console(width=width, record=True, color_system=None, force_terminal=False)
    print_report(one, recs[:1], compare(recs[:1]))
    assert "Attribution" not in one.export_text()


def test_markdown_and_json_carry_the_attribution() -> None:
    recs = factorial()
    md = markdown(recs, compare(recs))
    block = md[md.index("Attribution"):].split("\n\n")[1].splitlines()
    assert len({ln.replace("\\|", "").count("|") for ln in block}) == 1, md
    assert any(ln.startswith("| isa |") and "5.00e-07" in ln for ln in block)
    data = json.loads(json.dumps(json_report(recs, compare(recs))))
    axes = {a["axis"]: a for a in data["attribution"]["axes"]}
    assert axes["isa"]["status"] == "measured" and axes["isa"]["max_abs"]["r2/a"] == pytest.approx(ISA_EFFECT)
    assert "attribution" not in json_report(recs[:1], compare(recs[:1]))


def test_the_comparison_carries_its_attribution_and_the_renderers_only_show_it() -> None:
    """harness.judge computes the attribution into the Comparison; the report renders that one."""
    recs = factorial()
    comparison = compare(recs)
    assert comparison.attribution is not None
    assert comparison.attribution == attribute(recs)  # no seed band: no widths
    assert compare(recs[:1]).attribution is None  # one cell: nothing to attribute
    report = json_report(recs, comparison)
    assert "attribution" not in report["comparison"]  # report.json keeps it beside the comparison, as before
    assert report["attribution"]["cells"] == comparison.attribution.cells
    # what a renderer shows is the comparison's: change it and the page follows
    comparison.attribution = None
    assert "attribution" not in json_report(recs, comparison)


def test_a_numeric_switch_set_in_one_run_is_an_axis_and_no_cause_of_its_own() -> None:
    """MKL_CBWR in one run's environment and not the other's: the runs differ in ``switches``, so
    "every setting they measured is equal" (a nondeterministic kernel) is no longer what the evidence says."""
    from harness.causes import Cause, classify

    plain, cnr = cell("plain", sha="w-plain"), cell("cnr", r2=0.9 + 1e-7, sha="w-cnr")
    plain.env.switches, cnr.env.switches = {}, {"MKL_CBWR": "COMPATIBLE"}
    sw = attribute([plain, cnr]).axis("switches")
    assert sw.status == MEASURED and sorted(sw.values) == ["MKL_CBWR=COMPATIBLE", "none"]
    assert sw.max_abs["r2/a"] == pytest.approx(1e-7, rel=1e-6)
    assert classify(plain, cnr) is None  # the settings alone name no class: the traces would
    cnr.env.switches = {}
    assert classify(plain, cnr).cause is Cause.NONDETERMINISM  # with the switch gone, every setting is equal


def test_switches_a_record_never_measured_are_unknown_not_none() -> None:
    old, new = cell("old", sha="w-old"), cell("new", sha="w-new")
    old.env.switches, new.env.switches = None, {}  # a record from before switches were measured
    attr = attribute([old, new])
    assert attr.uncertain_pairs == 1  # left out: switches might differ there
    assert attr.same_environment is None or attr.same_environment.pairs == []
    old.env.switches = None
    new.env.switches = None  # unknown in both: equal, as for every axis
    assert attribute([old, new]).same_environment.pairs == [["old", "new"]]


def test_a_per_backend_bf16_precision_is_the_tf32_axis_and_the_cause() -> None:
    """torch's per-backend precision (torch.backends.mkldnn.matmul.fp32_precision = "bf16", set by a trainer) moves
    a CPU run's float32 matmuls to bf16 while the legacy switches say nothing: the axis and the cause read it."""
    from harness.causes import Cause, classify

    ieee = {"generic": "none", "mkldnn": "none", "mkldnn.matmul": "ieee", "cuda.matmul": "ieee", "cudnn.conv": "none"}
    plain, bf16 = cell("plain", sha="w-plain"), cell("bf16", r2=0.9 + 1e-4, sha="w-bf16")
    plain.determinism["fp32_precision"] = dict(ieee)
    bf16.determinism.update(fp32_precision={**ieee, "mkldnn.matmul": "bf16"}, float32_matmul_precision=None)
    tf32 = attribute([plain, bf16]).axis("tf32")
    assert tf32.status == MEASURED and sorted(tf32.values) == ["bf16", "off"]
    found = classify(plain, bf16)
    assert found.cause is Cause.PRECISION and found.evidence == "bf16 float32 math is on in bf16; nothing else they measured differs"
    # a CUDA backend's setting does not move a CPU run, and "none" inherits from the level above
    bf16.determinism["fp32_precision"] = {**ieee, "cudnn.conv": "tf32", "mkldnn.matmul": "none", "generic": "tf32"}
    assert _tf32(bf16) == "on"
    bf16.determinism["fp32_precision"] = {**ieee, "cudnn.conv": "tf32"}
    assert _tf32(bf16) == "off"


def test_the_legacy_switches_still_name_the_precision_of_an_older_record() -> None:
    old = cell("old", tf32=False)
    old.determinism.pop("fp32_precision", None)
    assert _tf32(old) == "off"
    old.determinism["float32_matmul_precision"] = "medium"
    assert _tf32(old) == "bf16"
    assert _tf32(cell("gpu", device_type="cuda", tf32=True)) == "on"
