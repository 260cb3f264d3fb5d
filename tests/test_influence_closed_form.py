"""Influence on L2 multiclass logistic regression: closed form and actual leave-one-out retraining.

score_i = g_q^T H^-1 g_i with H the Hessian of (1/n) sum_j CE_j + (l2/2)||theta||^2; removing training example
i changes the query loss by about score_i / n (positive = example i supports the query). Koh & Liang 2017
(arXiv:1703.04730).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from influence import (
    EigenSolver,
    LissaConfig,
    compute_dense_curvature,
    compute_objective,
    compute_per_example_grads,
    flatten_params,
    make_head_matvec,
    make_loss_fn,
    solve_lissa,
)

SPEC = [{"kind": "linear", "in_features": 3, "out_features": 3, "bias": True}]
L2 = 0.05
N = 150


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(N + 1, 3))
    y = (h @ rng.normal(size=(3, 3)) + 0.8 * rng.normal(size=(N + 1, 3))).argmax(1)
    h_train, y_train, h_q, y_q = h[:N], y[:N], h[N:], y[N:]
    theta0, unravel = flatten_params([{"weight": np.zeros((3, 3)), "bias": np.zeros(3)}])
    value_and_grad = jax.jit(jax.value_and_grad(lambda t: compute_objective(SPEC, unravel, t, h_train, y_train, l2=L2)))
    hessian_fn = jax.jit(jax.hessian(lambda t: compute_objective(SPEC, unravel, t, h_train, y_train, l2=L2)))

    def fun(t):
        value, grad = value_and_grad(jnp.asarray(t))
        return float(value), np.asarray(grad)

    result = scipy.optimize.minimize(
        fun,
        np.asarray(theta0),
        jac=True,
        hess=lambda t: np.asarray(hessian_fn(jnp.asarray(t))),
        method="trust-exact",
        options={"gtol": 1e-13},
    )
    theta = jnp.asarray(result.x)
    for _ in range(2):  # Newton polish to machine precision
        theta = theta - jnp.linalg.solve(hessian_fn(theta), value_and_grad(theta)[1])
    assert np.linalg.norm(fun(np.asarray(theta))[1]) < 1e-12
    return theta, unravel, h_train, y_train, h_q, y_q, np.asarray(hessian_fn(theta))


@pytest.fixture(scope="module")
def scores(fitted):
    """Scores through the package: per-example grads, head matvec, dense curvature, eigen solve, dot."""
    theta, unravel, h, y, h_q, y_q, _ = fitted
    g_train = compute_per_example_grads(SPEC, unravel, theta, h, y)
    g_q = compute_per_example_grads(SPEC, unravel, theta, h_q, y_q)
    matvec = make_head_matvec(SPEC, unravel, theta, h, y, l2=L2, curvature="hessian")
    solver = EigenSolver.from_dense(compute_dense_curvature(matvec, theta.shape[0], dtype=np.float64))
    return g_train, g_q, matvec, solver, (solver.solve(g_q, damping=0.0) @ g_train.T)[0]


def test_scores_equal_closed_form(fitted, scores) -> None:
    theta, unravel, h, y, h_q, y_q, hessian = fitted
    g_train, g_q, matvec, solver, package_scores = scores
    loss_fn = make_loss_fn(SPEC, unravel)
    grad_one = jax.jit(jax.grad(lambda t, hi, yi: loss_fn(t, hi[None], yi[None])[0]))
    grads = np.stack([np.asarray(grad_one(theta, h[i], y[i])) for i in range(N)])
    g_query = np.asarray(grad_one(theta, h_q[0], y_q[0]))
    expected = grads @ np.asarray(jnp.linalg.solve(jnp.asarray(hessian), jnp.asarray(g_query)))
    np.testing.assert_allclose(package_scores, expected, rtol=1e-8, atol=1e-12)
    # GGN equals the Hessian here, and LiSSA at a tight tolerance agrees with the exact solve.
    lissa = solve_lissa(matvec, g_q, config=LissaConfig(damping=0.0, tol=1e-8), l2=L2)
    np.testing.assert_allclose((lissa.x @ g_train.T)[0], expected, rtol=1e-5, atol=1e-8)
    # Self-influence equals the diagonal of the pairwise train x train scores, and is positive.
    solved = solver.solve(g_train, damping=0.0)
    self_influence = np.einsum("ij,ij->i", g_train, solved)
    np.testing.assert_allclose(self_influence, np.diag(solved @ g_train.T), rtol=1e-12)
    assert np.all(self_influence > 0)


def test_scores_predict_leave_one_out_retraining(fitted, scores) -> None:
    """Sign and units: removing example i changes the query loss by ~ score_i / n."""
    theta, unravel, h, y, h_q, y_q, _ = fitted
    package_scores = scores[-1]
    loss_fn = make_loss_fn(SPEC, unravel)
    order = np.argsort(package_scores)
    removed = np.concatenate([order[:10], order[-10:]])

    def objective(t, keep):
        return jnp.sum(keep * loss_fn(t, h, y)) / jnp.sum(keep) + 0.5 * L2 * jnp.vdot(t, t)

    @jax.jit
    @jax.vmap
    def retrain(keep):
        def newton(_, t):
            return t - jnp.linalg.solve(jax.hessian(objective)(t, keep), jax.grad(objective)(t, keep))

        t = jax.lax.fori_loop(0, 12, newton, theta)
        return loss_fn(t, h_q, y_q)[0], jnp.linalg.norm(jax.grad(objective)(t, keep))

    keep = np.ones((len(removed), N))
    keep[np.arange(len(removed)), removed] = 0.0
    loo_loss, grad_norm = retrain(jnp.asarray(keep))
    assert float(grad_norm.max()) < 1e-10
    delta = np.asarray(loo_loss) - float(loss_fn(theta, h_q, y_q)[0])
    predicted = package_scores[removed] / N
    assert np.corrcoef(predicted, delta)[0, 1] > 0.99
    slope = np.polyfit(predicted, delta, 1)[0]
    assert 0.9 < slope < 1.15
    # The strongest proponent's removal raises the query loss, the strongest opponent's lowers it.
    assert delta[-1] > 0 > delta[0]
