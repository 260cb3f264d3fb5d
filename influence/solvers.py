"""Inverse curvature-vector products s = (C + l2 I + damping I)^-1 v.

LiSSA (stochastic/truncated Neumann series):

    x_0 = v,   x_{j+1} = v + x_j - (A x_j) / scale,   s ~= x_depth / scale,   A = C + l2 I + damping I

which converges to A^-1 v when 0 < eig(A) < 2 scale; the error after depth steps is at most
(1 - lambda_min / scale)^depth ||A^-1 v||. The automatic depth is therefore ~ scale / lambda_min ln(1 / tol),
i.e. proportional to the condition number lambda_max / lambda_min.

Deflated LiSSA (``solve_lissa(..., deflation=(eigenvalues, U))``): with the top-r eigenpairs
A u_j = lambda_j u_j of A = C + l2 I (``influence.eigen.compute_top_eigenpairs``), P = I - U U^T and
D = diag(lambda + damping),

    x = U D^-1 U^T v  +  LiSSA of P (A + damping I) P  on  P v

The first term solves the top subspace exactly; the LiSSA part only sees the spectrum left in range(P), whose
top is lambda_{r+1} + damping, so its scale, and with it the automatic depth, drop by ~ lambda_1 / lambda_{r+1}.
This is exact in exact arithmetic because U spans an invariant subspace: A U = U diag(lambda) implies A P = P A,
so A^-1 = U diag(1/lambda) U^T + (P A P)^-1 on range(P) and the two parts never mix. It runs as the preconditioned
Richardson iteration (the LiSSA recursion with the scalar 1 / scale replaced by M^-1)

    M^-1 = U D^-1 U^T + P / scale,   x_0 = M^-1 v,   x_{j+1} = x_j + M^-1 (v - (A + damping I) x_j)

which, for exact eigenpairs, equals the split above step by step (the U-part is exact after x_0; the P-part is
the scaled LiSSA recursion y_{j+1} = y_j + (P v - P (A + damping I) y_j) / scale), and for merely approximate
eigenvectors still has the exact fixed point x = (A + damping I)^-1 v (M^-1 is SPD, so it converges while the
eigenvalues of M^-1 (A + damping I) stay in (0, 2)). With r = 0 it is plain LiSSA.

Exact alternatives: an eigendecomposition of the dense curvature (``EigenSolver``, reusable across damping
values) and a dense linear solve (``solve_exact``).

References: Agarwal, Bullins & Hazan 2017, "Second-Order Stochastic Optimization for Machine Learning in
Linear Time" (arXiv:1602.03943); Koh & Liang 2017, "Understanding Black-box Predictions via Influence
Functions" (arXiv:1703.04730); deflation: Saad 2003, "Iterative Methods for Sparse Linear Systems", 2nd ed.,
ch. 9-10 (preconditioned Richardson / deflation), and Frank & Vuik 2001, "On the construction of deflation-based
preconditioners" (SIAM J. Sci. Comput. 23(2)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from jax.typing import ArrayLike, DTypeLike

from influence.checks import check_rows, is_int, is_real
from influence.hvp import MatVec, as_matvec_pytree

AUTO_DAMPING_RATIO = 1e-3
"""Automatic damping keeps lambda_min(C + l2 I + damping I) >= 1e-3 lambda_max (condition number <= ~1000)."""

MAX_SCALE_DOUBLINGS = 5


class LissaDivergenceError(RuntimeError):
    """LiSSA stayed non-finite or worse than x = 0 after the scale was doubled MAX_SCALE_DOUBLINGS times."""


@dataclass(frozen=True, kw_only=True)
class LissaConfig:
    """Options of the LiSSA solver; None means automatic.

    Attributes:
        depth: recursion steps; None = min(max_depth, ceil(scale / lambda_floor * ln(1 / tol))).
        scale: must exceed lambda_max(C + l2 I + damping I) / 2; None = scale_factor x (lambda_max + damping),
            lambda_max a power-iteration estimate (with deflation: of the non-deflated remainder).
        damping: added to the diagonal; None = ``compute_damping`` (max(0, 1e-3 lambda_max - l2)).
        repeats: independent runs averaged (only useful for stochastic matvecs).
        max_depth: cap on the automatic depth.
        power_iters: power-iteration steps for the top eigenvalue.
        tol: target relative error used by the automatic depth.
        seed: seed of the power-iteration start vector.
        scale_factor: automatic scale / (lambda_max + damping); must be > 0.5 (convergence needs
            scale > lambda_max / 2), so any factor f tolerates a lambda_max underestimate by up to 2 f.
    """

    depth: int | None = None
    scale: float | None = None
    damping: float | None = None
    repeats: int = 1
    max_depth: int = 20_000
    power_iters: int = 100
    tol: float = 1e-2
    seed: int = 0
    scale_factor: float = 1.5

    def __post_init__(self) -> None:
        if self.depth is not None and (not is_int(self.depth) or self.depth <= 0):
            raise ValueError(f"depth must be a positive int or None, got {self.depth!r}")
        if self.scale is not None and (not is_real(self.scale) or not math.isfinite(self.scale) or self.scale <= 0):
            raise ValueError(f"scale must be a finite float > 0 or None, got {self.scale!r}")
        if self.damping is not None and (
            not is_real(self.damping) or not math.isfinite(self.damping) or self.damping < 0
        ):
            raise ValueError(f"damping must be a finite float >= 0 or None, got {self.damping!r}")
        if not is_int(self.repeats) or self.repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {self.repeats!r}")
        if not is_int(self.max_depth) or self.max_depth < 1:
            raise ValueError(f"max_depth must be an int >= 1, got {self.max_depth!r}")
        if not is_int(self.power_iters) or self.power_iters < 1:
            raise ValueError(f"power_iters must be an int >= 1, got {self.power_iters!r}")
        if not is_real(self.tol) or not 0 < self.tol < 1:
            raise ValueError(f"tol must be a float in (0, 1), got {self.tol!r}")
        if not is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not is_real(self.scale_factor) or not math.isfinite(self.scale_factor) or self.scale_factor <= 0.5:
            raise ValueError(f"scale_factor must be a finite float > 0.5, got {self.scale_factor!r}")


@dataclass(frozen=True)
class SolveResult:
    """Solutions of (C + l2 I + damping I) x = v for each row v of V.

    Attributes:
        x: solutions [m, p].
        residual: ||(C + l2 I + damping I) x - v|| / ||v|| per row [m] (0 where v = 0).
        method: solver name.
        depth: LiSSA steps run (0 for direct solvers).
        scale: LiSSA scale finally used (after any divergence-guard doublings).
        damping: damping added on top of the matvec.
        top_eigenvalue: the lambda_max estimate of the matvec used (NaN when not computed).
        deflation_rank: number r of eigenpairs deflated (0 for plain LiSSA and direct solvers).
        deflated_top_eigenvalue: the lambda_max estimate of the non-deflated remainder P (C + l2 I) P
            that set the automatic scale (NaN without deflation).
    """

    x: np.ndarray
    residual: np.ndarray
    method: str
    depth: int
    scale: float
    damping: float
    top_eigenvalue: float = float("nan")
    deflation_rank: int = 0
    deflated_top_eigenvalue: float = float("nan")


def estimate_top_eigenvalue(
    matvec: MatVec, p: int, *, iters: int = 100, seed: int = 0, dtype: DTypeLike = jnp.float64
) -> float:
    """Estimates the largest-magnitude eigenvalue of a symmetric matvec by power iteration.

    u_0 ~ N(0, I), u_{k+1} = A u_k / ||A u_k||; returns the Rayleigh quotient u^T A u / u^T u.

    Args:
        matvec: v -> A v on vectors [p].
        p: dimension.
        iters: power-iteration steps.
        seed: seed of the random start.
        dtype: dtype of the iterate.

    Returns:
        the eigenvalue estimate (a float; <= the true value for PSD A).
    """
    if not is_int(p) or p <= 0:
        raise ValueError(f"p must be a positive int, got {p!r}")
    if not is_int(iters) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    u = jax.random.normal(jax.random.PRNGKey(seed), (p,), dtype=dtype)
    u = u / jnp.linalg.norm(u)
    for _ in range(iters):
        w = jnp.asarray(matvec(u)).astype(dtype)
        norm = jnp.linalg.norm(w)
        if not bool(jnp.isfinite(norm)) or float(norm) == 0.0:
            break
        u = w / norm
    return float(jnp.vdot(u, jnp.asarray(matvec(u)).astype(dtype)) / jnp.vdot(u, u))


def lissa(
    matvec: MatVec,
    v: jax.Array,
    *,
    depth: int | jax.Array,
    scale: float | jax.Array,
    damping: float | jax.Array,
) -> jax.Array:
    """Estimates (A + damping I)^-1 v by the LiSSA recursion, A the matrix of matvec.

    x_0 = v, x_{j+1} = v + x_j - (A x_j + damping x_j) / scale, result x_depth / scale.
    Converges when 0 < eig(A + damping I) < 2 scale; error <= (1 - lambda_min / scale)^depth ||solution||.
    Pure: ``lax.fori_loop`` with depth static or traced; batch over rows of V [m, p] with ``jax.vmap``.

    Reference: Agarwal, Bullins & Hazan 2017 (arXiv:1602.03943); Koh & Liang 2017 (arXiv:1703.04730).

    Args:
        matvec: v -> A v on vectors [p].
        v: right-hand side [p].
        depth: recursion steps.
        scale: scale (> lambda_max(A + damping I) / 2).
        damping: added to the diagonal.

    Returns:
        the estimate [p], in the dtype of v.
    """
    v = jnp.asarray(v)

    def body(_: Any, x: jax.Array) -> jax.Array:
        ax = jnp.asarray(matvec(x)).astype(v.dtype) + damping * x
        return v + x - ax / scale

    return jax.lax.fori_loop(0, depth, body, v) / scale


def compute_damping(reference_eigenvalue: float, l2: float, override: float | None = None) -> float:
    """Returns the damping d of (C + l2 I + d I): override unchanged, else max(0, 1e-3 reference - l2).

    The package's one damping rule. reference is the top eigenvalue of the operator the solver iterates on
    (``influence.curvature.reference_eigenvalue``: lambda_max of C + l2 I, or with deflation the largest
    non-deflated one). The automatic choice lifts the smallest eigenvalue of C + l2 I + d I (C PSD) to at least
    1e-3 reference, so the condition number LiSSA sees is <= ~1000 and it converges within its automatic depth
    (~1500 ln(1/tol) steps); when l2 alone already does that, no damping is added. Damping biases the solution
    towards g / d in flat directions, the usual regularisation of influence functions (Koh & Liang 2017,
    arXiv:1703.04730).

    Args:
        reference_eigenvalue: the top eigenvalue of the operator, l2 included.
        l2: the L2 coefficient already in the operator.
        override: an explicit damping (>= 0), or None for automatic.
    """
    if override is not None:
        if not is_real(override) or not math.isfinite(override) or override < 0:
            raise ValueError(f"damping must be a finite float >= 0 or None, got {override!r}")
        return float(override)
    if not is_real(reference_eigenvalue) or not math.isfinite(reference_eigenvalue):
        raise ValueError(f"top_eigenvalue must be finite, got {reference_eigenvalue!r}")
    return max(0.0, AUTO_DAMPING_RATIO * float(reference_eigenvalue) - float(l2))


def resolve_damping(top_eigenvalue: float, l2: float, damping: float | None) -> float:
    """Deprecated name of ``compute_damping(top_eigenvalue, l2, damping)`` (kept until its callers switch)."""
    return compute_damping(top_eigenvalue, l2, damping)


def _auto_depth(config: LissaConfig, scale: float, floor: float) -> int:
    if config.depth is not None:
        return int(config.depth)
    if floor <= 0:
        return config.max_depth
    return int(min(config.max_depth, max(1, math.ceil(scale / floor * math.log(1.0 / config.tol)))))


def _residuals(batched_matvec: MatVec, x: jax.Array, v: jax.Array, damping: float) -> np.ndarray:
    r = jnp.asarray(batched_matvec(x)).astype(v.dtype) + damping * x - v
    r_norm = np.asarray(jnp.linalg.norm(r, axis=1), dtype=np.float64)
    v_norm = np.asarray(jnp.linalg.norm(v, axis=1), dtype=np.float64)
    zero = v_norm == 0
    out = np.where(zero, 0.0, r_norm / np.where(zero, 1.0, v_norm))
    return np.where(np.isfinite(out), out, np.inf)


@jax.jit
def _lissa_run(mv: Partial, V: jax.Array, depth: jax.Array, scale: jax.Array, damping: jax.Array) -> jax.Array:
    """Plain LiSSA for all rows of V at once; the matvec pytree is an argument (its rows are traced, not
    constants), so one compilation serves every matvec of the same head, shapes and dtypes."""
    return jax.vmap(lambda v: lissa(mv, v, depth=depth, scale=scale, damping=damping))(V)


@jax.jit
def _deflated_run(
    mv: Partial,
    V: jax.Array,
    U: jax.Array,
    inv_top: jax.Array,
    depth: jax.Array,
    scale: jax.Array,
    damping: jax.Array,
) -> jax.Array:
    """Deflated LiSSA for all rows of V at once: one ``lax.fori_loop`` around the vmapped matvec.

    (V [m, p], U [p, r], inv_top [r], depth, scale, damping) -> X [m, p]; see the module docstring.
    """
    batched = jax.vmap(mv)
    Ut = U.T.copy()  # [r, p], laid out once outside the loop
    gain = inv_top - 1.0 / scale

    def precondition(R: jax.Array) -> jax.Array:
        # M^-1 R = U D^-1 U^T R + (I - U U^T) R / scale = R / scale + U (D^-1 - I / scale) U^T R, by rows.
        return R / scale + ((R @ U) * gain) @ Ut

    def body(_: Any, X: jax.Array) -> jax.Array:
        AX = jnp.asarray(batched(X)).astype(V.dtype) + damping * X
        return X + precondition(V - AX)

    return jax.lax.fori_loop(0, depth, body, precondition(V))


def _check_deflation(deflation: Any, p: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(deflation, tuple | list) or len(deflation) != 2:
        raise ValueError(
            f"deflation must be a tuple (eigenvalues [r], eigenvectors [p, r]) or None, got {type(deflation).__name__}"
        )
    eigenvalues = np.asarray(deflation[0])
    U = np.asarray(deflation[1])
    if eigenvalues.ndim != 1 or U.ndim != 2 or U.shape != (p, eigenvalues.shape[0]):
        raise ValueError(
            f"deflation must hold eigenvalues [r] and eigenvectors [{p}, r], got shapes {eigenvalues.shape} "
            f"and {U.shape}"
        )
    if not (np.issubdtype(eigenvalues.dtype, np.floating) and np.issubdtype(U.dtype, np.floating)):
        raise ValueError(f"deflation arrays must be floating, got dtypes {eigenvalues.dtype} and {U.dtype}")
    if not (np.all(np.isfinite(eigenvalues)) and np.all(np.isfinite(U))):
        raise ValueError("deflation eigenvalues and eigenvectors must be finite, got NaN or inf entries")
    if eigenvalues.shape[0] > 0:
        # Gram check through XLA: numpy's BLAS is far slower here on a busy CPU and this runs per query.
        U_dev = jnp.asarray(U, dtype=jnp.float64)
        gram_err = float(jnp.max(jnp.abs(U_dev.T @ U_dev - jnp.eye(eigenvalues.shape[0], dtype=jnp.float64))))
        if gram_err > 1e-3:
            raise ValueError(
                f"deflation eigenvectors must be orthonormal columns, got max |U^T U - I| = {gram_err:.3g}"
            )
    return eigenvalues.astype(np.float64), U


def solve_lissa(
    matvec: MatVec,
    V: ArrayLike,
    *,
    config: LissaConfig,
    l2: float = 0.0,
    min_eigenvalue_floor: float | None = None,
    top_eigenvalue: float | None = None,
    deflation: tuple[np.ndarray, np.ndarray] | None = None,
    deflated_top_eigenvalue: float | None = None,
) -> SolveResult:
    """Solves (A + damping I) x = v for every row of V by (deflated) LiSSA, A = C + l2 I the matrix of matvec.

    lambda_max(A) is estimated once by power iteration (or taken from ``top_eigenvalue``, or from the largest
    deflated eigenvalue); damping is ``compute_damping(lambda_max, l2, config.damping)``. Without deflation,
    scale = config.scale_factor (lambda_max + damping) unless given. With ``deflation=(eigenvalues [r], U [p, r])``, the
    top-r eigenpairs of A, the U-part is solved exactly and LiSSA runs on the remainder P (A + damping I) P,
    P = I - U U^T (see the module docstring), with scale = config.scale_factor (lambda_rest + damping), lambda_rest =
    ``deflated_top_eigenvalue`` or by default min(eigenvalues) = lambda_r, an upper bound on lambda_{r+1} (the largest
    non-deflated eigenvalue) when the pairs are the top r. The automatic depth is
    min(max_depth, ceil(scale / floor * ln(1 / tol))) with floor = min_eigenvalue_floor (default l2 + damping,
    a lower bound on the spectrum for PSD C), or max_depth when floor is 0; deflation leaves the floor alone,
    so it shortens the depth by ~ lambda_max / lambda_rest. ``deflation=None`` or r = 0 is plain LiSSA.
    All m right-hand sides run at once (one jitted ``lax.fori_loop`` around the vmapped matvec). Divergence
    guard: while any result is non-finite or has residual > 1 (worse than x = 0), the scale is doubled and the
    solve rerun, at most MAX_SCALE_DOUBLINGS times; after that ``LissaDivergenceError`` is raised (C is then
    not PSD enough for LiSSA, or the deflation pairs are not eigenpairs of this matvec: use GGN curvature or
    more damping). Residuals are of the full x.

    Reference: Agarwal, Bullins & Hazan 2017 (arXiv:1602.03943); Koh & Liang 2017 (arXiv:1703.04730);
    deflation: Saad 2003, "Iterative Methods for Sparse Linear Systems", ch. 9.

    Args:
        matvec: v -> (C + l2 I) v on vectors [p] (vmap-able).
        V: right-hand sides [m, p].
        config: LiSSA options.
        l2: the L2 coefficient already inside matvec (used for automatic damping and the default floor).
        min_eigenvalue_floor: lower bound on lambda_min(C + l2 I + damping I) for the automatic depth.
        top_eigenvalue: precomputed lambda_max(C + l2 I), to skip the power iteration.
        deflation: (eigenvalues [r], eigenvectors [p, r] orthonormal columns) of C + l2 I (the matvec itself,
            l2 included, damping not), e.g. from ``influence.eigen.compute_top_eigenpairs``; None = plain LiSSA.
        deflated_top_eigenvalue: lambda_max of the non-deflated remainder (e.g. the (r+1)-th computed
            eigenvalue); None = min(deflation eigenvalues). Ignored without deflation.

    Returns:
        a SolveResult with x [m, p] in the dtype of V and one residual per row.
    """
    if not isinstance(config, LissaConfig):
        raise ValueError(f"config must be a LissaConfig, got {type(config).__name__}")
    if not is_real(l2) or not math.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2 must be a finite float >= 0, got {l2!r}")
    if min_eigenvalue_floor is not None and (not is_real(min_eigenvalue_floor) or min_eigenvalue_floor < 0):
        raise ValueError(f"min_eigenvalue_floor must be a float >= 0 or None, got {min_eigenvalue_floor!r}")
    if deflated_top_eigenvalue is not None and (
        not is_real(deflated_top_eigenvalue) or not math.isfinite(deflated_top_eigenvalue)
    ):
        raise ValueError(f"deflated_top_eigenvalue must be a finite float or None, got {deflated_top_eigenvalue!r}")
    V = check_rows(V, "V")
    p = V.shape[1]
    if deflation is None:
        eigenvalues, U = np.zeros(0, np.float64), np.zeros((p, 0), np.float64)
    else:
        eigenvalues, U = _check_deflation(deflation, p)
    rank = int(eigenvalues.shape[0])
    needs_top = config.scale is None or config.damping is None
    if top_eigenvalue is None and needs_top:
        if rank > 0:
            top_eigenvalue = float(np.max(eigenvalues))
        else:
            top_eigenvalue = estimate_top_eigenvalue(matvec, p, iters=config.power_iters, seed=config.seed)
    top = float("nan") if top_eigenvalue is None else float(top_eigenvalue)
    damping = compute_damping(top, l2, config.damping)
    rest = float("nan")
    if rank > 0:
        if float(np.min(eigenvalues)) + damping <= 0:
            raise ValueError(
                f"deflation eigenvalues + damping must be > 0, got min eigenvalue {float(np.min(eigenvalues))!r} "
                f"with damping={damping!r}"
            )
        rest = float(deflated_top_eigenvalue) if deflated_top_eigenvalue is not None else float(np.min(eigenvalues))
        scale_top = rest
    else:
        scale_top = top
    scale = float(config.scale) if config.scale is not None else config.scale_factor * (scale_top + damping)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(
            f"automatic scale is {scale!r} from top_eigenvalue={scale_top!r}: the curvature must be positive; "
            "pass LissaConfig(scale=...) explicitly"
        )
    floor = float(min_eigenvalue_floor) if min_eigenvalue_floor is not None else float(l2) + damping

    mv = as_matvec_pytree(matvec)
    batched_matvec = jax.vmap(mv)
    damping_arr = jnp.asarray(damping, dtype=V.dtype)
    if rank > 0:
        U_arr = jnp.asarray(U, dtype=V.dtype)
        inv_top = jnp.asarray(1.0 / (eigenvalues + damping), dtype=V.dtype)
    for attempt in range(MAX_SCALE_DOUBLINGS + 1):
        depth = _auto_depth(config, scale, floor)
        x = jnp.zeros_like(V)
        for _ in range(config.repeats):
            if rank > 0:
                scale_arr = jnp.asarray(scale, dtype=V.dtype)
                x = x + _deflated_run(mv, V, U_arr, inv_top, jnp.asarray(depth), scale_arr, damping_arr)
            else:
                x = x + _lissa_run(mv, V, jnp.asarray(depth), jnp.asarray(scale, dtype=V.dtype), damping_arr)
        x = x / config.repeats
        residual = _residuals(batched_matvec, x, V, damping)
        if bool(jnp.all(jnp.isfinite(x))) and bool(np.all(residual <= 1.0)):
            return SolveResult(
                x=np.asarray(x),
                residual=residual,
                method="lissa",
                depth=depth,
                scale=scale,
                damping=damping,
                top_eigenvalue=top,
                deflation_rank=rank,
                deflated_top_eigenvalue=rest,
            )
        if attempt < MAX_SCALE_DOUBLINGS:
            scale *= 2.0
    raise LissaDivergenceError(
        f"LiSSA diverged (non-finite or residual > 1, max residual {float(np.max(residual)):.3g}) even with "
        f"scale={scale:.6g} after {MAX_SCALE_DOUBLINGS} doublings, damping={damping:.6g}: the curvature is "
        "probably not positive definite (or the deflation pairs are not its eigenpairs); use curvature='ggn' "
        "or a larger damping"
    )


class EigenSolver:
    """Exact inverse via one eigendecomposition C = Q diag(lambda) Q^T (float64), reusable for any damping.

    solve(v) = Q diag(1 / (lambda + damping)) Q^T v.
    """

    def __init__(self, eigenvalues: np.ndarray, eigenvectors: np.ndarray) -> None:
        eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
        eigenvectors = np.asarray(eigenvectors, dtype=np.float64)
        if eigenvalues.ndim != 1 or eigenvalues.size == 0:
            raise ValueError(f"eigenvalues must have shape [p] with p >= 1, got shape {eigenvalues.shape}")
        p = eigenvalues.shape[0]
        if eigenvectors.shape != (p, p):
            raise ValueError(f"eigenvectors must have shape ({p}, {p}), got shape {eigenvectors.shape}")
        if not (np.all(np.isfinite(eigenvalues)) and np.all(np.isfinite(eigenvectors))):
            raise ValueError("eigenvalues and eigenvectors must be finite, got NaN or inf entries")
        order = np.argsort(eigenvalues)
        self.eigenvalues = eigenvalues[order]
        self.eigenvectors = eigenvectors[:, order]

    @classmethod
    def from_dense(cls, C: np.ndarray) -> EigenSolver:
        """Builds the solver from a dense symmetric curvature C [p, p] (symmetrised, eigh in float64)."""
        C = np.asarray(C, dtype=np.float64)
        if C.ndim != 2 or C.shape[0] != C.shape[1] or C.shape[0] == 0:
            raise ValueError(f"C must be a square matrix [p, p], got shape {C.shape}")
        if not np.all(np.isfinite(C)):
            raise ValueError("C must be finite, got NaN or inf entries")
        eigenvalues, eigenvectors = np.linalg.eigh(0.5 * (C + C.T))
        return cls(eigenvalues, eigenvectors)

    @classmethod
    def from_arrays(cls, eigenvalues: np.ndarray, eigenvectors: np.ndarray) -> EigenSolver:
        """Rebuilds the solver from ``to_arrays()``: eigenvalues [p], eigenvectors [p, p] as columns."""
        return cls(eigenvalues, eigenvectors)

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns (eigenvalues [p] ascending, eigenvectors [p, p] as columns), float64, for persistence."""
        return self.eigenvalues.copy(), self.eigenvectors.copy()

    @property
    def top_eigenvalue(self) -> float:
        """Largest eigenvalue of C."""
        return float(self.eigenvalues[-1])

    @property
    def min_eigenvalue(self) -> float:
        """Smallest eigenvalue of C."""
        return float(self.eigenvalues[0])

    def solve(self, V: np.ndarray, *, damping: float = 0.0) -> np.ndarray:
        """Returns (C + damping I)^-1 v for each row v of V [m, p] (or a single v [p]), in V's float dtype.

        Raises:
            ValueError: if some lambda + damping <= 0 (up to rounding): the system is singular or indefinite.
        """
        if not is_real(damping) or not math.isfinite(damping):
            raise ValueError(f"damping must be a finite float, got {damping!r}")
        V_arr = np.asarray(V)
        p = self.eigenvalues.shape[0]
        if V_arr.shape[-1:] != (p,) or V_arr.ndim not in (1, 2):
            raise ValueError(f"V must have shape [m, {p}] or [{p}], got shape {V_arr.shape}")
        shifted = self.eigenvalues + float(damping)
        threshold = p * np.finfo(np.float64).eps * max(1.0, float(np.max(np.abs(shifted))))
        if shifted[0] <= threshold:
            raise ValueError(
                f"damping={damping!r} makes the system singular or indefinite: min eigenvalue "
                f"{self.min_eigenvalue!r} + damping = {shifted[0]!r} <= {threshold:.3g}"
            )
        Q = self.eigenvectors
        coeffs = V_arr.astype(np.float64) @ Q
        x = (coeffs / shifted) @ Q.T
        out_dtype = V_arr.dtype if np.issubdtype(V_arr.dtype, np.floating) else np.float64
        return x.astype(out_dtype)


def solve_exact(C: np.ndarray, V: np.ndarray, *, damping: float = 0.0) -> np.ndarray:
    """Returns (C + damping I)^-1 v for each row v of V [m, p] (or v [p]) by ``jnp.linalg.solve``.

    Args:
        C: dense curvature [p, p].
        V: right-hand sides [m, p] or [p].
        damping: added to the diagonal.
    """
    C_arr = jnp.asarray(C)
    V_arr = jnp.asarray(V)
    if C_arr.ndim != 2 or C_arr.shape[0] != C_arr.shape[1]:
        raise ValueError(f"C must be a square matrix [p, p], got shape {C_arr.shape}")
    if V_arr.shape[-1:] != (C_arr.shape[0],) or V_arr.ndim not in (1, 2):
        raise ValueError(f"V must have shape [m, {C_arr.shape[0]}] or [{C_arr.shape[0]}], got shape {V_arr.shape}")
    A = C_arr + damping * jnp.eye(C_arr.shape[0], dtype=C_arr.dtype)
    x = jnp.linalg.solve(A, V_arr.T).T
    return np.asarray(x)
