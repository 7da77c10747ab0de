"""`harness export`: a run's cell as a new optuna_best/, which reruns to `reproduced` with the same weights.

Real runs through the CLI (child processes, the local backend); hostile results
directories made by editing what a real run wrote.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from harness import record
from harness.bundle import load_bundle, parse_trial_info
from harness.errors import InputError
from harness.export import export_config, pick_cell, trial_info
from harness.record import Status, WeightsDiff

from tests.records import record as make_record
from tests.conftest import TESTS, patience
from tests.cli.test_cli import TRAINERS, harness

USERPROJ = TESTS / "userproj"


def error_line(p) -> str:
    assert "Traceback" not in p.stderr, p.stderr
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("harness: error:")]
    return line


def run_ok(*args: str) -> None:
    p = harness(*args)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.fixture
def tiny_run(make_bundle, tmp_path: Path) -> tuple[Path, Path]:
    """A tiny bundle (no scaler, no trial_info) run once: (bundle, results)."""
    bundle = make_bundle()
    run_ok("run", str(bundle), "--device", "cpu", "--out", str(tmp_path / "res"), "--no-progress")
    return bundle, tmp_path / "res"


def test_the_example_exports_and_reruns_reproduced_with_identical_weights(example: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    run_ok("run", str(example), "--device", "cpu", "--out", str(first), "--no-progress")
    exported = tmp_path / "exported"
    p = harness("export", str(first), "-o", str(exported))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "exported cell run" in p.stdout and f"harness run {exported}" in p.stdout
    b = load_bundle(exported)  # the harness's own loader reads it
    (orig,) = [r for r in record.load(first).records if not r.band]  # a band it measured is the band's
    assert b.recorded.value == orig.retrained["val_loss"] and b.recorded.weights_sha256 == orig.weights_sha256
    assert b.recorded.r2 == orig.retrained["val"]["r2"] and b.recorded.data_sha256 == orig.data_sha256
    assert b.recorded.number == 0 and b.recorded.params["hidden"] == 64  # the trial it came from
    assert b.recorded.environment["torch"] == orig.env.torch and b.recorded.environment["backend"] == "local"
    assert b.data.resolved == str((example.parent / "data" / "signals.npz").resolve())
    assert b.config["model"] == yaml.safe_load((example / "config.yaml").read_text())["model"]
    assert (exported / "target_scaler.joblib").read_bytes() == (example / "target_scaler.joblib").read_bytes()
    second = tmp_path / "second"
    p = harness("run", str(exported), "--device", "cpu", "--out", str(second), "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "reproduced" in p.stdout and "=trial" in p.stdout
    (again,) = record.load(second).records
    assert again.weights_sha256 == orig.weights_sha256
    assert again.weights_vs_archived == WeightsDiff(identical=True, first_difference=None, max_abs_diff=0.0)
    for name in ("best.pt", "last.pt"):
        a = torch.load(first / "run" / "weights" / name, weights_only=True)
        b2 = torch.load(second / "run" / "weights" / name, weights_only=True)
        assert a.keys() == b2.keys() and all(torch.equal(a[k], b2[k]) for k in a)


class _Planted:
    """What a container (or a trainer) can leave as target_scaler.joblib: a pickle that runs code when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_scaler_the_run_wrote_is_never_exported(tiny_run, tmp_path: Path) -> None:
    """The issue: a cell directory held a planted pickle and its record said `scaler.used: refit`; export
    copied it "refitted by the run", and a local run of the export executed it. The scaler comes from
    the bundle alone; a run of the export refits its own and reproduces."""
    import joblib

    bundle, res = tiny_run
    assert not (bundle / "target_scaler.joblib").exists()
    (rec,) = record.load(res).records
    assert rec.scaler["used"] == "refit"  # the claim the planted file rides on
    marker = tmp_path / "the-planted-pickle-ran"
    (res / "run" / "target_scaler.joblib").unlink(missing_ok=True)
    joblib.dump(_Planted(marker), res / "run" / "target_scaler.joblib")
    out = tmp_path / "exp"
    p = harness("export", str(res), "-o", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert not (out / "target_scaler.joblib").exists()
    assert "target_scaler.joblib" not in p.stdout.splitlines()[0]  # not among the exported files
    assert "target_scaler.joblib: not exported: the run refitted it" in p.stdout and "never code the host loads" in p.stdout
    again = harness("run", str(out), "--device", "cpu", "--out", str(tmp_path / "again"), "--no-progress")
    assert not marker.exists()  # the host never loaded what the run wrote
    assert again.returncode == 0, again.stdout + again.stderr
    (rerun,) = record.load(tmp_path / "again").records
    assert rerun.scaler["used"] == "refit" and rerun.weights_vs_archived.identical is True


def test_a_custom_trainer_cell_keeps_its_trainer(tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    shutil.copytree(USERPROJ, proj, ignore=shutil.ignore_patterns("__pycache__"))
    res = tmp_path / "res"
    run_ok("run", str(proj / "optuna_best"), "--trainer", "userproj.train:retrain", "--trainer-path", str(proj),
           "--device", "cpu", "--out", str(res), "--no-progress")
    out = tmp_path / "exp"
    run_ok("export", str(res), "-o", str(out))
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["trainer"] == {"entrypoint": "userproj.train:retrain", "code_dir": str(proj.resolve())}
    assert cfg["data"]["window"] == 8 and cfg["training"]["lr"] == 0.003  # the trainer's own keys, untouched
    info = yaml.safe_load((out / "trial_info.yaml").read_text())
    (orig,) = record.load(res).records
    assert info["weights_sha256"] == orig.user_weights.sha256  # the project's own digest convention
    assert isinstance(info["r2"], float)  # an aggregate stays one number
    again = tmp_path / "again"
    p = harness("run", str(out), "--device", "cpu", "--out", str(again), "--no-progress")  # no --trainer: the config says
    assert p.returncode == 0, p.stdout + p.stderr
    assert "reproduced" in p.stdout
    (rec,) = record.load(again).records
    assert rec.weights_sha256 == orig.weights_sha256 and rec.user_weights.identical_to_recorded is True


def test_a_cell_that_left_no_weights_says_so_plainly(make_bundle, tmp_path: Path) -> None:
    bundle = make_bundle()
    (bundle / "weights").mkdir()
    torch.save({"w": torch.ones(2)}, bundle / "weights" / "best.pt")  # the source bundle has weights
    code = tmp_path / "code"
    code.mkdir()
    (code / "metrics_only.py").write_text("def train(config):\n    return {'val_loss': 0.5}\n")
    res = tmp_path / "res"
    run_ok("run", str(bundle), "--trainer", "metrics_only:train", "--trainer-path", str(code), "--device", "cpu",
           "--out", str(res), "--no-progress")
    p = harness("export", str(res), "-o", str(tmp_path / "exp"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[yellow]" not in p.stderr and "[/yellow]" not in p.stderr
    assert ("! cell run left no weights in its output: the exported bundle has no weights/ (the source bundle's are "
            "not copied: they are not this cell's)") in p.stderr
    assert not (tmp_path / "exp" / "weights").exists()


def test_a_trainers_own_checkpoint_is_exported_as_it_wrote_it(make_bundle, tmp_path: Path) -> None:
    bundle = make_bundle()
    code = tmp_path / "code"
    code.mkdir()
    (code / "own_ckpt.py").write_text(
        "import os, torch\n"
        "def train(config, out_dir):\n"
        "    os.makedirs(os.path.join(out_dir, 'weights'))\n"
        "    torch.save({'epoch': 2, 'model': {'w': torch.arange(3.0)}}, os.path.join(out_dir, 'weights', 'best.pt'))\n"
        "    return {'val_loss': 0.5}\n")
    res = tmp_path / "res"
    run_ok("run", str(bundle), "--trainer", "own_ckpt:train", "--trainer-path", str(code), "--device", "cpu",
           "--out", str(res), "--no-progress")
    (rec,) = record.load(res).records
    assert rec.trainer["weights"]["file"] == "weights/best.pt" and rec.trainer["weights"]["tensors_from"] == "model"
    run_ok("export", str(res), "-o", str(tmp_path / "exp"))
    assert torch.load(tmp_path / "exp" / "weights" / "best.pt", weights_only=True)["epoch"] == 2


def test_the_cell_is_chosen_and_a_failed_one_is_refused(make_bundle, tmp_path: Path) -> None:
    bundle = make_bundle()
    (bundle / "config.yaml").write_text(yaml.safe_dump({
        "training": {"seed": 1, "batch_size": 8, "epochs": 1, "learning_rate": 0.01}, "fail_when_single_threaded": True,
        "data": {"path": "signals.npz", "split": {"train": 0.6, "val": 0.2, "test": 0.2}}}))
    res = tmp_path / "res"
    p = harness("matrix", str(bundle), "--backend", "local", "--devices", "cpu", "--threads", "1,2",
                "--determinism", "strict", "--trainer", "seed_style:train", "--trainer-path", str(TRAINERS),
                "--out", str(res), "--no-progress")
    assert p.returncode == 1, p.stdout + p.stderr  # the single-threaded cell failed, deliberately
    p = harness("export", str(res), "--cell", "cpu-strict-t1", "-o", str(tmp_path / "x"))
    assert p.returncode == 2
    line = error_line(p)
    assert "cell cpu-strict-t1 is failed" in line and "deliberate failure" in line and "export a cell that ran ok" in line
    assert not (tmp_path / "x").exists()
    p = harness("export", str(res), "-o", str(tmp_path / "y"))  # default: the first cell that ran ok
    assert p.returncode == 0, p.stdout + p.stderr
    assert "exported cell cpu-strict-t2" in p.stdout
    p = harness("export", str(res), "--cell", "nope", "-o", str(tmp_path / "z"))
    assert p.returncode == 2 and "has no cell 'nope'" in error_line(p)


def test_pick_cell_in_run_order() -> None:
    recs = [make_record("a", status=Status.SKIPPED), make_record("b"), make_record("c")]
    assert pick_cell(recs, None, "R").cell == "b"
    assert pick_cell(recs, "c", "R").cell == "c"
    for status in (Status.SKIPPED, Status.INTERRUPTED, Status.FAILED, Status.TIMEOUT):
        with pytest.raises(InputError, match=f"cell x is {status.value}"):
            pick_cell([make_record("x", status=status)], "x", "R")
    with pytest.raises(InputError, match="no cell that ran ok"):
        pick_cell([make_record("a", status=Status.FAILED)], None, "R")


def test_pick_cell_skips_the_band_members_a_run_measured_after_its_cells() -> None:
    """A run whose cell differed beyond float32 rounding measured a band after it, and run.json lists the
    band's members first: the default export is still the cell, never a member (seen in CI on a Xeon)."""
    members = [make_record(f"band-seed-{i}") for i in (1, 2)]
    for i, m in enumerate(members, 1):
        m.band = {"kind": "seed", "member": i, "seed": 42 + i}
    assert pick_cell([*members, make_record("run")], None, "R").cell == "run"
    assert pick_cell([*members, make_record("run")], "band-seed-2", "R").cell == "band-seed-2"  # named: as asked
    with pytest.raises(InputError, match=r"no cell that ran ok \(run failed\)"):
        pick_cell([*members, make_record("run", status=Status.FAILED)], None, "R")


def test_trial_info_parses_back_as_the_retrained_trial() -> None:
    rec = make_record("c")
    rec.metrics["retrained"]["val"]["r2"] = {"a": 0.5, "b": float("nan")}
    info = trial_info(rec, Path("/r"), "now")
    trial = parse_trial_info(yaml.safe_load(yaml.safe_dump(info)))
    assert trial.value == 0.1 and trial.r2 == {"a": 0.5} and trial.weights_sha256 == "w1"  # NaN left out
    assert info["user_attrs"]["test_r2"] == {"a": pytest.approx(0.8)}


def test_export_config_places_paths_for_the_new_bundle(tmp_path: Path) -> None:
    src = tmp_path / "src"
    cfg = {"data": {"path": "../d/x.npz", "split": [0.7, 0.15, 0.15]}, "trainer": {"entrypoint": "m:f", "code_dir": "code",
                                                                                   "mine": 1}}
    out = export_config(cfg, src, tmp_path / "d" / "x.npz", "ab" * 32,
                        ("m:f", [src / "code", tmp_path / "lib"]))
    assert out["data"] == {"path": str(tmp_path / "d" / "x.npz"), "split": [0.7, 0.15, 0.15], "sha256": "ab" * 32}
    assert out["trainer"] == {"entrypoint": "m:f", "code_dir": ["code", str(tmp_path / "lib")], "mine": 1}
    inside = export_config({"data": {"path": "/abs"}}, src, src / "data" / "x.npz", None, None)
    assert inside["data"]["path"] == "data/x.npz"  # copied along with the bundle
    assert cfg["data"]["path"] == "../d/x.npz"  # the source mapping is left alone


# ----------------------------------------------------------------------------- the output directory


def test_a_non_empty_output_needs_force(tiny_run, tmp_path: Path) -> None:
    bundle, res = tiny_run
    out = tmp_path / "exp"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    p = harness("export", str(res), "-o", str(out))
    assert p.returncode == 2 and "is not empty" in error_line(p) and "--force" in error_line(p)
    assert (out / "keep.txt").read_text() == "mine"
    run_ok("export", str(res), "-o", str(out), "--force")
    assert not (out / "keep.txt").exists() and (out / "weights" / "best.pt").is_file()
    assert not list(tmp_path.glob(".exp.*"))  # no temporary or replaced directory left
    for bad in (bundle, res / "run", tmp_path):  # never over what the export reads
        p = harness("export", str(res), "-o", str(bad), "--force")
        assert p.returncode == 2 and "overlaps" in error_line(p), p.stderr
    assert (bundle / "config.yaml").is_file() and (res / "run" / "record.json").is_file()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    p = harness("export", str(res), "-o", str(link))
    assert p.returncode == 2 and "symbolic link" in error_line(p)


def test_no_output_is_a_usage_error(tiny_run) -> None:
    _, res = tiny_run
    p = harness("export", str(res))
    assert p.returncode == 2 and "-o DIR" in error_line(p)


# ----------------------------------------------------------------------------- hostile results directories


def _refused(res: Path, out: Path, *words: str) -> None:
    p = harness("export", str(res), "-o", str(out))
    assert p.returncode == 2, p.stdout + p.stderr
    line = error_line(p)
    for w in words:
        assert w in line, line
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))


def test_a_weights_file_that_is_a_link_is_refused(tiny_run, tmp_path: Path) -> None:
    _, res = tiny_run
    secret = tmp_path / "secret.pt"
    shutil.copyfile(res / "run" / "weights" / "best.pt", secret)
    (res / "run" / "weights" / "best.pt").unlink()
    (res / "run" / "weights" / "best.pt").symlink_to(secret)
    _refused(res, tmp_path / "x", "weights/best.pt", "symbolic link")


def test_a_weights_directory_that_is_a_link_is_refused(tiny_run, tmp_path: Path) -> None:
    _, res = tiny_run
    shutil.move(res / "run" / "weights", tmp_path / "elsewhere")
    (res / "run" / "weights").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    _refused(res, tmp_path / "x", "run/weights", "symbolic link")


def test_a_record_that_is_a_link_is_refused(tiny_run, tmp_path: Path) -> None:
    _, res = tiny_run
    shutil.move(res / "run" / "record.json", tmp_path / "record.json")
    (res / "run" / "record.json").symlink_to(tmp_path / "record.json")
    _refused(res, tmp_path / "x", "record.json", "symbolic link")


def _edit_record(res: Path, edit) -> None:
    path = res / "run" / "record.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_a_record_naming_results_outside_the_directory_is_refused(tiny_run, tmp_path: Path) -> None:
    _, res = tiny_run
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(res / "run", elsewhere)
    _edit_record(res, lambda d: d["spec"].update(out_dir=str(elsewhere)))
    _refused(res, tmp_path / "x", "record.json", str(elsewhere), "not", str(res / "run"))


def test_a_record_naming_a_relative_bundle_is_refused(tiny_run, tmp_path: Path) -> None:
    _, res = tiny_run
    _edit_record(res, lambda d: d["spec"].update(bundle_dir="../../etc"))
    _refused(res, tmp_path / "x", "names bundle '../../etc', not an absolute path")


def test_a_record_of_another_cell_directory_is_refused(tiny_run, tmp_path: Path) -> None:
    _, res = tiny_run
    _edit_record(res, lambda d: d.update(cell="../other"))
    _refused(res, tmp_path / "x", "records cell '../other', but lies in directory 'run'")


def test_weights_changed_after_the_run_are_refused(tiny_run, tmp_path: Path) -> None:
    _, res = tiny_run
    path = res / "run" / "weights" / "best.pt"
    state = torch.load(path, weights_only=True)
    first = sorted(state)[0]
    state[first] = state[first] + 1
    torch.save(state, path)
    _refused(res, tmp_path / "x", "weights/best.pt", "the record says")


def test_data_changed_since_the_run_is_refused(tiny_run, tmp_path: Path) -> None:
    bundle, res = tiny_run
    with open(bundle / "signals.npz", "ab") as fh:
        fh.write(b"\0")
    _refused(res, tmp_path / "x", "signals.npz", "but the run trained on")


def test_a_results_directory_with_no_records(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", tmp_path / "x", "holds no record.json files")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "r" / "c").mkdir(parents=True)
    os.symlink(tmp_path / "fifo", tmp_path / "r" / "c" / "record.json")
    _refused(tmp_path / "r", tmp_path / "x", "symbolic link")


# ----------------------------------------------------------------------------- sizes, before a byte is copied


def test_sparse_weights_are_refused_before_they_are_copied(tiny_run, tmp_path: Path) -> None:
    _, res = tiny_run
    best = res / "run" / "weights" / "best.pt"
    best.unlink()
    with open(best, "wb") as fh:
        fh.truncate(3 << 30)  # 3 GiB long, nothing allocated: what a container could leave
    assert os.stat(best).st_blocks * 512 < 1 << 20
    _refused(res, tmp_path / "x", "weights/best.pt", "is sparse: 3.0 GiB long", "rerun the cell")


def test_weights_over_the_limit_are_refused(tiny_run, tmp_path: Path, monkeypatch) -> None:
    _, res = tiny_run
    size = (res / "run" / "weights" / "best.pt").stat().st_size
    monkeypatch.setenv("HARNESS_WEIGHTS_LIMIT", str(size - 1))
    _refused(res, tmp_path / "x", "weights/best.pt", "over the", "HARNESS_WEIGHTS_LIMIT=SIZE")
    monkeypatch.setenv("HARNESS_WEIGHTS_LIMIT", "lots")
    _refused(res, tmp_path / "x", "$HARNESS_WEIGHTS_LIMIT: is 'lots', not a size")
    monkeypatch.setenv("HARNESS_WEIGHTS_LIMIT", str(size))
    run_ok("export", str(res), "-o", str(tmp_path / "x"))


def test_a_record_naming_another_bundle_is_refused(tiny_run, tmp_path: Path) -> None:
    """The bundle export copies is the one run.json names (the CLI wrote it), never one a record names."""
    bundle, res = tiny_run
    host = tmp_path / "host-dir"
    host.mkdir()
    shutil.copyfile(bundle / "config.yaml", host / "config.yaml")  # passes for a bundle
    (host / "id_ed25519").write_text("a private key of this host")
    _edit_record(res, lambda d: d["spec"].update(bundle_dir=str(host)))
    _refused(res, tmp_path / "x", "record.json", f"names bundle {host}", f"run.json says the run ran {bundle}")


def test_a_bundle_changed_since_the_run_is_refused(tiny_run, tmp_path: Path) -> None:
    bundle, res = tiny_run
    cfg = yaml.safe_load((bundle / "config.yaml").read_text())
    cfg["training"]["epochs"] = 5
    (bundle / "config.yaml").write_text(yaml.safe_dump(cfg))
    _refused(res, tmp_path / "x", str(bundle / "config.yaml"), "has changed since the run (config digest")


def test_the_bundle_is_copied_without_following_a_link(tiny_run, tmp_path: Path) -> None:
    bundle, res = tiny_run
    secret = tmp_path / "secret.txt"
    secret.write_text("a file of this host, outside the bundle")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "more.txt").write_text("also outside")
    (bundle / "notes.txt").symlink_to(secret)
    (bundle / "extra").mkdir()
    (bundle / "extra" / "kept.txt").write_text("a file of the bundle")
    (bundle / "extra" / "inner").symlink_to(elsewhere, target_is_directory=True)
    os.mkfifo(bundle / "extra" / "pipe")
    out = tmp_path / "exp"
    p = harness("export", str(res), "-o", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert (out / "extra" / "kept.txt").read_text() == "a file of the bundle"
    for name in ("notes.txt", "extra/inner", "extra/pipe"):
        assert not os.path.lexists(out / name), name
    warning = " ".join(ln for ln in p.stderr.splitlines() if ln.startswith("!"))
    for part in ("notes.txt (a symbolic link)", "extra/inner (a symbolic link)", "extra/pipe (a FIFO)",
                 "never through a link"):
        assert part in warning, p.stderr


def test_data_a_record_names_is_read_only_as_a_regular_file(tiny_run, tmp_path: Path) -> None:
    """`data_path: /dev/zero` made export hash forever; a link was followed. Both are refused, not read."""
    bundle, res = tiny_run
    _edit_record(res, lambda d: d["spec"].update(data_path="/dev/zero"))
    p = harness("export", str(res), "-o", str(tmp_path / "x"), timeout=patience(60))
    assert p.returncode == 2, p.stdout + p.stderr
    line = error_line(p)
    assert "/dev/zero: is a character device, not a regular file; not read" in line, line
    link = tmp_path / "data-link.npz"
    link.symlink_to(bundle / "signals.npz")
    _edit_record(res, lambda d: d["spec"].update(data_path=str(link)))
    _refused(res, tmp_path / "y", str(link), "is reached through a symbolic link")
