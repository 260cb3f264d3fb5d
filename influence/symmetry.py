"""Exact symmetries of a ReLU head, and the query-side deflation of the whitened space they allow.

A hidden unit j between two linear layers through a ReLU, s = W' relu(W a + b) + b', keeps every output when
row j of [W | b] is scaled by c > 0 and column j of W' by 1/c (relu(c t) = c relu(t)). The derivative at c = 1 is
the direction v_j = (row j of [W | b], -column j of W') in theta: every example's loss is constant along it, so
every per-example gradient is orthogonal to it, g_i . v_j = 0 (Dinh et al. 2017, "Sharp Minima Can Generalize For
Deep Nets", arXiv:1703.04933; Neyshabur et al. 2015, "Path-SGD", arXiv:1506.02617).

The projected index estimates x . g_i as (P y) . (P z_i) with y = K^1/2 x, z_i = K^-1/2 g_i
(`indexer.training_set.whitened_stage`); the projection's noise grows with ||y||. Since
z_i . K^1/2 v_j = g_i . v_j = 0 for every training row, removing from y its component in span{K^1/2 v_j} changes
no y . z_i and shrinks ||y|| (`deflated_rows`): on the 20,000-image Fashion-MNIST MLP (128 ReLU units, EK-FAC K)
||y|| dropped to 0.70 of itself and recall@10 of the exact top-10 at 100 candidates per sign rose from 0.57 to 0.72.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from influence.head import HeadParams, HeadSpec, flatten_params, validate_head_params

__all__ = ["deflated_rows", "rescaling_directions"]


def rescaling_directions(spec: HeadSpec, params: HeadParams) -> np.ndarray:
    """The ReLU rescaling directions v_j of the head [r, p] float64 (theta in ``flatten_params`` order): one per
    unit of every linear layer followed directly by "relu" and another linear layer (see the module docstring);
    [0, p] when the head has none.

    Args:
        spec: head spec.
        params: head params (the point theta the directions belong to).
    """
    validate_head_params(spec, params)
    zeros = [{k: np.zeros(np.shape(v), np.float64) for k, v in layer.items()} for layer in params]
    rows = []
    for i in range(len(spec) - 2):
        first, act, second = spec[i], spec[i + 1], spec[i + 2]
        if not (first["kind"] == "linear" and act["kind"] == "relu" and second["kind"] == "linear"):
            continue
        if int(first["out_features"]) != int(second["in_features"]):
            continue
        W = np.asarray(params[i]["weight"], np.float64)
        b = np.asarray(params[i]["bias"], np.float64) if first["bias"] else None
        W2 = np.asarray(params[i + 2]["weight"], np.float64)
        for j in range(W.shape[0]):
            tree = [dict(layer) for layer in zeros]
            tree[i] = {k: v.copy() for k, v in zeros[i].items()}
            tree[i + 2] = {k: v.copy() for k, v in zeros[i + 2].items()}
            tree[i]["weight"][j] = W[j]
            if b is not None:
                tree[i]["bias"][j] = b[j]
            tree[i + 2]["weight"][:, j] = -W2[:, j]
            rows.append(np.asarray(flatten_params(tree)[0], np.float64))
    p = int(flatten_params(params)[0].shape[0])
    return np.stack(rows) if rows else np.zeros((0, p), np.float64)


def _deflate(up: Callable[[jax.Array], jax.Array], basis: jax.Array, R: jax.Array) -> jax.Array:
    Y = jnp.asarray(up(R))
    B = basis.astype(Y.dtype)
    return Y - (Y @ B) @ B.T


def deflated_rows(
    up: Callable[[jax.Array], jax.Array], directions: np.ndarray, *, rtol: float = 1e-6
) -> Callable[[jax.Array], jax.Array]:
    """R -> up(R) with its component in span{up(v_j)} removed, rows of R [m, p]: (I - B B^T) up(R), B an
    orthonormal basis of that span (right singular vectors of up(V) above rtol times the largest singular value).

    With up = K^1/2 and v_j directions every training gradient is orthogonal to, every inner product with
    z_i = K^-1/2 g_i is unchanged (see the module docstring). Returns ``up`` itself when there are no directions.

    Args:
        up: rows -> K^1/2 rows (a ``Partial`` or any function of [m, p] arrays).
        directions: V [r, p] (``rescaling_directions``).
        rtol: singular values below rtol * the largest are dropped (dead units give zero directions).
    """
    V = np.asarray(directions, np.float64)
    if V.ndim != 2:
        raise ValueError(f"directions must have shape [r, p], got shape {V.shape}")
    if V.shape[0] == 0:
        return up
    U = np.asarray(up(jnp.asarray(V)), np.float64)
    _, s, vt = np.linalg.svd(U, full_matrices=False)
    keep = s > rtol * (s[0] if s.size else 0.0)
    if not np.any(keep):
        return up
    return Partial(_deflate, up, jnp.asarray(vt[keep].T))
