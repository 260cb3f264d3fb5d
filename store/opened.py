"""The one read-only view of a complete run directory.

`OpenedRun` is what the facade (`api.Index`), the jobs (dumps, label noise), the query cache and incremental
updates read a run through: the manifest, the metadata store, the head parameters, the per-split arrays with
their id -> row lookups, every other declared array (loaded once, memory-mapped) and the FAISS spaces. It
writes nothing; writers go through `store.save_*` with the names of `store.layout`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from store.arrays import load_array, load_tensors
from store.errors import ConfigMismatchError, CorruptRunError, UnknownExampleError
from store.layout import RunPaths
from store.manifest import Manifest, ProjectionRecord, load_manifest
from store.metadata import MetadataStore
from store.vectors import FaissVectorIndex

HeadParams = list[dict[str, np.ndarray]]


def head_tensors(params: HeadParams) -> dict[str, np.ndarray]:
    """The flat safetensors dict ``"<layer>.<name>"`` -> array of head parameters (one dict per layer)."""
    return {f"{i}.{name}": np.ascontiguousarray(a) for i, p in enumerate(params) for name, a in p.items()}


def params_from_tensors(spec: Sequence[dict[str, Any]], tensors: dict[str, np.ndarray]) -> HeadParams:
    """Inverse of `head_tensors`: one parameter dict per layer of ``spec``."""
    params: HeadParams = [{} for _ in spec]
    for key, value in tensors.items():
        layer, name = key.split(".", 1)
        params[int(layer)][name] = value
    return params


@dataclasses.dataclass(frozen=True)
class Split:
    """The stored examples of one split: features ``[n, *feature_shape]`` (memmap), labels and ids ``[n]``."""

    name: str
    features: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @cached_property
    def _lookup(self) -> dict[int, int] | None:
        """None when ids are positions (id == row), else an id -> row dict."""
        if np.array_equal(self.ids, np.arange(len(self.ids))):
            return None
        return {int(v): i for i, v in enumerate(self.ids)}

    def rows(self, ids: Sequence[int]) -> np.ndarray:
        """Rows of example ids ``[m]`` int64.

        Raises:
            ValueError: An id is not an integer.
            UnknownExampleError: Some ids are not stored (the message lists them).
        """
        lookup, n = self._lookup, len(self.ids)
        rows, missing = [], []
        for v in ids:
            if isinstance(v, bool) or not isinstance(v, int | np.integer):
                raise ValueError(f"{self.name}_ids must be integers, got {v!r}")
            v = int(v)
            row = (v if 0 <= v < n else None) if lookup is None else lookup.get(v)
            if row is None:
                missing.append(v)
            else:
                rows.append(row)
        if missing:
            raise UnknownExampleError(f"unknown {self.name} example ids: {missing[:20]} ({n} stored)")
        return np.asarray(rows, np.int64)


class OpenedRun:
    """A complete run directory, opened read-only.

    Args:
        path: The run directory.
        fingerprint: When given, the model fingerprint the run must have been built for.

    Raises:
        RunNotFoundError / CorruptRunError / SchemaVersionError: No run, an incomplete build or a newer schema.
        ConfigMismatchError: ``fingerprint`` differs from the run's.
    """

    def __init__(self, path: str | Path, *, fingerprint: str | None = None) -> None:
        self.paths = RunPaths(Path(path))
        self.manifest: Manifest = load_manifest(self.paths.root)
        if "complete" not in self.manifest.stages:
            raise CorruptRunError(
                f"run directory {self.paths.root} is incomplete (stages done: {list(self.manifest.stages)}); "
                "run the same `influence index` / build_index again to resume it"
            )
        if fingerprint is not None and fingerprint != self.manifest.model_fingerprint:
            raise ConfigMismatchError(
                f"task= model fingerprint {fingerprint[:16]} differs from the run's "
                f"{self.manifest.model_fingerprint[:16]} ({self.paths.root}): this run was built for another model"
            )
        self._spaces: dict[str, FaissVectorIndex] = {}
        self._arrays: dict[str, np.ndarray] = {}
        # opened now, so that a corrupt run is refused at open time, not at the first query
        self.metadata = MetadataStore(self.paths.metadata, create=False)
        self.train = self._split("train")
        #: the stored test examples, None when the build had no test set
        self.test: Split | None = self._split("test") if self.manifest.task.get("n_test") else None

    # ------------------------------------------------------------------------------------ manifest fields
    @property
    def root(self) -> Path:
        return self.paths.root

    @property
    def spec(self) -> list[dict[str, Any]]:
        """The head's layer spec (`influence.head`)."""
        return self.manifest.head.spec

    @property
    def n_classes(self) -> int:
        return self.manifest.head.n_classes

    @property
    def n_params(self) -> int:
        """Parameters of the head."""
        return self.manifest.head.n_params

    @property
    def l2(self) -> float:
        """lambda of (lambda/2)|theta_head|^2 added to the mean training loss."""
        return float(self.manifest.task["l2"])

    @property
    def scope(self) -> str:
        """ "head" or "last-block": the parameters the gradient methods take influence over."""
        return str(self.manifest.task.get("scope", "head"))

    @property
    def config(self) -> dict[str, Any]:
        """The build's `indexer.IndexConfig` as stored (`manifest.methods`)."""
        return self.manifest.methods

    @property
    def projection(self) -> ProjectionRecord | None:
        """The seeded projection of head gradients, None when they are stored whole."""
        return self.manifest.projection

    @property
    def extra(self) -> dict[str, Any]:
        return self.manifest.extra

    @cached_property
    def params(self) -> HeadParams:
        """The head's parameters, one dict per layer (`head.safetensors`)."""
        return params_from_tensors(self.spec, load_tensors(self.paths.head))

    def info(self) -> dict[str, Any]:
        """What the run holds, as plain JSON (`Index.info`, `influence info`)."""
        m = self.manifest
        return {
            "path": str(self.root),
            "schema_version": m.schema_version,
            "model_fingerprint": m.model_fingerprint,
            "task": m.task,
            "head": {"n_classes": self.n_classes, "n_params": self.n_params, "layers": [s["kind"] for s in self.spec]},
            "projection": m.to_dict()["projection"],
            "spaces": m.spaces,
            "stages": list(m.stages),
            "extra": m.extra,
        }

    # ---------------------------------------------------------------------------------------- contents
    def has(self, name: str) -> bool:
        """Whether the declared array ``name`` was written by this run's build."""
        return self.paths.array(name).exists()

    def array(self, name: str) -> np.ndarray:
        """The declared array ``name``, memory-mapped and loaded once."""
        if name not in self._arrays:
            self._arrays[name] = load_array(self.paths.array(name))
        return self._arrays[name]

    def _split(self, name: str) -> Split:
        return Split(
            name=name,
            features=self.array(f"{name}_features"),
            labels=np.asarray(self.array(f"{name}_labels")),
            ids=np.asarray(self.array(f"{name}_ids")),
        )

    def space(self, name: str) -> FaissVectorIndex:
        """The FAISS index of a vector space, memory-mapped when large next to the available memory."""
        if name not in self._spaces:
            self._spaces[name] = FaissVectorIndex.load(self.paths.vector(name), mmap="auto")
        return self._spaces[name]

    def close(self) -> None:
        self.metadata.close()

    def __enter__(self) -> OpenedRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OpenedRun({str(self.paths.root)!r})"
