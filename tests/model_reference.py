"""Float64 references for scope="model", built with torch.func independently of `indexer.logra`.

Per example the Jacobian J_i [classes, p] of the logits with respect to every parameter of the scope's layers
(`torch.func.jacrev`, one example at a time, no batching or padding); from it the per-example gradient
g_i = J_i^T (p_i - e_y), the Gauss-Newton matrix G = (1/n) sum_i J_i^T (diag p_i - p_i p_i^T) J_i, and the
projection S [p, d] of the LoGra layout (per layer kron(P_out, P_in) on the row-major [out, in] weight with the bias
as its last column; a norm's [weight, bias] vector by one Gaussian), drawn from `influence.make_projection` with
the seeds of `influence.layer_seed`.
"""

import numpy as np
import scipy.linalg
import torch
from torch import nn
from torch.func import functional_call, jacrev

import influence as inf


def layer_matrix(module: nn.Module, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """A layer's parameter tensors (leading dims kept) -> [..., out * in] in the LoGra orientation."""
    w, b = grads["weight"], grads.get("bias")
    lead = w.shape[: w.dim() - module.weight.dim()]
    if isinstance(module, nn.LayerNorm | nn.BatchNorm1d | nn.BatchNorm2d):
        return torch.cat([w.reshape(*lead, -1), b.reshape(*lead, -1)], -1)
    if isinstance(module, nn.Embedding) or type(module).__name__ == "Conv1D":
        w = w.transpose(-1, -2)
    else:
        w = w.reshape(*lead, module.weight.shape[0], -1)
    if b is not None:
        w = torch.cat([w, b[..., None]], -1)
    return w.reshape(*lead, -1)


def jacobians(model: nn.Module, names: list[str], inputs: list) -> tuple[np.ndarray, np.ndarray]:
    """Logits [n, classes] and Jacobians [n, classes, p] of each input alone (a tensor, or a dict of kwargs)."""
    modules = dict(model.named_modules())
    params = {f"{n}.{k}": v.detach() for n in names for k, v in modules[n].named_parameters(recurse=False)}
    logits, jacs = [], []
    for x in inputs:

        def f(p, x=x):
            out = functional_call(model, p, (), x) if isinstance(x, dict) else functional_call(model, p, (x[None],))
            return (out.logits if hasattr(out, "logits") else out)[0]

        J = jacrev(f)(params)
        with torch.no_grad():
            logits.append(f(params).numpy())
        per_layer = []
        for n in names:
            own = {k.rsplit(".", 1)[1]: v for k, v in J.items() if k.rsplit(".", 1)[0] == n}
            per_layer.append(layer_matrix(modules[n], own))
        jacs.append(torch.cat(per_layer, -1).numpy())
    return np.array(logits), np.array(jacs)


def gradients_and_ggn(logits: np.ndarray, J: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """g_i = J_i^T (p_i - e_t) [n, p] and G = (1/n) sum_i J_i^T (diag p_i - p_i p_i^T) J_i [p, p]."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    r = p - np.eye(p.shape[1])[targets]
    g = np.einsum("ncp,nc->np", J, r)
    H = np.einsum("nc,cd->ncd", p, np.eye(p.shape[1])) - np.einsum("nc,nd->ncd", p, p)
    G = np.einsum("ncp,ncd,ndq->pq", J, H, J) / len(J)
    return g, G


def projection(model: nn.Module, names: list[str], k: int | None, seed: int, whole_budget: int = 0) -> np.ndarray:
    """S [p, d]: block-diagonal per layer, kron(P_out, P_in) (or a norm's Gaussian), identity sides <= k; the
    layers that fit in `whole_budget` parameters together, taken from the last one back, are identity blocks."""
    modules = dict(model.named_modules())
    whole, left = set(), whole_budget
    for i in reversed(range(len(names))):
        size = sum(p.numel() for p in modules[names[i]].parameters(recurse=False))
        if size <= left:
            whole.add(i)
            left -= size
    blocks = []
    for i, n in enumerate(names):
        m = modules[n]
        if i in whole:
            blocks.append(np.eye(sum(p.numel() for p in m.parameters(recurse=False))))
            continue
        if isinstance(m, nn.LayerNorm | nn.BatchNorm1d | nn.BatchNorm2d):
            size = 2 * m.weight.numel()
            kk = size if k is None or size <= k * k else k * k
            blocks.append(
                np.eye(size) if kk == size else inf.make_projection(size, kk, seed=inf.layer_seed(seed, i, 2)).matrix()
            )
            continue
        out_in = layer_matrix(m, {key: v.detach() for key, v in m.named_parameters(recurse=False)})
        n_out = m.weight.shape[1] if isinstance(m, nn.Embedding) or type(m).__name__ == "Conv1D" else m.weight.shape[0]
        n_in = out_in.numel() // n_out
        sides = []
        for size, side in ((n_out, 1), (n_in, 0)):
            kk = size if k is None else min(size, k)
            sides.append(
                np.eye(size)
                if kk == size
                else inf.make_projection(size, kk, seed=inf.layer_seed(seed, i, side)).matrix()
            )
        blocks.append(np.kron(sides[0], sides[1]))
    return scipy.linalg.block_diag(*blocks)


def influence_scores(gq: np.ndarray, g: np.ndarray, G: np.ndarray, l2: float) -> np.ndarray:
    """g_q^T (G + l2 I)^-1 g_i [m, n] (float64 dense solve)."""
    return np.linalg.solve(G + l2 * np.eye(len(G)), gq.T).T @ g.T
