"""The stored gradient space and curvature of scope="last-block": a transformer's last block plus the head.

Influence over the p ~ 1e5-1e6 parameters of a transformer block is taken in a d-dimensional random subspace
(TRAK, Park et al. 2023, arXiv:2303.14186; LoGra, Choe et al. 2024, arXiv:2405.13954): theta = theta* + S w with
S [p, d] the seeded projection of `indexer.torch_backend` (count-sketch fold + Gaussian, d =
`IndexConfig.projection_dim`). In that model everything is exact and d-dimensional:

- gradients: phi_i = S^T g_i, g_i = d CE(f(theta*, x_i), y_i) / d theta (per-example, `torch.func`);
- curvature: C the Gauss-Newton matrix of the mean cross-entropy, C = (1/n) sum_i J_i^T (diag p_i - p_i p_i^T) J_i.
  Because diag p - p p^T = sum_c p_c (p - e_c)(p - e_c)^T,

      S^T C S = (1/n) sum_i sum_c p_ic phi_ic phi_ic^T,    phi_ic = S^T J_i^T (p_i - e_c),

  the projected gradient of example i's loss at class c: no Hessian-vector product, one projected gradient per
  class. (TRAK uses the empirical Fisher (1/n) sum_i phi_i phi_i^T instead: the same formula with the weight on
  the observed label only.) It is summed over a seeded subsample of `IndexConfig.curvature_rows` training
  examples (all of them when there are fewer: then it is exact);
- scores: the Galerkin projection of the full-space influence g_q^T (C + (l2 + delta) I)^-1 g_i onto span(S),

      score(q, i) = (p / d) phi_q^T (A + delta B)^-1 phi_i,    A = S^T C S + l2 S^T S,   B = S^T S,

  i.e. the influence in the model restricted to theta* + S w (exact there), rescaled by p / d: S^T S ~ (p / d) I,
  so the restricted model sees a random d-dimensional slice of each gradient, about d / p of its squared norm;
  the factor restores full-space units (C = 0 gives phi_q^T phi_i / (l2 + delta) ~ g_q^T g_i / (l2 + delta),
  as in the head scope). The damping delta is `influence.compute_damping` of the top eigenvalue of the pencil
  (A, B) (`influence.pencil_eigenvalues`), the Ritz value of C + l2 I on span(S), as the head's is of C + l2 I;
  the stage computes it once and stores it (`extra["block"]["damping"]`).

Stored: `block_train_vectors` [n, d] (at the labels) in FAISS spaces "block" (inner product) and "block-unit"
(cosine); `block_test_vectors` [n_test, d] at the predicted classes (`block_test_targets`), so that stored test
examples are explained without the model; A (`block_curvature`) and B (`block_gram`), float64 [d, d]. Every
array is written in resumable chunks or atomically.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

import influence as inf
from store import build_vector_index, load_array, save_array

from .context import BuildContext, ManifestPatch
from .torch_backend import LastBlockScope, compute_projected_grads, make_torch_projection

#: texts per chunk of the block stage: the frozen body's hidden states of one chunk are held at once
BLOCK_CHUNK_ROWS = 256


def block_projection(scope: LastBlockScope, record: dict[str, Any]):
    """The projection S of a run's block space, rebuilt from its manifest record (`extra["block"]`)."""
    if scope.n_params != record["n_params"]:
        raise ValueError(
            f"the task's last-block scope has {scope.n_params} parameters, the run's {record['n_params']}: "
            "open the run with the task it was built from"
        )
    return make_torch_projection(scope.n_params, record["dim"], seed=record["seed"], kind=record["projection"])


def embed_block(
    scope: LastBlockScope, texts: Sequence[str], targets: np.ndarray, projection: Any, *, chunk_rows: int
) -> np.ndarray:
    """phi = S^T g of texts at `targets` [m], [m, d] float32, in chunks of `chunk_rows` texts."""
    out = [
        compute_projected_grads(
            scope, scope.block_inputs(list(texts[s : s + chunk_rows])), targets[s : s + chunk_rows], projection
        )
        for s in range(0, len(texts), chunk_rows)
    ]
    return np.concatenate(out).astype(np.float32, copy=False)


def projected_ggn(
    scope: LastBlockScope,
    texts: Sequence[str],
    probs: np.ndarray,
    projection: Any,
    *,
    chunk_rows: int = BLOCK_CHUNK_ROWS,
    progress: bool = False,
) -> np.ndarray:
    """S^T C S [d, d] (float64) over `texts`: (1/m) sum_i sum_c p_ic phi_ic phi_ic^T (see the module docstring).

    Args:
        scope: the last-block scope at theta*.
        texts: the m examples C is averaged over.
        probs: the model's class probabilities p_i [m, classes] on them.
        projection: S.
    """
    m, n_classes = probs.shape
    if len(texts) != m:
        raise ValueError(f"probs must have one row per text ({len(texts)}), got {m}")
    total = np.zeros((projection.d, projection.d), np.float64)
    bar = tqdm(total=m, desc="block curvature", unit="ex", disable=not progress)
    for s in range(0, m, chunk_rows):
        batches = scope.block_inputs(list(texts[s : s + chunk_rows]))
        p = probs[s : s + chunk_rows]
        for c in range(n_classes):
            phi = np.asarray(compute_projected_grads(scope, batches, np.full(len(p), c), projection), np.float64)
            total += (phi * p[:, c : c + 1]).T @ phi
        bar.update(len(p))
    bar.close()
    return total / m


def write_block_vectors(
    vectors: Any,
    scope: LastBlockScope,
    text_of: Callable[[int], str],
    targets: np.ndarray,
    projection: Any,
    *,
    desc: str,
    progress: bool,
) -> np.ndarray:
    """phi rows of every example (text_of(row), targets[row]) into the chunked array `vectors`; returns them."""
    n = len(targets)
    missing = vectors.missing_chunks()
    bar = tqdm(total=n, desc=desc, unit="ex", disable=not progress)
    bar.update(n - sum(vectors.chunk_slice(i).stop - vectors.chunk_slice(i).start for i in missing))
    for chunk in missing:
        sl = vectors.chunk_slice(chunk)
        texts = [text_of(i) for i in range(sl.start, sl.stop)]
        vectors.write_chunk(chunk, embed_block(scope, texts, targets[sl], projection, chunk_rows=len(texts)))
        bar.update(sl.stop - sl.start)
    bar.close()
    return np.ascontiguousarray(vectors.array())


def is_last_block(ctx: BuildContext) -> bool:
    """Whether the run's scope is "last-block" (for scope="head" the "block" stage has nothing to do)."""
    return ctx.manifest.task.get("scope", "head") == "last-block"


def block_stage(ctx: BuildContext) -> ManifestPatch:
    """Projected last-block gradients, their curvature and FAISS spaces "block" / "block-unit".

    The Task's `(text, label)` datasets give the texts; labels, logits and ids are read from the run's arrays
    (written by the "metadata" stage). The manifest record (`extra["block"]`) holds the projection (n_params,
    dim, seed, kind), the Ritz values' range and the automatic damping max(0, 1e-3 mu_max - l2) of the pencil,
    computed here once (`influence.compute_damping` of mu_max, the top Ritz value).
    """
    task, paths, config = ctx.task, ctx.paths, ctx.config
    scope, train, test = task.block, task.train, task.test
    dim, seed = config.projection_dim, config.projection_seed
    projection = make_torch_projection(scope.n_params, dim, seed=seed, kind="sketch")
    _, y = ctx.split("train")
    chunk_rows = min(BLOCK_CHUNK_ROWS, len(y))
    train_vecs = write_block_vectors(
        ctx.chunked(paths.array("block_train_vectors"), shape=(len(y), dim), dtype=np.float32, chunk_rows=chunk_rows),
        scope,
        lambda i: train[i][0],
        y,
        projection,
        desc="block grads train",
        progress=ctx.progress,
    )
    if test is not None:
        targets = np.asarray(load_array(paths.split_array("test", "logits"))).argmax(1).astype(np.int64)
        save_array(paths.array("block_test_targets"), targets)
        write_block_vectors(
            ctx.chunked(
                paths.array("block_test_vectors"),
                shape=(len(targets), dim),
                dtype=np.float32,
                chunk_rows=min(BLOCK_CHUNK_ROWS, len(targets)),
            ),
            scope,
            lambda i: test[i][0],
            targets,
            projection,
            desc="block grads test",
            progress=ctx.progress,
        )
    n = len(y)
    rows = np.arange(n)
    if n > config.curvature_rows:
        rows = np.sort(np.random.default_rng(0).choice(n, size=config.curvature_rows, replace=False))
    probs = inf.softmax(np.asarray(load_array(paths.split_array("train", "logits")))[rows])
    ggn = projected_ggn(scope, [train[int(i)][0] for i in rows], probs, projection, progress=ctx.progress)
    gram = projection.gram()
    curvature = ggn + ctx.l2 * gram
    mu = inf.pencil_eigenvalues(curvature, gram)  # Ritz values of C + l2 I on span(S), largest first
    save_array(paths.array("block_curvature"), curvature)
    save_array(paths.array("block_gram"), gram)
    spaces = {}
    ids = ctx.ids("train")
    for space, vecs in (("block", train_vecs), ("block-unit", np.asarray(inf.normalize_rows(train_vecs), np.float32))):
        index, spaces[space] = build_vector_index(vecs, ids, factory=config.factory)
        index.save(paths.vector(space))
    record = {
        "n_params": scope.n_params,
        "dim": dim,
        "seed": seed,
        "projection": "sketch",
        "curvature": "ggn",
        "curvature_rows": len(rows),
        "top_eigenvalue": float(mu[0]),
        "min_eigenvalue": float(mu[-1]),
        "damping": inf.compute_damping(float(mu[0]), ctx.l2),
    }
    return ManifestPatch(spaces=spaces, extra={"block": record})
