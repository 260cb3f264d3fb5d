"""Vector spaces: one inner-product index per embedding space, whose ids are the example ids.

Every scorer in this project is an inner product between a query-side vector and stored train-side
vectors, so a search returns the training examples with the highest (proponents) or lowest (opponents)
scores. :class:`NumpyVectorIndex` is the brute-force reference for tests and tiny runs;
:class:`FaissVectorIndex` is the fast one, stored as ``vectors/<space>.faiss``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import faiss
import numpy as np

from influence.topk import topk_both_signs
from store.atomic import atomic_path
from store.errors import CorruptRunError, RunNotFoundError


@dataclasses.dataclass(frozen=True)
class Hits:
    """One query's search results, best first.

    Attributes:
        ids: Example ids, int64 ``[k]``.
        scores: Inner products, float32 ``[k]``, aligned with ``ids``.
    """

    ids: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids)
        scores = np.asarray(self.scores)
        if ids.ndim != 1 or scores.ndim != 1 or ids.shape != scores.shape:
            raise ValueError(f"ids, scores: must be 1-D of equal length, got shapes {ids.shape}, {scores.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids: must be integers, got dtype {ids.dtype}")
        ids = np.array(ids, dtype=np.int64)
        scores = np.array(scores, dtype=np.float32)
        ids.flags.writeable = False
        scores.flags.writeable = False
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "scores", scores)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """Returns ``{"ids": [...], "scores": [...]}`` with Python numbers."""
        return {"ids": self.ids.tolist(), "scores": self.scores.tolist()}


@runtime_checkable
class VectorIndex(Protocol):
    """An inner-product index over vectors keyed by int64 example ids."""

    @property
    def dim(self) -> int:
        """Vector dimension ``d``."""
        ...

    @property
    def ntotal(self) -> int:
        """Number of stored vectors."""
        ...

    def search(self, queries: np.ndarray, k: int) -> list[Hits]:
        """Returns, per query row, the ``k`` stored vectors with the highest inner product, best first."""
        ...

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Stores ``vectors`` ``[n, d]`` under ``ids`` ``[n]``."""
        ...

    def ids(self) -> np.ndarray:
        """Returns the stored ids, int64 ``[ntotal]``, in insertion order."""
        ...


def check_vectors(x: Any, name: str, dim: int) -> np.ndarray:
    """Validates a float matrix ``[n, dim]`` and returns it as C-contiguous float32.

    float64 is converted (a copy); any other dtype is refused. NaN and infinity are refused.

    Args:
        x: The array to check.
        name: The argument name used in error messages.
        dim: The required number of columns.

    Raises:
        ValueError: Naming ``name`` and the offending shape, dtype or values.
    """
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name}: must be 2-D [n, {dim}], got shape {arr.shape}")
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    elif arr.dtype != np.float32:
        raise ValueError(f"{name}: must be float32 (or float64, converted), got dtype {arr.dtype}")
    if arr.shape[1] != dim:
        raise ValueError(f"{name}: must have {dim} columns, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite)[:10].tolist()
        raise ValueError(f"{name}: contains NaN or infinity in rows {rows}")
    return arr


def check_ids(ids: Any, name: str, n: int | None = None) -> np.ndarray:
    """Validates ``n`` (None: any number of) unique non-negative integer ids; returns them as C-contiguous int64."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{name}: must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: must be integers (int64), got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name}: must have {n} entries (one per vector), got {arr.shape[0]}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name}: must be >= 0, got {arr[arr < 0][:10].tolist()}")
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{name}: must be unique, duplicated {uniq[counts > 1][:10].tolist()}")
    return arr


def check_k(k: Any) -> int:
    """Validates the number of results ``k`` (an int >= 1)."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ValueError(f"k: must be an int >= 1, got {k!r}")
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k!r}")
    return int(k)


def _check_new_ids(ids: np.ndarray, present: np.ndarray, name: str) -> None:
    clash = np.intersect1d(ids, present)
    if clash.size:
        raise ValueError(f"{name}: already in the index: {clash[:10].tolist()}")


def _check_dim(dim: Any) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
        raise ValueError(f"dim: must be an int >= 1, got {dim!r}")
    return int(dim)


class NumpyVectorIndex:
    """Brute-force reference index for tests and tiny runs (everything in memory).

    Search ranks by the float64 inner product; ties go to the smaller id.

    Args:
        dim: Vector dimension ``d``.
    """

    def __init__(self, dim: int) -> None:
        self._dim = _check_dim(dim)
        self._vectors = np.zeros((0, self._dim), dtype=np.float32)
        self._ids = np.zeros((0,), dtype=np.int64)

    def __repr__(self) -> str:
        return f"NumpyVectorIndex(dim={self._dim}, ntotal={self.ntotal})"

    @property
    def dim(self) -> int:
        """Vector dimension ``d``."""
        return self._dim

    @property
    def ntotal(self) -> int:
        """Number of stored vectors."""
        return int(self._ids.shape[0])

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Stores ``vectors`` ``[n, d]`` under ``ids`` ``[n]`` (unique, not yet present)."""
        x = check_vectors(vectors, "vectors", self._dim)
        id_arr = check_ids(ids, "ids", x.shape[0])
        _check_new_ids(id_arr, self._ids, "ids")
        self._vectors = np.concatenate([self._vectors, x])
        self._ids = np.concatenate([self._ids, id_arr])

    def ids(self) -> np.ndarray:
        """Returns the stored ids, int64 ``[ntotal]``, in insertion order."""
        return self._ids.copy()

    def search(self, queries: np.ndarray, k: int) -> list[Hits]:
        """Returns, per query row, the ``k`` highest inner products, best first.

        Args:
            queries: float32 ``[m, d]``.
            k: Results per query (>= 1); clipped to ``ntotal``.
        """
        q = check_vectors(queries, "queries", self._dim)
        k = min(check_k(k), self.ntotal)
        if k == 0:
            return [Hits(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in range(q.shape[0])]
        scores = q.astype(np.float64) @ self._vectors.astype(np.float64).T
        out = []
        for row in scores:
            order = np.lexsort((self._ids, -row))[:k]
            out.append(Hits(self._ids[order], row[order]))
        return out


class FaissVectorIndex:
    """A FAISS inner-product index wrapped in ``IndexIDMap2`` so FAISS ids are example ids.

    Build with :meth:`create` (or :meth:`load`), not the constructor.

    Args:
        index: A ``faiss.IndexIDMap2`` with inner-product metric.
        read_only: Whether the index is memory-mapped read-only (``add`` and ``train`` refused).
    """

    def __init__(self, index: Any, *, read_only: bool = False) -> None:
        if not isinstance(index, faiss.IndexIDMap2):
            raise ValueError(f"index: must be a faiss.IndexIDMap2, got {type(index).__name__}")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"index: must use the inner-product metric, got metric_type {index.metric_type}")
        self._index = index
        self._read_only = read_only

    @classmethod
    def create(cls, dim: int, *, factory: str = "Flat") -> FaissVectorIndex:
        """Creates an empty inner-product index.

        Args:
            dim: Vector dimension ``d``.
            factory: ``"Flat"`` for exact search (``IndexFlatIP``), or any FAISS factory string (e.g.
                ``"IVF1024,Flat"``, ``"IVF256,PQ32"``); those may need :meth:`train` before :meth:`add`.
        """
        dim = _check_dim(dim)
        if not isinstance(factory, str) or not factory.strip():
            raise ValueError(f"factory: must be a non-empty FAISS factory string, got {factory!r}")
        inner: Any
        if factory == "Flat":
            inner = faiss.IndexFlatIP(dim)
        else:
            try:
                inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as e:
                raise ValueError(f"factory: FAISS cannot build {factory!r}: {e}") from e
        index = faiss.IndexIDMap2(inner)
        # IndexIDMap2 does not own `inner` by default; keep it alive with the wrapper.
        index.own_fields = True
        inner.this.disown()
        return cls(index)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, mmap: bool | str = False) -> FaissVectorIndex:
        """Reads an index written by :meth:`save`.

        Args:
            path: The ``.faiss`` file.
            mmap: Memory-map the file read-only instead of reading it into memory; ``"auto"`` does so when
                the file is larger than :data:`MMAP_FRACTION` of the memory available now.

        Raises:
            RunNotFoundError: The file does not exist.
            CorruptRunError: The file is not a readable FAISS ``IndexIDMap2`` inner-product index.
        """
        p = Path(path)
        if not p.is_file():
            raise RunNotFoundError(f"path: no vector index at {str(p)!r}")
        if mmap == "auto":
            available = _available_memory()
            mmap = available is not None and p.stat().st_size > MMAP_FRACTION * available
        elif not isinstance(mmap, bool):
            raise ValueError(f"mmap: must be True, False or 'auto', got {mmap!r}")
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            index = faiss.read_index(str(p), flags)
        except RuntimeError as e:
            raise CorruptRunError(f"{p}: not a readable FAISS index ({_first_line(e)})") from e
        try:
            return cls(index, read_only=mmap)
        except ValueError as e:
            raise CorruptRunError(f"{p}: {e}") from e

    def __repr__(self) -> str:
        inner = type(self._index.index).__name__
        return f"FaissVectorIndex(dim={self.dim}, ntotal={self.ntotal}, index={inner})"

    @property
    def faiss_index(self) -> Any:
        """The wrapped ``faiss.IndexIDMap2`` (for tuning; prefer the methods of this class)."""
        return self._index

    @property
    def dim(self) -> int:
        """Vector dimension ``d``."""
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        """Number of stored vectors."""
        return int(self._index.ntotal)

    @property
    def is_trained(self) -> bool:
        """Whether the index can accept vectors (always true for ``Flat``)."""
        return bool(self._index.is_trained)

    def set_nprobe(self, nprobe: int) -> None:
        """Sets how many IVF lists a search visits (higher: better recall, slower).

        Raises:
            ValueError: The index is not an IVF index, or ``nprobe`` < 1.
        """
        if isinstance(nprobe, bool) or not isinstance(nprobe, int | np.integer) or nprobe < 1:
            raise ValueError(f"nprobe: must be an int >= 1, got {nprobe!r}")
        try:
            ivf = faiss.extract_index_ivf(self._index.index)
        except RuntimeError:
            ivf = None
        if ivf is None:
            raise ValueError(f"nprobe: the index {type(self._index.index).__name__} is not an IVF index")
        ivf.nprobe = int(nprobe)

    def _check_writable(self) -> None:
        if self._read_only:
            raise ValueError("index is memory-mapped read-only; load it with mmap=False to modify it")

    def train(self, vectors: np.ndarray) -> None:
        """Trains an approximate index (IVF centroids, PQ codebooks) on sample vectors ``[n, d]``."""
        self._check_writable()
        x = check_vectors(vectors, "vectors", self.dim)
        try:
            ivf = faiss.downcast_index(faiss.extract_index_ivf(self._index.index))
        except RuntimeError:
            ivf = None
        if ivf is not None and hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False  # only serves Hamming pre-filtering, which is not used; slow
        self._index.train(x)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Stores ``vectors`` ``[n, d]`` under ``ids`` ``[n]`` (unique, non-negative, not yet present).

        Raises:
            ValueError: Bad vectors or ids (named), or the index needs :meth:`train` first.
        """
        self._check_writable()
        x = check_vectors(vectors, "vectors", self.dim)
        id_arr = check_ids(ids, "ids", x.shape[0])
        if not self.is_trained:
            raise ValueError("vectors: the index must be trained (call train) before add")
        _check_new_ids(id_arr, self.ids(), "ids")
        if x.shape[0]:
            self._index.add_with_ids(x, id_arr)

    def ids(self) -> np.ndarray:
        """Returns the stored ids, int64 ``[ntotal]``, in insertion order."""
        return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)

    @property
    def mergeable(self) -> bool:
        """Whether parts of this index filled separately can be merged (`merge_parts`): IVF indexes (FAISS's
        recipe for indexes built in pieces: train once, add each piece to a copy, merge the inverted lists)."""
        try:
            faiss.extract_index_ivf(self._index.index)
        except RuntimeError:
            return False
        return True

    def to_bytes(self) -> np.ndarray:
        """The index serialized by FAISS (uint8 [size]), to ship to another process; `from_bytes` reads it."""
        return faiss.serialize_index(self._index)

    @classmethod
    def from_bytes(cls, data: np.ndarray) -> FaissVectorIndex:
        """The index `to_bytes` serialized."""
        return cls(faiss.deserialize_index(np.asarray(data, np.uint8)))

    def merge_parts(self, parts: Sequence[FaissVectorIndex]) -> None:
        """Appends `parts` (copies of this trained index, each filled with other vectors and ids) in order.

        The result is byte-identical to adding the parts' vectors to this index in the same order: the inverted
        lists are merged with the inner ids shifted (FAISS ``IndexIVF.merge_from``), then the id map appended
        once. (FAISS's own ``IndexIDMap2.merge_from`` does not shift the inner ids and mislabels the hits.)

        Raises:
            ValueError: The index is not `mergeable`, a part has another dimension, or ids repeat.
        """
        self._check_writable()
        if not self.mergeable:
            raise ValueError(f"index: a {self._index.index.__class__.__name__} cannot merge parts (IVF only)")
        all_ids = [self.ids()]
        for i, part in enumerate(parts):
            if part.dim != self.dim:
                raise ValueError(f"parts[{i}]: dimension {part.dim}, expected {self.dim}")
            all_ids.append(part.ids())
        ids = np.concatenate(all_ids)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("parts: ids repeat across parts (or with this index)")
        for part in parts:
            self._index.index.merge_from(part._index.index, self._index.ntotal)
            self._index.ntotal += part.ntotal
        faiss.copy_array_to_vector(ids, self._index.id_map)
        self._index.construct_rev_map()

    def flat_vectors(self) -> np.ndarray | None:
        """The stored vectors ``[ntotal, d]`` of an exact ``Flat`` index as a zero-copy float32 view, else None.

        Rows are aligned with :meth:`ids`. The view is valid while this object lives and is not modified.
        """
        inner = faiss.downcast_index(self._index.index)
        if type(inner) is not faiss.IndexFlatIP or self.ntotal == 0:
            return None
        n, d = self.ntotal, self.dim
        return faiss.rev_swig_ptr(inner.get_xb(), n * d).reshape(n, d)

    @property
    def read_only(self) -> bool:
        """Whether the index is memory-mapped read-only."""
        return self._read_only

    @property
    def supports_remove(self) -> bool:
        """Whether :meth:`remove` works on this index type (HNSW graphs cannot drop vectors)."""
        return "HNSW" not in type(faiss.downcast_index(self._index.index)).__name__

    def remove(self, ids: np.ndarray) -> int:
        """Removes the vectors of ``ids`` (each must be stored); returns how many were removed.

        Raises:
            ValueError: Unknown ids, a read-only index, or an index type that cannot remove (HNSW: rebuild it).
        """
        self._check_writable()
        arr = check_ids(ids, "ids", len(np.asarray(ids).reshape(-1)))
        missing = np.setdiff1d(arr, self.ids())
        if missing.size:
            raise ValueError(f"ids: not in the index: {missing[:10].tolist()}")
        if not self.supports_remove:
            raise ValueError(f"ids: {type(faiss.downcast_index(self._index.index)).__name__} cannot remove vectors")
        if not arr.size:
            return 0
        return int(self._index.remove_ids(faiss.IDSelectorBatch(arr)))

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Returns the stored vectors of ``ids`` as float32 ``[n, d]`` (lossy for PQ indexes).

        Raises:
            ValueError: Some ids are not stored.
        """
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"ids: must be a 1-D integer array, got {arr.dtype} {arr.shape}")
        missing = np.setdiff1d(arr, self.ids())
        if missing.size:
            raise ValueError(f"ids: not in the index: {missing[:10].tolist()}")
        return (
            np.stack([self._index.reconstruct(int(i)) for i in arr])
            if arr.size
            else (np.zeros((0, self.dim), np.float32))
        )

    def search(self, queries: np.ndarray, k: int) -> list[Hits]:
        """Returns, per query row, the ``k`` highest inner products, best first.

        Args:
            queries: float32 ``[m, d]``.
            k: Results per query (>= 1); clipped to ``ntotal``.
        """
        q = check_vectors(queries, "queries", self.dim)
        k = min(check_k(k), self.ntotal)
        if k == 0 or q.shape[0] == 0:
            return [Hits(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in range(q.shape[0])]
        scores, labels = self._index.search(q, k)
        out = []
        for row_scores, row_ids in zip(scores, labels, strict=True):
            keep = row_ids != -1
            out.append(Hits(row_ids[keep], row_scores[keep]))
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the index to ``path`` atomically (parent directories are created)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(p) as tmp:
            faiss.write_index(self._index, str(tmp))


def search_both_signs(index: VectorIndex, queries: np.ndarray, k: int) -> tuple[list[Hits], list[Hits]]:
    """Returns the ``k`` highest and the ``k`` lowest inner products per query.

    Args:
        index: Any :class:`VectorIndex`.
        queries: float32 ``[m, d]``.
        k: Results per query and per sign (>= 1).

    Returns:
        ``(proponents, opponents)``: per query, the highest scores (highest first) and the lowest scores
        (lowest first). Opponent scores are the true inner products, not negated.
    """
    q = check_vectors(queries, "queries", index.dim)
    if isinstance(index, FaissVectorIndex) and q.shape[0] <= ONE_PASS_MAX_QUERIES:
        flat = index.flat_vectors()
        if flat is not None:
            return _both_signs_one_pass(flat, index.ids(), q, min(check_k(k), index.ntotal))
    top = index.search(q, k)
    bottom = index.search(-q, k)
    return top, [Hits(h.ids, -h.scores) for h in bottom]


#: up to this many queries, exact flat indexes answer both signs from one pass over the vectors
ONE_PASS_MAX_QUERIES = 16


def _both_signs_one_pass(flat: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> tuple[list[Hits], list[Hits]]:
    """Both signs of an exact search from one read of the stored vectors: ``S = X q^T`` then top/bottom-k.

    A search is bound by reading the vectors from memory, and ``search(q)`` plus ``search(-q)`` would read
    them twice; the highest and the lowest inner products come from the same scores. Ties go to the smaller id (`influence.topk`, the one top-k kernel).
    """
    if k == 0:
        empty = [Hits(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in range(q.shape[0])]
        return empty, list(empty)
    scores = q @ flat.T  # [m, n], one pass over the stored vectors (BLAS)
    (top_s, top_i), (bot_s, bot_i) = topk_both_signs(scores, ids, k)
    return [Hits(i, s) for i, s in zip(top_i, top_s, strict=True)], [
        Hits(i, s) for i, s in zip(bot_i, bot_s, strict=True)
    ]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


#: ``load(mmap="auto")`` memory-maps files larger than this fraction of the currently available memory
MMAP_FRACTION = 0.25
#: recall@k measured at build time for approximate indexes, and the recall they are tuned to reach
RECALL_K = 10
RECALL_TARGET = 0.95
_NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def resolve_factory(factory: str, n: int) -> str:
    """Fills in the IVF list count of a factory string written without one.

    ``"IVF,Flat"``, ``"IVF,PQ32"`` or ``"IVF,SQfp16"`` become ``IVF<nlist>,...`` with
    ``nlist = clip(4 sqrt(n), 1, n / 39)`` (FAISS wants >= 39 training points per list); other strings
    (``"Flat"``, ``"SQfp16"``, ``"HNSW32"``, ``"IVF1024,PQ32"``) are returned unchanged.

    Args:
        factory: A FAISS index factory string.
        n: Number of vectors the index will hold.
    """
    if not isinstance(factory, str) or not factory.strip():
        raise ValueError(f"factory: must be a non-empty FAISS factory string, got {factory!r}")
    if factory.startswith("IVF,"):
        nlist = int(max(1, min(4 * np.sqrt(max(n, 1)), max(n, 1) // 39)))
        return f"IVF{nlist}," + factory[len("IVF,") :]
    return factory


def compute_recall(exact: np.ndarray, approx: np.ndarray) -> float:
    """Mean recall@k: the fraction of each row of ``exact`` ids ``[m, k]`` found in the same row of ``approx``."""
    exact = np.asarray(exact)
    approx = np.asarray(approx)
    if exact.ndim != 2 or approx.ndim != 2 or exact.shape[0] != approx.shape[0]:
        raise ValueError(f"exact, approx: must be [m, k] id arrays, got shapes {exact.shape}, {approx.shape}")
    if exact.size == 0:
        return 1.0
    hits = [
        np.intersect1d(e[e >= 0], a[a >= 0]).size / max((e >= 0).sum(), 1) for e, a in zip(exact, approx, strict=True)
    ]
    return float(np.mean(hits))


def exact_neighbours(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the ``k`` highest inner products per query by brute force (FAISS ``knn``), ``[m, k]``."""
    x = check_vectors(vectors, "vectors", np.asarray(vectors).shape[-1])
    q = check_vectors(queries, "queries", x.shape[1])
    _, rows = faiss.knn(q, x, min(check_k(k), x.shape[0]), metric=faiss.METRIC_INNER_PRODUCT)
    return np.where(rows >= 0, np.asarray(ids, np.int64)[np.maximum(rows, 0)], -1)


def measure_recall(index: FaissVectorIndex, queries: np.ndarray, exact: np.ndarray, k: int = RECALL_K) -> float:
    """Recall@k of ``index`` for ``queries`` against the exact neighbour ids ``exact`` ``[m, k]``."""
    approx = np.stack([np.pad(h.ids, (0, k - len(h)), constant_values=-1) for h in index.search(queries, k)])
    return compute_recall(exact, approx)


def build_vector_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    *,
    factory: str = "Flat",
    recall_k: int = RECALL_K,
    recall_target: float = RECALL_TARGET,
    n_queries: int = 256,
    seed: int = 0,
    max_train: int | None = None,
    add: Callable[[FaissVectorIndex, np.ndarray, np.ndarray], None] | None = None,
) -> tuple[FaissVectorIndex, dict[str, Any]]:
    """Builds a FAISS index of ``vectors`` under ``ids``; approximate ones are tuned and their recall measured.

    For an approximate factory (anything but ``"Flat"``) the index is trained on ``vectors``, filled, and its
    search breadth (IVF ``nprobe``, HNSW ``efSearch``) raised until recall@k over both signs of ``n_queries``
    sample stored vectors, against exact inner-product search, reaches ``recall_target`` (or the breadth is
    exhausted). FAISS saves that breadth with the index.

    Returns:
        ``(index, spec)`` with ``spec`` the manifest entry: ``dim``, ``ntotal``, ``factory`` (resolved),
        ``metric``, ``recall@<k>`` (1.0 for ``Flat``), ``recall_queries`` and ``nprobe`` / ``ef_search``.
        ``max_train`` caps the vectors used to train IVF centroids / PQ codebooks (a random sample).
        ``add(index, vectors, ids)`` fills the trained index with ``vectors`` under ``ids`` in that order another
        way (a distributed build adds shards on its workers and merges them, `FaissVectorIndex.merge_parts`);
        None: ``index.add`` here.
    """
    if np.ndim(vectors) != 2:
        raise ValueError(f"vectors: must be 2-D [n, d], got shape {np.shape(vectors)}")
    x = check_vectors(vectors, "vectors", np.shape(vectors)[1])
    id_arr = check_ids(ids, "ids", x.shape[0])
    resolved = resolve_factory(factory, x.shape[0])
    index = FaissVectorIndex.create(x.shape[1], factory=resolved)
    rng = np.random.default_rng(seed)
    if not index.is_trained:
        # k-means / PQ training on a random sample when max_train is set (cost ~ sample x lists x d)
        sample_rows = (
            None if max_train is None or max_train >= x.shape[0] else rng.choice(x.shape[0], max_train, replace=False)
        )
        index.train(x if sample_rows is None else x[np.sort(sample_rows)])
    if add is None:
        index.add(x, id_arr)
    else:
        add(index, x, id_arr)
        if index.ntotal != x.shape[0] or not np.array_equal(index.ids(), id_arr):
            raise RuntimeError(f"add: filled the index with {index.ntotal} vectors, not the {x.shape[0]} given")
    spec: dict[str, Any] = {"dim": int(x.shape[1]), "ntotal": int(x.shape[0]), "factory": resolved, "metric": "ip"}
    key = f"recall@{recall_k}"
    if resolved == "Flat" or x.shape[0] == 0:
        spec[key] = 1.0
        return index, spec
    sample = x[rng.choice(x.shape[0], size=min(n_queries, x.shape[0]), replace=False)]
    queries = np.concatenate([sample, -sample])
    exact = exact_neighbours(x, id_arr, queries, recall_k)
    inner = faiss.downcast_index(index.faiss_index.index)
    knob: str | None
    if hasattr(inner, "hnsw"):
        knob, values = "ef_search", [v for v in _EF_SEARCH if v >= recall_k] or [recall_k]
    else:
        try:
            ivf = faiss.extract_index_ivf(inner)
        except RuntimeError:
            ivf = None
        knob, values = ("nprobe", [v for v in _NPROBES if v <= ivf.nlist] + [ivf.nlist]) if ivf else (None, [0])
    recall = 0.0
    for value in dict.fromkeys(values):
        if knob == "ef_search":
            inner.hnsw.efSearch = int(value)  # type: ignore[attr-defined]  # an IndexHNSW (checked above)
        elif knob == "nprobe":
            index.set_nprobe(int(value))
        recall = measure_recall(index, queries, exact, recall_k)
        if recall >= recall_target:
            break
    if knob is not None:
        spec[knob] = int(value)
    spec[key] = recall
    spec["recall_queries"] = int(queries.shape[0])
    return index, spec
