"""Resumable chunked arrays, .npy and safetensors files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from store.arrays import ChunkedArray, load_array, load_tensors, save_array, save_tensors
from store.errors import ConfigMismatchError, CorruptRunError


def test_resume_after_crash(tmp_path: Path) -> None:
    path = tmp_path / "arrays" / "features.npy"
    full = np.random.default_rng(0).standard_normal((103, 4)).astype(np.float32)
    arr = ChunkedArray.open_or_create(path, shape=(103, 4), dtype=np.float32, chunk_rows=10)
    assert arr.n_chunks == 11 and arr.missing_chunks() == list(range(11))
    assert arr.chunk_slice(10) == slice(100, 103)
    for i in (0, 3, 10):
        arr.write_chunk(i, full[arr.chunk_slice(i)])
    del arr  # "crash": no close, no cleanup

    arr = ChunkedArray.open_or_create(path, shape=(103, 4), dtype=np.float32, chunk_rows=10)
    assert arr.missing_chunks() == [1, 2, 4, 5, 6, 7, 8, 9]
    assert not arr.is_complete
    np.testing.assert_array_equal(arr.array()[arr.chunk_slice(3)], full[30:40])
    for i in arr.missing_chunks():
        arr.write_chunk(i, full[arr.chunk_slice(i)].astype(np.float64))  # float64 is cast
    assert arr.is_complete and arr.missing_chunks() == []
    out = arr.array()
    assert isinstance(out, np.memmap) and out.dtype == np.float32
    np.testing.assert_array_equal(out, full)
    np.testing.assert_array_equal(load_array(path), full)  # a plain .npy file
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "features.done.npy",
        "features.meta.json",
        "features.npy",
    ]


@pytest.mark.parametrize(
    "changed",
    [
        {"shape": (104, 4)},
        {"shape": (103, 5)},
        {"dtype": np.float64},
        {"chunk_rows": 11},
    ],
)
def test_mismatched_reopen_raises(tmp_path: Path, changed: dict) -> None:
    kwargs = {"shape": (103, 4), "dtype": np.float32, "chunk_rows": 10}
    ChunkedArray.open_or_create(tmp_path / "a.npy", **kwargs).write_chunk(0, np.ones((10, 4)))
    with pytest.raises(ConfigMismatchError, match=r"a\.npy.*shape=\[103, 4\].*asked for"):
        ChunkedArray.open_or_create(tmp_path / "a.npy", **(kwargs | changed))


def test_missing_data_file_is_corrupt(tmp_path: Path) -> None:
    ChunkedArray.open_or_create(tmp_path / "a.npy", shape=(4, 2), dtype=np.int64, chunk_rows=2)
    (tmp_path / "a.npy").unlink()
    with pytest.raises(CorruptRunError, match=r"a\.npy"):
        ChunkedArray.open_or_create(tmp_path / "a.npy", shape=(4, 2), dtype=np.int64, chunk_rows=2)


def test_write_chunk_validates(tmp_path: Path) -> None:
    arr = ChunkedArray.open_or_create(tmp_path / "a.npy", shape=(5, 3), dtype=np.float32, chunk_rows=2)
    with pytest.raises(ValueError, match=r"data.*shape"):
        arr.write_chunk(0, np.ones((3, 3)))
    with pytest.raises(ValueError, match="i:"):
        arr.write_chunk(3, np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"data.*NaN"):
        arr.write_chunk(0, np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match=r"data.*dtype"):
        arr.write_chunk(0, np.full((2, 3), 1 + 2j))
    assert arr.missing_chunks() == [0, 1, 2]
    with pytest.raises(ValueError, match="chunk_rows"):
        ChunkedArray.open_or_create(tmp_path / "b.npy", shape=(5, 3), dtype=np.float32, chunk_rows=0)


def test_save_and_load_array(tmp_path: Path) -> None:
    a = np.arange(12, dtype=np.int64).reshape(3, 4)
    save_array(tmp_path / "x.npy", a)
    np.testing.assert_array_equal(load_array(tmp_path / "x.npy", mmap=False), a)
    assert isinstance(load_array(tmp_path / "x.npy"), np.memmap)
    assert [p.name for p in tmp_path.iterdir()] == ["x.npy"]
    with pytest.raises(CorruptRunError, match=r"missing.npy"):
        load_array(tmp_path / "missing.npy")
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(CorruptRunError, match=r"bad.npy"):
        load_array(tmp_path / "bad.npy")
    with pytest.raises(ValueError, match="arr"):
        save_array(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object))


def test_tensors_round_trip(tmp_path: Path) -> None:
    tensors = {
        "0.weight": np.random.default_rng(1).standard_normal((10, 16)).astype(np.float32),
        "0.bias": np.zeros(10, np.float64),
        "steps": np.array([3], np.int64),
    }
    save_tensors(tmp_path / "head.safetensors", tensors)
    loaded = load_tensors(tmp_path / "head.safetensors")
    assert sorted(loaded) == sorted(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype
        np.testing.assert_array_equal(loaded[name], value)
    assert [p.name for p in tmp_path.iterdir()] == ["head.safetensors"]
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(CorruptRunError, match=r"bad.safetensors"):
        load_tensors(tmp_path / "bad.safetensors")
    with pytest.raises(CorruptRunError, match=r"none.safetensors"):
        load_tensors(tmp_path / "none.safetensors")
