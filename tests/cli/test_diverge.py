"""Traces and ``harness diverge``: where two runs part, read from traces a container wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from harness.diverge import Parting, diverge, parse_trace, parts_at_column, render
from harness.errors import InputError
from harness.worker.isa import read_host_levels
from harness.worker.trace import TRACE_MAX_BYTES, TRACE_SCHEMA, TraceWriter, is_checkpoint

from tests.conftest import EXAMPLE, REPO, TESTS

TRAINERS = TESTS / "trainers"
METRICS = {"val_loss": 0.5, "val": {"r2": {"t0": 0.9, "t1": 0.8}}, "best_epoch": 2}


def harness(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def _header() -> str:
    return json.dumps({"schema": TRACE_SCHEMA, "source": "reference"})


def _trace(losses: list[str], states: list[str], tensors: dict[int, dict[str, str]]) -> str:
    lines = [_header()]
    for i, (loss, state) in enumerate(zip(losses, states), 1):
        lines.append(json.dumps({"epoch": 1 + (i - 1) // 4, "step": i, "loss": loss, "state": state}))
        if i in tensors:
            lines.append(json.dumps({"tensors_at": i, "tensors": tensors[i]}))
    return "\n".join(lines) + "\n"


def _d(c: str) -> str:
    return c * 32


# --------------------------------------------------------------------------- constructed traces


def test_constructed_traces_part_at_the_known_step_and_tensor() -> None:
    loss = [(1.0 / i).hex() for i in range(1, 9)]
    loss_b = loss[:5] + [(0.1).hex()] + loss[6:]  # loss bits differ from step 6
    state = [_d("a")] * 8
    state_b = state[:4] + [_d("b")] * 4  # parameters differ from step 5
    same = {"x.bias": _d("1"), "x.weight": _d("2"), "y.weight": _d("3")}
    moved = {**same, "x.weight": _d("9"), "y.weight": _d("8")}
    a = parse_trace(_trace(loss, state, {4: same, 6: same, 8: same}), "a")
    b = parse_trace(_trace(loss_b, state_b, {4: same, 6: moved, 8: moved}), "b")
    d = diverge(a, b, METRICS, METRICS)
    assert d.parting is Parting.TRAINING
    assert d.parts_at == {"step": 5, "epoch": 2, "what": "parameters"}
    assert d.loss_differs_at["step"] == 6 and d.parameters_differ_at["step"] == 5
    assert d.first_tensor == {"name": "x.weight", "at_step": 6}  # the first checkpoint at or after step 5
    text = "\n".join(render(d))
    assert "parts at: epoch 2 step 5" in text and "first differing tensor: x.weight" in text


def test_loss_bits_are_named_before_parameters_at_the_same_step() -> None:
    a = parse_trace(_trace(["0x1.0p+0"] * 3, [_d("a")] * 3, {}), "a")
    b = parse_trace(_trace(["0x1.0p+0", "0x1.8p+0", "0x1.0p+0"], [_d("a"), _d("c"), _d("c")], {}), "b")
    assert diverge(a, b, METRICS, METRICS).parts_at == {"step": 2, "epoch": 1, "what": "loss"}


def test_identical_traces_with_other_metrics_are_evaluation_only_drift() -> None:
    text = _trace(["0x1.0p+0"] * 4, [_d("a")] * 4, {4: {"w": _d("1")}})
    other = {**METRICS, "val": {"r2": {"t0": 0.9, "t1": 0.8000001}}}
    d = diverge(parse_trace(text, "a"), parse_trace(text, "b"), METRICS, other)
    assert d.parting is Parting.EVALUATION_ONLY and d.parts_at is None
    assert d.metrics["val.r2"] == pytest.approx(1e-7) and d.metrics["val_loss"] == 0
    assert "evaluation-only drift" in "\n".join(render(d))


def test_identical_runs_never_part() -> None:
    text = _trace(["0x1.0p+0"] * 4, [_d("a")] * 4, {})
    d = diverge(parse_trace(text, "a"), parse_trace(text, "b"), METRICS, METRICS)
    assert d.parting is Parting.NEVER and "never part" in render(d)[-1]


def test_the_writer_marks_the_changed_tensor_of_a_real_model(tmp_path: Path) -> None:
    traces = []
    for name, nudge_at in (("a", None), ("b", 20)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
        w = TraceWriter(tmp_path / f"{name}.jsonl", "test")
        for step in range(1, 31):
            if step == nudge_at:
                with torch.no_grad():
                    model[1].bias.add_(1e-6)
            w.step(1, 0.5, model)
        assert w.close()["steps"] == 30
        traces.append(parse_trace((tmp_path / f"{name}.jsonl").read_text(), name))
    d = diverge(*traces, METRICS, METRICS)
    assert d.parts_at["step"] == 20 and d.loss_differs_at is None
    first_checkpoint = next(s for s in range(20, 31) if is_checkpoint(s))
    assert d.first_tensor == {"name": "1.bias", "at_step": first_checkpoint}
    assert 30 in traces[0].tensors  # the last step always carries per-tensor digests


def test_parts_at_column_against_the_baseline() -> None:
    base = parse_trace(_trace(["0x1p+0"] * 3, [_d("a")] * 3, {}), "a")
    moved = parse_trace(_trace(["0x1p+0", "0x1p+1", "0x1p+1"], [_d("a"), _d("b"), _d("b")], {}), "b")
    col = parts_at_column({"a": base, "b": moved, "c": base, "d": None, "e": "unreadable trace"}, list("abcde"))
    assert col == {"a": "baseline", "b": "ep 1 step 2 (loss)", "c": "never", "d": "—", "e": "unreadable trace"}
    assert parts_at_column({"a": None, "b": moved}, ["a", "b"]) == {}  # no baseline trace: no column


def test_checkpoints_stay_logarithmic() -> None:
    assert [s for s in range(1, 60) if is_checkpoint(s)][:20] == list(range(1, 17)) + [18, 20, 22, 24]
    assert sum(map(is_checkpoint, range(1, 100_001))) < 16 * 14


def test_the_writer_stops_at_its_bound(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 1)
    w = TraceWriter(tmp_path / "t.jsonl", "test", max_bytes=2000)
    for _ in range(100):
        w.step(1, 0.25, model)
    info = w.close()
    assert info["truncated"] is True and (tmp_path / "t.jsonl").stat().st_size <= 2000
    t = parse_trace((tmp_path / "t.jsonl").read_text(), "t")
    assert t.truncated and 0 < len(t.steps) < 100


# --------------------------------------------------------------------------- hostile traces


@pytest.mark.parametrize("text,match", [
    ("", "empty"),
    ('{"schema": "harness.trace/9"}\n', "not a harness trace header"),
    (_header() + "\n[1, 2]\n", "not one JSON object"),
    (_header() + "\n" + "[" * 100000 + "\n", "not one JSON object"),
    (_header() + '\n{"epoch": 1, "step": 2, "loss": "0x1p+0", "state": "' + "a" * 32 + '"}\n', "step line"),
    (_header() + '\n{"epoch": 1, "step": 1, "loss": "lots", "state": "' + "a" * 32 + '"}\n', "step line"),
    (_header() + '\n{"epoch": 1, "step": 1, "loss": "0x1p+0", "state": "../x"}\n', "step line"),
    (_header() + '\n{"tensors_at": 1, "tensors": {}}\n', "per-tensor line"),
    (_header() + '\n{"epoch": 1, "step": 1, "loss": "0x1p+0", "state": "' + "a" * 32 + '", "x": 1}\n', "unexpected keys"),
])
def test_malformed_traces_are_one_line_refusals(text: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        parse_trace(text, "trace.jsonl")


def _cell(root: Path, name: str, trace: str | None) -> Path:
    cell = root / name
    cell.mkdir(parents=True)
    rec = {"schema": "harness.result/2", "cell": name, "status": "ok", "metrics": {"retrained": METRICS}}
    (cell / "record.json").write_text(json.dumps(rec))
    if trace is not None:
        (cell / "trace.jsonl").write_text(trace)
    return cell


def test_cli_refuses_a_missing_an_oversized_and_a_linked_trace(tmp_path: Path) -> None:
    good = _cell(tmp_path, "good", _trace(["0x1p+0"], [_d("a")], {}))
    bare = _cell(tmp_path, "bare", None)
    p = harness("diverge", str(good), str(bare))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and f"B {bare}" in p.stderr and "--trace" in p.stderr
    big = _cell(tmp_path, "big", None)
    with open(big / "trace.jsonl", "wb") as fh:
        fh.truncate(TRACE_MAX_BYTES + 1)  # sparse: refused by its size before it is read
    p = harness("diverge", str(big), str(good))
    assert p.returncode == 2 and "bytes" in p.stderr and "Traceback" not in p.stderr
    linked = _cell(tmp_path, "linked", None)
    (linked / "trace.jsonl").symlink_to(good / "trace.jsonl")
    p = harness("diverge", str(good), str(linked / "record.json"))
    assert p.returncode == 2 and "symbolic link" in p.stderr


def test_cli_never_part_exits_0_and_writes_json(tmp_path: Path) -> None:
    text = _trace(["0x1p+0"] * 2, [_d("a")] * 2, {})
    a, b = _cell(tmp_path, "a", text), _cell(tmp_path, "b", text)
    p = harness("diverge", str(a), str(b), "--json", str(tmp_path / "d.json"))
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "d.json").read_text())["parting"] == "never part"


# --------------------------------------------------------------------------- real runs


def _trace_lines(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines()[1:]]


def _first_loss_difference(a: Path, b: Path) -> int | None:
    def losses(p: Path) -> list[str]:
        return [row["loss"] for row in _trace_lines(p) if "loss" in row]

    return next((i for i, (x, y) in enumerate(zip(losses(a), losses(b)), 1) if x != y), None)


def _tensors_at(p: Path, step: int) -> dict[str, str]:
    return next(row["tensors"] for row in _trace_lines(p) if row.get("tensors_at") == step)


def _diverge_names_where_the_loss_bits_part(a: Path, b: Path, tmp_path: Path) -> dict:
    """``harness diverge A B`` against what the two trace files say, read here independently."""
    p = harness("diverge", str(a), str(b), "--json", str(tmp_path / "d.json"))
    assert p.returncode == 3, p.stdout + p.stderr
    d = json.loads((tmp_path / "d.json").read_text())
    step = _first_loss_difference(a / "trace.jsonl", b / "trace.jsonl")
    assert step is not None and d["loss_differs_at"]["step"] == step
    assert f"step {step}:" in p.stdout
    assert d["parts_at"]["step"] <= step  # parameters may part first: the loss shows it a step or more later
    at, name = d["first_tensor"]["at_step"], d["first_tensor"]["name"]
    ta, tb = _tensors_at(a / "trace.jsonl", at), _tensors_at(b / "trace.jsonl", at)
    assert ta[name] != tb[name]  # the tensor named does differ at the checkpoint named
    assert name == min(k for k in ta if ta[k] != tb.get(k))  # and is the first that does, by name
    assert f"first differing tensor: {name}" in p.stdout
    return d


@pytest.mark.skipif("avx512" not in read_host_levels(), reason="needs an AVX-512 host: there native and baseline "
                    "ISA part (test_diverge_on_an_ulp_band_member... covers other hosts)")
def test_diverge_on_two_isa_cells_of_the_example_names_where_the_loss_bits_part(tmp_path: Path) -> None:
    out = tmp_path / "r"
    p = harness("matrix", str(EXAMPLE), "--backend", "local", "--isa", "native,baseline", "--threads", "1",
                "--determinism", "strict", "--trace", "--out", str(out), "--no-progress", "--detail")
    assert p.returncode == 0, p.stdout + p.stderr
    a, b = out / "cpu-strict-t1-native", out / "cpu-strict-t1-baseline"
    assert json.loads((a / "record.json").read_text())["trace"]["steps"] > 0
    assert "parts at" in p.stdout  # the matrix's Results table: where each cell parts from the baseline
    first = harness("compare", str(out))  # the first screen says it in a line per cell that parts
    assert "↳ cpu-strict-t1-baseline parts from cpu-strict-t1-native at" in " ".join(first.stdout.split()), first.stdout
    _diverge_names_where_the_loss_bits_part(a, b, tmp_path)


def test_diverge_on_an_ulp_band_member_of_the_example_names_where_the_loss_bits_part(tmp_path: Path) -> None:
    """Real divergence on any CPU: the band's member moves one initial weight by one ulp.

    (On this project's AVX-512 build host, 1 and 2 threads do not part for this example:
    the thread axis is no divergence source a test can count on.)
    """
    out = tmp_path / "r"
    p = harness("run", str(EXAMPLE), "--device", "cpu", "--threads", "1", "--band", "2", "--trace",
                "--out", str(out), "--no-progress")
    assert p.returncode in (0, 3), p.stdout + p.stderr
    cells = {(json.loads((c / "record.json").read_text()).get("band") or {}).get("member", 0): c
             for c in out.rglob("*") if (c / "record.json").is_file()}
    assert len(cells) == 3, cells
    base, member = cells[0], cells[min(k for k in cells if k)]
    assert json.loads((member / "record.json").read_text())["perturbation"]["applied"]
    _diverge_names_where_the_loss_bits_part(base, member, tmp_path)


def test_a_custom_trainer_is_traced_with_or_without_ctx_on_step(make_bundle, tmp_path: Path) -> None:
    cells = {}
    for hook in (True, False):
        root = make_bundle(f"custom-{hook}")
        cfg = yaml.safe_load((root / "config.yaml").read_text())
        cfg["trainer"] = {"entrypoint": "seed_style:train", "code_dir": str(TRAINERS)}
        cfg["trace_hook"] = hook
        (root / "config.yaml").write_text(yaml.safe_dump(cfg))
        out = tmp_path / f"o-{hook}"
        p = harness("run", str(root), "--device", "cpu", "--threads", "1", "--trace", "--out", str(out),
                    "--no-progress")
        assert p.returncode == 0, p.stdout + p.stderr
        (cell,) = [c for c in out.iterdir() if (c / "record.json").is_file()]
        rec = json.loads((cell / "record.json").read_text())
        cells[hook] = (cell, parse_trace((cell / "trace.jsonl").read_text(), "t"), rec)
    (_, explicit, rec_e), (unedited, hooked, rec_h) = cells[True], cells[False]
    assert explicit.source == "ctx.on_step" and explicit.steps[-1].epoch == 2
    assert hooked.source == "hooks" and len(hooked.steps) == rec_h["trace"]["steps"] == rec_e["trace"]["steps"] > 0
    # the same training, seen from inside (ctx.on_step) and from torch's hooks: the same bits at every step
    assert [(s.loss, s.state) for s in explicit.steps] == [(s.loss, s.state) for s in hooked.steps]
    p = harness("diverge", str(cells[True][0]), str(unedited))
    assert p.returncode == 0 and "never part" in p.stdout, p.stdout + p.stderr


def test_a_trainer_whose_optimizer_the_hooks_cannot_see_says_why_it_has_no_trace(make_bundle,
                                                                                  tmp_path: Path) -> None:
    root = make_bundle("bare")
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg["trainer"] = {"entrypoint": "seed_style:train", "code_dir": str(TRAINERS)}
    cfg["hand_written_update"] = True
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "o"
    p = harness("run", str(root), "--device", "cpu", "--threads", "1", "--trace", "--out", str(out), "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    (cell,) = [c for c in out.iterdir() if (c / "record.json").is_file()]
    rec = json.loads((cell / "record.json").read_text())
    assert not (cell / "trace.jsonl").exists()
    assert rec["trace"].get("file") is None and "no torch.optim optimizer step" in rec["trace"]["why"]
    assert "no trace for" in p.stdout  # the report says it too
    p = harness("diverge", str(cell), str(cell))
    assert p.returncode == 2 and "no torch.optim optimizer step" in p.stderr


# --------------------------------------------------------------------------- a hostile trace costs its first bad line


def test_a_large_trace_of_empty_objects_is_refused_at_its_first_line_in_bounded_memory(tmp_path: Path) -> None:
    import resource

    from tests.conftest import patience

    good = _cell(tmp_path, "good", _trace(["0x1p+0"], [_d("a")], {}))
    bad = _cell(tmp_path, "bad", None)
    with open(bad / "trace.jsonl", "w") as fh:  # a header, then 63 MiB of "{}" lines: under TRACE_MAX_BYTES
        fh.write(_header() + "\n")
        for _ in range(21):
            fh.write("{}\n" * (1 << 20))
    size = (bad / "trace.jsonl").stat().st_size
    assert 60 << 20 < size < TRACE_MAX_BYTES

    def limit() -> None:  # a reader that held the file whole would fail here, not take the machine
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    # the peak resident memory of this process alone (VmHWM; ru_maxrss would include the parent's at fork)
    code = ("import sys; from harness.cli import main; rc = main(sys.argv[1:]); "
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, "diverge", str(bad), str(good)], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=patience(30), preexec_fn=limit)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and f"{bad / 'trace.jsonl'}:2: has unexpected keys none" in p.stderr, p.stderr
    peak = int(p.stdout.split()[-1]) * 1024
    assert peak < size, f"peak {peak >> 20} MiB for a {size >> 20} MiB trace: it was held whole"


def test_trace_lines_are_bounded_in_size_and_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harness import diverge as dv

    path = tmp_path / "trace.jsonl"
    path.write_text(_header() + "\n" + '{"x": "' + "a" * dv.MAX_LINE_BYTES + '"}\n')
    with pytest.raises(InputError, match=rf"trace.jsonl:2: is longer than {dv.MAX_LINE_BYTES} bytes"):
        dv.read_trace(path)
    steps = 5
    path.write_text(_trace(["0x1p+0"] * steps, [_d("a")] * steps, {}))
    assert len(dv.read_trace(path).steps) == steps
    monkeypatch.setattr(dv, "MAX_LINES", steps)  # the header and steps - 1 step lines
    with pytest.raises(InputError, match=rf"trace.jsonl:{steps + 1}: is beyond the {steps} lines"):
        dv.read_trace(path)
    with pytest.raises(InputError, match=rf":{steps + 1}: is beyond the {steps} lines"):
        dv.parse_trace(path.read_text(), "t")
