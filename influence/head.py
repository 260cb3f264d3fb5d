"""Classifier heads as plain data: a JSON spec plus a list of parameter dicts, applied in pure JAX.

A head is the trailing part of a torch model, f(h; theta) = L_k o ... o L_1 (h), translated layer by layer so
that the influence math (Hessian-vector products, per-example gradients) runs on cached cut features h.
Layer semantics match torch exactly:

    linear:    y = h W^T + b                       (W: [out, in], torch layout)
    relu:      y = max(h, 0)
    gelu:      y = h/2 (1 + erf(h / sqrt 2))                              (approximate="none")
               y = h/2 (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))          (approximate="tanh")
    tanh, sigmoid: elementwise
    layernorm: y = (h - mean) / sqrt(var + eps) * w + b   (biased variance over the trailing normalized_shape)
    identity:  y = h                               (eval-mode Dropout)
    flatten:   y = h.reshape(n, -1)

Reference: Koh & Liang 2017, "Understanding Black-box Predictions via Influence Functions" (arXiv:1703.04730),
who likewise restrict the influence computation to the top layers of a network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.typing import ArrayLike

from influence.checks import is_int

HeadSpec = Sequence[Mapping[str, Any]]
HeadParams = Sequence[Mapping[str, ArrayLike]]

HEAD_LAYER_KINDS: frozenset[str] = frozenset(
    {"linear", "relu", "gelu", "tanh", "sigmoid", "layernorm", "identity", "flatten"}
)

_GELU_APPROXIMATIONS = frozenset({"none", "tanh"})


def _layer_error(index: int, kind: Any, message: str) -> ValueError:
    return ValueError(f"head spec layer {index} (kind={kind!r}): {message}")


def _validate_layer(index: int, layer: Any, width: int | None) -> int | None:
    """Checks one layer dict and returns the feature width after it (None when unknown)."""
    if not isinstance(layer, Mapping):
        raise ValueError(f"head spec layer {index}: expected a dict, got {type(layer).__name__} {layer!r}")
    kind = layer.get("kind")
    if kind not in HEAD_LAYER_KINDS:
        raise _layer_error(index, kind, f"unsupported layer kind; supported kinds are {sorted(HEAD_LAYER_KINDS)}")
    if kind == "linear":
        for key in ("in_features", "out_features"):
            value = layer.get(key)
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value <= 0:
                raise _layer_error(index, kind, f"{key} must be a positive int, got {value!r}")
        if not isinstance(layer.get("bias"), bool):
            raise _layer_error(index, kind, f"bias must be a bool, got {layer.get('bias')!r}")
        if width is not None and width != layer["in_features"]:
            raise _layer_error(
                index,
                kind,
                f"in_features={layer['in_features']} but the previous layer outputs {width} features",
            )
        return int(layer["out_features"])
    if kind == "gelu":
        approximate = layer.get("approximate", "none")
        if approximate not in _GELU_APPROXIMATIONS:
            raise _layer_error(index, kind, f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if kind == "layernorm":
        shape = layer.get("normalized_shape")
        if (
            not isinstance(shape, Sequence)
            or isinstance(shape, str)
            or len(shape) == 0
            or not all(is_int(s) and s > 0 for s in shape)
        ):
            raise _layer_error(
                index, kind, f"normalized_shape must be a non-empty list of positive ints, got {shape!r}"
            )
        eps = layer.get("eps")
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps) or eps <= 0:
            raise _layer_error(index, kind, f"eps must be a positive float, got {eps!r}")
        if not isinstance(layer.get("elementwise_affine"), bool):
            raise _layer_error(
                index, kind, f"elementwise_affine must be a bool, got {layer.get('elementwise_affine')!r}"
            )
        if len(shape) == 1 and width is not None and width != shape[0]:
            raise _layer_error(index, kind, f"normalized_shape={list(shape)} but the input has {width} features")
    if kind == "flatten":
        return None
    return width


def validate_head_spec(spec: HeadSpec) -> None:
    """Checks that a head spec is a non-empty list of supported layer dicts ending in usable linear layers.

    Consecutive linear layers (with only elementwise layers between them) must agree on their widths.

    Args:
        spec: list of layer dicts (see the module docstring).

    Raises:
        ValueError: naming the offending layer index and kind.
    """
    if isinstance(spec, str | bytes | Mapping) or not isinstance(spec, Sequence):
        raise ValueError(f"head spec must be a list of layer dicts, got {type(spec).__name__}")
    if len(spec) == 0:
        raise ValueError("head spec must contain at least one layer, got an empty list")
    width: int | None = None
    for index, layer in enumerate(spec):
        width = _validate_layer(index, layer, width)
    if not any(layer["kind"] == "linear" for layer in spec):
        raise ValueError("head spec must contain at least one 'linear' layer, got none")


def _expected_param_shapes(layer: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    kind = layer["kind"]
    if kind == "linear":
        shapes: dict[str, tuple[int, ...]] = {"weight": (layer["out_features"], layer["in_features"])}
        if layer["bias"]:
            shapes["bias"] = (layer["out_features"],)
        return shapes
    if kind == "layernorm" and layer["elementwise_affine"]:
        shape = tuple(int(s) for s in layer["normalized_shape"])
        return {"weight": shape, "bias": shape}
    return {}


def validate_head_params(spec: HeadSpec, params: HeadParams) -> None:
    """Checks that params has one dict per layer with exactly the torch-layout shapes the spec implies.

    Args:
        spec: a valid head spec.
        params: list of dicts of arrays, one per layer.

    Raises:
        ValueError: naming the layer index, the parameter name and the shapes.
    """
    validate_head_spec(spec)
    if isinstance(params, Mapping) or not isinstance(params, Sequence) or len(params) != len(spec):
        got = len(params) if isinstance(params, Sequence) else type(params).__name__
        raise ValueError(f"params must be a list of {len(spec)} dicts (one per layer), got {got}")
    for index, (layer, layer_params) in enumerate(zip(spec, params, strict=True)):
        expected = _expected_param_shapes(layer)
        if not isinstance(layer_params, Mapping) or set(layer_params) != set(expected):
            keys = sorted(layer_params) if isinstance(layer_params, Mapping) else layer_params
            raise _layer_error(index, layer["kind"], f"expected params {sorted(expected)}, got {keys!r}")
        for name, shape in expected.items():
            got_shape = tuple(np.shape(layer_params[name]))
            if got_shape != shape:
                raise _layer_error(index, layer["kind"], f"params[{name!r}] has shape {got_shape}, expected {shape}")


def _layernorm(layer: Mapping[str, Any], layer_params: Mapping[str, ArrayLike], h: jax.Array) -> jax.Array:
    axes = tuple(range(h.ndim - len(layer["normalized_shape"]), h.ndim))
    mean = jnp.mean(h, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=axes, keepdims=True)  # biased, as torch
    out = (h - mean) * jax.lax.rsqrt(var + layer["eps"])
    if layer["elementwise_affine"]:
        out = out * layer_params["weight"] + layer_params["bias"]
    return out


def _apply_layer(layer: Mapping[str, Any], layer_params: Mapping[str, ArrayLike], h: jax.Array) -> jax.Array:
    kind = layer["kind"]
    if kind == "linear":
        out = h @ jnp.swapaxes(layer_params["weight"], -1, -2)
        return out + layer_params["bias"] if layer["bias"] else out
    if kind == "relu":
        return jax.nn.relu(h)
    if kind == "gelu":
        return jax.nn.gelu(h, approximate=layer.get("approximate", "none") == "tanh")
    if kind == "tanh":
        return jnp.tanh(h)
    if kind == "sigmoid":
        return jax.nn.sigmoid(h)
    if kind == "layernorm":
        return _layernorm(layer, layer_params, h)
    if kind == "identity":
        return h
    if kind == "flatten":
        return h.reshape(h.shape[0], -1)
    raise ValueError(f"unsupported head layer kind {kind!r}; supported kinds are {sorted(HEAD_LAYER_KINDS)}")


def _apply_layers(spec: HeadSpec, params: HeadParams, h: ArrayLike, stop: int) -> jax.Array:
    out = jnp.asarray(h)
    for layer, layer_params in zip(spec[:stop], params[:stop], strict=True):
        out = _apply_layer(layer, layer_params, out)
    return out


def apply_head(spec: HeadSpec, params: HeadParams, h: ArrayLike) -> jax.Array:
    """Applies the head to a batch of cut features: logits = L_k(... L_1(h)).

    Pure and jit-able with the spec closed over (static):
    ``jax.jit(lambda p, h: apply_head(spec, p, h))``.

    Args:
        spec: head spec (list of layer dicts).
        params: one dict of arrays per layer.
        h: cut features [n, ...].

    Returns:
        logits [n, n_classes].
    """
    return _apply_layers(spec, params, h, len(spec))


def last_linear_index(spec: HeadSpec) -> int:
    """Returns the index of the last 'linear' layer in the spec.

    Raises:
        ValueError: if the spec has no linear layer.
    """
    for index in range(len(spec) - 1, -1, -1):
        if spec[index].get("kind") == "linear":
            return index
    raise ValueError("head spec must contain at least one 'linear' layer, got none")


def penultimate_features(spec: HeadSpec, params: HeadParams, h: jax.Array) -> jax.Array:
    """Returns phi, the input of the last linear layer: the layers before it applied to h.

    With phi = penultimate_features(...) the logits are phi W^T + b followed by any (elementwise) trailing
    layers: the feature map of the representer-point decomposition (Yeh et al. 2018, arXiv:1811.09720).

    Args:
        spec: head spec.
        params: head params.
        h: cut features [n, ...].

    Returns:
        phi [n, d].
    """
    return _apply_layers(spec, params, h, last_linear_index(spec))


def flatten_params(params: HeadParams) -> tuple[jax.Array, Callable[[jax.Array], list[dict[str, jax.Array]]]]:
    """Flattens the head params into one vector theta [p] with ``jax.flatten_util.ravel_pytree``.

    Args:
        params: list of dicts of arrays.

    Returns:
        (theta [p], unravel) where unravel(theta) rebuilds the list of dicts.
    """
    theta, unravel = ravel_pytree([{k: jnp.asarray(v) for k, v in p.items()} for p in params])
    return theta, unravel


def n_params(params: HeadParams) -> int:
    """Returns the total number of scalars in the head params."""
    return int(sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(list(params))))
