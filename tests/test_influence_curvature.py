"""Curvature operators (float64): exact, LiSSA and a dense solve agree; the damping rule; the pencil's eigenpairs;
the objects give bit for bit what the code paths they replace gave."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.tree_util import Partial

from influence import (
    EigenSolver,
    HeadCurvature,
    LissaConfig,
    ProjectedCurvature,
    compute_damping,
    compute_dense_curvature,
    compute_top_eigenpairs,
    deflated_inverse,
    flatten_params,
    make_head_matvec,
    pencil_eigenvalues,
    pencil_eigh,
    reference_eigenvalue,
    resolve_damping,
    solve_lissa,
)

L2 = 1e-2
MLP = [
    {"kind": "linear", "in_features": 6, "out_features": 8, "bias": True},
    {"kind": "tanh"},
    {"kind": "linear", "in_features": 8, "out_features": 3, "bias": True},
]
TIGHT = LissaConfig(tol=1e-10, max_depth=200_000)


@pytest.fixture(scope="module")
def head():
    """A tiny tanh-MLP head (p = 83), float64: GGN + l2 matvec, its dense eigendecomposition, top-4 pairs."""
    rng = np.random.default_rng(0)
    h = rng.normal(size=(120, 6)) * np.geomspace(3.0, 0.3, 6)
    y = (h[:, :3] @ rng.normal(size=(3, 3))).argmax(1)
    params = [
        {"weight": 0.5 * rng.normal(size=(8, 6)), "bias": 0.1 * rng.normal(size=8)},
        {},
        {"weight": 0.5 * rng.normal(size=(3, 8)), "bias": 0.1 * rng.normal(size=3)},
    ]
    theta, unravel = flatten_params(params)
    matvec = make_head_matvec(MLP, unravel, theta, h, y, l2=L2, curvature="ggn")
    p = int(theta.shape[0])
    dense = compute_dense_curvature(matvec, p, dtype=np.float64)
    deflation = compute_top_eigenpairs(matvec, p, rank=4, iters=100)
    return matvec, dense, EigenSolver.from_dense(dense), deflation, rng.normal(size=(3, p))


def test_compute_damping_rule() -> None:
    assert compute_damping(10.0, 0.0) == pytest.approx(1e-2)
    assert compute_damping(10.0, 1e-3) == pytest.approx(9e-3)
    assert compute_damping(10.0, 1.0) == 0.0  # l2 alone already lifts the floor to 1e-3 lambda_ref
    assert compute_damping(10.0, 0.0, 0.3) == 0.3  # an override wins, even 0
    assert compute_damping(10.0, 0.0, 0.0) == 0.0
    assert compute_damping(float("nan"), 0.0, 0.5) == 0.5  # the reference is not needed then
    assert resolve_damping(10.0, 1e-3, None) == compute_damping(10.0, 1e-3)  # the old name, same rule
    for bad in (-1.0, float("inf"), True):
        with pytest.raises(ValueError, match="damping"):
            compute_damping(10.0, 0.0, bad)
    with pytest.raises(ValueError, match="finite"):
        compute_damping(float("nan"), 0.0)


def test_reference_eigenvalue_is_the_top_of_what_lissa_iterates_on() -> None:
    assert reference_eigenvalue(7.0, None) == 7.0
    assert reference_eigenvalue(7.0, np.array([7.0, 3.0, 2.5])) == 2.5  # lambda_r bounds lambda_{r+1}
    assert reference_eigenvalue(7.0, np.zeros(0)) == 7.0  # rank 0 is no deflation


@pytest.mark.parametrize("deflated", [False, True])
def test_head_curvature_exact_and_lissa_match_a_dense_solve(head, deflated) -> None:
    matvec, dense, eigen, pairs, g = head
    curvature = HeadCurvature.create(
        matvec=matvec,
        l2=L2,
        top_eigenvalue=eigen.top_eigenvalue,
        deflation=pairs if deflated else None,
        eigen=eigen,
    )
    ref = float(np.min(pairs[0])) if deflated else eigen.top_eigenvalue
    assert curvature.damping == compute_damping(ref, L2) and curvature.reference_eigenvalue == ref
    want = np.asarray(jnp.linalg.solve(dense + curvature.damping * np.eye(len(dense)), g.T).T)
    exact, diag = curvature.solve(g, method="exact")
    np.testing.assert_allclose(exact, want, rtol=1e-9, atol=1e-12)
    assert diag == {"damping": curvature.damping}
    lissa, diag = curvature.solve(g, method="lissa", lissa=TIGHT)
    np.testing.assert_allclose(lissa, want, rtol=1e-6, atol=1e-9)
    assert set(diag) == {"damping", "scale", "depth", "residual_max"} and diag["residual_max"] < 1e-6


def test_head_curvature_lissa_is_todays_solve_bit_for_bit(head) -> None:
    """`Index.solve` (api/index.py at 3b64ee1) called solve_lissa with exactly these arguments."""
    matvec, _, eigen, pairs, g = head
    config = LissaConfig()
    damping = compute_damping(float(np.min(pairs[0])), L2, config.damping)
    curvature = HeadCurvature(
        matvec=matvec, l2=L2, top_eigenvalue=eigen.top_eigenvalue, damping=damping, deflation=pairs, eigen=eigen
    )
    got, diag = curvature.solve(g, method="lissa", lissa=config)
    before = solve_lissa(
        matvec,
        g,
        config=dataclasses.replace(config, damping=damping),
        l2=L2,
        top_eigenvalue=eigen.top_eigenvalue,
        min_eigenvalue_floor=L2 + damping,
        deflation=pairs,
    )
    np.testing.assert_array_equal(got, before.x)
    assert diag["depth"] == before.depth and diag["scale"] == before.scale
    assert diag["residual_max"] == float(np.max(before.residual))
    np.testing.assert_array_equal(curvature.run_iterative(g, lissa=config).x, before.x)
    exact, _ = curvature.solve(g, method="exact")
    np.testing.assert_array_equal(exact, eigen.solve(g.astype(np.float64), damping=damping))


def test_head_curvature_on_a_random_spd_matrix() -> None:
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    a = (q * np.geomspace(50.0, 0.5, 10)) @ q.T
    a = 0.5 * (a + a.T)
    curvature = HeadCurvature.create(
        matvec=lambda v: jnp.asarray(a) @ v, l2=0.0, top_eigenvalue=50.0, eigen=EigenSolver.from_dense(a)
    )
    g = rng.normal(size=(2, 10))
    want = np.linalg.solve(a + curvature.damping * np.eye(10), g.T).T
    np.testing.assert_allclose(curvature.solve(g, method="exact")[0], want, rtol=1e-10)
    np.testing.assert_allclose(curvature.solve(g, method="lissa", lissa=TIGHT)[0], want, rtol=1e-6)


def test_head_curvature_refuses_what_it_cannot_solve(head) -> None:
    matvec, _, eigen, _, g = head
    curvature = HeadCurvature(matvec=matvec, l2=L2, top_eigenvalue=eigen.top_eigenvalue, damping=0.0)
    with pytest.raises(ValueError, match="method 'exact' needs the dense eigendecomposition"):
        curvature.solve(g, method="exact")
    with pytest.raises(ValueError, match="method must be one of"):
        curvature.solve(g, method="cg")
    with pytest.raises(ValueError, match="damping"):
        HeadCurvature(matvec=matvec, l2=L2, top_eigenvalue=1.0, damping=-1.0)
    with pytest.raises(ValueError, match="l2"):
        HeadCurvature(matvec=matvec, l2=float("nan"), top_eigenvalue=1.0, damping=0.0)


def _pencil(d: int = 12, p: int = 40, seed: int = 0):
    """A = S^T C S + l2 S^T S and B = S^T S for a random PSD C [p, p] and a random S [p, d]."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(60, p)) * np.geomspace(3.0, 0.1, p)
    C = X.T @ X / 60
    S = rng.normal(size=(p, d)) / np.sqrt(d)
    return S.T @ C @ S + L2 * S.T @ S, S.T @ S, rng.normal(size=(3, d)), p / d


def test_pencil_eigh_is_b_orthonormal_largest_first() -> None:
    A, B, _, _ = _pencil()
    mu, V = pencil_eigh(A, B)
    assert np.all(np.diff(mu) <= 0)
    np.testing.assert_allclose(A @ V, B @ V * mu, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(V.T @ B @ V, np.eye(len(mu)), atol=1e-10)
    np.testing.assert_allclose(pencil_eigenvalues(A, B), mu, rtol=1e-10)
    with pytest.raises(ValueError, match="square"):
        pencil_eigh(A, B[:3])


def test_projected_curvature_exact_and_lissa_match_a_dense_solve() -> None:
    A, B, phi, units = _pencil()
    curvature = ProjectedCurvature.create(A, B, full_space_scale=units, l2=L2, deflation_rank=4)
    assert curvature.damping == compute_damping(curvature.top_eigenvalue, L2)
    assert curvature.top_eigenvalue == pytest.approx(float(pencil_eigenvalues(A, B)[0]))
    want = units * np.linalg.solve(A + curvature.damping * B, phi.T).T
    exact, diag = curvature.solve(phi, method="exact")
    np.testing.assert_allclose(exact, want, rtol=1e-9)
    assert diag == {"damping": curvature.damping}
    for r in (0, 4):
        lissa, diag = dataclasses.replace(curvature, deflation_rank=r).solve(phi, method="lissa", lissa=TIGHT)
        np.testing.assert_allclose(lissa, want, rtol=1e-6)
        assert diag["damping"] == curvature.damping and diag["residual_max"] < 1e-6
    explicit = ProjectedCurvature.create(A, B, full_space_scale=units, l2=L2, deflation_rank=0, damping=0.5)
    np.testing.assert_allclose(
        explicit.solve(phi, method="exact")[0], units * np.linalg.solve(A + 0.5 * B, phi.T).T, rtol=1e-9
    )


def test_projected_curvature_is_todays_block_solve_bit_for_bit() -> None:
    """`Index.block_curvature` / `block_damping` / `block_lissa_operator` / `block_query_vectors` at 3b64ee1."""
    A, B, phi, units = _pencil(seed=1)
    config, r = LissaConfig(), 5
    mu, V = scipy.linalg.eigh((A + A.T) / 2, (B + B.T) / 2)
    mu, V = mu[::-1].copy(), V[:, ::-1].copy()
    damping = float(resolve_damping(float(mu[0]), L2, config.damping))
    M = A + damping * B
    lam, vecs = np.linalg.eigh((M + M.T) / 2)
    before_exact = units * ((phi @ V) / (mu + damping)) @ V.T
    before = solve_lissa(
        Partial(jnp.matmul, jnp.asarray(M)),
        phi,
        config=dataclasses.replace(config, damping=0.0),
        top_eigenvalue=float(lam[-1]),
        min_eigenvalue_floor=float(max(lam[0], 1e-12 * lam[-1])),
        deflation=(lam[::-1][:r].copy(), vecs[:, ::-1][:, :r].copy()),
    )
    curvature = ProjectedCurvature(A=A, B=B, full_space_scale=units, l2=L2, damping=damping, deflation_rank=r)
    np.testing.assert_array_equal(curvature.solve(phi, method="exact")[0], before_exact)
    got, diag = curvature.solve(phi, method="lissa", lissa=config)
    np.testing.assert_array_equal(got, units * np.asarray(before.x))
    assert diag == {
        "damping": damping,
        "scale": before.scale,
        "depth": float(before.depth),
        "residual_max": float(np.max(before.residual)),
    }
    assert ProjectedCurvature.create(A, B, full_space_scale=units, l2=L2, deflation_rank=r).damping == damping


def test_projected_curvature_refuses_bad_input() -> None:
    A, B, phi, units = _pencil()
    with pytest.raises(ValueError, match="deflation_rank"):
        ProjectedCurvature(A=A, B=B, full_space_scale=units, l2=L2, damping=0.0, deflation_rank=len(A))
    with pytest.raises(ValueError, match="full_space_scale"):
        ProjectedCurvature(A=A, B=B, full_space_scale=0.0, l2=L2, damping=0.0, deflation_rank=0)
    with pytest.raises(ValueError, match="method must be one of"):
        ProjectedCurvature(A=A, B=B, full_space_scale=units, l2=L2, damping=0.0, deflation_rank=0).solve(
            phi, method="cg"
        )


def test_cg_preconditioned_by_the_deflation_solves_in_far_fewer_products_than_lissa(head) -> None:
    """HeadCurvature(iterative="cg"): "lissa" is CG preconditioned by the deflated eigenpairs, to its residual
    target, against the dense float64 solve; far fewer curvature products than LiSSA's recursion."""
    matvec, dense, solver, deflation, g = head
    p = dense.shape[0]
    want = np.linalg.solve(dense + 1e-4 * np.eye(p), g.T).T
    lissa = HeadCurvature(matvec=matvec, l2=L2, top_eigenvalue=solver.top_eigenvalue, damping=1e-4, deflation=deflation)
    cg = dataclasses.replace(lissa, iterative="cg")
    config = LissaConfig(tol=1e-4)
    x, diag = cg.solve(g, method="lissa", lissa=config)
    _, diag_lissa = lissa.solve(g, method="lissa", lissa=config)
    assert "scale" not in diag and diag["residual_max"] <= 1e-5
    np.testing.assert_allclose(x, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    assert diag["depth"] < diag_lissa["depth"] / 5, (diag["depth"], diag_lissa["depth"])
    with pytest.raises(ValueError, match="iterative"):
        dataclasses.replace(lissa, iterative="sgd")


def test_deflation_powers_compose_and_invert(head) -> None:
    """M^1/2 M^-1/2 = I, M^-1/2 M^-1/2 = M^-1 = the preconditioner, and M^-1 (A + d I) = I on the deflated subspace."""
    from influence import deflation_power
    from influence.curvature import deflation_preconditioner

    _, dense, _, (lam, U), g = head
    d = 1e-3
    half, inv_half = deflation_power(lam, U, d, 0.5), deflation_power(lam, U, d, -0.5)
    np.testing.assert_allclose(np.asarray(half(inv_half(g))), g, rtol=1e-8, atol=1e-10)
    inv = np.asarray(deflation_preconditioner(lam, U, d)(g))
    np.testing.assert_allclose(np.asarray(inv_half(inv_half(g))), inv, rtol=1e-8, atol=1e-12)
    top = np.asarray(U)[:, :1].T  # a deflated direction: M^-1 (A + d I) u = u up to the eigenpair's accuracy
    np.testing.assert_allclose(
        np.asarray(deflation_preconditioner(lam, U, d)(top @ (dense + d * np.eye(len(dense))))), top, atol=1e-4
    )
    with pytest.raises(ValueError, match="eigenvalues"):
        deflation_power(np.array([-1.0]), np.ones((3, 1)), 0.0, 0.5)


def test_deflated_inverse_is_exact_on_the_top_eigenspace_and_the_approximation_elsewhere() -> None:
    """float64, dense: U diag(1/(lambda + d)) U^T R + P K^-1 P R for any SPD K; the exact inverse when K = A + dI."""
    rng = np.random.default_rng(3)
    p, r, d = 30, 6, 0.05
    X = rng.standard_normal((p, p))
    A = X @ X.T / p + 1e-3 * np.eye(p)
    lam, vecs = np.linalg.eigh(A)
    lam, U = lam[::-1][:r], vecs[:, ::-1][:, :r]
    Y = rng.standard_normal((p, p))
    K = Y @ Y.T / p + 0.1 * np.eye(p)  # any SPD approximation
    R = rng.standard_normal((4, p))
    P = np.eye(p) - U @ U.T

    def inverse_of(M: np.ndarray) -> Partial:
        return Partial(lambda M_inv, B: B @ M_inv, jnp.asarray(np.linalg.inv(M)))

    got = np.asarray(deflated_inverse(lam, U, d, inverse_of(K))(jnp.asarray(R)))
    expected = (R @ U / (lam + d)) @ U.T + (R @ P) @ np.linalg.inv(K) @ P
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    exact = np.asarray(deflated_inverse(lam, U, d, inverse_of(A + d * np.eye(p)))(jnp.asarray(R)))
    np.testing.assert_allclose(exact, np.linalg.solve(A + d * np.eye(p), R.T).T, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="eigenvalues \\+ damping"):
        deflated_inverse(-lam, U, 0.0, inverse_of(K))
