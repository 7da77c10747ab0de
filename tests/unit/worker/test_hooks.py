"""PyTorch's process-wide hooks (harness.worker.hooks): the ulp perturbation and the trace of a trainer
that never heard of ctx, checked against the explicit ctx.perturb / ctx.on_step on the same training."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from harness.bundle import ModelSpec, TrainingSpec
from harness.diverge import parse_trace
from harness.worker import hooks as hooks_mod
from harness.worker.data import Dataset
from harness.worker.perturb import Perturber
from harness.worker.trace import TraceWriter
from harness.worker.train import split_indices, train_reference

from tests.conftest import REPO, patience


def _installed() -> tuple[int, int, int, bool, object]:
    """How many process-wide hooks are registered now, whether autograd.backward is torch's own, and
    torch.optim.Optimizer's own __init__ (the hooks wrap it while a perturbation is pending)."""
    from torch.nn.modules import module
    from torch.optim import optimizer

    return (len(module._global_forward_pre_hooks), len(optimizer._global_optimizer_pre_hooks),
            len(optimizer._global_optimizer_post_hooks), torch.autograd.backward.__module__ == "torch.autograd",
            torch.optim.Optimizer.__dict__["__init__"])


CLEAN = _installed()


@pytest.fixture(autouse=True)
def _no_hook_left_behind():
    yield
    assert _installed() == CLEAN


def _data(n: int = 96) -> Dataset:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 3, 8)).astype(np.float32)
    y = np.stack([X[:, 0].mean(1), X[:, 1].std(1)], 1).astype(np.float32)
    return Dataset(X=X, y=y, target_names=["a", "b"], channel_names=["c0", "c1", "c2"], raw_shape=X.shape)


SPEC = TrainingSpec(seed=7, batch_size=16, epochs=2, learning_rate=1e-2)


def _train(tmp: Path, name: str, *, perturber=None, hooks=None, trace_on_step: bool = False) -> tuple[dict, Path]:
    data = _data()
    split = split_indices(len(data.X), (0.7, 0.15, 0.15), SPEC.seed)
    trace = tmp / f"{name}.jsonl"
    writer = TraceWriter(trace, "ctx.on_step") if trace_on_step else None
    on_step = (lambda e, s, loss, m: writer.step(None, loss, m)) if writer else None
    if hooks is not None:
        hooks.install()
    try:
        _, out = train_reference(data, split, data.y, ModelSpec(name="conv1d", hidden=8, num_layers=2), SPEC,
                                 torch.device("cpu"), perturb=perturber, on_step=on_step, data_path="loader")
    finally:
        got = hooks.close() if hooks is not None else None
        if writer is not None:
            writer.close()
    return {"state": out.last_state, "hooks": got}, trace


def read_trace(path: Path, where: str):
    return parse_trace(path.read_text(encoding="utf-8"), where)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_hooks_perturb_what_ctx_perturb_does_on_the_reference_trainer(tmp_path: Path) -> None:
    for seed in (1, 2, 3):
        explicit = Perturber({"kind": "ulp", "seed": seed})
        a, _ = _train(tmp_path, "a", perturber=explicit)
        hooked = Perturber({"kind": "ulp", "seed": seed})
        b, _ = _train(tmp_path, "b", hooks=hooks_mod.TorchHooks(perturber=hooked))
        done = b["hooks"]["perturbation"]
        assert done["applied"] is True and done["updated"] is True and "forward pre-hook" in done["via"]
        keys = ("tensor", "index", "direction", "old", "new")
        assert {k: done[k] for k in keys} == {k: explicit.outcome[k] for k in keys}
        assert _same_state(a["state"], b["state"])  # the same one-ulp change, so the same training, bit for bit
    plain, _ = _train(tmp_path, "plain")
    assert not _same_state(plain["state"], a["state"])  # and the change did change the training


def test_a_trace_through_the_hooks_equals_the_one_through_on_step(tmp_path: Path) -> None:
    _, explicit = _train(tmp_path, "explicit", trace_on_step=True)
    got, hooked = _train(tmp_path, "hooked", hooks=hooks_mod.TorchHooks(trace=tmp_path / "hooked.jsonl"))
    assert got["hooks"]["trace"]["steps"] > 0
    a, b = read_trace(explicit, "a"), read_trace(hooked, "b")
    assert b.source == "hooks" and len(a.steps) == len(b.steps) == got["hooks"]["trace"]["steps"]
    assert [(s.step, s.loss, s.state) for s in a.steps] == [(s.step, s.loss, s.state) for s in b.steps]
    assert a.tensors == b.tensors


def test_no_hook_is_installed_when_none_is_asked_for() -> None:
    hooks = hooks_mod.TorchHooks(perturber=Perturber(None)).install()
    assert not hooks.wanted and _installed() == CLEAN
    assert hooks.close() == {"perturbation": None, "trace": None}


def _loop(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3, accumulate: int = 1) -> None:
    torch.manual_seed(0)
    for _ in range(steps):
        for _ in range(accumulate):
            loss = model(torch.randn(4, 6)).pow(2).mean() / accumulate
            loss.backward()
        opt.step()
        opt.zero_grad()


def test_a_frozen_submodule_is_never_perturbed() -> None:
    for seed in range(20):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 1))
        model[0].requires_grad_(False)  # a frozen feature extractor
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        hooks = hooks_mod.TorchHooks(perturber=Perturber({"kind": "ulp", "seed": seed})).install()
        _loop(model, opt)
        done = hooks.close()["perturbation"]
        assert done["applied"] and done["tensor"].startswith("1.") and done["updated"] is True


def test_a_frozen_layer_is_not_drawn_from_when_the_model_runs_before_its_optimizer_exists() -> None:
    for seed in range(8):  # no optimizer to ask yet: requires_grad alone keeps the frozen layer out
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 1))
        model[0].requires_grad_(False)
        hooks = hooks_mod.TorchHooks(perturber=Perturber({"kind": "ulp", "seed": seed})).install()
        model(torch.randn(2, 6))  # a dry run before the optimizer is built
        opt = torch.optim.SGD(model.parameters(), lr=0.1)  # it holds the frozen layer too, which it never moves
        _loop(model, opt)
        done = hooks.close()["perturbation"]
        assert done["applied"] is True and done["tensor"].startswith("1."), (seed, done)
        assert "no optimizer existed yet" in done["via"]


def test_a_frozen_teacher_called_first_is_not_the_model_the_student_is() -> None:
    for seed in range(5):
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1)).requires_grad_(False)
        student = nn.Linear(6, 1)
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        hooks = hooks_mod.TorchHooks(perturber=Perturber({"kind": "ulp", "seed": seed})).install()
        for _ in range(3):  # distillation: the teacher's forward comes first in every step
            x = torch.randn(4, 6)
            with torch.no_grad():
                target = teacher(x)
            (student(x) - target).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        done = hooks.close()["perturbation"]
        assert hooks.roots == [student]
        assert (done["applied"], done["module"], done["updated"]) == (True, "Linear", True)
        assert done["tensor"] in {"weight", "bias"}  # the student's names; the teacher's are 0.weight, 2.bias ...


def test_a_perturbation_overwritten_before_the_first_step_leaves_the_member_out_with_the_reason() -> None:
    def restore(model: nn.Module, init: dict) -> None:
        model.load_state_dict(init)

    def reinitialise(model: nn.Module, _init: dict) -> None:
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    for undo in (restore, reinitialise):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
        init = copy.deepcopy(model.state_dict())
        hooks = hooks_mod.TorchHooks(perturber=Perturber({"kind": "ulp", "seed": 3})).install()
        model(torch.randn(2, 6))  # a dry run (a shape check, a summary): the perturbation lands here
        undo(model, init)  # ... and is gone
        _loop(model, torch.optim.SGD(model.parameters(), lr=0.1))
        done = hooks.close()["perturbation"]
        assert done["applied"] is False and done["updated"] is True, undo.__name__
        assert "overwritten before the first optimizer step (e.g. load_state_dict after a first forward)" \
            in done["skipped"] and done["tensor"] in done["skipped"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
    hooks = hooks_mod.TorchHooks(perturber=Perturber({"kind": "ulp", "seed": 3})).install()
    model(torch.randn(2, 6))  # the same dry run, nothing undone: the member counts
    _loop(model, torch.optim.SGD(model.parameters(), lr=0.1))
    done = hooks.close()["perturbation"]
    assert done["applied"] is True and "skipped" not in done


OVERWRITES = '''
import copy

import torch


def train(config):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    init = copy.deepcopy(model.state_dict())
    model(torch.zeros(1, 3))  # checks the shapes
    model.load_state_dict(init)  # starts from the initial weights again
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = model(torch.randn(8, 3)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {"val_loss": loss.item()}
'''


def test_a_trainer_that_overwrites_the_perturbation_gets_a_member_left_out_of_the_band(tmp_path: Path) -> None:
    from tests.unit.worker.test_trainer_api import _run_worker, _worker_bundle

    root, _ = _worker_bundle(tmp_path, {"training": {"seed": 1}}, OVERWRITES)
    rec = _run_worker(root, tmp_path / "o", perturb={"kind": "ulp", "seed": 2})
    assert rec.perturbation.applied is False and "overwritten before the first optimizer step" \
        in rec.perturbation.skipped
    assert any(w.startswith("ulp band member not perturbed: the perturbed value") and "left out of the band" in w
               for w in rec.warnings)


def test_optimizers_built_after_install_are_found_without_scanning_the_process(monkeypatch) -> None:
    scans = []
    scan = hooks_mod._optimizers
    monkeypatch.setattr(hooks_mod, "_optimizers", lambda: scans.append(1) or scan())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 1))
    hooks = hooks_mod.TorchHooks(perturber=Perturber({"kind": "ulp", "seed": 0})).install()
    assert torch.optim.Optimizer.__dict__["__init__"] is not CLEAN[-1]  # watching optimizers being built
    opt = torch.optim.Adam(model[1].parameters(), lr=1e-3)  # only the head is trained
    _loop(model, opt)
    assert torch.optim.Optimizer.__dict__["__init__"] is CLEAN[-1]  # unwrapped once the perturbation was placed
    done = hooks.close()["perturbation"]
    assert (scans, hooks.scanned) == ([], False)
    assert done["applied"] is True and done["tensor"].startswith("1.") and "no optimizer existed" not in done["via"]
    # one built before install is not seen being built: one scan finds it
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 1))
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
    hooks = hooks_mod.TorchHooks(perturber=Perturber({"kind": "ulp", "seed": 0})).install()
    _loop(model, opt)
    done = hooks.close()["perturbation"]
    assert (len(scans), hooks.scanned) == (1, True) and done["tensor"].startswith("1.") and done["applied"] is True


def test_only_what_an_existing_optimizer_updates_is_perturbed() -> None:
    for seed in range(20):
        model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 1))  # everything requires grad ...
        opt = torch.optim.SGD(model[1].parameters(), lr=0.1)  # ... but only the head is trained
        hooks = hooks_mod.TorchHooks(perturber=Perturber({"kind": "ulp", "seed": seed})).install()
        _loop(model, opt)
        assert hooks.close()["perturbation"]["tensor"].startswith("1.")


def test_a_parameter_no_optimizer_updates_is_refused_with_the_reason() -> None:
    hits = 0
    for seed in range(10):
        model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 1))
        hooks = hooks_mod.TorchHooks(perturber=Perturber({"kind": "ulp", "seed": seed})).install()
        model(torch.randn(2, 6))  # a forward before any optimizer exists: chosen among all that require grad
        opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
        _loop(model, opt)
        done = hooks.close()["perturbation"]
        if done["tensor"].startswith("0."):
            hits += 1
            assert done["applied"] is False and "not one any optimizer updates" in done["skipped"]
        else:
            assert done["applied"] is True and done["updated"] is True
    assert hits  # the draw lands on the untrained layer for some seeds


def test_a_lazy_model_is_perturbed_once_its_parameters_exist() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(5), nn.ReLU(), nn.Linear(5, 1))
    hooks = hooks_mod.TorchHooks(perturber=Perturber({"kind": "ulp", "seed": 3})).install()
    model(torch.randn(2, 6))  # the dry run that materialises the lazy layer
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _loop(model, opt)
    done = hooks.close()["perturbation"]
    assert done["applied"] and done["updated"] and "materialised its lazy parameters" in done["via"]


def test_two_models_are_one_perturbation_and_one_trace(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gen, disc = nn.Linear(3, 6), nn.Linear(6, 1)  # a GAN's two models, each with its optimizer
    og, od = torch.optim.Adam(gen.parameters(), 1e-3), torch.optim.Adam(disc.parameters(), 1e-3)
    hooks = hooks_mod.TorchHooks(perturber=Perturber({"kind": "ulp", "seed": 1}),
                                 trace=tmp_path / "t.jsonl").install()
    for _ in range(2):
        fake = gen(torch.randn(4, 3))
        disc(fake.detach()).mean().backward()
        od.step()
        od.zero_grad()
        (-disc(fake).mean()).backward()
        og.step()
        og.zero_grad()
    got = hooks.close()
    assert got["perturbation"]["module"] == "Linear" and got["perturbation"]["updated"] is True
    assert got["trace"]["steps"] == 4  # every optimizer's every step
    trace = read_trace(tmp_path / "t.jsonl", "t")
    assert set(trace.tensors[1]) == {"0.weight", "0.bias", "1.weight", "1.bias"}  # both models, by call order


def test_explicit_ctx_calls_override_the_hooks(tmp_path: Path) -> None:
    from harness.worker.trainer_api import TrainerContext

    perturber = Perturber({"kind": "ulp", "seed": 4})
    hooks = hooks_mod.TorchHooks(perturber=perturber, trace=tmp_path / "trace.jsonl")
    ctx = TrainerContext(config={}, seed=0, device="cpu", bundle_dir=".", data_path="", out_dir=str(tmp_path),
                         _perturber=perturber, _trace_path=str(tmp_path / "trace.jsonl"), _hooks=hooks)
    hooks.install()
    model = nn.Linear(6, 1)
    ctx.perturb(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = model(torch.randn(2, 6)).pow(2).mean()
        loss.backward()
        opt.step()
        ctx.on_step(model, loss)
    got = hooks.close()
    steps = ctx._tracer.close()["steps"]
    assert got["perturbation"]["via"] == "ctx.perturb" and got["perturbation"]["updated"] is True
    trace = read_trace(tmp_path / "trace.jsonl", "t")
    assert trace.source == "ctx.on_step" and steps == len(trace.steps) == 3  # the hooks' first line is gone


def test_gradient_accumulation_traces_optimizer_steps_with_the_last_loss(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(6, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = hooks_mod.TorchHooks(trace=tmp_path / "t.jsonl").install()
    _loop(model, opt, steps=3, accumulate=2)
    assert hooks.close()["trace"]["steps"] == 3
    losses = [json.loads(line).get("loss") for line in (tmp_path / "t.jsonl").read_text().splitlines()[1:]]
    assert all(isinstance(v, str) and v != "nan" for v in losses if v is not None)


def test_an_optimizer_the_hooks_cannot_see_leaves_no_trace_and_says_why(tmp_path: Path) -> None:
    model = nn.Linear(6, 1)
    hooks = hooks_mod.TorchHooks(trace=tmp_path / "t.jsonl").install()
    for _ in range(2):  # a hand-written update: no torch.optim.Optimizer.step
        model(torch.randn(2, 6)).pow(2).mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    assert hooks.close()["trace"]["steps"] == 0
    # what the record says, for a trainer that updates by hand
    from tests.unit.worker.test_trainer_api import _run_worker, _worker_bundle

    root, name = _worker_bundle(tmp_path, {"training": {"seed": 1}}, HAND_WRITTEN)
    rec = _run_worker(root, tmp_path / "o", trace=True)
    assert (rec.trace.steps, rec.trace.file) == (0, None)
    assert rec.trace.why.startswith(f"the trainer {name}:train made no torch.optim optimizer step the hooks could "
                                       "see") and "ctx.on_step(model, loss)" in rec.trace.why
    assert not (tmp_path / "o" / hooks_mod.TRACE_FILE).exists()


HAND_WRITTEN = '''
import torch


def train(config):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    for _ in range(2):
        model(torch.randn(4, 3)).pow(2).mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    return {"val_loss": 0.5}
'''


def test_under_a_grad_scaler_the_traced_loss_is_the_scaled_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(6, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    hooks = hooks_mod.TorchHooks(trace=tmp_path / "t.jsonl").install()
    scaled = []
    for _ in range(2):
        loss = model(torch.randn(4, 6)).pow(2).mean()
        scaled.append(float(loss.detach() * 1024.0).hex())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert hooks.close()["trace"]["steps"] == 2
    assert [s.loss for s in read_trace(tmp_path / "t.jsonl", "t").steps] == scaled


def test_a_backward_bound_before_install_is_not_seen_the_steps_are_traced_with_a_nan_loss(tmp_path: Path) -> None:
    from torch.autograd import backward  # bound here, before the hooks wrap torch.autograd.backward

    torch.manual_seed(0)
    model = nn.Linear(6, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = hooks_mod.TorchHooks(trace=tmp_path / "t.jsonl").install()
    for _ in range(2):
        backward(model(torch.randn(4, 6)).pow(2).mean())
        opt.step()
        opt.zero_grad()
    assert hooks.close()["trace"]["steps"] == 2
    steps = read_trace(tmp_path / "t.jsonl", "t").steps
    assert [s.loss for s in steps] == ["nan", "nan"] and all(s.state for s in steps)


def test_the_hooks_benchmark_runs_and_prints_its_ratios() -> None:
    bench = REPO / "benchmarks" / "bench_hooks.py"
    run = subprocess.run([sys.executable, str(bench), "--epochs", "1", "--rounds", "1"], check=False,
                         capture_output=True, text=True, timeout=patience(120))
    assert run.returncode == 0, run.stderr[-2000:]
    for name, against in (("none", "none"), ("perturb", "none"), ("hooks only", "none"),
                          ("trace hooks", "trace ctx"), ("trace ctx", "none")):
        assert re.search(rf"^  {name} +[0-9.]+ ms +[0-9.]+x {against}$", run.stdout, re.MULTILINE), (name, run.stdout)
    assert "the hooks' perturbation trains the same weights as ctx.perturb: True" in run.stdout
    assert "searched the process for optimizers in 0 of 1 runs" in run.stdout  # it saw the optimizer being built


def test_a_compiled_model_is_perturbed_and_traced(tmp_path: Path) -> None:
    if not hasattr(torch, "compile"):
        pytest.skip("this torch has no torch.compile")
    torch.manual_seed(0)
    model = torch.compile(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 1)), backend="aot_eager")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    hooks = hooks_mod.TorchHooks(perturber=Perturber({"kind": "ulp", "seed": 2}),
                                 trace=tmp_path / "t.jsonl").install()
    _loop(model, opt)
    got = hooks.close()
    assert got["perturbation"]["applied"] and got["perturbation"]["tensor"].startswith("_orig_mod.")
    assert got["trace"]["steps"] == 3
