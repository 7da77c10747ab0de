"""A reference training that diverges is said to diverge: at which epoch, with what loss, in one line.

It used to end in ``TypeError: Expected state_dict to be dict-like, got NoneType``: with every
validation loss NaN no epoch is "best", and loading the missing best weights failed.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import record
from harness.bundle import TrainingSpec, load_bundle
from harness.record import Status
from harness.worker.data import prepare
from harness.worker.determinism import set_seed
from harness.worker.train import Diverged, _diverged, split_indices, train_reference

from tests.conftest import REPO, patience


def _train(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    data = prepare(bundle.data)
    split = split_indices(len(data.X), bundle.data.split, bundle.training.seed)
    set_seed(bundle.training.seed)
    return train_reference(data, split, data.y, bundle.model, bundle.training, torch.device("cpu"))


def test_cli_run_of_a_diverging_training_is_one_line(make_bundle, tmp_path: Path) -> None:
    bundle = make_bundle(training__learning_rate=1e30, training__epochs=3)
    out = tmp_path / "out"
    env = dict(os.environ, COLUMNS="400", PYTHONPATH=str(REPO))
    env.pop("HARNESS_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "harness", "run", str(bundle), "--out", str(out), "--device", "cpu",
                        "--no-progress"], capture_output=True, text=True, env=env, timeout=patience(120))
    assert p.returncode == 1, p.stdout + p.stderr
    (rec,) = record.load(out).records
    assert rec.status is Status.FAILED and rec.error is not None
    assert rec.error.kind == "diverged" and rec.error.exit_status == 1, rec.error
    msg = rec.error.message
    assert "\n" not in msg and rec.error.traceback is None
    assert msg.startswith("the training diverged: its loss was nan at step "), msg
    assert "(epoch 1 of 3; validation loss nan)" in msg, msg
    assert "stopped after epoch 1: the weights are no longer finite" in msg
    assert "lower training.learning_rate in config.yaml (now 1e+30)" in msg
    assert msg in p.stdout.replace("\n", "") or msg in p.stderr.replace("\n", "")
    for text in (p.stdout, p.stderr):
        assert "TypeError" not in text and "Traceback" not in text and "state_dict" not in text


def test_the_last_epoch_is_not_cut_short(make_bundle) -> None:
    # One epoch: nothing to stop early; every validation loss was NaN, so there is no best epoch.
    with pytest.raises(Diverged) as ei:
        _train(make_bundle(training__learning_rate=1e30, training__epochs=1))
    msg = ei.value.one_line()
    assert ei.value.kind == "diverged" and ei.value.exit_code == 1
    assert "(epoch 1 of 1; validation loss nan); no epoch had a finite validation loss, so there are no best " \
           "weights; lower training.learning_rate" in msg, msg


def test_a_finite_training_is_untouched(make_bundle) -> None:
    _, out = _train(make_bundle(training__epochs=2))
    assert out.best_state is not None and math.isfinite(out.val_loss) and len(out.history) == 2


def test_a_validation_loss_alone_going_infinite_is_named() -> None:
    spec = TrainingSpec(seed=1, batch_size=4, epochs=5, learning_rate=0.5)
    history = [{"epoch": 1, "train_loss": 2.0, "val_loss": math.inf}, {"epoch": 2, "train_loss": 1.0, "val_loss": math.nan}]
    msg = _diverged(spec, None, history, stopped=False).one_line()
    assert msg.startswith("the training diverged: its validation loss was inf at epoch 1 of 5; no epoch had a finite "
                          "validation loss"), msg
    assert "(now 0.5)" in msg
