"""Hostile snapshots, without Docker: names that leave the extraction directory, crafted tar
members, manifests of the wrong shape, and OpenSSH signatures over the manifest.

Every refusal must be one ``InputError`` line (exit 2), never an internal error, and nothing
may be written outside the rerun's temp directory nor any container started.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import signing
from harness import snapshot as snap
from harness.cli import main
from harness.errors import InputError

from tests.fake_engine import FakeEngine, Outcome
from tests.unit.backends.test_docker_fake_engine import PACKAGES, make_archive, patched  # noqa: F401 - patched is a fixture

# ----------------------------------------------------------------------------- helpers


def manifest_of(path: Path) -> dict:
    with tarfile.open(path, "r:") as tf:  # the first member only: later headers may be hostile
        return json.loads(tf.extractfile(tf.next()).read())


def write_slot(path: Path, text: bytes) -> None:
    """Put ``text`` into the manifest's slot (space-padded), leaving every other byte alone."""
    with tarfile.open(path, "r:") as tf:
        info = tf.next()
        off, size = info.offset_data, info.size
    assert len(text) <= size
    raw = bytearray(path.read_bytes())
    raw[off:off + size] = text + b" " * (size - len(text))
    path.write_bytes(bytes(raw))


def reseal(path: Path, edit) -> None:
    """What a forger does: edit the manifest and recompute its own digest."""
    m = manifest_of(path)
    edit(m)
    m["manifest_sha256"] = snap.manifest_digest(m)
    write_slot(path, json.dumps(m).encode())


def error_line(err: str) -> str:
    assert "Traceback" not in err and "internal error" not in err, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("harness: error:")]
    return line


def minimal_archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes]] | None = None,
                    manifest: dict | None = None) -> Path:
    """A small valid snapshot; ``members`` are raw tar members appended after the record."""
    with snap.SnapshotWriter(path) as w:
        w.add_bytes(snap.RECORD, b"{}")
        w.finish(manifest or base_manifest())
    if members:
        raw = bytearray(path.read_bytes()[:-1024])  # drop the end-of-archive marker
        extra = io.BytesIO()
        with tarfile.open(fileobj=extra, mode="w", format=tarfile.GNU_FORMAT) as tf:
            for info, data in members:
                tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
        raw += extra.getvalue()
        path.write_bytes(bytes(raw))
    return path


def base_manifest() -> dict:
    return {"cell": "c", "image": {"id": "sha256:" + "0" * 64, "tag": "t"}, "bundle": {"name": "optuna_best"},
            "data": {"file": "signals.npz", "sha256": "0" * 64, "included": False}}


def tar_with(*entries: tarfile.TarInfo, data: bytes = b"x") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info in entries:
            if info.isreg():
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return out.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


# ----------------------------------------------------------------------------- 1. names from the archive


@pytest.mark.parametrize("bad", ["../../../../escaped", "ABS", "a/b", "..", ".", "", "x\x00y"])
def test_rerun_refuses_a_data_file_name_that_is_not_plain(patched: FakeEngine, tmp_path: Path, capsys, bad: str) -> None:
    archive, _, image_id = make_archive(tmp_path, patched, packages=PACKAGES)
    absolute = tmp_path / "abs-escape"
    # rerun's data dir is /tmp/harness-rerun-*/data: four levels up is /escaped
    reseal(archive, lambda m: m["data"].update(file=str(absolute) if bad == "ABS" else bad))
    patched.remove_image(image_id, force=True)
    rc = main(["rerun", str(archive), "--out", str(tmp_path / "o"), "--no-progress"])
    line = error_line(capsys.readouterr().err)
    assert rc == 2
    assert "manifest.json" in line and "data.file" in line
    assert patched.runs == [] and not any(c[0] == "load" for c in patched.calls)
    assert not absolute.exists() and not Path("/escaped").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad", ["../../etc", "ABS", "a/b", "..", ""])
def test_rerun_refuses_a_bundle_name_that_is_not_plain(patched: FakeEngine, tmp_path: Path, capsys, bad: str) -> None:
    host_dir = tmp_path / "host-bundle"
    host_dir.mkdir()
    (host_dir / "target_scaler.joblib").write_bytes(b"pickle!")
    archive, _, _ = make_archive(tmp_path, patched, packages=PACKAGES)
    reseal(archive, lambda m: m["bundle"].update(name=str(host_dir) if bad == "ABS" else bad))
    rc = main(["rerun", str(archive), "--out", str(tmp_path / "o"), "--no-progress"])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "manifest.json" in line and "bundle.name" in line
    assert patched.runs == []


@pytest.mark.parametrize("bad", ["../x", "Upper", "-lead", "a/b", "x" * 102, 7])
def test_a_cell_name_must_be_a_matrix_cell_name(tmp_path: Path, bad) -> None:
    path = minimal_archive(tmp_path / "s.tar")
    reseal(path, lambda m: m.update(cell=bad))
    with pytest.raises(InputError, match=r"manifest.json: key cell "):
        snap.verify(path)


def test_the_cell_pattern_is_the_matrix_one() -> None:
    from harness.images import matrix

    assert snap.CELL_NAME.pattern == matrix._NAME_RE.pattern


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../../b", "x\x00", "", snap.MANIFEST])
def test_member_names_in_the_manifest_must_stay_inside(tmp_path: Path, name: str) -> None:
    path = minimal_archive(tmp_path / "s.tar")
    reseal(path, lambda m: m["members"][0].update(name=name))
    with pytest.raises(InputError, match="manifest.json: key members"):
        snap.verify(path)


HOSTILE_ENTRIES = {
    "dotdot": entry("optuna_best/../../escaped"),
    "absolute": entry("/tmp/harness-abs-entry-test"),
    "symlink-out": entry("optuna_best/link", tarfile.SYMTYPE, "/etc"),
    "symlink-up": entry("optuna_best/link", tarfile.SYMTYPE, "../../../../etc/passwd"),
    "hardlink-out": entry("optuna_best/hard", tarfile.LNKTYPE, "/etc/passwd"),
    "device": entry("optuna_best/dev", tarfile.CHRTYPE),
    "fifo": entry("optuna_best/fifo", tarfile.FIFOTYPE),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_ENTRIES))
def test_extract_tree_refuses_entries_that_leave_the_directory(tmp_path: Path, kind: str) -> None:
    bad = HOSTILE_ENTRIES[kind]
    path = tmp_path / "s.tar"
    with snap.SnapshotWriter(path) as w:
        w.add_bytes(snap.BUNDLE, tar_with(entry("optuna_best", tarfile.DIRTYPE), entry("optuna_best/config.yaml"), bad))
        w.finish(base_manifest())
    snap.verify(path)
    dest = tmp_path / "x" / "dest"
    with pytest.raises(InputError) as err:
        snap.extract_tree(path, snap.BUNDLE, dest)
    msg = str(err.value)
    assert f"member {snap.BUNDLE}" in msg and bad.name in msg
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/harness-abs-entry-test").exists()


def test_rerun_refuses_a_bundle_with_an_escaping_entry(patched: FakeEngine, tmp_path: Path, capsys) -> None:
    bundle = tmp_path / "bundle" / "optuna_best"
    bundle.mkdir(parents=True)
    (bundle / "config.yaml").write_text("training: {seed: 1}\n")
    (bundle / "link").symlink_to("/etc")
    archive, _, _ = make_archive(tmp_path, patched, packages=PACKAGES, bundle=bundle)
    rc = main(["rerun", str(archive), "--out", str(tmp_path / "o"), "--no-progress"])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and f"member {snap.BUNDLE}" in line and "optuna_best/link" in line
    assert patched.runs == []


def test_rebuild_refuses_sources_with_an_escaping_entry(patched: FakeEngine, tmp_path: Path, capsys) -> None:
    archive, wh, _ = make_archive(tmp_path, patched, packages=PACKAGES)
    # swap the sources member for one with ../ in it, and re-seal the manifest around it
    hostile = tar_with(entry("harness/__init__.py"), entry("harness/../../../escaped.py"))
    rebuilt = tmp_path / "hostile.tar"
    m = snap.verify(archive).manifest
    with snap.SnapshotWriter(rebuilt) as w:
        for e in m["members"]:
            data = hostile if e["name"] == snap.SOURCES else snap.read_member(archive, e["name"])
            w.add_bytes(e["name"], data)
        w.finish({k: v for k, v in m.items() if k not in ("members", "manifest_sha256", "schema")})
    patched.build_packages = dict(PACKAGES)
    rc = main(["snapshot", "rebuild", str(rebuilt), "--wheelhouse", str(wh)])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and f"member {snap.SOURCES}" in line and "escaped.py" in line
    assert patched.builds == []


# ----------------------------------------------------------------------------- 3. crafted members and manifests


def _cli_refuses(path: Path, capsys) -> str:
    rc = main(["snapshot", "verify", str(path)])
    line = error_line(capsys.readouterr().err)
    assert rc == 2, line
    return line


def test_a_header_claiming_a_huge_size(tmp_path: Path, capsys) -> None:
    path = minimal_archive(tmp_path / "s.tar")
    with tarfile.open(path, "r:") as tf:
        info = tf.getmember(snap.RECORD)
    raw = bytearray(path.read_bytes())
    raw[info.offset:info.offset + 512] = snap.container._header(snap.RECORD, 1 << 40, 0)
    path.write_bytes(bytes(raw))
    assert snap.RECORD in _cli_refuses(path, capsys)
    # and re-sealed so the manifest agrees with the header
    reseal(path, lambda m: m["members"][0].update(size=1 << 40))
    assert snap.RECORD in _cli_refuses(path, capsys)


def test_a_manifest_header_claiming_a_huge_size(tmp_path: Path, capsys) -> None:
    path = minimal_archive(tmp_path / "s.tar")
    raw = bytearray(path.read_bytes())
    raw[0:512] = snap.container._header(snap.MANIFEST, 1 << 40, 0)
    path.write_bytes(bytes(raw))
    assert snap.MANIFEST in _cli_refuses(path, capsys)


def test_a_truncated_gzip_member_resealed(tmp_path: Path, capsys) -> None:
    path = tmp_path / "s.tar"
    with snap.SnapshotWriter(path) as w:
        w.add_bytes(snap.RECORD, os.urandom(4000))
        w.finish(base_manifest())
    m = manifest_of(path)
    with tarfile.open(path, "r:") as tf:
        stored = tf.extractfile(snap.RECORD).read()
    short = stored[: len(stored) // 2]
    bad = tmp_path / "bad.tar"
    # built by hand: the manifest lists the cut gzip stream with its true size and digest
    body = dict(base_manifest(), schema=snap.SCHEMA, members=[dict(m["members"][0], size=len(short),
                                                                    sha256=hashlib.sha256(short).hexdigest())])
    body["manifest_sha256"] = snap.manifest_digest(body)
    text = json.dumps(body).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in ((snap.MANIFEST, text.ljust(snap.MANIFEST_SLOT)), (snap.RECORD, short)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    bad.write_bytes(out.getvalue())
    assert f"member {snap.RECORD} cannot be decompressed" in _cli_refuses(bad, capsys)


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "device", "dir", "dotdot"])
def test_outer_members_that_are_not_plain_files(tmp_path: Path, capsys, kind: str) -> None:
    name = {"dotdot": "../x"}.get(kind, "odd")
    info = tarfile.TarInfo(name)
    info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "device": tarfile.CHRTYPE,
                 "dir": tarfile.DIRTYPE, "dotdot": tarfile.REGTYPE}[kind]
    info.linkname = snap.RECORD if kind in ("symlink", "hardlink") else ""
    path = minimal_archive(tmp_path / "s.tar", members=[(info, b"")])
    assert name in _cli_refuses(path, capsys)
    if kind != "dotdot":  # listed in the manifest as an empty member: still not a file
        reseal(path, lambda m: m["members"].append({"name": name, "size": 0, "sha256": hashlib.sha256(b"").hexdigest()}))
        assert name in _cli_refuses(path, capsys)


@pytest.mark.parametrize("text", [
    b"not json", b"[1, 2]", b"\xff\xfe", b"[" * 30000 + b"]" * 30000, b'"just a string"', b"{}",
])
def test_a_manifest_that_is_not_a_manifest(tmp_path: Path, capsys, text: bytes) -> None:
    path = minimal_archive(tmp_path / "s.tar")
    write_slot(path, text)
    assert snap.MANIFEST in _cli_refuses(path, capsys)


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("members"),
    lambda m: m.update(members={"a": 1}),
    lambda m: m.update(members=[1]),
    lambda m: m["members"][0].update(size="12"),
    lambda m: m["members"][0].update(size=-1),
    lambda m: m["members"][0].update(size=True),
    lambda m: m["members"][0].update(sha256=5),
    lambda m: m["members"][0].pop("sha256"),
    lambda m: m["members"][0].update(raw_size=None),
    lambda m: m["members"].append(dict(m["members"][0])),  # listed twice
    lambda m: m.pop("image"),
    lambda m: m.update(image="sha256:0"),
    lambda m: m["image"].pop("id"),
    lambda m: m["image"].update(id=["x"]),
    lambda m: m.pop("cell"),
    lambda m: m.pop("data"),
    lambda m: m["data"].update(included="yes"),
    lambda m: m["data"].update(sha256=None),
    lambda m: m.update(bundle=[]),
    lambda m: m.update(cell_spec="cpu"),
], ids=lambda f: "")
def test_a_manifest_of_the_wrong_shape(tmp_path: Path, capsys, edit) -> None:
    path = minimal_archive(tmp_path / "s.tar")
    reseal(path, edit)
    assert "manifest.json" in _cli_refuses(path, capsys)


def test_rebuild_with_a_cell_spec_of_the_wrong_keys(patched: FakeEngine, tmp_path: Path, capsys) -> None:
    archive, wh, _ = make_archive(tmp_path, patched, packages=PACKAGES)
    reseal(archive, lambda m: m["cell_spec"].update(bogus=1))
    rc = main(["snapshot", "rebuild", str(archive), "--wheelhouse", str(wh)])
    assert rc == 2 and "cell_spec" in error_line(capsys.readouterr().err)


def test_rerun_with_a_record_that_is_not_json(patched: FakeEngine, tmp_path: Path, capsys) -> None:
    archive, _, _ = make_archive(tmp_path, patched, packages=PACKAGES)
    m = snap.verify(archive).manifest
    bad = tmp_path / "bad.tar"
    with snap.SnapshotWriter(bad) as w:
        for e in m["members"]:
            w.add_bytes(e["name"], b"{not json" if e["name"] == snap.RECORD else snap.read_member(archive, e["name"]))
        w.finish({k: v for k, v in m.items() if k not in ("members", "manifest_sha256", "schema")})
    rc = main(["rerun", str(bad), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and snap.RECORD in error_line(capsys.readouterr().err)
    assert patched.runs == []


# hypothesis: whatever the bytes, the reader answers with success or one InputError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
KEYS = ["schema", "members", "cell", "image", "bundle", "data", "cell_spec", "host", "record", "build", "name",
        "size", "sha256", "raw_size", "raw_sha256", "id", "tag", "file", "included", "path", "created"]
manifests = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.sampled_from(KEYS + [snap.SCHEMA, "c"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8),
                                                                     children, max_size=6),
    max_leaves=30,
)


def _valid_manifest() -> dict:
    body = dict(base_manifest(), schema=snap.SCHEMA, cell_spec={"name": "c"}, host={},
                members=[{"name": snap.RECORD, "size": 10, "sha256": "a" * 64, "raw_size": 2, "raw_sha256": "b" * 64,
                          "compression": "gzip"}])
    body["manifest_sha256"] = snap.manifest_digest(body)
    return body


@settings(max_examples=200, deadline=None)
@given(value=manifests, sealed=st.booleans())
def test_parse_manifest_on_arbitrary_json(value, sealed: bool) -> None:
    if isinstance(value, dict) and sealed:
        value = dict(value, schema=snap.SCHEMA)
        value["manifest_sha256"] = snap.manifest_digest(value)
    try:
        snap.parse_manifest(json.dumps(value).encode(), "m")
    except InputError:
        pass


@settings(max_examples=200, deadline=None)
@given(path=st.lists(st.sampled_from(["members", 0, "image", "data", "bundle", "cell", "name", "size", "sha256",
                                      "id", "file", "included", "raw_size", "cell_spec", "tag"]), min_size=1, max_size=3),
       value=json_values)
def test_parse_manifest_on_a_valid_manifest_with_one_value_replaced(path, value) -> None:
    m = _valid_manifest()
    node = m
    for key in path[:-1]:
        if isinstance(node, dict) and isinstance(key, str) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
    last = path[-1]
    if isinstance(node, dict) and isinstance(last, str):
        node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value
    m["manifest_sha256"] = snap.manifest_digest(m)
    try:
        snap.parse_manifest(json.dumps(m).encode(), "m")
    except InputError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096))
def test_verify_on_arbitrary_bytes(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "fuzz.tar"
    p.write_bytes(data)
    try:
        snap.verify(p)
    except InputError:
        pass


_PRISTINE: dict[str, bytes] = {}


def _pristine(tmp: Path) -> bytes:
    if "a" not in _PRISTINE:
        _PRISTINE["a"] = minimal_archive(tmp / "pristine.tar").read_bytes()
    return _PRISTINE["a"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 70_000), st.binary(min_size=1, max_size=16)), max_size=4),
       cut=st.none() | st.integers(0, 70_000))
def test_verify_on_a_damaged_real_archive(tmp_path: Path, edits, cut) -> None:
    raw = bytearray(_pristine(tmp_path))
    for off, data in edits:
        off = min(off, len(raw) - len(data))
        raw[off:off + len(data)] = data
    if cut is not None:
        raw = raw[:cut]
    p = tmp_path / "fuzz.tar"
    p.write_bytes(bytes(raw))
    try:
        snap.verify(p)
    except InputError:
        pass


# ----------------------------------------------------------------------------- 2. signatures


needs_ssh_keygen = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen (openssh-client) absent")


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for who in ("alice", "mallory"):
        key = tmp_path / "keys" / who
        key.parent.mkdir(exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{who}@example", "-f", str(key)], check=True)
        out[who] = key
    allowed = tmp_path / "keys" / "allowed_signers"
    allowed.write_text(f"alice@example {(tmp_path / 'keys' / 'alice.pub').read_text()}")
    out["allowed"] = allowed
    return out


def signed_archive(path: Path, key: Path) -> Path:
    with snap.SnapshotWriter(path) as w:
        w.add_bytes(snap.RECORD, b"{}")
        w.finish(base_manifest(), sign=lambda message: signing.sign(message, key))
    return path


def test_command_builders_are_plain_argv() -> None:
    assert signing.sign_command("k") == ["ssh-keygen", "-Y", "sign", "-f", "k", "-n", "harness-snapshot"]
    assert signing.find_principals_command("a", "s") == ["ssh-keygen", "-Y", "find-principals", "-f", "a", "-s", "s"]
    assert signing.verify_command("a", "alice", "s") == ["ssh-keygen", "-Y", "verify", "-f", "a", "-I", "alice",
                                                          "-n", "harness-snapshot", "-s", "s"]


@needs_ssh_keygen
def test_a_signed_snapshot_verifies_and_names_its_signer(tmp_path: Path, keys, capsys) -> None:
    path = signed_archive(tmp_path / "s.tar", keys["alice"])
    v = snap.verify(path)
    assert v.signature is not None and v.signature.startswith(b"-----BEGIN SSH SIGNATURE-----")
    with tarfile.open(path, "r:") as tf:  # after the members, plain text
        assert tf.getnames() == [snap.MANIFEST, snap.RECORD, snap.SIGNATURE]
    assert main(["snapshot", "verify", str(path), "--allowed-signers", str(keys["allowed"])]) == 0
    out = capsys.readouterr().out
    assert "signature: good, signed by alice@example" in out
    assert main(["snapshot", "verify", str(path), "--allowed-signers", str(keys["allowed"]),
                 "--identity", "alice@example"]) == 0
    capsys.readouterr()
    assert main(["snapshot", "verify", str(path)]) == 0
    assert "signature: present, not checked (pass --allowed-signers FILE)" in capsys.readouterr().out


@needs_ssh_keygen
def test_a_forged_record_resealed_into_a_signed_snapshot_is_refused(tmp_path: Path, keys, capsys) -> None:
    path = signed_archive(tmp_path / "s.tar", keys["alice"])
    reseal(path, lambda m: m.update(cell="forged"))
    assert snap.verify(path).manifest["cell"] == "forged"  # self-consistent, as the issue says
    rc = main(["snapshot", "verify", str(path), "--allowed-signers", str(keys["allowed"])])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and snap.SIGNATURE in line and "does not verify" in line


@needs_ssh_keygen
def test_a_signature_by_another_key_or_identity_is_refused(tmp_path: Path, keys, capsys) -> None:
    path = signed_archive(tmp_path / "s.tar", keys["mallory"])
    rc = main(["snapshot", "verify", str(path), "--allowed-signers", str(keys["allowed"])])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "no principal in" in line and "SHA256:" in line
    good = signed_archive(tmp_path / "g.tar", keys["alice"])
    rc = main(["snapshot", "verify", str(good), "--allowed-signers", str(keys["allowed"]), "--identity", "bob@example"])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "bob@example" in line


@needs_ssh_keygen
def test_an_unsigned_snapshot_with_allowed_signers_is_refused(tmp_path: Path, keys, capsys) -> None:
    path = minimal_archive(tmp_path / "s.tar")
    assert main(["snapshot", "verify", str(path)]) == 0
    assert "signature: unsigned" in capsys.readouterr().out
    rc = main(["snapshot", "verify", str(path), "--allowed-signers", str(keys["allowed"])])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "is not signed" in line


@needs_ssh_keygen
def test_a_signature_member_that_is_damaged_or_misplaced(tmp_path: Path, keys, capsys) -> None:
    path = signed_archive(tmp_path / "s.tar", keys["alice"])
    with tarfile.open(path, "r:") as tf:
        info = tf.getmember(snap.SIGNATURE)
    raw = bytearray(path.read_bytes())
    raw[info.offset_data + 60] ^= 0x01  # inside the base64 body
    path.write_bytes(bytes(raw))
    rc = main(["snapshot", "verify", str(path), "--allowed-signers", str(keys["allowed"])])
    assert rc == 2 and snap.SIGNATURE in error_line(capsys.readouterr().err)
    # a signature member followed by another member
    path2 = signed_archive(tmp_path / "s2.tar", keys["alice"])
    raw = bytearray(path2.read_bytes()[:-1024])
    raw += snap.container._header("extra", 0, 0) + b"\0" * 1024
    path2.write_bytes(bytes(raw))
    assert "extra" in _cli_refuses(path2, capsys)


def test_missing_ssh_keygen_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(signing, "SSH_KEYGEN", "ssh-keygen-not-installed-here")
    path = minimal_archive(tmp_path / "s.tar")
    allowed = tmp_path / "allowed"
    allowed.write_text("")
    path2 = tmp_path / "s2.tar"
    (tmp_path / "k").write_text("a key")
    with pytest.raises(InputError, match="ssh-keygen-not-installed-here: not found.*openssh-client"):
        signed_archive(path2, tmp_path / "k")
    assert not path2.exists() and not list(tmp_path.glob(".s2.tar.*"))
    sig_path = tmp_path / "sig.tar"
    with snap.SnapshotWriter(sig_path) as w:
        w.add_bytes(snap.RECORD, b"{}")
        w.finish(base_manifest(), sign=lambda message: b"-----BEGIN SSH SIGNATURE-----\nAAAA\n-----END SSH SIGNATURE-----\n")
    rc = main(["snapshot", "verify", str(sig_path), "--allowed-signers", str(allowed)])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "openssh-client" in line


def test_signing_flags_are_checked(tmp_path: Path, capsys) -> None:
    path = minimal_archive(tmp_path / "s.tar")
    assert main(["snapshot", "verify", str(path), "--identity", "alice"]) == 2
    assert "--identity needs --allowed-signers" in error_line(capsys.readouterr().err)
    assert main(["snapshot", "verify", str(path), "--allowed-signers", str(tmp_path / "nope")]) == 2
    assert "nope: not found" in error_line(capsys.readouterr().err)
    assert main(["snapshot", "verify", str(path), "--sign", str(tmp_path / "k")]) == 2
    assert "--sign" in error_line(capsys.readouterr().err)


@needs_ssh_keygen
def test_rerun_checks_the_signature_before_anything_runs(patched: FakeEngine, tmp_path: Path, keys, capsys) -> None:
    archive, _, image_id = make_archive(tmp_path, patched, packages=PACKAGES)
    patched.remove_image(image_id, force=True)
    rc = main(["rerun", str(archive), "--allowed-signers", str(keys["allowed"]), "--out", str(tmp_path / "o"),
               "--no-progress"])
    assert rc == 2 and "is not signed" in error_line(capsys.readouterr().err)
    assert patched.runs == [] and not any(c[0] == "load" for c in patched.calls)


# ----------------------------------------------------------------------------- 4. what was verified is what is used


@needs_ssh_keygen
def test_rerun_runs_the_verified_archive_not_one_swapped_in_after_the_check(patched: FakeEngine, make_bundle, keys,
                                                                            tmp_path: Path, monkeypatch, capsys) -> None:
    """The issue: verify, then read the bundle again from the path. An archive swapped in between
    (unsigned, another bundle) ran after `signature: good`. The rerun reads only the file it checked."""
    from harness import record as records

    from tests.records import record as compare_record
    from tests.records import with_env

    archived = with_env(compare_record("cpu-torch2.13"), "2.13.0+cpu", None)
    archived.spec = {"device": "cpu", "determinism": "strict", "schema": "harness.runspec/3", "cell": "cpu-torch2.13"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    made, _, _ = make_archive(tmp_path / "a", patched, packages=PACKAGES, record=archived,
                              bundle=make_bundle("signed", training__epochs=2))
    signed = tmp_path / "signed.harness.tar"  # the same members, signed by alice
    m = snap.verify(made).manifest
    with snap.SnapshotWriter(signed) as w:
        for e in m["members"]:
            w.add_bytes(e["name"], snap.read_member(made, e["name"]))
        w.finish({k: v for k, v in m.items() if k not in ("members", "manifest_sha256", "schema")},
                 sign=lambda message: signing.sign(message, keys["alice"]))
    swapped, _, _ = make_archive(tmp_path / "b", patched, packages=PACKAGES, record=archived,
                                 bundle=make_bundle("swapped", training__epochs=9))
    real_verify = snap.verify

    def verify_then_swap(source):  # the file at the path is replaced right after the check
        v = real_verify(source)
        os.replace(swapped, signed)
        return v

    monkeypatch.setattr(snap.container, "verify", verify_then_swap)  # where the workflows look it up
    seen: list[str] = []

    def worker(out: Path, req) -> None:  # notes the bundle it was given; reproduces the archived run
        bundle = next(Path(src) for src, target, _ in req.mounts if target == "/harness/bundle")
        seen.append((bundle / "config.yaml").read_text())
        spec = json.loads((out / "spec.json").read_text())
        records.write(out / "record.json", dataclasses.replace(archived, cell=spec["cell"]))

    patched.outcomes.append(Outcome(0, worker=worker))
    rc = main(["rerun", str(signed), "--allowed-signers", str(keys["allowed"]), "--out", str(tmp_path / "o"),
               "--no-progress"])
    captured = capsys.readouterr()
    assert "signature: good, signed by alice@example" in captured.err
    assert not swapped.exists()  # the swap happened
    if rc == 2:  # refusing is allowed; running the swapped bundle is not
        assert patched.runs == [] and "verified" in error_line(captured.err)
    else:
        assert rc == 0, captured.out + captured.err
        (config,) = seen
        assert "epochs: 2" in config and "epochs: 9" not in config  # the signed bundle trained, not the swapped one


def test_a_member_changed_in_place_after_the_check_is_refused_not_read(tmp_path: Path) -> None:
    path = minimal_archive(tmp_path / "s.tar")
    other = tmp_path / "other.tar"
    with snap.SnapshotWriter(other) as w:
        w.add_bytes(snap.RECORD, b'{"swapped": true}')
        w.finish(base_manifest())
    with snap.Archive(path) as archive:
        v = snap.verify(archive)
        os.replace(other, path)  # another file at the path: the open one is still read
        assert snap.read_member(v, snap.RECORD) == b"{}"
    path = minimal_archive(tmp_path / "t.tar")
    with tarfile.open(path, "r:") as tf:
        info = tf.getmember(snap.RECORD)
    with snap.Archive(path) as archive:
        v = snap.verify(archive)
        with open(path, "r+b") as f:  # the same file, written in place after the check
            f.seek(info.offset_data + info.size - 9)
            b = f.read(1)
            f.seek(info.offset_data + info.size - 9)
            f.write(bytes([b[0] ^ 0x01]))
        with pytest.raises(InputError, match=f"member {snap.RECORD} differs from the verified manifest"):
            snap.read_member(v, snap.RECORD)
