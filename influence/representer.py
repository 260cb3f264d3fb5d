"""Representer points: the last linear layer as a weighted sum of training features.

With phi_i the (bias-augmented) input of the last linear layer and Theta [C, d+1] its weights, fit

    Theta* = argmin (1/n) sum_i CE(Theta phi_i, y_i) + lam ||Theta||^2,   lam = l2 / 2 by default

At a stationary point Theta* = sum_i alpha_i phi_i^T with

    alpha_i = -1/(2 lam n) dCE(f_i, y_i)/df_i = -(softmax(f_i) - onehot(y_i)) / (2 lam n)   [n, C],

so every logit decomposes as f_qc = Theta*_c phi_q = sum_i alpha_ic <phi_i, phi_q>; the representer score of
training example i for class c of query q is alpha_ic <phi_i, phi_q>.

Reference: Yeh, Kim, Yen & Ravikumar 2018, "Representer Point Selection for Explaining Deep Neural Networks"
(arXiv:1811.09720).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.sparse.linalg

from influence.checks import is_real
from influence.objective import cross_entropy

_NEWTON_STEPS = 8
_NEWTON_TARGET = 1e-3  # Newton polish aims below tol: one quadratic step past tol costs little


DEFAULT_LAMBDA_WITHOUT_L2 = 1e-3
"""The representer lambda of a model trained without L2 (the fit needs lambda > 0)."""


def resolve_representer_lambda(l2: float, override: float | None = None) -> float:
    """Returns the lambda of the representer fit: override when given, else l2 / 2, else 1e-3 when l2 = 0.

    The model's objective is (1/n) sum CE + (l2/2) ||theta||^2 and the representer fit's is
    (1/n) sum CE + lambda ||Theta||^2, so lambda = l2 / 2 refits the last layer with the model's own
    regularisation; a model trained without L2 gets the small lambda 1e-3 (the fit needs lambda > 0).

    Args:
        l2: the model's L2 coefficient (>= 0).
        override: an explicit lambda (> 0), or None.
    """
    if override is not None:
        if not is_real(override) or not math.isfinite(override) or override <= 0:
            raise ValueError(f"override must be a finite float > 0 or None, got {override!r}")
        return float(override)
    if not is_real(l2) or not math.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2 must be a finite float >= 0, got {l2!r}")
    return float(l2) / 2 if l2 > 0 else DEFAULT_LAMBDA_WITHOUT_L2


def augment_features(phi: np.ndarray) -> np.ndarray:
    """Appends a constant-1 column so that the bias is absorbed into Theta: [phi, 1] with shape [n, d+1]."""
    phi = np.asarray(phi)
    if phi.ndim != 2:
        raise ValueError(f"phi must have shape [n, d], got shape {phi.shape}")
    return np.concatenate([phi, np.ones((phi.shape[0], 1), dtype=phi.dtype)], axis=1)


@functools.lru_cache(maxsize=1)
def _objective_fns() -> tuple[Callable[..., tuple[jax.Array, jax.Array]], Callable[..., jax.Array]]:
    def objective(theta: jax.Array, phi: jax.Array, y: jax.Array, lam: jax.Array) -> jax.Array:
        logits = phi @ theta.T
        return jnp.mean(cross_entropy(logits, y)) + lam * jnp.vdot(theta, theta)

    def hvp(theta: jax.Array, v: jax.Array, phi: jax.Array, y: jax.Array, lam: jax.Array) -> jax.Array:
        return jax.jvp(jax.grad(lambda t: objective(t, phi, y, lam)), (theta,), (v,))[1]

    return jax.jit(jax.value_and_grad(objective)), jax.jit(hvp)


def compute_representer_alpha(phi_aug: np.ndarray, y: np.ndarray, theta: np.ndarray, *, lam: float) -> np.ndarray:
    """Returns alpha_i = -(softmax(Theta phi_i) - onehot(y_i)) / (2 lam n), shape [n, C].

    Reference: Yeh et al. 2018 (arXiv:1811.09720), Theorem 3.1.
    """
    phi_aug = np.asarray(phi_aug, dtype=np.float64)
    theta = np.asarray(theta, dtype=np.float64)
    n = phi_aug.shape[0]
    probs = np.asarray(jax.nn.softmax(jnp.asarray(phi_aug @ theta.T), axis=-1))
    onehot = np.eye(theta.shape[0])[np.asarray(y, dtype=np.int64)]
    return -(probs - onehot) / (2.0 * lam * n)


def fit_representer(
    phi_aug: np.ndarray,
    y: np.ndarray,
    theta0: np.ndarray,
    *,
    lam: float,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Fits Theta* = argmin (1/n) sum_i CE(Theta phi_i, y_i) + lam ||Theta||^2 and returns its representers.

    Minimised in float64 on a jitted JAX value_and_grad, starting from theta0 (the model's
    own last layer, bias as the last column). alpha_i = -(softmax(Theta* phi_i) - onehot(y_i)) / (2 lam n).
    Trust-region Newton-Krylov (scipy ``trust-krylov``) on exact JAX Hessian-vector products, then a few capped
    Newton-CG polishing steps (quadratic convergence).

    Reference: Yeh et al. 2018 (arXiv:1811.09720).

    Args:
        phi_aug: bias-augmented features [n, d+1] (see ``augment_features``).
        y: integer labels [n] in [0, C).
        theta0: starting weights [C, d+1].
        lam: the L2 coefficient (> 0; the objective uses lam ||Theta||^2, not lam/2).
        tol: target L2 norm of the gradient at the returned theta.
        max_iter: iteration cap.

    Returns:
        (theta [C, d+1], alpha [n, C], grad_norm) in float64, grad_norm the L2 norm of the gradient at theta.
    """
    phi_aug = np.asarray(phi_aug, dtype=np.float64)
    y = np.asarray(y)
    theta0 = np.asarray(theta0, dtype=np.float64)
    if phi_aug.ndim != 2 or phi_aug.shape[0] == 0:
        raise ValueError(f"phi_aug must have shape [n, d+1] with n >= 1, got shape {phi_aug.shape}")
    n, d1 = phi_aug.shape
    if theta0.ndim != 2 or theta0.shape[1] != d1 or theta0.shape[0] < 2:
        raise ValueError(f"theta0 must have shape [C>=2, {d1}], got shape {theta0.shape}")
    n_classes = theta0.shape[0]
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must be integer labels of shape ({n},), got shape {y.shape} dtype {y.dtype}")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y must lie in [0, {n_classes}), got range [{y.min()}, {y.max()}]")
    if isinstance(lam, bool) or not isinstance(lam, int | float) or not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"lam must be a finite float > 0, got {lam!r}")
    if not np.all(np.isfinite(phi_aug)) or not np.all(np.isfinite(theta0)):
        raise ValueError("phi_aug and theta0 must be finite, got NaN or inf entries")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")

    value_and_grad, hvp = _objective_fns()
    phi_dev, y_dev, lam_dev = jnp.asarray(phi_aug), jnp.asarray(y), jnp.asarray(lam, dtype=jnp.float64)
    shape = theta0.shape

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = value_and_grad(jnp.asarray(flat.reshape(shape)), phi_dev, y_dev, lam_dev)
        return float(value), np.asarray(grad, dtype=np.float64).ravel()

    def hessp(flat: np.ndarray, direction: np.ndarray) -> np.ndarray:
        out = hvp(jnp.asarray(flat.reshape(shape)), jnp.asarray(direction.reshape(shape)), phi_dev, y_dev, lam_dev)
        return np.asarray(out, dtype=np.float64).ravel()

    # Trust-region Newton-Krylov on exact HVPs: a handful of outer steps from the model's own layer, where
    # L-BFGS needed thousands of gradient steps on ill-conditioned inputs (raw pixels, small lam).
    flat = theta0.ravel()
    if np.linalg.norm(fun(flat)[1]) > tol:
        with np.errstate(invalid="ignore"):  # trlib's subproblem at round-off level near the optimum
            result = scipy.optimize.minimize(
                fun, flat, jac=True, hessp=hessp, method="trust-krylov", options={"maxiter": max_iter, "gtol": tol}
            )
        if np.all(np.isfinite(result.x)):
            flat = np.asarray(result.x, dtype=np.float64)
    _, grad = fun(flat)
    # The trust region stops early on float64 round-off; a few plain Newton steps (CG on exact HVPs, capped)
    # bring |grad| down to what the representer identity Theta* = sum_i alpha_i phi_i^T needs (~1e-10).
    grad_norm = float(np.linalg.norm(grad))
    for _ in range(_NEWTON_STEPS):
        if grad_norm <= _NEWTON_TARGET * tol:
            break
        hessian = scipy.sparse.linalg.LinearOperator(
            (flat.size, flat.size), matvec=lambda v, x=flat: hessp(x, np.asarray(v).ravel()), dtype=np.float64
        )
        step, _ = scipy.sparse.linalg.cg(hessian, -grad, rtol=1e-12, atol=0.0, maxiter=min(10 * flat.size, 500))
        candidate = flat + step
        _, candidate_grad = fun(candidate)
        candidate_norm = float(np.linalg.norm(candidate_grad))
        if not candidate_norm < grad_norm:
            break
        flat, grad, grad_norm = candidate, candidate_grad, candidate_norm
    theta = flat.reshape(shape)
    alpha = compute_representer_alpha(phi_aug, y, theta, lam=lam)
    return theta, alpha, grad_norm


def compute_representer_logits(alpha: np.ndarray, phi_aug_train: np.ndarray, phi_aug_query: np.ndarray) -> np.ndarray:
    """Returns f_qc = sum_i alpha_ic <phi_i, phi_q>, shape [m, C] (equals Theta* phi_q at stationarity).

    Args:
        alpha: representer coefficients [n, C].
        phi_aug_train: augmented training features [n, d+1].
        phi_aug_query: augmented query features [m, d+1].
    """
    alpha = np.asarray(alpha)
    phi_aug_train = np.asarray(phi_aug_train)
    phi_aug_query = np.asarray(phi_aug_query)
    if alpha.ndim != 2 or phi_aug_train.ndim != 2 or alpha.shape[0] != phi_aug_train.shape[0]:
        raise ValueError(
            f"alpha [n, C] and phi_aug_train [n, d+1] must agree on n, got {alpha.shape} and {phi_aug_train.shape}"
        )
    if phi_aug_query.ndim != 2 or phi_aug_query.shape[1] != phi_aug_train.shape[1]:
        raise ValueError(
            f"phi_aug_query must have shape [m, {phi_aug_train.shape[1]}], got shape {phi_aug_query.shape}"
        )
    # phi_q (Phi^T alpha): [d+1, C] first, never the dense [m, n] kernel (74 GB for 10k x 1M in float64)
    return phi_aug_query @ (phi_aug_train.T @ alpha)


def compute_representer_embeddings(alpha: np.ndarray, phi_aug: np.ndarray) -> np.ndarray:
    """Returns the train-side vectors vec(alpha_i phi_i^T), shape [n, C*(d+1)], block c = alpha_ic phi_i.

    Args:
        alpha: [n, C].
        phi_aug: [n, d+1].
    """
    alpha = np.asarray(alpha)
    phi_aug = np.asarray(phi_aug)
    if alpha.ndim != 2 or phi_aug.ndim != 2 or alpha.shape[0] != phi_aug.shape[0]:
        raise ValueError(f"alpha [n, C] and phi_aug [n, d+1] must agree on n, got {alpha.shape} and {phi_aug.shape}")
    n = alpha.shape[0]
    return (alpha[:, :, None] * phi_aug[:, None, :]).reshape(n, -1)


def compute_representer_queries(phi_aug_q: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Returns the query-side vectors onehot(c_q) ⊗ phi_q, shape [m, C*(d+1)].

    <query_q, embedding_i> = alpha_{i c_q} <phi_i, phi_q>, the representer score of train i for class c_q.

    Args:
        phi_aug_q: augmented query features [m, d+1].
        classes: class to explain per query [m] (by default the predicted class).
        n_classes: C.
    """
    phi_aug_q = np.asarray(phi_aug_q)
    classes = np.asarray(classes)
    if phi_aug_q.ndim != 2:
        raise ValueError(f"phi_aug_q must have shape [m, d+1], got shape {phi_aug_q.shape}")
    if isinstance(n_classes, bool) or not isinstance(n_classes, int | np.integer) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
    if classes.shape != (phi_aug_q.shape[0],) or not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"classes must be integers of shape ({phi_aug_q.shape[0]},), got {classes.shape}")
    if classes.size and (classes.min() < 0 or classes.max() >= n_classes):
        raise ValueError(f"classes must lie in [0, {n_classes}), got range [{classes.min()}, {classes.max()}]")
    onehot = np.eye(int(n_classes), dtype=phi_aug_q.dtype)[classes]
    return (onehot[:, :, None] * phi_aug_q[:, None, :]).reshape(phi_aug_q.shape[0], -1)


def compute_fidelity(representer_logits: Any, model_logits: Any) -> float:
    """Returns the Pearson correlation over all entries of the representer logits and the model's logits.

    NaN when either array is constant.
    """
    a = np.asarray(representer_logits, dtype=np.float64).ravel()
    b = np.asarray(model_logits, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(
            f"representer_logits and model_logits must have the same shape with >= 2 entries, "
            f"got {np.shape(representer_logits)} and {np.shape(model_logits)}"
        )
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denom if denom > 0 else float("nan")
