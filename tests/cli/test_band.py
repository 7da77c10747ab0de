"""`harness band`, `--band`, `--band-from` and `harness compare` with a band, through real child processes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from harness import record
from harness.record import Status

from tests.conftest import EXAMPLE, ON_TRIAL_CPU, REPO
from tests.records import record as make_record
from tests.records import seed_band, ulp_band
from tests.cli.test_cli import TRAINERS, harness


@pytest.fixture(scope="module")
def example_band(tmp_path_factory) -> dict:
    """The bundled example's band: 3 ulp members and 2 seed members, measured once for the module."""
    root = tmp_path_factory.mktemp("band")
    shutil.copytree(EXAMPLE, root / "examples" / "optuna_best")
    shutil.copytree(REPO / "examples" / "data", root / "examples" / "data")
    bundle = root / "examples" / "optuna_best"
    out = root / "band"
    p = harness("band", str(bundle), "--n", "3", "--band-seeds", "2", "--backend", "local", "--device", "cpu",
                "-o", str(out), "--json", str(root / "band.json"), "--markdown", str(root / "band.md"),
                "--no-progress", timeout=900)
    return {"root": root, "bundle": bundle, "out": out, "proc": p}


def test_band_of_the_example_end_to_end(example_band) -> None:
    p, out = example_band["proc"], example_band["out"]
    assert p.returncode == 0, p.stdout + p.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["cells"] == ["band-ulp-1", "band-ulp-2", "band-ulp-3", "band-seed-1", "band-seed-2"]
    recs = {r.cell: r for r in record.load(out).records}
    assert list(recs) == manifest["cells"] and all(r.status is Status.OK for r in recs.values())
    trial = yaml.safe_load((example_band["bundle"] / "trial_info.yaml").read_text())
    names = set(torch.load(example_band["bundle"] / "weights" / "best.pt", weights_only=True))
    for i in (1, 2, 3):
        r = recs[f"band-ulp-{i}"]
        assert r.band.to_dict() == {"kind": "ulp", "member": i, "seed": 42} and r.labels["band"] == "ulp"
        p_ = r.perturbation
        assert p_.applied is True and p_.seed == i and p_.tensor in names
        assert float.fromhex(p_.old) != float.fromhex(p_.new) and p_.direction in ("+inf", "-inf")
        assert r.weights_sha256 != trial["user_attrs"]["weights_sha256"]  # one ulp is enough to move the result
        assert r.bundle["config_sha256"] and r.spec["perturb"] == {"kind": "ulp", "seed": i}
    seed = recs["band-seed-1"]
    assert seed.band.to_dict() == {"kind": "seed", "member": 1, "seed": 43, "seed_via": [
        "training.seed", "the global RNGs (random, numpy, torch) seeded before training"]} and seed.perturbation is None
    assert seed.determinism["seed"] == 43 and seed.spec["seed"] == 43
    # another seed trains differently, on the trial's split: scored on the same validation samples
    assert seed.split["indices_sha256"] == recs["band-ulp-1"].split["indices_sha256"]
    assert seed.scaler["refit_matches"] is True
    text = " ".join(p.stdout.split())
    assert "Band: 3 retrains of the baseline, each with one initial weight moved by one ulp; 2 with other seeds" in text
    for key in ("val_loss", "r2/amplitude", "mse/frequency", "mae/coupling"):
        assert key in p.stdout
    report = json.loads((example_band["root"] / "band.json").read_text())
    band = report["comparison"]["band"]
    assert band["n_ulp"] == 3 and band["n_seed"] == 2 and band["ulp"]["val_loss"]["n"] == 3
    assert band["ulp"]["val_loss"]["range"] > 0
    md = (example_band["root"] / "band.md").read_text()
    assert "Band: 3 retrains" in md and "| r2/amplitude |" in md


def test_a_saved_band_is_reused_and_merged_by_compare(example_band, tmp_path: Path) -> None:
    assert example_band["proc"].returncode == 0
    run = tmp_path / "run"
    p = harness("run", str(example_band["bundle"]), "--device", "cpu", "--band-from", str(example_band["out"]),
                "-o", str(run), "--no-progress", "--json", str(tmp_path / "r.json"))
    assert p.returncode == 0, p.stdout + p.stderr
    rung = "bitwise" if ON_TRIAL_CPU else "numerically equal"
    assert "evidence" in p.stdout and rung in p.stdout and "band: 3 retrains" in " ".join(p.stdout.split())
    assert json.loads((run / "run.json").read_text())["band_from"] == str(example_band["out"].resolve())
    assert [r.cell for r in record.load(run).records if not r.band] == ["run"]
    cell = json.loads((tmp_path / "r.json").read_text())["comparison"]["cells"][0]
    assert cell["ladder"]["rung"] == rung and cell["ladder"]["reference"] == "recorded trial"
    # compare reads the band run.json names, and merges a band given beside the records
    for args in ([str(run)], [str(run / "run" / "record.json"), str(example_band["out"])]):
        c = harness("compare", *args)
        assert c.returncode == 0, c.stdout + c.stderr
        assert "band: 3 retrains" in " ".join(c.stdout.split()) and rung in c.stdout


def test_a_band_of_another_config_is_refused_in_one_line(example_band, tmp_path: Path) -> None:
    assert example_band["proc"].returncode == 0
    other = tmp_path / "examples" / "optuna_best"
    shutil.copytree(example_band["bundle"], other)
    shutil.copytree(example_band["root"] / "examples" / "data", tmp_path / "examples" / "data")
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["training"]["epochs"] = 24
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    p = harness("run", str(other), "--device", "cpu", "--band-from", str(example_band["out"]), "-o", str(out))
    assert p.returncode == 2, p.stdout + p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert "is not a band of this bundle" in line and "another config.yaml" in line and "harness band" in line
    assert not list(out.glob("*/record.json"))  # refused before anything trained
    # a directory holding no band at all
    plain = tmp_path / "plain"
    (plain / "cell").mkdir(parents=True)
    record.write(plain / "cell" / "record.json", make_record("cell"))
    p = harness("run", str(example_band["bundle"]), "--band-from", str(plain), "-o", str(tmp_path / "o2"))
    assert p.returncode == 2 and "holds no band records" in p.stderr


def _write(dir_: Path, recs) -> Path:
    for r in recs:
        record.write(dir_ / r.cell / "record.json", r)
    return dir_


def test_compare_exits_3_for_a_cell_outside_the_seed_band(tmp_path: Path) -> None:
    cells = _write(tmp_path / "cells", [make_record("base", started_at="1"),
                                        make_record("far", r2=0.8, loss=0.15, sha="w2", started_at="2")])
    band = _write(tmp_path / "band", ulp_band(width=1e-5) + seed_band([0.88, 0.90, 0.92, 0.89, 0.91, 0.905, 0.895, 0.9]))
    p = harness("compare", str(cells))  # no seed band: beyond numerical noise, and not judged
    assert p.returncode == 0, p.stdout + p.stderr
    assert "not judged: 1 cell(s) beyond numerical noise" in p.stdout and "drifted" not in p.stdout
    p = harness("compare", str(cells), str(band))
    assert p.returncode == 3, p.stdout + p.stderr
    assert "≠ far drifted vs the recorded trial:" in p.stdout and "8 seeds" in p.stdout
    p = harness("compare", str(cells), str(band), "--alpha", "0.7")
    assert p.returncode == 2 and "--alpha '0.7' is not a probability" in p.stderr


def test_band_first_in_a_matrix(make_bundle, tmp_path: Path) -> None:
    root = make_bundle()
    out = tmp_path / "o"
    p = harness("matrix", str(root), "--backend", "local", "--devices", "cpu", "--determinism", "strict,default",
                "--threads", "1", "--band", "2", "--band-seeds", "2", "--out", str(out), "--no-progress", "--detail")
    assert p.returncode == 0, p.stdout + p.stderr
    cells = json.loads((out / "run.json").read_text())["cells"]
    assert cells[:6] == ["band-ulp-1", "band-ulp-2", "band-seed-1", "band-seed-2", "cpu-strict-t1", "cpu-default-t1"]
    recs = {r.cell: r for r in record.load(out).records}
    # band-ulp-2 moves a weight of -4.8e-4, which the first step (lr 0.01) rounds its change out of: drawn again after
    for i, name in enumerate(cells[6:], 3):
        assert name == f"band-ulp-{i}" and recs[name].labels["redraw_of"].startswith("band-ulp-")
    assert recs["band-ulp-1"].labels["band_of"] == "cpu-strict-t1" and recs["band-ulp-1"].env.threads == 1
    assert recs["band-ulp-1"].determinism["mode"] == "strict"
    assert "evidence" in p.stdout and "|Δ|/seed sd" in p.stdout  # two seed members: a spread to read |Δ| in
    results = p.stdout[p.stdout.index("Results"):p.stdout.index("Band:")]
    assert "band-ulp" not in results and "cpu-default-t1" in results


def _custom_bundle(make_bundle, **cfg_extra) -> Path:
    return _custom_bundle_named(make_bundle, "custom", **cfg_extra)


def _custom_bundle_named(make_bundle, name: str, **cfg_extra) -> Path:
    root = make_bundle(name)
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg["trainer"] = {"entrypoint": "seed_style:train", "code_dir": str(TRAINERS)}
    cfg.update(cfg_extra)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_a_custom_trainer_that_calls_the_hook_gets_its_band(make_bundle, tmp_path: Path) -> None:
    root = _custom_bundle(make_bundle, perturb_hook=True)
    p = harness("band", str(root), "--n", "2", "--device", "cpu", "-o", str(tmp_path / "b"), "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    recs = record.load(tmp_path / "b").records
    assert [r.perturbation.applied for r in recs] == [True, True]
    assert {r.perturbation.tensor for r in recs} <= {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert recs[0].weights_sha256 != recs[1].weights_sha256


def test_a_custom_trainer_that_never_calls_the_hook_is_perturbed_through_torch_hooks(make_bundle,
                                                                                     tmp_path: Path) -> None:
    runs = {}
    for hook in (True, False):
        root = _custom_bundle(make_bundle, perturb_hook=hook) if hook else _custom_bundle_named(make_bundle, "plain")
        p = harness("band", str(root), "--n", "2", "--device", "cpu", "-o", str(tmp_path / f"b{hook}"),
                    "--no-progress")
        assert p.returncode == 0, p.stdout + p.stderr
        runs[hook] = record.load(tmp_path / f"b{hook}").records
    for a, b in zip(runs[True], runs[False]):
        assert a.perturbation.via == "ctx.perturb" and "forward pre-hook" in b.perturbation.via
        assert b.perturbation.applied is True and b.perturbation.updated is True
        keys = ("tensor", "index", "direction", "old", "new")
        assert {k: getattr(a.perturbation, k) for k in keys} == {k: getattr(b.perturbation, k) for k in keys}
        assert a.weights_sha256 == b.weights_sha256  # the same one-ulp change, the same training


def test_a_band_whose_first_member_cannot_be_perturbed_stops_there(make_bundle, tmp_path: Path) -> None:
    root = _custom_bundle(make_bundle, functional=True)  # bare tensors: no nn.Module for the hooks to find
    p = harness("band", str(root), "--n", "4", "--device", "cpu", "-o", str(tmp_path / "b"), "--no-progress")
    assert p.returncode == 1, p.stdout + p.stderr  # asked for a band, got none: never an unperturbed "band"
    text = " ".join(p.stdout.split())
    assert "ulp band skipped" in text and "no module holding trainable parameters" in text
    recs = {r.cell: r for r in record.load(tmp_path / "b").records}
    assert recs["band-ulp-1"].status is Status.OK and recs["band-ulp-1"].perturbation.applied is False
    for n in (2, 3, 4):  # one retrain spent, not four
        assert recs[f"band-ulp-{n}"].status is Status.SKIPPED and recs[f"band-ulp-{n}"].wall_s is None


def test_a_seed_band_whose_seed_does_not_reach_the_trainer_stops_after_two(make_bundle, tmp_path: Path) -> None:
    root = _custom_bundle(make_bundle, ignore_seed=True)
    p = harness("band", str(root), "--n", "0", "--band-seeds", "5", "--device", "cpu", "-o", str(tmp_path / "b"),
                "--no-progress")
    text = " ".join(p.stdout.split())
    assert p.returncode == 1 and "the seed does not reach the trainer" in text, p.stdout + p.stderr
    recs = {r.cell: r for r in record.load(tmp_path / "b").records}
    assert [recs[f"band-seed-{n}"].status for n in (1, 2)] == [Status.OK, Status.OK]
    assert recs["band-seed-1"].weights_sha256 == recs["band-seed-2"].weights_sha256
    assert recs["band-seed-1"].band.seed_via[0] == "config.yaml training.seed, as the trainer is handed it"
    assert all(recs[f"band-seed-{n}"].status is Status.SKIPPED for n in (3, 4, 5))


FIT = "{python} {code_dir}/cmd_fit.py --data {data} --out {out_dir}"  # tests/trainers/cmd_fit.py: trains, seeds itself
COMMAND_SEED_VIA = ["the environment: HARNESS_SEED, and HARNESS_CONFIG (a copy of config.yaml with the seed at training.seed)",
                    "the global RNGs of every Python process of the command, seeded at interpreter start"]


def _command_band(root: Path, out: Path, command: str, *args: str):
    return harness("band", str(root), "--trainer-cmd", command, "--trainer-path", str(TRAINERS), *args,
                   "--device", "cpu", "--threads", "1", "-o", str(out), "--no-progress")


def test_a_command_band_whose_first_member_cannot_be_perturbed_stops_there(make_bundle, tmp_path: Path) -> None:
    root = make_bundle()
    command = "{python} -c 'import json; print(json.dumps(dict(val_loss=0.5)))'"  # imports torch (the hook), trains nothing
    p = _command_band(root, tmp_path / "b", command, "--n", "3")
    assert p.returncode == 1, p.stdout + p.stderr  # asked for a band, got none
    text = " ".join(p.stdout.split())
    assert "ulp band skipped" in text and "no module holding trainable parameters was ever called" in text
    recs = {r.cell: r for r in record.load(tmp_path / "b").records}
    first = recs["band-ulp-1"]
    assert first.status is Status.OK and first.perturbation.applied is False
    assert first.trainer["python_processes"]  # the command's Python ran, with the hooks, and perturbed nothing
    for n in (2, 3):  # one retrain spent, not three
        r = recs[f"band-ulp-{n}"]
        assert r.status is Status.SKIPPED and r.wall_s is None
        assert r.error.message.startswith("not run: band-ulp-1 was not usable"), r.error.message


def test_a_command_seed_band_whose_seed_does_not_reach_the_training_stops_after_two(make_bundle,
                                                                                   tmp_path: Path) -> None:
    """The command reads the trial's own {bundle}/config.yaml and seeds itself from it: every member trains the same."""
    root = make_bundle()
    p = _command_band(root, tmp_path / "b", FIT + " --bundle {bundle}", "--n", "0", "--band-seeds", "3")
    text = " ".join(p.stdout.split())
    assert p.returncode == 1 and "the seed does not reach the trainer" in text, p.stdout + p.stderr
    assert ("the command reads {bundle}, whose config.yaml holds the trial's seed in every member: pass {config} (a "
            "copy of config.yaml with the member's seed) or {seed} instead of reading {bundle}") in text
    recs = {r.cell: r for r in record.load(tmp_path / "b").records}
    one, two = recs["band-seed-1"], recs["band-seed-2"]
    assert one.status is Status.OK and two.status is Status.OK and (one.band.seed, two.band.seed) == (8, 9)
    assert one.weights_sha256 == two.weights_sha256 and one.extra["seed"] == two.extra["seed"] == 7
    assert one.band.seed_via == COMMAND_SEED_VIA  # neither {seed} nor {config} in this command
    assert recs["band-seed-3"].status is Status.SKIPPED and recs["band-seed-3"].wall_s is None


def test_a_command_seed_band_through_seed_trains_each_seed(make_bundle, tmp_path: Path) -> None:
    root = make_bundle()
    p = _command_band(root, tmp_path / "b", FIT + " --bundle {bundle} --seed {seed}", "--n", "0", "--band-seeds", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    recs = {r.cell: r for r in record.load(tmp_path / "b").records}
    one, two = recs["band-seed-1"], recs["band-seed-2"]
    assert (one.extra["seed"], two.extra["seed"]) == (one.band.seed, two.band.seed) == (8, 9)
    assert one.weights_sha256 != two.weights_sha256  # another seed, other weights: the band has a spread
    assert one.band.seed_via == ["{seed} in the command", *COMMAND_SEED_VIA]  # and no {config}: it has none


@pytest.mark.parametrize("args, words", [
    (["band", "B", "--n", "1"], "--n 1 measures no spread"),
    (["band", "B", "--backend", "docker"], "needs the image"),
    (["run", "B", "--band", "3", "--band-from", "X"], "--band-from reuses a band"),
    (["matrix", "B", "--band-seeds", "2", "--cell-seeds", "4"], "--cell-seeds 4 pairs each cell's seeds"),
    (["matrix", "B", "--band-seeds", "1"], "--band-seeds 1 measures no spread"),
    (["band", "B", "--n", "0"], "harness band measures nothing"),
    (["run", "B", "--alpha", "x"], "--alpha 'x' is not a probability"),
    (["run", "B", "--band", "x"], "--band 'x' is not an integer"),
])
def test_band_usage_errors_are_one_line(example: Path, args: list[str], words: str) -> None:
    p = harness(*[str(example) if a == "B" else a for a in args])
    assert p.returncode == 2 and words in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_compare_refuses_a_band_of_another_config_and_counts_a_band_once(tmp_path: Path) -> None:
    base = make_record("base")
    base.bundle = {"config_sha256": "a" * 64}
    cells = _write(tmp_path / "cells", [base])
    members = ulp_band()
    for m in members:
        m.bundle = {"config_sha256": "b" * 64}
    band = _write(tmp_path / "band", members)
    p = harness("compare", str(cells), str(band))
    assert p.returncode == 2 and "the band given is not of these cells" in p.stderr and "another config.yaml" in p.stderr
    for m in members:
        m.bundle = {"config_sha256": "a" * 64}
    band = _write(tmp_path / "band2", members)
    p = harness("compare", str(cells), str(band), str(band), "--json", str(tmp_path / "r.json"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads((tmp_path / "r.json").read_text())["comparison"]["band"]["n_ulp"] == len(members)


def test_a_seed_band_is_measured_after_the_cells_only_when_one_needs_it(make_bundle, tmp_path: Path) -> None:
    """--band-seeds auto: a trial no retrain here could give gets 8 seed retrains, announced, then a verdict."""
    far = make_bundle("far", trial_info={"value": 123.0})
    out = tmp_path / "far"
    p = harness("run", str(far), "--device", "cpu", "--threads", "1", "--out", str(out), "--no-progress")
    assert p.returncode == 3, p.stdout + p.stderr
    assert "measuring the seed band to judge them: 8 retrains of run" in " ".join(p.stderr.split())
    cells = json.loads((out / "run.json").read_text())["cells"]
    assert cells == [f"band-seed-{i}" for i in range(1, 9)] + ["run"]  # run.json lists what ran, in table order
    assert "trial tested" in p.stdout and "drifted" in p.stdout
    # a trial with nothing to judge numbers against (no metric recorded): nothing follows
    near = make_bundle("near", trial_info={"number": 3})
    p = harness("run", str(near), "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "near"), "--no-progress")
    assert p.returncode == 0 and "measuring" not in p.stderr, p.stdout + p.stderr
    # --band-seeds 0: never; the difference is reported, not judged
    p = harness("run", str(far), "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "never"),
                "--band-seeds", "0", "--no-progress")
    assert p.returncode == 0 and "measuring" not in p.stderr and "not judged" in p.stdout, p.stdout + p.stderr


def test_cell_seeds_retrain_each_cell_with_the_bands_seeds(make_bundle, tmp_path: Path) -> None:
    root = make_bundle()
    out = tmp_path / "o"
    p = harness("matrix", str(root), "--backend", "local", "--devices", "cpu", "--determinism", "strict,default",
                "--threads", "1", "--band-seeds", "2", "--cell-seeds", "2", "--out", str(out), "--no-progress", "--detail")
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads((out / "run.json").read_text())["cells"] == [
        "band-seed-1", "band-seed-2", "cpu-strict-t1", "cpu-default-t1",
        "cpu-strict-t1-seed-1", "cpu-strict-t1-seed-2", "cpu-default-t1-seed-1", "cpu-default-t1-seed-2"]
    recs = {r.cell: r for r in record.load(out).records}
    for cell in ("cpu-strict-t1", "cpu-default-t1"):
        for i in (1, 2):
            mine = recs[f"{cell}-seed-{i}"]
            assert {k: v for k, v in mine.band.to_dict().items() if k != "seed_via"} == {
                "kind": "cell-seed", "member": i, "of": cell, "seed": 7 + i}
            assert mine.band.seed_via[0] == "training.seed"
            # the band ran where this cell runs: its seed-i retrain is the band's, bit for bit
            assert mine.weights_sha256 == recs[f"band-seed-{i}"].weights_sha256
    results = p.stdout[p.stdout.index("Results"):]
    assert "cpu-strict-t1-seed-1" not in results.split("Band")[0]  # a cell's seeds are its evidence, not rows


def test_cell_seeds_against_a_saved_band_without_enough_seeds_is_refused_before_training(
        example_band, tmp_path: Path) -> None:
    out = tmp_path / "o"
    p = harness("run", str(example_band["bundle"]), "--device", "cpu", "--band-from", str(example_band["out"]),
                "--cell-seeds", "4", "-o", str(out))
    assert p.returncode == 2, p.stdout + p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert "holds 2 seed member(s); --cell-seeds 4" in line and "--band-seeds 4" in line
    assert not list(out.glob("*/record.json"))  # nothing trained


def _lora_bundle(make_bundle, name: str, perturb: str, **more: int) -> Path:
    root = make_bundle(name)
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg["trainer"] = {"entrypoint": "lora_head:train", "code_dir": str(TRAINERS)}
    cfg["perturb"] = perturb
    cfg.update(more)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _hits_zero(seed: int) -> bool:
    """Whether ulp member ``seed``'s change lands in the LoRA head's zero-initialised B (tests/trainers/lora_head.py)."""
    from harness.worker.perturb import choose

    sys.path.insert(0, str(TRAINERS))
    try:
        import lora_head
    finally:
        sys.path.remove(str(TRAINERS))
    head = lora_head.build(48, 2)[2]
    return choose([(n, p.numel()) for n, p in head.named_parameters()], seed)[0] == "lora_b"


def test_an_ulp_member_whose_change_training_rounds_away_is_drawn_again(make_bundle, tmp_path: Path) -> None:
    """A one-ulp change of a zero weight (LoRA's B) is gone after Adam's first step, on any CPU: that member trains
    the unperturbed run's weights. It is left out of the band and drawn again, until the band has as many members
    that measure something as were asked for (here member 3, then its redraw 4, then 5)."""
    assert [_hits_zero(s) for s in range(1, 6)] == [False, False, True, True, False]  # what this test rests on
    root = _lora_bundle(make_bundle, "lora", "head")
    out = tmp_path / "out"
    p = harness("run", str(root), "--band", "3", "--band-seeds", "0", "--device", "cpu", "-o", str(out),
                "--json", str(tmp_path / "r.json"), "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    recs = {r.cell: r for r in record.load(out).records}
    base = next(r for name, r in recs.items() if not r.band)
    assert sorted(n for n in recs if n.startswith("band-ulp-")) == [f"band-ulp-{i}" for i in range(1, 6)]
    for i in range(1, 6):
        r = recs[f"band-ulp-{i}"]
        assert r.perturbation.applied and r.perturbation.seed == i and r.band.member == i
        assert (r.weights_sha256 == base.weights_sha256) == _hits_zero(i), i  # rounded away exactly where drawn in B
    assert recs["band-ulp-4"].labels["redraw_of"] == "band-ulp-3" and recs["band-ulp-5"].labels["redraw_of"] == "band-ulp-4"
    assert "redraw_of" not in recs["band-ulp-2"].labels
    err = " ".join(p.stderr.split())
    assert "drawing again: band-ulp-4 for band-ulp-3" in err and "drawing again: band-ulp-5 for band-ulp-4" in err
    band = json.loads((tmp_path / "r.json").read_text())["comparison"]["band"]
    assert band["n_ulp"] == 3  # as many as asked for, each a measurement
    # left out, each replaced: the band is whole, which the report says beside the band and not as a warning
    assert [m["cell"] for m in band["members"] if not m["used"]] == ["band-ulp-3", "band-ulp-4"]
    assert all(m["why_not"].startswith("it trained the unperturbed run's weights") for m in band["members"]
               if not m["used"])
    assert band["redrawn"] == ["band-ulp-3", "band-ulp-4"] and band["notes"] == []
    out_text = " ".join(p.stdout.split())
    assert "band: 3 retrains, one weight moved by an ulp (the noise; 2 drawn again: training rounded the change away)" \
        in out_text and "left out of the band" not in out_text
    detail = harness("compare", str(out), "--detail")
    assert "(band-ulp-3, band-ulp-4 drawn again: training rounded their change away)" in " ".join(detail.stdout.split())
    assert json.loads((out / "run.json").read_text())["cells"][-2:] == ["band-ulp-4", "band-ulp-5"]


def test_a_band_every_change_of_which_is_rounded_away_is_drawn_again_once_and_measures_nothing(
        make_bundle, tmp_path: Path) -> None:
    # every change lands in B (16 zeros at rank 8: the 4 changes drawn are 4 different ones), every one rounded away
    root = _lora_bundle(make_bundle, "lora_b", "lora_b", rank=8)
    out = tmp_path / "out"
    p = harness("band", str(root), "--n", "2", "--band-seeds", "0", "--device", "cpu", "-o", str(out),
                "--no-progress")
    assert p.returncode == 1, p.stdout + p.stderr  # asked for a band, got none: never a zero-wide "band"
    recs = record.load(out).records
    # two asked for, two drawn again, then no more: the cost is bounded by the band's size
    assert [r.cell for r in recs] == ["band-ulp-1", "band-ulp-2", "band-ulp-3", "band-ulp-4"]
    assert len({r.weights_sha256 for r in recs}) == 1 and all(r.perturbation.tensor == "lora_b" for r in recs)
    assert len({(r.perturbation.index, r.perturbation.direction) for r in recs}) == 4  # four different changes
    text = " ".join(p.stdout.split())
    assert "the ulp band measured no numerical noise: each of its 4 members trained the unperturbed run's weights" in text
