"""The build stages that depend on the whole training set: the representer fit and the head curvature.

Adding or deleting one training example changes every output of these stages, so an incremental update
(`indexer.update`) re-runs them (`BuildContext.rerun`) instead of patching rows:

- "representer" (Yeh et al. 2018, arXiv:1811.09720): Theta* = argmin_Theta (1/n) sum_i CE(Theta phi_i, y_i)
  + lambda ||Theta||^2 over the augmented penultimate features phi_i = [f(h_i), 1], started from the model's
  last linear layer (a rerun: from the stored Theta*); alpha_i = -(softmax(Theta* phi_i) - onehot(y_i)) /
  (2 lambda n) and the FAISS space of vec(alpha_i phi_i^T). lambda is `influence.resolve_representer_lambda`.
- "whitened" (projected heads only): the head gradients whitened by a model K of the curvature, K^-1/2 g_i,
  projected with the run's seed -> FAISS space "grad-whitened". A query vector s is searched as P K^1/2 s: in full
  space (K^1/2 s) . (K^-1/2 g_i) = s . g_i is the exact score for ANY symmetric positive definite K, so the
  projection only adds Johnson-Lindenstrauss noise ~ ||K^1/2 s|| ||K^-1/2 g_i|| / sqrt(d), smallest when K is
  close to the curvature C + (l2 + d) I the query was solved with (raw projected gradients rank by the few
  curvature-dominated directions). K is the run's EK-FAC (stage "kronecker", which runs before it;
  `influence.KroneckerCurvature.power_fn`) at the exact solve's damping, or without Kronecker factors the spectral
  model of the top eigenpairs with the rest of the spectrum flattened (`influence.curvature.deflation_power`).
- "kronecker": the K-FAC factors of every linear layer of the head and the EK-FAC eigenvalue correction
  (`influence.kfac`; Martens & Grosse 2015, George et al. 2018), two passes over the training features in chunks:
  the methods "kfac" / "ekfac" and the preconditioner of the exact-target solve.
- "curvature": C + l2 I, C the GGN (or Hessian) of the mean training cross-entropy of the head: its top
  eigenpairs (deflated in LiSSA), the dense eigendecomposition of small heads (method "exact"), and the
  automatic damping, computed once here and stored (`extra["damping"]`): `influence.compute_damping` of
  `influence.reference_eigenvalue` (lambda_max, or with deflation the smallest deflated eigenvalue).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import influence as inf
from store import RunPaths, build_vector_index, load_array, save_array
from store.arrays import remove_chunked_array

from .context import BuildContext, ManifestPatch


def representer_stage(ctx: BuildContext) -> ManifestPatch:
    """Yeh et al. 2018: L2 fit of the last linear layer, alpha_i, embeddings vec(alpha_i phi_i^T) -> FAISS.

    In a rerun, Theta* is refitted warm-started from the stored one, or (refit_representer=False) kept and every
    alpha_i recomputed from it in closed form at the current n; the manifest then notes the fit as stale.
    """
    paths = ctx.paths
    h, y = ctx.split("train")
    phi = inf.augment_features(np.asarray(inf.penultimate_features(ctx.spec, ctx.params, h), np.float64))
    lam = inf.resolve_representer_lambda(ctx.l2, ctx.config.representer_l2)
    refit = ctx.refit_representer or not ctx.rerun
    extra: dict[str, Any] = {}
    if ctx.rerun:
        theta0 = np.asarray(load_array(paths.array("representer_theta")), np.float64)
    else:
        last = ctx.params[inf.last_linear_index(ctx.spec)]
        bias = last.get("bias", np.zeros(last["weight"].shape[0], last["weight"].dtype))
        theta0 = np.concatenate([last["weight"], bias[:, None]], axis=1).astype(np.float64)
    if refit:
        theta, alpha, grad_norm = inf.fit_representer(phi, y, theta0, lam=lam)
    else:  # alpha_i = -(softmax(Theta* phi_i) - onehot(y_i)) / (2 lam n) at the stored Theta*, current n
        n_at_fit = len(load_array(paths.array("representer_alpha")))
        extra["representer_stale"] = ctx.manifest.extra.get("representer_stale") or {"n_train_at_fit": n_at_fit}
        theta, alpha = theta0, inf.compute_representer_alpha(phi, y, theta0, lam=lam)
    alpha = np.asarray(alpha)
    save_array(paths.array("representer_alpha"), alpha.astype(np.float32))
    save_array(paths.array("representer_theta"), np.asarray(theta, np.float32))
    save_array(paths.array("train_phi"), phi.astype(np.float32))
    emb = np.asarray(inf.compute_representer_embeddings(alpha, phi), np.float32)
    index, space = build_vector_index(emb, ctx.ids("train"), factory=ctx.config.factory)
    index.save(paths.vector("representer"))
    if not refit:
        return ManifestPatch(spaces={"representer": space}, extra=extra)
    fidelity = None
    if ctx.has_test:
        ht, _ = ctx.split("test")
        phi_t = inf.augment_features(np.asarray(inf.penultimate_features(ctx.spec, ctx.params, ht), np.float64))
        rep_logits = np.asarray(inf.compute_representer_logits(alpha, phi, phi_t))
        model_logits = ctx.head.logits(ht)
        fidelity = float(inf.compute_fidelity(rep_logits, model_logits))
    extra["representer"] = {"lambda": lam, "fidelity": fidelity, "grad_norm": float(grad_norm)}
    return ManifestPatch(spaces={"representer": space}, extra=extra, drop=("representer_stale",))


#: rows of the dense curvature per resumable chunk (one vmapped block of curvature products)
DENSE_CHUNK_ROWS = 256


def curvature_stage(ctx: BuildContext) -> ManifestPatch:
    """Top eigenpairs of the head curvature (deflated LiSSA, automatic scale and damping); dense eigh for small
    heads.

    The top Ritz value doubles as the top-eigenvalue estimate (no separate power iteration); with more training
    rows than `curvature_rows` the subspace iterations run on a seeded subsample and only the final Rayleigh-Ritz
    step on every row (`influence.compute_top_eigenpairs`).

    Resumable in pieces like the per-example stages: the top eigenpairs are saved as soon as they are computed
    (a resumed build reads them back), and the dense curvature of a small head is written in chunks of
    `DENSE_CHUNK_ROWS` rows (`curvature_dense_rows`, removed once its eigendecomposition is saved), so a build
    killed during the stage redoes at most one piece. A progress bar counts the pieces.
    """
    config, paths = ctx.config, ctx.paths
    h, y = ctx.split("train")
    h = np.asarray(h)
    matvec = ctx.head.matvec(h, y, l2=ctx.l2, curvature=config.curvature)
    p = ctx.n_params
    extra: dict[str, Any] = {}
    drop: tuple[str, ...] = ("curvature_stale", "curvature_subspace_rows")
    rank = min(config.deflation_rank, p - 1)
    dense_chunks = -(-p // DENSE_CHUNK_ROWS) if p <= config.exact_max_params else 0
    bar = tqdm(total=1 + dense_chunks + (dense_chunks > 0), desc="curvature", unit="piece", disable=not ctx.progress)
    deflation_eigenvalues = None
    if rank > 0:
        if len(h) > config.curvature_rows:
            extra["curvature_subspace_rows"] = config.curvature_rows
            drop = ("curvature_stale",)
        top_values, top_vectors = paths.array("curvature_top_eigenvalues"), paths.array("curvature_top_eigenvectors")
        if not ctx.rerun and top_values.exists() and top_vectors.exists():  # a killed attempt of this build saved them
            lam = np.asarray(load_array(top_values), np.float64)
        else:
            subspace_matvec = None
            if len(h) > config.curvature_rows:
                rows = np.sort(np.random.default_rng(0).choice(len(h), size=config.curvature_rows, replace=False))
                subspace_matvec = ctx.head.matvec(
                    h[rows], y[rows], l2=ctx.l2, curvature=config.curvature, batch_size=None
                )
            lam, vecs = inf.compute_top_eigenpairs(
                matvec, p, rank=rank, dtype=np.float64, subspace_matvec=subspace_matvec
            )
            save_array(top_vectors, np.asarray(vecs, np.float32))
            save_array(top_values, np.asarray(lam, np.float64))
        deflation_eigenvalues = np.asarray(lam, np.float64)
        extra |= {"top_eigenvalue": float(lam[0]), "deflation_rank": rank}
    else:
        extra["top_eigenvalue"] = float(inf.estimate_top_eigenvalue(matvec, p, dtype=h.dtype))
    bar.update(1)
    if dense_chunks:
        rows_array = ctx.chunked(
            paths.array("curvature_dense_rows"), shape=(p, p), dtype=np.float64, chunk_rows=DENSE_CHUNK_ROWS
        )
        bar.update(dense_chunks - len(rows_array.missing_chunks()))
        for chunk in rows_array.missing_chunks():
            sl = rows_array.chunk_slice(chunk)
            block = inf.dense_curvature_rows(
                matvec, p, sl.start, sl.stop, dtype=np.float64, block_size=min(DENSE_CHUNK_ROWS, p)
            )
            rows_array.write_chunk(chunk, block)
            bar.update(1)
        out = np.asarray(rows_array.array(), np.float64)
        solver = inf.EigenSolver.from_dense(0.5 * (out + out.T))
        eigenvalues, eigenvectors = solver.to_arrays()
        save_array(paths.array("curvature_eigenvalues"), np.asarray(eigenvalues, np.float64))
        save_array(paths.array("curvature_eigenvectors"), np.asarray(eigenvectors, np.float64))
        if not ctx.rerun:
            remove_chunked_array(paths.array("curvature_dense_rows"))
        extra["min_eigenvalue"] = float(solver.min_eigenvalue)
        extra["top_eigenvalue_exact"] = float(solver.top_eigenvalue)
        bar.update(1)
    bar.close()
    # the one damping rule (influence.compute_damping), computed once here and read by every solver of the run
    extra["damping"] = inf.compute_damping(
        inf.reference_eigenvalue(extra["top_eigenvalue"], deflation_eigenvalues), ctx.l2
    )
    return ManifestPatch(extra=extra, drop=drop)


#: training rows per chunk of the Kronecker sums (padded to one shape, so each pass compiles once)
KRONECKER_ROWS = 1024


def _padded_rows(h: np.ndarray, chunk: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows of chunk `chunk` [rows, ...], weights [rows]) of h; the last chunk padded with zero rows of weight 0
    (one shape, so each pass compiles once)."""
    x = np.asarray(h[chunk * rows : (chunk + 1) * rows])
    w = np.ones(len(x), x.dtype)
    if len(x) < rows:
        pad = rows - len(x)
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        w = np.concatenate([w, np.zeros(pad, x.dtype)])
    return x, w


def _kronecker_chunk(
    ctx: BuildContext, rows: int, kfac: inf.KroneckerCurvature | None, chunk: int
) -> dict[str, np.ndarray]:
    """The partial sums of one chunk of training rows: the K-FAC factors (`kfac` None) or the EK-FAC correction
    in the eigenbases of `kfac`; {name: sum} plus the row count "n"."""
    h, _ = ctx.split("train")
    x, w = _padded_rows(h, chunk, rows)
    if kfac is None:
        sums = inf.compute_factor_sums(ctx.spec, ctx.params, x, weights=w)
    else:
        sums = inf.compute_correction_sums(ctx.spec, ctx.params, x, kfac, weights=w)
    return {**sums.arrays, "n": np.asarray(sums.n, np.int64)}


def _kronecker_sums(ctx: BuildContext, kind: str, kfac: inf.KroneckerCurvature | None) -> inf.KroneckerSums:
    """The "factors" (or with `kfac`, "correction") sums over every training row, as per-chunk partial sums
    (`indexer.shards.sum_chunks`: on the actor pool in a distributed build)."""
    from .shards import sum_chunks

    n = len(ctx.split("train")[1])
    rows = min(KRONECKER_ROWS, n)
    name = "kronecker_factor_sums" if kfac is None else "kronecker_correction_sums"
    remote_ctx = dataclasses.replace(ctx, task=None, progress=False)  # what a worker needs: head, run files
    total = sum_chunks(
        ctx,
        name,
        -(-n // rows),
        functools.partial(_kronecker_chunk, remote_ctx, rows, kfac),
        desc="kronecker factors" if kfac is None else "ekfac correction",
    )
    count = int(total.pop("n"))
    return inf.KroneckerSums(kind=kind, arrays=total, n=count)


def kronecker_stage(ctx: BuildContext) -> ManifestPatch:
    """K-FAC factors A_l, G_l of the head's GGN (one pass), their eigenbases, and the EK-FAC eigenvalue correction
    in those bases (a second pass): arrays "kronecker_bases", "kfac_eigenvalues", "ekfac_eigenvalues" and the
    block layout in the manifest (`extra["kronecker"]`); `influence.KroneckerCurvature.from_arrays` reads them.
    Both passes are sums over training rows, computed as per-chunk partial sums (shards of a distributed build)."""
    paths = ctx.paths
    sums = _kronecker_sums(ctx, "factors", None)
    kfac = inf.KroneckerCurvature.from_factors(inf.compute_kronecker_factors(ctx.spec, sums), l2=ctx.l2)
    ekfac = kfac.with_correction(_kronecker_sums(ctx, "correction", kfac))
    (kfac_arrays, description), (ekfac_arrays, _) = kfac.to_arrays(), ekfac.to_arrays()
    save_array(paths.array("kronecker_bases"), kfac_arrays["bases"])
    save_array(paths.array("kfac_eigenvalues"), kfac_arrays["eigenvalues"])
    save_array(paths.array("ekfac_eigenvalues"), ekfac_arrays["eigenvalues"])
    record = {k: v for k, v in description.items() if k not in ("kind", "damping")}
    return ManifestPatch(extra={"kronecker": record})


def load_kronecker(
    paths: RunPaths, extra: dict[str, Any], *, damping: float, prefix: str = ""
) -> dict[str, inf.KroneckerCurvature]:
    """The stored K-FAC and EK-FAC curvatures of a run ({} when its build has no "kronecker" stage).

    prefix "model_": those of scope="model"'s phi (stage "model-curvature"), described by extra["model"]["kronecker"].
    """
    record = (extra.get("model") or {}).get("kronecker") if prefix == "model_" else extra.get("kronecker")
    if record is None:
        return {}
    bases = np.asarray(load_array(paths.array(f"{prefix}kronecker_bases")))
    return {
        kind: inf.KroneckerCurvature.from_arrays(
            {"eigenvalues": np.asarray(load_array(paths.array(f"{prefix}{kind}_eigenvalues"))), "bases": bases},
            {**record, "kind": kind, "damping": damping},
        )
        for kind in inf.KRONECKER_KINDS
    }


def has_whitening_model(ctx: BuildContext) -> bool:
    """Whether the run projects its head gradients and has a curvature model to whiten them with: the EK-FAC of
    stage "kronecker" or the top eigenpairs of stage "curvature"."""
    if ctx.manifest.projection is None:
        return False
    return "kronecker" in ctx.manifest.extra or ctx.paths.array("curvature_top_eigenvalues").exists()


def whitening_powers(paths: RunPaths, extra: dict[str, Any], record: dict[str, Any]) -> tuple[Any, Any]:
    """(K^-1/2, K^1/2) as functions of rows [m, p] for the whitening model `record` describes (`extra["whitened"]`):
    {"model": "ekfac", "damping": d} the run's EK-FAC (`influence.KroneckerCurvature.power_fn`), K = Q (Lambda + l2
    + d) Q^T; otherwise ("spectral", and records written before the model was named) the spectral model of the
    curvature's top eigenpairs with the rest of the spectrum flattened (`influence.deflation_power`)."""
    damping = float(record["damping"])
    if record.get("model", "spectral") == "ekfac":
        ekfac = load_kronecker(paths, extra, damping=damping)["ekfac"]
        return ekfac.power_fn(-0.5), ekfac.power_fn(0.5)
    eigenvalues = np.asarray(load_array(paths.array("curvature_top_eigenvalues")), np.float64)
    vectors = load_array(paths.array("curvature_top_eigenvectors"))
    return (
        inf.deflation_power(eigenvalues, vectors, damping, -0.5),
        inf.deflation_power(eigenvalues, vectors, damping, 0.5),
    )


def _whitened_chunk(ctx: BuildContext, rows: int, half: Any, chunk: int) -> dict[str, np.ndarray]:
    """One chunk of the "whitened" stage: P K^-1/2 g_i of its rows (`half` = K^-1/2, `whitening_powers`)."""
    from .examples import head_gradients

    proj = ctx.manifest.projection
    assert proj is not None
    h, y = ctx.split("train")
    sl = slice(chunk * rows, min((chunk + 1) * rows, len(y)))
    g = head_gradients(ctx, h[sl], y[sl], project=False)
    whitened = np.asarray(half(jnp.asarray(g)), np.float32)
    return {"w": np.asarray(inf.project(whitened, seed=proj.seed, d=proj.dim), np.float32)}


def whitened_stage(ctx: BuildContext) -> ManifestPatch:
    """P K^-1/2 g_i of every training example -> FAISS space "grad-whitened" (see the module docstring); chunks
    on the actor pool in a distributed build (`indexer.shards.run_chunks`). K is the EK-FAC of stage "kronecker"
    when the run has it, else the spectral model of the top eigenpairs; both at the damping of the run's exact
    solve (`extra["damping"]`). The record `extra["whitened"]` names the model (`whitening_powers` reads it)."""
    from .shards import run_chunks, space_adder

    paths, proj = ctx.paths, ctx.manifest.projection
    assert proj is not None  # applies() checked it
    damping = float(ctx.manifest.extra["damping"])
    if "kronecker" in ctx.manifest.extra:
        record: dict[str, Any] = {"model": "ekfac", "damping": damping}
    else:
        rank = len(load_array(paths.array("curvature_top_eigenvalues")))
        record = {"model": "spectral", "damping": damping, "rank": rank}
    half, _ = whitening_powers(paths, ctx.manifest.extra, record)
    n = len(ctx.split("train")[1])
    # as many rows per chunk as the "grad" stage: each chunk regenerates the seeded projection (p x d draws),
    # which dominated this stage at 256 rows (1,181 s vs 364 s for "grad" at 60k rows, experiments/ray_scale.py)
    rows = min(ctx.config.chunk_rows, 1024)
    vectors = ctx.chunked(paths.array("whitened_vectors"), shape=(n, proj.dim), dtype=np.float32, chunk_rows=rows)
    remote_ctx = dataclasses.replace(ctx, task=None, progress=False)
    run_chunks(
        ctx,
        "whitened_vectors",
        vectors.missing_chunks(),
        functools.partial(_whitened_chunk, remote_ctx, rows, half),
        lambda chunk, out: vectors.write_chunk(chunk, out["w"]),
        desc="whitened gradients",
    )
    vecs = np.ascontiguousarray(vectors.array())
    vectors.close()
    add = space_adder(ctx, "whitened_vectors")
    index, space = build_vector_index(vecs, ctx.ids("train"), factory=ctx.config.factory, add=add)
    index.save(paths.vector("grad-whitened"))
    return ManifestPatch(spaces={"grad-whitened": space}, extra={"whitened": record})
