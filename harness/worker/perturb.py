"""The one-ulp perturbation of an ulp band member.

Summers & Dinneen (ICML 2021) found that changing one bit of one initial weight
makes training runs spread about as much as any other source of nondeterminism.
An ulp band member is the baseline run with exactly one value of one parameter
tensor moved by exactly one unit in the last place (``torch.nextafter`` towards
+inf or -inf), right after the model is built and seeded and before training.

Which value, and which direction, is drawn from a private ``random.Random(seed)``:
torch's, numpy's and Python's global RNGs are not touched, so everything else the
run draws (dropout masks, shuffling) is exactly what the unperturbed run draws.
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

DIRECTIONS = ("+inf", "-inf")


def choose(sizes: Sequence[tuple[str, int]], seed: int) -> tuple[str, int, str]:
    """``(tensor name, flat index, direction)``: one value drawn uniformly from all of them (pure).

    ``sizes`` lists the floating-point parameters in the model's own order with their
    number of elements; every value has the same chance, whatever tensor holds it.
    """
    total = sum(n for _, n in sizes)
    if total <= 0:
        raise ValueError("no floating-point parameter values to perturb")
    rng = random.Random(seed)
    pick = rng.randrange(total)
    direction = DIRECTIONS[rng.randrange(2)]
    for name, n in sizes:
        if pick < n:
            return name, pick, direction
        pick -= n
    raise AssertionError("unreachable")  # pragma: no cover


def apply(model: Any, request: Mapping[str, Any], params: Sequence[tuple[str, Any]] | None = None,
          via: str = "ctx.perturb") -> dict[str, Any]:
    """Move one parameter value of ``model`` by one ulp, in place; what was done, for the record (:func:`apply_to`)."""
    return apply_to(model, request, params, via)[0]


def apply_to(model: Any, request: Mapping[str, Any], params: Sequence[tuple[str, Any]] | None = None,
             via: str = "ctx.perturb") -> tuple[dict[str, Any], Any]:
    """Move one parameter value of ``model`` by one ulp, in place; what was done (for the record) and the parameter.

    ``request`` is the run spec's ``perturb``: ``{"kind": "ulp", "seed": s}``. ``params``
    are the candidates, ``(name, parameter)`` in the model's order (default: every
    floating-point parameter of the model); ``via`` says who applied it. A model without
    candidates is left as it is and the result says why (the parameter is then None).
    """
    import torch

    seed = int(request["seed"])
    if params is None:
        params = [(name, p) for name, p in model.named_parameters() if p.is_floating_point() and p.numel()]
    params = list(params)
    out: dict[str, Any] = {"kind": "ulp", "seed": seed, "via": via}
    if not params:
        return {**out, "applied": False, "skipped": "the model has no floating-point parameters to perturb"}, None
    name, index, direction = choose([(n, p.numel()) for n, p in params], seed)
    param = dict(params)[name]
    where = tuple(int(i) for i in _unravel(index, tuple(param.shape)))
    with torch.no_grad():
        old = param[where].clone()
        towards = torch.full_like(old, float("inf") if direction == "+inf" else float("-inf"))
        new = torch.nextafter(old, towards)
        if not torch.isfinite(new):  # the largest finite value: one ulp the other way
            direction = DIRECTIONS[1 - DIRECTIONS.index(direction)]
            new = torch.nextafter(old, -towards)
        param[where] = new
    return {**out, "applied": True, "module": type(model).__qualname__, "tensor": name, "index": index,
            "shape": list(param.shape), "dtype": str(param.dtype).removeprefix("torch."), "old": float(old).hex(),
            "new": float(new).hex(), "direction": direction}, param


def _unravel(index: int, shape: tuple[int, ...]) -> list[int]:
    """The multi-index of flat (row-major) ``index`` in ``shape`` (pure; a view may not be contiguous)."""
    out = []
    for dim in reversed(shape):
        out.append(index % dim)
        index //= dim
    return list(reversed(out))


class Perturber:
    """The perturbation one run asked for, applied at most once (a no-op for a run that asked for none).

    Called by the trainer (``ctx.perturb``), by the reference trainer, or by the process-wide
    hooks (:mod:`harness.worker.hooks`), whichever comes first; the others find it done.
    """

    def __init__(self, request: Mapping[str, Any] | None) -> None:
        self.request = dict(request) if request else None
        self.outcome: dict[str, Any] | None = None
        self.param: Any = None  # the parameter moved, once applied

    def __call__(self, model: Any, params: Sequence[tuple[str, Any]] | None = None,
                 via: str = "ctx.perturb") -> dict[str, Any] | None:
        """Apply it to ``model`` (the first call only); what was done, or None when nothing was asked."""
        if self.request is None:
            return None
        if self.outcome is None:
            self.outcome, self.param = apply_to(model, self.request, params, via)
        return self.outcome

    def skip(self, why: str) -> None:
        """It will not be applied in this run, for ``why``."""
        if self.request is not None and self.outcome is None:
            self.outcome = {"kind": self.request.get("kind"), "seed": self.request.get("seed"), "applied": False,
                            "skipped": why}

    def record(self, why_not: str) -> dict[str, Any] | None:
        """The record's ``perturbation``: what was done, or that it was skipped and ``why_not``."""
        if self.request is None:
            return None
        if self.outcome is None:
            return {"kind": self.request.get("kind"), "seed": self.request.get("seed"), "applied": False,
                    "skipped": why_not}
        return self.outcome
