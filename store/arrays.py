"""Arrays on disk: resumable chunked memmaps, plain ``.npy`` files and safetensors.

:class:`ChunkedArray` follows TRAK's saver: a ``.npy`` memmap written chunk by chunk beside a boolean
"done" mask, so a build interrupted at any point resumes with the chunks still missing. Nothing here ever
unpickles.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from store.atomic import atomic_path, atomic_write_bytes, atomic_write_json
from store.errors import ConfigMismatchError, CorruptRunError


def _done_path(path: Path) -> Path:
    return path.with_suffix(".done.npy")


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".meta.json")


def _check_shape(shape: Any) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape: must be a tuple of ints, got {shape!r}") from None
    if not out or any(s < 0 for s in out):
        raise ValueError(f"shape: must be a non-empty tuple of non-negative ints, got {shape!r}")
    return out


class ChunkedArray:
    """A ``.npy`` memmap written in row chunks, with a done mask so an interrupted build resumes.

    Files: ``path`` (the data), ``path.with_suffix('.done.npy')`` (bool ``[n_chunks]``) and
    ``path.with_suffix('.meta.json')`` (shape, dtype, chunk_rows; written last, so a crash during
    creation is seen as "not created yet"). Build with :meth:`open_or_create`.
    """

    def __init__(self, path: Path, data: np.memmap, done: np.memmap, *, chunk_rows: int) -> None:
        self.path = path
        self._data = data
        self._done = done
        self.chunk_rows = chunk_rows

    @classmethod
    def open_or_create(
        cls,
        path: str | os.PathLike[str],
        *,
        shape: tuple[int, ...],
        dtype: Any,
        chunk_rows: int,
    ) -> ChunkedArray:
        """Opens the array at ``path`` to resume it, or creates it with every chunk missing.

        Args:
            path: The ``.npy`` data file.
            shape: Full array shape; rows (axis 0) are split into chunks.
            dtype: Element dtype.
            chunk_rows: Rows per chunk (the last chunk may be shorter).

        Raises:
            ConfigMismatchError: The array exists with a different shape, dtype or chunk_rows.
            CorruptRunError: The array's files are damaged or disagree with its metadata.
        """
        p = Path(path)
        if p.suffix != ".npy":
            raise ValueError(f"path: must end in .npy, got {str(p)!r}")
        shape_t = _check_shape(shape)
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise ValueError(f"dtype: not a numpy dtype: {dtype!r}") from None
        if dt.hasobject:
            raise ValueError(f"dtype: object arrays cannot be memory-mapped, got {dt}")
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int | np.integer) or chunk_rows < 1:
            raise ValueError(f"chunk_rows: must be an int >= 1, got {chunk_rows!r}")
        chunk_rows = int(chunk_rows)
        n_chunks = math.ceil(shape_t[0] / chunk_rows)
        meta = {"shape": list(shape_t), "dtype": dt.str, "chunk_rows": chunk_rows, "n_chunks": n_chunks}

        meta_file = _meta_path(p)
        if meta_file.is_file():
            try:
                stored = json.loads(meta_file.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CorruptRunError(f"{meta_file}: not valid JSON ({e})") from e
            if stored != meta:
                raise ConfigMismatchError(
                    f"{p}: existing chunked array has {_describe(stored)}, asked for {_describe(meta)}; "
                    "delete it to rebuild"
                )
            data = _open_memmap(p, shape_t, dt)
            done = _open_memmap(_done_path(p), (n_chunks,), np.dtype(np.bool_))
            return cls(p, data, done, chunk_rows=chunk_rows)

        p.parent.mkdir(parents=True, exist_ok=True)
        data = np.lib.format.open_memmap(p, mode="w+", dtype=dt, shape=shape_t)
        data.flush()
        done = np.lib.format.open_memmap(_done_path(p), mode="w+", dtype=np.bool_, shape=(n_chunks,))
        done[:] = False
        done.flush()
        atomic_write_json(meta_file, meta)
        return cls(p, data, done, chunk_rows=chunk_rows)

    def __repr__(self) -> str:
        return (
            f"ChunkedArray({str(self.path)!r}, shape={self.shape}, dtype={self.dtype}, "
            f"done={self.n_chunks - len(self.missing_chunks())}/{self.n_chunks})"
        )

    @property
    def shape(self) -> tuple[int, ...]:
        """Full array shape."""
        return tuple(self._data.shape)

    @property
    def dtype(self) -> np.dtype:
        """Element dtype."""
        return self._data.dtype

    @property
    def n_chunks(self) -> int:
        """Number of row chunks."""
        return int(self._done.shape[0])

    def missing_chunks(self) -> list[int]:
        """Returns the indices of chunks not yet written, ascending."""
        return np.flatnonzero(~np.asarray(self._done)).tolist()

    @property
    def is_complete(self) -> bool:
        """Whether every chunk has been written."""
        return bool(np.asarray(self._done).all())

    def chunk_slice(self, i: int) -> slice:
        """Returns the rows of chunk ``i`` as a slice of axis 0."""
        i = self._check_chunk(i)
        start = i * self.chunk_rows
        return slice(start, min(start + self.chunk_rows, self.shape[0]))

    def _check_chunk(self, i: Any) -> int:
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= i < self.n_chunks:
            raise ValueError(f"i: must be a chunk index in [0, {self.n_chunks}), got {i!r}")
        return int(i)

    def write_chunk(self, i: int, data: np.ndarray) -> None:
        """Writes chunk ``i`` and marks it done, in that order (done only once the data is on disk).

        Args:
            i: The chunk index.
            data: ``[rows of chunk i, *shape[1:]]``; cast to the array's dtype if that is lossless in kind.
        """
        sl = self.chunk_slice(i)
        arr = np.asarray(data)
        expected = (sl.stop - sl.start, *self.shape[1:])
        if arr.shape != expected:
            raise ValueError(f"data: chunk {i} must have shape {expected}, got {arr.shape}")
        if not np.can_cast(arr.dtype, self.dtype, casting="same_kind"):
            raise ValueError(f"data: dtype {arr.dtype} cannot be stored as {self.dtype}")
        if np.issubdtype(arr.dtype, np.inexact) and not np.isfinite(arr).all():
            raise ValueError(f"data: chunk {i} contains NaN or infinity")
        self._data[sl] = arr
        self._data.flush()
        self._done[i] = True
        self._done.flush()

    def array(self, mode: str = "r") -> np.memmap:
        """Returns the data file as a memmap (``mode`` "r", "r+" or "c")."""
        if mode not in ("r", "r+", "c"):
            raise ValueError(f"mode: must be 'r', 'r+' or 'c', got {mode!r}")
        return np.lib.format.open_memmap(self.path, mode=mode)

    def close(self) -> None:
        """Flushes and releases the memmaps."""
        for m in (self._data, self._done):
            m.flush()
        del self._data, self._done


def _describe(meta: Any) -> str:
    if not isinstance(meta, dict):
        return repr(meta)
    return f"shape={meta.get('shape')}, dtype={meta.get('dtype')}, chunk_rows={meta.get('chunk_rows')}"


def _open_memmap(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.memmap:
    if not path.is_file():
        raise CorruptRunError(f"{path}: missing (its .meta.json exists); delete the array to rebuild")
    try:
        arr = np.lib.format.open_memmap(path, mode="r+")
    except (ValueError, OSError) as e:
        raise CorruptRunError(f"{path}: not a readable .npy file ({e})") from e
    if arr.shape != shape or arr.dtype != dtype:
        raise CorruptRunError(f"{path}: holds {arr.dtype} {arr.shape}, its metadata says {dtype} {shape}")
    return arr


def save_array(path: str | os.PathLike[str], arr: np.ndarray) -> None:
    """Writes ``arr`` to ``path`` as ``.npy`` atomically (no pickling: object arrays are refused)."""
    a = np.asarray(arr)
    if a.dtype.hasobject:
        raise ValueError(f"arr: object arrays cannot be saved, got dtype {a.dtype}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p) as tmp, open(tmp, "wb") as f:
        np.save(f, a, allow_pickle=False)


def load_array(path: str | os.PathLike[str], *, mmap: bool = True) -> np.ndarray:
    """Reads a ``.npy`` file, memory-mapped read-only by default.

    Raises:
        CorruptRunError: The file is missing or not a readable ``.npy`` file; the message names it.
    """
    p = Path(path)
    if not p.is_file():
        raise CorruptRunError(f"{p}: array file is missing")
    try:
        return np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CorruptRunError(f"{p}: not a readable .npy file ({e})") from e


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, np.ndarray]) -> None:
    """Writes named arrays to a safetensors file atomically.

    Args:
        path: The ``.safetensors`` file.
        tensors: Name -> array (numeric dtypes).
    """
    if not isinstance(tensors, dict):
        raise ValueError(f"tensors: must be a dict of name -> array, got {type(tensors).__name__}")
    clean: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise ValueError(f"tensors: names must be str, got {name!r}")
        a = np.asarray(value)
        if a.dtype.hasobject:
            raise ValueError(f"tensors[{name!r}]: object arrays cannot be saved")
        clean[name] = np.ascontiguousarray(a)
    try:
        data = safetensors.numpy.save(clean)
    except Exception as e:  # safetensors raises its own error types for unsupported dtypes
        raise ValueError(f"tensors: cannot be written as safetensors ({e})") from e
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, data)


def load_tensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads a safetensors file into a dict of numpy arrays.

    Raises:
        CorruptRunError: The file is missing or not valid safetensors; the message names it.
    """
    p = Path(path)
    if not p.is_file():
        raise CorruptRunError(f"{p}: tensor file is missing")
    try:
        return safetensors.numpy.load(p.read_bytes())
    except Exception as e:  # safetensors' SafetensorError is not a stable public type
        raise CorruptRunError(f"{p}: not a readable safetensors file ({e})") from e


__all__ = ["ChunkedArray", "load_array", "load_tensors", "save_array", "save_tensors"]


def replace_array(path: str | os.PathLike[str], arr: np.ndarray) -> None:
    """Atomically replaces the ``.npy`` array at ``path`` with ``arr`` of a possibly different row count.

    For incremental updates of a run: when ``path`` is a :class:`ChunkedArray` (it has a ``.meta.json``), its
    metadata and done mask are rewritten to describe the new array as complete, so the files stay consistent.
    """
    p = Path(path)
    save_array(p, arr)
    meta_file = _meta_path(p)
    if meta_file.is_file():
        try:
            stored = json.loads(meta_file.read_text(encoding="utf-8"))
            chunk_rows = int(stored["chunk_rows"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CorruptRunError(f"{meta_file}: not valid chunked-array metadata ({e})") from e
        a = np.asarray(arr)
        n_chunks = math.ceil(a.shape[0] / chunk_rows)
        save_array(_done_path(p), np.ones(n_chunks, np.bool_))
        atomic_write_json(
            meta_file, {"shape": list(a.shape), "dtype": a.dtype.str, "chunk_rows": chunk_rows, "n_chunks": n_chunks}
        )


def remove_chunked_array(path: str | os.PathLike[str]) -> None:
    """Removes a `ChunkedArray`'s files (data, done mask, metadata; metadata first, so that a crash in between
    leaves an array that reopens as new), when they exist."""
    p = Path(path)
    for f in (_meta_path(p), _done_path(p), p):
        f.unlink(missing_ok=True)
