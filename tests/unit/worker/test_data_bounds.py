"""A dataset's expanded size is bounded before any array is read: zip bombs, crafted sizes, a limit.

The pre-check (the CLI, every backend) and the worker read the zip's directory and each
``.npy`` header only; a 2 MB file that expands to 2 GB used to be loaded and trained on
until ``--timeout``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from harness.bundle import DataSpec
from harness.errors import InputError
from harness.worker.data import check_expansion, load_raw, read_layout

from tests.conftest import REPO, patience


def spec(path: Path) -> DataSpec:
    return DataSpec(path=str(path), resolved=str(path), sha256=None, exclude_channels=(2,), downsample=2)


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, COLUMNS="400", PYTHONPATH=str(REPO), **env)
    full.pop("HARNESS_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, env=full,
                          timeout=patience(120))


def one_error_line(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("harness: error:")]
    return line


def write_bomb(path: Path, n: int) -> None:
    """A valid dataset of zeros, X of (n, 3, 16) float32, deflated as np.savez_compressed does, written in blocks."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        with zf.open("X.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (n, 3, 16)})
            block = bytes(1000 * 3 * 16 * 4)
            for _ in range(n // 1000):
                fh.write(block)
        with zf.open("y.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array(fh, np.zeros((n, 2), np.float32))


def declare_size(path: Path, member: str, size: int) -> None:
    """Rewrite the uncompressed size the zip's central directory declares for ``member``."""
    data = bytearray(path.read_bytes())
    at = 0
    while True:
        at = data.index(b"PK\x01\x02", at)
        name_len = int.from_bytes(data[at + 28:at + 30], "little")
        if bytes(data[at + 46:at + 46 + name_len]) == member.encode():
            data[at + 24:at + 28] = size.to_bytes(4, "little")
            break
        at += 4
    path.write_bytes(bytes(data))


def test_a_zip_bomb_dataset_is_refused_before_anything_trains(make_bundle, tmp_path: Path) -> None:
    bundle = make_bundle()
    data = bundle / "signals.npz"
    write_bomb(data, 440_000)  # X: 80.6 MiB of zeros in about 80 KiB
    assert data.stat().st_size < 1 << 20
    out = tmp_path / "out"
    t0 = time.perf_counter()
    line = one_error_line(cli("run", str(bundle), "--out", str(out), "--device", "cpu", "--no-progress"))
    assert line.startswith(f"harness: error: {data}: member X.npy expands "), line
    assert "-fold, from " in line and "refused as a zip bomb" in line and "save it uncompressed with np.savez" in line
    assert time.perf_counter() - t0 < patience(30)
    assert not out.exists() or not list(out.rglob("record.json"))  # refused before any cell started


def test_a_member_declaring_more_than_its_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, X=np.zeros((20, 3, 16), np.float32), y=np.zeros((20, 2), np.float32))
    real = zipfile.ZipFile(path).getinfo("X.npy").file_size
    declare_size(path, "X.npy", real + 4096)
    for reader in (lambda: read_layout(spec(path)), lambda: load_raw(path)):  # the pre-check, and the worker
        with pytest.raises(InputError) as ei:
            reader()
        assert ei.value.one_line().startswith(
            f"{path}: member X.npy declares {real + 4096} bytes uncompressed, but its header (shape (20, 3, 16), "
            f"float32) describes {real} bytes; write it with np.savez"), ei.value.one_line()


def test_a_member_declaring_a_huge_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, X=np.zeros((20, 3, 16), np.float32), y=np.zeros((20, 2), np.float32))
    declare_size(path, "y.npy", 0xFFFF_FF00)  # about 4 GiB
    for reader in (lambda: read_layout(spec(path)), lambda: load_raw(path)):
        with pytest.raises(InputError, match=rf"^{path}: member y\.npy expands \d+-fold, from .* to 4\.0 GiB"):
            reader()


def test_a_header_larger_than_its_member_is_refused_without_allocating(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as zf:
        with zf.open("X.npy", "w") as fh:  # says 48 GiB, holds 3 KiB
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (1 << 28, 3, 16)})
            fh.write(bytes(3072))
        with zf.open("y.npy", "w") as fh:
            np.lib.format.write_array(fh, np.zeros((0, 2), np.float32))
    for reader in (lambda: read_layout(spec(path)), lambda: load_raw(path)):
        with pytest.raises(InputError, match=r"member X\.npy declares \d+ bytes uncompressed, but its header \(shape "
                                             r"\(268435456, 3, 16\), float32\) describes \d+ bytes: truncated or crafted"):
            reader()


def test_the_limit_and_its_variable(make_bundle) -> None:
    bundle = make_bundle()  # signals.npz: about 12 KiB expanded
    line = one_error_line(cli("run", str(bundle), "--device", "cpu", "--no-progress", HARNESS_DATA_LIMIT="4K"))
    assert f"{bundle / 'signals.npz'}: expands to more than 4.0 KiB" in line, line
    assert "HARNESS_DATA_LIMIT=SIZE" in line
    line = one_error_line(cli("run", str(bundle), "--device", "cpu", "--no-progress", HARNESS_DATA_LIMIT="lots"))
    assert line == ("harness: error: $HARNESS_DATA_LIMIT: is 'lots', not a size; give bytes or a size such as "
                    "HARNESS_DATA_LIMIT=64G"), line


def test_what_this_process_can_allocate_bounds_the_worker(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, X=np.zeros((20, 3, 16), np.float32), y=np.zeros((20, 2), np.float32))
    with zipfile.ZipFile(path) as zf:
        total = check_expansion(zf, str(path), None, None)
        assert total == sum(i.file_size for i in zf.infolist())
        assert check_expansion(zf, str(path), total, total) == total
        with pytest.raises(InputError, match=r"expands to 4\.\d KiB, but this process can allocate only 1000 B here"):
            check_expansion(zf, str(path), None, 1000)
