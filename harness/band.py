"""The instability band: how far the baseline's own training spreads. Pure statistics.

Summers & Dinneen (ICML 2021, "Nondeterminism and Instability in Neural Network
Optimization") showed that a one-bit change in one initial weight spreads training
runs about as far as any other source of nondeterminism. A different CUDA, PyTorch
or CPU instruction set is such a tiny difference, so the spread of runs that differ
from the baseline by one ulp (the *ulp band*) is the yardstick for a cell's drift:
a difference inside it is the training's own instability, one beyond it is worth a
look. Runs with other training seeds (the *seed band*) say whether a difference
could change a conclusion at all.

Everything here is plain data in, plain data out: :func:`measure` takes the members'
flattened metrics (``{"val_loss": x, "r2/target": x, ...}``, made by
:mod:`harness.judge`), :func:`band_width` is what a consumer reads. No effects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

MIN_MEMBERS = 2  # a range needs two values

# The rule a cell's |Δ| is judged by: inside the ulp band's width, the larger of its range
# (max - min) and K_SD sample standard deviations. With 8 members the range is about 3 sd;
# with fewer it underestimates the spread (4 members span about 2 sd), and 3 sd keeps a
# small band from calling ordinary jitter "beyond". |Δ| in sd is shown beside it as context.
PRIMARY_RULE = "max(range, 3 sd)"
K_SD = 3.0


@dataclass(frozen=True)
class Spread:
    """Summary of one metric over the band's members."""

    n: int
    mean: float
    sd: float | None  # sample standard deviation (n - 1); None for one value
    min: float
    max: float
    range: float  # max - min: the band's width


def spread(values: Sequence[float]) -> Spread | None:
    """n, mean, sd, min, max and range of the finite ``values``; None when there are none."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not vals:
        return None
    n = len(vals)
    mean = math.fsum(vals) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else None
    lo, hi = min(vals), max(vals)
    return Spread(n=n, mean=mean, sd=sd, min=lo, max=hi, range=hi - lo)


@dataclass
class Member:
    """One band member as the band sees it."""

    cell: str
    kind: str  # "ulp" | "seed"
    member: int
    seed: int | None = None  # the training seed it ran with
    perturbation: dict[str, Any] | None = None  # what the ulp change was (tensor, index, old/new, direction)
    used: bool = True  # False: it failed, or an ulp member whose trainer did not apply the perturbation
    why_not: str | None = None
    values: dict[str, float] = field(default_factory=dict)  # its flattened validation metrics
    weights_sha256: str | None = None


@dataclass
class Band:
    """The ulp band (and the seed band, when measured) of one baseline, per flat metric key."""

    ulp: dict[str, Spread]
    seed: dict[str, Spread]
    members: list[Member]
    n_ulp: int  # ulp members used
    n_seed: int
    source: str = "ulp"  # "ulp": measured with harness band / --band; "repeats": a cell's own repeats
    rule: str = PRIMARY_RULE
    k_sd: float = K_SD
    environment: str | None = None  # where the members ran, in words
    notes: list[str] = field(default_factory=list)  # members left out, and why

    @property
    def measured(self) -> bool:
        """Whether there is a width to judge by (two or more ulp members)."""
        return self.n_ulp >= MIN_MEMBERS


def _spreads(rows: Sequence[Mapping[str, float]]) -> dict[str, Spread]:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    out = {}
    for key in keys:
        s = spread([row[key] for row in rows if key in row])
        if s is not None:
            out[key] = s
    return out


def measure(members: Sequence[Member], environment: str | None = None) -> Band:
    """The band of ``members``: per key, the spread of the ulp members used, and of the seed members."""
    used_ulp = [m for m in members if m.kind == "ulp" and m.used]
    used_seed = [m for m in members if m.kind == "seed" and m.used]
    ulp_members = [m for m in members if m.kind == "ulp"]
    notes = []
    skipped = bool(ulp_members) and not used_ulp
    if skipped:
        reasons = list(dict.fromkeys(m.why_not for m in ulp_members if m.why_not))
        notes.append(f"ulp band skipped: {'; '.join(reasons) or 'no member ran'}")
    left_out: dict[str, list[str]] = {}
    for m in members:
        if not m.used and not (skipped and m.kind == "ulp"):
            left_out.setdefault(m.why_not or "not used", []).append(m.cell)
    notes += [f"left out of the band: {', '.join(cells)} ({why})" for why, cells in left_out.items()]
    if 0 < len(used_ulp) < MIN_MEMBERS:
        notes.append(f"the ulp band has {len(used_ulp)} member: a width needs at least {MIN_MEMBERS}")
    return Band(ulp=_spreads([m.values for m in used_ulp]), seed=_spreads([m.values for m in used_seed]),
                members=list(members), n_ulp=len(used_ulp), n_seed=len(used_seed), environment=environment,
                notes=notes)


def from_values(name: str, rows: Sequence[Mapping[str, float]]) -> Band:
    """A band made of a cell's own repeats (``source="repeats"``): used where no ulp band was measured."""
    members = [Member(cell=f"{name}#{i + 1}", kind="ulp", member=i + 1, values=dict(r)) for i, r in enumerate(rows)]
    band = measure(members)
    band.source = "repeats"
    return band


# --------------------------------------------------------------------------- what consumers read


def band_width(band: Band | None, key: str) -> float | None:
    """The band's width for a flat metric key (``"val_loss"``, ``"r2/target"``): the larger of its
    range (max - min) and ``K_SD`` standard deviations (see :data:`PRIMARY_RULE`).

    None when there is no band, fewer than two ulp members, or the key was not measured.
    A stable entry point: other modules judge a difference against this number.
    """
    if band is None or not band.measured:
        return None
    s = band.ulp.get(key)
    if s is None:
        return None
    return max(s.range, K_SD * s.sd) if s.sd is not None else s.range


def band_sd(band: Band | None, key: str) -> float | None:
    """The ulp band's sample standard deviation for ``key`` (context for the range rule)."""
    if band is None or not band.measured:
        return None
    s = band.ulp.get(key)
    return s.sd if s is not None else None


def seed_width(band: Band | None, key: str) -> float | None:
    """The seed band's range for ``key`` (None without two or more seed members)."""
    if band is None or band.n_seed < MIN_MEMBERS:
        return None
    s = band.seed.get(key)
    return s.range if s is not None else None


def ratio(delta: float | None, width: float | None) -> float | None:
    """``|delta| / width``; infinity for a non-zero delta against a zero width; None when either is missing."""
    if delta is None or width is None or not math.isfinite(delta):
        return None
    if width == 0:
        return 0.0 if delta == 0 else math.inf
    return abs(delta) / width
