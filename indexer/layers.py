"""The layers scope="model" takes influence over, and each layer's per-example gradient as a sum of outer products.

A supported layer's weight gradient for one example is a sum over positions l (tokens, spatial positions) of
outer products of an output gradient and an input (LoGra, Choe et al. 2024, arXiv:2405.13954):

    dL/dW = sum_l g_l a_l^T   [out, in]   (the bias as one more input column, a_l = [x_l, 1])

| layer | a_l (in) | g_l (out) | W in [out, in] orientation |
|---|---|---|---|
| nn.Linear | x [.., in] (+1) | dL/dy [.., out] | weight |
| nn.Conv1d / nn.Conv2d | unfolded input patch [C_in k] (+1) | dL/dy at the position [C_out] | weight.reshape(out, -1) |
| nn.Embedding | one-hot of the index (0 at padding_idx) [num] | dL/dy [dim] | weight.T |
| HF Conv1D | x [.., in] (+1) | dL/dy [.., out] | weight.T |

The affine parameters of nn.LayerNorm / nn.BatchNorm* (eval mode) are elementwise, not outer products:
dL/dw = sum_l g_l * xhat_l, dL/db = sum_l g_l, a vector [2 D] (`Layer.kind == "norm"`).

`resolve_layers(model, scope)` lists the layers of a scope ("model" = every module with parameters; a list of
module names = those modules, a container meaning every layer inside it); anything with parameters that is not
in the table is refused by name and type, never skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TaskError, UnsupportedLayerError

NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
SUPPORTED = "nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, transformers Conv1D, nn.LayerNorm, nn.BatchNorm*"


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


@dataclass(frozen=True)
class Layer:
    """One layer of the scope.

    Attributes:
        name: its name in `model.named_modules()`.
        module: the module.
        kind: "linear" (Linear, HF Conv1D), "conv", "embedding" or "norm".
        n_in: input side dimension (with the bias column); for "norm", the number of affine channels D.
        n_out: output side dimension; for "norm", 2 (weight and bias).
    """

    name: str
    module: nn.Module
    kind: str
    n_in: int
    n_out: int

    @property
    def n_params(self) -> int:
        return self.n_in * self.n_out

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": type(self.module).__name__,
            "kind": self.kind,
            "in": self.n_in,
            "out": self.n_out,
        }

    def weight_matrix_grad(self) -> torch.Tensor:
        """The layer's current .grad in its [out, in] (with bias column) orientation, flattened as the scope
        stores it (for tests: reference gradients from autograd)."""
        m = self.module
        b = None if getattr(m, "bias", None) is None else m.bias.grad
        if self.kind == "norm":
            return torch.cat([m.weight.grad.reshape(-1), m.bias.grad.reshape(-1)])
        w = m.weight.grad
        w = w.T if self.kind == "embedding" or _is_hf_conv1d(m) else w.reshape(w.shape[0], -1)
        return (w if b is None else torch.cat([w, b[:, None]], 1)).reshape(-1)

    # ------------------------------------------------------------------------- per-position factors
    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input of a batch -> a [b, positions, n_in] (one-hot for embeddings: use `indices`)."""
        m = self.module
        if self.kind == "conv":
            if isinstance(m, nn.Conv1d):
                x = x.unsqueeze(2)
                pads, kernel = _pads(m, x.shape[-1:]), (1, *m.kernel_size)
                x = F.pad(x, pads)
                a = F.unfold(x, kernel, dilation=(1, *m.dilation), stride=(1, *m.stride))
            else:
                x = F.pad(x, _pads(m, x.shape[-2:]))
                a = F.unfold(x, m.kernel_size, dilation=m.dilation, stride=m.stride)
            a = a.transpose(1, 2)
        else:
            a = x.reshape(x.shape[0], -1, x.shape[-1])
        if getattr(m, "bias", None) is not None:
            a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], 2)
        return a

    def out_grads(self, g: torch.Tensor) -> torch.Tensor:
        """dL/dy of a batch -> [b, positions, n_out]."""
        if self.kind == "conv":
            return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
        return g.reshape(g.shape[0], -1, g.shape[-1])

    def indices(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An embedding's indices [b, positions] and their weights (0 at padding_idx, else 1)."""
        idx = x.reshape(x.shape[0], -1)
        pad = self.module.padding_idx
        keep = torch.ones_like(idx, dtype=torch.bool) if pad is None else idx != pad
        return idx, keep

    def norm_grad(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """[b, 2 D]: (sum_l g_l xhat_l, sum_l g_l) of a LayerNorm / eval BatchNorm."""
        m = self.module
        if isinstance(m, nn.LayerNorm):
            xhat = F.layer_norm(x, m.normalized_shape, eps=m.eps)
            dims = tuple(range(1, x.dim() - len(m.normalized_shape)))
        else:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            xhat = (x - m.running_mean.reshape(shape)) / torch.sqrt(m.running_var.reshape(shape) + m.eps)
            dims = tuple(range(2, x.dim()))
        dw = (g * xhat).sum(dims) if dims else g * xhat
        db = g.sum(dims) if dims else g
        return torch.cat([dw.reshape(len(x), -1), db.reshape(len(x), -1)], 1)


def _pads(m: nn.Module, spatial: Sequence[int]) -> tuple[int, ...]:
    """F.pad amounts (last dim first) of a conv's padding (ints or "same"/"valid")."""
    k = m.kernel_size
    if m.padding == "valid":
        per = [(0, 0)] * len(k)
    elif m.padding == "same":
        per = [((d * (kk - 1)) // 2, d * (kk - 1) - (d * (kk - 1)) // 2) for kk, d in zip(k, m.dilation, strict=True)]
    else:
        per = [(p, p) for p in m.padding]
    out: list[int] = []
    for left, right in reversed(per):
        out += [left, right]
    return tuple(out)


def describe(name: str, module: nn.Module) -> Layer | str:
    """The Layer of a supported module, or why it is not (a message naming it)."""
    what = f"module {name!r} ({type(module).__name__})"
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear) or _is_hf_conv1d(module):
        n_in, n_out = (
            (module.in_features, module.out_features) if isinstance(module, nn.Linear) else module.weight.shape
        )
        return Layer(name, module, "linear", int(n_in) + has_bias, int(n_out))
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            return f"{what}: groups={module.groups}, padding_mode={module.padding_mode!r} (supported: 1, 'zeros')"
        n_in = module.in_channels * int(torch.tensor(module.kernel_size).prod()) + has_bias
        return Layer(name, module, "conv", n_in, module.out_channels)
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            return f"{what}: max_norm={module.max_norm} renormalises the table in the forward pass"
        return Layer(name, module, "embedding", module.num_embeddings, module.embedding_dim)
    if isinstance(module, NORMS):
        if module.weight is None or module.bias is None:
            return f"{what}: only affine norms with both weight and bias are supported"
        if not isinstance(module, nn.LayerNorm) and (module.training or module.running_mean is None):
            return f"{what}: a BatchNorm is supported in eval mode with running statistics only"
        return Layer(name, module, "norm", module.weight.numel(), 2)
    return f"{what} is not a supported layer ({SUPPORTED})"


def resolve_layers(model: nn.Module, scope: str | Sequence[str]) -> list[Layer]:
    """The layers of scope "model" (every module with parameters) or a list of module names, in module order.

    Raises:
        TaskError: scope is neither "model" nor a non-empty list of names, or names an unknown module.
        UnsupportedLayerError: a module with parameters in the scope is not supported (names it and its type).
    """
    named = dict(model.named_modules())
    if scope == "model":
        roots = [""]
    else:
        if isinstance(scope, str) or not isinstance(scope, Sequence) or not scope:
            raise TaskError(f"scope must be 'head', 'last-block', 'model' or a list of module names, got {scope!r}")
        unknown = [s for s in scope if not isinstance(s, str) or s not in named]
        if unknown:
            raise TaskError(f"scope names unknown module(s) {unknown}; modules: {[n for n in named if n][:20]} ...")
        roots = list(scope)
    out: dict[str, Layer] = {}
    for name, module in named.items():
        if not any(r == "" or name == r or name.startswith(r + ".") for r in roots):
            continue
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        layer = describe(name, module)
        if isinstance(layer, str):
            raise UnsupportedLayerError(f"scope={scope!r}: {layer}")
        out[name] = layer
    if not out:
        raise TaskError(f"scope={scope!r} holds no parameters")
    return list(out.values())
