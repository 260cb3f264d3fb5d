"""Pure label-noise formulas of influence.noise: the complement choice, loo-loss, oos-loss, the fused score, and
the deprecated noise.compute_top_eigenpairs forwarding to the one eigensolver."""

import jax.numpy as jnp
import numpy as np
import pytest

from influence import compute_top_eigenpairs
from influence import noise as nz


def test_self_influence_complement_is_l2_plus_damping_else_the_smallest_computed_curvature() -> None:
    eigenvalues = np.array([5.0, 2.0, 0.5])
    assert nz.self_influence_complement(0.3, 0.1, eigenvalues) == pytest.approx(0.4)
    assert nz.self_influence_complement(0.0, 0.0, eigenvalues) == 0.5
    # exact when all p eigenpairs are given: the complement is then never used
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 6))
    C = a.T @ a / 30
    w, Q = np.linalg.eigh(C)
    g = rng.normal(size=(4, 6))
    exact = np.einsum("ij,ij->i", g, np.linalg.solve(C, g.T).T)
    low = nz.compute_self_influence_eigen(g, w, Q, damping=0.0, complement=nz.self_influence_complement(0, 0, w))
    np.testing.assert_allclose(low, exact, rtol=1e-10)


def test_loo_and_oos_losses() -> None:
    loss = np.array([0.1, 2.0])
    np.testing.assert_allclose(nz.loo_loss(loss, np.array([10.0, 4.0]), 100), [0.2, 2.04])
    probs = np.array([[0.7, 0.3], [0.0, 1.0]])
    out = nz.oos_loss(probs, np.array([0, 0]))
    np.testing.assert_allclose(out, [-np.log(0.7), -np.log(1e-300)])  # a zero probability is clipped
    assert np.all(np.isfinite(out))


def test_fused_loss_score_is_the_mean_rank_of_class_normalised_losses() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 50)
    losses = {"loss": rng.exponential(size=50), "oos-loss": rng.exponential(size=50)}
    want = nz.fuse_ranks({k: nz.class_normalized_loss(v, labels) for k, v in losses.items()})
    np.testing.assert_array_equal(nz.fused_loss_score(losses, labels), want)


def test_deprecated_noise_eigenpairs_forward_to_the_one_solver() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((40, 30))
    C = a.T @ a / 40

    def matvec(v):
        return jnp.asarray(C, jnp.float32) @ v

    eigenvalues, Q = nz.compute_top_eigenpairs(matvec, 30, k=5, tol=1e-8)
    np.testing.assert_allclose(eigenvalues, np.linalg.eigvalsh(C)[::-1][:5], rtol=1e-4)
    np.testing.assert_allclose(np.abs(Q.T @ Q), np.eye(5), atol=1e-4)
    same = compute_top_eigenpairs(matvec, 30, rank=5, seed=0, tol=1e-8, algorithm="lanczos")
    np.testing.assert_array_equal(eigenvalues, same[0])
    np.testing.assert_array_equal(Q, same[1])
    for bad in (0, 30, True):
        with pytest.raises(ValueError, match="k must be"):
            nz.compute_top_eigenpairs(matvec, 30, k=bad)
