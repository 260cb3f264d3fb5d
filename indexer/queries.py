"""Build stage "queries": LiSSA inverse-HVPs of every stored test example, solved once, all at once.

For a stored test example q the LiSSA query vector s_q = (C + l2 I + dI)^-1 g_q depends only on the run (head,
training features, curvature arrays, LiSSA options) and on the class explained, so with
`IndexConfig(cache_queries=True)` the build solves it for every stored test example at its predicted class
(the default target of `explain`) and stores S [n_test, p] in `arrays/query_solutions.npy`.
`Index.explain(test_ids=..., method="lissa")` then reads s_q instead of running LiSSA: the answer costs a
gradient, one FAISS search and the re-scoring (milliseconds), not `depth` curvature products over the whole
training set.

The solve is the same deflated LiSSA recursion (`influence.solve_lissa`: same damping, scale, depth, deflation
pairs and divergence guard) as the query path, run on blocks of `BLOCK_ROWS` right-hand sides at once, so that a
curvature product serves a whole block: one GEMM-shaped pass instead of a memory-bound pass per query. The
operator is

- "dense": A = Q diag(lam) Q^T rebuilt from the stored eigendecomposition, when the head is small enough to
  have one (`exact_max_params`): a product costs p^2 per right-hand side instead of a pass over n training
  rows; A equals the training-set product up to float rounding (it was computed from it);
- "data": the same `make_head_matvec` over all cached training features as `Index.matvec` otherwise.

Both are the same matrix, so the cached vectors equal the un-cached LiSSA answers up to float rounding (checked
against the query path and the dense solve in tests/test_query_cache.py).

The cache is used only while it still describes the run: `query_cache_key` hashes what the solution depends on
(training ids and labels, the curvature eigenvalues, l2, damping, LiSSA options); an incremental update that
adds or deletes training examples, a refreshed curvature, or an `open_index(..., lissa=...)` with other options
gives another key and `explain` falls back to solving. Explaining another class than the stored prediction
(`targets=`) and raw `inputs=` always solve at query time.

Resumable: solutions are written in chunks with a done-mask (`store.ChunkedArray`); the stage is recorded in the
manifest only when every chunk is on disk.

Reference: Agarwal, Bullins & Hazan 2017 (arXiv:1602.03943); Koh & Liang 2017 (arXiv:1703.04730).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import influence as inf
from store import ChunkedArray, RunPaths, load_array, save_array

BLOCK_ROWS = 256
"""Test examples per block (and per resumable chunk): right-hand sides solved together."""


def lissa_damping(top_eigenvalue: float, deflation_eigenvalues: np.ndarray | None, l2: float, config: Any) -> float:
    """The damping of `Index.damping`: resolve_damping(lambda_ref, l2, config.damping).

    lambda_ref is the top eigenvalue of the operator LiSSA iterates on: lambda_max without deflation, else the
    smallest deflated eigenvalue (an upper bound on the largest non-deflated one).
    """
    ref = top_eigenvalue if deflation_eigenvalues is None else float(np.min(deflation_eigenvalues))
    return float(inf.resolve_damping(ref, l2, config.damping))


def query_cache_key(
    train_ids: np.ndarray,
    train_labels: np.ndarray,
    n_train_features: int,
    top_eigenvalue: float,
    deflation_eigenvalues: np.ndarray | None,
    *,
    l2: float,
    damping: float,
    lissa: Any,
) -> str:
    """A digest of everything a cached LiSSA solution depends on besides the (stored) test example itself."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(train_ids, np.int64).tobytes())
    digest.update(np.ascontiguousarray(train_labels, np.int64).tobytes())
    lam = b"" if deflation_eigenvalues is None else np.ascontiguousarray(deflation_eigenvalues, np.float64).tobytes()
    digest.update(lam)
    options = {**dataclasses.asdict(lissa), "damping": repr(float(damping))}
    digest.update(
        repr((int(n_train_features), repr(float(top_eigenvalue)), repr(float(l2)), sorted(options.items()))).encode()
    )
    return digest.hexdigest()


def _deflation(paths: RunPaths, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray] | None:
    path = paths.array("curvature_top_eigenvalues")
    if not path.exists():
        return None
    vecs = np.asarray(load_array(paths.array("curvature_top_eigenvectors")))
    return np.asarray(load_array(path)), np.ascontiguousarray(vecs, dtype=dtype)


def lissa_operator(
    paths: RunPaths,
    spec: list[dict[str, Any]],
    unravel: Any,
    theta: Any,
    h_train: np.ndarray,
    y_train: np.ndarray,
    *,
    l2: float,
    curvature: str,
    dense: bool | None = None,
) -> tuple[str, Any]:
    """("dense" | "data", matvec v -> (C + l2 I) v) for the cache's solves (see the module docstring).

    dense=None picks "dense" when the run stores the eigendecomposition; True / False force one.
    """
    dense_path = paths.array("curvature_eigenvalues")
    if dense is None:
        dense = dense_path.exists()
    if dense:
        lam = np.asarray(load_array(dense_path), np.float64)
        Q = np.asarray(load_array(paths.array("curvature_eigenvectors")), np.float64)
        A = jnp.asarray(((Q * lam) @ Q.T).astype(h_train.dtype))

        def matvec(v: Any) -> Any:
            return A @ v.astype(A.dtype)

        return "dense", matvec
    n = len(h_train)
    # the same product as Index.matvec
    return "data", inf.make_head_matvec(
        spec,
        unravel,
        theta,
        h_train,
        y_train,
        l2=l2,
        curvature=curvature,
        batch_size=None if n <= 16_384 else 4096,
    )


def build_query_cache(
    paths: RunPaths,
    spec: list[dict[str, Any]],
    unravel: Any,
    theta: Any,
    *,
    l2: float,
    curvature: str,
    top_eigenvalue: float,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Solves and stores the LiSSA vectors of every stored test example; returns the manifest record.

    Returns None (nothing written) when the run stores no test examples.
    """
    if not paths.array("test_features").exists():
        return None
    t0 = time.perf_counter()
    h_test = load_array(paths.array("test_features"))
    n_test = len(h_test)
    if n_test == 0:
        return None
    targets = np.asarray(load_array(paths.array("test_logits"))).argmax(1).astype(np.int64)
    h_train = np.asarray(load_array(paths.array("train_features")))
    y_train = np.asarray(load_array(paths.array("train_labels")))
    train_ids = np.asarray(load_array(paths.array("train_ids")))
    deflation = _deflation(paths, h_train.dtype)
    lam_defl = None if deflation is None else deflation[0]
    config = inf.LissaConfig()
    damping = lissa_damping(top_eigenvalue, lam_defl, l2, config)
    operator, matvec = lissa_operator(
        paths, spec, unravel, theta, h_train, y_train, l2=l2, curvature=curvature, dense=None
    )
    p = int(np.asarray(theta).shape[0])
    solutions = ChunkedArray.open_or_create(
        paths.array("query_solutions"), shape=(n_test, p), dtype=np.float32, chunk_rows=BLOCK_ROWS
    )
    # per-row diagnostics, written before the solutions chunk whose done-mask commits the block
    residuals = ChunkedArray.open_or_create(
        paths.array("query_residuals"), shape=(n_test,), dtype=np.float64, chunk_rows=BLOCK_ROWS
    )
    depths = ChunkedArray.open_or_create(
        paths.array("query_depths"), shape=(n_test,), dtype=np.int64, chunk_rows=BLOCK_ROWS
    )
    for chunk in tqdm(solutions.missing_chunks(), desc="query cache", unit="block", disable=not progress):
        sl = solutions.chunk_slice(chunk)
        g = inf.compute_per_example_grads(spec, unravel, theta, np.asarray(h_test[sl]), targets[sl])
        result = inf.solve_lissa(
            matvec,
            np.asarray(g),
            config=dataclasses.replace(config, damping=damping),
            l2=l2,
            top_eigenvalue=top_eigenvalue,
            min_eigenvalue_floor=l2 + damping,
            deflation=deflation,
        )
        residuals.write_chunk(chunk, np.asarray(result.residual, np.float64))
        depths.write_chunk(chunk, np.full(sl.stop - sl.start, result.depth, np.int64))
        solutions.write_chunk(chunk, np.asarray(result.x, np.float32))
    residual_all, depth_all = np.asarray(residuals.array()), np.asarray(depths.array())
    for arr in (solutions, residuals, depths):
        arr.close()
    save_array(paths.array("query_targets"), targets)
    key = query_cache_key(
        train_ids,
        y_train,
        len(h_train),
        top_eigenvalue,
        lam_defl,
        l2=l2,
        damping=damping,
        lissa=dataclasses.replace(config, damping=damping),
    )
    return {
        "key": key,
        "operator": operator,
        "n_queries": n_test,
        "damping": damping,
        "depth_max": int(depth_all.max()),
        "residual_max": float(residual_all.max()),
        "seconds": time.perf_counter() - t0,
    }
