"""The cache key of a cell and when a record on disk stands for a rerun (harness.cache)."""

from __future__ import annotations

import os
from pathlib import Path

from harness import record
from harness.cache import CellCache, cell_key, reusable, tree_digest
from harness.record import ResultRecord, Status

from .records import record as compare_record

BASE = dict(environment="local:x", spec={"cell": "a", "threads": 1}, bundle="b", data_sha256="d", trainer=None)


def test_the_key_changes_with_each_input_and_only_then() -> None:
    key = cell_key(**BASE)
    assert cell_key(**BASE) == key
    for field, other in (("environment", "image:sha256:1"), ("spec", {"cell": "a", "threads": 2}),
                         ("bundle", "b2"), ("data_sha256", "d2"), ("trainer", "t")):
        assert cell_key(**{**BASE, field: other}) != key, field


def test_tree_digest_sees_content_and_names_and_never_follows_a_link(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    (root / "config.yaml").write_text("a: 1\n")
    first = tree_digest(root)
    (root / "config.yaml").write_text("a: 2\n")
    assert tree_digest(root) != first
    outside = tmp_path / "secret"
    outside.write_text("x")
    (root / "link").symlink_to(outside)
    with_link = tree_digest(root)
    outside.write_text("changed")
    assert tree_digest(root) == with_link  # the link's target text is hashed, not what it points at
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "m.pyc").write_bytes(b"\0")
    assert tree_digest(root) == with_link


def test_cell_cache_covers_the_bundle_and_the_trainer_folders(tmp_path: Path) -> None:
    bundle, code = tmp_path / "b", tmp_path / "code"
    bundle.mkdir()
    code.mkdir()
    (bundle / "config.yaml").write_text("a: 1\n")
    (code / "train.py").write_text("x = 1\n")
    key = CellCache(str(bundle), "d", [str(code)]).key("env", {"cell": "a"})
    (code / "train.py").write_text("x = 2\n")
    assert CellCache(str(bundle), "d", [str(code)]).key("env", {"cell": "a"}) != key


def _write(cell_dir: Path, rec: ResultRecord) -> None:
    cell_dir.mkdir(parents=True, exist_ok=True)
    record.write(cell_dir / "record.json", rec)


def test_only_an_ok_record_of_this_cell_with_this_key_is_reusable(tmp_path: Path) -> None:
    rec = compare_record("a", sha="w")
    rec.cache_key = "k"
    _write(tmp_path / "a", rec)
    assert reusable(tmp_path / "a", "a", "k") is not None
    assert reusable(tmp_path / "a", "a", "other") is None
    assert reusable(tmp_path / "a", "b", "k") is None  # another cell's record in this directory
    failed = ResultRecord.without_metrics("f", Status.INTERRUPTED, "interrupted", "stopped")
    failed.cache_key = "k"
    _write(tmp_path / "f", failed)
    assert reusable(tmp_path / "f", "f", "k") is None
    assert reusable(tmp_path / "none", "none", "k") is None


def test_a_linked_record_or_cell_directory_is_not_read(tmp_path: Path) -> None:
    rec = compare_record("a", sha="w")
    rec.cache_key = "k"
    _write(tmp_path / "elsewhere", rec)
    (tmp_path / "a").mkdir()
    os.symlink(tmp_path / "elsewhere" / "record.json", tmp_path / "a" / "record.json")
    assert reusable(tmp_path / "a", "a", "k") is None
    os.symlink(tmp_path / "elsewhere", tmp_path / "b")
    assert reusable(tmp_path / "b", "a", "k") is None
