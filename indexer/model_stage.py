"""The build stage of scope="model": projected per-layer gradients of every layer, their Gauss-Newton matrix.

phi_i = S^T g_i with S the block-diagonal LoGra projection (per layer P_in (x) P_out, `indexer.logra`; identity
when the scope has at most min(`project_above`, `exact_max_params`) parameters: phi_i = g_i, the full per-example
gradient, since the curvature below is a dense [d, d] matrix).
Influence is taken in that space (LoGra, Choe et al. 2024, arXiv:2405.13954):

    score(q, i) = phi_q^T (G + (l2 + delta) I)^-1 phi_i,   G = (1/m) sum_i sum_c p_ic phi_ic phi_ic^T

G the Gauss-Newton matrix of the mean cross-entropy in the projected space (diag p - p p^T = sum_c p_c (p - e_c)
(p - e_c)^T, phi_ic the projected gradient of example i's loss at class c), exact, summed over a seeded subsample
of `IndexConfig.curvature_rows` training examples (all when there are fewer). With projection off it is the GGN
of the whole scope, and the score is Koh & Liang's g_q^T (G + l2 I)^-1 g_i. `influence.ProjectedCurvature` with
B = I solves it (exact: eigendecomposition; lissa), with the damping rule of the head on G + l2 I's top eigenvalue.

Stored: `model_train_vectors` [n, d] (labels), `model_test_vectors` [n_test, d] at the predicted classes
(`model_test_targets`), `model_curvature` = G + l2 I [d, d] float64; FAISS spaces "model" and "model-unit".
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm

import influence as inf
from store import build_vector_index, load_array, save_array

from .context import BuildContext, ManifestPatch
from .examples import iterate
from .logra import layer_projection_record


def is_model_scope(ctx: BuildContext) -> bool:
    """Whether the run's scope is "model" (a list of module names included)."""
    return ctx.manifest.task.get("scope", "head") == "model"


def embed_examples(task: Any, ds: Any, rows: range, targets: np.ndarray, record: dict[str, Any]) -> np.ndarray:
    """phi of the examples `rows` of `ds` at `targets` [len(rows)] -> [len(rows), d] float32."""
    out, done = [], 0
    for _, _, xs in iterate(ds, rows, task.batch_size):
        _, [phi] = task.model_scope.gradients(xs, [targets[done : done + len(xs)]], record)
        out.append(phi)
        done += len(xs)
    return np.concatenate(out).astype(np.float32, copy=False)


def embed_inputs(task: Any, xs: list[Any], targets: np.ndarray, record: dict[str, Any]) -> np.ndarray:
    """phi [m, d] float64 of raw inputs (a list of examples' x) at `targets`, in batches of the task's."""
    out = []
    for s in range(0, len(xs), task.batch_size):
        _, [phi] = task.model_scope.gradients(xs[s : s + task.batch_size], [targets[s : s + task.batch_size]], record)
        out.append(phi)
    return np.concatenate(out)


def write_vectors(ctx: BuildContext, name: str, ds: Any, targets: np.ndarray, record: dict, desc: str) -> np.ndarray:
    """phi of every example of `ds` into the resumable chunked array `name`; returns them."""
    n, dim = len(targets), record["dim"]
    vectors = ctx.chunked(
        ctx.paths.array(name), shape=(n, dim), dtype=np.float32, chunk_rows=min(ctx.config.chunk_rows, n)
    )
    bar = tqdm(total=n, desc=desc, unit="ex", disable=not ctx.progress)
    for chunk in vectors.missing_chunks():
        sl = vectors.chunk_slice(chunk)
        vectors.write_chunk(chunk, embed_examples(ctx.task, ds, range(sl.start, sl.stop), targets[sl], record))
        bar.update(sl.stop - sl.start)
    bar.close()
    return np.ascontiguousarray(vectors.array())


def projected_ggn(task: Any, rows: np.ndarray, record: dict[str, Any], n_classes: int, progress: bool) -> np.ndarray:
    """G = (1/m) sum_i sum_c p_ic phi_ic phi_ic^T [d, d] float64 over training rows (p from the model's logits)."""
    total = np.zeros((record["dim"], record["dim"]), np.float64)
    bar = tqdm(total=len(rows), desc="model curvature", unit="ex", disable=not progress)
    for s in range(0, len(rows), task.batch_size):
        xs = [task.train[int(i)][0] for i in rows[s : s + task.batch_size]]
        classes = [np.full(len(xs), c) for c in range(n_classes)]
        logits, phis = task.model_scope.gradients(xs, classes, record)
        total += inf.compute_projected_ggn(np.stack(phis), np.asarray(inf.softmax(logits)))
        bar.update(len(xs))
    bar.close()
    return total / len(rows)


def model_stage(ctx: BuildContext) -> ManifestPatch:
    """Projected per-layer gradients of train and test, the projected GGN, FAISS spaces "model" / "model-unit"."""
    task, paths, config = ctx.task, ctx.paths, ctx.config
    scope = task.model_scope
    # the projected Gauss-Newton matrix is dense [d, d]: full gradients only up to the dense-solve size
    k = config.layer_projection_dim if scope.n_params > min(config.project_above, config.exact_max_params) else None
    record = layer_projection_record(scope.layers, k=k, seed=config.projection_seed)
    _, y = ctx.split("train")
    train_vecs = write_vectors(ctx, "model_train_vectors", task.train, y, record, "model grads train")
    if task.test is not None:
        targets = np.asarray(load_array(paths.split_array("test", "logits"))).argmax(1).astype(np.int64)
        save_array(paths.array("model_test_targets"), targets)
        write_vectors(ctx, "model_test_vectors", task.test, targets, record, "model grads test")
    n = len(y)
    rows = np.arange(n)
    if n > config.curvature_rows:
        rows = np.sort(np.random.default_rng(0).choice(n, size=config.curvature_rows, replace=False))
    ggn = projected_ggn(task, rows, record, ctx.n_classes, ctx.progress)
    curvature = ggn + ctx.l2 * np.eye(len(ggn))
    top = float(np.linalg.eigvalsh(curvature)[-1])
    save_array(paths.array("model_curvature"), curvature)
    spaces = {}
    ids = ctx.ids("train")
    for space, vecs in (("model", train_vecs), ("model-unit", np.asarray(inf.normalize_rows(train_vecs), np.float32))):
        index, spaces[space] = build_vector_index(vecs, ids, factory=config.factory)
        index.save(paths.vector(space))
    record |= {
        "n_params": scope.n_params,
        "curvature": "ggn",
        "curvature_rows": len(rows),
        "top_eigenvalue": top,
        "damping": inf.compute_damping(top, ctx.l2),
    }
    return ManifestPatch(spaces=spaces, extra={"model": record})
