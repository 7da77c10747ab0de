"""Dataset format and preprocessing (pure)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from harness.bundle import DataSpec
from harness.safeio import sha256_file
from harness.worker.data import prepare, split_sizes
from harness.errors import InputError

from tests.conftest import write_dataset


def spec(path: Path, **kw) -> DataSpec:
    return DataSpec(path=str(path), resolved=str(path), sha256=None, **kw)


def test_exclusion_and_downsampling(tmp_path: Path) -> None:
    p = write_dataset(tmp_path / "d.npz", n=10, channels=4, time=9)
    raw = np.load(p)
    ds = prepare(spec(p, exclude_channels=(1, 3), downsample=4))
    assert ds.X.shape == (10, 2, 3)  # time steps 0, 4, 8
    np.testing.assert_array_equal(ds.X[:, 0, :], raw["X"][:, 0, ::4])
    np.testing.assert_array_equal(ds.X[:, 1, :], raw["X"][:, 2, ::4])
    assert ds.channel_names == ["ch0", "ch2"]
    assert ds.target_names == ["t0", "t1"]
    assert ds.X.dtype == np.float32 and ds.X.flags["C_CONTIGUOUS"]


def test_one_dimensional_target(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, X=np.zeros((10, 1, 4), np.float32), y=np.arange(10, dtype=np.float32))
    assert prepare(spec(p)).y.shape == (10, 1)


def test_split_sizes() -> None:
    assert split_sizes(100, (0.7, 0.15, 0.15)) == (70, 15, 15)
    assert split_sizes(7, (0.5, 0.25, 0.25)) == (3, 1, 3)


@pytest.mark.parametrize(
    ("arrays", "kw", "needle"),
    [
        ({"X": np.zeros((4, 8)), "y": np.zeros((4, 1))}, {}, "X must be 3-D"),
        ({"X": np.zeros((4, 2, 8)), "y": np.zeros((5, 1))}, {}, "X has 4 samples but y has 5"),
        ({"X": np.zeros((4, 2, 8))}, {}, "has no array 'y'"),
        ({"X": np.zeros((20, 2, 8)), "y": np.zeros((20, 1))}, {"exclude_channels": (5,)}, "data.exclude_channels [5] out of range"),
        ({"X": np.zeros((20, 2, 8)), "y": np.zeros((20, 1))}, {"exclude_channels": (0, 1)}, "removes all 2 channels"),
        ({"X": np.zeros((20, 2, 8)), "y": np.zeros((20, 1))}, {"downsample": 9}, "data.downsample is 9 but the series have only 8"),
        ({"X": np.full((20, 2, 8), np.nan), "y": np.zeros((20, 1))}, {}, "NaN"),
        ({"X": np.zeros((20, 2, 8)), "y": np.zeros((20, 2)), "target_names": np.array(["a"])}, {}, "target_names has 1 names"),
        ({"X": np.zeros((3, 2, 8)), "y": np.zeros((3, 1))}, {}, "give split sizes"),
    ],
)
def test_bad_data(tmp_path: Path, arrays: dict, kw: dict, needle: str) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    with pytest.raises(InputError) as e:
        prepare(spec(p, **kw))
    assert needle in e.value.one_line()


def test_missing_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="data file not found"):
        prepare(spec(tmp_path / "nope.npz"))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(InputError, match="cannot be read as an .npz"):
        prepare(spec(bad))


def test_pickled_arrays_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "obj.npz"
    np.savez(p, X=np.array([object()], dtype=object), y=np.zeros(1))
    with pytest.raises(InputError, match="cannot be read"):
        prepare(spec(p))


def test_sha256(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_data_that_is_not_a_regular_file_is_refused_not_read(tmp_path: Path) -> None:
    from harness.worker.data import sha256_path

    os.mkfifo(tmp_path / "data.npz")  # would block a plain open(); /dev/zero would never end
    with pytest.raises(InputError, match="data.npz: is a FIFO, not a regular file; the data is hashed before"):
        sha256_path(tmp_path / "data.npz")
