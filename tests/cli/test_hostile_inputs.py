"""Inputs and conditions that used to hurt: alias bombs, NaN metrics, full or read-only
disks, shared results directories, data that is not the trial's, huge datasets."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from harness import record
from harness.bundle import load_bundle, load_yaml
from harness.errors import InputError
from harness.judge import Verdict, compare
from harness.record import Status

from tests.conftest import REPO, TESTS, patience, write_dataset
from tests.records import record as ok_record

BILLION_LAUGHS = "\n".join(
    ["number: 1", "value: 0.5", "params:", '  a: &a ["x","x","x","x","x","x","x","x","x"]']
    + [f"  {c}: &{c} [{','.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
) + "\n"


def harness(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="220", PYTHONPATH=str(REPO))
    env.pop("HARNESS_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


# --------------------------------------------------------------------------- YAML aliases and sizes


def test_yaml_alias_is_refused_with_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "config.yaml"
    p.write_text("a: &a [1, 2]\nb: 3\nc: *a\n")
    with pytest.raises(InputError) as ei:
        load_yaml(p, "config.yaml")
    msg = ei.value.one_line()
    assert msg.startswith("config.yaml: line 3 uses a YAML alias (*a)"), msg
    assert "write the value out" in msg


def test_billion_laughs_trial_info_is_refused_fast(make_bundle, tmp_path: Path) -> None:
    root = make_bundle()
    (root / "trial_info.yaml").write_text(BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 2000
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=r"trial_info.yaml: line \d+ uses a YAML alias"):
        load_bundle(root)
    assert time.perf_counter() - t0 < patience(1.0)


def test_billion_laughs_cli_exits_2_and_writes_nothing_big(make_bundle, tmp_path: Path) -> None:
    root = make_bundle()
    (root / "trial_info.yaml").write_text(BILLION_LAUGHS)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    p = harness("run", str(root), "--out", str(out), "--device", "cpu", "--no-progress")
    assert p.returncode == 2, p.stderr
    assert "uses a YAML alias" in p.stderr and "internal error" not in p.stderr
    assert time.perf_counter() - t0 < patience(30)  # interpreter start-up included; the load itself is instant
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.exists() else 0
    assert total < 100_000


def test_matrix_yaml_alias_is_refused(tmp_path: Path) -> None:
    from harness.images.matrix import load_site_config

    p = tmp_path / "site.yaml"
    p.write_text('base_images:\n  "*": &img local/x:1\n  cpu: *img\n')
    with pytest.raises(InputError, match=r"line 3 uses a YAML alias \(\*img\)"):
        load_site_config(p)


def test_oversized_and_deep_yaml_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "trial_info.yaml"
    big.write_text("params:\n" + "".join(f"  k{i}: {'x' * 100}\n" for i in range(12_000)))
    with pytest.raises(InputError, match="over 1 MB"):
        load_yaml(big, "trial_info.yaml")
    deep = tmp_path / "config.yaml"
    deep.write_text("a: " + "[" * 40 + "]" * 40 + "\n")
    with pytest.raises(InputError, match="nested deeper than 32"):
        load_yaml(deep, "config.yaml")
    deeper = tmp_path / "c2.yaml"
    deeper.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="nested deeper than 32"):
        load_yaml(deeper, "c2.yaml")


# --------------------------------------------------------------------------- strict JSON records


def _strict(text: str) -> object:
    def refuse(token: str) -> object:
        raise AssertionError(f"bare {token} in a record")

    return json.loads(text, parse_constant=refuse)


def test_nan_metric_is_written_as_null_with_a_flag_and_is_not_reproduced(tmp_path: Path) -> None:
    rec = ok_record("a")
    rec.metrics["retrained"]["val"]["r2"]["a"] = float("nan")
    rec.metrics["retrained"]["val_loss"] = float("inf")
    text = rec.to_json()
    data = _strict(text)
    assert data["metrics"]["retrained"]["val"]["r2"]["a"] is None
    assert sorted(data["nonfinite"]) == ["metrics.retrained.val.r2.a", "metrics.retrained.val_loss"]
    path = tmp_path / "a" / "record.json"
    record.write(path, rec)
    back = record.read(path)
    assert back.metrics["retrained"]["val"]["r2"]["a"] is None
    cmp = compare([back])
    assert cmp.cells[0].verdict is not Verdict.REPRODUCED
    assert cmp.overall is not Verdict.REPRODUCED
    # and the judge says the same of the record still in memory
    assert compare([rec]).cells[0].verdict is not Verdict.REPRODUCED


def test_report_json_is_strict(tmp_path: Path) -> None:
    rec = ok_record("a")
    rec.metrics["retrained"]["val"]["mse"]["a"] = float("-inf")
    from harness.report import json_report

    _strict(record.dumps(json_report([rec], compare([rec]))))


# --------------------------------------------------------------------------- data that is not the trial's


def test_data_mismatch_is_not_comparable_unless_allowed() -> None:
    rec = ok_record("a")
    rec.data_sha256 = "b" * 64
    rec.expected_data_sha256 = {"config.yaml data.sha256": "a" * 64}
    cmp = compare([rec])
    assert cmp.cells[0].verdict is Verdict.NOT_COMPARABLE
    assert "aaaaaaaaaaaa" in cmp.cells[0].reason and "bbbbbbbbbbbb" in cmp.cells[0].reason
    assert cmp.overall is Verdict.NOT_COMPARABLE and "--allow-data-change" in cmp.reason
    allowed = compare([rec], allow_data_change=True)
    assert allowed.cells[0].verdict is Verdict.REPRODUCED
    assert any("DATA MISMATCH" in w for w in allowed.warnings)


def test_cli_wrong_data_digest_is_not_comparable(make_bundle, tmp_path: Path) -> None:
    root = make_bundle(trial_info={"number": 1, "value": 0.5}, data__sha256="0" * 64)
    p = harness("run", str(root), "--out", str(tmp_path / "o1"), "--device", "cpu", "--no-progress")
    assert p.returncode == 1, p.stderr
    assert "not comparable" in p.stdout and "000000000000" in p.stdout + p.stderr
    assert "--allow-data-change" in p.stdout + p.stderr
    assert "measuring" not in p.stderr  # no band can make other data comparable: none is measured
    p2 = harness("run", str(root), "--out", str(tmp_path / "o2"), "--device", "cpu", "--no-progress",
                 "--allow-data-change", "--band-seeds", "0")  # the digest is the point here, not the verdict
    assert p2.returncode in (0, 3), p2.stderr
    assert "not comparable" not in p2.stdout and "DATA MISMATCH" in p2.stdout + p2.stderr
    p3 = harness("compare", str(tmp_path / "o1"), "--allow-data-change")
    assert p3.returncode in (0, 3), p3.stderr
    assert harness("compare", str(tmp_path / "o1")).returncode == 1


# --------------------------------------------------------------------------- the pre-check reads headers only


def test_preflight_reads_npz_headers_not_arrays(make_bundle, monkeypatch) -> None:
    from harness import preflight

    root = make_bundle()
    bundle = load_bundle(root)

    def no_load(*a, **k):
        raise AssertionError("preflight loaded the arrays")

    monkeypatch.setattr(np, "load", no_load)
    pre = preflight.check(bundle)
    assert pre.shape == (60, 3, 16) and pre.targets == ["t0", "t1"]
    assert pre.n_features == 2 * 8


def test_preflight_header_checks_match_the_worker(tmp_path: Path, make_bundle) -> None:
    from harness import preflight

    root = make_bundle(data__exclude_channels=[5])
    with pytest.raises(InputError, match="out of range"):
        preflight.check(load_bundle(root))
    root2 = make_bundle("b2")
    np.savez(root2 / "signals.npz", X=np.zeros((10, 4)), y=np.zeros(10))
    with pytest.raises(InputError, match="3-D"):
        preflight.check(load_bundle(root2))
    root3 = make_bundle("b3")
    np.savez_compressed(root3 / "signals.npz", X=np.zeros((10, 3, 16), np.float32), y=np.zeros((9, 2)))
    with pytest.raises(InputError, match="10 samples but y has 9"):
        preflight.check(load_bundle(root3))


def test_preflight_of_a_large_dataset_stays_small(make_bundle) -> None:
    import tracemalloc

    from harness import preflight

    root = make_bundle()
    path = root / "signals.npz"
    import zipfile

    n, c, t = 4000, 8, 1000  # 128 MB of float32
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("X.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (n, c, t)})
            block = np.zeros((100, c, t), np.float32).tobytes()
            for _ in range(n // 100):
                fh.write(block)
        with zf.open("y.npy", "w") as fh:
            np.lib.format.write_array(fh, np.zeros((n, 2), np.float32))
    tracemalloc.start()
    try:
        pre = preflight.check(load_bundle(root))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pre.shape == (n, c, t)
    assert peak < 20_000_000


# --------------------------------------------------------------------------- disks: read-only, full


def test_read_only_out_is_refused_before_training(make_bundle) -> None:
    root = make_bundle()
    p = harness("run", str(root), "--out", "/proc/harness-test/out", "--device", "cpu", "--no-progress")
    assert p.returncode == 2, p.stderr
    assert "/proc/harness-test/out: not writable" in p.stderr and "pass --out DIR on a writable disk" in p.stderr
    assert "internal error" not in p.stderr


def test_check_writable_maps_errnos(tmp_path: Path, monkeypatch) -> None:
    from harness import runner

    def rofs(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(runner.os, "open", rofs)
    with pytest.raises(InputError, match=r"not writable \(read-only file system\); pass --out DIR on a writable disk"):
        runner.check_writable(tmp_path / "x")


def test_disk_full_in_the_worker_is_a_disk_record(make_bundle, tmp_path: Path, monkeypatch) -> None:
    from harness.worker import retrain

    root = make_bundle()
    out = tmp_path / "cell"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    from harness.worker import determinism

    monkeypatch.setattr(retrain, "save_weights", full)
    monkeypatch.setattr(determinism, "missing_launch_env", lambda mode: [])  # started in-process, not by harness
    code = retrain.main(["--bundle", str(root), "--out", str(out), "--device", "cpu", "--determinism", "default"])
    assert code == 1
    rec = record.read(out / "record.json")
    assert rec.status is Status.FAILED and rec.error.kind == "disk"
    assert "no space left" in rec.error.message.lower()


def test_disk_full_in_the_runner_is_a_disk_record(tmp_path: Path, monkeypatch) -> None:
    from harness import runner
    from harness.backends.base import Backend
    from harness.plan import Cell, Job, Plan

    class Full(Backend):
        name = "local"

        def launch(self, cell, job, spec_path, on_line):
            raise AssertionError("run stands in for the worker")

        def run(self, cell, job, on_event=None, cache_key=None):
            raise OSError(errno.ENOSPC, "No space left on device")

    class Progress:
        def note(self, *a): pass
        def start(self, *a): pass
        def event(self, *a): pass
        def done(self, *a): pass

    cell = Cell(name="c1", device="cpu", determinism="strict", threads=1)
    job = Job(bundle_dir="b", data_path="d", results_dir=str(tmp_path), run_id="r1")
    outcome = runner.run_cells(Plan(backend="local", cells=[cell]), Full(), job, Progress())
    (rec,) = outcome.records
    assert rec.status is Status.FAILED and rec.error.kind == "disk"


def test_weights_are_written_atomically(tmp_path: Path, monkeypatch) -> None:
    import torch

    from harness.worker import retrain

    target = tmp_path / "last.pt"
    target.write_bytes(b"old, complete")

    def broken(obj, fh, *a, **k):
        fh.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        retrain.save_weights({"w": torch.zeros(2)}, target)
    assert target.read_bytes() == b"old, complete"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# --------------------------------------------------------------------------- one results directory, one run


def _matrix_args(bundle: Path, out: Path) -> list[str]:
    return ["matrix", str(bundle), "--backend", "local", "--out", str(out), "--devices", "cpu",
            "--determinism", "strict", "--threads", "1", "--no-progress"]


def test_two_runs_into_one_out(make_bundle, tmp_path: Path) -> None:
    a, b = make_bundle("a"), make_bundle("b", training__seed=11)
    out = tmp_path / "shared"
    env = dict(os.environ, COLUMNS="220", PYTHONPATH=str(REPO))
    env.pop("HARNESS_DEBUG", None)
    procs = [subprocess.Popen([sys.executable, "-m", "harness", *_matrix_args(x, out)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for x in (a, b)]
    results = [(p.wait(timeout=patience(300)), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    assert "is in use by another harness run (pid " in loser[2]
    winner = next(r for r in results if r[0] == 0)
    assert not (out / ".harness.lock").exists()  # the winner removed it; the loser never held it
    manifest = record.read_manifest(out)
    recs = record.load(out).records
    assert {r.run_id for r in recs} == {manifest.run_id}
    assert {r.bundle["path"] for r in recs} == {manifest.bundle}
    assert "internal error" not in winner[2]

    again = harness(*_matrix_args(a, out))
    assert again.returncode == 2 and "--resume" in again.stderr, again.stderr
    resumed = harness(*_matrix_args(b, out), "--resume", "--json", str(tmp_path / "r.json"))
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    manifest = record.read_manifest(out)
    # b's records are this run's, or (when b won the race) the earlier run's that --resume reused
    # unchanged, and run.json says which: never a's.
    assert {r["cell"]: r["run_id"] for r in report["records"]} == {
        r["cell"]: manifest.reused.get(r["cell"], manifest.run_id) for r in report["records"]}
    assert bool(manifest.reused) == (winner is results[1])
    assert {r["bundle"]["path"] for r in report["records"]} == {str(b)}


def test_compare_ignores_records_of_other_runs(tmp_path: Path) -> None:
    from harness.record import RunManifest

    out = tmp_path / "out"
    for name, run_id in (("a", "run-1"), ("b", "run-2")):
        rec = ok_record(name)
        rec.run_id = run_id
        record.write(out / name / "record.json", rec)
    record.write_manifest(out, RunManifest(run_id="run-1", cells=["a"], backend="local", bundle="x",
                                           started_at="now"))
    rs = record.load(out)
    assert [r.cell for r in rs.records] == ["a"]
    assert rs.warnings and "b" in rs.warnings[0] and "run-2" in rs.warnings[0]
    p = harness("compare", str(out))
    assert "ignored" in p.stderr and "run-2" in p.stderr, p.stderr


# --------------------------------------------------------------------------- results read as hostile files

HOSTILE = ("fifo", "dev-zero", "outside", "oversized")
REFUSAL = {"fifo": "is a FIFO, not a regular file", "dev-zero": "is a symbolic link; not followed",
           "outside": "is a symbolic link; not followed", "oversized": "bytes, more than the"}


def bounded_harness(*args: str, memory: int = 1 << 30) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess that can neither hang the test (a timeout) nor take the machine's memory
    (an address-space limit: the CLI itself maps about 100 MB)."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    env = dict(os.environ, COLUMNS="220", PYTHONPATH=str(REPO), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env.pop("HARNESS_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, env=env,
                          timeout=patience(60), preexec_fn=limit)


def make_hostile(path: Path, kind: str, limit: int, outside: Path) -> None:
    """Put at ``path`` what a container, a trainer or a copied results directory may leave instead of a file."""
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)  # opening it to read blocks until a writer comes: none will
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")  # endless
    elif kind == "outside":
        path.symlink_to(outside)  # a valid file of the right kind, but not this one
    else:
        with open(path, "wb") as fh:
            fh.truncate(limit + 1)  # sparse: costs nothing to make


def assert_refused(p: subprocess.CompletedProcess[str], path: Path, kind: str) -> None:
    """Exit 2 and one error line that names ``path`` and says what it is (warnings before it aside)."""
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("harness:")]
    assert line.startswith(f"harness: error: {path}: ") and REFUSAL[kind] in line, line


def results_dir(root: Path) -> Path:
    """Two cells of run ``r`` and its run.json."""
    for name in ("a", "b"):
        rec = ok_record(name)
        rec.run_id = "r"
        record.write(root / name / "record.json", rec)
    record.write_manifest(root, record.RunManifest(run_id="r", cells=["a", "b"], backend="local", bundle="x",
                                                   started_at="now"))
    return root


@pytest.mark.parametrize("kind", HOSTILE)
def test_compare_and_diverge_refuse_a_hostile_record_promptly(tmp_path: Path, kind: str) -> None:
    out = results_dir(tmp_path / "out")
    elsewhere = results_dir(tmp_path / "elsewhere")
    target = out / "b" / "record.json"
    make_hostile(target, kind, 64 << 20, elsewhere / "b" / "record.json")
    assert_refused(bounded_harness("compare", str(out)), target, kind)
    assert_refused(bounded_harness("diverge", str(out / "b"), str(out / "a")), target, kind)
    assert_refused(bounded_harness("compare", str(target)), target, kind)


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_run_json_or_report_json_is_refused_promptly(tmp_path: Path, kind: str) -> None:
    out = results_dir(tmp_path / "out")
    elsewhere = results_dir(tmp_path / "elsewhere")
    assert bounded_harness("compare", str(elsewhere), "--json", str(elsewhere / "report.json")).returncode == 0
    make_hostile(out / "run.json", kind, 64 << 20, elsewhere / "run.json")
    assert_refused(bounded_harness("compare", str(out)), out / "run.json", kind)
    report = tmp_path / "report.json"
    make_hostile(report, kind, 256 << 20, elsewhere / "report.json")
    assert_refused(bounded_harness("compare", str(report)), report, kind)


@pytest.mark.parametrize("kind", HOSTILE)
def test_band_from_refuses_a_hostile_band_record_before_anything_trains(tmp_path: Path, kind: str) -> None:
    from tests.records import ulp_band
    from tests.cli.test_data_dir import make_project, trainer_args

    bundle = make_project(tmp_path)
    band, elsewhere = tmp_path / "band", tmp_path / "elsewhere"
    for rec in ulp_band(n=2):
        record.write(band / rec.cell / "record.json", rec)
        record.write(elsewhere / rec.cell / "record.json", rec)
    target = band / "band-ulp-2" / "record.json"
    make_hostile(target, kind, 64 << 20, elsewhere / "band-ulp-2" / "record.json")
    out = tmp_path / "out"
    p = bounded_harness("run", str(bundle), *trainer_args(), "--device", "cpu", "--band-from", str(band),
                        "--out", str(out), "--no-progress", memory=4 << 30)
    assert_refused(p, target, kind)
    assert not list(out.glob("*/record.json"))  # nothing trained


# --------------------------------------------------------------------------- a record that is not the run's


def test_a_record_without_the_runs_id_is_not_judged_as_the_runs(tmp_path: Path) -> None:
    # The worker of a killed run wrote its record (run_id null, val loss 45) over the record of the
    # --resume run after it; compare judged it as that run's result, silently.
    from harness.record import RunManifest

    out = tmp_path / "out"
    recs = {"a": "run-2", "b": None, "c": "run-1", "d": "run-0"}
    for name, run_id in recs.items():
        rec = ok_record(name)
        rec.run_id = run_id
        record.write(out / name / "record.json", rec)
    # c is reused from run-1 (--resume) and run.json says so; d names a run run.json does not reuse
    record.write_manifest(out, RunManifest(run_id="run-2", cells=["a", "b", "c", "d"], backend="local", bundle="x",
                                           started_at="now", reused={"c": "run-1"}))
    rs = record.load(out)
    assert [r.cell for r in rs.records] == ["a", "c"] and rs.missing == ["b", "d"]
    (line,) = rs.warnings
    assert "ignored 2 record(s) of another run (no run id, run-0)" in line and "b, d" in line and "\n" not in line
    p = harness("compare", str(out), "--json", str(tmp_path / "r.json"))
    assert "ignored 2 record(s)" in p.stderr and "Traceback" not in p.stderr, p.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["cell"] for r in report["records"]] == ["a", "c"]


# --------------------------------------------------------------------------- links planted in --out


def test_a_lock_file_link_in_out_is_refused_not_followed(make_bundle, tmp_path: Path) -> None:
    out, target = tmp_path / "out", tmp_path / "precious.txt"
    out.mkdir()
    target.write_text("keep me\n")
    (out / ".harness.lock").symlink_to(target)
    p = harness("run", str(make_bundle()), "--out", str(out), "--device", "cpu", "--no-progress",
                timeout=int(patience(120)))
    assert p.returncode == 2, p.stderr
    assert target.read_text() == "keep me\n"  # it used to be truncated and to hold the harness's pid
    assert f"{out / '.harness.lock'}: is a symbolic link" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not list(out.glob("*/record.json"))  # nothing trained


def test_the_lock_refuses_a_hard_link_or_a_fifo(tmp_path: Path) -> None:
    from harness.runner import LOCK_FILE, ResultsLock

    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    for name, plant in (("hard", lambda p: os.link(target, p)), ("fifo", os.mkfifo),
                        ("dir", lambda p: p.mkdir())):
        out = tmp_path / name
        out.mkdir()
        plant(out / LOCK_FILE)
        with pytest.raises(InputError) as exc:
            ResultsLock(out)
        assert exc.value.one_line().startswith(f"{out / LOCK_FILE}: is in the way"), exc.value.one_line()
    assert target.read_text() == "keep me\n"
    ok = tmp_path / "ok"
    ok.mkdir()
    lock = ResultsLock(ok)  # a fresh directory, and the same one again once released
    assert (ok / LOCK_FILE).read_text() == f"{os.getpid()}\n"  # the holder's pid, while it holds it
    lock.release()
    ResultsLock(ok).release()
    assert not (ok / LOCK_FILE).exists()  # its holder removes it when done


def test_a_probe_file_link_in_out_is_refused_not_followed(tmp_path: Path) -> None:
    from harness.runner import check_writable

    out, target = tmp_path / "out", tmp_path / "precious.txt"
    out.mkdir()
    target.write_text("keep me\n")
    probe = out / f".harness-probe-{os.getpid()}"
    probe.symlink_to(target)
    with pytest.raises(InputError) as exc:
        check_writable(out)
    assert exc.value.one_line().startswith(f"{probe}: is a symbolic link"), exc.value.one_line()
    assert target.read_text() == "keep me\n" and probe.is_symlink()
    probe.unlink()
    probe.symlink_to(tmp_path / "nowhere")  # a dangling link would have created its target
    with pytest.raises(InputError, match="is a symbolic link"):
        check_writable(out)
    assert not (tmp_path / "nowhere").exists()
    probe.unlink()
    check_writable(out)
    assert not probe.exists()


@pytest.mark.parametrize("recorded, nan_all", [("value", False), ("value and r2", True)])
def test_a_trainer_returning_a_nan_val_loss_drifts_never_reproduces(tmp_path: Path, recorded: str,
                                                                    nan_all: bool) -> None:
    """A custom trainer's val_loss of NaN against a finite recorded value: drifted, exit 3.

    It used to be read as "not produced": with only `value` recorded the cell was `unrecorded`,
    with R² recorded too it was `reproduced`, both exit 0.
    """
    from tests.conftest import tiny_config

    root = tmp_path / "bundle"
    root.mkdir()
    write_dataset(root / "signals.npz")
    names = [str(t) for t in np.load(root / "signals.npz")["target_names"]]
    cfg = tiny_config()
    cfg["trainer"] = {"entrypoint": "nan_metrics:train"}
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    trial: dict = {"value": 0.5}
    if recorded == "value and r2":
        trial["user_attrs"] = {"r2": {n: 0.5 for n in names}}
    (root / "trial_info.yaml").write_text(yaml.safe_dump(trial))
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "NAN_ALL": "1" if nan_all else ""}
    p = subprocess.run([sys.executable, "-m", "harness", "run", str(root), "--trainer-path", str(TESTS / "trainers"),
                        "--device", "cpu", "--out", str(tmp_path / "out"), "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 3, p.stdout + p.stderr
    first = p.stdout.splitlines()[0]
    assert first.startswith("Overall: drifted"), p.stdout
    assert "val_loss is not a finite number here; the reference has 0.5" in p.stdout
    assert "non-finite" in p.stdout  # the val loss column says what it was, not "—"


def test_compare_and_diverge_refuse_a_record_with_a_forged_part_in_one_line(tmp_path: Path) -> None:
    """A record is a container's output: a part of the wrong shape is refused where it is read, naming the
    file and the key (exit 2), not a traceback in the judge or the report."""
    out = results_dir(tmp_path / "out")
    target = out / "b" / "record.json"
    data = json.loads(target.read_text())
    data["perturbation"] = {"applied": True, "tensor": "w", "index": "0; rm -rf ~"}
    target.write_text(json.dumps(data))
    for args in (["compare", str(out)], ["diverge", str(out / "b"), str(out / "a")]):
        p = bounded_harness(*args)
        assert p.returncode == 2 and "Traceback" not in p.stderr, (p.returncode, p.stderr)
        (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("harness:")]
        assert line.startswith(f"harness: error: {target}: perturbation: index must be an integer"), line
