"""Image build plans (tags, lock, args, context) and ensure_images against a fake engine."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import docker.errors
import pytest

from harness.docker_engine import Engine
from harness.images import build as imagebuild
from harness.errors import BackendError, InputError, RunFailed
from harness.images.build import (
    DIGEST_CACHE,
    BaseImageMissing,
    BuildFailed,
    BuiltImage,
    ensure_images,
    lock_text,
    parse_wheel_filename,
    plan_build,
    wheelhouse_command,
)
from harness.images.matrix import REPO_ROOT, load_matrix

CPU_WHEELS = {
    "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl": b"torch",
    "numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl": b"numpy",
    "scikit_learn-1.9.1-cp311-cp311-manylinux_2_27_x86_64.whl": b"sklearn",
    "joblib-1.6.0-py3-none-any.whl": b"joblib",
    # another Python's wheel must not enter the lock
    "numpy-2.4.6-cp312-cp312-manylinux_2_27_x86_64.whl": b"numpy312",
}


def cells():
    return {c.name: c for c in load_matrix()}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A minimal checkout: Dockerfile.cuda + a harness package."""
    root = tmp_path / "repo"
    (root / "harness" / "backends").mkdir(parents=True)
    (root / "harness" / "worker").mkdir()
    shutil.copy(REPO_ROOT / "Dockerfile.cuda", root / "Dockerfile.cuda")
    (root / "harness" / "__init__.py").write_text("")
    (root / "harness" / "worker" / "retrain.py").write_text("print('worker')\n")
    (root / "harness" / "backends" / "base.py").write_text("X = 1\n")
    (root / "harness" / "__pycache__").mkdir()
    (root / "harness" / "__pycache__" / "worker.cpython-311.pyc").write_bytes(b"junk")
    return root


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    wh = tmp_path / "wh" / "cpu-torch2.13"
    wh.mkdir(parents=True)
    for name, data in CPU_WHEELS.items():
        (wh / name).write_bytes(data)
    return wh


def plan(repo, wheelhouse, cell="cpu-torch2.13"):
    return plan_build(cells()[cell], repo, wheelhouse)


# ----------------------------------------------------------------------------- tags


def test_tag_is_content_addressed_and_stable(repo, wheelhouse):
    a, b = plan(repo, wheelhouse), plan(repo, wheelhouse)
    assert a.tag == b.tag and a.input_hash == b.input_hash
    assert a.tag == f"harness:cpu-torch2.13-{a.input_hash[:12]}"
    assert a.alias == "harness:cpu-torch2.13"
    assert a.labels["org.harness.input-hash"] == a.input_hash


def test_tag_changes_with_dockerfile(repo, wheelhouse):
    before = plan(repo, wheelhouse).tag
    with open(repo / "Dockerfile.cuda", "a") as f:
        f.write("# changed\n")
    assert plan(repo, wheelhouse).tag != before


def test_tag_changes_with_build_args(repo, wheelhouse):
    base = cells()["cpu-torch2.13"]
    a = plan_build(base, repo, wheelhouse)
    b = plan_build(replace(base, base_image="other/base:1"), repo, wheelhouse)
    assert a.tag != b.tag and b.buildargs["BASE_IMAGE"] == "other/base:1"


def test_tag_changes_with_wheels(repo, wheelhouse):
    before = plan(repo, wheelhouse).tag
    w = wheelhouse / "joblib-1.6.0-py3-none-any.whl"
    w.write_bytes(b"other joblib build")
    os.utime(w, ns=(1, 1))  # new content is found even with a new mtime only (size changed too)
    assert plan(repo, wheelhouse).tag != before


def test_tag_changes_with_harness_source_but_not_bytecode(repo, wheelhouse):
    before = plan(repo, wheelhouse).tag
    (repo / "harness" / "__pycache__" / "x.pyc").write_bytes(b"more junk")
    assert plan(repo, wheelhouse).tag == before
    (repo / "harness" / "backends" / "base.py").write_text("X = 2\n")
    assert plan(repo, wheelhouse).tag != before


def test_build_args(repo, wheelhouse):
    p = plan(repo, wheelhouse)
    assert p.buildargs == {
        "BASE_IMAGE": "local/debian-py:bookworm",
        "PYTHON": "3.11",
        "INSTALL_SOURCE": "wheelhouse",
        "TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu",
        "TORCH_VERSION": "2.13.0",
    }
    idx = plan_build(cells()["cu124-torch2.5"], repo, None)
    assert idx.buildargs["INSTALL_SOURCE"] == "index"
    assert idx.buildargs["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cu124"
    assert idx.buildargs["BASE_IMAGE"].startswith("nvidia/cuda:12.4.1")


# ----------------------------------------------------------------------------- lock + context


def test_lock_pins_every_wheel_by_hash(repo, wheelhouse):
    p = plan(repo, wheelhouse)
    lines = [line for line in p.lock.splitlines() if not line.startswith("#")]
    sha = hashlib.sha256(b"torch").hexdigest()
    assert f"torch==2.13.0+cpu --hash=sha256:{sha}" in lines
    assert [line.split("==")[0] for line in lines] == ["joblib", "numpy", "scikit-learn", "torch"]
    assert "numpy312" not in p.lock and hashlib.sha256(b"numpy312").hexdigest() not in p.lock
    assert "cp312" not in " ".join(p.context_files)


def test_lock_for_index_builds_pins_torch_only(repo):
    p = plan_build(cells()["cu124-torch2.5"], repo, None)
    body = [line for line in p.lock.splitlines() if not line.startswith("#")]
    assert body == ["torch==2.5.1", "numpy", "pyyaml", "joblib", "scikit-learn"]
    assert p.wheels == ()


def test_lock_refuses_two_versions_of_one_project():
    w = [imagebuild.Wheel(f"a-{v}-py3-none-any.whl", Path("x"), "0" * 64, "a", v) for v in ("1", "2")]
    with pytest.raises(InputError, match="several versions of a"):
        lock_text(cells()["cpu-torch2.13"], w)


def test_context_files(repo, wheelhouse):
    p = plan(repo, wheelhouse)
    assert p.context_files[:2] == ("Dockerfile", "requirements.lock")
    assert "wheelhouse/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl" in p.context_files
    assert {"harness/__init__.py", "harness/worker/retrain.py", "harness/backends/base.py"} <= set(p.context_files)
    assert not any("__pycache__" in f for f in p.context_files)
    ctx = repo.parent / "ctx"
    ctx.mkdir()
    imagebuild.write_context(p, ctx)
    written = {f.relative_to(ctx).as_posix() for f in ctx.rglob("*") if f.is_file()}
    assert written == set(p.context_files) | {"wheelhouse/.keep", "cuda/.keep"}
    assert not (ctx / "cuda" / "requirements.lock").exists()  # a CPU cell has no CUDA libraries
    assert (ctx / "Dockerfile").read_text() == p.dockerfile
    # hardlinked, not copied
    assert (ctx / "wheelhouse" / "joblib-1.6.0-py3-none-any.whl").stat().st_ino == (wheelhouse / "joblib-1.6.0-py3-none-any.whl").stat().st_ino


def test_dockerfile_mounts_the_wheels_and_pulls_no_frontend():
    text = (REPO_ROOT / "Dockerfile.cuda").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    # No wheel in any layer and no builder stage to leave dangling: the wheels are bind-mounted.
    assert "--mount=type=bind,source=wheelhouse" in code and "--mount=type=bind,source=cuda" in code
    assert "COPY wheelhouse" not in code and code.count("FROM ") == 1
    # The harness source (new with every commit) comes after the venv, so rebuilds reuse it.
    assert code.index("source=cuda") < code.index("source=wheelhouse") < code.index("COPY harness/")
    # Nothing cell-specific is in scope of the CUDA layer, so cells of one CUDA version share it.
    assert code.index("ARG TORCH_VERSION") > code.index("source=cuda")
    assert not any(line.replace(" ", "").lower().startswith("#syntax=") for line in text.splitlines())
    for arg in ("BASE_IMAGE", "PYTHON", "INSTALL_SOURCE", "TORCH_INDEX_URL", "TORCH_VERSION"):
        assert f"ARG {arg}" in text
    assert 'ENTRYPOINT ["python", "-m", "harness.worker"]' in text and "USER 10001" in text


def test_cuda_wheels_get_their_own_lock_and_directory(repo, tmp_path):
    wh = tmp_path / "wh" / "cu130-torch2.14"
    wh.mkdir(parents=True)
    for name in ("torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl", "nvidia_cublas-13.1.1.3-py3-none-manylinux_2_27_x86_64.whl",
                 "cuda_toolkit-13.0.3.0-py2.py3-none-any.whl", "numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl"):
        (wh / name).write_bytes(name.encode())
    p = plan(repo, wh, "cu130-torch2.14")
    cuda_lock = imagebuild.cuda_lock_text(p.lock, p.wheels)
    assert [line.split("==")[0] for line in cuda_lock.splitlines()] == ["cuda-toolkit", "nvidia-cublas"]
    assert all(line in p.lock.splitlines() for line in cuda_lock.splitlines())
    assert "cuda/requirements.lock" in p.context_files
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    imagebuild.write_context(p, ctx)
    assert sorted(f.name for f in (ctx / "cuda").iterdir()) == [
        ".keep", "cuda_toolkit-13.0.3.0-py2.py3-none-any.whl", "nvidia_cublas-13.1.1.3-py3-none-manylinux_2_27_x86_64.whl",
        "requirements.lock"]
    assert (ctx / "cuda" / "requirements.lock").read_text() == cuda_lock
    # the CUDA layer of two cells with the same CUDA wheels sees identical input, whatever their torch
    assert imagebuild.cuda_lock_text(p.lock.replace("torch==2.14.1", "torch==2.15.0"), p.wheels) == cuda_lock


def test_wheel_digests_are_cached(wheelhouse, monkeypatch):
    first = imagebuild.wheel_digests(wheelhouse)
    cache = json.loads((wheelhouse / DIGEST_CACHE).read_text())
    assert cache["wheels"]["joblib-1.6.0-py3-none-any.whl"]["sha256"] == hashlib.sha256(b"joblib").hexdigest()
    monkeypatch.setattr(imagebuild, "sha256_file", lambda p: pytest.fail(f"re-hashed {p}"))
    assert imagebuild.wheel_digests(wheelhouse) == first


def test_wheelhouse_problems_are_input_errors(repo, wheelhouse, tmp_path):
    with pytest.raises(InputError, match="no wheelhouse was given|none was given"):
        plan_build(cells()["cpu-torch2.13"], repo, None)
    with pytest.raises(InputError, match="does not exist"):
        plan_build(cells()["cpu-torch2.13"], repo, tmp_path / "missing")
    with pytest.raises(InputError, match="holds torch 2.13.0 but cell cu130-torch2.14 pins 2.14.1"):
        plan_build(cells()["cu130-torch2.14"], repo, wheelhouse)
    (wheelhouse / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").unlink()
    with pytest.raises(InputError, match="no torch wheel"):
        plan_build(cells()["cpu-torch2.13"], repo, wheelhouse)


def test_parse_wheel_filename():
    assert parse_wheel_filename("scikit_learn-1.9.1-cp311-cp311-manylinux_2_28_x86_64.whl") == ("scikit-learn", "1.9.1", "cp311")
    assert parse_wheel_filename("cuda_toolkit-13.0.3.0-py2.py3-none-any.whl")[2] == "py2.py3"
    with pytest.raises(InputError):
        parse_wheel_filename("notawheel.tar.gz")


def test_wheelhouse_command():
    cmd = wheelhouse_command(cells()["cu130-torch2.14"], "/tmp/wh", "python3")
    assert cmd[:4] == ["python3", "-m", "pip", "download"]
    assert "--only-binary=:all:" in cmd and "torch==2.14.1" in cmd and "scikit-learn" in cmd
    assert "--index-url" not in cmd
    online = wheelhouse_command(cells()["cu124-torch2.5"], "/tmp/wh", "python3", "https://download.pytorch.org/whl/cu124")
    assert online[online.index("--index-url") + 1] == "https://download.pytorch.org/whl/cu124"


# ----------------------------------------------------------------------------- fake SDK client
# These drive the real Engine (its build-stream parsing and error mapping) against a
# fake SDK client; tests/fake_engine.py fakes the Engine itself for the backends.


class FakeImage:
    def __init__(self, id_):
        self.id = id_
        self.tags = []
        self.attrs = {"Config": {}}


class FakeImages:
    def __init__(self, engine):
        self.engine = engine

    def get(self, name):
        if name in self.engine.tags:
            return FakeImage(self.engine.tags[name])
        raise docker.errors.ImageNotFound(f"No such image: {name}")


class FakeAPI:
    def __init__(self, engine):
        self.engine = engine

    def build(self, **kw):
        e = self.engine
        e.builds.append(kw)
        ctx = Path(kw["path"])
        assert (ctx / "Dockerfile").is_file() and (ctx / "requirements.lock").is_file()
        e.contexts.append(ctx)
        cell = kw["labels"]["org.harness.cell"]
        yield {"stream": "Step 1/3 : FROM base\n"}
        if cell in e.fail:
            for i in range(30):
                yield {"stream": f"line {i}\n"}
            yield {"error": "The command '/bin/sh -c pip install' returned a non-zero code: 1",
                   "errorDetail": {"code": 1}}
            return
        yield {"stream": "Successfully built abc\n"}
        e.tags[kw["tag"]] = "sha256:" + cell

    def tag(self, image, repository, tag=None, force=False):
        self.engine.tags[f"{repository}:{tag}"] = image
        return True


class FakeClient:
    def __init__(self, fail=(), bases=("local/debian-py:bookworm",)):
        self.engine = Engine(self, builder="classic")
        self.tags = {b: "sha256:base" for b in bases}
        self.fail = set(fail)
        self.builds: list[dict] = []
        self.contexts: list[Path] = []
        self.images = FakeImages(self)
        self.api = FakeAPI(self)


@pytest.fixture
def two_plans(repo, tmp_path):
    plans = []
    for name in ("cpu-torch2.13", "cu130-torch2.14"):
        torch = "2.13.0+cpu" if name.startswith("cpu") else "2.14.1"
        wh = tmp_path / "whroot" / name
        wh.mkdir(parents=True)
        (wh / f"torch-{torch}-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(torch.encode())
        plans.append(plan_build(cells()[name], repo, wh))
    return plans


def test_ensure_images_builds_missing_then_nothing(two_plans):
    client = FakeClient()
    events = []
    res = ensure_images(client.engine, two_plans, lambda c, e, t: events.append((c, e)))
    assert all(isinstance(r, BuiltImage) and r.built for r in res.values())
    assert client.tags["harness:cpu-torch2.13"] == client.tags[two_plans[0].tag]  # alias
    kw = client.builds[0]
    assert kw["buildargs"] == two_plans[0].buildargs and kw["tag"] == two_plans[0].tag
    assert kw["decode"] and kw["rm"] and kw["forcerm"] and kw["pull"] is False
    assert not any(c.exists() for c in client.contexts)  # temp contexts removed
    assert ("cpu-torch2.13", "built") in events and ("cpu-torch2.13", "log") in events
    again = ensure_images(client.engine, two_plans)
    assert len(client.builds) == 2
    assert all(not r.built for r in again.values())


def test_failed_build_does_not_stop_the_others(two_plans):
    client = FakeClient(fail={"cpu-torch2.13"})
    res = ensure_images(client.engine, two_plans)
    err = res["cpu-torch2.13"]
    assert isinstance(err, BuildFailed) and isinstance(err, RunFailed) and err.exit_code == 1
    assert err.cell == "cpu-torch2.13" and err.tag == two_plans[0].tag
    assert len(err.log_tail) == 20 and err.log_tail[-1] == "line 29"
    msg = str(err)
    assert "\n" not in msg and two_plans[0].tag in msg and "line 29" in msg
    assert "step 1/3 (FROM) exited with code 1" in msg  # short reason, not the whole RUN script
    assert isinstance(res["cu130-torch2.14"], BuiltImage) and res["cu130-torch2.14"].built
    assert "harness:cpu-torch2.13" not in client.tags


def test_missing_base_image_is_a_clear_error_and_nothing_is_pulled(two_plans):
    client = FakeClient(bases=())
    res = ensure_images(client.engine, two_plans[:1])
    err = res["cpu-torch2.13"]
    assert isinstance(err, BaseImageMissing)
    msg = err.one_line()
    assert "local/debian-py:bookworm" in msg and "never pulls" in msg and "docker import" in msg
    assert "--base-image cpu-torch2.13=IMAGE" in msg and "\n" not in msg
    assert client.builds == []


def test_unexpected_sdk_error_becomes_backend_error(two_plans):
    client = FakeClient()

    def boom(**kw):
        raise docker.errors.APIError("500 Server Error: engine exploded")

    client.api.build = boom
    res = ensure_images(client.engine, two_plans)
    assert all(isinstance(r, BuildFailed) for r in res.values())
    client.images.get = lambda name: (_ for _ in ()).throw(RuntimeError("socket closed"))
    res = ensure_images(client.engine, two_plans[:1])
    assert isinstance(res["cpu-torch2.13"], BackendError)


def test_cli_build_reports_a_failure_and_builds_the_rest(tmp_path, monkeypatch, capsys):
    import argparse

    from harness.cli import images as cli_images

    for name, torch in (("cpu-torch2.13", "2.13.0+cpu"), ("cu130-torch2.14", "2.14.1")):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"torch-{torch}-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"x")
    client = FakeClient(fail={"cpu-torch2.13"})
    monkeypatch.setattr(Engine, "connect", classmethod(lambda cls: client.engine))
    parser = argparse.ArgumentParser()
    cli_images.register(parser.add_subparsers())
    args = parser.parse_args(["images", "build", "--cells", "cpu-torch2.13,cu130-torch2.14",
                              "--wheelhouse", str(tmp_path)])
    assert args.func(args) == 1
    out = capsys.readouterr()
    assert "build failed" in out.err and "line 29" in out.err
    assert "harness:cu130-torch2.14" in client.tags
    # bad input stops before any build
    args = parser.parse_args(["images", "build", "--cells", "cpu-torch2.13"])
    with pytest.raises(InputError, match="none was given"):
        args.func(args)


def test_stale_tags_keeps_current_and_aliases():
    from harness.cli.images import stale_tags

    images = {
        "sha256:new": ["harness:cpu-torch2.13-aaaaaaaaaaaa", "harness:cpu-torch2.13"],
        "sha256:old": ["harness:cpu-torch2.13-bbbbbbbbbbbb"],
        "sha256:other": ["harness:cu130-torch2.14-cccccccccccc"],
        "sha256:foreign": ["harness:mine"],
    }
    current = {"harness:cpu-torch2.13-aaaaaaaaaaaa"}
    assert stale_tags(images, current, {"cpu-torch2.13"}) == ["harness:cpu-torch2.13-bbbbbbbbbbbb"]
    # a cell whose current tag is unknown keeps all its images
    assert stale_tags(images, current, set()) == []
