"""Deflated LiSSA: exact top-subspace solve + LiSSA on the remainder, against dense solves (float64)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from influence import (
    LissaConfig,
    LissaDivergenceError,
    compute_dense_curvature,
    compute_top_eigenpairs,
    flatten_params,
    make_head_matvec,
    solve_exact,
    solve_lissa,
)

P = 40
L2 = 1e-3
MLP = [
    {"kind": "linear", "in_features": 12, "out_features": 16, "bias": True},
    {"kind": "tanh"},
    {"kind": "linear", "in_features": 16, "out_features": 4, "bias": True},
]


@pytest.fixture(scope="module")
def spd():
    """SPD matrix with eigenvalues 1000 ... 1 (geometric) as eigh pairs (descending) and a matvec."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(P, P)))
    a = (q * np.geomspace(1000.0, 1.0, P)) @ q.T
    a = 0.5 * (a + a.T)
    w, Q = np.linalg.eigh(a)
    return a, jax.jit(lambda v: jnp.asarray(a) @ v), w[::-1].copy(), Q[:, ::-1].copy()


@pytest.fixture(scope="module")
def mlp_head():
    """Small tanh-MLP head on 400 x 12 anisotropic data, 4 classes: GGN + l2 matvec and dense curvature."""
    rng = np.random.default_rng(1)
    h = rng.normal(size=(400, 12)) * np.geomspace(10.0, 0.1, 12)
    y = (h[:, :4] @ rng.normal(size=(4, 4))).argmax(1)
    params = [
        {"weight": 0.4 * rng.normal(size=(16, 12)), "bias": 0.1 * rng.normal(size=16)},
        {},
        {"weight": 0.4 * rng.normal(size=(4, 16)), "bias": 0.1 * rng.normal(size=4)},
    ]
    theta, unravel = flatten_params(params)
    matvec = make_head_matvec(MLP, unravel, theta, h, y, l2=L2, curvature="ggn")
    p = theta.shape[0]
    dense = compute_dense_curvature(matvec, p, dtype=np.float64)
    return matvec, dense, rng.normal(size=(3, p))


def _rel(x, expected):
    return np.linalg.norm(x - expected, axis=1) / np.linalg.norm(expected, axis=1)


def test_deflated_lissa_matches_dense_solve(spd) -> None:
    a, matvec, w, Q = spd
    V = np.random.default_rng(2).normal(size=(3, P))
    r = 20
    config = LissaConfig(damping=0.0, tol=1e-8, max_depth=50_000)
    result = solve_lissa(matvec, V, config=config, min_eigenvalue_floor=1.0, deflation=(w[:r], Q[:, :r]))
    expected = np.asarray(jnp.linalg.solve(jnp.asarray(a), jnp.asarray(V).T).T)
    assert _rel(result.x, expected).max() <= 1e-6
    assert result.deflation_rank == r and result.deflated_top_eigenvalue == pytest.approx(w[r - 1])
    assert result.top_eigenvalue == pytest.approx(w[0])  # taken from the deflated pairs: no power iteration
    plain = solve_lissa(matvec, V, config=config, min_eigenvalue_floor=1.0, top_eigenvalue=float(w[0]))
    assert _rel(plain.x, expected).max() <= 1e-6
    # Depth scales with the top of the spectrum LiSSA still sees: lam_1 / lam_r = 1000^(19/39) ~ 29.
    assert plain.depth / result.depth == pytest.approx(w[0] / w[r - 1], rel=1e-2)


def test_deflated_top_eigenvalue_sets_the_scale(spd) -> None:
    _, matvec, w, Q = spd
    V = np.random.default_rng(3).normal(size=(2, P))
    config = LissaConfig(damping=0.5, scale_factor=1.1)
    result = solve_lissa(matvec, V, config=config, deflation=(w[:10], Q[:, :10]), deflated_top_eigenvalue=w[10])
    assert result.scale == pytest.approx(1.1 * (w[10] + 0.5))
    assert result.deflated_top_eigenvalue == pytest.approx(w[10])


def test_rhs_in_deflated_subspace_is_solved_exactly(spd) -> None:
    _, matvec, w, Q = spd
    r = 6
    coeffs = np.random.default_rng(4).normal(size=(2, r))
    V = coeffs @ Q[:, :r].T
    result = solve_lissa(matvec, V, config=LissaConfig(damping=0.3, depth=1), deflation=(w[:r], Q[:, :r]))
    np.testing.assert_allclose(result.x, (coeffs / (w[:r] + 0.3)) @ Q[:, :r].T, rtol=1e-10, atol=1e-14)
    assert np.all(result.residual < 1e-12)


def test_zero_rank_and_none_are_plain_lissa(spd) -> None:
    _, matvec, w, _ = spd
    V = np.random.default_rng(5).normal(size=(3, P))
    config = LissaConfig(tol=1e-3)
    plain = solve_lissa(matvec, V, config=config, top_eigenvalue=float(w[0]))
    none = solve_lissa(matvec, V, config=config, top_eigenvalue=float(w[0]), deflation=None)
    empty = solve_lissa(matvec, V, config=config, top_eigenvalue=float(w[0]), deflation=(np.zeros(0), np.zeros((P, 0))))
    for other in (none, empty):
        np.testing.assert_array_equal(other.x, plain.x)
        assert (other.depth, other.scale, other.damping, other.deflation_rank) == (
            plain.depth,
            plain.scale,
            plain.damping,
            0,
        )
        assert math.isnan(other.deflated_top_eigenvalue)
    assert plain.scale == pytest.approx(1.5 * (w[0] + plain.damping))  # the default scale_factor is unchanged


def test_approximate_eigenvectors_still_converge_to_the_exact_solution(spd) -> None:
    """The deflated recursion is a preconditioned Richardson iteration: its fixed point is exact for any U."""
    a, matvec, w, Q = spd
    rng = np.random.default_rng(6)
    r = 10
    U, _ = np.linalg.qr(Q[:, :r] + 1e-3 * rng.normal(size=(P, r)))
    lam = np.einsum("pr,pq,qr->r", U, a, U)
    V = rng.normal(size=(2, P))
    result = solve_lissa(
        matvec, V, config=LissaConfig(damping=0.1, depth=8000), deflation=(lam, U), deflated_top_eigenvalue=w[r]
    )
    assert _rel(result.x, solve_exact(a, V, damping=0.1)).max() <= 1e-8


def test_mlp_ggn_default_config_with_computed_eigenpairs(mlp_head) -> None:
    matvec, dense, V = mlp_head
    p = dense.shape[0]
    w = np.linalg.eigvalsh(dense)[::-1]
    r = 20
    assert w[0] / w[r] > 20  # the deflation pays off on this head
    lam, U = compute_top_eigenpairs(matvec, p, rank=r + 1, iters=60)
    np.testing.assert_allclose(lam, w[: r + 1], rtol=1e-6)
    config = LissaConfig()
    top = float(w[0])
    deflated = solve_lissa(
        matvec,
        V,
        config=config,
        l2=L2,
        top_eigenvalue=top,
        deflation=(lam[:r], U[:, :r]),
        deflated_top_eigenvalue=float(lam[r]),
    )
    plain = solve_lissa(matvec, V, config=config, l2=L2, top_eigenvalue=top)
    assert deflated.damping == plain.damping
    expected = solve_exact(dense, V, damping=deflated.damping)
    assert _rel(deflated.x, expected).max() <= 1e-2 and _rel(plain.x, expected).max() <= 1e-2
    assert np.all(deflated.residual < 1e-2)
    assert plain.depth >= 5 * deflated.depth


def test_float32_rhs_keeps_its_dtype(mlp_head) -> None:
    matvec, dense, V = mlp_head
    p = dense.shape[0]
    w, Q = np.linalg.eigh(dense)
    lam, U = w[::-1][:8].copy(), Q[:, ::-1][:, :8].copy()
    result = solve_lissa(matvec, V.astype(np.float32), config=LissaConfig(), l2=L2, deflation=(lam, U))
    assert result.x.dtype == np.float32 and result.x.shape == (3, p)
    assert _rel(result.x, solve_exact(dense, V, damping=result.damping)).max() <= 1e-2


def test_wrong_eigenvalues_trip_the_divergence_guard(spd) -> None:
    _, matvec, w, Q = spd
    V = np.random.default_rng(7).normal(size=(1, P))
    with pytest.raises(LissaDivergenceError, match="deflation"):
        solve_lissa(matvec, V, config=LissaConfig(damping=0.0, depth=200), deflation=(0.1 * w[:5], Q[:, :5]))


@pytest.mark.parametrize(
    ("deflation", "match"),
    [
        (np.zeros((P, 2)), "tuple"),
        ((np.ones(2), np.zeros((P, 3))), "shapes"),
        ((np.ones(2), np.ones((P, 2))), "orthonormal"),
        ((np.array([1.0, np.nan]), np.eye(P)[:, :2]), "finite"),
        ((np.array([1, 2]), np.eye(P)[:, :2]), "floating"),
        ((np.array([1.0, -1.0]), np.eye(P)[:, :2]), "damping must be > 0"),
    ],
)
def test_deflation_validation(spd, deflation, match) -> None:
    _, matvec, _, _ = spd
    with pytest.raises(ValueError, match=match):
        solve_lissa(matvec, np.ones((1, P)), config=LissaConfig(damping=0.0, scale=10.0), deflation=deflation)


def test_scale_factor_validation() -> None:
    with pytest.raises(ValueError, match="scale_factor"):
        LissaConfig(scale_factor=0.5)
