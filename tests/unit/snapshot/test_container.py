"""The snapshot container format, without Docker: write, verify, and name what is damaged."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from harness import snapshot as snap
from harness.cli import main
from harness.snapshot import lock_entries
from harness.errors import InputError


BUNDLE_AND_DATA = {"bundle": {"name": "optuna_best"},
                   "data": {"file": "data.bin", "sha256": "0" * 64, "included": True}}


def write_archive(path: Path, tmp: Path, manifest_extra: dict | None = None) -> Path:
    tree = tmp / "tree" / "optuna_best"
    tree.mkdir(parents=True, exist_ok=True)
    (tree / "config.yaml").write_text("training: {seed: 1}\n")
    data = tmp / "data.bin"
    data.write_bytes(bytes(range(256)) * 400)
    with snap.SnapshotWriter(path) as w:
        w.add_bytes(snap.RECORD, b'{"cell": "c"}')
        w.add_tree(snap.BUNDLE, tree, "optuna_best")
        w.add_file(snap.DATA, data)
        w.add_chunks(snap.IMAGE, (bytes([i % 251]) * 70_000 for i in range(40)))
        w.finish({"cell": "c", "image": {"id": "sha256:" + "0" * 64, "tag": "t"}, **BUNDLE_AND_DATA,
                  **(manifest_extra or {})})
    return path


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    return write_archive(tmp_path / "s.harness.tar", tmp_path)


def member_offset(path: Path, name: str) -> tuple[int, int]:
    with tarfile.open(path, "r:") as tf:
        info = tf.getmember(name)
        return info.offset_data, info.size


def rewrite_manifest(raw: bytearray, path: Path, edit) -> None:
    """Edit the manifest in its slot (re-signed with its own digest) and write the archive back."""
    off, size = member_offset(path, snap.MANIFEST)
    manifest = json.loads(bytes(raw[off:off + size]))
    edit(manifest)
    manifest["manifest_sha256"] = snap.manifest_digest(manifest)
    text = json.dumps(manifest).encode()
    raw[off:off + size] = text + b" " * (size - len(text))
    path.write_bytes(bytes(raw))


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_round_trip(archive: Path, tmp_path: Path) -> None:
    v = snap.verify(archive)
    assert v.manifest["schema"] == snap.SCHEMA
    assert [m["name"] for m in v.members] == [snap.RECORD, snap.BUNDLE, snap.DATA, snap.IMAGE]
    assert snap.read_member(archive, snap.RECORD) == b'{"cell": "c"}'
    assert snap.read_member(archive, snap.DATA) == bytes(range(256)) * 400
    out = snap.extract_tree(archive, snap.BUNDLE, tmp_path / "x")
    assert (out / "optuna_best" / "config.yaml").read_text() == "training: {seed: 1}\n"
    # A plain tar whose members are plain gzip: readable by standard tools.
    with tarfile.open(archive, "r:") as tf:
        names = tf.getnames()
        assert names[0] == snap.MANIFEST
        assert gzip.decompress(tf.extractfile(snap.RECORD).read()) == b'{"cell": "c"}'


def test_manifest_lists_stored_and_raw_digests(archive: Path) -> None:
    v = snap.verify(archive)
    image = v.member(snap.IMAGE)
    assert image["raw_size"] == 40 * 70_000 and image["size"] < image["raw_size"]
    assert image["compression"] == "gzip"


@pytest.mark.parametrize("name", [snap.RECORD, snap.DATA, snap.IMAGE])
def test_flipped_byte_names_the_member(archive: Path, name: str) -> None:
    off, size = member_offset(archive, name)
    flip(archive, off + size // 2)
    with pytest.raises(InputError) as err:
        snap.verify(archive)
    assert f"member {name} differs from the manifest" in str(err.value)


def test_flipped_byte_in_the_manifest_names_the_manifest(archive: Path) -> None:
    off, _ = member_offset(archive, snap.MANIFEST)
    text = archive.read_bytes()[off:off + 4000]
    pos = text.index(b'"sha256": "') + len(b'"sha256": "') + 3  # inside a member's digest
    flip(archive, off + pos)
    with pytest.raises(InputError, match="manifest.json is damaged"):
        snap.verify(archive)


@pytest.mark.parametrize("name", [snap.DATA, snap.IMAGE])
def test_truncation_names_the_member(archive: Path, name: str) -> None:
    off, size = member_offset(archive, name)
    with open(archive, "r+b") as f:
        f.truncate(off + size // 3)
    with pytest.raises(InputError) as err:
        snap.verify(archive)
    assert f"member {name} is truncated" in str(err.value)


def test_truncation_between_members_names_the_missing_one(archive: Path) -> None:
    off, _ = member_offset(archive, snap.IMAGE)
    with open(archive, "r+b") as f:
        f.truncate(off - 512)  # just before the image's header
    with pytest.raises(InputError, match=f"member {snap.IMAGE} is missing"):
        snap.verify(archive)


def test_extra_member_is_refused(archive: Path) -> None:
    with open(archive, "r+b") as f:
        f.seek(-1024, 2)  # overwrite the end-of-archive marker with one more member
        f.write(snap.container._header("evil.sh", 4, 0) + b"echo".ljust(512, b"\0") + b"\0" * 1024)
    with pytest.raises(InputError, match="member evil.sh is not in the manifest"):
        snap.verify(archive)


def one_member_archive(path: Path) -> Path:
    with snap.SnapshotWriter(path) as w:
        w.add_bytes(snap.RECORD, b"{}")
        w.finish({"cell": "c", "image": {"id": "sha256:" + "0" * 64}, **BUNDLE_AND_DATA})
    return path


def test_undecompressable_member(tmp_path: Path) -> None:
    path = one_member_archive(tmp_path / "bad.tar")
    # Replace the stored gzip bytes with garbage and fix the manifest to match: only the
    # decompression can then tell.
    off, size = member_offset(path, snap.RECORD)
    raw = bytearray(path.read_bytes())
    raw[off:off + size] = b"\x1f\x8b" + b"\x00" * (size - 2)
    import hashlib

    digest = hashlib.sha256(bytes(raw[off:off + size])).hexdigest()
    rewrite_manifest(raw, path, lambda m: m["members"][0].update(sha256=digest))
    with pytest.raises(InputError, match=f"member {snap.RECORD} cannot be decompressed"):
        snap.verify(path)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = one_member_archive(tmp_path / "new.tar")
    rewrite_manifest(bytearray(path.read_bytes()), path, lambda m: m.update(schema="harness.snapshot/2"))
    with pytest.raises(InputError, match="has schema harness.snapshot/2, this harness reads harness.snapshot/1; upgrade"):
        snap.verify(path)


def test_non_archives_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all\n" * 100)
    with pytest.raises(InputError, match="is not a harness snapshot"):
        snap.verify(junk)
    other = tmp_path / "other.tar"
    with tarfile.open(other, "w") as tf:
        info = tarfile.TarInfo("hello.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(InputError, match="its first member is hello.txt"):
        snap.verify(other)
    with pytest.raises(InputError, match="not found"):
        snap.verify(tmp_path / "nope.tar")


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    def boom():
        yield b"x" * 100
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        with snap.SnapshotWriter(tmp_path / "s.tar") as w:
            w.add_chunks(snap.IMAGE, boom())
    assert list(tmp_path.iterdir()) == []


def test_cli_verify_exit_codes(archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["snapshot", "verify", str(archive)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and snap.IMAGE in out and "sha256:0000" in out
    off, size = member_offset(archive, snap.IMAGE)
    flip(archive, off + 10)
    assert main(["snapshot", "verify", str(archive)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"member {snap.IMAGE}" in err and "Traceback" not in err
    junk = tmp_path / "junk"
    junk.write_text("hello")
    assert main(["rerun", str(junk)]) == 2
    assert "is not a harness snapshot" in capsys.readouterr().err
    assert main(["snapshot", "verify"]) == 2  # no file
    assert "needs the snapshot FILE" in capsys.readouterr().err


def test_pure_helpers() -> None:
    assert snap.host_differences({"hostname": "a", "cpu": "X", "gpus": []}, {"hostname": "b", "cpu": "X", "gpus": []}) == ["hostname a → b"]
    assert snap.host_differences({"gpus": ["H100"], "driver": "550"}, {"gpus": [], "driver": None}) == ["GPU H100 → none", "driver 550 → none"]
    assert snap.package_differences({"torch": "2.13.0", "numpy": "2.4"}, {"torch": "2.13.1", "six": "1"}) == [
        "numpy 2.4 missing from the rebuilt image", "six 1 only in the rebuilt image", "torch 2.13.0 → 2.13.1"]
    assert snap.disk_shortfall(None, 10) == 0
    assert snap.disk_shortfall(100, 50) == 0
    assert snap.disk_shortfall(100, 100) == 10
    h = "a" * 64
    assert lock_entries(f"# c\ntorch==2.13.0+cpu --hash=sha256:{h}\n") == [("torch", "2.13.0+cpu", {h})]


def test_without_bytecode_keeps_only_sources():
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as tf:
        for name, data in (("harness/a.py", b"x = 1\n"), ("harness/__pycache__/a.cpython-311.pyc", b"\x00pyc")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    files = snap.tar_bytes_files(snap.without_bytecode(buf.getvalue()))
    assert files == {"harness/a.py": b"x = 1\n"}
