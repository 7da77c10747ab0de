"""Process-wide PyTorch hooks: the ulp perturbation and the trace of a trainer that knows nothing of harness.

A band member and ``--trace`` need two things from a training run: one initial weight
moved by one ulp before training, and the loss bits and parameter digests after every
optimizer step. A trainer may do both itself (``ctx.perturb(model)``, ``ctx.on_step(model,
loss)``); one that does not is reached through PyTorch's own process-wide hooks, which
see every ``nn.Module`` and every ``torch.optim.Optimizer`` of the process:

* ``torch.nn.modules.module.register_module_forward_pre_hook``: the first forward of a
  module that holds trainable parameters names *the model* (the outermost module called,
  e.g. a ``torch.compile`` wrapper or a GAN's generator); the perturbation is applied to
  it there, once, before that forward reads its parameters, and the hook removes itself
  before the forward runs (so ``torch.compile`` never traces it). A lazy module
  (``nn.LazyLinear``) is perturbed right after the forward that materialises its parameters.
* ``torch.optim.optimizer.register_optimizer_step_pre_hook``: the first step of each
  optimizer confirms that the perturbed parameter is one the optimizer updates; under
  ``--trace`` it also finds the models an optimizer trains that are not the first one (a
  GAN's discriminator: the outermost modules holding its parameters).
* ``torch.optim.optimizer.register_optimizer_step_post_hook``: after every step the trace
  gets one line (loss bits, digest of every model's state; per-tensor digests on the
  checkpoint scheme of :mod:`harness.worker.trace`).
* ``torch.autograd.backward`` (which ``Tensor.backward`` calls) is wrapped while tracing:
  the last scalar it was called on is the step's loss.

Which value is perturbed is drawn as :func:`harness.worker.perturb.choose` draws it, among
the model's floating-point parameters that require grad and that an existing optimizer
holds (all that require grad when no optimizer exists yet): on the reference trainer the
hooks perturb the value ``ctx.perturb`` would, and trace the steps ``ctx.on_step`` would.
The existing optimizers are those built since ``install()`` (``torch.optim.Optimizer.__init__``
is wrapped while a perturbation is pending: no search); only when none of those holds the
model's parameters (none built yet, or one built before install) are the garbage collector's
objects scanned, once.
The first step of the optimizer that holds the perturbed parameter also checks that the
perturbed value is still there: one restored or re-initialised in between (a dry-run forward,
then ``load_state_dict``) leaves the member out, with the reason.

Nothing is installed unless a run asks for it, and what is installed removes itself when
its work is done: the perturbation's hooks after the first step, the trace's at the end.

Self-contained on purpose: it imports only the standard library, torch and its two
siblings, so the worker copies the three files beside a command's ``sitecustomize``.
"""

from __future__ import annotations

import gc
import math
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable

from .perturb import Perturber
from .trace import TRACE_FILE, TraceWriter, no_trace


_COMPILE_WARNING = r"Using `torch\.compile\(module\)` when there are global hooks"


def _trainable(module: Any) -> list[tuple[str, Any]]:
    """The floating-point parameters of ``module`` that require grad, materialised, in the module's order."""
    from torch.nn.parameter import is_lazy

    return [(n, p) for n, p in module.named_parameters()
            if p.requires_grad and not is_lazy(p) and p.is_floating_point() and p.numel()]


def _has_lazy(module: Any) -> bool:
    from torch.nn.parameter import is_lazy

    return any(is_lazy(p) for p in module.parameters())


def _optimizers() -> list[Any]:
    """Every ``torch.optim.Optimizer`` alive in the process (one scan of the garbage collector's objects).

    ``type(o)``, not ``isinstance``: the latter asks some objects for their ``__class__``, which can run code.
    """
    import torch

    base = torch.optim.Optimizer
    return [o for o in gc.get_objects() if issubclass(type(o), base)]


OVERWRITTEN = "overwritten before the first optimizer step (e.g. load_state_dict after a first forward)"


def _still_perturbed(param: Any, done: dict[str, Any]) -> bool:
    """Whether ``param`` still holds, at the recorded index, the value the perturbation wrote (bit for bit)."""
    from .perturb import _unravel

    try:
        where = tuple(_unravel(int(done["index"]), tuple(param.shape)))
        return float(param.detach()[where]).hex() == done["new"]
    except (KeyError, IndexError, RuntimeError, TypeError, ValueError):  # reshaped or resized since: not the same value
        return False


def _held(optimizer: Any) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


def _loss_value(loss: Any) -> float:
    if loss is None:
        return math.nan
    try:
        return float(loss.float().item())
    except (RuntimeError, ValueError):
        return math.nan


class TorchHooks:
    """The hooks one run asked for: ``perturber`` (a band member) and/or ``trace`` (``--trace``).

    ``install()`` registers them; ``close()`` removes whatever is left and returns the
    record's account: ``{"perturbation": ..., "trace": ...}``. ``yield_trace()`` hands the
    trace over to a trainer that calls ``ctx.on_step`` itself (the hooks' lines are dropped).
    """

    def __init__(self, *, perturber: Perturber | None = None, trace: Path | None = None,
                 trace_exclusive: bool = False) -> None:
        self.perturber = perturber if perturber is not None and perturber.request is not None else None
        self.trace_path = trace
        self.trace_exclusive = trace_exclusive  # a command's processes: the first to step writes the trace
        self.tracer: TraceWriter | None = None
        self.trace_note: str | None = None  # why there is no trace, when there is none
        self.roots: list[Any] = []  # the models: outermost modules holding trainable parameters, in call order
        # weakly: an id could be a dead module's, handed to a new one (a model built after a throwaway module)
        self._empty: weakref.WeakSet[Any] = weakref.WeakSet()  # modules seen without trainable parameters
        self._adopted: set[int] = set()  # optimizers whose models were looked for
        self._handles: dict[str, Any] = {}
        self._backward: Callable[..., Any] | None = None
        self._loss: Any = None
        self._verified: set[int] = set()  # optimizers whose first step was checked
        self.updated: bool | None = None  # whether an optimizer updates the perturbed parameter
        self.overwritten: bool = False  # the perturbed value was gone at that optimizer's first step
        # the optimizers built since install (torch.optim.Optimizer.__init__ wrapped until the perturbation is done)
        self._built: weakref.WeakSet[Any] = weakref.WeakSet()
        self._init: tuple[Callable[..., Any], Callable[..., Any]] | None = None  # (torch's __init__, the wrapper)
        self.scanned = False  # whether the garbage collector's objects were scanned for an optimizer

    # ---------------------------------------------------------------- installing

    @property
    def wanted(self) -> bool:
        return self.perturber is not None or self.trace_path is not None

    def install(self) -> "TorchHooks":
        import torch
        from torch.nn.modules.module import register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        if not self.wanted:
            return self
        # torch.compile warns that a global module hook fires for its wrapper too: these hooks expect that
        # (the filter stays: it hides nothing once no global module hook is left)
        warnings.filterwarnings("ignore", message=_COMPILE_WARNING, category=UserWarning)
        self._handles["forward"] = register_module_forward_pre_hook(self._on_forward)
        if self.perturber is not None and self.perturber.outcome is None:
            self._watch_optimizers()
        self._handles["step_pre"] = register_optimizer_step_pre_hook(self._on_step_pre)
        if self.trace_path is not None:
            if not self.trace_exclusive:
                self.tracer = TraceWriter(self.trace_path, "hooks")
            self._handles["step_post"] = register_optimizer_step_post_hook(self._on_step_post)
            self._backward = torch.autograd.backward
            torch.autograd.backward = self._on_backward  # Tensor.backward calls it by this name
        return self

    def _watch_optimizers(self) -> None:
        """Note every ``torch.optim.Optimizer`` built from now on (weakly), by wrapping the base class's ``__init__``.

        Every optimizer of ``torch.optim``, and any subclass that calls ``super().__init__``, runs it.
        """
        import functools

        import torch

        base = torch.optim.Optimizer
        original = base.__dict__["__init__"]
        built = self._built

        @functools.wraps(original)
        def __init__(optimizer: Any, *args: Any, **kwargs: Any) -> None:
            original(optimizer, *args, **kwargs)
            try:
                built.add(optimizer)
            except TypeError:  # pragma: no cover - a subclass with __slots__ and no __weakref__: the scan finds it
                pass

        base.__init__ = __init__
        self._init = (original, __init__)

    def _unwatch_optimizers(self) -> None:
        if self._init is None:
            return
        import torch

        original, wrapper = self._init
        if torch.optim.Optimizer.__dict__.get("__init__") is wrapper:  # another wrapper on top: leave it be
            torch.optim.Optimizer.__init__ = original
        self._init = None

    def _holders(self, params: list[tuple[str, Any]]) -> list[Any]:
        """The optimizers alive now that hold any of ``params``: among those seen being built since install; when
        none of them does (none built yet, or one built before install), one scan of the process's objects."""
        ids = {id(p) for _, p in params}
        seen = [o for o in list(self._built) if _held(o) & ids]
        if seen:
            return seen
        self.scanned = True
        return [o for o in _optimizers() if _held(o) & ids]

    def _drop(self, name: str) -> None:
        handle = self._handles.pop(name, None)
        if handle is not None:
            handle.remove()

    def remove(self) -> None:
        """Unregister every hook still installed (safe to call twice)."""
        for name in list(self._handles):
            self._drop(name)
        self._unwatch_optimizers()
        if self._backward is not None:
            import torch

            if torch.autograd.backward == self._on_backward:  # bound methods: equal, never identical
                torch.autograd.backward = self._backward
            self._backward = None

    # ---------------------------------------------------------------- the model, and its perturbation

    def _on_forward(self, module: Any, _args: Any) -> None:
        """Until the model is found: is this it? Then perturb it (when asked) and leave.

        The hook is gone before the model's own forward runs: ``torch.compile`` never traces it.
        """
        if self.roots or module in self._empty:
            return
        if not _trainable(module) and not _has_lazy(module):
            self._empty.add(module)  # a frozen teacher, a loss module: not the model
            return
        self.roots.append(module)
        self._drop("forward")
        if self.perturber is None or self.perturber.outcome is not None:
            return
        if _has_lazy(module):
            from torch.nn.modules.module import register_module_forward_hook

            def after(m: Any, _a: Any, _out: Any) -> None:
                if m is module:
                    self._drop("lazy")
                    self._perturb(module, "after the forward that materialised its lazy parameters")

            self._handles["lazy"] = register_module_forward_hook(after)
            return
        self._perturb(module, "before its first forward")

    def _perturb(self, module: Any, when: str) -> None:
        assert self.perturber is not None
        params = _trainable(module)
        holders = self._holders(params)
        self._unwatch_optimizers()  # the last question the optimizers built answer
        if holders:
            held = set().union(*(_held(o) for o in holders))
            params = [(n, p) for n, p in params if id(p) in held]
        self.perturber(module, params=params,
                       via=f"a forward pre-hook on {type(module).__qualname__}, {when}"
                           + ("" if holders else "; no optimizer existed yet: chosen among the parameters "
                                                 "that require grad"))

    def _adopt(self, optimizer: Any) -> None:
        """At an optimizer's first step: the models it trains that no forward named yet (a GAN's second model)."""
        mine = {id(p) for r in self.roots for p in r.parameters()}
        rest = _held(optimizer) - mine
        if not rest:
            return
        import torch

        found = [m for m in gc.get_objects() if issubclass(type(m), torch.nn.Module)]
        held = [m for m in found if (ids := {id(p) for p in m.parameters()}) & rest and not ids & mine]
        inner = {id(sub) for m in held for sub in m.modules() if sub is not m}
        outer = [m for m in held if id(m) not in inner]  # the outermost: a compile wrapper, not what it wraps
        order = {pid: i for i, pid in enumerate(id(p) for g in optimizer.param_groups for p in g["params"])}
        outer.sort(key=lambda m: min((order.get(id(p), len(order)) for p in m.parameters()), default=len(order)))
        self.roots.extend(outer)

    def _on_step_pre(self, optimizer: Any, _args: Any, _kwargs: Any) -> None:
        self._drop("forward")  # the first step: a model not called by now was not found before training
        self._unwatch_optimizers()
        if self.trace_path is not None and id(optimizer) not in self._adopted:
            self._adopted.add(id(optimizer))
            self._adopt(optimizer)
        if self.perturber is None:
            if self.trace_path is None:
                self._drop("step_pre")
            return
        param = self.perturber.param
        if param is None:  # nothing perturbed before the first step: too late now
            if self.perturber.outcome is None:
                self.perturber.skip("no module holding trainable parameters was called before the first optimizer "
                                    "step (call ctx.perturb(model) after building the model)")
            return
        if id(optimizer) in self._verified or self.updated:
            return
        self._verified.add(id(optimizer))
        if any(p is param for g in optimizer.param_groups for p in g["params"]):
            self.updated = True
            done = self.perturber.outcome or {}
            self.overwritten = bool(done.get("applied")) and not _still_perturbed(param, done)
            if self.trace_path is None:
                self._drop("step_pre")

    # ---------------------------------------------------------------- the trace

    def _on_backward(self, tensors: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        if isinstance(tensors, torch.Tensor) and tensors.numel() == 1:
            self._loss = tensors.detach()
        assert self._backward is not None
        return self._backward(tensors, *args, **kwargs)

    def _models(self, optimizer: Any) -> Any:
        """What the step digests: the one model, the models under ``0.``/``1.``..., or the optimizer's own parameters."""
        roots = self.roots
        if len(roots) == 1:
            return roots[0]
        if roots:
            return _Several(roots)
        return _Several([_Params(optimizer)])

    def _on_step_post(self, optimizer: Any, _args: Any, _kwargs: Any) -> None:
        if self.tracer is None:
            if not self.trace_exclusive or self.trace_note is not None or self.trace_path is None:
                return
            try:
                self.tracer = TraceWriter(self.trace_path, "hooks", exclusive=True)
            except FileExistsError:
                self.trace_note = "another Python process of the command wrote the trace"
                self._drop("step_post")
                return
        self.tracer.step(None, _loss_value(self._loss), self._models(optimizer))
        self._loss = None

    def yield_trace(self) -> None:
        """The trainer traces itself (``ctx.on_step``): drop the hooks' trace and stop tracing."""
        self._drop("step_post")
        if self.tracer is not None:
            self.tracer.close()
            self.tracer = None
        self.trace_path = None

    # ---------------------------------------------------------------- the end

    def close(self) -> dict[str, Any]:
        """Remove every hook; the record's ``perturbation`` and ``trace`` (None where not asked for)."""
        self.remove()
        out: dict[str, Any] = {"perturbation": None, "trace": None}
        if self.perturber is not None:
            p = self.perturber.record("no module holding trainable parameters was ever called (is the training in "
                                      "this process, with torch.nn modules?)")
            if p is not None and p.get("applied") and self.perturber.param is not None and self._verified:
                p = {**p, "updated": bool(self.updated)}
                if not self.updated:
                    p = {**p, "applied": False,
                         "skipped": f"the perturbed parameter {p.get('tensor')} is not one any optimizer updates"}
                elif self.overwritten:
                    p = {**p, "applied": False,
                         "skipped": f"the perturbed value {p.get('tensor')}[{p.get('index')}] was {OVERWRITTEN}"}
            out["perturbation"] = p
        if self.tracer is not None:
            out["trace"] = self.tracer.close()
            self.tracer = None
        elif self.trace_note is not None:
            out["trace"] = no_trace(self.trace_note)
        return out


class _Params:
    """An optimizer's parameters as a state to digest, named by position (no module was seen)."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return {f"param_groups.{g}.{i}": p for g, group in enumerate(self.optimizer.param_groups)
                for i, p in enumerate(group["params"])}


class _Several:
    """Several models as one state: each one's tensors under its index (``0.``, ``1.``, ...)."""

    def __init__(self, models: list[Any]) -> None:
        self.models = models

    def state_dict(self) -> dict[str, Any]:
        return {f"{i}.{k}": v for i, m in enumerate(self.models) for k, v in m.state_dict().items()}


__all__ = ["TorchHooks", "TRACE_FILE"]
