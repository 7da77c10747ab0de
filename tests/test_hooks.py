"""PyTorch's process-wide hooks (harness.worker.hooks): the ulp perturbation and the trace of a trainer
that never heard of ctx, checked against the explicit ctx.perturb / ctx.on_step on the same training."""

from __future__ import annotations

import json
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


def _installed() -> tuple[int, int, int, bool]:
    """How many process-wide hooks are registered now, and whether autograd.backward is torch's own."""
    from torch.nn.modules import module
    from torch.optim import optimizer

    return (len(module._global_forward_pre_hooks), len(optimizer._global_optimizer_pre_hooks),
            len(optimizer._global_optimizer_post_hooks), torch.autograd.backward.__module__ == "torch.autograd")


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
