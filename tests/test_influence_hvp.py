"""Curvature products against jax.hessian in float64: Hessian, GGN, chunking, dense materialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from influence import (
    compute_dense_curvature,
    compute_objective,
    flatten_params,
    make_head_matvec,
    make_hvp,
    resolve_batch_size,
)

MLP = [
    {"kind": "linear", "in_features": 4, "out_features": 5, "bias": True},
    {"kind": "tanh"},
    {"kind": "layernorm", "normalized_shape": [5], "eps": 1e-5, "elementwise_affine": True},
    {"kind": "linear", "in_features": 5, "out_features": 3, "bias": True},
]
LOGREG = [{"kind": "linear", "in_features": 4, "out_features": 3, "bias": True}]
L2 = 0.05


def _params(spec, rng):
    out = []
    for layer in spec:
        if layer["kind"] == "linear":
            out.append(
                {
                    "weight": rng.normal(size=(layer["out_features"], layer["in_features"])),
                    "bias": rng.normal(size=layer["out_features"]),
                }
            )
        elif layer["kind"] == "layernorm":
            out.append({"weight": 1 + 0.1 * rng.normal(size=5), "bias": 0.1 * rng.normal(size=5)})
        else:
            out.append({})
    return out


def _problem(spec, seed):
    rng = np.random.default_rng(seed)
    theta, unravel = flatten_params(_params(spec, rng))
    h = rng.normal(size=(29, 4))
    y = rng.integers(0, 3, size=29)
    hessian = np.asarray(jax.jit(jax.hessian(lambda t: compute_objective(spec, unravel, t, h, y, l2=L2)))(theta))
    return theta, unravel, h, y, hessian


@pytest.fixture(scope="module")
def mlp():
    return _problem(MLP, 0)


@pytest.fixture(scope="module")
def logreg():
    return _problem(LOGREG, 1)


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_make_hvp_matches_jax_hessian(mlp) -> None:
    theta, unravel, h, y, hessian = mlp
    hvp = make_hvp(lambda t: compute_objective(MLP, unravel, t, h, y, l2=L2), theta)
    v = np.random.default_rng(2).normal(size=theta.shape[0])
    assert _rel(hvp(v), hessian @ v) < 1e-8


@pytest.mark.parametrize("batch_size", [None, 8, 29, 100])
def test_head_matvec_hessian_matches_jax_hessian(mlp, batch_size) -> None:
    theta, unravel, h, y, hessian = mlp
    matvec = make_head_matvec(MLP, unravel, theta, h, y, l2=L2, curvature="hessian", batch_size=batch_size)
    v = np.random.default_rng(3).normal(size=theta.shape[0])
    assert _rel(matvec(jnp.asarray(v)), hessian @ v) < 1e-8
    # vmap-able: the dense matrix is built from vmapped products over identity blocks.
    dense = compute_dense_curvature(matvec, theta.shape[0], dtype=np.float64)
    assert _rel(dense, hessian) < 1e-10
    np.testing.assert_array_equal(dense, dense.T)


def test_ggn_equals_hessian_for_logistic_regression(logreg) -> None:
    theta, unravel, h, y, hessian = logreg
    matvec = make_head_matvec(LOGREG, unravel, theta, h, y, l2=L2, curvature="ggn")
    dense = compute_dense_curvature(matvec, theta.shape[0], dtype=np.float64, block_size=4)
    assert _rel(dense, hessian) < 1e-10


def test_ggn_is_psd_on_mlp_and_chunking_does_not_change_it(mlp) -> None:
    theta, unravel, h, y, hessian = mlp
    p = theta.shape[0]
    full = compute_dense_curvature(
        make_head_matvec(MLP, unravel, theta, h, y, l2=0.0, curvature="ggn"), p, dtype=np.float64
    )
    chunked = compute_dense_curvature(
        make_head_matvec(MLP, unravel, theta, h, y, l2=0.0, curvature="ggn", batch_size=7),
        p,
        dtype=np.float64,
    )
    np.testing.assert_allclose(chunked, full, rtol=1e-10, atol=1e-13)
    eigenvalues = np.linalg.eigvalsh(full)
    assert eigenvalues.min() > -1e-10 * eigenvalues.max()
    # The MLP Hessian (minus l2) is indefinite at a random point, the GGN is not: they must differ.
    assert np.linalg.eigvalsh(hessian - L2 * np.eye(p)).min() < -1e-6


def test_dense_curvature_blocks_do_not_change_it(logreg) -> None:
    theta, unravel, h, y, hessian = logreg
    matvec = make_head_matvec(LOGREG, unravel, theta, h, y, l2=L2, curvature="hessian")
    p = theta.shape[0]
    blocked = compute_dense_curvature(matvec, p, dtype=np.float64, block_size=5)
    np.testing.assert_allclose(blocked, compute_dense_curvature(matvec, p, dtype=np.float64), rtol=1e-13)
    assert _rel(blocked, hessian) < 1e-10


def test_head_matvec_rejects_bad_options(logreg) -> None:
    theta, unravel, h, y, _ = logreg
    with pytest.raises(ValueError, match="curvature"):
        make_head_matvec(LOGREG, unravel, theta, h, y, l2=L2, curvature="fisher")
    with pytest.raises(ValueError, match="batch_size"):
        make_head_matvec(LOGREG, unravel, theta, h, y, l2=L2, batch_size=0)
    with pytest.raises(ValueError, match="l2"):
        make_head_matvec(LOGREG, unravel, theta, h, y, l2=-1.0)


def test_auto_batch_size_is_one_pass_up_to_16k_rows(mlp) -> None:
    assert resolve_batch_size("auto", 16_384) is None and resolve_batch_size("auto", 16_385) == 4096
    assert resolve_batch_size(None, 10**6) is None and resolve_batch_size(7, 3) == 7
    for bad in (0, -1, True, "all", 2.0):
        with pytest.raises(ValueError, match="batch_size"):
            resolve_batch_size(bad, 10)
    theta, unravel, h, y, _ = mlp
    v = jnp.asarray(np.random.default_rng(0).normal(size=theta.shape[0]))
    default = make_head_matvec(MLP, unravel, theta, h, y, l2=L2)
    single = make_head_matvec(MLP, unravel, theta, h, y, l2=L2, batch_size=None)
    np.testing.assert_array_equal(default(v), single(v))  # the default is today's rule for small n


def test_the_head_object_gives_the_hessian_its_gradients_and_logits() -> None:
    """`influence.Head`: the (spec, params) object against jax.hessian, jax.grad per row and apply_head (float64)."""
    from influence import Head, apply_head

    rng = np.random.default_rng(0)
    params = _params(MLP, rng)
    head = Head(MLP, params)
    theta, unravel, h, y, hessian = _problem(MLP, 0)
    np.testing.assert_array_equal(np.asarray(head.theta), np.asarray(theta))
    v = rng.normal(size=theta.shape[0])
    assert _rel(head.matvec(h, y, l2=L2, curvature="hessian")(jnp.asarray(v)), hessian @ v) < 1e-8
    per_row = np.stack(
        [
            np.asarray(
                jax.grad(lambda t, i=i: compute_objective(MLP, unravel, t, h[i : i + 1], y[i : i + 1], l2=0.0))(theta)
            )
            for i in range(3)
        ]
    )
    np.testing.assert_allclose(head.gradients(h[:3], y[:3]), per_row, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(head.logits(h), np.asarray(apply_head(MLP, params, h)), rtol=1e-12)


def test_gradient_products_are_directional_derivatives_without_gradients() -> None:
    """`Head.gradient_products(h, y, V)` = V g_i^T from forward-mode JVPs, for any number of rows (padding)."""
    from influence import Head

    rng = np.random.default_rng(5)
    head = Head(MLP, _params(MLP, rng))
    h, y = rng.normal(size=(37, 4)), rng.integers(0, 3, size=37)
    V = rng.normal(size=(3, int(head.theta.shape[0])))
    want = V @ head.gradients(h, y).T
    np.testing.assert_allclose(head.gradient_products(h, y, V), want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(head.gradient_products(h[:5], y[:5], V[0]), want[:1, :5], rtol=1e-9, atol=1e-12)
