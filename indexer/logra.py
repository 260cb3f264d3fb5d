"""Per-example gradients of every layer of a scope="model" Task, projected per layer without materialising them.

LoGra (Choe et al. 2024, arXiv:2405.13954): a layer's per-example gradient is sum_l g_l a_l^T (`indexer.layers`);
with seeded Gaussians P_in [in, k_in] and P_out [out, k_out] (entries N(0, 1/k), `influence.make_projection`)
its projection is

    phi = P_out^T (sum_l g_l a_l^T) P_in = sum_l (P_out^T g_l) (P_in^T a_l)^T    [k_out, k_in],

formed from the projected sides, so memory per example and layer is k_in x k_out, never in x out. A side no
larger than k is not projected (identity), and with projection off every side is the identity: phi is then the
full per-example gradient. The affine norms' [2 D] gradient is projected by one Gaussian to k^2 when larger.
phi of all layers, concatenated in layer order (row-major per layer), is the example's vector [d].

Forward hooks keep each layer's input and output (the output is handed on as a copy, so in-place activations
downstream do not touch it; an output computed once for the whole batch, such as BERT's position embeddings, is
expanded to one row per example first, so that each example gets its own output gradient); the output gradients of one backward of sum_i CE(logits_i, t_i) through the model are
the per-example dL_i/dy_i (examples are independent in eval mode), taken by `torch.autograd.grad` with respect to
the kept outputs, once per target vector (the labels, or each class for the Gauss-Newton matrix).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import influence as inf

from .layers import Layer


def unprojected_layers(layers: Sequence[Layer], budget: int) -> set[int]:
    """The layers kept whole in a projected scope: walking from the last layer back, a layer whose full
    per-example gradient (`Layer.n_params` = n_in x n_out entries) still fits in what is left of `budget` is
    kept whole.

    The layers nearest the output go first (a classifier's gradient is exact, whatever the rest). On the
    Fashion-MNIST CNN of `experiments/cnn_layer_dims.py` (`results/cnn_layer_dims.json`) keeping the 385 x 10
    classifier and the first convolution whole (d 800 -> 4,570) moved the exact score's LDS at the sweep's best
    damping from 0.275 to 0.289, as much as 48 per side on every layer (d = 3,760); at the calibrated damping
    0.276 either way.
    """
    keep, used = set(), 0
    for i in reversed(range(len(layers))):
        if used + layers[i].n_params <= budget:
            keep.add(i)
            used += layers[i].n_params
    return keep


def layer_projection_record(
    layers: Sequence[Layer], *, k: int | None, seed: int, whole_budget: int = 0
) -> dict[str, Any]:
    """Per-layer dims and seeds (the manifest's record): k=None = projection off (full gradients); else each side
    larger than k is projected to k, except in the layers `unprojected_layers(layers, whole_budget)` keeps whole."""
    out, dim = [], 0
    whole = set(range(len(layers))) if k is None else unprojected_layers(layers, whole_budget)
    for i, layer in enumerate(layers):
        rec = layer.record()
        if layer.kind == "norm":
            size = layer.n_in * layer.n_out
            rec["k"] = size if i in whole or size <= k * k else k * k
            rec["seed"] = inf.layer_seed(seed, i, 2)
            dim += rec["k"]
        else:
            rec["k_in"] = layer.n_in if i in whole else min(layer.n_in, k)
            rec["k_out"] = layer.n_out if i in whole else min(layer.n_out, k)
            rec["seeds"] = [inf.layer_seed(seed, i, 0), inf.layer_seed(seed, i, 1)]
            dim += rec["k_in"] * rec["k_out"]
        out.append(rec)
    return {"layer_dim": k, "seed": seed, "dim": dim, "whole_budget": whole_budget, "layers": out}


def _matrix(n: int, k: int, seed: int, like: torch.Tensor) -> torch.Tensor | None:
    if k == n:
        return None
    P = inf.make_projection(n, k, seed=seed).matrix(dtype=np.float64)
    return torch.as_tensor(P, dtype=like.dtype, device=like.device)


class ModelScope:
    """The layers of a scope="model" Task and their projected per-example gradients.

    Args:
        model: the torch classifier (eval mode).
        layers: `indexer.layers.resolve_layers(model, scope)`.
        make_forward: model -> the forward of a raw batch (list of inputs) -> logits [b, classes] on the model's
            device (`tensor_forward`, `text_forward`); applied to `model`, and to copies of it (`forward_of`).
    """

    def __init__(
        self, model: nn.Module, layers: list[Layer], make_forward: Callable[[nn.Module], Callable[[list[Any]], Any]]
    ) -> None:
        self.model, self.layers, self.make_forward = model, layers, make_forward
        self.forward = make_forward(model)
        self._projections: dict[tuple, list] = {}

    def forward_of(self, model: nn.Module) -> Callable[[list[Any]], torch.Tensor]:
        """The forward of raw batches through `model` (a copy of this scope's model)."""
        return self.make_forward(model)

    def parameters_of(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters of this scope's layers in `model` (this scope's model or a copy of it), layer order."""
        modules = dict(model.named_modules())
        return [p for layer in self.layers for p in modules[layer.name].parameters(recurse=False)]

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def n_params(self) -> int:
        return sum(layer.n_params for layer in self.layers)

    def check_record(self, record: dict[str, Any]) -> None:
        mine = [(layer.name, layer.n_in, layer.n_out) for layer in self.layers]
        theirs = [(r["name"], r["in"], r["out"]) for r in record["layers"]]
        if mine != theirs:
            raise ValueError(
                f"the task's scope={self.names[:5]}... differs from the run's ({[t[0] for t in theirs][:5]}...): "
                "open the run with the task it was built from"
            )

    def projections(self, record: dict[str, Any]) -> list[tuple[Any, ...]]:
        """The per-layer matrices of a record ((P_in, P_out) or (P_vec,), None = identity), cached."""
        key = (record["seed"], record["layer_dim"], record["dim"], record.get("whole_budget", 0))
        if key not in self._projections:
            like = next(self.model.parameters())
            out = []
            for layer, rec in zip(self.layers, record["layers"], strict=True):
                if layer.kind == "norm":
                    out.append((_matrix(layer.n_in * 2, rec["k"], rec["seed"], like),))
                else:
                    s_in, s_out = rec["seeds"]
                    out.append(
                        (_matrix(layer.n_in, rec["k_in"], s_in, like), _matrix(layer.n_out, rec["k_out"], s_out, like))
                    )
            self._projections = {key: out}
        return self._projections[key]

    def gradients(
        self, xs: list[Any], targets: Sequence[np.ndarray], record: dict[str, Any]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [b, classes] float64 and, per target vector, the projected per-example gradients [b, d]."""
        logits, out, _ = self._run(xs, targets, record, None)
        return logits, out

    def class_gradients(
        self, xs: list[Any], n_classes: int, record: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """What the Gauss-Newton matrix and its K-FAC factors need of a batch, in one forward:

        logits [b, C] float64, phi_ic [b, C, d] (the projected gradient of example i's loss at every class c), and
        the K-FAC sums of every outer-product layer l (``influence.KroneckerSums`` names, "layer{l}.*"):

            "a" = sum_i sum_t a~_it a~_it^T [k_in, k_in],   a~ = P_in^T a  (the projected layer input),
            "positions" = sum_i T_i (A's normaliser: K-FAC-expand over positions and repeated calls),
            "g" = sum_i sum_c p_ic sum_t s~_ict s~_ict^T [k_out, k_out],   s~ = P_out^T dCE(class c)/dy_t,

        p_ic = softmax(logits_i)_c (the GGN's expectation over the model's own classes, taken exactly). Norm
        layers have no factors here (their block is diagonal: ``influence.compute_gradient_diagonal_sums``).
        """
        targets = [np.full(len(xs), c, np.int64) for c in range(n_classes)]
        logits, out, sums = self._run(xs, targets, record, n_classes)
        return logits, np.stack(out, 1), sums

    def _run(
        self, xs: list[Any], targets: Sequence[np.ndarray], record: dict[str, Any], factors: int | None
    ) -> tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]:
        proj = self.projections(record)
        calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

        def hook(i: int) -> Callable:
            def fn(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
                x = args[0].detach()
                if out.shape[0] == 1 and len(xs) > 1:  # shared by the batch (BERT's position embeddings)
                    x = x.expand(len(xs), *x.shape[1:])
                    out = out.expand(len(xs), *out.shape[1:])
                calls.append((i, x, out))
                return out.clone()

            return fn

        handles = [layer.module.register_forward_hook(hook(i)) for i, layer in enumerate(self.layers)]
        flags = [(p, p.requires_grad) for layer in self.layers for p in layer.module.parameters(recurse=False)]
        try:
            for p, _ in flags:
                p.requires_grad_(True)
            with torch.enable_grad():
                logits = self.forward(xs)
                sides = [self._input_side(self.layers[i], x, proj[i]) for i, x, _ in calls]
                sums: dict[str, torch.Tensor] = {}
                probs = torch.softmax(logits.detach().double(), 1) if factors is not None else None
                if factors is not None:
                    self._input_sums(calls, sides, sums)
                out = []
                for c, t in enumerate(targets):
                    y = torch.as_tensor(np.array(t, dtype=np.int64), device=logits.device)
                    loss = F.cross_entropy(logits, y, reduction="sum")
                    grads = torch.autograd.grad(loss, [o for _, _, o in calls], retain_graph=True, allow_unused=True)
                    weights = None if probs is None else (sums, probs[:, c])
                    out.append(self._combine(calls, sides, grads, proj, len(xs), weights))
        finally:
            for h in handles:
                h.remove()
            for p, flag in flags:
                p.requires_grad_(flag)
        return (
            logits.detach().double().cpu().numpy(),
            out,
            {k: v.detach().double().cpu().numpy() for k, v in sums.items()},
        )

    def _input_sums(self, calls: list, sides: list, sums: dict[str, torch.Tensor]) -> None:
        """Adds sum_i sum_t a~ a~^T and the position count of every outer-product layer's calls to `sums`."""
        for (i, _, _), a in zip(calls, sides, strict=True):
            if self.layers[i].kind == "norm":
                continue
            a = a.double()
            _add(sums, f"layer{i}.a", torch.einsum("bti,btj->ij", a, a))
            _add(sums, f"layer{i}.positions", a.new_tensor(float(a.shape[0] * a.shape[1])))

    def _input_side(self, layer: Layer, x: torch.Tensor, proj: tuple) -> Any:
        if layer.kind == "norm":
            return x
        P_in = proj[0]
        if layer.kind == "embedding":
            idx, keep = layer.indices(x)
            if P_in is not None:
                return P_in[idx] * keep[..., None].to(P_in.dtype)
            dtype = layer.module.weight.dtype
            return F.one_hot(idx, layer.n_in).to(dtype) * keep[..., None].to(dtype)
        a = layer.inputs(x)
        return a if P_in is None else a @ P_in

    def _combine(
        self, calls: list, sides: list, grads: Sequence, proj: list, b: int, weights: tuple | None = None
    ) -> np.ndarray:
        """phi [b, d] of one target vector; with `weights` = (sums, w [b]) also adds sum_i w_i sum_t s~ s~^T of
        every outer-product layer to sums["layer{l}.g"]."""
        parts: list[torch.Tensor | None] = [None] * len(self.layers)
        for (i, _, _), a, g in zip(calls, sides, grads, strict=True):
            layer = self.layers[i]
            if g is None:  # the layer's output does not reach the logits
                continue
            if layer.kind == "norm":
                v = layer.norm_grad(a, g)
                v = v if proj[i][0] is None else v @ proj[i][0]
            else:
                go = layer.out_grads(g)
                P_out = proj[i][1]
                go = go if P_out is None else go @ P_out
                if weights is not None:
                    sums, w = weights
                    gd = go.double()
                    _add(sums, f"layer{i}.g", torch.einsum("bto,btq,b->oq", gd, gd, w.to(gd.device)))
                v = torch.einsum("blo,bli->boi", go, a.to(go.dtype)).reshape(b, -1)
            parts[i] = v if parts[i] is None else parts[i] + v
        dims = [self._dim(i, proj) for i in range(len(self.layers))]
        like = next(self.model.parameters())
        full = [p if p is not None else like.new_zeros((b, dims[i])) for i, p in enumerate(parts)]
        return torch.cat(full, 1).detach().double().cpu().numpy()

    def _dim(self, i: int, proj: list) -> int:
        layer = self.layers[i]
        if layer.kind == "norm":
            return layer.n_in * 2 if proj[i][0] is None else proj[i][0].shape[1]
        k_in = layer.n_in if proj[i][0] is None else proj[i][0].shape[1]
        k_out = layer.n_out if proj[i][1] is None else proj[i][1].shape[1]
        return k_in * k_out


def _add(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    sums[name] = value if name not in sums else sums[name] + value


def tensor_forward(model: nn.Module, device: torch.device) -> Callable[[list[Any]], torch.Tensor]:
    """Forward of a batch of array inputs: stacked, moved to the model's device (float inputs in its dtype)."""

    def forward(xs: list[Any]) -> torch.Tensor:
        x = torch.stack([torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v) for v in xs])
        dtype = next(model.parameters()).dtype
        x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        return _logits(model(x))

    return forward


def text_forward(model: nn.Module, tokenizer: Any, max_length: int, device: torch.device) -> Callable:
    """Forward of a batch of texts through a Hugging Face classifier (padded to the longest; masked)."""

    def forward(texts: list[str]) -> torch.Tensor:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        return _logits(model(**{k: v.to(device) for k, v in enc.items()}))

    return forward


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def model_scope_of(task: Any) -> ModelScope:
    """The ModelScope of a scope="model" (or list of names) Task: its layers, and the forward of its raw inputs
    (texts through the tokenizer of a `Task.from_hf` body, else stacked arrays)."""
    from .hf import TextBody
    from .layers import resolve_layers

    layers = resolve_layers(task.model, task.scope)
    body = task.body_module
    if isinstance(body, TextBody):
        make_forward = functools.partial(
            text_forward, tokenizer=body.tokenizer, max_length=body.max_length, device=task.device
        )
    else:
        make_forward = functools.partial(tensor_forward, device=task.device)
    return ModelScope(task.model, layers, make_forward)
