"""Content hashes and the consistency check of a run directory (its layout: `store.layout`)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np

from store.errors import RunNotFoundError, StoreError
from store.layout import RunPaths
from store.manifest import load_manifest
from store.metadata import MetadataStore
from store.vectors import FaissVectorIndex


def content_hash(data: bytes) -> str:
    """Returns the first 16 hex digits of the SHA-256 of ``data``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"data: must be bytes, got {type(data).__name__}")
    return hashlib.sha256(data).hexdigest()[:16]


def remove_run(root: str | os.PathLike[str]) -> None:
    """Deletes a run directory (one holding a manifest); anything else is refused.

    Raises:
        RunNotFoundError: ``root`` holds no ``manifest.json``.
    """
    paths = RunPaths(Path(root))
    if not paths.manifest.is_file():
        raise RunNotFoundError(f"root: {str(paths.root)!r} is not a run directory (no manifest.json); not removed")
    shutil.rmtree(paths.root)


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
