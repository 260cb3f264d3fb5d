"""Build stage "queries": LiSSA inverse-HVPs of every stored test example, solved once, all at once.

For a stored test example q the LiSSA query vector s_q = (C + l2 I + dI)^-1 g_q depends only on the run (head,
training features, curvature arrays, LiSSA options) and on the class explained, so with
`IndexConfig(cache_queries=True)` the build solves it for every stored test example at its predicted class
(the default target of `explain`) and stores S [n_test, p] in `arrays/query_solutions.npy`.
`Index.explain(test_ids=..., method="lissa")` then reads s_q instead of running LiSSA: the answer costs a
gradient, one FAISS search and the re-scoring (milliseconds), not `depth` curvature products over the whole
training set.

The solve is the same deflated LiSSA recursion (`influence.solve_lissa`: same damping, the one the "curvature"
stage stored in `extra["damping"]`; same scale, depth, deflation pairs and divergence guard) as the query path,
run on blocks of `BLOCK_ROWS` right-hand sides at once, so that a curvature product serves a whole block: one
GEMM-shaped pass instead of a memory-bound pass per query. The operator is

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
manifest only when every chunk is on disk. An incremental update that refreshes the curvature re-runs the stage
(`indexer.update`); one that keeps the stored curvature leaves the cache, which then no longer matches the run.

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
from store import RunPaths, load_array, save_array

from .context import BuildContext, ManifestPatch

BLOCK_ROWS = 256
"""Test examples per block (and per resumable chunk): right-hand sides solved together."""


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
    head: inf.Head,
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
    # the same product as the query path's (`make_head_matvec`'s automatic chunking)
    return "data", head.matvec(h_train, y_train, l2=l2, curvature=curvature)


def has_query_cache(ctx: BuildContext) -> bool:
    """Whether the run caches its queries (`IndexConfig(cache_queries=True)`) and stores test examples."""
    return ctx.config.cache_queries and ctx.has_test


def queries_stage(ctx: BuildContext) -> ManifestPatch:
    """LiSSA vectors of every stored test example at its predicted class, solved in blocks -> the query cache.

    The damping is the one the "curvature" stage stored (`extra["damping"]`; runs whose curvature predates it:
    the same rule, `influence.compute_damping`). Resumable in a build (chunks with a done-mask); an update re-running it
    recomputes every block.
    """
    paths = ctx.paths
    t0 = time.perf_counter()
    h_test, _ = ctx.split("test")
    n_test = len(h_test)
    targets = np.asarray(load_array(paths.split_array("test", "logits"))).argmax(1).astype(np.int64)
    h_train, y_train = ctx.split("train")
    h_train = np.asarray(h_train)
    train_ids = ctx.ids("train")
    deflation = _deflation(paths, h_train.dtype)
    lam_defl = None if deflation is None else deflation[0]
    top_eigenvalue = float(ctx.manifest.extra["top_eigenvalue"])
    damping = ctx.manifest.extra.get("damping")
    if damping is None:  # a run whose curvature stage predates the stored damping: the same rule
        damping = inf.compute_damping(inf.reference_eigenvalue(top_eigenvalue, lam_defl), ctx.l2)
    config = dataclasses.replace(inf.LissaConfig(), damping=float(damping))
    operator, matvec = lissa_operator(paths, ctx.head, h_train, y_train, l2=ctx.l2, curvature=ctx.config.curvature)
    # the query path's operator and solver (`api.engine.Engine.curvature`), so cached = solved answers
    curvature = inf.HeadCurvature(
        matvec=matvec,
        l2=ctx.l2,
        top_eigenvalue=top_eigenvalue,
        damping=float(damping),
        deflation=deflation,
        iterative="cg" if ctx.config.curvature == "ggn" else "lissa",
    )
    p = ctx.n_params
    solutions = ctx.chunked(paths.array("query_solutions"), shape=(n_test, p), dtype=np.float32, chunk_rows=BLOCK_ROWS)
    # per-row diagnostics, written before the solutions chunk whose done-mask commits the block
    residuals = ctx.chunked(paths.array("query_residuals"), shape=(n_test,), dtype=np.float64, chunk_rows=BLOCK_ROWS)
    depths = ctx.chunked(paths.array("query_depths"), shape=(n_test,), dtype=np.int64, chunk_rows=BLOCK_ROWS)
    for chunk in tqdm(solutions.missing_chunks(), desc="query cache", unit="block", disable=not ctx.progress):
        sl = solutions.chunk_slice(chunk)
        g = ctx.head.gradients(np.asarray(h_test[sl]), targets[sl])
        result = curvature.run_iterative(np.asarray(g), lissa=config)
        residuals.write_chunk(chunk, np.asarray(result.residual, np.float64))
        depths.write_chunk(chunk, np.full(sl.stop - sl.start, result.depth, np.int64))
        solutions.write_chunk(chunk, np.asarray(result.x, np.float32))
    residual_all, depth_all = np.asarray(residuals.array()), np.asarray(depths.array())
    for arr in (solutions, residuals, depths):
        arr.close()
    save_array(paths.array("query_targets"), targets)
    key = query_cache_key(
        train_ids, y_train, len(h_train), top_eigenvalue, lam_defl, l2=ctx.l2, damping=config.damping, lissa=config
    )
    record = {
        "key": key,
        "operator": operator,
        "n_queries": n_test,
        "damping": config.damping,
        "depth_max": int(depth_all.max()),
        "residual_max": float(residual_all.max()),
        "seconds": time.perf_counter() - t0,
    }
    return ManifestPatch(extra={"query_cache": record})
