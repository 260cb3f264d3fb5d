"""Curvature matrix-vector products of the head objective on flat parameter vectors.

    Hessian:  H v = d/dt grad L(theta + t v) |_{t=0}            (forward-over-reverse, Pearlmutter 1994)
    GGN:      G v = (1/n) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i v,   J_i = d f(h_i; theta) / d theta,
              p_i = softmax(f(h_i; theta))                        (PSD; equals H for a single linear layer)

``make_head_matvec`` returns v -> (C + l2 I) v for the mean training CE loss; solvers add any damping.

References: Pearlmutter 1994, "Fast exact multiplication by the Hessian"; Schraudolph 2002, "Fast curvature
matrix-vector products for second-order gradient descent"; Koh & Liang 2017 (arXiv:1703.04730).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from jax.typing import DTypeLike

from influence.head import HeadSpec, apply_head
from influence.objective import Unravel, _check_rows, cross_entropy, spec_key

MatVec = Callable[[jax.Array], jax.Array]


def as_matvec_pytree(matvec: MatVec) -> Partial:
    """Returns the matvec as a pytree that jitted solvers take as an argument.

    A ``Partial`` (e.g. from ``make_head_matvec``) is returned as is: its arrays are leaves, traced as
    arguments. Any other callable is wrapped as ``Partial(matvec)`` (no leaves; arrays it closes over stay
    compile-time constants, as before).
    """
    return matvec if isinstance(matvec, Partial) else Partial(matvec)


CURVATURES = frozenset({"ggn", "hessian"})

AUTO_SINGLE_PASS_ROWS = 16_384
"""``batch_size="auto"``: up to this many training rows the product is one pass over all of them."""
AUTO_BATCH_SIZE = 4096
"""``batch_size="auto"``: rows per chunk above AUTO_SINGLE_PASS_ROWS (bounds the activations held at once)."""


def resolve_batch_size(batch_size: int | Literal["auto"] | None, n: int) -> int | None:
    """Returns the chunk size of a head matvec over n rows: None (one pass) or a positive int.

    "auto" is None when n <= AUTO_SINGLE_PASS_ROWS, else AUTO_BATCH_SIZE; None and ints are returned unchanged.
    """
    if batch_size == "auto":
        return None if n <= AUTO_SINGLE_PASS_ROWS else AUTO_BATCH_SIZE
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0):
        raise ValueError(f"batch_size must be a positive int, None or 'auto', got {batch_size!r}")
    return batch_size


def make_hvp(fn: Callable[[jax.Array], jax.Array], theta: jax.Array) -> MatVec:
    """Returns v -> H v with H the Hessian of a scalar fn at theta, by forward-over-reverse differentiation.

    H v = jax.jvp(jax.grad(fn), (theta,), (v,))[1]  (Pearlmutter 1994). The result is jitted and vmap-able.

    Args:
        fn: scalar function of a flat vector [p].
        theta: the point [p].
    """
    theta = jnp.asarray(theta)

    @jax.jit
    def matvec(v: jax.Array) -> jax.Array:
        return jax.jvp(jax.grad(fn), (theta,), (jnp.asarray(v).astype(theta.dtype),))[1]

    return matvec


def _rows_product(
    spec: HeadSpec,
    unravel: Unravel,
    curvature: str,
    theta: jax.Array,
    h: jax.Array,
    y: jax.Array,
    weights: jax.Array,
    v: jax.Array,
) -> jax.Array:
    """Returns sum_i w_i C_i v over the rows of (h, y), with C_i the curvature of example i's CE loss."""

    def logits_fn(t: jax.Array) -> jax.Array:
        return apply_head(spec, unravel(t), h)

    if curvature == "hessian":

        def weighted_loss(t: jax.Array) -> jax.Array:
            return jnp.sum(weights * cross_entropy(logits_fn(t), y))

        return jax.jvp(jax.grad(weighted_loss), (theta,), (v,))[1]
    logits, jv = jax.jvp(logits_fn, (theta,), (v,))
    probs = jax.nn.softmax(logits, axis=-1)
    # Hessian of CE w.r.t. the logits is diag(p) - p p^T.
    hjv = probs * jv - probs * jnp.sum(probs * jv, axis=-1, keepdims=True)
    _, vjp_fn = jax.vjp(logits_fn, theta)
    return vjp_fn((weights[:, None] * hjv).astype(logits.dtype))[0]


@functools.lru_cache(maxsize=32)
def _full_matvec_fn(key: str, unravel: Unravel, curvature: str) -> Callable[..., jax.Array]:
    spec = json.loads(key)

    @jax.jit
    def fn(theta: jax.Array, h: jax.Array, y: jax.Array, l2: jax.Array, v: jax.Array) -> jax.Array:
        v = v.astype(theta.dtype)
        weights = jnp.ones((h.shape[0],), dtype=theta.dtype)
        total = _rows_product(spec, unravel, curvature, theta, h, y, weights, v)
        return total / h.shape[0] + l2 * v

    return fn


@functools.lru_cache(maxsize=32)
def _chunked_matvec_fn(key: str, unravel: Unravel, curvature: str) -> Callable[..., jax.Array]:
    spec = json.loads(key)

    @jax.jit
    def fn(
        theta: jax.Array,
        h: jax.Array,
        y: jax.Array,
        mask: jax.Array,
        n: jax.Array,
        l2: jax.Array,
        v: jax.Array,
    ) -> jax.Array:
        v = v.astype(theta.dtype)

        def step(acc: jax.Array, chunk: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, None]:
            h_c, y_c, m_c = chunk
            return acc + _rows_product(spec, unravel, curvature, theta, h_c, y_c, m_c, v), None

        total, _ = jax.lax.scan(step, jnp.zeros_like(v), (h, y, mask))
        return total / n + l2 * v

    return fn


def make_head_matvec(
    spec: HeadSpec,
    unravel: Unravel,
    theta: jax.Array,
    h: jax.Array,
    y: jax.Array,
    *,
    l2: float,
    curvature: str = "ggn",
    batch_size: int | Literal["auto"] | None = "auto",
) -> MatVec:
    """Returns v -> (C + l2 I) v, C the curvature of the mean CE loss over all rows of (h, y).

    C = H (curvature="hessian", exact, forward-over-reverse) or
    C = (1/n) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i
    (curvature="ggn", the generalised Gauss-Newton matrix: PSD, equal to H for a single linear layer).
    When batch_size is None or >= n the product is one jitted pass over all rows; otherwise a jitted
    ``lax.scan`` over fixed-size chunks (the padded rows masked out), summed and divided by n; "auto" (default)
    is one pass up to AUTO_SINGLE_PASS_ROWS rows and chunks of AUTO_BATCH_SIZE above. The compiled
    function is cached per (spec, unravel, curvature), so building a matvec is cheap. Damping is not included.

    Reference: Schraudolph 2002 (GGN products); Koh & Liang 2017 (arXiv:1703.04730).

    Args:
        spec: head spec.
        unravel: from ``flatten_params``.
        theta: flat head parameters [p].
        h: training cut features [n, ...].
        y: training labels [n].
        l2: L2 coefficient lambda of the objective (added as l2 * v).
        curvature: "ggn" or "hessian".
        batch_size: rows per chunk, None for a single pass, or "auto" (see ``resolve_batch_size``).

    Returns:
        a jitted, vmap-able matvec on vectors [p], as a ``jax.tree_util.Partial`` whose leaves are the training
        rows and parameters: solvers pass it into their jitted loops as an argument (``as_matvec_pytree``), so
        the rows are never baked into a compiled function as constants (XLA would constant-fold h @ W at
        compile time, minutes for a 10k x 784 MLP input).
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {sorted(CURVATURES)}, got {curvature!r}")
    if isinstance(l2, bool) or not isinstance(l2, int | float) or not np.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2 must be a finite float >= 0, got {l2!r}")
    h_np, y_np = _check_rows(h, y)
    n = h_np.shape[0]
    if n == 0:
        raise ValueError("h must have at least one row, got shape (0, ...)")
    chunk = resolve_batch_size(batch_size, n)
    theta = jnp.asarray(theta)
    l2_arr = jnp.asarray(l2, dtype=theta.dtype)
    key = spec_key(spec)
    if chunk is None or chunk >= n:
        fn = _full_matvec_fn(key, unravel, curvature)
        h_dev, y_dev = jnp.asarray(h_np), jnp.asarray(y_np)
        return Partial(fn, theta, h_dev, y_dev, l2_arr)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h_pad = np.concatenate([h_np, np.zeros((pad, *h_np.shape[1:]), dtype=h_np.dtype)])
    y_pad = np.concatenate([y_np, np.zeros((pad,), dtype=y_np.dtype)])
    mask = np.concatenate([np.ones(n), np.zeros(pad)]).astype(theta.dtype)
    h_dev = jnp.asarray(h_pad.reshape(n_chunks, chunk, *h_np.shape[1:]))
    y_dev = jnp.asarray(y_pad.reshape(n_chunks, chunk))
    m_dev = jnp.asarray(mask.reshape(n_chunks, chunk))
    n_dev = jnp.asarray(n, dtype=theta.dtype)
    fn_chunked = _chunked_matvec_fn(key, unravel, curvature)
    return Partial(fn_chunked, theta, h_dev, y_dev, m_dev, n_dev, l2_arr)


def dense_curvature_rows(
    matvec: MatVec, p: int, start: int, stop: int, *, dtype: DTypeLike, block_size: int = 256
) -> np.ndarray:
    """Rows ``start:stop`` of the matrix of a symmetric matvec (columns C e_j, j in start:stop, as rows), not
    symmetrised: one vmapped call on a block of the identity padded to ``block_size`` rows, so that every block
    of a build reuses one compilation (`compute_dense_curvature` in resumable pieces)."""
    if not 0 <= start < stop <= p or stop - start > block_size:
        raise ValueError(f"rows: need 0 <= start < stop <= p={p} and at most {block_size} rows, got {start}:{stop}")
    # No outer jit: vmap of a jitted matvec reuses its compilation cache across matvecs and calls.
    basis = np.zeros((min(block_size, p), p), dtype=dtype)
    basis[np.arange(stop - start), np.arange(start, stop)] = 1.0
    return np.asarray(jax.vmap(matvec)(jnp.asarray(basis)))[: stop - start]


def compute_dense_curvature(matvec: MatVec, p: int, *, dtype: DTypeLike, block_size: int = 256) -> np.ndarray:
    """Materialises the matrix of a symmetric matvec, C = [C e_1, ..., C e_p], symmetrised as (C + C^T)/2.

    Columns are computed by vmapping the matvec over blocks of the identity (the last block padded so the
    vmapped matvec compiles once). Only for small p: the result is [p, p].

    Args:
        matvec: v -> C v on vectors [p].
        p: dimension.
        dtype: dtype of the basis vectors and the result.
        block_size: identity rows per vmapped call.

    Returns:
        C [p, p] as a numpy array.
    """
    if isinstance(p, bool) or not isinstance(p, int) or p <= 0:
        raise ValueError(f"p must be a positive int, got {p!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    block = min(block_size, p)
    out = np.empty((p, p), dtype=dtype)
    for start in range(0, p, block):
        stop = min(start + block, p)
        out[start:stop] = dense_curvature_rows(matvec, p, start, stop, dtype=dtype, block_size=block)
    return 0.5 * (out + out.T)
