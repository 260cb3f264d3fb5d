"""Cross-entropy head objective with the head parameters as one flat vector theta.

    L(theta) = (1/n) sum_i CE(f(h_i; theta), y_i) + (l2/2) ||theta||^2,   CE(z, y) = logsumexp(z) - z_y
    softmax(z)_c = exp(z_c) / sum_c' exp(z_c')

The l2 term covers weights and biases. Per-example gradients g_i = grad_theta CE(f(h_i; theta), y_i) leave the
l2 term out: removing example i from the training set removes only its own loss term.

Reference: Koh & Liang 2017, "Understanding Black-box Predictions via Influence Functions" (arXiv:1703.04730).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from influence.head import HeadSpec, apply_head

LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
Unravel = Callable[[jax.Array], Any]


def spec_key(spec: HeadSpec) -> str:
    """Returns a canonical JSON string for a head spec (a hashable cache key)."""
    return json.dumps([dict(layer) for layer in spec], sort_keys=True)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example cross-entropy CE(z, y) = logsumexp(z) - z_y, computed stably with log-softmax.

    Args:
        logits: [n, n_classes].
        labels: integer class labels [n].

    Returns:
        losses [n].
    """
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    labels = jnp.asarray(labels).astype(jnp.int32)
    return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def softmax(logits: ArrayLike, *, axis: int = -1) -> np.ndarray:
    """Returns the class probabilities p_c = exp(z_c - max z) / sum_c' exp(z_c' - max z) along axis, float64.

    The numpy softmax of the package (probabilities of cached logits, out-of-sample refits, curvature
    weights); shifting by the row maximum keeps exp from overflowing and does not change the result.

    Args:
        logits: [n, n_classes] (any shape; normalised along axis).
        axis: the class axis.

    Returns:
        probabilities in float64, the shape of logits.
    """
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def make_loss_fn(spec: HeadSpec, unravel: Unravel) -> LossFn:
    """Returns f(theta, h, y) -> [n], the per-example CE losses of the head at flat parameters theta.

    Args:
        spec: head spec.
        unravel: the function returned by ``flatten_params``.
    """

    def loss_fn(theta: jax.Array, h: jax.Array, y: jax.Array) -> jax.Array:
        return cross_entropy(apply_head(spec, unravel(theta), h), y)

    return loss_fn


def compute_objective(
    spec: HeadSpec, unravel: Unravel, theta: jax.Array, h: jax.Array, y: jax.Array, *, l2: float
) -> jax.Array:
    """Returns L(theta) = (1/n) sum_i CE(f(h_i; theta), y_i) + (l2/2) ||theta||^2 (a scalar).

    Args:
        spec: head spec.
        unravel: from ``flatten_params``.
        theta: flat head parameters [p].
        h: cut features [n, ...].
        y: labels [n].
        l2: the L2 coefficient lambda (weights and biases).
    """
    losses = make_loss_fn(spec, unravel)(theta, h, y)
    return jnp.mean(losses) + 0.5 * l2 * jnp.vdot(theta, theta)


@functools.lru_cache(maxsize=32)
def _per_example_grad_fn(key: str, unravel: Unravel) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    loss_fn = make_loss_fn(json.loads(key), unravel)

    def single(theta: jax.Array, h_i: jax.Array, y_i: jax.Array) -> jax.Array:
        return loss_fn(theta, h_i[None], y_i[None])[0]

    return jax.jit(jax.vmap(jax.grad(single), in_axes=(None, 0, 0)))


def _check_rows(h: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    h = np.asarray(h)
    y = np.asarray(y)
    if h.ndim < 2:
        raise ValueError(f"h must have shape [n, ...] with at least 2 dims, got shape {h.shape}")
    if y.shape != (h.shape[0],):
        raise ValueError(f"y must have shape [n]=({h.shape[0]},) matching h, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    return h, y


def compute_per_example_grads(
    spec: HeadSpec,
    unravel: Unravel,
    theta: jax.Array,
    h: jax.Array,
    y: jax.Array,
    *,
    batch_size: int = 1024,
) -> np.ndarray:
    """Returns g_i = grad_theta CE(f(h_i; theta), y_i) for every row, without the l2 term.

    Computed with a jitted ``jax.vmap(jax.grad(...))`` over chunks of batch_size rows; the last chunk is
    padded to the same shape so the function compiles once.

    Args:
        spec: head spec.
        unravel: from ``flatten_params``.
        theta: flat head parameters [p].
        h: cut features [n, ...].
        y: labels [n].
        batch_size: rows per chunk (does not change the result).

    Returns:
        per-example gradients [n, p] as a numpy array in the dtype of h.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    h_np, y_np = _check_rows(h, y)
    theta = jnp.asarray(theta)
    n = h_np.shape[0]
    out_dtype = h_np.dtype if np.issubdtype(h_np.dtype, np.floating) else theta.dtype
    out = np.empty((n, theta.shape[0]), dtype=out_dtype)
    if n == 0:
        return out
    fn = _per_example_grad_fn(spec_key(spec), unravel)
    chunk = min(batch_size, n)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        h_chunk, y_chunk = h_np[start:stop], y_np[start:stop]
        if stop - start < chunk:
            pad = chunk - (stop - start)
            h_chunk = np.concatenate([h_chunk, np.zeros((pad, *h_np.shape[1:]), dtype=h_np.dtype)])
            y_chunk = np.concatenate([y_chunk, np.zeros((pad,), dtype=y_np.dtype)])
        grads = fn(theta, jnp.asarray(h_chunk), jnp.asarray(y_chunk))
        out[start:stop] = np.asarray(grads[: stop - start])
    return out


def compute_margins(logits: ArrayLike, labels: ArrayLike) -> np.ndarray:
    """Returns the margin z_y - max_{c != y} z_c per row (negative when the label is not the argmax).

    Args:
        logits: [n, n_classes] with n_classes >= 2.
        labels: integer labels [n].

    Returns:
        margins [n].
    """
    z = np.asarray(logits)
    c = np.asarray(labels).astype(np.int64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must have shape [n, n_classes>=2], got shape {z.shape}")
    if c.shape != (z.shape[0],):
        raise ValueError(f"labels must have shape ({z.shape[0]},), got shape {c.shape}")
    rows = np.arange(z.shape[0])
    label_logit = z[rows, c]
    others = z.copy()
    others[rows, c] = -np.inf
    return label_logit - others.max(axis=1)
