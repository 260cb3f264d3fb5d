"""Top eigenpairs by block subspace iteration + Rayleigh-Ritz, against numpy's dense eigh (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from influence import (
    LissaConfig,
    compute_dense_curvature,
    compute_top_eigenpairs,
    eigenpair_residuals,
    flatten_params,
    make_head_matvec,
    solve_lissa,
)

P = 60


@pytest.fixture(scope="module")
def decaying():
    """Dense SPD matrix with a geometrically decaying spectrum 10 ... 1e-3 and its matvec."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(P, P)))
    a = (q * np.geomspace(10.0, 1e-3, P)) @ q.T
    a = 0.5 * (a + a.T)
    return a, jax.jit(lambda v: jnp.asarray(a) @ v)


def test_top_eigenpairs_match_eigh(decaying) -> None:
    a, matvec = decaying
    lam, U = compute_top_eigenpairs(matvec, P, rank=8, iters=60)
    w, Q = np.linalg.eigh(a)
    w, Q = w[::-1][:8], Q[:, ::-1][:, :8]
    assert lam.shape == (8,) and U.shape == (P, 8) and lam.dtype == U.dtype == np.float64
    assert np.all(np.diff(lam) <= 0)
    np.testing.assert_allclose(lam, w, rtol=1e-6)
    np.testing.assert_allclose(U.T @ U, np.eye(8), atol=1e-12)
    np.testing.assert_allclose(np.abs(np.sum(U * Q, axis=0)), 1.0, atol=1e-8)  # same vectors up to sign
    assert np.all(eigenpair_residuals(matvec, lam, U) <= 1e-7 * w[0])


def test_ritz_values_never_exceed_eigenvalues_and_improve_with_iters(decaying) -> None:
    a, matvec = decaying
    w = np.linalg.eigvalsh(a)[::-1][:5]
    rough, _ = compute_top_eigenpairs(matvec, P, rank=5, iters=1, oversample=0)
    fine, _ = compute_top_eigenpairs(matvec, P, rank=5, iters=40, oversample=0)
    assert np.all(rough <= w * (1 + 1e-12)) and np.all(fine <= w * (1 + 1e-12))
    assert np.max(np.abs(fine - w) / w) < np.max(np.abs(rough - w) / w)


def test_full_rank_and_zero_rank(decaying) -> None:
    a, matvec = decaying
    lam, U = compute_top_eigenpairs(matvec, P, rank=P, iters=2)
    np.testing.assert_allclose(U.T @ U, np.eye(P), atol=1e-10)
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(a)[::-1], rtol=1e-8, atol=1e-12)  # Rayleigh-Ritz on R^p
    lam0, U0 = compute_top_eigenpairs(matvec, P, rank=0)
    assert lam0.shape == (0,) and U0.shape == (P, 0)


def test_head_ggn_eigenpairs_match_dense_curvature() -> None:
    rng = np.random.default_rng(1)
    spec = [{"kind": "linear", "in_features": 10, "out_features": 4, "bias": True}]
    h = rng.normal(size=(200, 10)) * np.geomspace(3.0, 0.1, 10)
    y = rng.integers(0, 4, size=200)
    theta, unravel = flatten_params([{"weight": 0.3 * rng.normal(size=(4, 10)), "bias": np.zeros(4)}])
    matvec = make_head_matvec(spec, unravel, theta, h, y, l2=1e-3)
    p = theta.shape[0]
    dense = compute_dense_curvature(matvec, p, dtype=np.float64)
    lam, U = compute_top_eigenpairs(matvec, p, rank=6, iters=100)
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(dense)[::-1][:6], rtol=1e-6)
    np.testing.assert_allclose(U.T @ dense @ U, np.diag(lam), atol=1e-8 * lam[0])


def test_subsampled_subspace_gives_ritz_pairs_of_the_full_curvature_and_an_exact_lissa_solve() -> None:
    """Power iterations on 300 of 3,000 rows, Rayleigh-Ritz on all: exact Ritz pairs of the full GGN, lower
    bounds of its eigenvalues, close to the top ones; deflated LiSSA with them still solves the full system."""
    rng = np.random.default_rng(2)
    spec = [
        {"kind": "linear", "in_features": 12, "out_features": 8, "bias": True},
        {"kind": "relu"},
        {"kind": "linear", "in_features": 8, "out_features": 3, "bias": True},
    ]
    h = rng.normal(size=(3000, 12)) * np.geomspace(3.0, 0.2, 12)
    y = rng.integers(0, 3, size=3000)
    params = [
        {"weight": 0.5 * rng.normal(size=(8, 12)), "bias": 0.1 * rng.normal(size=8)},
        {},
        {"weight": 0.5 * rng.normal(size=(3, 8)), "bias": np.zeros(3)},
    ]
    theta, unravel = flatten_params(params)
    p = theta.shape[0]
    matvec = make_head_matvec(spec, unravel, theta, h, y, l2=1e-3)
    rows = np.sort(rng.choice(3000, size=300, replace=False))
    sub = make_head_matvec(spec, unravel, theta, h[rows], y[rows], l2=1e-3)
    dense = compute_dense_curvature(matvec, p, dtype=np.float64)
    true = np.linalg.eigvalsh(dense)[::-1]
    lam, U = compute_top_eigenpairs(matvec, p, rank=6, iters=30, subspace_matvec=sub)
    np.testing.assert_allclose(U.T @ dense @ U, np.diag(lam), atol=1e-10 * lam[0])  # Ritz pairs of the full C
    assert np.all(lam <= true[:6] * (1 + 1e-10))
    assert np.max(np.abs(lam - true[:6]) / true[:6]) < 0.1  # the subsample finds the top subspace
    sub_only, _ = compute_top_eigenpairs(sub, p, rank=6, iters=30)
    assert not np.allclose(sub_only, lam, rtol=1e-6)  # the final step did use every row
    rhs = rng.normal(size=(3, p))
    config = LissaConfig(damping=0.0, tol=1e-8)
    result = solve_lissa(matvec, jnp.asarray(rhs), config=config, l2=1e-3, deflation=(lam, U))
    np.testing.assert_allclose(result.x, np.linalg.solve(dense, rhs.T).T, rtol=1e-5, atol=1e-8)


def test_subspace_matvec_equal_to_matvec_changes_nothing(decaying) -> None:
    _, matvec = decaying
    lam, U = compute_top_eigenpairs(matvec, P, rank=4, iters=20)
    lam2, U2 = compute_top_eigenpairs(matvec, P, rank=4, iters=20, subspace_matvec=matvec)
    np.testing.assert_allclose(lam2, lam, rtol=1e-12)
    np.testing.assert_allclose(np.abs(np.sum(U * U2, axis=0)), 1.0, atol=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rank": -1}, "rank"),
        ({"rank": P + 1}, "rank"),
        ({"rank": 2, "iters": -1}, "iters"),
        ({"rank": 2, "oversample": -3}, "oversample"),
        ({"rank": 2, "dtype": np.int32}, "dtype"),
    ],
)
def test_validation(decaying, kwargs, name) -> None:
    _, matvec = decaying
    with pytest.raises(ValueError, match=name):
        compute_top_eigenpairs(matvec, P, **kwargs)


def test_non_finite_matvec_is_rejected() -> None:
    with pytest.raises(ValueError, match="NaN or inf"):
        compute_top_eigenpairs(lambda v: v * jnp.nan, 5, rank=2, iters=2)


def test_lanczos_matches_eigh_and_the_subspace_iteration(decaying) -> None:
    a, matvec = decaying
    w, Q = np.linalg.eigh(a)
    w, Q = w[::-1][:5], Q[:, ::-1][:, :5]
    lam, U = compute_top_eigenpairs(matvec, P, rank=5, algorithm="lanczos", tol=1e-10)
    assert lam.dtype == U.dtype == np.float64 and np.all(np.diff(lam) <= 0)
    np.testing.assert_allclose(lam, w, rtol=1e-6)  # float32 products: ~1e-7 relative
    np.testing.assert_allclose(np.abs(np.sum(U * Q, axis=0)), 1.0, atol=1e-5)
    block, _ = compute_top_eigenpairs(matvec, P, rank=5, iters=60)
    np.testing.assert_allclose(lam, block, rtol=1e-6)
    lam0, U0 = compute_top_eigenpairs(matvec, P, rank=0, algorithm="lanczos")
    assert lam0.shape == (0,) and U0.shape == (P, 0)
    with pytest.raises(ValueError, match="rank < p"):
        compute_top_eigenpairs(matvec, P, rank=P, algorithm="lanczos")
    with pytest.raises(ValueError, match="subspace_matvec"):
        compute_top_eigenpairs(matvec, P, rank=2, algorithm="lanczos", subspace_matvec=matvec)
    with pytest.raises(ValueError, match="algorithm"):
        compute_top_eigenpairs(matvec, P, rank=2, algorithm="arnoldi")
