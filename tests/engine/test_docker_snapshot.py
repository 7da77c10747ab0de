"""`harness snapshot` / `verify` / `rerun` on a real Docker engine, with the cpu-torch2.13 cell.

The image is deleted from the engine and brought back by `rerun` from the archive; a
module finalizer reloads (or rebuilds) it if a test fails midway, so later tests keep it.
Marked `docker`: skipped locally without an engine, required under CI=true.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from harness import snapshot as snap
from harness.errors import InputError
from tests.conftest import REPO

pytestmark = pytest.mark.docker

CELL = "cpu-torch2.13"


def harness(*args: str, env: dict | None = None, timeout: int = 1800) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ, COLUMNS="230", **(env or {}))
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, env=e, timeout=timeout)


def error_line(p: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in p.stderr, p.stderr
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("harness: error:")]
    return line


def image_present(client, image_id: str) -> bool:
    import docker.errors

    try:
        client.images.get(image_id)
        return True
    except docker.errors.ImageNotFound:
        return False


def remove_image(client, image_id: str, wait_s: float = 300) -> None:
    """Delete the image and every tag pointing at it; the engine is shared, so wait out
    containers that other runs still have on it."""
    import docker.errors

    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.images.remove(image_id, force=True)
            return
        except docker.errors.APIError as exc:
            if exc.status_code != 409 or time.monotonic() > deadline:
                raise
            time.sleep(2)


@pytest.fixture(scope="module")
def snapped(tmp_path_factory, docker_client, engine, wheelhouse_root, base_image):
    """The example's cpu cell run and archived once; the image restored at module end whatever happened."""
    from tests.conftest import EXAMPLE

    root = tmp_path_factory.mktemp("dsnap")
    shutil.copytree(EXAMPLE, root / "examples" / "optuna_best")
    shutil.copytree(REPO / "examples" / "data", root / "examples" / "data")
    archive = root / "run.harness.tar"
    t0 = time.perf_counter()
    p = harness("snapshot", str(root / "examples" / "optuna_best"), "--cell", CELL, "-o", str(archive),
                "--out", str(root / "out"), "--wheelhouse", str(wheelhouse_root), "--base-image", base_image, "--no-progress")
    seconds = time.perf_counter() - t0
    assert p.returncode == 0, p.stdout + p.stderr
    record = json.loads((root / "out" / CELL / "record.json").read_text())
    image_id = record["image"]["id"]
    tags = docker_client.images.get(image_id).tags
    yield {"root": root, "archive": archive, "record": record, "image_id": image_id, "seconds": seconds, "proc": p,
           "tags": tags}
    if not image_present(docker_client, image_id):
        try:  # the pristine archive first; a rebuild when it cannot serve
            snap.load_image(engine, archive, snap.verify(archive).manifest)
        except Exception:  # noqa: BLE001
            harness("images", "build", "--cells", CELL, "--wheelhouse", str(wheelhouse_root), "--base-image", base_image)
    if image_present(docker_client, image_id):  # a load brings the image back by id alone: its tags, as they were
        for tag in tags:
            if not image_present(docker_client, tag):
                docker_client.images.get(image_id).tag(*tag.rsplit(":", 1))


def test_snapshot_holds_every_member(snapped) -> None:
    v = snap.verify(snapped["archive"])
    m = v.manifest
    names = [e["name"] for e in v.members]
    assert names == [snap.RECORD, snap.ENVIRONMENT, snap.DOCKERFILE, snap.LOCK, snap.BUILDARGS, snap.SOURCES,
                     snap.BUNDLE, snap.DATA, snap.IMAGE]
    assert m["cell"] == CELL and m["image"]["id"] == snapped["image_id"]
    assert m["build"]["recipe_matches_image"] is True
    assert m["data"]["sha256"] == snapped["record"]["data_sha256"]
    lock = snap.read_member(snapped["archive"], snap.LOCK).decode()
    assert "torch==2.13.0+cpu --hash=sha256:" in lock
    src = snap.tar_bytes_files(snap.read_member(snapped["archive"], snap.SOURCES))
    assert "harness/worker/retrain.py" in src
    # the image member is a `docker save` tar tagged with the content tag only
    raw_manifest = None
    with tarfile.open(fileobj=_Chunks(snap.member_chunks(snapped["archive"], snap.IMAGE)), mode="r|") as tf:
        for info in tf:
            if info.name == "manifest.json":
                raw_manifest = json.loads(tf.extractfile(info).read())
                break
    assert raw_manifest[0]["RepoTags"] == [m["image"]["tag"]]
    size = snapped["archive"].stat().st_size
    print(f"\nsnapshot of {CELL}: {size / 1e6:.1f} MB in {snapped['seconds']:.1f}s (including the run)")


class _Chunks:
    """A read()-able view of a chunk iterator (for tarfile's stream mode)."""

    def __init__(self, chunks) -> None:
        self.it, self.buf = iter(chunks), b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buf) < n:
            nxt = next(self.it, None)
            if nxt is None:
                break
            self.buf += nxt
        out, self.buf = (self.buf, b"") if n < 0 else (self.buf[:n], self.buf[n:])
        return out


def test_verify_prints_a_summary(snapped) -> None:
    t0 = time.perf_counter()
    p = harness("snapshot", "verify", str(snapped["archive"]))
    assert p.returncode == 0, p.stderr
    assert snap.IMAGE in p.stdout and snapped["image_id"] in p.stdout and CELL in p.stdout
    print(f"\nverify: {time.perf_counter() - t0:.1f}s")


def test_rerun_loads_the_deleted_image_and_reproduces(snapped, docker_client) -> None:
    image_id = snapped["image_id"]
    remove_image(docker_client, image_id)
    assert not image_present(docker_client, image_id)
    out = snapped["root"] / "rerun"
    t0 = time.perf_counter()
    p = harness("rerun", str(snapped["archive"]), "--out", str(out), "--json", str(out / "both.json"), "--no-progress")
    seconds = time.perf_counter() - t0
    assert p.returncode == 0, p.stdout + p.stderr
    assert image_present(docker_client, image_id)  # loaded, and the very same id
    assert docker_client.images.get(image_id).tags == []  # by id alone: the archive's tag is not applied
    for tag in snapped["tags"]:  # the tags this test removed, back for the tests that build or snapshot the cell
        docker_client.images.get(image_id).tag(*tag.rsplit(":", 1))
    rerun = json.loads((out / f"{CELL}@rerun" / "record.json").read_text())
    original = snapped["record"]
    assert rerun["status"] == "ok"
    assert rerun["image"]["id"] == image_id
    assert rerun["env"]["net_interfaces"] == ["lo"]  # network none
    assert rerun["metrics"]["retrained"] == original["metrics"]["retrained"]
    assert rerun["weights_sha256"] == original["weights_sha256"]
    report = json.loads((out / "both.json").read_text())
    assert [r["cell"] for r in report["records"]] == [f"{CELL}@archived", f"{CELL}@rerun"]
    assert "bitwise identical" in p.stdout and "host: same" in p.stdout
    print(f"\nrerun with image load: {seconds:.1f}s")


def _damaged_copy(snapped, name: str) -> Path:
    dst = snapped["root"] / name
    shutil.copyfile(snapped["archive"], dst)
    return dst


def _image_member(path: Path) -> tuple[int, int]:
    with tarfile.open(path, "r:") as tf:
        info = tf.getmember(snap.IMAGE)
        return info.offset_data, info.size


def _untagged(docker_client) -> set[str]:
    """The engine's images without a name: what a load leaves (a load never names an image)."""
    return {i.id for i in docker_client.images.list() if not i.tags}


def _refused_naming(snapped, docker_client, path: Path, words: str) -> None:
    # counted by what a load would leave, not by every image: the engine may be building others meanwhile
    before = _untagged(docker_client)
    for cmd in (["snapshot", "verify", str(path)], ["rerun", str(path), "--out", str(path) + ".out", "--no-progress"]):
        p = harness(*cmd)
        assert p.returncode == 2, p.stdout + p.stderr
        line = error_line(p)
        assert f"member {snap.IMAGE} {words}" in line, line
    assert _untagged(docker_client) <= before  # nothing loaded
    assert not Path(str(path) + ".out").exists()


def test_flipped_byte_is_refused_and_named(snapped, docker_client) -> None:
    bad = _damaged_copy(snapped, "flipped.harness.tar")
    off, size = _image_member(bad)
    with open(bad, "r+b") as f:
        f.seek(off + size // 2)
        b = f.read(1)
        f.seek(off + size // 2)
        f.write(bytes([b[0] ^ 0x01]))
    _refused_naming(snapped, docker_client, bad, "differs from the manifest")


def test_truncated_archive_is_refused_and_named(snapped, docker_client) -> None:
    bad = _damaged_copy(snapped, "truncated.harness.tar")
    off, size = _image_member(bad)
    with open(bad, "r+b") as f:
        f.truncate(off + size // 2)
    _refused_naming(snapped, docker_client, bad, "is truncated")


def test_results_dir_with_another_image_is_refused(snapped, wheelhouse_root, base_image, tmp_path: Path) -> None:
    res = tmp_path / "res" / CELL
    res.mkdir(parents=True)
    rec = dict(snapped["record"], image=dict(snapped["record"]["image"], id="sha256:" + "f" * 64))
    (res / "record.json").write_text(json.dumps(rec))
    p = harness("snapshot", str(snapped["root"] / "examples" / "optuna_best"), "--cell", CELL, "-o", str(tmp_path / "x.tar"),
                "--results", str(tmp_path / "res"), "--wheelhouse", str(wheelhouse_root), "--base-image", base_image)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "was run in image sha256:ffff" in error_line(p)
    assert not (tmp_path / "x.tar").exists() and not list(tmp_path.glob(".x.tar.*"))


def test_no_engine_is_one_line(snapped, tmp_path: Path) -> None:
    p = harness("rerun", str(snapped["archive"]), "--out", str(tmp_path / "o"),
                env={"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"})
    assert p.returncode == 1
    assert "Docker engine not reachable" in error_line(p)


def test_no_data_snapshot_reruns_with_the_checked_data(snapped, wheelhouse_root, base_image, tmp_path: Path) -> None:
    """--no-data archives only the data's digest; rerun then needs --data, and checks it."""
    bundle = snapped["root"] / "examples" / "optuna_best"
    archive = tmp_path / "nodata.harness.tar"
    p = harness("snapshot", str(bundle), "--cell", CELL, "-o", str(archive), "--results", str(snapped["root"] / "out"),
                "--no-data", "--wheelhouse", str(wheelhouse_root), "--base-image", base_image, "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    assert snap.DATA not in {m["name"] for m in snap.verify(archive).manifest["members"]}
    p = harness("rerun", str(archive), "--out", str(tmp_path / "o1"), "--no-progress")
    assert p.returncode == 2 and "--data" in error_line(p)
    wrong = tmp_path / "wrong.npz"
    wrong.write_bytes(b"not the data")
    p = harness("rerun", str(archive), "--data", str(wrong), "--out", str(tmp_path / "o2"), "--no-progress")
    assert p.returncode == 2 and "the archived run trained on 844a62a5e74e" in error_line(p)
    data = snapped["root"] / "examples" / "data" / "signals.npz"
    p = harness("rerun", str(archive), "--data", str(data), "--out", str(tmp_path / "o3"), "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    rerun = json.loads((tmp_path / "o3" / f"{CELL}@rerun" / "record.json").read_text())
    assert rerun["weights_sha256"] == snapped["record"]["weights_sha256"]


# ----------------------------------------------------------------------------- hostile snapshots


def _reseal(src: Path, dst: Path, edit) -> Path:
    """A forger's copy: the manifest edited and its own digest recomputed (self-consistent)."""
    shutil.copyfile(src, dst)
    with tarfile.open(dst, "r:") as tf:
        info = tf.next()
        off, size = info.offset_data, info.size
        manifest = json.loads(tf.extractfile(info).read())
    edit(manifest)
    manifest["manifest_sha256"] = snap.manifest_digest(manifest)
    text = json.dumps(manifest).encode()
    with open(dst, "r+b") as f:
        f.seek(off)
        f.write(text + b" " * (size - len(text)))
    return dst


def _containers(docker_client) -> set[str]:
    return {c.id for c in docker_client.containers.list(all=True)}


def test_rerun_refuses_a_data_file_that_leaves_its_directory(snapped, docker_client) -> None:
    root = snapped["root"]
    # rerun unpacks into $TMPDIR/harness-rerun-*/data: "../../escaped" pointed at $TMPDIR/escaped
    escaped = Path(tempfile.gettempdir()) / "escaped"
    escaped.unlink(missing_ok=True)
    bad = _reseal(snapped["archive"], root / "escape-data.harness.tar", lambda m: m["data"].update(file="../../escaped"))
    before = _containers(docker_client)
    p = harness("rerun", str(bad), "--out", str(root / "escape-data.out"), "--no-progress")
    assert p.returncode == 2, p.stdout + p.stderr
    line = error_line(p)
    assert "manifest.json" in line and "data.file" in line and "../../escaped" in line, line
    assert not escaped.exists()
    assert not (root / "escape-data.out").exists() and _containers(docker_client) == before


def test_rerun_refuses_a_bundle_name_that_is_a_host_directory(snapped, docker_client, tmp_path: Path) -> None:
    host = tmp_path / "host-bundle"
    host.mkdir()
    (host / "target_scaler.joblib").write_bytes(b"a pickle that must never be loaded")
    bad = _reseal(snapped["archive"], tmp_path / "escape-bundle.harness.tar", lambda m: m["bundle"].update(name=str(host)))
    before = _containers(docker_client)
    p = harness("rerun", str(bad), "--out", str(tmp_path / "o"), "--no-progress")
    assert p.returncode == 2, p.stdout + p.stderr
    line = error_line(p)
    assert "manifest.json" in line and "bundle.name" in line and str(host) in line, line
    assert not (tmp_path / "o").exists() and _containers(docker_client) == before


def test_signed_snapshot_verifies_and_a_forged_one_does_not(snapped, wheelhouse_root, base_image, tmp_path: Path) -> None:
    if shutil.which("ssh-keygen") is None:
        pytest.fail("ssh-keygen (openssh-client) is needed for snapshot signatures")
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ci@harness", "-f", str(key)], check=True)
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"ci@harness {(tmp_path / 'key.pub').read_text()}")
    archive = tmp_path / "signed.harness.tar"
    p = harness("snapshot", str(snapped["root"] / "examples" / "optuna_best"), "--cell", CELL, "-o", str(archive),
                "--results", str(snapped["root"] / "out"), "--sign", str(key), "--wheelhouse", str(wheelhouse_root),
                "--base-image", base_image, "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "signed with" in " ".join(p.stdout.split())  # the console may wrap the line before a long path
    p = harness("snapshot", "verify", str(archive), "--allowed-signers", str(allowed))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "signature: good, signed by ci@harness" in p.stdout
    forged = _reseal(archive, tmp_path / "forged.harness.tar", lambda m: m["record"].update(weights_sha256="0" * 64))
    assert harness("snapshot", "verify", str(forged)).returncode == 0  # self-consistent without the key check
    p = harness("rerun", str(forged), "--allowed-signers", str(allowed), "--out", str(tmp_path / "o"), "--no-progress")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "manifest.sig does not verify" in error_line(p)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- an archive that names tags


def _forged_save(repo_tags: list[str]) -> tuple[bytes, str]:
    """A `docker save` tar of a one-file image made here (in no engine yet) whose names claim ``repo_tags``;
    returns (the tar, the image's id)."""
    payload = f"planted by a forged snapshot {os.urandom(8).hex()}\n".encode()  # a new image id every run
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tf:
        info = tarfile.TarInfo("forged.txt")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    layer_tar = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {}, "created": "2020-01-01T00:00:00Z",
                         "history": [{"created": "2020-01-01T00:00:00Z"}],
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    hexid = hashlib.sha256(config).hexdigest()
    layer_dir = hashlib.sha256(b"layer " + layer_tar).hexdigest()
    repositories: dict[str, dict[str, str]] = {}
    for t in repo_tags:
        repo, tag = t.rsplit(":", 1)
        repositories.setdefault(repo, {})[tag] = layer_dir
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        for name, data in ((f"{layer_dir}/layer.tar", layer_tar), (f"{hexid}.json", config),
                           ("manifest.json", json.dumps([{"Config": f"{hexid}.json", "RepoTags": repo_tags,
                                                          "Layers": [f"{layer_dir}/layer.tar"]}]).encode()),
                           ("repositories", json.dumps(repositories).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue(), "sha256:" + hexid


def _image_archive(path: Path, image_tar: bytes, image_id: str) -> Path:
    """An unsigned snapshot holding ``image_tar`` whose manifest names ``image_id``: what any forger can seal."""
    with snap.SnapshotWriter(path) as w:
        w.add_bytes(snap.RECORD, b"{}")
        w.add_bytes(snap.IMAGE, image_tar)
        w.finish({"cell": CELL, "image": {"id": image_id, "tag": "harness:victim-test"}, "bundle": {"name": "optuna_best"},
                  "data": {"file": "signals.npz", "sha256": "0" * 64, "included": False}})
    return path


@pytest.fixture
def victim(docker_client, base_image):
    """``harness:victim-test`` pointing at the base image; afterwards that tag is removed, and every image a test
    loaded (``victim["loaded"]``) with it."""
    original = docker_client.images.get(base_image)
    original.tag("harness", "victim-test")
    state = {"tag": "harness:victim-test", "id": original.id, "loaded": []}
    yield state
    for ref in [state["tag"], "harness:brand-new-name", *state["loaded"]]:
        try:
            docker_client.images.remove(ref, force=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


def test_an_archive_naming_an_existing_tag_loads_without_moving_it(engine, docker_client, victim, tmp_path: Path) -> None:
    """The issue: a snapshot whose image member lists RepoTags took over any tag. Loaded now by id, untagged."""
    image_tar, forged_id = _forged_save([victim["tag"], "harness:brand-new-name"])
    victim["loaded"].append(forged_id)
    archive = _image_archive(tmp_path / "forged.harness.tar", image_tar, forged_id)
    with snap.Archive(archive) as a:
        v = snap.verify(a)
        result = snap.load_image(engine, v, v.manifest)
    assert result["loaded"] is True and image_present(docker_client, forged_id)  # it is there, by id
    assert docker_client.images.get(victim["tag"]).id == victim["id"]  # the existing tag did not move
    assert docker_client.images.get(forged_id).tags == []  # and the image got no name at all:
    assert not image_present(docker_client, "harness:brand-new-name")  # not a new one either


def test_an_archive_of_another_image_is_refused_before_the_engine_loads_it(engine, docker_client, victim,
                                                                            tmp_path: Path) -> None:
    image_tar, forged_id = _forged_save([victim["tag"]])
    victim["loaded"].append(forged_id)
    claimed = "sha256:" + "e" * 64
    archive = _image_archive(tmp_path / "other.harness.tar", image_tar, claimed)
    with snap.Archive(archive) as a:
        v = snap.verify(a)
        with pytest.raises(InputError) as err:
            snap.load_image(engine, v, v.manifest)
    assert f"member {snap.IMAGE} holds image {forged_id}, not the expected {claimed}" in str(err.value)
    assert not image_present(docker_client, forged_id)  # stopped mid-stream: nothing was loaded
    assert docker_client.images.get(victim["tag"]).id == victim["id"]
