"""The build stage of scope="model": projected per-layer gradients of every layer, their Gauss-Newton matrix.

phi_i = S^T g_i with S the block-diagonal LoGra projection (per layer P_in (x) P_out, `indexer.logra`; identity
when the scope has at most min(`project_above`, `exact_max_params`) parameters: phi_i = g_i, the full per-example
gradient, since the curvature below is a dense [d, d] matrix; in a larger scope the layers nearest the output that
fit that budget together keep identity blocks, `indexer.logra.unprojected_layers`).
Influence is taken in that space (LoGra, Choe et al. 2024, arXiv:2405.13954):

    score(q, i) = phi_q^T (G + (l2 + delta) I)^-1 phi_i,   G = (1/m) sum_i sum_c p_ic phi_ic phi_ic^T

G the Gauss-Newton matrix of the mean cross-entropy in the projected space (diag p - p p^T = sum_c p_c (p - e_c)
(p - e_c)^T, phi_ic the projected gradient of example i's loss at class c), exact, summed over a seeded subsample
of `IndexConfig.curvature_rows` training examples (all when there are fewer). With projection off it is the GGN
of the whole scope, and the score is Koh & Liang's g_q^T (G + l2 I)^-1 g_i. `influence.ProjectedCurvature` with
B = I solves it (exact: eigendecomposition; lissa), with the damping rule of the head on G + l2 I's top eigenvalue.

K-FAC / EK-FAC in the same space (methods "kfac" / "ekfac"; Martens & Grosse 2015, George et al. 2018, reusing
`influence.KroneckerCurvature`): per outer-product layer l, phi_l = P_out^T (sum_t g_t a_t^T) P_in = sum_t s~_t a~_t^T
with a~ = P_in^T a, s~ = P_out^T g, and

    G_ll ~ S_l (x) A_l,   A_l = (1/(m T)) sum_i sum_t a~_it a~_it^T,   S_l = (1/m) sum_i sum_c p_ic sum_t s~_ict s~_ict^T

(row-major [k_out, k_in] blocks; K-FAC-expand over positions, Eschenhagen et al. 2023); EK-FAC keeps the
eigenbasis Q_S (x) Q_A and takes the eigenvalues diag((Q_S (x) Q_A)^T G_ll (Q_S (x) Q_A)) = (1/m) sum_i sum_c
p_ic ((Q_S^T phi_ic,l Q_A)^2) from G's diagonal block (the per-class phi of the same rows, no second pass). A norm
layer's projected vector is one diagonal block, diag(G_ll). With padded text batches the padded positions count
in A's normaliser T (their output gradients are zero), so there A depends on the batch's longest text.

Stage "model" (per example: an incremental update computes new rows only): `model_train_vectors` [n, d]
(labels), `model_test_vectors` [n_test, d] at the predicted classes (`model_test_targets`), FAISS spaces "model"
and "model-unit". Stage "model-curvature" (the whole training set: an update re-runs it): `model_curvature` =
G + l2 I [d, d] float64, `model_kronecker_bases`, `model_kfac_eigenvalues`, `model_ekfac_eigenvalues`
(`influence.KroneckerCurvature.to_arrays`, the blocks in the manifest's extra["model"]["kronecker"]).
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


def model_layout(record: dict[str, Any]) -> tuple[Any, ...]:
    """The Kronecker blocks of phi (`influence.matrix_layout`): an outer-product layer's [k_out, k_in] matrix
    (its bias is the input side's last column), a norm's projected [k] vector as a diagonal block."""
    return inf.matrix_layout([r["k"] if r["kind"] == "norm" else (r["k_out"], r["k_in"]) for r in record["layers"]])


def curvature_sums(
    task: Any, rows: np.ndarray, record: dict[str, Any], n_classes: int, progress: bool
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Over training rows (p from the model's logits): G = (1/m) sum_i sum_c p_ic phi_ic phi_ic^T [d, d] float64,
    and the K-FAC sums of every outer-product layer ("layer{l}.a" / ".positions" / ".g", `ModelScope.class_gradients`)."""
    total = np.zeros((record["dim"], record["dim"]), np.float64)
    sums: dict[str, np.ndarray] = {}
    bar = tqdm(total=len(rows), desc="model curvature", unit="ex", disable=not progress)
    for s in range(0, len(rows), task.batch_size):
        xs = [task.train[int(i)][0] for i in rows[s : s + task.batch_size]]
        logits, phis, part = task.model_scope.class_gradients(xs, n_classes, record)
        total += inf.compute_projected_ggn(np.moveaxis(phis, 1, 0), np.asarray(inf.softmax(logits)))
        for k, v in part.items():
            sums[k] = v if k not in sums else sums[k] + v
        bar.update(len(xs))
    bar.close()
    return total / len(rows), sums


def fit_model_kronecker(
    record: dict[str, Any], ggn: np.ndarray, sums: dict[str, np.ndarray], m: int, l2: float
) -> tuple[inf.KroneckerCurvature, inf.KroneckerCurvature]:
    """K-FAC and EK-FAC of phi's space (`influence.kfac`) from the factor sums of `curvature_sums` over m rows and
    G (their exact GGN): per outer-product layer A_l = sum a~ a~^T / positions, S_l = sum p s~ s~^T / m and the
    eigenvalues lambda_S lambda_A^T (K-FAC) or diag((Q_S (x) Q_A)^T G_ll (Q_S (x) Q_A)) (EK-FAC); a norm layer's
    block is diag(G_ll) in both."""
    blocks = model_layout(record)
    arrays = dict(sums)
    for b in blocks:
        if isinstance(b, inf.LinearBlock):  # a layer whose output never reaches the logits has no output gradients
            arrays.setdefault(f"layer{b.layer}.g", np.zeros((b.out_features, b.out_features)))
            arrays.setdefault(f"layer{b.layer}.a", np.zeros((b.k, b.k)))
            arrays.setdefault(f"layer{b.layer}.positions", np.asarray(float(m)))
    arrays |= inf.ggn_diagonal_sums(blocks, ggn, m)
    factors = inf.compute_kronecker_factors(blocks, inf.KroneckerSums(kind="factors", arrays=arrays, n=m))
    kfac = inf.KroneckerCurvature.from_factors(factors, l2=l2)
    return kfac, kfac.with_correction(inf.ggn_correction_sums(kfac, ggn, m))


def model_stage(ctx: BuildContext) -> ManifestPatch:
    """Projected per-layer gradients of train and test (per example: an update computes new rows only), FAISS
    spaces "model" / "model-unit"; the manifest record of the projection (dims, seeds)."""
    task, paths, config = ctx.task, ctx.paths, ctx.config
    scope = task.model_scope
    # the projected Gauss-Newton matrix is dense [d, d]: full gradients only up to the dense-solve size
    full = min(config.project_above, config.exact_max_params)
    k = config.layer_projection_dim if scope.n_params > full else None
    # the layers nearest the output stay whole while together they fit the size a whole scope could have
    record = layer_projection_record(scope.layers, k=k, seed=config.projection_seed, whole_budget=full)
    _, y = ctx.split("train")
    train_vecs = write_vectors(ctx, "model_train_vectors", task.train, y, record, "model grads train")
    if task.test is not None:
        targets = np.asarray(load_array(paths.split_array("test", "logits"))).argmax(1).astype(np.int64)
        save_array(paths.array("model_test_targets"), targets)
        write_vectors(ctx, "model_test_vectors", task.test, targets, record, "model grads test")
    spaces = {}
    ids = ctx.ids("train")
    for space, vecs in (("model", train_vecs), ("model-unit", np.asarray(inf.normalize_rows(train_vecs), np.float32))):
        index, spaces[space] = build_vector_index(vecs, ids, factory=config.factory)
        index.save(paths.vector(space))
    return ManifestPatch(spaces=spaces, extra={"model": record | {"n_params": scope.n_params}})


def model_curvature_stage(ctx: BuildContext) -> ManifestPatch:
    """G + l2 I over (a seeded subsample of `curvature_rows`) training examples, the damping rule on its top
    eigenvalue, and the K-FAC / EK-FAC models of G (methods "kfac" / "ekfac" on this scope). Depends on the
    whole training set: an update re-runs it."""
    task, paths, config = ctx.task, ctx.paths, ctx.config
    record = ctx.manifest.extra["model"]
    task.model_scope.check_record(record)
    _, y = ctx.split("train")
    n = len(y)
    rows = np.arange(n)
    if n > config.curvature_rows:
        rows = np.sort(np.random.default_rng(0).choice(n, size=config.curvature_rows, replace=False))
    ggn, sums = curvature_sums(task, rows, record, ctx.n_classes, ctx.progress)
    curvature = ggn + ctx.l2 * np.eye(len(ggn))
    top = float(np.linalg.eigvalsh(curvature)[-1])
    kfac, ekfac = fit_model_kronecker(record, ggn, sums, len(rows), ctx.l2)
    (kfac_arrays, description), (ekfac_arrays, _) = kfac.to_arrays(), ekfac.to_arrays()
    save_array(paths.array("model_curvature"), curvature)
    save_array(paths.array("model_kronecker_bases"), kfac_arrays["bases"])
    save_array(paths.array("model_kfac_eigenvalues"), kfac_arrays["eigenvalues"])
    save_array(paths.array("model_ekfac_eigenvalues"), ekfac_arrays["eigenvalues"])
    stale = ("curvature_stale", "rule_damping", "damping_calibration")  # the stage "model-damping" redoes the last two
    updated = {k: v for k, v in record.items() if k not in stale} | {
        "curvature": "ggn",
        "curvature_rows": len(rows),
        "top_eigenvalue": top,
        "damping": inf.compute_damping(top, ctx.l2),
        "kronecker": {k: v for k, v in description.items() if k not in ("kind", "damping")},
    }
    return ManifestPatch(extra={"model": updated})
