"""Inverse curvature products: LiSSA, the automatic configuration, its divergence guard, exact solvers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from influence import (
    EigenSolver,
    LissaConfig,
    compute_dense_curvature,
    estimate_top_eigenvalue,
    flatten_params,
    lissa,
    make_head_matvec,
    resolve_damping,
    solve_exact,
    solve_lissa,
)

L2 = 1e-3
SPEC = [{"kind": "linear", "in_features": 20, "out_features": 3, "bias": True}]


def random_spd(seed: int, n: int, cond: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * np.geomspace(1.0, cond, n)) @ q.T


@pytest.fixture(scope="module")
def spd():
    a = random_spd(0, 8, 10.0)
    return a, jax.jit(lambda x: jnp.asarray(a) @ x)


@pytest.fixture(scope="module")
def logreg():
    """Logistic-regression head on synthetic 300 x 20 data with 3 classes, at a random point."""
    rng = np.random.default_rng(1)
    h = rng.normal(size=(300, 20))
    y = (h[:, :3] @ rng.normal(size=(3, 3))).argmax(1)
    params = [{"weight": 0.3 * rng.normal(size=(3, 20)), "bias": 0.1 * rng.normal(size=3)}]
    theta, unravel = flatten_params(params)
    matvec = make_head_matvec(SPEC, unravel, theta, h, y, l2=L2, curvature="hessian")
    dense = compute_dense_curvature(matvec, theta.shape[0], dtype=np.float64)
    V = rng.normal(size=(4, theta.shape[0]))
    return matvec, dense, V


def test_lissa_matches_dense_solve(spd) -> None:
    a, matvec = spd
    v = np.random.default_rng(2).normal(size=8)
    scale = 2.0 * float(np.linalg.norm(a, 2))
    x = jax.jit(lambda v: lissa(matvec, v, depth=2_000, scale=scale, damping=0.0))(jnp.asarray(v))
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a, v), rtol=1e-6)
    # Damping, batched over rows with vmap.
    V = np.random.default_rng(3).normal(size=(3, 8))
    X = jax.vmap(lambda v: lissa(matvec, v, depth=2_000, scale=scale, damping=0.5))(jnp.asarray(V))
    np.testing.assert_allclose(np.asarray(X), np.linalg.solve(a + 0.5 * np.eye(8), V.T).T, rtol=1e-6)


def test_power_iteration_finds_top_eigenvalue(spd) -> None:
    _, matvec = spd
    assert math.isclose(estimate_top_eigenvalue(matvec, 8, iters=200), 10.0, rel_tol=1e-6)


def test_solve_lissa_default_config_matches_dense_solve(logreg) -> None:
    matvec, dense, V = logreg
    result = solve_lissa(matvec, V, config=LissaConfig(), l2=L2)
    top = np.linalg.eigvalsh(dense)[-1]
    assert math.isclose(result.top_eigenvalue, top, rel_tol=1e-3)
    assert result.damping == pytest.approx(resolve_damping(result.top_eigenvalue, L2, None))
    expected = solve_exact(dense, V, damping=result.damping)
    rel = np.linalg.norm(result.x - expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert rel.max() <= 1e-2
    assert result.x.shape == V.shape and result.residual.shape == (4,)
    assert np.all(result.residual < 1e-2)
    assert result.method == "lissa" and 0 < result.depth <= LissaConfig().max_depth


def test_solve_lissa_explicit_config_and_float32(logreg) -> None:
    matvec, dense, V = logreg
    top = float(np.linalg.eigvalsh(dense)[-1])
    config = LissaConfig(depth=3000, scale=1.2 * top, damping=0.05)
    result = solve_lissa(matvec, V.astype(np.float32), config=config, top_eigenvalue=top)
    assert result.x.dtype == np.float32 and result.depth == 3000 and result.damping == 0.05
    np.testing.assert_allclose(result.x, solve_exact(dense, V, damping=0.05), rtol=1e-4, atol=1e-5)


def test_divergence_guard_doubles_a_too_small_scale(logreg) -> None:
    """Documented behaviour: the scale is doubled until the result is finite with residual < 1."""
    matvec, dense, V = logreg
    top = float(np.linalg.eigvalsh(dense)[-1])
    result = solve_lissa(matvec, V, config=LissaConfig(depth=500, scale=0.1 * top, damping=0.01))
    assert np.all(np.isfinite(result.x)) and np.all(result.residual < 1)
    assert result.scale >= 0.5 * top


def test_zero_rhs_has_zero_residual(spd) -> None:
    _, matvec = spd
    result = solve_lissa(matvec, np.zeros((2, 8)), config=LissaConfig(depth=10, scale=20.0, damping=0.0))
    np.testing.assert_array_equal(result.x, 0.0)
    np.testing.assert_array_equal(result.residual, 0.0)


def test_resolve_damping() -> None:
    assert resolve_damping(10.0, 0.0, None) == pytest.approx(1e-2)
    assert resolve_damping(10.0, 1.0, None) == 0.0
    assert resolve_damping(10.0, 0.0, 0.3) == 0.3


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"depth": 0}, "depth"),
        ({"scale": -1.0}, "scale"),
        ({"damping": -0.1}, "damping"),
        ({"repeats": 0}, "repeats"),
        ({"tol": 1.5}, "tol"),
        ({"max_depth": 0}, "max_depth"),
    ],
)
def test_lissa_config_validation(kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        LissaConfig(**kwargs)


def test_eigen_solver_matches_solve_and_round_trips(spd) -> None:
    a, _ = spd
    V = np.random.default_rng(4).normal(size=(3, 8))
    solver = EigenSolver.from_dense(a)
    assert solver.top_eigenvalue == pytest.approx(10.0) and solver.min_eigenvalue == pytest.approx(1.0)
    for damping in (0.0, 0.7):
        expected = np.asarray(jnp.linalg.solve(a + damping * np.eye(8), V.T).T)
        np.testing.assert_allclose(solver.solve(V, damping=damping), expected, rtol=1e-10)
        np.testing.assert_allclose(solve_exact(a, V, damping=damping), expected, rtol=1e-10)
    again = EigenSolver.from_arrays(*solver.to_arrays())
    np.testing.assert_array_equal(again.solve(V, damping=0.7), solver.solve(V, damping=0.7))


def test_eigen_solver_rejects_singular_damping(spd) -> None:
    a, _ = spd
    solver = EigenSolver.from_dense(a)
    with pytest.raises(ValueError, match=r"damping=.*min eigenvalue"):
        solver.solve(np.ones((1, 8)), damping=-solver.min_eigenvalue)
    with pytest.raises(ValueError, match="damping"):
        solver.solve(np.ones((1, 8)), damping=-5.0)
