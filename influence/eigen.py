"""Top eigenpairs of a symmetric PSD curvature matvec, for deflating LiSSA.

Block subspace iteration (a randomized range finder with power steps) followed by Rayleigh-Ritz
(orth = CholeskyQR2 with a shift, Fukaya, Kannan, Nakatsukasa, Yamamoto & Yanagisawa 2020, arXiv:1809.11085):

    Q_0 = orth(Omega),  Omega ~ N(0, 1)^{p x k},  k = rank + oversample
    Q_{t+1} = orth(A Q_t)                                   t = 0, ..., iters - 1
    B = Q^T A Q = S diag(theta) S^T,  eigenvalues theta (descending), eigenvectors Q S

The k columns of each product A Q come from one ``jax.vmap`` of the matvec, so one pass over the training
rows serves the whole block; the loop is one jitted ``lax.fori_loop``. The j-th Ritz pair converges like
(lambda_{k+1} / lambda_j)^iters (eigenvector) and its square (eigenvalue), so the oversampled columns speed up
the pairs that are returned; Ritz values never exceed the true eigenvalues (Cauchy interlacing).

References: Halko, Martinsson & Tropp 2011, "Finding structure with randomness" (arXiv:0909.4061), Alg. 4.4
and 5.3; Saad 2011, "Numerical Methods for Large Eigenvalue Problems", ch. 5 (subspace iteration).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np
from jax.tree_util import Partial
from jax.typing import DTypeLike

from influence.hvp import MatVec, as_matvec_pytree


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def compute_top_eigenpairs(
    matvec: MatVec,
    p: int,
    *,
    rank: int,
    iters: int = 25,
    oversample: int | None = None,
    seed: int = 0,
    dtype: DTypeLike = jnp.float64,
    subspace_matvec: MatVec | None = None,
    tol: float | None = None,
    max_iters: int = 1000,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns the top ``rank`` eigenpairs of a symmetric PSD matvec by block subspace iteration.

    The package's one top-eigenpair solver: the build's deflation pairs (fixed ``iters``) and the label-noise
    job's low-rank self-influence (``tol``) both call it.

    With ``subspace_matvec`` (e.g. the curvature over a seeded subsample of the training rows, an unbiased
    estimate of A), the power iterations use it and only the final Rayleigh-Ritz step uses ``matvec``: the
    returned pairs are exact Ritz pairs of A on a subspace found cheaply, the Ritz values still lower bounds
    of A's eigenvalues, and the cost is iters passes over the subsample plus one pass over all rows.

    Args:
        matvec: v -> A v on vectors [p] (vmap-able; e.g. ``make_head_matvec``, which gives C + l2 I).
        p: dimension.
        rank: number of pairs returned, 0 <= rank <= p.
        iters: subspace (power) iterations; each costs one batched matvec over rank + oversample vectors.
        oversample: extra columns iterated but not returned; None = max(10, rank // 2) (capped at p - rank).
        seed: seed of the Gaussian start block.
        dtype: dtype of the basis, the orthogonalisation and the results (matvec outputs are cast to it).
        subspace_matvec: a cheaper approximation of the matvec for the power iterations; None = matvec.
        tol: None = exactly ``iters`` iterations. Else, after them, the block keeps iterating (``iters`` more
            at a time, from the Ritz vectors) until every returned pair has ||A u_j - lambda_j u_j||
            <= tol lambda_1 (so each eigenvalue is within tol lambda_1 of one of A's, Weyl), or until
            ``max_iters`` iterations in all. Needs subspace_matvec=None (its pairs are not A's).
        max_iters: cap on the iterations when tol is given.

    Returns:
        (eigenvalues [rank] descending, eigenvectors [p, rank] with orthonormal columns), numpy arrays in dtype.
    """
    if not _is_int(p) or p <= 0:
        raise ValueError(f"p must be a positive int, got {p!r}")
    if not _is_int(rank) or not 0 <= rank <= p:
        raise ValueError(f"rank must be an int in [0, p={p}], got {rank!r}")
    if not _is_int(iters) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if oversample is not None and (not _is_int(oversample) or oversample < 0):
        raise ValueError(f"oversample must be an int >= 0 or None, got {oversample!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 < tol < 1:
            raise ValueError(f"tol must be a float in (0, 1) or None, got {tol!r}")
        if subspace_matvec is not None:
            raise ValueError("tol needs subspace_matvec=None: residuals are measured on matvec")
        if not _is_int(max_iters) or max_iters < 1:
            raise ValueError(f"max_iters must be an int >= 1, got {max_iters!r}")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if rank == 0:
        return np.zeros((0,), dtype=dtype), np.zeros((p, 0), dtype=dtype)
    extra = max(10, rank // 2) if oversample is None else int(oversample)
    k = min(p, rank + extra)

    eps = float(jnp.finfo(dtype).eps)

    def apply(mv: Partial, Q: jax.Array) -> jax.Array:
        # Q [p, k] -> A Q [p, k]: the matvec is vmapped over the k columns (one data pass for the block).
        return jnp.asarray(jax.vmap(mv)(Q.T)).astype(dtype).T

    def orth(Y: jax.Array) -> jax.Array:
        # Shifted CholeskyQR followed by one CholeskyQR pass (Fukaya et al. 2020): Gram matrices and a k x k
        # Cholesky only, far cheaper than Householder QR on CPU; the shift keeps the first Cholesky defined
        # when Y is ill-conditioned, the second pass restores orthogonality to working precision.
        G = Y.T @ Y
        shift = 11.0 * (p * k + k * (k + 1)) * eps * jnp.trace(G) + jnp.finfo(dtype).tiny
        for s in (shift, 0.0):
            R = jnp.linalg.cholesky(G + s * jnp.eye(k, dtype=dtype)).T
            Y = jax.scipy.linalg.solve_triangular(R, Y.T, trans="T", lower=False).T
            G = Y.T @ Y
        return Y

    @jax.jit
    def run(mv: Partial, sub: Partial, omega: jax.Array, n_iters: jax.Array) -> tuple[jax.Array, jax.Array]:
        Q0 = orth(omega)
        Q = jax.lax.fori_loop(0, n_iters, lambda _, Q: orth(apply(sub, Q)), Q0)
        B = Q.T @ apply(mv, Q)
        theta, S = jnp.linalg.eigh(0.5 * (B + B.T))
        order = jnp.argsort(-theta)
        theta, S = theta[order], S[:, order]
        return theta, Q @ S

    omega = jax.random.normal(jax.random.PRNGKey(seed), (p, k), dtype=dtype)
    # The matvec's arrays enter as arguments, not as constants XLA would fold at compile time.
    mv = as_matvec_pytree(matvec)
    sub = mv if subspace_matvec is None else as_matvec_pytree(subspace_matvec)
    theta, vectors = run(mv, sub, omega, jnp.asarray(iters))
    done, step = iters, max(iters, 1)
    while tol is not None and _finite(theta, vectors) and done < max_iters:
        top = np.asarray(theta)[:rank]
        residual = eigenpair_residuals(mv, top, np.asarray(vectors)[:, :rank])
        if float(np.max(residual)) <= tol * abs(float(top[0])):
            break
        # restart from the Ritz vectors (an orthonormal basis of the current subspace, best pairs first)
        theta, vectors = run(mv, sub, vectors, jnp.asarray(min(step, max_iters - done)))
        done += step
    if not _finite(theta, vectors):
        raise ValueError("subspace iteration produced NaN or inf: the matvec is not finite")
    theta, vectors = np.asarray(theta), np.asarray(vectors)
    return theta[:rank].copy(), np.ascontiguousarray(vectors[:, :rank])


def _finite(theta: jax.Array, vectors: jax.Array) -> bool:
    return bool(jnp.all(jnp.isfinite(theta))) and bool(jnp.all(jnp.isfinite(vectors)))


def eigenpair_residuals(matvec: MatVec, eigenvalues: np.ndarray, eigenvectors: np.ndarray) -> np.ndarray:
    """Returns ||A u_j - lambda_j u_j|| for each pair (a posteriori accuracy check), float64 [r].

    For symmetric A some eigenvalue lies within this distance of lambda_j (Bauer-Fike / Weyl).
    """
    eigenvalues = np.asarray(eigenvalues)
    eigenvectors = np.asarray(eigenvectors)
    if eigenvalues.ndim != 1 or eigenvectors.ndim != 2 or eigenvectors.shape[1] != eigenvalues.shape[0]:
        raise ValueError(
            f"eigenvalues [r] and eigenvectors [p, r] must agree, got shapes {eigenvalues.shape} and "
            f"{eigenvectors.shape}"
        )
    if eigenvalues.shape[0] == 0:
        return np.zeros((0,), dtype=np.float64)
    U = jnp.asarray(eigenvectors, dtype=jnp.float64)
    AU = jnp.asarray(jax.vmap(matvec)(U.T), dtype=jnp.float64).T
    R = AU - U * jnp.asarray(eigenvalues, dtype=jnp.float64)
    return np.asarray(jnp.linalg.norm(R, axis=0), dtype=np.float64)
