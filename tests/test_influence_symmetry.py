"""The ReLU rescaling directions of a head (influence.symmetry), checked in float64 against per-example gradients
from jax.grad and an explicit rescaling of the parameters, and the query-side deflation that keeps every whitened
inner product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from influence import (
    apply_head,
    deflated_rows,
    fit_kronecker_curvature,
    flatten_params,
    rescaling_directions,
)


def relu_head(seed=0, n=15, bias=True):
    """5 -> 6 (ReLU) -> 4 (ReLU) -> 3: two hidden layers, 10 rescaling directions."""
    rng = np.random.default_rng(seed)
    sizes = [(5, 6), (6, 4), (4, 3)]
    spec, params = [], []
    for i, (a, b) in enumerate(sizes):
        spec.append({"kind": "linear", "in_features": a, "out_features": b, "bias": bias})
        layer = {"weight": rng.normal(size=(b, a))}
        if bias:
            layer["bias"] = rng.normal(size=b)
        params.append(layer)
        if i < len(sizes) - 1:
            spec.append({"kind": "relu"})
            params.append({})
    return spec, params, rng.normal(size=(n, 5)), rng.integers(0, 3, n)


def per_example_gradients(spec, params, h, y):
    theta, unravel = flatten_params(params)

    def loss(t, x, c):
        z = apply_head(spec, unravel(t), x[None])[0]
        return jax.nn.logsumexp(z) - z[c]

    return np.asarray(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(theta, jnp.asarray(h), jnp.asarray(y)))


@pytest.mark.parametrize("bias", [True, False])
def test_rescaling_directions_are_the_derivative_of_a_rescaling_that_keeps_the_outputs(bias):
    spec, params, h, y = relu_head(bias=bias)
    V = rescaling_directions(spec, params)
    theta = np.asarray(flatten_params(params)[0])
    assert V.shape == (6 + 4, theta.shape[0])
    logits = np.asarray(apply_head(spec, params, h))
    for j in (0, 7):  # a unit of each hidden layer: (1 + eps) on its row, 1 / (1 + eps) on its column
        eps = 1e-6
        layer_in = 0 if j < 6 else 1
        unit = j if j < 6 else j - 6
        p2 = [{k: np.array(v) for k, v in layer.items()} for layer in params]
        first, second = 2 * layer_in, 2 * layer_in + 2
        p2[first]["weight"][unit] *= 1 + eps
        if bias:
            p2[first]["bias"][unit] *= 1 + eps
        p2[second]["weight"][:, unit] /= 1 + eps
        np.testing.assert_allclose(np.asarray(apply_head(spec, p2, h)), logits, rtol=1e-12, atol=1e-12)
        scaled = np.asarray(flatten_params(p2)[0])
        np.testing.assert_allclose((scaled - theta) / eps, V[j], rtol=1e-5, atol=1e-8)
    G = per_example_gradients(spec, params, h, y)
    cos = G @ V.T / np.linalg.norm(G, axis=1)[:, None] / np.linalg.norm(V, axis=1)[None]
    assert np.abs(cos).max() < 1e-12


def test_no_directions_without_a_relu_between_linear_layers():
    spec = [{"kind": "linear", "in_features": 4, "out_features": 3, "bias": True}, {"kind": "relu"}]
    params = [{"weight": np.ones((3, 4)), "bias": np.ones(3)}, {}]
    assert rescaling_directions(spec, params).shape == (0, 15)
    tanh = [dict(s) for s in relu_head()[0]]
    tanh[1] = {"kind": "tanh"}
    assert rescaling_directions(tanh, relu_head()[1]).shape[0] == 4  # only the second hidden layer's units


def test_deflated_query_side_keeps_every_whitened_inner_product_and_shrinks_the_query():
    """y' = (I - B B^T) K^1/2 x with B a basis of K^1/2 V: y' . K^-1/2 g_i = x . g_i for every per-example
    gradient (they are orthogonal to V), ||y'|| <= ||y||, and y' is orthogonal to every K^1/2 v_j."""
    spec, params, h, y = relu_head(n=40)
    K = fit_kronecker_curvature(spec, params, h, kind="ekfac", l2=1e-3, damping=1e-2)
    V = rescaling_directions(spec, params)
    up, down = K.power_fn(0.5), K.power_fn(-0.5)
    G = per_example_gradients(spec, params, h, y)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(5, G.shape[1]))
    deflated = deflated_rows(up, V)
    Y, Y2, Z = np.asarray(up(X)), np.asarray(deflated(X)), np.asarray(down(G))
    np.testing.assert_allclose(Y2 @ Z.T, X @ G.T, rtol=1e-9, atol=1e-11)
    assert np.all(np.linalg.norm(Y2, axis=1) < np.linalg.norm(Y, axis=1))
    np.testing.assert_allclose(Y2 @ np.asarray(up(V)).T, 0, atol=1e-10 * np.abs(Y).max())
    # dead unit: its zero direction is dropped, not turned into an arbitrary basis vector
    dead = [dict(layer) for layer in params]
    dead[0] = {"weight": params[0]["weight"].copy(), "bias": params[0]["bias"].copy()}
    dead[0]["weight"][2], dead[0]["bias"][2] = 0.0, 0.0
    V_dead = rescaling_directions(spec, dead)
    assert np.linalg.norm(V_dead[2, :36]) == 0
    assert deflated_rows(up, np.zeros((0, G.shape[1]))) is up
