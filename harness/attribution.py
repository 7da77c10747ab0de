"""Attribution: how much each axis of the environment moved the metrics, from records alone.

Pure: records in, an :class:`Attribution` out; no effects. :mod:`harness.report`
renders it. Every axis value is read from what a record *measured* (``env``,
``determinism``, the data digest), never from a cell's name or the options
that planned it, so records merged from several machines are attributed the
same way.

Definitions (docs/verdicts.md, "Attribution: which axis moved the metrics"):

* An axis has one value per cell, or none where it does not apply: the GPU
  model and its driver apply only to cells that ran on CUDA (a CPU cell and a
  CUDA cell differ in ``device``, not also in ``gpu``). A value a record does
  not carry is *unknown*.
* Two cells *differ only in* axis A when A applies to both and its values
  differ, every other axis that applies to both has equal values, and no axis
  is known in one cell and unknown in the other (it might differ there too).
  An axis unknown in both is taken as equal (records of one harness version
  measure the same facts).
* For each axis: ``measured`` when at least one pair of ok cells differs only
  in it; then per metric the largest |Δ| over those pairs and how many pairs
  had that metric, and how many of the pairs trained bitwise identical
  weights. ``confounded`` when the axis takes two or more values but every
  pair that differs in it differs in another axis too (the axes it moves
  with are named, from the pairs with the fewest differences).
  ``not enough cells`` when fewer than two values of it occur (it does not
  vary in these cells, or applies to fewer than two of them).
* Pairs that differ in no axis at all (repeats, or cells whose settings differ
  in nothing measured) are reported apart, as ``same environment``: their
  |Δ| is the run-to-run spread, the floor under every other row.

A number appears only where pairs support it: no pair, no number.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from .record import ResultRecord, flatten_split

WidthFn = Callable[[str], "float | None"]

MEASURED = "measured"
CONFOUNDED = "confounded"
NOT_ENOUGH = "not enough cells"
SAME_ENV = "same environment"


# --------------------------------------------------------------------------- the axes, from measured facts


def _torch(rec: ResultRecord) -> str | None:
    return rec.env.torch.split("+", 1)[0] if rec.env.torch else None  # the build (cpu, cu130) is the cuda axis


def _build(attr: str) -> Callable[[ResultRecord], str | None]:
    def get(rec: ResultRecord) -> str | None:
        if rec.env.torch is None:
            return None  # nothing was measured
        value = getattr(rec.env, attr)
        return str(value) if value not in (None, "") else "none"  # torch measured it: a build without it
    return get


def _on_cuda(rec: ResultRecord) -> bool:
    return rec.env.device_type == "cuda"


def _gpu(rec: ResultRecord) -> str | None:
    if not rec.env.device:
        return None
    cc = f" (cc {rec.env.compute_capability})" if rec.env.compute_capability else ""
    return f"{rec.env.device}{cc}"


def _isa(rec: ResultRecord) -> tuple[str, str] | None:
    """(display, identity): the capability torch's kernels used, and the ISA switches that were set."""
    cap = rec.env.cpu_capability
    if cap is None:
        return None
    switches = ",".join(f"{k}={v}" for k, v in sorted((rec.env.isa_env or {}).items()))
    level = rec.env.isa_requested
    return (f"{cap} ({level})" if level else cap), f"{cap}|{switches}"


def _switches(rec: ResultRecord) -> str | None:
    """The numeric switches in effect (harness.worker.envinfo.SWITCHES), ``none`` when none was set."""
    if rec.env.torch is None or rec.env.switches is None:
        return None  # not measured
    return ",".join(f"{k}={v}" for k, v in sorted(rec.env.switches.items())) or "none"


def _determinism(rec: ResultRecord) -> str | None:
    mode = (rec.determinism or {}).get("mode")
    return str(mode) if mode is not None else None


def _threads(rec: ResultRecord) -> str | None:
    return str(rec.env.threads) if rec.env.threads is not None else None


# The per-backend precisions (harness.worker.determinism.FP32_PRECISION_AT) that a run's device computes with,
# each with the places it inherits from when it says "none"
_PRECISION_OF = {
    "cpu": (("mkldnn.matmul", "mkldnn"), ("mkldnn.conv", "mkldnn"), ("mkldnn.rnn", "mkldnn")),
    "cuda": (("cuda.matmul",), ("cudnn.conv", "cudnn"), ("cudnn.rnn", "cudnn")),
}


def _tf32(rec: ResultRecord) -> str | None:
    """Reduced-precision float32 math: ``off``, ``on`` (TF32) or ``bf16``.

    From torch's per-backend precisions where the record has them (a trainer can set those alone), for the
    backends of the run's device; else from the legacy switches (``matmul_allow_tf32``, and
    ``float32_matmul_precision`` "medium", which allows bf16).
    """
    det = rec.determinism or {}
    flag, legacy = det.get("matmul_allow_tf32"), det.get("float32_matmul_precision")
    per = det.get("fp32_precision")
    if isinstance(per, dict) and per:
        used = set()
        for chain in _PRECISION_OF.get(rec.env.device_type or "", ()):
            value = next((per.get(k) for k in (*chain, "generic") if per.get(k) not in (None, "none")), "ieee")
            used.add(value)  # cuda.matmul is what matmul_allow_tf32 reads and sets
    elif flag is None and legacy is None:
        return None
    else:
        used = {"tf32"} if flag else set()
    if "bf16" in used or legacy == "medium":
        return "bf16"
    return "on" if "tf32" in used else "off"


def _device(rec: ResultRecord) -> str | None:
    return rec.env.device_type


def _cpu(rec: ResultRecord) -> str | None:
    return rec.env.cpu


def _python(rec: ResultRecord) -> str | None:
    return rec.env.python


def _numpy(rec: ResultRecord) -> str | None:
    return rec.env.numpy


def _driver(rec: ResultRecord) -> str | None:
    return rec.env.driver


def _data(rec: ResultRecord) -> str | None:
    return rec.data_sha256[:12] if rec.data_sha256 else None


@dataclass(frozen=True)
class Axis:
    name: str
    get: Callable[[ResultRecord], Any]  # a value (str), a (display, identity) pair, or None: unknown
    cuda_only: bool = False  # applies only to cells that ran on CUDA


AXES: tuple[Axis, ...] = (
    Axis("torch", _torch),
    Axis("cuda", _build("cuda")),
    Axis("cudnn", _build("cudnn")),
    Axis("python", _python),
    Axis("numpy", _numpy),
    Axis("device", _device),
    Axis("gpu", _gpu, cuda_only=True),
    Axis("driver", _driver, cuda_only=True),
    Axis("cpu", _cpu),
    Axis("isa", _isa),
    Axis("switches", _switches),  # MKL_CBWR, OMP_DYNAMIC, NVIDIA_TF32_OVERRIDE, ...: set in the environment
    Axis("determinism", _determinism),
    Axis("threads", _threads),
    Axis("tf32", _tf32),  # a CPU cell's matmuls are fp32: "off", so CPU vs a TF32 GPU cell is two axes
    Axis("data", _data),
)
AXIS_NAMES = tuple(a.name for a in AXES)


def _identity(value: Any) -> Any:
    return value[1] if isinstance(value, tuple) else value


def _display(value: Any) -> str:
    return value[0] if isinstance(value, tuple) else str(value)


def axis_values(rec: ResultRecord) -> dict[str, Any]:
    """Each axis's value in ``rec`` (``None``: unknown); axes that do not apply to it are left out."""
    return {a.name: a.get(rec) for a in AXES if not a.cuda_only or _on_cuda(rec)}


# --------------------------------------------------------------------------- results


@dataclass
class AxisEffect:
    """One axis (or the ``same environment`` pairs): what the cells support saying about it."""

    axis: str
    status: str  # measured | confounded | not enough cells | same environment
    values: list[str] = field(default_factory=list)  # the distinct values among the cells it applies to
    pairs: list[list[str]] = field(default_factory=list)  # [cell a, cell b] differing only in this axis
    max_abs: dict[str, float] = field(default_factory=dict)  # metric key -> max |Δ| over the pairs
    n_pairs: dict[str, int] = field(default_factory=dict)  # metric key -> pairs that had it in both cells
    ratio: dict[str, float] = field(default_factory=dict)  # metric key -> max |Δ| / width, where a width is known
    weights_identical: int = 0  # pairs whose retrained weights are bitwise identical
    weights_compared: int = 0  # pairs where both cells carry a weights digest
    confounded_with: list[str] = field(default_factory=list)
    reason: str = ""

    def family_max(self, family: str) -> float | None:
        """The largest |Δ| over the keys of ``family`` (``val_loss``, ``r2``, ``mse``, ``mae``); None: no pair."""
        vals = [v for k, v in self.max_abs.items() if k.split("/", 1)[0] == family]
        return max(vals) if vals else None

    def family_ratio(self, family: str) -> float | None:
        vals = [v for k, v in self.ratio.items() if k.split("/", 1)[0] == family]
        return max(vals) if vals else None


@dataclass
class Attribution:
    cells: list[str]  # the ok cells considered
    axes: list[AxisEffect]  # one per axis of AXES, in that order
    same_environment: AxisEffect | None = None  # pairs that differ in no axis
    uncertain_pairs: int = 0  # pairs left out: an axis known in one cell and unknown in the other
    with_width: bool = False  # ratios to a band's width were asked for
    schema: str = "harness.attribution/1"

    def axis(self, name: str) -> AxisEffect:
        return next(a for a in self.axes if a.axis == name)

    @property
    def varying(self) -> list[AxisEffect]:
        return [a for a in self.axes if a.status != NOT_ENOUGH]


# --------------------------------------------------------------------------- the computation


def _differences(va: Mapping[str, Any], vb: Mapping[str, Any]) -> tuple[list[str], bool]:
    """Axes whose values differ between two cells (applicable to both), and whether any is known on one side only."""
    differ: list[str] = []
    uncertain = False
    for name in AXIS_NAMES:
        if name not in va or name not in vb:
            continue  # does not apply to one of them (e.g. the GPU of a CPU cell)
        a, b = va[name], vb[name]
        if a is None and b is None:
            continue
        if a is None or b is None:
            uncertain = True
            continue
        if _identity(a) != _identity(b):
            differ.append(name)
    return differ, uncertain


def _pair_deltas(a: ResultRecord, b: ResultRecord) -> dict[str, float]:
    fa, fb = flatten_split(a.retrained, "val"), flatten_split(b.retrained, "val")
    out = {}
    for key in fa.keys() & fb.keys():
        if math.isfinite(fa[key]) and math.isfinite(fb[key]):
            out[key] = abs(fb[key] - fa[key])
    return out


def _fill(effect: AxisEffect, pairs: Iterable[tuple[ResultRecord, ResultRecord]], width: WidthFn | None) -> None:
    for a, b in pairs:
        effect.pairs.append([a.cell, b.cell])
        for key, d in _pair_deltas(a, b).items():
            effect.max_abs[key] = max(effect.max_abs.get(key, 0.0), d)
            effect.n_pairs[key] = effect.n_pairs.get(key, 0) + 1
            w = width(key) if width is not None else None
            if w is not None and math.isfinite(w) and w > 0:
                effect.ratio[key] = max(effect.ratio.get(key, 0.0), d / w)
        if a.weights_sha256 and b.weights_sha256:
            effect.weights_compared += 1
            effect.weights_identical += a.weights_sha256 == b.weights_sha256


def attribute(records: Sequence[ResultRecord], width: WidthFn | None = None) -> Attribution:
    """Per-axis effects among the ok records (see the module's definitions).

    ``width(key)``: the width of an instability band for a metric key (``val_loss``,
    ``r2/<target>`` ...), or None where none was measured; with it each |Δ| is also
    given as a multiple of that width. Without it no ratio is shown.
    """
    ok = [r for r in records if r.ok and r.retrained]
    values = [axis_values(r) for r in ok]
    isolated: dict[str, list[tuple[ResultRecord, ResultRecord]]] = {n: [] for n in AXIS_NAMES}
    confounds: dict[str, list[list[str]]] = {n: [] for n in AXIS_NAMES}
    same: list[tuple[ResultRecord, ResultRecord]] = []
    uncertain_pairs = 0
    for (i, a), (j, b) in itertools.combinations(enumerate(ok), 2):
        differ, uncertain = _differences(values[i], values[j])
        if uncertain:
            uncertain_pairs += 1
            for name in differ:
                confounds[name].append([d for d in differ if d != name] + ["an unmeasured axis"])
            continue
        if not differ:
            same.append((a, b))
        elif len(differ) == 1:
            isolated[differ[0]].append((a, b))
        else:
            for name in differ:
                confounds[name].append([d for d in differ if d != name])
    effects = []
    for axis in AXES:
        seen: dict[Any, str] = {}
        applies = 0
        for v in values:
            if axis.name in v:
                applies += 1
                if v[axis.name] is not None:
                    seen.setdefault(_identity(v[axis.name]), _display(v[axis.name]))
        effect = AxisEffect(axis.name, NOT_ENOUGH, values=list(seen.values()))
        if len(seen) < 2:
            effect.reason = (f"one value in {applies} cell(s): {effect.values[0]}" if seen
                             else "no cell it applies to" if not applies else "not measured")
        elif isolated[axis.name]:
            effect.status = MEASURED
            _fill(effect, isolated[axis.name], width)
            effect.reason = f"{len(isolated[axis.name])} pair(s) differ only in {axis.name}"
        else:
            effect.status = CONFOUNDED
            fewest = min(len(c) for c in confounds[axis.name]) if confounds[axis.name] else 0
            with_ = dict.fromkeys(x for c in confounds[axis.name] if len(c) == fewest for x in c)
            effect.confounded_with = list(with_)
            effect.reason = (f"no two cells differ in {axis.name} alone; it moves with {', '.join(with_)}"
                             if with_ else f"no two cells differ in {axis.name} alone")
        effects.append(effect)
    same_env = None
    if same:
        same_env = AxisEffect(SAME_ENV, SAME_ENV, values=[])
        _fill(same_env, same, width)
        same_env.reason = f"{len(same)} pair(s) differ in no measured axis: the run-to-run spread"
    return Attribution(cells=[r.cell for r in ok], axes=effects, same_environment=same_env,
                       uncertain_pairs=uncertain_pairs, with_width=width is not None)
