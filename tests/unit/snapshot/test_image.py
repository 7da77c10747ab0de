"""The image member of a snapshot, as the engine is handed it: a ``docker save`` tar rewritten as it
streams (harness.docker_engine.untagged), without Docker.

An archive is hostile input: the names its ``manifest.json`` lists (``RepoTags``), its legacy
``repositories`` map and OCI name annotations would point any tag of the engine at its image, so
they never reach the engine; the image it holds must be the one the snapshot's manifest names,
checked before the end of the stream so that the engine loads nothing else.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

from harness import snapshot as snap
from harness.docker_engine import ImageStreamRefused, SavedImage, untagged
from harness.errors import InputError

from tests.fake_engine import FakeEngine

CONFIG = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
IMAGE_ID = "sha256:" + hashlib.sha256(CONFIG).hexdigest()
LAYER = bytes(range(256)) * 3000  # 768 KB: more than one chunk of the stream below


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644,
           mtime: int = 1_700_000_000) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = mode
    info.mtime = mtime
    info.uname = info.gname = "root"
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def saved(*members: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def docker_save(repo_tags: list[str], *, config: bytes = CONFIG, extra: tuple = ()) -> bytes:
    """What ``docker save`` (classic store) writes for a one-layer image: layer, config, manifest, repositories."""
    hexid = hashlib.sha256(config).hexdigest()
    layer = "1" * 64
    manifest = [{"Config": f"{hexid}.json", "RepoTags": repo_tags, "Layers": [f"{layer}/layer.tar"]}]
    repos = {t.split(":")[0]: {t.split(":")[1]: layer} for t in repo_tags}
    return saved(member(f"{layer}/", kind=tarfile.DIRTYPE, mode=0o755),
                 member(f"{layer}/VERSION", b"1.0"),
                 member(f"{layer}/json", b'{"id": "' + layer.encode() + b'"}'),
                 member(f"{layer}/layer.tar", LAYER),
                 member(f"{hexid}.json", config),
                 *extra,
                 member("manifest.json", json.dumps(manifest).encode(), mtime=0),
                 member("repositories", json.dumps(repos).encode(), mtime=0))


def chunked(data: bytes, size: int = 100_000) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def rewritten(data: bytes, image_id: str | None = IMAGE_ID) -> bytes:
    return b"".join(untagged(chunked(data), image_id))


def members_of(data: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for info in tf.getmembers():
            f = tf.extractfile(info) if info.isreg() else None
            out[info.name] = (info, f.read() if f else b"")
    return out


def test_the_names_are_dropped_and_every_other_member_is_unchanged() -> None:
    original = docker_save(["harness:cpu-torch2.13", "local/debian-py:bookworm"])
    out = rewritten(original)
    before, after = members_of(original), members_of(out)
    assert "repositories" in before and "repositories" not in after
    (entry,) = json.loads(after["manifest.json"][1])
    assert entry["RepoTags"] == []
    assert entry["Config"] == json.loads(before["manifest.json"][1])[0]["Config"]
    assert entry["Layers"] == json.loads(before["manifest.json"][1])[0]["Layers"]
    assert list(after) == [n for n in before if n != "repositories"]  # same order
    for name, (info, data) in before.items():
        if name in ("manifest.json", "repositories"):
            continue
        got, got_data = after[name]
        assert got_data == data, name  # byte for byte
        for attr in ("type", "mtime", "uid", "gid", "uname", "gname", "linkname", "size"):
            assert getattr(got, attr) == getattr(info, attr), (name, attr)
        assert got.mode & 0o7777 == info.mode & 0o7777, name
    assert out.endswith(b"\0" * 1024) and len(out) % 512 == 0


def test_oci_name_annotations_are_dropped() -> None:
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "2" * 64, "size": 1,
         "annotations": {"io.containerd.image.name": "docker.io/library/victim:latest",
                         "org.opencontainers.image.ref.name": "latest", "keep.me": "yes"}}]}
    out = members_of(rewritten(docker_save([], extra=(member("index.json", json.dumps(index).encode()),))))
    (m,) = json.loads(out["index.json"][1])["manifests"]
    assert m["annotations"] == {"keep.me": "yes"} and m["digest"] == "sha256:" + "2" * 64


def test_the_stream_is_passed_on_as_it_arrives() -> None:
    """Streaming: output comes out while most of the input is still unread, in pieces of at most 1 MiB."""
    data = docker_save(["a:b"])
    consumed = 0

    def source():
        nonlocal consumed
        for piece in chunked(data, 64 * 1024):
            consumed += len(piece)
            yield piece

    pieces = untagged(source(), IMAGE_ID)
    first = next(pieces)
    assert first and consumed < len(data) // 2
    rest = list(pieces)
    assert max(len(p) for p in [first, *rest]) <= 1 << 20 and consumed == len(data)


@pytest.mark.parametrize("case", ["other-id", "no-config", "config-is-a-link", "two-images", "no-manifest",
                                  "manifest-twice", "manifest-dotslash-twice", "manifest-is-a-link", "not-a-tar",
                                  "gzip", "below-a-link", "link-over-a-directory"])
def test_a_stream_that_is_not_one_untagged_image_of_that_id_is_refused(case: str) -> None:
    hexid = IMAGE_ID.split(":")[1]
    good = [{"Config": f"{hexid}.json", "RepoTags": ["victim:t"], "Layers": []}]
    other_config = CONFIG.replace(b"amd64", b"arm64")
    data = {
        "other-id": lambda: docker_save(["victim:t"], config=other_config),
        "no-config": lambda: saved(member("manifest.json", json.dumps(good).encode())),
        "config-is-a-link": lambda: saved(member("x.json", CONFIG),
                                          member(f"{hexid}.json", kind=tarfile.SYMTYPE, link="x.json"),
                                          member("manifest.json", json.dumps(good).encode())),
        "two-images": lambda: saved(member(f"{hexid}.json", CONFIG), member("manifest.json", json.dumps(good * 2).encode())),
        "no-manifest": lambda: saved(member(f"{hexid}.json", CONFIG), member("repositories", b'{"victim": {"t": "x"}}')),
        "manifest-twice": lambda: saved(member(f"{hexid}.json", CONFIG), member("manifest.json", json.dumps(good).encode()),
                                        member("manifest.json", json.dumps(good).encode())),
        "manifest-dotslash-twice": lambda: saved(member(f"{hexid}.json", CONFIG),
                                                 member("manifest.json", json.dumps(good).encode()),
                                                 member("./manifest.json", json.dumps(good).encode())),
        "manifest-is-a-link": lambda: saved(member(f"{hexid}.json", CONFIG), member("evil.json", json.dumps(good).encode()),
                                            member("manifest.json", kind=tarfile.SYMTYPE, link="evil.json")),
        "not-a-tar": lambda: b"this is not a tar archive at all" * 40,
        "gzip": lambda: __import__("gzip").compress(docker_save(["victim:t"])),  # the engine would unpack it
        "below-a-link": lambda: saved(member("d", kind=tarfile.SYMTYPE, link="/etc"), member("d/x.json", CONFIG),
                                      member("manifest.json", json.dumps([dict(good[0], Config="d/x.json")]).encode())),
        "link-over-a-directory": lambda: saved(member("blobs/sha256/" + hexid, CONFIG),
                                               member("blobs", kind=tarfile.SYMTYPE, link="elsewhere"),
                                               member("manifest.json", json.dumps(
                                                   [dict(good[0], Config="blobs/sha256/" + hexid)]).encode())),
    }[case]()
    sent: list[bytes] = []
    with pytest.raises(ImageStreamRefused) as err:
        for piece in untagged(chunked(data, 4096), IMAGE_ID):
            sent.append(piece)
    assert "\n" not in str(err.value)
    # refused before the end-of-archive blocks: the engine never sees a complete tar
    assert not b"".join(sent).endswith(b"\0" * 1024)
    if case == "other-id":
        assert f"holds image sha256:{hashlib.sha256(other_config).hexdigest()}, not the expected {IMAGE_ID}" in str(err.value)


def test_an_oci_layout_config_is_found_by_its_blob_path() -> None:
    hexid = IMAGE_ID.split(":")[1]
    data = saved(member("blobs/", kind=tarfile.DIRTYPE, mode=0o755), member("blobs/sha256/", kind=tarfile.DIRTYPE),
                 member(f"blobs/sha256/{hexid}", CONFIG),
                 member("manifest.json", json.dumps([{"Config": f"blobs/sha256/{hexid}", "RepoTags": ["x:y"],
                                                      "Layers": []}]).encode()), fmt=tarfile.PAX_FORMAT)
    (entry,) = json.loads(members_of(rewritten(data))["manifest.json"][1])
    assert entry["RepoTags"] == [] and entry["Config"] == f"blobs/sha256/{hexid}"


class _TarEngine(FakeEngine):
    """A FakeEngine whose load reads a real `docker save` tar, handed on as Engine.load hands it to Docker."""

    def load(self, chunks):
        self.calls.append(("load", None))
        b"".join(untagged(chunks, chunks.image_id if isinstance(chunks, SavedImage) else None))
        yield from ()


def test_load_image_refuses_an_archive_of_another_image_in_one_line(tmp_path) -> None:
    path = tmp_path / "s.harness.tar"
    with snap.SnapshotWriter(path) as w:
        w.add_bytes(snap.RECORD, b"{}")
        w.add_bytes(snap.IMAGE, docker_save(["harness:victim"], config=CONFIG.replace(b"amd64", b"arm64")))
        w.finish({"cell": "c", "image": {"id": IMAGE_ID, "tag": "t"}, "bundle": {"name": "optuna_best"},
                  "data": {"file": "d", "sha256": "0" * 64, "included": False}})
    engine = _TarEngine()
    with snap.Archive(path) as archive:
        v = snap.verify(archive)
        with pytest.raises(InputError) as err:
            snap.load_image(engine, v, v.manifest)
    line = str(err.value)
    assert line.startswith(f"{path}: member {snap.IMAGE} holds image sha256:") and f"not the expected {IMAGE_ID}" in line
    assert engine.store == {}
