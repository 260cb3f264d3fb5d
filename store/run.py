"""The run directory layout, content hashes and a consistency check.

A run directory holds ``manifest.json``, ``metadata.sqlite``, ``vectors/<space>.faiss``,
``arrays/<name>.npy`` and ``head.safetensors``. Only this package reads or writes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from store.errors import RunNotFoundError, StoreError
from store.manifest import MANIFEST_NAME, load_manifest
from store.metadata import MetadataStore
from store.vectors import FaissVectorIndex

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_name(value: str, name: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
        raise ValueError(f"{name}: must be a plain file name ([A-Za-z0-9_.-], no '/' or '..'), got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where each file of a run directory lives.

    Attributes:
        root: The run directory.
    """

    root: Path

    def __post_init__(self) -> None:
        if not isinstance(self.root, str | os.PathLike):
            raise ValueError(f"root: must be a path, got {self.root!r}")
        object.__setattr__(self, "root", Path(self.root))

    @property
    def manifest(self) -> Path:
        """``manifest.json``."""
        return self.root / MANIFEST_NAME

    @property
    def metadata(self) -> Path:
        """``metadata.sqlite``."""
        return self.root / "metadata.sqlite"

    @property
    def vectors_dir(self) -> Path:
        """``vectors/``."""
        return self.root / "vectors"

    def vector(self, space: str) -> Path:
        """``vectors/<space>.faiss``."""
        return self.vectors_dir / f"{_check_name(space, 'space')}.faiss"

    @property
    def arrays_dir(self) -> Path:
        """``arrays/``."""
        return self.root / "arrays"

    def array(self, name: str) -> Path:
        """``arrays/<name>.npy``."""
        return self.arrays_dir / f"{_check_name(name, 'name')}.npy"

    @property
    def head(self) -> Path:
        """``head.safetensors`` (the head parameters)."""
        return self.root / "head.safetensors"

    @property
    def lock(self) -> Path:
        """``.lock`` (held by a build in progress)."""
        return self.root / ".lock"

    def create_dirs(self) -> None:
        """Creates the run directory and its ``vectors/`` and ``arrays/`` subdirectories."""
        for d in (self.root, self.vectors_dir, self.arrays_dir):
            d.mkdir(parents=True, exist_ok=True)


def content_hash(data: bytes) -> str:
    """Returns the first 16 hex digits of the SHA-256 of ``data``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"data: must be bytes, got {type(data).__name__}")
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint_arrays(named: Iterable[tuple[str, np.ndarray]]) -> str:
    """Returns a SHA-256 hex digest over names, shapes, dtypes and bytes of arrays, sorted by name.

    Used as the model fingerprint (over ``state_dict`` items converted to numpy): the order the
    arrays come in does not matter, any change of value, shape or dtype does.

    Args:
        named: ``(name, array)`` pairs with unique names.
    """
    items: dict[str, np.ndarray] = {}
    for pair in named:
        try:
            name, arr = pair
        except (TypeError, ValueError):
            raise ValueError(f"named: items must be (name, array) pairs, got {pair!r}") from None
        if not isinstance(name, str):
            raise ValueError(f"named: names must be str, got {name!r}")
        if name in items:
            raise ValueError(f"named: duplicate name {name!r}")
        a = np.asarray(arr)
        if a.dtype.hasobject:
            raise ValueError(f"named[{name!r}]: object arrays cannot be fingerprinted")
        items[name] = a
    h = hashlib.sha256()
    for name in sorted(items):
        a = np.ascontiguousarray(items[name])
        header = f"{name}\0{a.shape}\0{a.dtype.str}\0".encode()
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        h.update(a.reshape(-1).view(np.uint8).data if a.size else b"")
    return h.hexdigest()


def verify_run(root: str | os.PathLike[str]) -> list[str]:
    """Checks that a run directory's files agree with each other.

    Checks: the manifest loads; every vector space it lists has a readable ``.faiss`` file with the
    listed ``dim`` and ``ntotal``; each space's ids equal the SQLite training ids, and so do the ids of the
    cached arrays (``arrays/train_ids.npy``); no deleted (tombstoned) id is still stored.

    Args:
        root: The run directory.

    Returns:
        One line per problem found; empty when the run is consistent.

    Raises:
        RunNotFoundError: ``root`` is not a directory.
    """
    paths = RunPaths(Path(root))
    if not paths.root.is_dir():
        raise RunNotFoundError(f"root: no run directory at {str(paths.root)!r}")
    problems: list[str] = []
    try:
        manifest = load_manifest(paths.root)
    except (StoreError, FileNotFoundError) as e:
        return [f"manifest: {e}"]

    train_ids: np.ndarray | None = None
    retired = np.zeros(0, np.int64)
    if not paths.metadata.is_file():
        problems.append(f"{paths.metadata}: missing")
    else:
        try:
            with MetadataStore(paths.metadata, create=False) as meta:
                train_ids = np.sort(meta.ids("train"))
                retired = meta.tombstones("train")
        except StoreError as e:
            problems.append(f"{paths.metadata}: {e}")
    if train_ids is not None and retired.size and np.isin(retired, train_ids).any():
        problems.append(
            f"{paths.metadata}: deleted ids still stored: {retired[np.isin(retired, train_ids)][:10].tolist()}"
        )
    array_ids_path = paths.array("train_ids")
    if train_ids is not None and array_ids_path.is_file():
        array_ids = np.sort(np.load(array_ids_path, mmap_mode="r", allow_pickle=False))
        if not np.array_equal(array_ids, train_ids):
            problems.append(
                f"{array_ids_path}: ids differ from SQLite train ids ({array_ids.size} vs {train_ids.size}; "
                f"not in SQLite: {np.setdiff1d(array_ids, train_ids)[:10].tolist()}; "
                f"not in arrays: {np.setdiff1d(train_ids, array_ids)[:10].tolist()})"
            )

    for space, spec in sorted(manifest.spaces.items()):
        try:
            path = paths.vector(space)
        except ValueError as e:
            problems.append(f"manifest space {space!r}: {e}")
            continue
        if not path.is_file():
            problems.append(f"{path}: missing (space {space!r} is listed in the manifest)")
            continue
        try:
            index = FaissVectorIndex.load(path, mmap=True)
        except StoreError as e:
            problems.append(str(e))
            continue
        if index.dim != spec.get("dim"):
            problems.append(f"{path}: dim {index.dim} != manifest dim {spec.get('dim')}")
        if index.ntotal != spec.get("ntotal"):
            problems.append(f"{path}: ntotal {index.ntotal} != manifest ntotal {spec.get('ntotal')}")
        if train_ids is not None:
            ids = np.sort(index.ids())
            if not np.array_equal(ids, train_ids):
                extra = np.setdiff1d(ids, train_ids)[:10].tolist()
                absent = np.setdiff1d(train_ids, ids)[:10].tolist()
                problems.append(
                    f"{path}: ids differ from SQLite train ids "
                    f"({ids.size} vs {train_ids.size}; not in SQLite: {extra}; not in FAISS: {absent})"
                )
    return problems
