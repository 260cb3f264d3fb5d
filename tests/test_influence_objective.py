"""Objective, per-example gradients (vmap vs loop, chunking) and margins."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from influence import (
    compute_margins,
    compute_objective,
    compute_per_example_grads,
    cross_entropy,
    flatten_params,
    make_loss_fn,
    softmax,
)

SPEC = [
    {"kind": "linear", "in_features": 4, "out_features": 6, "bias": True},
    {"kind": "tanh"},
    {"kind": "linear", "in_features": 6, "out_features": 3, "bias": True},
]


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    params = [
        {"weight": rng.normal(size=(6, 4)), "bias": rng.normal(size=6)},
        {},
        {"weight": rng.normal(size=(3, 6)), "bias": rng.normal(size=3)},
    ]
    theta, unravel = flatten_params(params)
    h = rng.normal(size=(23, 4))
    y = rng.integers(0, 3, size=23)
    return theta, unravel, h, y


def test_cross_entropy_matches_definition() -> None:
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]])
    labels = np.array([0, 0])
    expected = [np.log(np.exp(logits[0]).sum()) - 1.0, 0.0]
    np.testing.assert_allclose(np.asarray(cross_entropy(logits, labels)), expected, rtol=1e-12, atol=1e-12)


def test_objective_is_mean_ce_plus_half_l2(problem) -> None:
    theta, unravel, h, y = problem
    losses = make_loss_fn(SPEC, unravel)(theta, h, y)
    value = compute_objective(SPEC, unravel, theta, h, y, l2=0.3)
    np.testing.assert_allclose(float(value), float(losses.mean() + 0.15 * theta @ theta), rtol=1e-12)


def test_per_example_grads_equal_loop_and_ignore_chunking(problem) -> None:
    theta, unravel, h, y = problem
    loss_fn = make_loss_fn(SPEC, unravel)
    grad_one = jax.jit(jax.grad(lambda t, hi, yi: loss_fn(t, hi[None], yi[None])[0]))
    expected = np.stack([np.asarray(grad_one(theta, jnp.asarray(h[i]), jnp.asarray(y[i]))) for i in range(len(y))])
    full = compute_per_example_grads(SPEC, unravel, theta, h, y)
    chunked = compute_per_example_grads(SPEC, unravel, theta, h, y, batch_size=5)
    assert full.shape == (23, theta.shape[0]) and full.dtype == np.float64 and isinstance(full, np.ndarray)
    np.testing.assert_allclose(full, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(chunked, expected, rtol=1e-12, atol=1e-14)
    # Mean of per-example gradients is the gradient of the mean loss (no l2 term).
    mean_grad = jax.jit(jax.grad(lambda t: compute_objective(SPEC, unravel, t, h, y, l2=0.0)))(theta)
    np.testing.assert_allclose(full.mean(0), np.asarray(mean_grad), rtol=1e-10, atol=1e-14)


def test_per_example_grads_keep_float32(problem) -> None:
    theta, unravel, h, y = problem
    out = compute_per_example_grads(SPEC, unravel, theta.astype(jnp.float32), h.astype(np.float32), y)
    assert out.dtype == np.float32


def test_per_example_grads_reject_bad_input(problem) -> None:
    theta, unravel, h, y = problem
    with pytest.raises(ValueError, match="batch_size"):
        compute_per_example_grads(SPEC, unravel, theta, h, y, batch_size=0)
    with pytest.raises(ValueError, match="y must have shape"):
        compute_per_example_grads(SPEC, unravel, theta, h, y[:-1])


def test_margins() -> None:
    logits = np.array([[1.0, 3.0, 2.0], [5.0, 1.0, 4.5]])
    np.testing.assert_allclose(compute_margins(logits, np.array([1, 2])), [1.0, -0.5])


def test_softmax_is_stable_and_matches_jax() -> None:
    z = np.random.default_rng(0).normal(size=(5, 4)) * 3
    p = softmax(z)
    assert p.dtype == np.float64
    np.testing.assert_allclose(p, np.asarray(jax.nn.softmax(jnp.asarray(z), axis=-1)), rtol=1e-14)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-15)
    np.testing.assert_allclose(softmax(z + 1e4), p, rtol=1e-9)  # shifted by the row max: no overflow
    np.testing.assert_allclose(softmax(z.T, axis=0), p.T, rtol=1e-15)
    from influence import noise

    assert noise.softmax is softmax  # the one softmax
