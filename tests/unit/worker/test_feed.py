"""The fast data path: the seeded DataLoader's batch order, replayed, proven, and the same weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

import harness.worker.feed as feed

REPLAY = feed.replay_epoch  # the real one, before any test patches it
from harness.bundle import load_bundle
from harness.errors import InputError
from harness.options import DEFAULT_DATA_PATH
from harness.record import RunSpec
from harness.worker import retrain
from harness.worker.data import prepare
from harness.worker.determinism import set_seed
from harness.worker.train import split_indices, train_reference

from tests.conftest import EXAMPLE, EXAMPLE_CONV, REPO, TESTS

TRAINERS = TESTS / "trainers"


def _seed_loader_epochs(n: int, bs: int, seed: int, drop_last: bool, epochs: int) -> tuple[list, torch.Tensor]:
    """The seed document's loader over positions 0..n-1, written as it is there, iterated ``epochs`` times."""
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(list(range(n)), batch_size=bs, shuffle=True, generator=g, num_workers=0, pin_memory=False,
                        drop_last=drop_last)
    return [[b.tolist() for b in loader] for _ in range(epochs)], g.get_state()


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("seed", [0, 42, 2**40 + 3])
def test_replayed_order_and_generator_state_equal_the_dataloaders(seed: int, drop_last: bool) -> None:
    for n in (1, 7, 16, 57, 1000):
        for bs in (1, 5, 16, 64, 2000):
            want, state = _seed_loader_epochs(n, bs, seed, drop_last, epochs=3)
            g = torch.Generator().manual_seed(seed)
            got = [[b.tolist() for b in feed.replay_epoch(n, bs, g, drop_last)] for _ in range(3)]
            assert got == want, (n, bs)
            assert torch.equal(g.get_state(), state), (n, bs)  # later epochs, and anything after, see the same RNG
            if n == 1000 and bs == 16:
                assert want[0] != want[1]  # a new order each epoch, from the one generator


def test_resident_feed_gives_the_loaders_rows(tmp_path: Path) -> None:
    x = torch.randn(23, 3, 4)
    y = torch.randn(23, 2)
    rows = torch.tensor([5, 0, 22, 7, 1, 9, 13, 2, 11, 3, 17, 19, 4])
    from torch.utils.data import Subset, TensorDataset

    loader = DataLoader(Subset(TensorDataset(x, y), rows.tolist()), batch_size=4, shuffle=True,
                        generator=torch.Generator().manual_seed(7), num_workers=0)
    fast = feed.ResidentFeed((x[rows], y[rows]), 4, torch.Generator().manual_seed(7), torch.device("cpu"))
    assert len(fast) == len(loader) == 4
    for _ in range(2):
        pairs = list(zip(loader, fast))
        assert len(pairs) == 4
        for (xa, ya), (xb, yb) in pairs:
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and xb.is_contiguous()


def test_prove_holds_for_this_torch() -> None:
    assert feed.prove(57, 16, 42) is None
    d = feed.decide("fast", 57, 16, 42)
    assert (d.requested, d.effective, d.fell_back) == ("fast", "fast", False)
    assert torch.__version__ in d.proof
    d = feed.decide(None, 57, 16, 42)
    assert d.requested == DEFAULT_DATA_PATH == d.effective
    assert feed.decide("loader", 57, 16, 42).proof == "not attempted"


def _without_trailing_draw(n, bs, g, drop_last=False):
    torch.empty((), dtype=torch.int64).random_(generator=g)
    return list(torch.randperm(n, generator=g).split(bs))  # right order, one draw short


def _reversed(n, bs, g, drop_last=False):
    return [b.flip(0) for b in REPLAY(n, bs, g, drop_last)]


def test_a_replay_that_differs_is_refused_with_the_reason(monkeypatch) -> None:
    d = feed.decide("fast", 57, 16, 42, replay=_without_trailing_draw)
    assert (d.effective, d.fell_back) == ("loader", True)
    assert "epoch 1: the generator's state after the replay differs" in d.proof
    d = feed.decide("fast", 57, 16, 42, replay=_reversed)
    assert "epoch 1, batch 1: the replayed sample order differs" in d.proof and d.effective == "loader"
    monkeypatch.setattr(feed, "replay_epoch", _without_trailing_draw)  # a torch whose loader draws otherwise
    assert feed.decide("fast", 57, 16, 42).effective == "loader"


def test_a_split_too_big_for_the_device_stays_on_the_loader() -> None:
    d = feed.decide("fast", 57, 16, 42, nbytes=600 * 2**20, free_bytes=1000 * 2**20)
    assert d.effective == "loader" and d.fell_back
    assert "the train split (600 MiB) would take more than half of the device's free memory (1000 MiB)" in d.proof
    assert feed.decide("fast", 57, 16, 42, nbytes=400 * 2**20, free_bytes=1000 * 2**20).effective == "fast"
    assert feed.device_free_bytes(torch.device("cpu")) is None


def test_fast_trains_the_loaders_weights_in_process(make_bundle) -> None:
    bundle = load_bundle(make_bundle(training__epochs=3, training__batch_size=7))
    data = prepare(bundle.data)
    split = split_indices(len(data.X), bundle.data.split, bundle.training.seed)
    outs = {}
    for path in ("loader", "fast"):
        set_seed(bundle.training.seed)
        _, outs[path] = train_reference(data, split, data.y, bundle.model, bundle.training, torch.device("cpu"),
                                        data_path=path)
        assert outs[path].extra["data_path"]["effective"] == path
        outs[path].global_rng_after = torch.get_rng_state()  # dropout's RNG: the feed never touches it
    for k, v in outs["loader"].best_state.items():
        assert torch.equal(v, outs["fast"].best_state[k]) and torch.equal(outs["loader"].last_state[k], outs["fast"].last_state[k])
    assert outs["loader"].history == outs["fast"].history
    assert torch.equal(outs["loader"].global_rng_after, outs["fast"].global_rng_after)


def test_a_forced_mismatch_in_the_worker_falls_back_and_records_why(example: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(feed, "replay_epoch", _reversed)
    rec = retrain.run(RunSpec(cell="run", bundle_dir=str(example), out_dir=str(tmp_path / "o"), determinism="default",
                              data_feed="fast"))
    assert rec.data_feed.requested == "fast" and rec.data_feed.effective == "loader" and rec.data_feed.fell_back
    assert "sample order differs" in rec.data_feed.proof
    assert any(w.startswith("--data-path fast was not used: fell back to the DataLoader") for w in rec.warnings)
    assert rec.spec["data_feed"] == "fast"


def test_the_spec_field_is_optional_in_runspec_4() -> None:
    plain = RunSpec(cell="c", bundle_dir="b", out_dir="o").to_dict()
    assert "data_feed" not in plain  # what every /4 worker read before: unchanged
    assert RunSpec.from_json(plain).data_feed is None
    fast = RunSpec(cell="c", bundle_dir="b", out_dir="o", data_feed="fast").to_dict()
    assert fast["data_feed"] == "fast" and fast["schema"] == "harness.runspec/4"
    assert RunSpec.from_json(fast).data_feed == "fast"
    with pytest.raises(InputError, match="data_feed must be one of loader, fast"):
        RunSpec.from_json({**fast, "data_feed": "quick"})


def harness(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, env=env, timeout=900)


def _shorter(example_dir: Path, dest: Path, epochs: int) -> Path:
    """The example's config and data with fewer epochs, without its trial: the paths' equality is per batch,
    and a few epochs past the proof's show it as well as the example's full length (minutes on 2 cores)."""
    shutil.copytree(example_dir, dest, ignore=shutil.ignore_patterns("weights", "trial_info.yaml"))
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    cfg["data"]["path"] = str((example_dir / cfg["data"]["path"]).resolve())
    cfg["training"]["epochs"] = epochs
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


@pytest.mark.parametrize("example_dir", [EXAMPLE, EXAMPLE_CONV], ids=["mlp", "conv1d"])
def test_the_examples_train_identical_weights_on_both_paths(example_dir: Path, tmp_path: Path) -> None:
    from harness.worker.feed import PROOF_EPOCHS

    bundle = _shorter(example_dir, tmp_path / "bundle", PROOF_EPOCHS + 3)
    recs = {}
    for path in ("loader", "fast"):
        out = tmp_path / path
        p = harness("run", str(bundle), "--device", "cpu", "--data-path", path, "--out", str(out), "--no-progress")
        assert p.returncode == 0, p.stdout + p.stderr
        recs[path] = json.loads((out / "run" / "record.json").read_text())
        assert recs[path]["data_feed"]["effective"] == path and recs[path]["spec"]["data_feed"] == path
    assert recs["fast"]["weights_sha256"] == recs["loader"]["weights_sha256"]
    assert recs["fast"]["last_weights_sha256"] == recs["loader"]["last_weights_sha256"]
    assert recs["fast"]["history"] == recs["loader"]["history"]
    assert recs["fast"]["warnings"] == recs["loader"]["warnings"]


def test_a_bad_data_path_is_a_usage_error(tmp_path: Path) -> None:
    p = harness("run", str(EXAMPLE), "--data-path", "quick", "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "--data-path: invalid choice: 'quick'" in p.stderr
    assert not (tmp_path / "o").exists()


def test_a_custom_trainer_is_untouched_and_told(make_bundle, tmp_path: Path) -> None:
    root = make_bundle("custom")
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg["trainer"] = {"entrypoint": "seed_style:train", "code_dir": str(TRAINERS)}
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    rec = retrain.run(RunSpec(cell="run", bundle_dir=str(root), out_dir=str(tmp_path / "o"), determinism="default",
                              data_feed="fast"))
    assert rec.data_feed is None and rec.status.value == "ok"
    assert "--data-path fast applies to the reference trainer only: this trainer feeds its own data" in rec.warnings
