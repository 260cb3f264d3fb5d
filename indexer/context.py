"""What a build stage is handed (`BuildContext`) and what it hands back (`ManifestPatch`).

A stage (`indexer.stages`) is a function ``BuildContext -> ManifestPatch``: it reads the run directory's files and
the context, writes its own artifacts, and returns what the manifest gains. The loop (`indexer.stages.run_stages`)
applies the patch, in a build together with the stage's mark, once the artifacts are on disk.
"""

from __future__ import annotations

import dataclasses
import math
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import influence as inf
from store import ChunkedArray, Manifest, OpenedRun, RunPaths, load_array
from store.arrays import replace_array

from .config import IndexConfig

if TYPE_CHECKING:
    from .task import Task


@dataclasses.dataclass(frozen=True)
class ManifestPatch:
    """What a stage adds to the manifest besides its stage mark.

    Attributes:
        spaces: Vector spaces the stage wrote (name -> `store.build_vector_index` record), merged into
            ``manifest.spaces``.
        extra: Entries merged into ``manifest.extra``.
        drop: Keys of ``manifest.extra`` that no longer hold (a staleness note the stage resolved, a record of
            an option the recomputation did not use).
    """

    spaces: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    drop: tuple[str, ...] = ()

    def apply(self, manifest: Manifest) -> Manifest:
        """The manifest with this patch applied (stages unchanged)."""
        extra = {k: v for k, v in {**manifest.extra, **self.extra}.items() if k not in self.drop}
        return dataclasses.replace(manifest, spaces={**manifest.spaces, **self.spaces}, extra=extra)


@dataclasses.dataclass(eq=False)
class BuildContext:
    """Everything a stage reads besides the run directory's files.

    Attributes:
        paths: The run directory.
        config: The build's `IndexConfig`.
        manifest: The manifest as the stages run so far left it (`run_stages` applies each stage's patch).
        spec: The head's layer spec (`influence.head`).
        params: The head's parameters, one dict of numpy arrays per layer.
        l2: lambda of (lambda/2)|theta_head|^2 in the model's objective.
        task: The Task (model, datasets); None when an update re-runs stages without the model
            (`delete_examples`): only stages that do not read "task" run then.
        progress: Show progress bars.
        rerun: False in a build: a stage resumes what a killed attempt left (chunked arrays keep their done
            chunks). True when an incremental update (`indexer.update`) re-runs a recorded stage on a changed
            training set: everything is recomputed and each array replaced atomically.
        refit_representer: With rerun, whether the representer stage refits Theta* (warm-started from the
            stored one) or keeps it and recomputes every alpha_i in closed form.
        distributed: The chunked per-example stages run as shards on the connected Ray cluster
            (`indexer.shards`); False: in this process.
    """

    paths: RunPaths
    config: IndexConfig
    manifest: Manifest
    spec: list[dict[str, Any]]
    params: list[dict[str, np.ndarray]]
    l2: float
    task: Task | None = None
    progress: bool = True
    rerun: bool = False
    refit_representer: bool = True
    distributed: bool = False

    @classmethod
    def for_update(
        cls, run: OpenedRun, *, task: Task | None, progress: bool = False, refit_representer: bool = True
    ) -> BuildContext:
        """The context of an incremental update re-running stages of the complete run ``run``."""
        return cls(
            paths=run.paths,
            config=IndexConfig.from_stored(run.config),
            manifest=run.manifest,
            spec=run.spec,
            params=run.params,
            l2=run.l2,
            task=task,
            progress=progress,
            rerun=True,
            refit_representer=refit_representer,
        )

    # ------------------------------------------------------------------------------------------- the head
    @cached_property
    def head(self) -> inf.Head:
        """The head as one object: logits, per-example gradients, curvature products."""
        return inf.Head(self.spec, self.params)

    @property
    def n_classes(self) -> int:
        return self.manifest.head.n_classes

    @property
    def n_params(self) -> int:
        return self.manifest.head.n_params

    # ------------------------------------------------------------------------------------- stored arrays
    @property
    def has_test(self) -> bool:
        """Whether the run stores test examples."""
        return int(self.manifest.task.get("n_test", 0)) > 0

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(features [n, *feature_shape] memory-mapped, labels [n]) of a split, as stored."""
        return (
            load_array(self.paths.split_array(split, "features")),
            np.asarray(load_array(self.paths.split_array(split, "labels"))),
        )

    def ids(self, split: str) -> np.ndarray:
        """The example ids of a split's rows [n] int64, as stored (after the "metadata" stage)."""
        return np.asarray(load_array(self.paths.split_array(split, "ids")))

    def chunked(self, path: Path, *, shape: tuple[int, ...], dtype: Any, chunk_rows: int) -> ChunkedArray | Rewrite:
        """The array at ``path`` (a `RunPaths` accessor's) written in chunks: resumable in a build (a killed
        attempt's done chunks are kept), rewritten whole in a rerun."""
        if self.rerun:
            return Rewrite(path, shape=shape, dtype=dtype, chunk_rows=chunk_rows)
        return ChunkedArray.open_or_create(path, shape=shape, dtype=dtype, chunk_rows=chunk_rows)


class Rewrite:
    """`store.ChunkedArray`'s interface over an array in memory, saved whole when closed.

    What a chunked stage writes when an update re-runs it: there is nothing to resume (every chunk is missing),
    and the old file is replaced atomically (`store.arrays.replace_array`), so a reader never sees a half-written
    array.
    """

    def __init__(self, path: Any, *, shape: tuple[int, ...], dtype: Any, chunk_rows: int) -> None:
        self.path, self.chunk_rows = path, int(chunk_rows)
        self._data = np.zeros(shape, dtype)

    @property
    def n_chunks(self) -> int:
        return math.ceil(self._data.shape[0] / self.chunk_rows)

    def missing_chunks(self) -> list[int]:
        return list(range(self.n_chunks))

    def chunk_slice(self, i: int) -> slice:
        start = i * self.chunk_rows
        return slice(start, min(start + self.chunk_rows, self._data.shape[0]))

    def write_chunk(self, i: int, data: np.ndarray) -> None:
        arr = np.asarray(data)
        if np.issubdtype(arr.dtype, np.inexact) and not np.isfinite(arr).all():
            raise ValueError(f"data: chunk {i} contains NaN or infinity")
        self._data[self.chunk_slice(i)] = arr

    def array(self) -> np.ndarray:
        return self._data

    def close(self) -> None:
        replace_array(self.path, self._data)
