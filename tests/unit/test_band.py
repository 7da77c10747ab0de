"""The instability band: the one-ulp perturbation, the band's statistics, and verdicts against it.

Pure parts only (constructed records, a model built in-process); the commands end to
end are in tests/cli/test_band.py.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from harness import band as band_mod
from harness.bundle import ModelSpec
from harness.judge import band_conflict
from harness.plan import Cell, band_cells, with_band, Plan
from harness.record import RunSpec
from harness.worker import perturb
from harness.worker.determinism import set_seed
from harness.worker.model import build

from tests.records import ulp_band


# --------------------------------------------------------------------------- the one-ulp perturbation


def _model(seed: int = 3) -> nn.Module:
    set_seed(seed)
    return build(20, 3, ModelSpec(hidden=8, num_layers=3, use_residual=True))


def _rng_states() -> tuple:
    return (torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate())


def _same_rng(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


@pytest.mark.parametrize("seed", [1, 2, 3, 7, 11, 1234])
def test_one_value_moves_by_exactly_one_ulp_and_nothing_else(seed: int) -> None:
    net = _model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng_before = _rng_states()
    done = perturb.apply(net, {"kind": "ulp", "seed": seed})
    # the global RNGs are untouched: everything the run draws later is the unperturbed run's
    assert _same_rng(rng_before, _rng_states())
    after = net.state_dict()
    changed = {k: int((before[k] != after[k]).sum()) for k in before}
    assert {k: n for k, n in changed.items() if n} == {done["tensor"]: 1}
    old_t, new_t = before[done["tensor"]].reshape(-1), after[done["tensor"]].reshape(-1)
    i = done["index"]
    towards = torch.tensor(math.inf if done["direction"] == "+inf" else -math.inf)
    assert torch.equal(new_t[i], torch.nextafter(old_t[i], towards))
    # one ulp: adjacent float32 bit patterns (same sign, so the integers differ by one)
    bits = torch.stack([old_t[i], new_t[i]]).view(torch.int32)
    assert abs(int(bits[1]) - int(bits[0])) == 1
    assert done["applied"] is True and done["kind"] == "ulp" and done["seed"] == seed
    assert float.fromhex(done["old"]) == float(old_t[i]) and float.fromhex(done["new"]) == float(new_t[i])
    assert done["dtype"] == "float32" and done["shape"] == list(before[done["tensor"]].shape)


def test_the_choice_is_seeded_and_recorded_and_differs_between_members() -> None:
    a = perturb.apply(_model(), {"kind": "ulp", "seed": 5})
    b = perturb.apply(_model(), {"kind": "ulp", "seed": 5})
    assert a == b
    choices = {(d["tensor"], d["index"], d["direction"])
               for d in (perturb.apply(_model(), {"kind": "ulp", "seed": s}) for s in range(1, 9))}
    assert len(choices) == 8


def test_training_draws_the_same_random_numbers_with_and_without_the_perturbation() -> None:
    plain, moved = _model(), _model()
    perturb.apply(moved, {"kind": "ulp", "seed": 4})
    drawn = []
    for net in (plain, moved):
        torch.manual_seed(0)
        net.train()
        net(torch.ones(2, 20))  # dropout would draw here
        drawn.append(torch.rand(3))
    assert torch.equal(drawn[0], drawn[1])


def test_choose_is_uniform_over_values_not_tensors() -> None:
    picks = [perturb.choose([("bias", 1), ("weight", 999)], s)[0] for s in range(200)]
    assert picks.count("weight") > 190
    with pytest.raises(ValueError):
        perturb.choose([], 1)


def test_a_non_contiguous_parameter_is_moved_where_its_flat_index_says() -> None:
    net = nn.Module()
    net.w = nn.Parameter(torch.randn(3, 4).t())  # shape (4, 3), not contiguous
    assert not net.w.is_contiguous()
    before = net.w.detach().clone()
    done = perturb.apply(net, {"kind": "ulp", "seed": 9})
    diff = (before != net.w.detach()).nonzero().tolist()
    assert diff == [[done["index"] // 3, done["index"] % 3]]


def test_the_largest_float_moves_down_not_to_infinity() -> None:
    net = nn.Module()
    net.w = nn.Parameter(torch.full((1,), torch.finfo(torch.float32).max))
    for seed in range(8):
        done = perturb.apply(net, {"kind": "ulp", "seed": seed})
        assert math.isfinite(float.fromhex(done["new"]))
        net.w.data.fill_(torch.finfo(torch.float32).max)


def test_a_model_without_float_parameters_is_left_alone_and_says_why() -> None:
    done = perturb.apply(nn.ReLU(), {"kind": "ulp", "seed": 1})
    assert done["applied"] is False and "no floating-point parameters" in done["skipped"]


def test_the_perturber_is_a_no_op_without_a_request_and_applies_once() -> None:
    none = perturb.Perturber(None)
    net = _model()
    assert none(net) is None and none.record("x") is None
    once = perturb.Perturber({"kind": "ulp", "seed": 2})
    first = once(net)
    assert once(net) is first  # a second call does not move a second value
    assert perturb.Perturber({"kind": "ulp", "seed": 2}).record("never called")["skipped"] == "never called"


def test_the_trainer_hook_applies_the_spec_or_does_nothing() -> None:
    from harness.worker.trainer_api import TrainerContext

    base = dict(config={}, seed=1, device="cpu", bundle_dir="/b", data_path="/d", out_dir="/o")
    plain = TrainerContext(**base)
    net = _model()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert plain.perturb(net) is net and plain.perturbation() is None
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    member = TrainerContext(**base, _perturber=perturb.Perturber({"kind": "ulp", "seed": 3}))
    assert member.perturbation()["applied"] is False  # not called yet: the band skips it, with the reason
    assert "never called ctx.perturb(model)" in member.perturbation()["skipped"]
    member.perturb(net)
    assert member.perturbation()["applied"] is True


def test_a_spec_with_a_perturbation_is_validated() -> None:
    from harness.errors import InputError

    spec = RunSpec(cell="band-ulp-1", bundle_dir="/b", out_dir="/o", perturb={"kind": "ulp", "seed": 1},
                   band={"kind": "ulp", "member": 1}, seed=None)
    assert RunSpec.from_json(spec.to_dict()).perturb == {"kind": "ulp", "seed": 1}
    for bad in ({"kind": "bits", "seed": 1}, {"kind": "ulp", "seed": "x"}, {"kind": "ulp"}):
        with pytest.raises(InputError, match="perturb"):
            RunSpec.from_json({**spec.to_dict(), "perturb": bad})
    with pytest.raises(InputError, match="band.kind"):
        RunSpec.from_json({**spec.to_dict(), "band": {"kind": "other", "member": 1}})


# --------------------------------------------------------------------------- planning


def test_band_cells_copy_the_baseline_and_differ_only_by_their_change() -> None:
    base = Cell(name="cpu-strict-t1", device="cpu", determinism="strict", threads=1, repeat=0,
                labels={"device": "cpu", "threads": 1, "repeat": 1})
    cells = band_cells(base, 3, 2, training_seed=42)
    assert [c.name for c in cells] == ["band-ulp-1", "band-ulp-2", "band-ulp-3", "band-seed-1", "band-seed-2"]
    assert all((c.device, c.determinism, c.threads) == ("cpu", "strict", 1) for c in cells)
    assert [c.perturb for c in cells[:3]] == [{"kind": "ulp", "seed": i} for i in (1, 2, 3)]
    assert [c.seed for c in cells] == [None, None, None, 43, 44] and cells[3].perturb is None
    assert cells[0].labels["band_of"] == "cpu-strict-t1" and "repeat" not in cells[0].labels
    plan = with_band(Plan("local", [base, Cell(name="cpu-default-t1")]), 2, 0, 42)
    assert [c.name for c in plan.cells] == ["band-ulp-1", "band-ulp-2", "cpu-strict-t1", "cpu-default-t1"]
    assert [c.name for c in with_band(Plan("local", [base]), 2, 0, 42, only=True).cells] == ["band-ulp-1", "band-ulp-2"]


# --------------------------------------------------------------------------- band statistics


def test_spread_of_constructed_values() -> None:
    s = band_mod.spread([1.0, 2.0, 4.0, float("nan")])
    assert (s.n, s.mean, s.min, s.max, s.range) == (3, 7 / 3, 1.0, 4.0, 3.0)
    assert s.sd == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert band_mod.spread([5.0]).sd is None and band_mod.spread([]) is None


def _member(i: int, kind: str, loss: float, r2: float, used: bool = True) -> band_mod.Member:
    return band_mod.Member(cell=f"band-{kind}-{i}", kind=kind, member=i, used=used,
                           why_not=None if used else "the trainer never called ctx.perturb(model)",
                           values={"val_loss": loss, "r2/a": r2})


def test_band_statistics_per_metric_and_target() -> None:
    b = band_mod.measure([_member(1, "ulp", 0.10, 0.90), _member(2, "ulp", 0.12, 0.91), _member(3, "ulp", 0.11, 0.95),
                          _member(1, "seed", 0.2, 0.5), _member(2, "seed", 0.4, 0.7)])
    assert b.measured and (b.n_ulp, b.n_seed) == (3, 2)
    assert b.ulp["val_loss"].range == pytest.approx(0.02) and b.ulp["r2/a"].range == pytest.approx(0.05)
    assert b.ulp["r2/a"].sd == pytest.approx(float(np.std([0.90, 0.91, 0.95], ddof=1)))
    assert b.ulp["r2/a"].mean == pytest.approx((0.90 + 0.91 + 0.95) / 3)
    assert b.seed["val_loss"].range == pytest.approx(0.2) and "mse/a" not in b.ulp


def test_unperturbed_members_are_left_out_and_the_band_says_so() -> None:
    b = band_mod.measure([_member(1, "ulp", 0.1, 0.9, used=False), _member(2, "ulp", 0.2, 0.9, used=False)])
    assert not b.measured and b.ulp == {}
    assert b.notes == ["ulp band skipped: the trainer never called ctx.perturb(model)"]
    one = band_mod.measure([_member(1, "ulp", 0.1, 0.9), _member(2, "ulp", 0.2, 0.9, used=False)])
    assert not one.measured and any("needs at least 2" in n for n in one.notes)


def _same_seed_members(command: str | None) -> str | None:
    """Why two seed members that trained identical weights measure no seeds, for a trainer running ``command``."""
    return band_mod.seeds_without_effect([
        band_mod.Member(cell=f"band-seed-{i}", kind="seed", member=i, seed=7 + i, weights_sha256="w", command=command)
        for i in (1, 2)])


@pytest.mark.parametrize("command, hint", [
    (None, band_mod.SEED_HINT),  # a function: where it reads its seed
    ("{python} -m p.train {bundle} --out {out_dir}",
     ("the command reads {bundle}, whose config.yaml holds the trial's seed in every member: pass {config} (a copy of "
      "config.yaml with the member's seed) or {seed} instead of reading {bundle}")),
    ("{python} -m p.train --config {config}",
     ("declare where the trainer reads its seed (config.yaml trainer.seed_key): {config} holds the member's seed at "
      "that key; or pass {seed} to the command")),
    ("{python} -m p.train {bundle} --seed={seed}", "the command is given {seed}: check that its training is seeded with it"),
    ("sh {code_dir}/train.sh", "pass {config} (a copy of config.yaml with the member's seed) or {seed} to the command"),
])
def test_the_seed_hint_names_what_the_trainer_can_take_instead(command: str | None, hint: str) -> None:
    why = _same_seed_members(command)
    assert why == (f"band-seed-1 (seed 8) and band-seed-2 (seed 9) trained identical weights: the seed does not reach "
                   f"the trainer; {hint}")


# --------------------------------------------------------------------------- which band a run measured


def test_band_conflict_names_what_differs() -> None:
    recs = ulp_band()
    for r in recs:
        r.bundle = {"config_sha256": "a" * 64}
        r.data_sha256 = "d" * 64
    assert band_conflict(recs, "a" * 64, "d" * 64, None) is None
    assert "another config.yaml" in band_conflict(recs, "b" * 64, "d" * 64, None)
    assert "other data" in band_conflict(recs, "a" * 64, "e" * 64, None)
    assert "ran trainer reference" in band_conflict(recs, "a" * 64, "d" * 64, "mine:train")
    old = ulp_band()  # an older harness recorded no digest: refused where one is expected, not otherwise
    assert "records no config digest" in band_conflict(old, "a" * 64, None, None)
    assert band_conflict(old, None, None, None) is None


def test_an_ulp_band_whose_change_never_reaches_the_metrics_says_so() -> None:
    """bf16 autocast rounds a one-ulp float32 change away: the weights differ, no metric does."""
    def m(i: int, sha: str, loss: float = 0.25) -> band_mod.Member:
        return band_mod.Member(cell=f"band-ulp-{i}", kind="ulp", member=i, values={"val_loss": loss, "val.r2.a": 0.9},
                               weights_sha256=sha)

    zero = band_mod.measure([m(1, "a"), m(2, "b"), m(3, "c")])
    assert any("the ulp band is zero wide" in n and "bf16" in n for n in zero.notes)
    # weights identical too (nothing perturbed reached training), or metrics that moved: no such note
    for members in ([m(1, "a"), m(2, "a"), m(3, "a")], [m(1, "a"), m(2, "b", 0.2500001), m(3, "c")],
                    [m(1, "a"), m(2, None), m(3, "c")]):
        assert not any("zero wide" in n for n in band_mod.measure(members).notes)


def test_ulp_members_whose_change_training_rounded_away_are_left_out_of_the_band() -> None:
    """Seen on an AMD EPYC: both one-ulp changes of a 2-member band were gone after Adam's first step, and the
    members trained the unperturbed run's weights. Such a member is a copy of that run, not a draw of its numerical
    noise: it would pull the width toward zero, so the band leaves it out and says why."""
    def m(i: int, sha: str | None, loss: float) -> band_mod.Member:
        return band_mod.Member(cell=f"band-ulp-{i}", kind="ulp", member=i, values={"val_loss": loss}, weights_sha256=sha)

    # two members with the same weights: both changes were rounded away (two that reached training cannot meet)
    band = band_mod.measure([m(1, "a", 0.25), m(2, "a", 0.25)])
    assert band.n_ulp == 0 and not band.measured and band.ulp == {}
    assert any("measured no numerical noise" in n and "each of its 2 members" in n for n in band.notes), band.notes
    # one copy of another member, one of the unperturbed run (known from its record): the width rests on the rest
    members = [m(1, "a", 0.25), m(2, "a", 0.25), m(3, "b", 0.2500001), m(4, "c", 0.25), m(5, "base", 0.25)]
    assert band_mod.absorbed(members, {"base"}) == ["band-ulp-1", "band-ulp-2", "band-ulp-5"]
    band = band_mod.measure(members, unperturbed={"base"})
    assert band.n_ulp == 2 and band.ulp["val_loss"].range == pytest.approx(1e-7)
    assert [x.cell for x in band.members if not x.used] == ["band-ulp-1", "band-ulp-2", "band-ulp-5"]
    assert any(n.startswith("left out of the band: band-ulp-1, band-ulp-2, band-ulp-5 (it trained the unperturbed")
               for n in band.notes), band.notes
    # distinct weights, unknown weights, a member that was not perturbed, a seed band: nothing is a copy
    for members in ([m(1, "a", 0.25), m(2, "b", 0.2500001)], [m(1, None, 0.25), m(2, None, 0.25)]):
        assert band_mod.absorbed(members, {"z"}) == [] and band_mod.measure(members).n_ulp == 2
    # one band measured in two runs: the same change twice trains the same weights, a repeat and no copy
    from harness.record import Perturbation

    same = Perturbation(kind="ulp", seed=1, applied=True, tensor="w", index=3, new="0x1p-1")
    twice = [band_mod.Member(cell=c, kind="ulp", member=1, perturbation=same, weights_sha256="a") for c in ("x", "y")]
    assert band_mod.absorbed(twice) == [] and band_mod.absorbed(twice, {"a"}) == ["x", "y"]
    unperturbed = band_mod.Member(cell="band-ulp-3", kind="ulp", member=3, used=False, why_not="not perturbed",
                                  values={"val_loss": 0.25}, weights_sha256="a")
    assert band_mod.absorbed([m(1, "a", 0.25), unperturbed]) == []
    seeds = [band_mod.Member(cell=f"band-seed-{i}", kind="seed", member=i, values={"val_loss": 0.2 + i},
                             weights_sha256="base") for i in (1, 2)]
    assert band_mod.absorbed(seeds, {"base"}) == []
