"""Per-example head gradients with torch.func: the torch reference (and backend for wider scopes).

g_i = d CE(head(h_i; theta), y_i) / d theta, flattened in the order of `influence.flatten_params`
(layers in order, each layer's parameters by sorted name, row-major) so that it equals the JAX path.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def head_param_names(layers: list[nn.Module]) -> list[tuple[int, str]]:
    """(layer index, parameter name) in the flat order of `influence.flatten_params`."""
    return [(i, name) for i, layer in enumerate(layers) for name in sorted(dict(layer.named_parameters(recurse=False)))]


def compute_torch_per_example_grads(
    layers: list[nn.Module], h: np.ndarray, y: np.ndarray, *, batch_size: int = 512
) -> np.ndarray:
    """Per-example gradients [n, p] of the cross-entropy of a torch head, via `vmap(grad)`."""
    head = nn.Sequential(*layers).eval()
    names = [(f"{i}.{name}", i, name) for i, name in head_param_names(layers)]
    params = {key: getattr(layers[i], name).detach() for key, i, name in names}

    def loss(p: dict[str, torch.Tensor], hi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(head, p, (hi.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, yi.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    out = []
    for s in range(0, len(h), batch_size):
        hb = torch.as_tensor(np.asarray(h[s : s + batch_size]))
        yb = torch.as_tensor(np.asarray(y[s : s + batch_size]), dtype=torch.int64)
        grads = per_example(params, hb, yb)
        out.append(torch.cat([grads[key].reshape(len(hb), -1) for key, _, _ in names], dim=1).numpy())
    return np.concatenate(out)
