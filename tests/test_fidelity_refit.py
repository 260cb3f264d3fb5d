"""The leave-one-out ground truth of experiments/fidelity_loo.py: dense logistic-regression Hessian and the
Hessian-preconditioned refit (float64, small random problem)."""

import numpy as np
import pytest
import scipy.linalg

from experiments import fidelity_common as fc


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    n, d, k = 120, 7, 4
    X = rng.standard_normal((n, d))
    y = rng.integers(0, k, n)
    spec = [{"kind": "linear", "in_features": d, "out_features": k, "bias": True}]
    params = [{"weight": 0.1 * rng.standard_normal((k, d)), "bias": 0.1 * rng.standard_normal(k)}]
    return fc.NumpyHead(spec, params, l2=1e-2), X, y


def test_linear_hessian_matches_gradient_differences(problem):
    head, X, y = problem
    n = len(y)
    w = np.random.default_rng(1).uniform(0.5, 1.5, n)
    theta = head.theta0 + 0.3
    H = head.linear_hessian(theta, X, w, float(n))
    assert np.allclose(H, H.T, atol=1e-14)
    eps = 1e-6
    cols = []
    for j in range(theta.size):  # central differences of the analytic gradient, column by column
        e = np.zeros(theta.size)
        e[j] = eps
        gp = head.objective(theta + e, X, y, w, float(n))[1]
        gm = head.objective(theta - e, X, y, w, float(n))[1]
        cols.append((gp - gm) / (2 * eps))
    fd = np.stack(cols, 1)
    assert np.max(np.abs(fd - H)) < 1e-7 * np.max(np.abs(H))


def test_linear_hessian_rejects_an_mlp():
    spec = [
        {"kind": "linear", "in_features": 3, "out_features": 4, "bias": True},
        {"kind": "relu"},
        {"kind": "linear", "in_features": 4, "out_features": 2, "bias": True},
    ]
    params = [{"weight": np.ones((4, 3)), "bias": np.zeros(4)}, {}, {"weight": np.ones((2, 4)), "bias": np.zeros(2)}]
    head = fc.NumpyHead(spec, params, l2=1e-2)
    with pytest.raises(ValueError, match="exactly one linear layer"):
        head.linear_hessian(head.theta0, np.ones((5, 3)), np.ones(5), 5.0)


def test_preconditioned_refit_reaches_the_lbfgs_minimiser(problem):
    head, X, y = problem
    n = len(y)
    base, _, _ = head.fit(head.theta0, X, y, np.ones(n), float(n), gtol=1e-12)
    chol = scipy.linalg.cho_factor(head.linear_hessian(base, X, np.ones(n), float(n)))
    base, gn, _ = head.fit_preconditioned(base, X, y, np.ones(n), float(n), chol, gtol=1e-13)
    assert gn < 1e-13
    w = np.ones(n)
    w[[3, 50]] = 0.0  # leave two out: a larger step than one
    th, gn, it = head.fit_preconditioned(base, X, y, w, n - 2.0, chol, gtol=1e-12)
    ref, gref, _ = head.fit(base, X, y, w, n - 2.0, gtol=1e-12)
    assert gn < 1e-12 and it < 50  # converged by the preconditioned steps themselves (maxiter 50), no fallback
    # strong convexity (l2 = 1e-2): |theta - theta*| <= |grad| / l2, so L-BFGS's own stopping point bounds it
    assert np.max(np.abs(th - ref)) <= 2 * np.sqrt(th.size) * gref / head.l2 + 1e-12
    assert np.max(np.abs(th - base)) > 1e-4  # the refit moved: the test is not trivially passing at base
