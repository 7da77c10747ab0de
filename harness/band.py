"""The bands: how far the baseline's own training spreads. Pure statistics.

Two yardsticks, both retrains of one baseline cell (docs/verdicts.md):

* the *ulp band*: each member moves one initial weight by one ulp. Summers & Dinneen
  (ICML 2021, "Nondeterminism and Instability in Neural Network Optimization") showed
  that such a change spreads runs as far as any other numerical nondeterminism, so
  its spread is the numerical noise of one trajectory: a difference inside it is
  ``numerically equal``;
* the *seed band*: each member trains with another seed. Its spread is what another
  retrain gives: the distribution a cell beyond numerical noise is judged against
  (``same distribution`` or ``drifted``, :mod:`harness.ladder`).

Plain data in, plain data out: :func:`measure` takes the members' flattened metrics
(``{"val_loss": x, "r2/target": x, ...}``, made by :mod:`harness.judge`). No effects.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Collection, Mapping, Sequence

MIN_MEMBERS = 2  # a spread needs two values
REDRAW_OF = "redraw_of"  # the label of an ulp member drawn in place of one whose change training rounded away


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
    perturbation: Any = None  # harness.record.Perturbation: what the ulp change was (tensor, index, old/new, direction)
    used: bool = True  # False: it failed, or an ulp member whose trainer did not apply the perturbation
    why_not: str | None = None
    values: dict[str, float] = field(default_factory=dict)  # its flattened validation metrics
    weights_sha256: str | None = None
    command: str | None = None  # a trainer command, as configured (None: a function, or the reference trainer)
    redraw_of: str | None = None  # the ulp member it was drawn in place of (its change was rounded away in training)


@dataclass
class Band:
    """The ulp band (and the seed band, when measured) of one baseline, per flat metric key."""

    ulp: dict[str, Spread]
    seed: dict[str, Spread]
    members: list[Member]
    n_ulp: int  # ulp members used
    n_seed: int
    source: str = "ulp"  # "ulp": measured with harness band / --band; "repeats": a cell's own repeats
    environment: str | None = None  # where the members ran, in words
    notes: list[str] = field(default_factory=list)  # members left out, and why
    # ulp members whose change training rounded away and that another member replaced: left out, the band whole
    redrawn: list[str] = field(default_factory=list)

    @property
    def measured(self) -> bool:
        """Whether the numerical noise was measured (two or more ulp members)."""
        return self.n_ulp >= MIN_MEMBERS


def _spreads(rows: Sequence[Mapping[str, float]]) -> dict[str, Spread]:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    out = {}
    for key in keys:
        s = spread([row[key] for row in rows if key in row])
        if s is not None:
            out[key] = s
    return out


SEED_HINT = ("declare where the trainer reads its seed (config.yaml trainer.seed_key), or pass {seed} to a trainer "
             "command")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")  # as harness.worker.trainer_cmd reads a command


def seed_hint(command: str | None) -> str:
    """What to do when the seed does not reach this trainer (pure).

    A command's hint follows the placeholders it uses: one that reads the trial's own config.yaml
    from ``{bundle}``, with neither ``{config}`` nor ``{seed}``, sees the trial's seed in every
    member, and is told to take one of those instead.
    """
    if command is None:
        return SEED_HINT
    used = set(_PLACEHOLDER.findall(command))
    copy = "{config} (a copy of config.yaml with the member's seed)"
    if "seed" in used:
        return "the command is given {seed}: check that its training is seeded with it"
    if "config" in used:
        return ("declare where the trainer reads its seed (config.yaml trainer.seed_key): {config} holds the "
                "member's seed at that key; or pass {seed} to the command")
    if "bundle" in used:
        return (f"the command reads {{bundle}}, whose config.yaml holds the trial's seed in every member: pass "
                f"{copy} or {{seed}} instead of reading {{bundle}}")
    return f"pass {copy} or {{seed}} to the command"


def _same(a: Member, b: Member) -> bool:
    """Whether two members trained the same thing: their weights, else (none recorded) their metrics."""
    if a.weights_sha256 and b.weights_sha256:
        return a.weights_sha256 == b.weights_sha256
    return bool(a.values) and a.values == b.values


def unreached_ulp(used: Sequence[Member]) -> str | None:
    """Why an ulp band of ``used`` members is zero wide although they trained different weights (pure).

    A one-ulp float32 change that training carries (the weights differ) but no metric shows
    has been rounded away where the metrics are computed, typically by a forward pass in
    bf16 or fp16. The band then measures no numerical noise at all, and "numerically equal"
    rests on the float32 floor alone; the user should know.
    """
    if len(used) < MIN_MEMBERS or not all(m.values for m in used):
        return None
    digests = {m.weights_sha256 for m in used}
    if None in digests or len(digests) < 2 or any(m.values != used[0].values for m in used[1:]):
        return None
    from .stats import FLOAT32_ULPS

    return (f"the ulp band is zero wide: its {len(used)} members trained different weights but every metric is "
            "identical, so a one-ulp change never reached the metrics (a forward pass in bf16 or fp16 rounds it "
            f"away); 'numerically equal' then means within {FLOAT32_ULPS} float32 ulps of each metric")


ABSORBED = ("it trained the unperturbed run's weights: its one-ulp change was rounded away in training (e.g. by "
            "the optimizer's first step)")


def absorbed(members: Sequence[Member], unperturbed: Collection[str] = ()) -> list[str]:
    """The used ulp members whose one-ulp change training rounded away (pure): their cells, in order.

    A member that trained the unperturbed run's weights (``unperturbed``: its digests, where that run
    is among the records) is a copy of it. So is every member that trained the same weights as
    another member: two different one-ulp changes that both reached training cannot end in the same
    weights, so both were rounded away (an optimizer's first step can move a weight into a binade
    whose ulp is larger than the change). A copy is a draw of nothing: it would pull the band's
    width toward zero, which is no measurement of numerical noise.
    """
    used = [m for m in members if m.kind == "ulp" and m.used and m.weights_sha256]
    changes: dict[str, set[Any]] = {}  # weights -> the distinct changes that trained them
    for m in used:
        changes.setdefault(str(m.weights_sha256), set()).add(_change(m))
    return [m.cell for m in used if m.weights_sha256 in unperturbed or len(changes[str(m.weights_sha256)]) > 1]


def _change(m: Member) -> Any:
    """What one-ulp change ``m`` made: the same change twice (one band measured in two runs) is a repeat, not a copy."""
    p = m.perturbation
    where = tuple(getattr(p, k, None) for k in ("tensor", "index", "new")) if p is not None else (None,) * 3
    return where if any(v is not None for v in where) else m.cell


def seeds_without_effect(members: Sequence[Member]) -> str | None:
    """Why the seed members do not measure seeds: two of them, with different seeds, trained the same (pure).

    A seed band is the spread of retrains with other seeds; members that come out identical
    show that the seed never reached the trainer, and a band of them would be a band of one.
    """
    used = [m for m in members if m.kind == "seed" and m.used]
    for i, a in enumerate(used):
        for b in used[i + 1:]:
            if a.seed != b.seed and _same(a, b):
                what = "weights" if a.weights_sha256 and b.weights_sha256 else "metrics"
                return (f"{a.cell} (seed {a.seed}) and {b.cell} (seed {b.seed}) trained identical {what}: the seed "
                        f"does not reach the trainer; {seed_hint(a.command)}")
    return None


def gate(kind: str, member: int, planned: Sequence[int], finished: Mapping[int, Member]) -> tuple[str, str | None]:
    """Whether band member ``member`` of ``kind`` starts now: ``("run" | "hold" | "skip", why)`` (pure).

    The first members of a band are its probes: the others wait for them, and are not run
    at all when a probe shows that every member would come out the same way. An ulp band
    waits for member 1 (was it perturbed?); a seed band for member 1 (did it run?) and
    then member 2 (did another seed train something else?). ``planned`` are the members of
    that kind in the plan, ``finished`` those already done.
    """
    probes = [1] if kind == "ulp" else [1, 2]
    needed = [m for m in probes if m < member and m in planned]
    if any(m not in finished for m in needed):
        return "hold", None
    for m in needed:
        if not finished[m].used:
            return "skip", f"not run: {finished[m].cell} was not usable, and every {kind} member would be the same"
    if kind == "seed" and len(needed) == 2 and seeds_without_effect([finished[1], finished[2]]) is not None:
        return "skip", f"not run: {finished[1].cell} and {finished[2].cell} trained the same, whatever the seed"
    return "run", None


def measure(members: Sequence[Member], environment: str | None = None, unperturbed: Collection[str] = ()) -> Band:
    """The band of ``members``: per key, the spread of the ulp members used, and of the seed members.

    Seed members that trained identically (:func:`seeds_without_effect`) are all left out, and so
    are ulp members whose change training rounded away (:func:`absorbed`; ``unperturbed``: the
    weights digests of the run the band perturbs, where it is known).
    """
    no_effect = seeds_without_effect(members)
    copies = set(absorbed(members, unperturbed))

    def why_not(m: Member) -> str | None:
        if no_effect and m.kind == "seed" and m.used:
            return no_effect
        return ABSORBED if m.cell in copies else None

    members = [replace(m, used=False, why_not=why) if (why := why_not(m)) else m for m in members]
    used_ulp = [m for m in members if m.kind == "ulp" and m.used]
    used_seed = [m for m in members if m.kind == "seed" and m.used]
    ulp_members = [m for m in members if m.kind == "ulp"]
    notes = []
    skipped = bool(ulp_members) and not used_ulp
    if skipped and all(m.cell in copies for m in ulp_members):
        from .stats import FLOAT32_ULPS

        notes.append(f"the ulp band measured no numerical noise: each of its {len(ulp_members)} members trained the "
                     "unperturbed run's weights (its one-ulp change was rounded away in training, e.g. by the "
                     f"optimizer's first step); 'numerically equal' then means within {FLOAT32_ULPS} float32 ulps of "
                     "each metric")
    elif skipped:
        reasons = list(dict.fromkeys(m.why_not for m in ulp_members if m.why_not))
        notes.append(f"ulp band skipped: {'; '.join(reasons) or 'no member ran'}")
    replaced = {m.redraw_of for m in members if m.redraw_of}
    redrawn = [m.cell for m in members if m.cell in copies and m.cell in replaced]
    left_out: dict[str, list[str]] = {}
    for m in members:
        if not m.used and not (skipped and m.kind == "ulp") and m.cell not in redrawn:
            left_out.setdefault(m.why_not or "not used", []).append(m.cell)
    notes += [f"left out of the band: {', '.join(cells)} ({why})" for why, cells in left_out.items()]
    if 0 < len(used_ulp) < MIN_MEMBERS:
        notes.append(f"the ulp band has {len(used_ulp)} member: a width needs at least {MIN_MEMBERS}")
    zero = unreached_ulp(used_ulp)
    if zero is not None:
        notes.append(zero)
    return Band(ulp=_spreads([m.values for m in used_ulp]), seed=_spreads([m.values for m in used_seed]),
                members=list(members), n_ulp=len(used_ulp), n_seed=len(used_seed), environment=environment,
                notes=notes, redrawn=redrawn)


def from_values(name: str, rows: Sequence[Mapping[str, float]]) -> Band:
    """A band made of a cell's own repeats (``source="repeats"``): used where no ulp band was measured."""
    members = [Member(cell=f"{name}#{i + 1}", kind="ulp", member=i + 1, values=dict(r)) for i, r in enumerate(rows)]
    band = measure(members)
    band.source = "repeats"
    return band
