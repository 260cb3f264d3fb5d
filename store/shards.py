"""Shard files of a distributed build: chunks of per-example arrays computed by workers on other processes/nodes.

A worker of a distributed build (`indexer.shards`) writes the chunk it computed as ``shards/<array>/NNNNN.npz``
in the run directory (on storage every node sees), atomically: the file's existence is the shard's done-mark. The
driver alone commits shards into the run's arrays (`store.ChunkedArray`, its own done mask) and then removes the
shard directory, so the run's arrays, SQLite and manifest keep one writer. A shard a killed driver left on disk
is committed when the build resumes, without recomputing it; a shard a killed worker never finished is simply
absent and is computed again.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np

from store.atomic import atomic_path
from store.errors import CorruptRunError
from store.layout import RunPaths


class ShardFiles:
    """The shard files of one declared array (``name``) of a run directory.

    Args:
        paths: The run directory.
        name: The declared array (`store.layout.ARRAYS`) whose chunks the shards hold.
    """

    def __init__(self, paths: RunPaths, name: str) -> None:
        self.paths, self.name = paths, name
        self.dir = paths.shard(name, 0).parent

    def path(self, chunk: int) -> Path:
        """``shards/<name>/NNNNN.npz``."""
        return self.paths.shard(self.name, int(chunk))

    def exists(self, chunk: int) -> bool:
        """Whether chunk ``chunk`` is on disk (its done-mark)."""
        return self.path(chunk).is_file()

    def write(self, chunk: int, arrays: dict[str, np.ndarray]) -> Path:
        """Writes one chunk's arrays (numeric or unicode, no objects) atomically; returns its path."""
        clean = {}
        for key, value in arrays.items():
            a = np.asarray(value)
            if a.dtype.hasobject:
                raise ValueError(f"arrays[{key!r}]: object arrays cannot be stored in a shard")
            clean[key] = a
        path = self.path(chunk)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **clean)  # type: ignore[arg-type]  # numpy stubs
        return path

    def read(self, chunk: int) -> dict[str, np.ndarray]:
        """The arrays of chunk ``chunk``.

        Raises:
            CorruptRunError: The shard is missing or not a readable ``.npz`` file.
        """
        path = self.path(chunk)
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: np.array(z[k]) for k in z.files}
        except (OSError, ValueError, EOFError) as e:
            raise CorruptRunError(f"{path}: not a readable shard ({e})") from e

    def remove(self) -> None:
        """Removes every shard of the array (after the driver committed them), and ``shards/`` when empty."""
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.paths.shards_dir.rmdir()


__all__ = ["ShardFiles"]
