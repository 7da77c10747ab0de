"""Where two runs part: the first training step whose loss bits or parameters differ.

Pure: :func:`parse_trace` reads the text of a ``trace.jsonl`` (written by a container or a
user's trainer, so hostile input: strictly parsed, every field checked, line by line) and
:func:`diverge` compares two traces and their records. :func:`read_trace` streams a file into
it through :mod:`harness.safeio` (no link followed, bounded in bytes, lines and line size).
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from .errors import InputError
from .worker.trace import TRACE_FILE, TRACE_MAX_BYTES, TRACE_SCHEMA

__all__ = ["Parting", "Divergence", "Trace", "parse_trace", "read_trace", "diverge", "render", "TRACE_FILE",
           "TRACE_MAX_BYTES"]

_HEX_DIGEST = re.compile(r"[0-9a-f]{32}")
MAX_TENSORS = 100_000  # per checkpoint line: no model of a trial has more named tensors
MAX_NAME = 1000
# A line is read (and parsed) alone: one per-tensor line of 50,000 tensors with 100-character names fits.
MAX_LINE_BYTES = 8 << 20
# A step line is at least 64 bytes and each step has at most one per-tensor line besides it, so no trace
# within TRACE_MAX_BYTES has more lines than this (a file of short lines is refused at the first anyway).
MAX_LINES = 2 * (TRACE_MAX_BYTES // 64) + 2


class Parting(str, enum.Enum):
    NEVER = "never part"  # identical traces and identical metrics
    TRAINING = "training"  # a loss or a parameter digest differs at some step
    EVALUATION_ONLY = "evaluation-only drift"  # identical traces, different metrics
    BEYOND_TRACE = "beyond the trace"  # identical as far as a truncated trace goes, different metrics


@dataclass(frozen=True, slots=True)  # slots: a long trace holds one per step
class Step:
    epoch: int | None
    step: int
    loss: str  # float.hex
    state: str


@dataclass
class Trace:
    source: str
    steps: list[Step]
    tensors: dict[int, dict[str, str]]  # step -> tensor name -> digest
    truncated: bool = False


def _bad(where: str, line: int, msg: str) -> InputError:
    return InputError(f"{where}:{line}", msg, hint="rerun both cells with --trace to write fresh traces")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _text_lines(text: str) -> Iterator[str]:
    """The lines of ``text`` one at a time (no list of them all), without their newlines."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        if end < 0:
            yield text[start:]
            return
        yield text[start:end]
        start = end + 1


def read_trace(path: str | Path, *, within: str | Path | None = None) -> "Trace | None":
    """The trace at ``path`` (None when there is none), streamed through :func:`harness.safeio.read_lines`:
    no link followed (below ``within`` neither), at most TRACE_MAX_BYTES, one line of at most
    MAX_LINE_BYTES in memory at a time; the first bad line is refused as it is read."""
    from . import safeio

    lines = safeio.read_lines(path, TRACE_MAX_BYTES, MAX_LINE_BYTES, within=within)
    return None if lines is None else parse_trace(lines, str(path))


def parse_trace(text: str | Iterable[str | bytes], where: str) -> Trace:
    """A ``harness.trace/1`` file's steps and per-tensor digests; anything else is one InputError.

    ``text`` is the whole file, or its lines as they are read (:func:`read_trace`): each line is
    checked as it comes, so a file of bad lines is refused at its first one, and the number of lines
    is capped (MAX_LINES) whatever their size.
    """
    if isinstance(text, str):
        if len(text) > TRACE_MAX_BYTES:
            raise InputError(where, f"is larger than a trace can be ({TRACE_MAX_BYTES} bytes)")
        lines: Iterable[str | bytes] = _text_lines(text)
    else:
        lines = text
    try:
        return _parse_lines(lines, where)
    finally:
        close = getattr(lines, "close", None)
        if close is not None:
            close()


def _parse_lines(lines: Iterable[str | bytes], where: str) -> Trace:
    trace: Trace | None = None
    for i, ln in enumerate(lines, 1):
        if i > MAX_LINES:
            raise _bad(where, i, f"is beyond the {MAX_LINES} lines a trace of {TRACE_MAX_BYTES} bytes can hold")
        try:
            row = json.loads(ln.decode("utf-8") if isinstance(ln, bytes) else ln)
        except UnicodeDecodeError:
            raise _bad(where, i, "is not UTF-8 text") from None
        except (ValueError, RecursionError):
            raise _bad(where, i, "is not one JSON object") from None
        if not isinstance(row, dict):
            raise _bad(where, i, "is not one JSON object")
        if trace is None:
            if row.get("schema") != TRACE_SCHEMA:
                raise _bad(where, 1, f"is not a harness trace header (schema {row.get('schema')!r}, expected {TRACE_SCHEMA})")
            source = row.get("source")
            trace = Trace(source=source if isinstance(source, str) else "?", steps=[], tensors={})
            continue
        if trace.truncated:
            raise _bad(where, i, "follows the truncation line")
        keys = set(row)
        if keys == {"epoch", "step", "loss", "state"}:
            ok = (_int(row["step"]) and row["step"] == len(trace.steps) + 1
                  and (row["epoch"] is None or (_int(row["epoch"]) and row["epoch"] >= 0))
                  and isinstance(row["loss"], str) and isinstance(row["state"], str)
                  and _HEX_DIGEST.fullmatch(row["state"]) is not None)
            if ok:
                try:
                    float.fromhex(row["loss"])
                except (ValueError, OverflowError):
                    ok = False
            if not ok:
                raise _bad(where, i, "is not a step line (consecutive step, epoch, loss as float.hex, 32-hex state)")
            trace.steps.append(Step(row["epoch"], row["step"], row["loss"], row["state"]))
        elif keys == {"tensors_at", "tensors"}:
            at, tensors = row["tensors_at"], row["tensors"]
            if not (_int(at) and 1 <= at <= len(trace.steps) and at not in trace.tensors and isinstance(tensors, dict)
                    and len(tensors) <= MAX_TENSORS
                    and all(isinstance(k, str) and len(k) <= MAX_NAME and isinstance(v, str)
                            and _HEX_DIGEST.fullmatch(v) for k, v in tensors.items())):
                raise _bad(where, i, "is not a per-tensor line (tensors_at: a step already traced, tensors: name -> 32-hex)")
            trace.tensors[at] = dict(tensors)
        elif keys == {"truncated", "at_step"} and row["truncated"] is True and row["at_step"] == len(trace.steps):
            trace.truncated = True
        else:
            raise _bad(where, i, f"has unexpected keys {', '.join(sorted(map(str, keys))) or 'none'}")
    if trace is None:
        raise InputError(where, "is empty, not a harness trace")
    return trace


# --------------------------------------------------------------------------- comparison


@dataclass
class Divergence:
    parting: Parting
    a: str
    b: str
    steps: tuple[int, int]
    parts_at: dict[str, Any] | None = None  # {"step", "epoch", "what": "loss" | "parameters" | "length"}
    loss_differs_at: dict[str, Any] | None = None  # {"step", "epoch", "a": hex, "b": hex}
    parameters_differ_at: dict[str, Any] | None = None  # {"step", "epoch"}
    first_tensor: dict[str, Any] | None = None  # {"name", "at_step"}
    metrics: dict[str, float | None] = field(default_factory=dict)  # metric -> |A - B| at the end
    notes: list[str] = field(default_factory=list)
    cause: dict[str, Any] | None = None  # harness.causes.Finding: the cause class the evidence supports

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["parting"] = self.parting.value
        d["schema"] = "harness.diverge/1"
        return d


def _first_tensor(a: Trace, b: Trace, from_step: int) -> dict[str, Any] | None:
    """The first tensor (by name) whose digests differ at the first common checkpoint at or after ``from_step``."""
    for at in sorted(set(a.tensors) & set(b.tensors)):
        if at < from_step:
            continue
        ta, tb = a.tensors[at], b.tensors[at]
        for name in sorted(set(ta) | set(tb)):
            if ta.get(name) != tb.get(name):
                return {"name": name, "at_step": at}
    return None


def _numbers(m: Any, prefix: str, out: dict[str, float]) -> None:
    """Flatten a metrics mapping (val: {r2: {target: x}}) to dotted names -> finite floats."""
    if isinstance(m, Mapping):
        for k, v in m.items():
            _numbers(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m):
        out[prefix] = float(m)


def metric_distances(ma: Mapping[str, Any], mb: Mapping[str, Any]) -> dict[str, float | None]:
    """|A - B| per retrained metric (val_loss, then val/test r2, mse, mae: the largest over targets)."""
    fa: dict[str, float] = {}
    fb: dict[str, float] = {}
    _numbers(ma, "", fa)
    _numbers(mb, "", fb)
    out: dict[str, float | None] = {}
    for name in sorted(set(fa) | set(fb)):
        if name == "best_epoch":
            continue
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] in ("val", "test") and len(parts) >= 2 else name
        d = abs(fa[name] - fb[name]) if name in fa and name in fb else None
        prev = out.get(key, 0.0)
        out[key] = None if d is None or prev is None else max(prev, d)
    return out


def diverge(a: Trace, b: Trace, metrics_a: Mapping[str, Any], metrics_b: Mapping[str, Any],
            name_a: str = "A", name_b: str = "B") -> Divergence:
    """Compare two traces step by step, then the records' retrained metrics."""
    out = Divergence(Parting.NEVER, name_a, name_b, (len(a.steps), len(b.steps)))
    common = min(len(a.steps), len(b.steps))
    for sa, sb in zip(a.steps, b.steps):
        if out.loss_differs_at is None and sa.loss != sb.loss:
            out.loss_differs_at = {"step": sa.step, "epoch": sa.epoch, "a": sa.loss, "b": sb.loss}
        if out.parameters_differ_at is None and sa.state != sb.state:
            out.parameters_differ_at = {"step": sa.step, "epoch": sa.epoch}
        if out.loss_differs_at and out.parameters_differ_at:
            break
    firsts = [(d["step"], d["epoch"], what) for d, what in ((out.loss_differs_at, "loss"),
                                                            (out.parameters_differ_at, "parameters")) if d]
    if firsts:
        step, epoch, what = min(firsts, key=lambda t: (t[0], t[2] != "loss"))  # loss bits first, then parameters
        out.parts_at = {"step": step, "epoch": epoch, "what": what}
    elif len(a.steps) != len(b.steps) and not (a.truncated or b.truncated):
        longer = a if len(a.steps) > len(b.steps) else b
        out.parts_at = {"step": common + 1, "epoch": longer.steps[common].epoch, "what": "length"}
    if out.parts_at:
        out.parting = Parting.TRAINING
        out.first_tensor = _first_tensor(a, b, out.parts_at["step"])
    out.metrics = metric_distances(metrics_a, metrics_b)
    if out.parting is Parting.NEVER and any(v is None or v > 0 for v in out.metrics.values()):
        # a truncated trace cannot tell training from evaluation: they may part after it stops
        out.parting = Parting.BEYOND_TRACE if (a.truncated or b.truncated) else Parting.EVALUATION_ONLY
    for t, n in ((a, name_a), (b, name_b)):
        if t.truncated:
            out.notes.append(f"{n}'s trace was truncated at step {len(t.steps)} ({TRACE_MAX_BYTES} bytes): "
                             "steps after it were not compared")
    return out


# --------------------------------------------------------------------------- text


def _at(d: Mapping[str, Any]) -> str:
    return (f"epoch {d['epoch']} step {d['step']}" if d.get("epoch") is not None else f"step {d['step']}")


def render(d: Divergence) -> list[str]:
    lines = [f"A: {d.a} ({d.steps[0]} steps)", f"B: {d.b} ({d.steps[1]} steps)"]
    if d.parting is Parting.TRAINING:
        p = d.parts_at or {}
        what = {"loss": "the loss bits differ", "parameters": "the parameters differ after the optimizer step "
                "(the losses still agree)", "length": "one run takes more steps than the other"}[p["what"]]
        lines.append(f"parts at: {_at(p)}: {what}")
        if d.loss_differs_at:
            la = d.loss_differs_at
            lines.append(f"losses first differ at {_at(la)}: {float.fromhex(la['a'])!r} vs {float.fromhex(la['b'])!r}")
        else:
            lines.append("losses agree at every step both traces hold")
        if d.parameters_differ_at:
            lines.append(f"parameters first differ at {_at(d.parameters_differ_at)}")
        if d.first_tensor:
            lines.append(f"first differing tensor: {d.first_tensor['name']} "
                         f"(per-tensor digests of step {d.first_tensor['at_step']})")
    elif d.parting is Parting.EVALUATION_ONLY:
        lines.append("evaluation-only drift: losses and parameters agree at every step, the metrics differ")
    elif d.parting is Parting.BEYOND_TRACE:
        lines.append(f"beyond the trace: losses and parameters agree for all {min(d.steps)} traced steps, the metrics "
                     "differ: they part after a trace stops")
    else:
        lines.append("never part: losses, parameters and metrics agree")
    if d.cause:
        lines.append(f"cause: {d.cause['cause']}: {d.cause['evidence']}")
    elif d.parting is not Parting.NEVER:
        lines.append("cause: none the evidence supports (the records and traces name no class)")
    moved = {k: v for k, v in d.metrics.items() if v is None or v > 0}
    if moved:
        lines.append("apart at the end (|A - B|, retrained): " + ", ".join(
            f"{k} {'n/a' if v is None else format(v, '.3g')}" for k, v in moved.items()))
    lines += [f"note: {n}" for n in d.notes]
    return lines


# --------------------------------------------------------------------------- the matrix's "parts at" column


def parts_at_column(traces: Mapping[str, "Trace | str | None"], order: list[str]) -> dict[str, str]:
    """Each cell's "parts at" against the first cell of ``order`` (the baseline): where its trace first
    differs, "never", "—" without a trace, or the reason a trace was refused (a string in ``traces``).
    Empty when the baseline has no readable trace (the column is then left out)."""
    if not order or not isinstance(traces.get(order[0]), Trace):
        return {}
    base = traces[order[0]]
    assert isinstance(base, Trace)
    out = {order[0]: "baseline"}
    for cell in order[1:]:
        t = traces.get(cell)
        if t is None:
            out[cell] = "—"
        elif isinstance(t, str):
            out[cell] = t
        else:
            d = diverge(base, t, {}, {})
            p = d.parts_at
            out[cell] = "never" if p is None else f"{_at(p).replace('epoch ', 'ep ')} ({p['what']})"
    return out
