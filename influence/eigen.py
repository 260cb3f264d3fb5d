"""Top eigenpairs of a symmetric PSD curvature matvec: for deflating LiSSA and for low-rank self-influence.

One solver, ``compute_top_eigenpairs``, with two algorithms. "subspace" (default): block subspace iteration (a
randomized range finder with power steps) followed by Rayleigh-Ritz (orth = CholeskyQR2 with a shift, Fukaya,
Kannan, Nakatsukasa, Yamamoto & Yanagisawa 2020, arXiv:1809.11085):

    Q_0 = orth(Omega),  Omega ~ N(0, 1)^{p x k},  k = rank + oversample
    Q_{t+1} = orth(A Q_t)                                   t = 0, ..., iters - 1
    B = Q^T A Q = S diag(theta) S^T,  eigenvalues theta (descending), eigenvectors Q S

The k columns of each product A Q come from one ``jax.vmap`` of the matvec, so one pass over the training
rows serves the whole block; the loop is one jitted ``lax.fori_loop``. The j-th Ritz pair converges like
(lambda_{k+1} / lambda_j)^iters (eigenvector) and its square (eigenvalue), so the oversampled columns speed up
the pairs that are returned; Ritz values never exceed the true eigenvalues (Cauchy interlacing).

"lanczos": implicitly restarted Lanczos (ARPACK through ``scipy.sparse.linalg.eigsh``, largest algebraic),
Krylov space K_m(A, v_0) = span(v_0, A v_0, ..., A^{m-1} v_0) with m = min(p, max(2 rank + 1, 20)) and Ritz
pairs of T_m = V_m^T A V_m, stopped at relative eigenvalue accuracy ``tol``. One vector per product, in float32
(the head's dtype), so it needs far fewer products than a block iteration for a loose ``tol``: the label-noise
job's choice; the subspace iteration suits one data pass per block (the build's deflation pairs).

References: Halko, Martinsson & Tropp 2011, "Finding structure with randomness" (arXiv:0909.4061), Alg. 4.4
and 5.3; Saad 2011, "Numerical Methods for Large Eigenvalue Problems", ch. 5 (subspace iteration) and ch. 6
(Lanczos); Lehoucq, Sorensen & Yang 1998, "ARPACK Users' Guide" (implicit restarts).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np
import scipy.sparse.linalg
from jax.tree_util import Partial
from jax.typing import DTypeLike

from influence.checks import is_int
from influence.hvp import MatVec, as_matvec_pytree

EIGEN_ALGORITHMS = ("subspace", "lanczos")


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
    algorithm: Literal["subspace", "lanczos"] = "subspace",
    tol: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns the top ``rank`` eigenpairs of a symmetric PSD matvec (the package's one top-eigenpair solver).

    algorithm="subspace" (default; the build's deflation pairs) is block subspace iteration, ``iters``,
    ``oversample``, ``dtype`` and ``subspace_matvec`` apply to it; algorithm="lanczos" (the label-noise job's
    low-rank self-influence) is ARPACK's Lanczos to relative accuracy ``tol``, in float64 (see the module
    docstring).

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
        algorithm: "subspace" or "lanczos".
        tol: relative accuracy of the eigenvalues ("lanczos" only).

    Returns:
        (eigenvalues [rank] descending, eigenvectors [p, rank] with orthonormal columns), numpy arrays in dtype
        ("subspace") or float64 ("lanczos").
    """
    if not is_int(p) or p <= 0:
        raise ValueError(f"p must be a positive int, got {p!r}")
    if not is_int(rank) or not 0 <= rank <= p:
        raise ValueError(f"rank must be an int in [0, p={p}], got {rank!r}")
    if not is_int(iters) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if oversample is not None and (not is_int(oversample) or oversample < 0):
        raise ValueError(f"oversample must be an int >= 0 or None, got {oversample!r}")
    if not is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if algorithm not in EIGEN_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {EIGEN_ALGORITHMS}, got {algorithm!r}")
    if rank == 0:
        return np.zeros((0,), dtype=dtype), np.zeros((p, 0), dtype=dtype)
    if algorithm == "lanczos":
        if subspace_matvec is not None:
            raise ValueError("subspace_matvec applies to algorithm='subspace' only")
        return _lanczos(matvec, p, rank=rank, seed=seed, tol=tol)
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
    theta, vectors = np.asarray(theta), np.asarray(vectors)
    if not (np.all(np.isfinite(theta)) and np.all(np.isfinite(vectors))):
        raise ValueError("subspace iteration produced NaN or inf: the matvec is not finite")
    return theta[:rank].copy(), np.ascontiguousarray(vectors[:, :rank])


def _lanczos(matvec: MatVec, p: int, *, rank: int, seed: int, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Top ``rank`` pairs by ARPACK's Lanczos (float32 products, float64 Krylov basis), descending."""
    if rank >= p:
        raise ValueError(f"algorithm='lanczos' needs rank < p={p}, got {rank!r}: use algorithm='subspace'")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 <= tol < 1:
        raise ValueError(f"tol must be a float in [0, 1), got {tol!r}")

    def mv(v: np.ndarray) -> np.ndarray:
        return np.asarray(matvec(jnp.asarray(np.asarray(v, np.float32).ravel())), np.float64)

    op = scipy.sparse.linalg.LinearOperator((p, p), matvec=mv, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(p)
    eigenvalues, vectors = scipy.sparse.linalg.eigsh(
        op, k=rank, which="LA", v0=v0, tol=tol, ncv=min(p, max(2 * rank + 1, 20))
    )
    order = np.argsort(eigenvalues)[::-1]
    return eigenvalues[order], vectors[:, order]


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
