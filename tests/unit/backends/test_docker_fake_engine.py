"""The Docker backend, image builds, `snapshot rebuild` and `rerun` against the fake engine (no Docker needed)."""

from __future__ import annotations

import ast
import dataclasses
import json
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from harness import record as records
from harness import snapshot as snap
from harness.backends.docker import DockerBackend
from harness.docker_engine import Engine
from harness.errors import BaseImageMissing, BuildFailed
from harness.images import build as imagebuild
from harness.images.build import BuiltImage, ensure_images, lock_text, plan_build, resolve_wheels
from harness.images.matrix import REPO_ROOT, load_matrix
from harness.plan import Cell, Job
from harness.record import ImageInfo, Status

from tests.conftest import patience
from tests.fake_engine import FakeEngine, Outcome, image_id_for, tar_of
from tests.records import record as compare_record
from tests.records import with_env

HARNESS = REPO_ROOT / "harness"
CPU = "cpu-torch2.13"
BASE = "local/debian-py:bookworm"


def cells():
    return {c.name: c for c in load_matrix()}


# ----------------------------------------------------------------------------- nobody else imports docker


def test_only_the_docker_module_imports_the_sdk() -> None:
    offenders = []
    for path in sorted(HARNESS.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(n == "docker" or n.startswith("docker.") for n in names):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert offenders and all(o.startswith("harness/docker_engine.py:") for o in offenders), offenders


# ----------------------------------------------------------------------------- the backend running a cell


def job(tmp_path: Path) -> Job:
    (tmp_path / "b").mkdir(exist_ok=True)
    return Job(bundle_dir=str(tmp_path / "b"), data_path=str(tmp_path / "signals.npz"), results_dir=str(tmp_path / "r"))


def backend_with_image(fake: FakeEngine, cell: Cell, **kw) -> DockerBackend:
    img = fake.add_image("cell-image", f"harness:{CPU}-abcdef012345")
    backend = DockerBackend(fake, {}, **kw)  # type: ignore[arg-type]
    backend.use_image(cell.name, ImageInfo(id=img.id, tag=f"harness:{CPU}-abcdef012345"))
    return backend


def write_ok_record(out: Path, req) -> None:
    spec = json.loads((out / "spec.json").read_text())
    assert spec["out_dir"] == "/harness/out" and spec["backend"] == "docker"
    records.write(out / "record.json", compare_record(spec["cell"], sha="w1"))


def test_a_cell_that_writes_its_record(tmp_path: Path) -> None:
    fake, cell = FakeEngine(), Cell("c", threads=2)
    backend = backend_with_image(fake, cell)
    fake.outcomes.append(Outcome(0, lines=["epoch 1", "epoch 2"], worker=write_ok_record))
    rec = backend.run(cell, job(tmp_path))
    assert rec.status is Status.OK and rec.backend == "docker" and rec.weights_sha256 == "w1"
    assert rec.image.tag == f"harness:{CPU}-abcdef012345"
    (req,) = fake.runs
    assert req.image == image_id_for("cell-image") and req.gpus == "none" and req.network == "none"
    assert req.tag == f"harness:{CPU}-abcdef012345" and req.cell == "c"
    assert (tmp_path / "r" / "c" / "worker.log").read_text() == "epoch 1\nepoch 2\n"
    assert records.read(tmp_path / "r" / "c" / "record.json").status is Status.OK
    assert fake.running == {} and fake.removed_containers == ["c1"]  # removed after it exited


def test_nonzero_exit_without_record_is_a_failure_row_with_the_log_tail(tmp_path: Path) -> None:
    fake, cell = FakeEngine(), Cell("c")
    backend = backend_with_image(fake, cell)
    fake.outcomes.append(Outcome(1, lines=["Traceback (most recent call last):", "ValueError: boom"]))
    rec = backend.run(cell, job(tmp_path))
    assert rec.status is Status.FAILED and rec.error.exit_status == 1
    msg = rec.error.message
    assert "worker exited with status 1 and wrote no record" in msg and "ValueError: boom" in msg
    assert "Traceback" in rec.error.log_tail and fake.running == {} and fake.removed_containers == ["c1"]


def test_oom_kill_is_named(tmp_path: Path) -> None:
    fake, cell = FakeEngine(), Cell("c")
    backend = backend_with_image(fake, cell, memory="48m")
    fake.outcomes.append(Outcome(137, oom_killed=True, lines=["epoch 1"]))
    rec = backend.run(cell, job(tmp_path))
    assert rec.status is Status.FAILED
    assert "OOM-killed" in rec.error.message and "48m" in rec.error.message
    assert fake.runs[0].memory == "48m"


def test_gpu_refused_by_an_engine_without_nvidia_runtime(tmp_path: Path) -> None:
    fake, cell = FakeEngine(nvidia=False), Cell("g", device="cuda")
    backend = backend_with_image(fake, cell, gpus="all")
    rec = backend.run(cell, job(tmp_path))
    msg = rec.error.message
    assert rec.status is Status.FAILED and "cell g asks for a GPU" in msg
    assert "no NVIDIA runtime" in msg and "nvidia-container-toolkit" in msg and "--gpus none" in msg
    assert fake.running == {}
    # the way out works: --gpus none asks for no device
    backend = backend_with_image(fake, cell, gpus="none")
    fake.outcomes.append(Outcome(0, worker=write_ok_record))
    assert backend.run(cell, job(tmp_path)).status is Status.OK and fake.runs[-1].gpus == "none"


def test_close_stops_and_removes_running_containers(tmp_path: Path) -> None:
    fake, cell = FakeEngine(), Cell("c")
    backend = backend_with_image(fake, cell)
    fake.outcomes.append(Outcome(block=True, lines=["training"]))
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(rec=backend.run(cell, job(tmp_path))))
    t.start()
    deadline = time.monotonic() + patience(10)
    while not fake.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(fake.running) == ["c1"]
    backend.close()  # what Ctrl-C does
    t.join(timeout=patience(10))
    assert not t.is_alive() and fake.running == {}
    assert fake.stopped_containers == ["c1"] and fake.removed_containers == ["c1"]
    assert result["rec"].status is Status.FAILED and "137" in result["rec"].error.message


# ----------------------------------------------------------------------------- ensure_images


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    import shutil

    root = tmp_path / "repo"
    (root / "harness" / "worker").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "Dockerfile.cuda", root / "Dockerfile.cuda")
    (root / "harness" / "__init__.py").write_text("")
    (root / "harness" / "worker" / "retrain.py").write_text("print('worker')\n")
    return root


def wheelhouse(tmp_path: Path, cell: str = CPU) -> Path:
    torch = "2.13.0+cpu" if cell.startswith("cpu") else "2.14.1"
    wh = tmp_path / "wh" / cell
    wh.mkdir(parents=True, exist_ok=True)
    (wh / f"torch-{torch}-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(torch.encode())
    (wh / "joblib-1.6.0-py3-none-any.whl").write_bytes(b"joblib")
    return wh


def test_ensure_images_cached_built_failed_and_missing_base(repo: Path, tmp_path: Path) -> None:
    fake = FakeEngine()
    fake.add_image("base", BASE)
    plans = [plan_build(cells()[n], repo, wheelhouse(tmp_path, n)) for n in (CPU, "cu130-torch2.14")]
    events: list[tuple[str, str]] = []
    res = ensure_images(fake, plans, lambda c, e, t: events.append((c, e)))  # type: ignore[arg-type]
    assert all(isinstance(r, BuiltImage) and r.built for r in res.values())
    build = fake.builds[0]
    assert build["tag"] == plans[0].tag and build["labels"] == plans[0].labels and build["cell"] == CPU
    assert build["buildargs"] == plans[0].buildargs and build["nocache"] is False
    assert {"Dockerfile", "requirements.lock", "wheelhouse/.keep", "harness/worker/retrain.py",
            "wheelhouse/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"} <= set(build["files"])
    assert fake.tags[f"harness:{CPU}"] == fake.tags[plans[0].tag]  # the compose alias
    assert (CPU, "log") in events and (CPU, "built") in events
    # cached: nothing built again, the alias still pointed at it
    del fake.tags[f"harness:{CPU}"]
    again = ensure_images(fake, plans)  # type: ignore[arg-type]
    assert len(fake.builds) == 2 and all(not r.built for r in again.values())
    assert fake.tags[f"harness:{CPU}"] == again[CPU].id
    # a failing build carries its log tail; the other cell still builds
    (repo / "harness" / "new.py").write_text("X = 2\n")
    changed = [plan_build(cells()[n], repo, wheelhouse(tmp_path, n)) for n in (CPU, "cu130-torch2.14")]
    fake.fail_builds[CPU] = ["python3.11: not found", "the base image lacks python3.11"]
    res = ensure_images(fake, changed)  # type: ignore[arg-type]
    err = res[CPU]
    assert isinstance(err, BuildFailed) and err.tag == changed[0].tag and err.cell == CPU
    assert err.log_tail[-1] == "the base image lacks python3.11"
    assert "step 5/9 (RUN) exited with code 1" in str(err) and "lacks python3.11" in str(err)
    assert isinstance(res["cu130-torch2.14"], BuiltImage) and res["cu130-torch2.14"].built
    # a missing base image: refused before any build, nothing pulled
    fake2 = FakeEngine()
    res = ensure_images(fake2, plans[:1])  # type: ignore[arg-type]
    assert isinstance(res[CPU], BaseImageMissing) and BASE in str(res[CPU]) and fake2.builds == []


def test_prepare_describes_the_image_a_record_carries(repo: Path, tmp_path: Path) -> None:
    fake = FakeEngine()
    fake.add_image("base", BASE)
    ic = cells()[CPU]
    plan = plan_build(ic, repo, wheelhouse(tmp_path))
    backend = DockerBackend(fake, {CPU: plan})  # type: ignore[arg-type]
    cell = Cell(CPU, image=ic)
    assert backend.prepare([cell], job(tmp_path)) == {}
    info = backend.images[CPU]
    assert info.tag == plan.tag and info.id == fake.tags[plan.tag] and info.input_hash == plan.input_hash
    assert info.source == "wheelhouse" and info.built_seconds is not None


# ----------------------------------------------------------------------------- snapshot rebuild and rerun


def make_archive(tmp_path: Path, fake: FakeEngine, *, packages: dict[str, str], bundle: Path | None = None,
                 record: dict | None = None, data_dir: Path | None = None,
                 in_dir: str = "points.npz") -> tuple[Path, Path, str]:
    """A snapshot of cell CPU whose image lives in ``fake``; returns (archive, wheelhouse, image id).

    With ``data_dir``: a run with --data-dir, the data at ``in_dir`` inside it (archived as a tree).
    """
    ic = cells()[CPU]
    wh = wheelhouse(tmp_path)
    wheels = resolve_wheels(ic, wh)
    lock = lock_text(ic, wheels)
    buildargs = imagebuild.build_args(ic, "wheelhouse")
    buildargs["BASE_IMAGE"] = BASE
    dockerfile = (REPO_ROOT / "Dockerfile.cuda").read_bytes()
    sources = {"harness/__init__.py": b"", "harness/worker/retrain.py": b"print('worker')\n"}
    digest = imagebuild.input_hash(dockerfile, buildargs, wheels, sources, lock)
    tag = f"harness:{CPU}-{digest[:12]}"
    img = fake.add_image("archived", tag, packages=dict(packages), labels={imagebuild.LABEL_HASH: digest},
                         files={snap.IMAGE_SOURCES_PATH: tar_of(sources)})
    if bundle is None:
        bundle = tmp_path / "bundle" / "optuna_best"
        bundle.mkdir(parents=True)
        (bundle / "config.yaml").write_text("training: {seed: 1}\n")
    data = bundle / "signals.npz"
    if not data.exists():
        data.write_bytes(b"data")
    rec = record or compare_record(CPU)
    archive = tmp_path / "run.harness.tar"
    with snap.SnapshotWriter(archive) as w:
        w.add_bytes(snap.RECORD, rec.to_json().encode())
        w.add_bytes(snap.DOCKERFILE, dockerfile)
        w.add_bytes(snap.LOCK, lock.encode())
        w.add_bytes(snap.BUILDARGS, json.dumps(buildargs).encode())
        w.add_bytes(snap.SOURCES, tar_of(sources))
        w.add_tree(snap.BUNDLE, bundle, "optuna_best")
        if data_dir is None:
            w.add_file(snap.DATA, data)
            entry = {"file": "signals.npz", "sha256": snap.sha256_file(data), "included": True}
        else:
            from harness.worker.data import sha256_path

            w.add_tree(snap.DATA_TREE, data_dir, data_dir.name)
            entry = {"file": Path(in_dir).name, "sha256": sha256_path(data_dir / in_dir), "included": True,
                     "kind": "file", "dir": {"name": data_dir.name, "sha256": sha256_path(data_dir), "in_dir": in_dir}}
        w.add_chunks(snap.IMAGE, fake.save(img.id, tag))
        w.finish({"cell": CPU, "cell_spec": asdict(ic), "image": {"id": img.id, "tag": tag, "input_hash": digest},
                  "bundle": {"name": "optuna_best"}, "data": entry, "host": snap.host_facts()})
    return archive, wh, img.id


PACKAGES = {"torch": "2.13.0+cpu", "numpy": "2.4.6", "joblib": "1.6.0"}


@pytest.fixture
def patched(monkeypatch) -> FakeEngine:
    fake = FakeEngine()
    fake.add_image("base", BASE)
    monkeypatch.setattr(Engine, "connect", classmethod(lambda cls: fake))
    return fake


def test_rebuild_with_the_same_packages_passes(patched: FakeEngine, tmp_path: Path, capsys) -> None:
    from harness.cli import main

    archive, wh, archived_id = make_archive(tmp_path, patched, packages=PACKAGES)
    patched.remove_image(archived_id, force=True)  # rebuild loads it from the archive first
    patched.build_packages = dict(PACKAGES)
    assert main(["snapshot", "rebuild", str(archive), "--wheelhouse", str(wh)]) == 0
    out = capsys.readouterr().out
    assert "rebuild check passed: the same 3 installed distributions" in out
    assert "identical to the archived image's (input hash" in out  # the context was laid out as images build does
    assert ("load", archived_id) in patched.calls
    (build,) = patched.builds
    assert build["nocache"] is True and build["tag"].startswith(f"harness-rebuild:{CPU}-")
    assert "harness/worker/retrain.py" in build["files"] and build["dockerfile"] == (REPO_ROOT / "Dockerfile.cuda").read_bytes()
    assert not any(build["tag"] in tags for tags in patched.images().values())  # removed without --keep


def test_rebuild_with_a_differing_package_fails(patched: FakeEngine, tmp_path: Path, capsys) -> None:
    from harness.cli import main

    archive, wh, _ = make_archive(tmp_path, patched, packages=PACKAGES)
    patched.build_packages = dict(PACKAGES, numpy="2.4.7")
    assert main(["snapshot", "rebuild", str(archive), "--wheelhouse", str(wh)]) == 1
    out = capsys.readouterr().out
    assert "package differs: numpy 2.4.6 → 2.4.7" in out and "rebuild check FAILED: 1 package differences" in out


def test_rebuild_with_a_failing_build_is_one_line(patched: FakeEngine, tmp_path: Path, capsys) -> None:
    from harness.cli import main

    archive, wh, _ = make_archive(tmp_path, patched, packages=PACKAGES)
    patched.fail_builds[CPU] = ["pip: no matching distribution"]
    assert main(["snapshot", "rebuild", str(archive), "--wheelhouse", str(wh)]) == 1
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("harness: error:")]
    assert "exited with code 1" in line and "pip: no matching distribution" in line


def test_rerun_loads_the_absent_image_checks_its_id_and_compares(patched: FakeEngine, make_bundle, tmp_path: Path,
                                                                 capsys) -> None:
    from harness.cli import main

    archived = with_env(compare_record(CPU), "2.13.0+cpu", None)
    archived.spec = {"device": "cpu", "determinism": "strict", "schema": "harness.runspec/3", "cell": CPU}
    archived.image = ImageInfo(id="sha256:old", tag="t")
    archive, _, image_id = make_archive(tmp_path, patched, packages=PACKAGES, bundle=make_bundle(), record=archived)
    patched.remove_image(image_id, force=True)

    def worker(out: Path, req) -> None:  # the rerun reproduces the archived record exactly
        spec = json.loads((out / "spec.json").read_text())
        # the archived worker gets the archived spec, not today's (only its cell name differs)
        assert spec == dict(archived.spec, cell=f"{CPU}@rerun")
        records.write(out / "record.json", dataclasses.replace(archived, cell=spec["cell"]))

    patched.outcomes.append(Outcome(0, worker=worker))
    out = tmp_path / "rerun"
    rc = main(["rerun", str(archive), "--out", str(out), "--no-progress"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert ("load", image_id) in patched.calls and patched.image_exists(image_id)
    (req,) = patched.runs
    assert req.image == image_id and req.network == "none"
    assert "bitwise identical" in stdout
    rerun = records.read(out / f"{CPU}@rerun" / "record.json")
    assert rerun.image.id == image_id and rerun.image.snapshot == str(archive)


def test_rerun_refuses_an_image_whose_id_differs(patched: FakeEngine, tmp_path: Path, capsys) -> None:
    from harness.cli import main

    archive, _, image_id = make_archive(tmp_path, patched, packages=PACKAGES)
    patched.remove_image(image_id, force=True)
    real_load = patched.load

    def load_other(chunks):  # an engine that loads something else under that name
        for ref in real_load(chunks):
            img = patched.store.pop(ref)
            img.id = image_id_for("other")
            patched.store[img.id] = img
            for t in img.tags:
                patched.tags[t] = img.id
            yield img.id

    patched.load = load_other  # type: ignore[method-assign]
    assert main(["rerun", str(archive), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("harness: error:")]
    assert f"not the archived {image_id}" in line and "nothing was left in the engine" in line
    assert image_id_for("other") not in patched.store  # cleaned up
