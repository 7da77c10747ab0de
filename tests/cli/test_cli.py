"""The command line end to end, through real child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from harness import record
from harness.record import ResultRecord, Status

from tests.conftest import DELETE, ON_TRIAL_CPU, TESTS, assert_reproduces, default_signals, patience, tiny_config

TRAINERS = TESTS / "trainers"


def harness(*args: str, cwd: Path | None = None, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess; ``timeout`` (default 300 s, scaled by the machine's load) only stops a hang."""
    env = dict(os.environ, COLUMNS="220")
    env.pop("HARNESS_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=patience(300) if timeout is None else timeout)


def records(out: Path) -> list[ResultRecord]:
    """The records of a results directory, typed, in the run's order."""
    return record.load(out).records


def assert_complete(rec: ResultRecord) -> None:
    assert rec.schema == "harness.result/3"
    assert rec.env.torch and rec.env.python and rec.env.device
    assert rec.determinism and rec.metrics and rec.data_sha256 and rec.wall_s is not None


# --------------------------------------------------------------------------- the example, end to end


def test_run_example_reproduces(example: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = harness("run", str(example), "--out", str(out), "--json", str(tmp_path / "r.json"),
                "--markdown", str(tmp_path / "r.md"), "--device", "cpu")
    assert p.returncode == 0, p.stderr
    assert "reproduced" in p.stdout and "Traceback" not in p.stderr
    (rec,) = records(out)
    assert_complete(rec)
    assert rec.status is Status.OK
    det = rec.determinism
    assert det["mode"] == "strict" and det["deterministic_algorithms"] and det["cudnn_deterministic"]
    assert not det["cudnn_benchmark"] and det["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and det["PYTHONHASHSEED"] == "0"
    assert det["num_workers"] == 0 and det["hash_randomization"] is False
    info = yaml.safe_load((example / "trial_info.yaml").read_text())
    assert_reproduces(rec, p.stdout)
    if ON_TRIAL_CPU:  # the retrain reproduces the trial bit for bit in the environment that produced it
        assert rec.weights_sha256 == info["user_attrs"]["weights_sha256"]
        assert rec.retrained["val_loss"] == info["value"]
        assert rec.archived["val_loss"] == info["value"]  # archived best weights, evaluated here
    assert rec.scaler["archived"] and rec.scaler["refit_matches"] is True
    assert rec.data_sha256 == info["data_sha256"] and set(rec.expected_data_sha256.values()) == {info["data_sha256"]}
    report = json.loads((out / "report.json").read_text())
    assert report["comparison"]["cells"][0]["ladder"]["reference"] == "recorded trial"
    assert (out / "run" / "weights" / "best.pt").is_file()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["comparison"]["overall"] == "reproduced" and len(report["records"]) == 1
    assert "| run |" in (tmp_path / "r.md").read_text()


def test_two_strict_runs_give_identical_weights(example: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    p = harness("matrix", str(example), "--backend", "local", "--devices", "cpu", "--determinism", "strict",
                "--threads", "1", "--repeats", "2", "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    recs = records(out)
    assert [r.cell for r in recs] == ["cpu-strict-t1-r1", "cpu-strict-t1-r2"]
    assert recs[0].weights_sha256 == recs[1].weights_sha256
    assert recs[0].env.threads == 1


def test_drift_exits_3(example: Path, tmp_path: Path) -> None:
    """A trial whose recorded loss no retrain here could give: judged against a seed band, drifted."""
    info_path = example / "trial_info.yaml"
    info = yaml.safe_load(info_path.read_text())
    # far outside: with 4 seeds (3 degrees of freedom) and Holm over every metric that moved beyond
    # float32 rounding (how many do depends on the CPU), ×3 sits at p≈0.003 at worst, above α=0.001
    info["value"] *= 10
    info_path.write_text(yaml.safe_dump(info))
    p = harness("run", str(example), "--out", str(tmp_path / "o"), "--device", "cpu", "--band-seeds", "4")
    assert p.returncode == 3, p.stdout + p.stderr
    assert "drifted" in p.stdout and "val_loss" in p.stdout
    # re-judged from the records, with a smaller false-alarm rate: still far outside
    p = harness("compare", str(tmp_path / "o"), "--alpha", "0.001")
    assert p.returncode == 3, p.stdout + p.stderr
    # without the seed band nothing can judge it: said, and not called drifted
    p = harness("run", str(example), "--out", str(tmp_path / "n"), "--device", "cpu", "--band-seeds", "0")
    assert p.returncode == 0 and "not judged" in p.stdout, p.stdout + p.stderr


def test_missing_trial_info_runs_and_says_so(example: Path, tmp_path: Path) -> None:
    (example / "trial_info.yaml").unlink()
    p = harness("run", str(example), "--out", str(tmp_path / "o"), "--device", "cpu")
    assert p.returncode == 0, p.stderr
    assert "nothing recorded to compare with" in p.stderr
    (rec,) = records(tmp_path / "o")
    assert rec.recorded is None and rec.status is Status.OK


def test_data_mismatch_is_loud(example: Path, tmp_path: Path) -> None:
    cfg = yaml.safe_load((example / "config.yaml").read_text())
    cfg["data"]["sha256"] = "0" * 64
    (example / "config.yaml").write_text(yaml.safe_dump(cfg))
    p = harness("run", str(example), "--out", str(tmp_path / "o"), "--device", "cpu")
    assert "DATA MISMATCH" in p.stderr
    (rec,) = records(tmp_path / "o")
    assert rec.expected_data_sha256["config.yaml data.sha256"] == "0" * 64 != rec.data_sha256
    assert "DATA MISMATCH" in p.stdout  # judged from the record, not written into it
    assert p.returncode == 1 and "not comparable" in p.stdout  # other data: the verdict says so


# --------------------------------------------------------------------------- bad input: one line, exit 2


def _bad_bundles(root: Path, example: Path) -> dict[str, tuple[Path, str]]:
    cases: dict[str, tuple[Path, str]] = {}

    def bundle(name: str, cfg: dict | None = None, text: str | None = None) -> Path:
        d = root / name
        d.mkdir()
        np.savez(d / "signals.npz", X=np.zeros((40, 3, 16), np.float32), y=np.zeros((40, 2), np.float32))
        if text is not None:
            (d / "config.yaml").write_text(text)
        elif cfg is not None:
            (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        return d

    cases["missing directory"] = (root / "nope", "no such directory")
    cases["missing config"] = (bundle("noconfig"), "config.yaml: not found")
    cases["malformed config"] = (bundle("yamlerr", text="training: {seed: 42\n  epochs: [\n"), "config.yaml: is not valid YAML at line")
    cases["missing seed"] = (bundle("noseed", tiny_config(training__seed=DELETE)), "config.yaml: training.seed is missing")
    cases["wrong type"] = (bundle("wrongtype", tiny_config(training__batch_size="32")), "training.batch_size must be an integer")
    d = bundle("nodata", tiny_config())
    (d / "signals.npz").unlink()
    cases["missing data"] = (d, "data file not found")
    d = bundle("baddata", tiny_config())
    (d / "signals.npz").write_bytes(b"\x00garbage")
    cases["unreadable data"] = (d, "cannot be read as an .npz dataset")
    cases["channel out of range"] = (bundle("chan", tiny_config(data__exclude_channels=[7])), "data.exclude_channels [7] out of range")
    cases["downsample too large"] = (bundle("ds", tiny_config(data__downsample=99)), "data.downsample is 99 but the series have only 16")
    d = bundle("badinfo", tiny_config())
    (d / "trial_info.yaml").write_text("number: [unclosed\n")
    cases["malformed trial_info"] = (d, "trial_info.yaml: is not valid YAML")
    # weights that do not fit the config: the example's weights, with a config asking for another width
    d = root / "badweights"
    import shutil

    shutil.copytree(example, d)
    shutil.copytree(example.parent / "data", root / "data")
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["model"]["hidden"] = 8
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    cases["weights do not fit"] = (d, "weights do not fit the model in config.yaml")
    d = root / "badscaler"
    shutil.copytree(example, d)
    (d / "target_scaler.joblib").write_bytes(b"\x80\x04corrupt")
    cases["corrupt scaler"] = (d, "target_scaler.joblib: cannot be loaded as a joblib scaler")
    return cases


CASES = ["missing directory", "missing config", "malformed config", "missing seed", "wrong type", "missing data",
         "unreadable data", "channel out of range", "downsample too large", "malformed trial_info",
         "weights do not fit", "corrupt scaler"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2(case: str, tmp_path: Path, example: Path) -> None:
    (tmp_path / "cases").mkdir()
    path, needle = _bad_bundles(tmp_path / "cases", example)[case]
    p = harness("matrix", str(path), "--backend", "local", "--devices", "cpu", "--determinism", "strict",
                "--threads", "1", "--out", str(tmp_path / "out"), "--no-progress")
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("harness: error:")]
    assert len(errors) == 1, p.stderr
    assert needle in errors[0], errors[0]
    assert "Traceback" not in p.stderr + p.stdout


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    p = harness("run", str(tmp_path / "nope"), "--debug")
    assert p.returncode == 2 and "Traceback" in p.stderr


@pytest.mark.parametrize("args", [["matrix"], ["run", ".", "--tol", "r2"], ["frobnicate"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    p = harness(*args)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr


# --------------------------------------------------------------------------- bring your own trainer


def _custom_bundle(make_bundle, **cfg_extra) -> Path:
    root = make_bundle("custom")
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg["trainer"] = {"entrypoint": "seed_style:train", "code_dir": str(TRAINERS)}
    cfg.update(cfg_extra)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_custom_trainer_through_the_contract(make_bundle, tmp_path: Path) -> None:
    root = _custom_bundle(make_bundle)
    out = tmp_path / "o"
    p = harness("matrix", str(root), "--backend", "local", "--devices", "cpu", "--determinism", "strict",
                "--threads", "1", "--repeats", "2", "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    recs = records(out)
    assert len(recs) == 2 and all(r.status is Status.OK for r in recs)
    for r in recs:
        assert_complete(r)
        assert r.trainer["entrypoint"] == "seed_style:train"
        assert set(r.retrained["val"]["r2"]) == {"t0", "t1"}
        assert r.extra == {"style": "seed"}
        assert [h["epoch"] for h in r.history] == [1, 2]
        assert r.determinism["deterministic_algorithms"] is True
    assert recs[0].weights_sha256 == recs[1].weights_sha256 is not None


def test_trainer_flag_overrides_config(make_bundle, tmp_path: Path) -> None:
    root = make_bundle("plain")
    p = harness("run", str(root), "--trainer", "seed_style:train", "--trainer-path", str(TRAINERS),
                "--out", str(tmp_path / "o"), "--device", "cpu")
    assert p.returncode == 0, p.stderr  # no trial_info: nothing recorded, still exit 0
    (rec,) = records(tmp_path / "o")
    assert rec.trainer["entrypoint"] == "seed_style:train"


def test_unimportable_trainer_is_bad_input(make_bundle, tmp_path: Path) -> None:
    root = make_bundle("plain")
    p = harness("run", str(root), "--trainer", "no_such_module:train", "--trainer-path", str(TRAINERS),
                "--out", str(tmp_path / "o"), "--device", "cpu")
    assert p.returncode == 2
    assert "cannot import 'no_such_module'" in p.stderr


def test_trainer_path_is_repeatable(make_bundle, tmp_path: Path) -> None:
    root = make_bundle("plain")
    empty = tmp_path / "empty"
    empty.mkdir()
    p = harness("run", str(root), "--trainer", "seed_style:train", "--trainer-path", str(empty),
                "--trainer-path", str(TRAINERS), "--out", str(tmp_path / "o"), "--device", "cpu")
    assert p.returncode == 0, p.stderr
    (rec,) = records(tmp_path / "o")
    assert rec.trainer["code_dirs"] == [str(empty), str(TRAINERS.resolve())]
    assert rec.spec["trainer_path"] == [str(empty), str(TRAINERS.resolve())]


def test_trainer_path_at_the_package_itself_is_pointed_out(make_bundle, tmp_path: Path) -> None:
    root = make_bundle("plain")
    pkg = TESTS / "userproj" / "userproj"
    p = harness("run", str(root), "--trainer", "userproj.train:retrain", "--trainer-path", str(pkg),
                "--out", str(tmp_path / "o"), "--device", "cpu")
    assert p.returncode == 2
    assert f"--trainer-path {pkg.parent}" in p.stderr and "Traceback" not in p.stderr


def test_a_refusal_after_training_still_writes_the_report(make_bundle, tmp_path: Path) -> None:
    root = make_bundle("plain", trial_info={"number": 1, "value": 0.5, "params": {}})
    code = tmp_path / "code"
    code.mkdir()
    (code / "refused_after_training.py").write_text(
        "def train(config, out_dir):\n"
        "    open(out_dir + '/trained', 'w').close()\n"
        "    return {'val_loss': 0.5, 'val': {'r2': 'high'}}\n")
    out = tmp_path / "o"
    p = harness("run", str(root), "--trainer", "refused_after_training:train", "--trainer-path", str(code),
                "--out", str(out), "--device", "cpu", "--no-progress")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stdout + p.stderr
    assert (out / "run" / "trained").exists()  # it trained, then its result was refused
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("harness: error:")]
    assert "returned val.r2 as str, not a number" in line
    report = json.loads((out / "report.json").read_text())
    assert [r["cell"] for r in report["records"]] == ["run"] and report["comparison"]["overall"] == "failed"
    assert "✗ run:" in p.stdout and "Overall: failed" in p.stdout


def test_seed_key_names_where_the_trainer_reads_its_seed(make_bundle, tmp_path: Path) -> None:
    root = make_bundle("plain")
    (root / "config.yaml").write_text(yaml.safe_dump({"data": {"path": "signals.npz"}, "train": {"rs": 4}}))
    code = tmp_path / "code"
    code.mkdir()
    (code / "reads_rs.py").write_text("def train(config, seed):\n"
                                      "    return {'val_loss': 0.5, 'extra': {'seed': seed, 'rs': config['train']['rs']}}\n")
    out = tmp_path / "o"
    p = harness("run", str(root), "--trainer", "reads_rs:train", "--trainer-path", str(code), "--seed-key", "train.rs",
                "--out", str(out), "--device", "cpu", "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    (rec,) = records(out)
    assert rec.extra == {"seed": 4, "rs": 4} and rec.trainer["seed_key"] == "train.rs" and rec.spec["seed_key"] == "train.rs"
    p = harness("run", str(root), "--trainer", "reads_rs:train", "--trainer-path", str(code),
                "--out", str(tmp_path / "o2"), "--device", "cpu", "--no-progress")
    assert p.returncode == 2 and not (tmp_path / "o2").exists()
    assert ("harness: error: config.yaml: no seed found (looked for training.seed and seed); declare where your "
            "trainer reads it with trainer: {seed_key: KEY}") in p.stderr.splitlines()


def test_failed_cell_keeps_the_others(make_bundle, tmp_path: Path) -> None:
    root = _custom_bundle(make_bundle, fail_when_single_threaded=True)
    out = tmp_path / "o"
    p = harness("matrix", str(root), "--backend", "local", "--devices", "cpu", "--determinism", "strict",
                "--threads", "1,2", "--out", str(out), "--json", str(tmp_path / "all.json"))
    assert p.returncode == 1, p.stdout + p.stderr
    by_cell = {r.cell: r for r in records(out)}
    assert by_cell["cpu-strict-t1"].status is Status.FAILED
    assert "deliberate failure" in by_cell["cpu-strict-t1"].error.message
    assert by_cell["cpu-strict-t1"].error.traceback  # the trainer's own traceback is kept
    assert by_cell["cpu-strict-t2"].status is Status.OK
    assert "✗ cpu-strict-t1" in p.stdout
    assert json.loads((tmp_path / "all.json").read_text())["comparison"]["overall"] == "failed"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_strict_runs_identical(example: Path, tmp_path: Path) -> None:
    p = harness("matrix", str(example), "--backend", "local", "--devices", "cuda", "--determinism", "strict",
                "--tf32", "off", "--threads", "all", "--repeats", "2", "--out", str(tmp_path / "g"))
    recs = records(tmp_path / "g")
    assert recs[0].weights_sha256 == recs[1].weights_sha256, p.stdout


# --------------------------------------------------------------------------- records measure, the judge judges


def test_the_worker_does_not_judge(example: Path, tmp_path: Path) -> None:
    # The worker used to store ok flags computed with default tolerances: a record could say
    # ok while the verdict printed with --tol said drifted.
    out = tmp_path / "o"
    p = harness("run", str(example), "--out", str(out), "--device", "cpu", "--tol", "val_loss=abs:1e-6,rel:0",
                "--tol", "r2=abs:1e-6")
    assert p.returncode == 0, p.stdout + p.stderr
    raw = (out / "run" / "record.json").read_text()
    assert '"ok":' not in raw and "delta_vs_recorded" not in raw and "verdict" not in raw
    p = harness("compare", str(out), "--tol", "r2=abs:1e-6")
    assert p.returncode == 0 and "reproduced" in p.stdout
    p = harness("compare", str(out), "--tol", "r2=abs:0")  # an explicit gate is exact: only bitwise passes it
    assert p.returncode == (0 if ON_TRIAL_CPU else 3), p.stdout


def test_threads_all_is_accepted_by_run_and_matrix(example: Path, tmp_path: Path) -> None:
    # `harness run --threads all` was refused by argparse (type=int) while matrix accepted it.
    p = harness("run", str(example), "--out", str(tmp_path / "r"), "--device", "cpu", "--threads", "all")
    assert p.returncode == 0, p.stdout + p.stderr
    (rec,) = records(tmp_path / "r")
    assert rec.spec["threads"] is None and rec.env.threads == torch.get_num_threads()
    p = harness("run", str(example), "--out", str(tmp_path / "bad"), "--threads", "many")
    assert p.returncode == 2 and "--threads 'many' is neither an integer nor 'all'" in p.stderr


def test_compare_keeps_the_run_order_and_baseline(example: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    p = harness("matrix", str(example), "--backend", "local", "--determinism", "strict,default", "--threads", "1",
                "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    p = harness("compare", str(out), "--json", str(tmp_path / "c.json"))
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads((tmp_path / "c.json").read_text())
    # alphabetically cpu-default-t1 would come first and become the baseline
    assert [c["cell"] for c in report["comparison"]["cells"]] == ["cpu-strict-t1", "cpu-default-t1"]
    assert report["comparison"]["first_cell"] == "cpu-strict-t1"


def test_compare_refuses_a_record_of_another_schema(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "record.json").write_text(json.dumps({"schema": "harness.result/1", "cell": "c", "status": "ok"}))
    p = harness("compare", str(tmp_path))
    assert p.returncode == 2, p.stdout + p.stderr
    assert "has schema harness.result/1, this harness reads harness.result/3 and harness.result/2" in p.stderr
    assert "Traceback" not in p.stderr


def test_options_that_do_not_apply_to_the_backend_are_refused(example: Path, tmp_path: Path) -> None:
    p = harness("matrix", str(example), "--backend", "local", "--cells", "cpu-torch2.13", "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "--cells names image cells of the docker backend" in p.stderr
    assert not (tmp_path / "o").exists()


def test_interrupt_leaves_an_interrupted_record_and_compare_says_incomplete(example: Path, tmp_path: Path) -> None:
    """Ctrl-C in the middle of a local matrix, as a user would press it (SIGINT to the process group)."""
    import signal
    import time

    out = tmp_path / "m"
    env = dict(os.environ, COLUMNS="220")
    # long enough that the second cell is still running when the signal comes, however loaded the
    # machine: a warm worker starts at once, and 25 epochs of the example take well under a second
    cfg = yaml.safe_load((example / "config.yaml").read_text())
    cfg["training"]["epochs"] = 400
    (example / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(preexec_fn=default_signals, args=[sys.executable, "-m", "harness", "matrix", str(example), "--backend", "local",
                             "--devices", "cpu", "--determinism", "strict,default", "--threads", "1", "--repeats", "2",
                             "--out", str(out), "--no-progress", "--jobs", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        # The first cell finished and the second one started (its spec.json is written as it is launched,
        # only once the first cell's record is in): signal now, while it runs. Whether its worker is still
        # starting or already training, a running cell is recorded interrupted.
        wait_s = patience(240)
        deadline = time.monotonic() + wait_s
        while not (out / "cpu-strict-t1-r2" / "spec.json").exists():
            assert proc.poll() is None, "the matrix ended before its second cell started: " + proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, f"the second cell did not start within {wait_s:.0f}s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=patience(120))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()  # reap it and close its pipes
    assert proc.returncode == 130, stdout + stderr
    assert "cells not run: cpu-default-t1-r1, cpu-default-t1-r2" in stderr
    assert str(out) in stderr
    by_cell = {r.cell: r for r in records(out)}
    assert by_cell["cpu-strict-t1-r1"].status is Status.OK
    assert by_cell["cpu-strict-t1-r2"].status is Status.INTERRUPTED
    report = json.loads((out / "report.json").read_text())
    assert report["comparison"]["overall"] == "incomplete"
    assert report["comparison"]["missing"] == ["cpu-default-t1-r1", "cpu-default-t1-r2"]
    p = harness("compare", str(out))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Overall: incomplete" in p.stdout
    for name in ("cpu-default-t1-r1", "cpu-default-t1-r2"):
        assert f"… {name} incomplete: planned, but left no record" in p.stdout
