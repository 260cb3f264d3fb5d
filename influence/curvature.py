"""Curvature operators of the two scopes: the operator, its damping, its deflation and interchangeable solvers.

Head scope (``HeadCurvature``): A = C + l2 I over the training set of the head, C the GGN or the Hessian of the
mean cross-entropy (``influence.hvp.make_head_matvec``), solved as

    x = (A + d I)^-1 g        "exact": Q diag(1 / (lambda + d)) Q^T g   (dense eigendecomposition, small heads)
                              "lissa": the iterative solve on the matvec: for a positive definite operator
                                       (GGN) conjugate gradients preconditioned by the deflated eigenpairs
                                       (``deflation_preconditioner``, ``influence.kfac.solve_pcg``), else
                                       deflated LiSSA (``influence.solvers.solve_lissa``)

Last-block scope (``ProjectedCurvature``): the Galerkin projection onto span(S), S [p, d] a random projection
(``indexer.block``), with phi = S^T g:

    A_S = S^T C S + l2 S^T S,   B = S^T S,   x = (p / d) (A_S + d B)^-1 phi
                              "exact": V diag(1 / (mu + d)) V^T phi,  A_S V = B V diag(mu), V^T B V = I
                              "lissa": LiSSA on M = A_S + d B deflated by M's own top eigenpairs

Damping (``compute_damping``, the one rule): d = max(0, 1e-3 lambda_ref - l2) unless given, lambda_ref the top
eigenvalue of the operator LiSSA iterates on (``reference_eigenvalue``): lambda_max(C + l2 I) without deflation,
else the smallest deflated eigenvalue, an upper bound on the largest non-deflated one; for the projected scope
the top Ritz value mu_max. LiSSA's condition number stays <= ~1000 while the damping, which biases scores, is as
small as possible.

References: Koh & Liang 2017 (arXiv:1703.04730); Agarwal, Bullins & Hazan 2017 (arXiv:1602.03943); Galerkin
projection / Rayleigh-Ritz on a pencil: Saad 2011, "Numerical Methods for Large Eigenvalue Problems", ch. 4;
random subspaces: Park et al. 2023, TRAK (arXiv:2303.14186).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.tree_util import Partial

from influence.checks import check_nonnegative, is_real
from influence.hvp import MatVec, as_matvec_pytree
from influence.kfac import solve_pcg
from influence.solvers import EigenSolver, LissaConfig, SolveResult, compute_damping, solve_lissa

__all__ = [
    "HeadCurvature",
    "ProjectedCurvature",
    "compute_damping",
    "deflation_power",
    "deflation_preconditioner",
    "pencil_eigenvalues",
    "pencil_eigh",
    "reference_eigenvalue",
]

SOLVE_METHODS = ("exact", "lissa")
ITERATIVE_SOLVERS = ("lissa", "cg")
#: the preconditioned CG stops at this fraction of LiSSA's target error (``LissaConfig.tol``), on the residual
PCG_TOL_FACTOR = 0.1
#: most curvature products of one preconditioned CG solve
PCG_MAX_ITER = 500


def _deflation_apply(U: jax.Array, top: jax.Array, rest: jax.Array, R: jax.Array) -> jax.Array:
    U = U.astype(R.dtype)
    C = R @ U
    return (C * top.astype(R.dtype)) @ U.T + (R - C @ U.T) * rest.astype(R.dtype)


def deflation_power(eigenvalues: np.ndarray, eigenvectors: np.ndarray, damping: float, exponent: float) -> Partial:
    """M^e R = U diag((lambda + d)^e) U^T R + (lambda_r + d)^e (I - U U^T) R on the rows of R [m, p]: the power e of
    the spectral model M of A + d I that keeps its top eigenpairs (U [p, r], lambda descending, lambda_r the
    smallest) and flattens the rest of the spectrum to lambda_r (``deflation_preconditioner`` is e = -1).

    Reference: spectral deflation preconditioners, Carpentieri, Duff & Giraud 2003 (SIAM J. Matrix Anal. Appl.
    25(3)); Frank & Vuik 2001, "On the construction of deflation-based preconditioners" (SIAM J. Sci. Comput.).
    """
    lam = np.asarray(eigenvalues, np.float64) + damping
    if lam.size == 0 or np.any(lam <= 0):
        raise ValueError(f"eigenvalues + damping must be > 0, got {lam[:5]!r}")
    return Partial(
        _deflation_apply,
        jnp.asarray(eigenvectors),
        jnp.asarray(lam**exponent),
        jnp.asarray(float(lam.min()) ** exponent),
    )


def deflation_preconditioner(eigenvalues: np.ndarray, eigenvectors: np.ndarray, damping: float) -> Partial:
    """M^-1 R = U diag(1 / (lambda + d)) U^T R + (I - U U^T) R / (lambda_r + d), rows of R [m, p].

    U [p, r] the top eigenvectors of A = C + l2 I with eigenvalues lambda (descending, lambda_r the smallest),
    d the damping. M^-1 (A + d I) maps the deflated subspace to 1 and the rest of the spectrum into
    [(l2 + d) / (lambda_r + d), 1], so preconditioned CG converges in ~ sqrt((lambda_r + d) / (l2 + d)) ln(2 / tol)
    products where LiSSA needs ~ (lambda_r + d) / (l2 + d) ln(1 / tol). M^-1 keeps every eigenvector of A outside
    span(U) an eigenvector (unlike a layer-wise preconditioner such as EK-FAC, which mixes in the exact null
    directions of ReLU rescaling and was measured ~3x slower than plain CG on a Fashion-MNIST MLP).
    """
    return deflation_power(eigenvalues, eigenvectors, damping, -1.0)


def _deflated_apply(U: jax.Array, top: jax.Array, rest: Partial, R: jax.Array) -> jax.Array:
    U = U.astype(R.dtype)
    C = R @ U
    Z = jnp.asarray(rest(R - C @ U.T)).astype(R.dtype)
    return (C * top.astype(R.dtype)) @ U.T + Z - (Z @ U) @ U.T


def deflated_inverse(eigenvalues: np.ndarray, eigenvectors: np.ndarray, damping: float, rest: Partial) -> Partial:
    """R -> U diag(1 / (lambda + d)) U^T R + P K^-1 P R on the rows of R [m, p], P = I - U U^T: the inverse of the
    curvature modelled as exact on its top eigenspace and by an approximation K (e.g. EK-FAC, whose inverse
    R -> K^-1 R is `rest`) on the rest.

    U [p, r] the top eigenvectors of A = C + l2 I with eigenvalues lambda, d the damping. Because span(U) is an
    invariant subspace of A, A^-1 = U diag(1 / lambda) U^T + (P A P)^+ exactly; this keeps the first term and replaces
    (P A P)^+ by P K^-1 P. With K = A + d I it is the exact inverse of A + d I; with r = 0 it is K^-1. One
    application: two thin products with U and one of K^-1, no curvature product over the training rows.

    Reference: two-level (deflated) preconditioning, Tang, Nabben, Vuik & Erlangga 2009, "Comparison of two-level
    preconditioners derived from deflation, domain decomposition and multigrid methods" (J. Sci. Comput. 39(3));
    EK-FAC: George et al. 2018 (arXiv:1806.03884).
    """
    lam = np.asarray(eigenvalues, np.float64) + damping
    if lam.size == 0 or np.any(lam <= 0):
        raise ValueError(f"eigenvalues + damping must be > 0, got {lam[:5]!r}")
    if not callable(rest):
        raise ValueError(f"rest must be a callable R -> K^-1 R, got {type(rest).__name__}")
    return Partial(_deflated_apply, jnp.asarray(eigenvectors), jnp.asarray(1.0 / lam), as_matvec_pytree(rest))


def _check_method(method: Any) -> str:
    if method not in SOLVE_METHODS:
        raise ValueError(f"method must be one of {SOLVE_METHODS}, got {method!r}")
    return method


def _lissa_diagnostics(damping: float, result: SolveResult) -> dict[str, float]:
    """Solver diagnostics: damping, depth (recursion steps or CG iterations), max residual; LiSSA's scale."""
    diag = {"damping": damping, "depth": float(result.depth), "residual_max": float(np.max(result.residual))}
    if math.isfinite(result.scale):
        diag["scale"] = result.scale
    return diag


def reference_eigenvalue(top_eigenvalue: float, deflation_eigenvalues: np.ndarray | None) -> float:
    """Returns lambda_ref of the damping rule: the top eigenvalue of the operator LiSSA iterates on.

    lambda_max of C + l2 I without deflation; with deflation the largest non-deflated eigenvalue, bounded
    above by min(deflated eigenvalues) = lambda_r (the deflated pairs are the top r).

    Args:
        top_eigenvalue: lambda_max of C + l2 I.
        deflation_eigenvalues: the r deflated eigenvalues [r], or None (no deflation).
    """
    if deflation_eigenvalues is None or np.size(deflation_eigenvalues) == 0:
        return float(top_eigenvalue)
    return float(np.min(deflation_eigenvalues))


def pencil_eigh(A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns the eigenpairs of the symmetrised pencil (A, B), largest first: A V = B V diag(mu), V^T B V = I.

    A and B are symmetrised as (A + A^T) / 2 and (B + B^T) / 2 (B positive definite), solved in float64 by
    LAPACK's generalized symmetric eigensolver (``scipy.linalg.eigh``).

    Args:
        A: [d, d] symmetric.
        B: [d, d] symmetric positive definite.

    Returns:
        (mu [d] descending, V [d, d] with B-orthonormal columns), float64.
    """
    A, B = _check_pencil(A, B)
    mu, V = scipy.linalg.eigh((A + A.T) / 2, (B + B.T) / 2)
    return mu[::-1].copy(), V[:, ::-1].copy()


def pencil_eigenvalues(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Returns the eigenvalues mu of the symmetrised pencil A v = mu B v, largest first, float64 [d].

    The values of ``pencil_eigh`` without the vectors (LAPACK's values-only path: the same values up to rounding).
    """
    A, B = _check_pencil(A, B)
    return scipy.linalg.eigh((A + A.T) / 2, (B + B.T) / 2, eigvals_only=True)[::-1].copy()


def _check_pencil(A: Any, B: Any) -> tuple[np.ndarray, np.ndarray]:
    A = np.asarray(A, np.float64)
    B = np.asarray(B, np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0 or B.shape != A.shape:
        raise ValueError(f"A and B must be square matrices [d, d] of one shape, got {A.shape} and {B.shape}")
    if not (np.all(np.isfinite(A)) and np.all(np.isfinite(B))):
        raise ValueError("A and B must be finite, got NaN or inf entries")
    return A, B


@dataclass(frozen=True, kw_only=True, eq=False)
class HeadCurvature:
    """C + l2 I over the training set of a head; solves (C + l2 I + damping I)^-1 g by "exact" or "lissa".

    Attributes:
        matvec: v -> (C + l2 I) v on vectors [p] (vmap-able; ``make_head_matvec``), damping not included.
        l2: the L2 coefficient inside the matvec.
        top_eigenvalue: lambda_max of C + l2 I (the build's estimate).
        damping: d, added on top of the matvec by every solver (``compute_damping``, or an explicit value).
        deflation: the top eigenpairs of C + l2 I (eigenvalues [r], eigenvectors [p, r]) deflated in LiSSA.
        eigen: the dense eigendecomposition of C + l2 I (heads small enough to have one), for "exact".
        iterative: how "lissa" solves: "lissa" (deflated LiSSA) or "cg" (conjugate gradients preconditioned by
            the deflation, ``deflation_preconditioner``; the operator must be positive definite, e.g. the GGN).
    """

    matvec: MatVec
    l2: float
    top_eigenvalue: float
    damping: float
    deflation: tuple[np.ndarray, np.ndarray] | None = None
    eigen: EigenSolver | None = None
    iterative: str = "lissa"

    def __post_init__(self) -> None:
        if not callable(self.matvec):
            raise ValueError(f"matvec must be callable v -> (C + l2 I) v, got {type(self.matvec).__name__}")
        check_nonnegative("l2", self.l2)
        check_nonnegative("damping", self.damping)
        if not is_real(self.top_eigenvalue) or not math.isfinite(self.top_eigenvalue):
            raise ValueError(f"top_eigenvalue must be a finite float, got {self.top_eigenvalue!r}")
        if self.deflation is not None and (not isinstance(self.deflation, tuple) or len(self.deflation) != 2):
            raise ValueError("deflation must be a tuple (eigenvalues [r], eigenvectors [p, r]) or None")
        if self.eigen is not None and not isinstance(self.eigen, EigenSolver):
            raise ValueError(f"eigen must be an EigenSolver or None, got {type(self.eigen).__name__}")
        if self.iterative not in ITERATIVE_SOLVERS:
            raise ValueError(f"iterative must be one of {ITERATIVE_SOLVERS}, got {self.iterative!r}")

    @classmethod
    def create(
        cls,
        *,
        matvec: MatVec,
        l2: float,
        top_eigenvalue: float,
        deflation: tuple[np.ndarray, np.ndarray] | None = None,
        eigen: EigenSolver | None = None,
        damping: float | None = None,
    ) -> HeadCurvature:
        """The operator with the damping of the one rule: ``compute_damping(reference_eigenvalue(...), l2,
        damping)`` (an explicit damping is kept as is)."""
        reference = reference_eigenvalue(top_eigenvalue, None if deflation is None else deflation[0])
        return cls(
            matvec=matvec,
            l2=l2,
            top_eigenvalue=top_eigenvalue,
            damping=compute_damping(reference, l2, damping),
            deflation=deflation,
            eigen=eigen,
        )

    @property
    def reference_eigenvalue(self) -> float:
        """lambda_ref of the damping rule for this operator (``reference_eigenvalue``)."""
        return reference_eigenvalue(self.top_eigenvalue, None if self.deflation is None else self.deflation[0])

    def run_iterative(self, g: np.ndarray, *, lissa: LissaConfig | None = None) -> SolveResult:
        """The full result (per-row residuals, depth) of the iterative solve of (C + l2 I + d I) x = g per row of g.

        iterative="cg": conjugate gradients preconditioned by the deflated eigenpairs (plain CG without them),
        stopped at a relative residual of PCG_TOL_FACTOR x ``lissa.tol``. iterative="lissa": deflated LiSSA, whose
        automatic depth is floored at l2 + d, the smallest eigenvalue C + l2 I + d I can have (C PSD).
        """
        config = LissaConfig() if lissa is None else lissa
        if self.iterative == "cg":
            pre = None if self.deflation is None else deflation_preconditioner(*self.deflation, self.damping)
            return solve_pcg(
                self.matvec,
                g,
                precondition=pre,
                damping=self.damping,
                tol=PCG_TOL_FACTOR * config.tol,
                max_iter=PCG_MAX_ITER,
            )
        return solve_lissa(
            self.matvec,
            g,
            config=replace(config, damping=self.damping),
            l2=self.l2,
            top_eigenvalue=self.top_eigenvalue,
            min_eigenvalue_floor=self.l2 + self.damping,
            deflation=self.deflation,
        )

    def solve(
        self, g: np.ndarray, *, method: str, lissa: LissaConfig | None = None
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Returns ((C + l2 I + d I)^-1 g for each row of g [m, p], diagnostics).

        Args:
            g: right-hand sides [m, p].
            method: "exact" (float64, the dense eigendecomposition) or "lissa" (in g's dtype).
            lissa: LiSSA options (their damping is replaced by this operator's); None = defaults.

        Returns:
            (x [m, p], {"damping"} for "exact"; {"damping", "scale", "depth", "residual_max"} for "lissa").
        """
        if _check_method(method) == "exact":
            if self.eigen is None:
                raise ValueError(
                    "method 'exact' needs the dense eigendecomposition of the curvature (eigen=), which this "
                    "HeadCurvature has not got: use method='lissa'"
                )
            x = self.eigen.solve(np.asarray(g).astype(np.float64), damping=self.damping)
            return np.asarray(x), {"damping": self.damping}
        result = self.run_iterative(g, lissa=lissa)
        return np.asarray(result.x), _lissa_diagnostics(result.damping, result)


@dataclass(frozen=True, kw_only=True, eq=False)
class ProjectedCurvature:
    """Galerkin projection of C + l2 I onto span(S) (scope="last-block"); solves (p / d) (A + d B)^-1 phi.

    A = S^T C S + l2 S^T S and B = S^T S [d, d] (float64) from the build; with phi = S^T g the solution is the
    influence in the model restricted to theta* + S w (exact there), times full_space_scale = p / d: S^T S ~ (p / d) I,
    so the restricted model sees about d / p of each gradient's squared norm and the factor restores full-space
    units (C = 0 gives phi_q^T phi_i / (l2 + d) ~ g_q^T g_i / (l2 + d), as in the head scope).

    Attributes:
        A: S^T C S + l2 S^T S [d, d].
        B: S^T S [d, d], positive definite.
        full_space_scale: p / d, the factor from the restricted model's scores to full-space units.
        l2: the L2 coefficient inside A.
        damping: d (``compute_damping`` of the top Ritz value mu_max, or an explicit value).
        deflation_rank: top eigenpairs of M = A + d B deflated in LiSSA, 0 <= r < d.
    """

    A: np.ndarray
    B: np.ndarray
    full_space_scale: float
    l2: float
    damping: float
    deflation_rank: int

    def __post_init__(self) -> None:
        A, B = _check_pencil(self.A, self.B)
        object.__setattr__(self, "A", A)
        object.__setattr__(self, "B", B)
        if not is_real(self.full_space_scale) or not math.isfinite(self.full_space_scale) or self.full_space_scale <= 0:
            raise ValueError(f"full_space_scale must be a finite float > 0, got {self.full_space_scale!r}")
        check_nonnegative("l2", self.l2)
        check_nonnegative("damping", self.damping)
        r = self.deflation_rank
        if isinstance(r, bool) or not isinstance(r, int | np.integer) or not 0 <= r < A.shape[0]:
            raise ValueError(f"deflation_rank must be an int in [0, {A.shape[0]}), got {r!r}")

    @classmethod
    def create(
        cls,
        A: np.ndarray,
        B: np.ndarray,
        *,
        full_space_scale: float,
        l2: float,
        deflation_rank: int,
        damping: float | None = None,
    ) -> ProjectedCurvature:
        """The operator with the damping of the one rule, ``compute_damping(mu_max, l2, damping)``, mu_max the
        top eigenvalue of the pencil (A, B) (an explicit damping is kept as is)."""
        mu, V = pencil_eigh(A, B)
        out = cls(
            A=A,
            B=B,
            full_space_scale=full_space_scale,
            l2=l2,
            damping=compute_damping(float(mu[0]), l2, damping),
            deflation_rank=deflation_rank,
        )
        out.__dict__["pencil"] = (mu, V)  # the cached_property below: computed once
        return out

    @cached_property
    def pencil(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [d] descending, V [d, d]): A V = B V diag(mu), V^T B V = I (``pencil_eigh``)."""
        return pencil_eigh(self.A, self.B)

    @property
    def top_eigenvalue(self) -> float:
        """mu_max: the top Ritz value of C + l2 I on span(S)."""
        return float(self.pencil[0][0])

    @cached_property
    def lissa_operator(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(M, eigenvalues ascending, eigenvectors) of M = A + d B, the matrix LiSSA iterates on (the damping is
        inside M; LiSSA deflates M's top eigenpairs)."""
        M = self.A + self.damping * self.B
        eigenvalues, vectors = np.linalg.eigh((M + M.T) / 2)
        return M, eigenvalues, vectors

    @cached_property
    def _lissa_matvec(self) -> Partial:
        # M enters the jitted loop as a pytree leaf of the matvec, so the loop compiles once, not once per query
        return Partial(jnp.matmul, jnp.asarray(self.lissa_operator[0]))

    def solve(
        self, phi: np.ndarray, *, method: str, lissa: LissaConfig | None = None
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Returns ((p / d) (A + d B)^-1 phi for each row of phi [m, d], diagnostics), float64.

        Args:
            phi: projected query gradients S^T g [m, d].
            method: "exact" (the pencil's eigendecomposition) or "lissa".
            lissa: LiSSA options (damping is inside M, so theirs is replaced by 0); None = defaults.

        Returns:
            (x [m, d], {"damping"} for "exact"; {"damping", "scale", "depth", "residual_max"} for "lissa").
        """
        phi = np.asarray(phi, np.float64)
        if _check_method(method) == "exact":
            mu, V = self.pencil
            return self.full_space_scale * ((phi @ V) / (mu + self.damping)) @ V.T, {"damping": self.damping}
        _, eigenvalues, vectors = self.lissa_operator
        r = self.deflation_rank
        config = LissaConfig() if lissa is None else lissa
        result = solve_lissa(
            self._lissa_matvec,
            phi,
            config=replace(config, damping=0.0),
            top_eigenvalue=float(eigenvalues[-1]),
            min_eigenvalue_floor=float(max(eigenvalues[0], 1e-12 * eigenvalues[-1])),
            deflation=(eigenvalues[::-1][:r].copy(), vectors[:, ::-1][:, :r].copy()),
        )
        return self.full_space_scale * np.asarray(result.x), _lissa_diagnostics(self.damping, result)
