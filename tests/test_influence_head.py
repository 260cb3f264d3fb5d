"""Heads as data: every layer kind against a numpy reference with torch semantics, jit, penultimate split."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from influence import (
    HEAD_LAYER_KINDS,
    apply_head,
    flatten_params,
    last_linear_index,
    n_params,
    penultimate_features,
    validate_head_params,
    validate_head_spec,
)

SPEC = [
    {"kind": "flatten"},
    {"kind": "linear", "in_features": 6, "out_features": 5, "bias": True},
    {"kind": "layernorm", "normalized_shape": [5], "eps": 1e-5, "elementwise_affine": True},
    {"kind": "gelu", "approximate": "none"},
    {"kind": "identity"},
    {"kind": "linear", "in_features": 5, "out_features": 4, "bias": False},
    {"kind": "gelu", "approximate": "tanh"},
    {"kind": "tanh"},
    {"kind": "relu"},
    {"kind": "sigmoid"},
    {"kind": "layernorm", "normalized_shape": [4], "eps": 1e-3, "elementwise_affine": False},
    {"kind": "linear", "in_features": 4, "out_features": 3, "bias": True},
]


def make_params(seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {},
        {"weight": rng.normal(size=(5, 6)), "bias": rng.normal(size=5)},
        {"weight": 1 + 0.1 * rng.normal(size=5), "bias": 0.1 * rng.normal(size=5)},
        {},
        {},
        {"weight": rng.normal(size=(4, 5))},
        {},
        {},
        {},
        {},
        {},
        {"weight": rng.normal(size=(3, 4)), "bias": rng.normal(size=3)},
    ]


def reference_head(params: list[dict[str, np.ndarray]], h: np.ndarray, stop: int | None = None) -> np.ndarray:
    """Torch formulas written out in numpy."""
    x = h
    for layer, p in list(zip(SPEC, params, strict=True))[:stop]:
        kind = layer["kind"]
        if kind == "flatten":
            x = x.reshape(x.shape[0], -1)
        elif kind == "linear":
            x = x @ p["weight"].T + (p["bias"] if layer["bias"] else 0)
        elif kind == "layernorm":
            mu = x.mean(-1, keepdims=True)
            var = ((x - mu) ** 2).mean(-1, keepdims=True)
            x = (x - mu) / np.sqrt(var + layer["eps"])
            if layer["elementwise_affine"]:
                x = x * p["weight"] + p["bias"]
        elif kind == "gelu" and layer["approximate"] == "none":
            x = 0.5 * x * (1 + erf(x / np.sqrt(2)))
        elif kind == "gelu":
            x = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
        elif kind == "tanh":
            x = np.tanh(x)
        elif kind == "relu":
            x = np.maximum(x, 0)
        elif kind == "sigmoid":
            x = 1 / (1 + np.exp(-x))
    return x


@pytest.fixture(scope="module")
def data() -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    return make_params(), np.random.default_rng(1).normal(size=(7, 2, 3))


def test_spec_covers_every_layer_kind() -> None:
    assert {layer["kind"] for layer in SPEC} == HEAD_LAYER_KINDS
    validate_head_spec(SPEC)
    validate_head_spec(json.loads(json.dumps(SPEC)))


def test_apply_head_matches_torch_formulas_and_jits(data) -> None:
    params, h = data
    validate_head_params(SPEC, params)
    expected = reference_head(params, h)
    np.testing.assert_allclose(np.asarray(apply_head(SPEC, params, h)), expected, rtol=1e-12, atol=1e-12)
    jitted = jax.jit(lambda p, x: apply_head(SPEC, p, x))
    out = jitted(jax.tree_util.tree_map(jnp.asarray, params), jnp.asarray(h))
    assert out.shape == (7, 3) and out.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-12, atol=1e-12)


def test_float32_stays_float32(data) -> None:
    params, h = data
    params32 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)
    assert apply_head(SPEC, params32, h.astype(np.float32)).dtype == jnp.float32


def test_penultimate_plus_last_linear_reproduces_logits(data) -> None:
    params, h = data
    idx = last_linear_index(SPEC)
    assert idx == len(SPEC) - 1
    phi = penultimate_features(SPEC, params, h)
    assert phi.shape == (7, 4)
    np.testing.assert_allclose(np.asarray(phi), reference_head(params, h, stop=idx), rtol=1e-12)
    logits = phi @ params[idx]["weight"].T + params[idx]["bias"]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(apply_head(SPEC, params, h)), rtol=1e-12)


def test_flatten_params_round_trip(data) -> None:
    params, _ = data
    theta, unravel = flatten_params(params)
    assert theta.shape == (n_params(params),) == (5 * 6 + 5 + 10 + 4 * 5 + 3 * 4 + 3,)
    rebuilt = unravel(theta)
    for a, b in zip(params, rebuilt, strict=True):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], np.asarray(b[key]))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ([{"kind": "conv2d"}], "layer 0.*conv2d"),
        ([{"kind": "relu"}], "at least one 'linear'"),
        ([], "at least one layer"),
        ([{"kind": "linear", "in_features": 0, "out_features": 2, "bias": True}], "in_features"),
        (
            [
                {"kind": "linear", "in_features": 3, "out_features": 4, "bias": True},
                {"kind": "relu"},
                {"kind": "linear", "in_features": 5, "out_features": 2, "bias": True},
            ],
            "layer 2.*in_features=5",
        ),
        ([{"kind": "gelu", "approximate": "fast"}], "approximate"),
        ([{"kind": "layernorm", "normalized_shape": [3], "eps": -1.0, "elementwise_affine": True}], "eps"),
    ],
)
def test_validate_head_spec_names_the_bad_layer(spec, match) -> None:
    with pytest.raises(ValueError, match=match):
        validate_head_spec(spec)


def test_validate_head_params_names_the_bad_shape(data) -> None:
    params, _ = data
    bad = [dict(p) for p in params]
    bad[5] = {"weight": np.zeros((5, 4))}
    with pytest.raises(ValueError, match=r"layer 5.*weight.*\(5, 4\)"):
        validate_head_params(SPEC, bad)
