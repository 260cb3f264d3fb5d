"""Translation of a torch head into the plain-data head of `influence.head`.

A head is a spec (JSON list of layer dicts) plus params (one dict of numpy arrays per layer). The indexer
translates the trailing layers of a model into that form so that `influence/` can differentiate it with JAX
without importing torch, and checks that the JAX head reproduces the torch logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import HeadMismatchError, UnsupportedLayerError

SUPPORTED = "Linear, ReLU, GELU, Tanh, Sigmoid, LayerNorm, Dropout (eval), Identity, Flatten, Sequential"
"""The torch layers a head may hold (what `translate_layer` translates)."""

_ACTIVATIONS: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
}


@dataclass(frozen=True)
class TranslatedHead:
    """A torch head as data: `spec` (layer dicts) and `params` (per-layer dicts of float arrays)."""

    spec: list[dict[str, Any]]
    params: list[dict[str, np.ndarray]]

    @property
    def n_classes(self) -> int:
        last = [layer for layer in self.spec if layer["kind"] == "linear"][-1]
        return int(last["out_features"])

    @property
    def n_params(self) -> int:
        return int(sum(a.size for layer in self.params for a in layer.values()))


def flatten_modules(module: nn.Module) -> list[nn.Module]:
    """Leaf layers of nested `nn.Sequential` containers, in order."""
    if isinstance(module, nn.Sequential):
        out: list[nn.Module] = []
        for child in module:
            out.extend(flatten_modules(child))
        return out
    return [module]


def translate_layer(layer: nn.Module, index: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One torch layer -> (layer dict, params). Raises UnsupportedLayerError naming the layer."""

    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy().copy()

    if isinstance(layer, nn.Linear):
        spec = {
            "kind": "linear",
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "bias": layer.bias is not None,
        }
        params = {"weight": arr(layer.weight)}
        if layer.bias is not None:
            params["bias"] = arr(layer.bias)
        return spec, params
    for cls, kind in _ACTIVATIONS.items():
        if type(layer) is cls:
            return {"kind": kind}, {}
    if isinstance(layer, nn.GELU):
        return {"kind": "gelu", "approximate": layer.approximate}, {}
    if isinstance(layer, nn.LayerNorm):
        spec = {
            "kind": "layernorm",
            "normalized_shape": list(layer.normalized_shape),
            "eps": float(layer.eps),
            "elementwise_affine": bool(layer.elementwise_affine),
        }
        params = {}
        if layer.elementwise_affine:
            params = {"weight": arr(layer.weight)}
            if layer.bias is not None:
                params["bias"] = arr(layer.bias)
        return spec, params
    if isinstance(layer, nn.Dropout | nn.Identity):
        return {"kind": "identity"}, {}
    if isinstance(layer, nn.Flatten):
        if layer.start_dim != 1 or layer.end_dim != -1:
            raise UnsupportedLayerError(
                f"head layer {index} ({layer!r}): only Flatten(start_dim=1, end_dim=-1) is supported"
            )
        return {"kind": "flatten"}, {}
    raise UnsupportedLayerError(
        f"head layer {index} ({type(layer).__name__}) has no JAX translation; supported: {SUPPORTED}. Pass "
        "head_layers= or body=/head= to move it into the body."
    )


def is_translatable(layer: nn.Module) -> bool:
    try:
        translate_layer(layer, 0)
    except UnsupportedLayerError:
        return False
    return True


def layer_names(layers: list[nn.Module]) -> str:
    """`Linear, ReLU, Sine`: the class names of some layers, for error messages."""
    return ", ".join(type(layer).__name__ for layer in layers) or "no layers"


def translate_head(layers: list[nn.Module]) -> TranslatedHead:
    """Translates a list of torch layers; the last layer with parameters must be a Linear (the classifier)."""
    if not layers:
        raise UnsupportedLayerError("head is empty: it needs at least one Linear layer")
    spec, params = [], []
    for i, layer in enumerate(layers):
        s, p = translate_layer(layer, i)
        spec.append(s)
        params.append(p)
    linear = [i for i, s in enumerate(spec) if s["kind"] == "linear"]
    if not linear:
        raise UnsupportedLayerError(
            f"head ({layer_names(layers)}) has no Linear layer: the classifier must be part of the head"
        )
    after = [i for i in range(linear[-1] + 1, len(spec)) if params[i]]
    if after:
        raise UnsupportedLayerError(
            f"head layer {after[0]} ({type(layers[after[0]]).__name__}) has parameters after the last Linear "
            f"(layer {linear[-1]}); the classifier must be the head's last layer with parameters"
        )
    return TranslatedHead(spec=spec, params=params)


def split_sequential(model: nn.Module, head_layers: int | None = None) -> tuple[nn.Module, list[nn.Module]]:
    """Splits an `nn.Sequential` into a frozen body and head layers.

    By default the head is the longest run of trailing layers that translate to JAX (for an MLP: the whole
    network, and the body is the identity).
    """
    if not isinstance(model, nn.Sequential):
        raise UnsupportedLayerError(
            f"model is a {type(model).__name__}, not nn.Sequential: pass Task(body=..., head=...) explicitly"
        )
    layers = flatten_modules(model)
    if head_layers is None:
        start = len(layers)
        while start > 0 and is_translatable(layers[start - 1]):
            start -= 1
        # The head starts at a layer the body would otherwise end with only if that helps: keep a leading
        # parameter-free layer in the head (e.g. Flatten) since it costs nothing.
        if not any(isinstance(layer, nn.Linear) for layer in layers[start:]):
            stop = layers[start - 1] if start > 0 else None
            raise UnsupportedLayerError(
                f"model Sequential({layer_names(layers)}): no head found, "
                + (
                    f"layer {start - 1} ({type(stop).__name__}) has no JAX translation and no Linear layer follows "
                    f"it; the head is the trailing layers that translate ({SUPPORTED}) and must end with the "
                    "classifier (a Linear). Pass body=/head= for another split."
                    if stop is not None
                    else "it has no Linear layer (the classifier must be part of the head)"
                )
            )
    else:
        if not 1 <= head_layers <= len(layers):
            raise ValueError(f"head_layers must be in [1, {len(layers)}], got {head_layers}")
        start = len(layers) - head_layers
    body_layers, head = layers[:start], layers[start:]
    body: nn.Module = nn.Sequential(*body_layers) if body_layers else nn.Identity()
    return body, head


def check_head_logits(torch_logits: np.ndarray, jax_logits: np.ndarray, *, tolerance: float) -> float:
    """Max abs difference between the torch and JAX head logits; refuses above `tolerance`."""
    diff = float(np.max(np.abs(np.asarray(torch_logits, np.float64) - np.asarray(jax_logits, np.float64))))
    scale = max(1.0, float(np.max(np.abs(torch_logits))))
    if not np.isfinite(diff) or diff > tolerance * scale:
        raise HeadMismatchError(
            f"the JAX translation of the head does not reproduce the torch logits: max abs diff {diff:.3g} > "
            f"tolerance {tolerance:g} x {scale:.3g}"
        )
    return diff
