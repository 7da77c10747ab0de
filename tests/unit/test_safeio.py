"""harness.safeio beyond reading user-given files (tests/cli/test_hostile_inputs.py): a cell's files by name, what a
worker leaves read and written without following a link, and the one sha256 of a file."""

from __future__ import annotations

import ast
import errno
import hashlib
import os
import stat
from pathlib import Path

import pytest

from harness import record, safeio
from harness.errors import RunFailed
from harness.plan import Cell, Job
from harness.safeio import (CellPaths, NotRegularFile, atomic_write_text, create_no_follow, fresh_dir, read_no_follow,
                            sha256_file, tail_no_follow)
from tests.conftest import REPO

HARNESS = REPO / "harness"


# --------------------------------------------------------------------------- a cell's files


def test_cell_paths_name_every_file_of_a_cell(tmp_path: Path) -> None:
    files = CellPaths(tmp_path / "c")
    assert files.folder == tmp_path / "c"
    assert (files.spec, files.log, files.record, files.trace) == tuple(
        tmp_path / "c" / n for n in ("spec.json", "worker.log", "record.json", "trace.jsonl"))
    assert (files.weights, files.best, files.last) == (
        tmp_path / "c" / "weights", tmp_path / "c" / "weights" / "best.pt", tmp_path / "c" / "weights" / "last.pt")
    assert (files.scaler, files.member_config) == (tmp_path / "c" / "target_scaler.joblib",
                                                   tmp_path / "c" / "harness-config.yaml")
    assert CellPaths(str(tmp_path)).record == tmp_path / "record.json"  # a str folder as well as a Path
    assert repr(files) == f"CellPaths({str(tmp_path / 'c')!r})"


def test_the_names_others_use_are_the_cell_paths_names(tmp_path: Path) -> None:
    from harness.worker import checkpoint, trace

    assert record.RECORD_FILE == CellPaths.RECORD
    assert trace.TRACE_FILE == CellPaths.TRACE  # spelled there too: the module is copied out of the package
    assert checkpoint.BEST == CellPaths.BEST
    job = Job(bundle_dir=str(tmp_path / "b"), data_path=None, results_dir=str(tmp_path / "r"))
    assert job.cell_paths(Cell(name="cpu-a")).record == tmp_path / "r" / "cpu-a" / "record.json"


def _spelled(tree: ast.AST, names: frozenset[str]) -> list[int]:
    """Lines of string constants (docstrings aside) that are one of ``names``, or a path ending in one."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return sorted(node.lineno for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  and any(node.value == n or node.value.endswith("/" + n) for n in names))


CELL_FILES = frozenset({CellPaths.SPEC, CellPaths.LOG, CellPaths.RECORD, CellPaths.TRACE, CellPaths.BEST,
                        CellPaths.LAST, CellPaths.MEMBER_CONFIG})
SPELLED_ELSEWHERE = {"safeio.py", "worker/trace.py"}  # the names' home; the copied trace writer (see above)


def test_the_files_of_a_cell_are_spelled_in_cell_paths_alone() -> None:
    spelled = {}
    for f in sorted(HARNESS.rglob("*.py")):
        rel = f.relative_to(HARNESS).as_posix()
        if rel not in SPELLED_ELSEWHERE:
            lines = _spelled(ast.parse(f.read_text(encoding="utf-8")), CELL_FILES)
            if lines:
                spelled[rel] = lines
    assert spelled == {}


def test_the_spelling_check_finds_a_name_in_code_but_not_in_a_docstring() -> None:
    source = 'def f(out):\n    """Writes ``record.json``."""\n    return (f"{out}/spec.json", "record.json", "a.json")\n'
    assert _spelled(ast.parse(source), CELL_FILES) == [3, 3]


# --------------------------------------------------------------------------- what a worker leaves


def test_read_no_follow_reads_a_regular_file_and_nothing_else(tmp_path: Path) -> None:
    f = tmp_path / "record.json"
    assert read_no_follow(f, 10) is None  # nothing there
    f.write_bytes(b"{}")
    assert read_no_follow(f, 10) == b"{}"
    victim = tmp_path / "victim"
    victim.write_text("secret")
    f.unlink()
    f.symlink_to(victim)
    with pytest.raises(RunFailed, match=r"^record\.json is a symbolic link, not a regular file; not followed$"):
        read_no_follow(f, 10, shown=f.name)
    f.unlink()
    os.mkfifo(f)  # opened without waiting for a writer, and refused
    with pytest.raises(RunFailed, match=f"^{f} is not a regular file$"):
        read_no_follow(f, 10)
    f.unlink()
    f.write_bytes(b"x" * 11)
    with pytest.raises(RunFailed, match="is 11 bytes, more than the 10 bytes it may hold"):
        read_no_follow(f, 10)


def test_tail_no_follow_keeps_whole_characters_and_follows_no_link(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    assert tail_no_follow(log) is None
    log.write_text("")
    assert tail_no_follow(log) is None
    log.write_text("x" * 10 + "é" * 5, encoding="utf-8")
    assert tail_no_follow(log, 5) == "ééééé"
    assert tail_no_follow(log, 100) == "x" * 10 + "é" * 5
    other = tmp_path / "other.log"
    other.write_text("not the cell's")
    log.unlink()
    log.symlink_to(other)
    assert tail_no_follow(log) is None
    log.unlink()
    os.mkfifo(log)
    assert tail_no_follow(log) is None


def test_create_no_follow_replaces_a_link_or_a_directory_and_writes_each_line_at_once(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    log = tmp_path / "worker.log"
    log.symlink_to(victim)
    with create_no_follow(log) as fh:
        fh.write("one\n")
        assert log.read_text() == "one\n"  # line-buffered: current while the worker runs
    assert victim.read_text() == "keep" and not log.is_symlink()
    log.unlink()
    (log / "inside").mkdir(parents=True)
    with create_no_follow(log) as fh:
        fh.write("two\n")
    assert log.read_text() == "two\n"
    assert stat.S_IMODE(log.stat().st_mode) == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_fresh_dir_leaves_an_empty_directory_and_never_follows_a_link_in_its_place(tmp_path: Path) -> None:
    out = tmp_path / "r" / "c"
    (out / "weights").mkdir(parents=True)
    (out / "record.json").write_text("{}")
    fresh_dir(out)
    assert list(out.iterdir()) == [] and stat.S_IMODE(out.stat().st_mode) == 0o755
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("x")
    os.rmdir(out)
    out.symlink_to(elsewhere, target_is_directory=True)
    fresh_dir(out)
    assert not out.is_symlink() and out.is_dir() and (elsewhere / "keep").read_text() == "x"


def test_atomic_write_replaces_a_link_and_leaves_nothing_half_written(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    spec = tmp_path / "spec.json"
    spec.symlink_to(victim)
    atomic_write_text(spec, "{}")
    assert victim.read_text() == "keep" and spec.read_text() == "{}" and not spec.is_symlink()
    assert stat.S_IMODE(spec.stat().st_mode) == 0o644

    def broken(fh: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        safeio.atomic_write(spec, broken)
    assert spec.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["spec.json", "victim"]


# --------------------------------------------------------------------------- the one digest of a file


def test_sha256_file_is_sha256sum_and_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    f = tmp_path / "data.npz"
    f.write_bytes(b"abc" * 100_000)
    want = hashlib.sha256(b"abc" * 100_000).hexdigest()
    assert sha256_file(f) == want and sha256_file(f, chunk=7) == want
    link = tmp_path / "link.npz"
    link.symlink_to(f)
    assert sha256_file(link) == want  # a user's own file: followed by default
    with pytest.raises(OSError) as refused:
        sha256_file(link, follow_links=False)
    assert refused.value.errno == errno.ELOOP
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(NotRegularFile, match="is a FIFO, not a regular file"):
        sha256_file(fifo)  # not waited on
    with pytest.raises(NotRegularFile) as a_dir:
        sha256_file(tmp_path)
    assert a_dir.value.errno == errno.EISDIR
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "absent")
