"""Why two runs part: the cause class the evidence supports, or none. Pure.

First what the runs were told to do differently: two band members with different one-ulp
changes were *perturbed differently*, two runs with different seeds have *seeds that differ*
(both from their records). Then two kinds of evidence, each named in the finding:

* the settings both records measured (:mod:`harness.attribution`'s axes): two runs whose
  settings are all equal and still differ had a nondeterministic reduction; two that differ
  only in TF32 differ in precision;
* the traces (``--trace``), read at the step where the runs part. The size of the first
  differing loss, relative to the loss, says what can have moved it:

  - identical losses at step 1, different parameters after it: the backward pass or the
    optimizer step (kernels);
  - at most :data:`ROUNDING` (a few float32 ulps): the forward pass's arithmetic (kernels);
  - between that and :data:`DRAWS`: more than float32 rounding, less than another input:
    reduced precision (TF32 matmuls, a bf16 kernel);
  - :data:`DRAWS` or more at the very first step: the forward pass saw other inputs or
    masks: the two runs drew different random numbers (dropout masks, noise, shuffling;
    CPU and CUDA generators give different draws for one seed).

Where neither kind of evidence supports a class, none is named.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any

from .attribution import _differences, _tf32, axis_values
from .record import ResultRecord

ROUNDING = 1e-6  # relative: about 8 float32 ulps (2^-23 ≈ 1.2e-7 each)
DRAWS = 1e-3  # relative: TF32 keeps 10 mantissa bits (2^-11 ≈ 4.9e-4 per product), averaged over a sum


class Cause(str, enum.Enum):
    PERTURBED = "perturbed differently"
    SEEDS = "seeds differ"
    RANDOM = "random draws differ"
    KERNELS = "kernels differ"
    PRECISION = "reduced precision"
    NONDETERMINISM = "nondeterministic reduction"
    EVALUATION = "evaluation differs"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Finding:
    cause: Cause
    evidence: str  # one line: what supports it
    step: int | None = None  # the step the traces part at, when they were read
    relative: float | None = None  # |Δ loss| / |loss| at the first differing loss, when it is step 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cause"] = self.cause.value
        return d

    @property
    def short(self) -> str:
        return self.cause.value


def _mode(rec: ResultRecord) -> str:
    return str((rec.determinism or {}).get("mode") or "?")


def _settings(a: ResultRecord, b: ResultRecord) -> list[str] | None:
    """The measured axes the two runs differ in; None when an axis is known in one and not the other."""
    differ, uncertain = _differences(axis_values(a), axis_values(b))
    return None if uncertain else differ


def _perturbation(rec: ResultRecord) -> str | None:
    """The one-ulp change ``rec`` trained with, in words (None: none was applied)."""
    return rec.perturbation.where() if rec.perturbation else None


def _seed(rec: ResultRecord) -> Any:
    return (rec.spec or {}).get("seed")


def _first_loss(divergence: Any) -> tuple[int | None, float | None]:
    """(the step the losses first differ at, their relative difference there)."""
    d = getattr(divergence, "loss_differs_at", None)
    if not d:
        return None, None
    a, b = float.fromhex(d["a"]), float.fromhex(d["b"])
    scale = max(abs(a), abs(b))
    return d["step"], (abs(a - b) / scale if scale else None)


def classify(a: ResultRecord, b: ResultRecord, divergence: Any = None) -> Finding | None:
    """The cause class of ``a`` and ``b`` parting that the evidence supports (None: none is supported).

    ``divergence``: :class:`harness.diverge.Divergence` of their traces, when both were traced.
    """
    from .diverge import Parting

    if divergence is not None and divergence.parting is Parting.NEVER:
        return None
    if divergence is None and a.weights_sha256 and a.weights_sha256 == b.weights_sha256:
        return None
    if divergence is not None and divergence.parting is Parting.BEYOND_TRACE:
        divergence = None  # the traces stop before the runs part: the settings alone may still say why
    if divergence is not None and divergence.parting is Parting.EVALUATION_ONLY:
        return Finding(Cause.EVALUATION, "losses and parameters agree at every traced step, the metrics do not: "
                                         "the evaluation's kernels differ")
    parts = (divergence.parts_at or {}) if divergence is not None else {}
    step = parts.get("step")
    moved = (_perturbation(a), _perturbation(b))
    if moved[0] != moved[1]:  # ulp band members: they were made to part
        said = [f"{r.cell} moved {m} by one ulp" if m else f"{r.cell} was not perturbed" for r, m in zip((a, b), moved)]
        return Finding(Cause.PERTURBED, "; ".join(said), step)
    if _seed(a) != _seed(b):
        sa, sb = (f"seed {_seed(r)}" if _seed(r) is not None else "the trial's seed" for r in (a, b))
        return Finding(Cause.SEEDS, f"{a.cell} trained with {sa}, {b.cell} with {sb}", step)
    differ = _settings(a, b)
    loss_step, rel = _first_loss(divergence)
    at_first = loss_step == 1
    relw = f"{rel:.1g}" if rel is not None else "?"
    devices = {a.env.device_type, b.env.device_type}
    if at_first and rel is not None and rel >= DRAWS:
        why = (f"the first step's loss differs by {relw} (relative), more than arithmetic moves it: the runs drew "
               "different random numbers at step 1")
        if len(devices) > 1:
            why += " (CPU and CUDA generators give different draws for one seed)"
        return Finding(Cause.RANDOM, why, step, rel)
    if differ is not None and "tf32" in differ:
        on = a if _tf32(a) != "off" else b
        why = f"{'bf16 float32 math is' if _tf32(on) == 'bf16' else 'TF32 matmuls are'} on in {on.cell}"
        if at_first and rel is not None:
            why += f"; the first step's loss differs by {relw} (relative), beyond float32 rounding"
        elif differ == ["tf32"]:
            why += "; nothing else they measured differs"
        return Finding(Cause.PRECISION, why, step, rel if at_first else None)
    loose = [x for x in (a, b) if _mode(x) != "strict"]
    if differ == [] or (differ == ["determinism"] and loose):
        mode = _mode(loose[0]) if loose else _mode(a)
        why = ("every setting they measured is equal, the results are not" if differ == [] else
               f"they differ only in determinism mode, and {loose[0].cell} runs {mode}")
        return Finding(Cause.NONDETERMINISM, f"{why}: a nondeterministic reduction (atomics in {mode} mode)" if loose
                       else f"{why}: a nondeterministic kernel", step, None)
    if divergence is None:
        return None  # settings alone support no class: the traces would say (--trace)
    if at_first and rel is not None and rel > ROUNDING:
        return Finding(Cause.PRECISION, f"the first step's loss differs by {relw} (relative): beyond float32 rounding, "
                                        "less than other random draws give", step, rel)
    if at_first:
        return Finding(Cause.KERNELS, f"the first forward pass differs at float32 rounding ({relw} relative), with the "
                                      "same random draws: the forward kernels differ", step, rel)
    if step == 1 and parts.get("what") == "parameters":
        return Finding(Cause.KERNELS, "the first forward pass agrees bit for bit, the parameters after the first step "
                                      "do not: the backward or optimizer kernels differ", step, None)
    if step is not None:
        return Finding(Cause.KERNELS, f"they agree bit for bit until step {step}: a kernel's result differs there",
                       step, None)
    return None
