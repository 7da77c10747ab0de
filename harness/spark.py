"""Loss curves as one line of block characters, for the terminal's Results table (pure).

* :func:`sparkline` -- a curve (``▁▂▃▄▅▆▇█``, lowest to highest value of the curve itself)
* :func:`delta_line` -- how far a cell's curve is from the baseline's, epoch by epoch, on a
  fixed log scale so rows can be compared: ``·`` bit-identical, ``▁`` a relative difference
  below 1e-14, each step up two decades more, ``█`` at 1 or beyond. The first mark that is
  not ``·`` is where the losses part; its height is how far.

Both squeeze a long curve into ``width`` characters (each character one bucket of epochs: the
curve's mean, the delta's maximum, so a difference is never averaged away). Values that are
not finite numbers are blanks.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

BLOCKS = "▁▂▃▄▅▆▇█"
SAME = "·"
# delta_line's scale: BLOCKS[i] for a relative difference below DECADES[i] (the last: anything larger)
DECADES = (1e-14, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2)
LOSS_KEYS = ("val_loss", "train_loss", "loss")  # the first key the baseline's history has is drawn


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def _buckets(n: int, width: int) -> list[range]:
    """``n`` points into at most ``width`` consecutive, near-equal buckets."""
    k = min(n, width)
    return [range(i * n // k, (i + 1) * n // k) for i in range(k)] if k > 0 else []


def sparkline(values: Sequence[Any], width: int = 16) -> str:
    """The curve of ``values`` in at most ``width`` block characters; "" without two finite values."""
    nums = [_finite(v) for v in values]
    finite = [v for v in nums if v is not None]
    if len(finite) < 2 or width < 1:
        return ""
    out = []
    means: list[float | None] = []
    for b in _buckets(len(nums), width):
        got = [nums[i] for i in b if nums[i] is not None]
        means.append(sum(got) / len(got) if got else None)  # type: ignore[arg-type]
    lo, hi = min(v for v in means if v is not None), max(v for v in means if v is not None)
    for m in means:
        if m is None:
            out.append(" ")
        elif hi == lo:
            out.append(BLOCKS[0])
        else:
            out.append(BLOCKS[min(len(BLOCKS) - 1, int((m - lo) / (hi - lo) * len(BLOCKS)))])
    return "".join(out)


def delta_mark(a: float | None, b: float | None) -> str:
    """One character for the difference of ``a`` from ``b`` (see the module's scale)."""
    if a is None or b is None:
        return " "
    if a == b:
        return SAME
    rel = abs(a - b) / max(abs(b), abs(a), 1e-300)
    for mark, bound in zip(BLOCKS, DECADES):
        if rel < bound:
            return mark
    return BLOCKS[-1]


def delta_line(values: Sequence[Any], baseline: Sequence[Any], width: int = 16) -> str:
    """How far ``values`` is from ``baseline``, point by point (the worst of each bucket); "" without overlap."""
    n = min(len(values), len(baseline))
    if n < 1 or width < 1:
        return ""
    marks = [delta_mark(_finite(values[i]), _finite(baseline[i])) for i in range(n)]
    if all(m == " " for m in marks):
        return ""
    order = " " + SAME + BLOCKS
    return "".join(max((marks[i] for i in b), key=order.index) for b in _buckets(n, width))


def history_curve(history: Sequence[Mapping[str, Any]], key: str) -> list[Any]:
    """``key`` of each epoch row of a record's history (None where a row lacks it)."""
    return [row.get(key) if isinstance(row, Mapping) else None for row in history]


def loss_key(history: Sequence[Mapping[str, Any]]) -> str | None:
    """The loss a history holds, in the order of :data:`LOSS_KEYS`; None when it holds none."""
    for key in LOSS_KEYS:
        if sum(_finite(row.get(key)) is not None for row in history if isinstance(row, Mapping)) >= 2:
            return key
    return None


def loss_columns(histories: Mapping[str, Sequence[Mapping[str, Any]]], baseline: str | None,
                 width: int = 16) -> tuple[str | None, dict[str, str]]:
    """The Results table's loss column: (the loss drawn, {cell: its text}); (None, {}) when nothing can be drawn.

    The baseline's row is its curve (:func:`sparkline`), every other row its difference from
    the baseline's curve (:func:`delta_line`); without a baseline curve, each row its own curve.
    """
    base = histories.get(baseline) if baseline is not None else None
    key = loss_key(base) if base else None
    if key is None:
        keys = [loss_key(h) for h in histories.values() if h]
        key = next((k for k in keys if k is not None), None)
        if key is None:
            return None, {}
        return key, {c: sparkline(history_curve(h, key), width) for c, h in histories.items()}
    base_curve = history_curve(base, key)  # type: ignore[arg-type]
    out = {}
    for cell, h in histories.items():
        curve = history_curve(h, key)
        out[cell] = sparkline(curve, width) if cell == baseline else delta_line(curve, base_curve, width)
    return key, out
