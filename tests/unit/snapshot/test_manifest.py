"""The snapshot manifest: every shape an earlier harness wrote still loads, the current one round-trips,
and a manifest of another schema version is refused in one line naming the file."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from harness import snapshot as snap
from harness.cli import main
from harness.errors import InputError
from harness.snapshot import (BuildEntry, BundleEntry, DataDir, DataEntry, ImageEntry, Manifest, RecordEntry,
                              manifest_digest)

IMAGE_ID = "sha256:" + "1" * 64
SHA = "2" * 64
MEMBERS = [{"name": "record.json.gz", "size": 700, "sha256": "3" * 64, "raw_size": 2100, "raw_sha256": "4" * 64,
            "compression": "gzip"},
           {"name": "data.gz", "size": 90, "sha256": "5" * 64, "raw_size": 300, "raw_sha256": "6" * 64,
            "compression": "gzip"}]
HOST = {"hostname": "lab-1", "cpu": "AMD EPYC 7763", "machine": "x86_64", "driver": None, "gpus": []}
CELL_SPEC_FIRST = {  # harness.matrix.ImageCell when snapshots were new: no compat_floor, base_digest or gpu
    "name": "cpu-torch2.13", "torch": "2.13.0", "variant": "cpu", "cuda": None, "python": "3.11",
    "base_image": "python:3.11-slim", "source": "wheelhouse", "index_url": None, "min_driver": None, "arch": [],
    "device": "cpu", "ptx": None}


def sealed(body: dict) -> dict:
    """A manifest as SnapshotWriter.finish completes one: schema, members, its own digest."""
    out = dict(copy.deepcopy(body), schema=snap.SCHEMA, members=copy.deepcopy(MEMBERS))
    out["manifest_sha256"] = manifest_digest(out)
    return out


# The shapes harness has written under harness.snapshot/1, oldest first (keys only ever added).
FIRST = sealed({  # the first snapshots: data without kind/dir, record without schema
    "harness_version": "0.1.0", "created": "2026-11-29T10:00:00+00:00", "cell": "cpu-torch2.13",
    "cell_spec": CELL_SPEC_FIRST,
    "image": {"id": IMAGE_ID, "tag": "harness:cpu-torch2.13-abc", "size": 912345678,
              "repo_digests": [], "input_hash": "a" * 64},
    "build": {"recipe_matches_image": True, "input_hash": "a" * 64},
    "bundle": {"name": "optuna_best"},
    "data": {"file": "data.csv", "path": "/home/u/optuna_best/data.csv", "config_path": "data.csv",
             "sha256": SHA, "size": 300, "included": True},
    "record": {"cell": "cpu-torch2.13", "weights_sha256": "b" * 64, "status": "ok"},
    "host": HOST,
})
SIGNED = sealed({  # from signatures on: record.schema; cell_spec gained compat_floor
    **{k: v for k, v in FIRST.items() if k not in ("schema", "members", "manifest_sha256")},
    "harness_version": "0.2.0",
    "cell_spec": dict(CELL_SPEC_FIRST, compat_floor=None),
    "record": {"cell": "cpu-torch2.13", "weights_sha256": "b" * 64, "status": "ok", "schema": "harness.result/2"},
})
DATA_DIR = sealed({  # from directory data on: data.kind, and data.dir for a run with --data-dir
    **{k: v for k, v in SIGNED.items() if k not in ("schema", "members", "manifest_sha256")},
    "harness_version": "0.3.0",
    "cell_spec": dict(CELL_SPEC_FIRST, compat_floor=None, base_digest=None, gpu=None),
    "data": {"file": "data.csv", "path": "/srv/data/sets/data.csv", "config_path": "data.csv", "sha256": SHA,
             "size": 4096, "included": False, "kind": "file",
             "dir": {"name": "data", "sha256": "7" * 64, "in_dir": "sets/data.csv"}},
    "record": {"cell": "cpu-torch2.13", "weights_sha256": "b" * 64, "status": "ok", "schema": "harness.result/3"},
})


@pytest.mark.parametrize("doc", [FIRST, SIGNED, DATA_DIR], ids=["first", "signed", "data-dir"])
def test_every_manifest_shape_harness_wrote_still_loads_and_writes_back_as_read(doc: dict) -> None:
    raw = json.dumps(doc, indent=1, sort_keys=True).encode()
    assert snap.parse_manifest(raw, "old.harness.tar") == doc  # schema, digest and shape accepted
    m = Manifest.from_json(doc, "old.harness.tar")
    assert m.cell == "cpu-torch2.13" and m.image.id == IMAGE_ID and m.bundle.name == "optuna_best"
    assert m.data.sha256 == SHA and [e.name for e in m.members] == ["record.json.gz", "data.gz"]
    assert m.to_json() == doc  # nothing added, nothing lost: the digest and a signature still match
    assert manifest_digest(m.to_json()) == doc["manifest_sha256"]


def test_what_the_older_shapes_lack_reads_as_absent() -> None:
    first = Manifest.from_json(FIRST, "old")
    assert first.data.kind is None and first.data.dir is None and not first.data.is_tree
    assert first.record is not None and first.record.schema is None
    data_dir = Manifest.from_json(DATA_DIR, "new").data
    assert data_dir.is_tree and data_dir.dir == DataDir(name="data", sha256="7" * 64, in_dir="sets/data.csv")


def test_a_rebuild_reads_the_cell_of_the_first_manifests() -> None:
    cell = snap.archived_cell(snap.Verified(Path("old.harness.tar"), FIRST))
    assert cell.name == "cpu-torch2.13" and cell.arch == () and cell.compat_floor is None and cell.gpu is None


def current_manifest() -> Manifest:
    """A manifest as `harness snapshot` builds one (harness.snapshot.workflows.create)."""
    return Manifest(
        harness_version="0.4.0", created="2026-12-01T09:00:00+00:00", cell="cpu-torch2.13",
        cell_spec=dict(CELL_SPEC_FIRST, compat_floor=None, base_digest=None, gpu=None),
        image=ImageEntry(id=IMAGE_ID, tag="harness:cpu-torch2.13-abc", size=912345678, repo_digests=(),
                         input_hash="a" * 64),
        build=BuildEntry(recipe_matches_image=True, input_hash="a" * 64),
        bundle=BundleEntry(name="optuna_best"),
        data=DataEntry(file="data.csv", path="/b/data.csv", config_path="data.csv", sha256=SHA, size=300,
                       included=True, kind="file"),
        record=RecordEntry(cell="cpu-torch2.13", weights_sha256="b" * 64, status="ok", schema="harness.result/3"),
        host=HOST,
    )


def test_the_current_manifest_round_trips_through_an_archive(tmp_path: Path) -> None:
    made = current_manifest()
    path = tmp_path / "run.harness.tar"
    with snap.SnapshotWriter(path) as w:
        w.add_bytes(snap.RECORD, b"{}")
        w.add_bytes(snap.DATA, b"x,y\n1,2\n")
        w.finish(made)
    v = snap.verify(path)
    read = v.parsed
    assert [e.name for e in read.members] == [snap.RECORD, snap.DATA]
    assert read.manifest_sha256 == v.manifest["manifest_sha256"]
    assert dataclasses.replace(read, members=(), manifest_sha256=None) == made  # every field as written
    assert read.to_json() == v.manifest  # the document as read, exactly
    assert Manifest.from_json(read.to_json(), str(path)) == read
    assert set(v.manifest["data"]) == {"file", "path", "config_path", "sha256", "size", "included", "kind"}  # no dir


def test_keys_this_version_does_not_know_are_kept() -> None:
    doc = copy.deepcopy(DATA_DIR)
    doc["provenance"] = {"ci": "run 12"}
    doc["extra"] = "a key that is called extra"
    doc["data"]["mirror"] = "s3://bucket/data.csv"
    doc["manifest_sha256"] = manifest_digest(doc)
    m = Manifest.from_json(doc, "newer")
    assert m.extra == {"provenance": {"ci": "run 12"}, "extra": "a key that is called extra"}
    assert m.data.extra == {"mirror": "s3://bucket/data.csv"}
    assert m.to_json() == doc


@pytest.mark.parametrize("key, value, message", [
    ("image.size", "big", "key image.size is str, expected int or null"),
    ("data.config_path", 3, "key data.config_path is int, expected str or null"),
    ("record.status", ["ok"], "key record.status is list, expected str or null"),
    ("build.recipe_matches_image", "yes", "key build.recipe_matches_image is str, expected bool or null"),
])
def test_a_value_of_another_type_is_refused_naming_its_key(key: str, value, message: str) -> None:
    doc = copy.deepcopy(DATA_DIR)
    section, name = key.split(".")
    doc[section][name] = value
    with pytest.raises(InputError, match=message) as info:
        Manifest.from_json(doc, "x.harness.tar")
    assert str(info.value).startswith("x.harness.tar: manifest.json: ")


def test_a_manifest_of_a_future_schema_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    future = dict(current_manifest().to_json(), schema="harness.snapshot/2", members=[])
    with pytest.raises(InputError) as info:
        Manifest.from_json(future, "run.harness.tar")
    assert str(info.value) == ("run.harness.tar: has schema harness.snapshot/2, this harness reads harness.snapshot/1; "
                               "upgrade harness to read it")
    path = tmp_path / "future.harness.tar"  # the same through the CLI: one line naming the file, exit 2
    with snap.SnapshotWriter(path) as w:
        w.finish(current_manifest())
    raw = bytearray(path.read_bytes())
    doc = json.loads(raw[512:512 + snap.MANIFEST_SLOT].decode())
    doc["schema"] = "harness.snapshot/2"
    doc["manifest_sha256"] = manifest_digest(doc)
    text = json.dumps(doc, indent=1, sort_keys=True).encode()
    raw[512:512 + snap.MANIFEST_SLOT] = text + b" " * (snap.MANIFEST_SLOT - len(text))
    path.write_bytes(bytes(raw))
    assert main(["snapshot", "verify", str(path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"harness: error: {path}: has schema harness.snapshot/2, this harness reads harness.snapshot/1; "
                   "upgrade harness to read it"]


def test_verify_prints_an_older_manifest_as_before(tmp_path: Path, capsys) -> None:
    path = tmp_path / "old.harness.tar"
    body = {k: v for k, v in FIRST.items() if k not in ("schema", "members", "manifest_sha256")}
    with snap.SnapshotWriter(path) as w:
        w.add_bytes(snap.RECORD, b"{}")
        w.finish(body)
    assert main(["snapshot", "verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"cell cpu-torch2.13, image {IMAGE_ID} (harness:cpu-torch2.13-abc)" in out
    assert "created 2026-11-29T10:00:00+00:00 by harness 0.1.0; data included" in out
    assert "signature: unsigned" in out


def test_verify_archive_returns_what_it_found_and_prints_nothing(tmp_path: Path, capsys) -> None:
    path = tmp_path / "run.harness.tar"
    with snap.SnapshotWriter(path) as w:
        w.add_bytes(snap.RECORD, b"{}")
        w.finish(current_manifest())
    result = snap.verify_archive(snap.VerifyOptions(path))
    assert result.signature == snap.SignatureStatus("unsigned")
    assert result.manifest.cell == "cpu-torch2.13" and [e.name for e in result.manifest.members] == [snap.RECORD]
    assert capsys.readouterr() == ("", "")
    with pytest.raises(InputError, match="missing.allowed: not found; pass an OpenSSH allowed_signers file"):
        snap.verify_archive(snap.VerifyOptions(path, snap.Signers(str(tmp_path / "missing.allowed"))))
