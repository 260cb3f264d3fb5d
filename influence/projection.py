"""Seeded Gaussian Johnson-Lindenstrauss projection of gradients.

    P [p, d] with P_rc ~ N(0, 1/d),   x -> x P,   E[<x P, y P>] = <x, y>,
    Var[<x P, y P>] = (<x, y>^2 + ||x||^2 ||y||^2) / d

Row r of P is drawn from ``jax.random.fold_in(PRNGKey(seed), r)``, so P is a pure function of (seed, r): it
is generated block by block (the full [p, d] matrix never needs to be in memory), the same seed always gives
the same projection, and the block size is only a memory/speed knob that never changes the result.

Drawing P costs far more than applying it (p x d normal draws: ~4 s for p = 101,770, d = 1,024 on this
machine's CPU, whether G has 1 row or 1,000), so the blocks of the projections a process uses are kept in
memory up to `CACHE_BYTES` in all (least recently used dropped first); the products are the same, block by
block, as with blocks drawn afresh.

Reference: Johnson & Lindenstrauss 1984; Park et al. 2023, "TRAK: Attributing Model Behavior at Scale"
(arXiv:2303.14186), which projects per-example gradients the same way.
"""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from influence.checks import is_int

DEFAULT_BLOCK_SIZE = 4096


CACHE_BYTES = 1 << 30
"""Memory kept for drawn projection blocks (all projections of this process together)."""
_cache: collections.OrderedDict[tuple[Any, ...], list[jax.Array]] = collections.OrderedDict()
_cache_lock = threading.Lock()


def _projection_rows(key: jax.Array, start: jax.Array, block: int, d: int, dtype: jnp.dtype) -> jax.Array:
    """Rows start .. start + block - 1 of P; row r is N(0, I_d / d) drawn from fold_in(key, r)."""
    indices = start + jnp.arange(block, dtype=jnp.uint32)
    keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(indices)
    return jax.vmap(lambda k: jax.random.normal(k, (d,), dtype=dtype))(keys) / jnp.sqrt(jnp.asarray(d, dtype))


@functools.lru_cache(maxsize=32)
def _block_fn(block: int, d: int, dtype_name: str) -> Callable[..., jax.Array]:
    dtype = jnp.dtype(dtype_name)

    @jax.jit
    def fn(acc: jax.Array, G_block: jax.Array, key: jax.Array, start: jax.Array) -> jax.Array:
        return acc + G_block @ _projection_rows(key, start, block, d, dtype)

    return fn


@functools.lru_cache(maxsize=32)
def _product_fn(block: int, d: int, dtype_name: str) -> Callable[..., jax.Array]:
    @jax.jit
    def fn(acc: jax.Array, G_block: jax.Array, P_block: jax.Array) -> jax.Array:
        return acc + G_block @ P_block

    return fn


def _cached_blocks(p: int, d: int, seed: int, block: int, dtype: np.dtype) -> list[jax.Array] | None:
    """The blocks of P (each [block, d], the last one with rows past p), drawn once and kept while they fit
    in `CACHE_BYTES`; None when this projection alone does not fit."""
    size = -(-p // block) * block * d * dtype.itemsize
    if size > CACHE_BYTES:
        return None
    key = (p, d, seed, block, dtype.name)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    fn = _rows_fn(block, d, dtype.name)
    prng = jax.random.PRNGKey(seed)
    blocks = [fn(prng, jnp.asarray(start, dtype=jnp.uint32)) for start in range(0, p, block)]
    with _cache_lock:
        _cache[key] = blocks
        while sum(len(b) * d * dtype.itemsize for bs in _cache.values() for b in bs) > CACHE_BYTES:
            _cache.popitem(last=False)
    return blocks


@functools.lru_cache(maxsize=32)
def _rows_fn(block: int, d: int, dtype_name: str) -> Callable[..., jax.Array]:
    dtype = jnp.dtype(dtype_name)
    return jax.jit(lambda key, start: _projection_rows(key, start, block, d, dtype))


@dataclass(frozen=True, kw_only=True)
class GaussianProjection:
    """A seeded Gaussian JL projection from p to d dimensions, entries N(0, 1/d).

    Attributes:
        p: input dimension.
        d: output dimension.
        seed: PRNG seed; the projection is a pure function of (p, d, seed).
    """

    p: int
    d: int
    seed: int

    def __post_init__(self) -> None:
        if not is_int(self.p) or self.p <= 0:
            raise ValueError(f"p must be a positive int, got {self.p!r}")
        if not is_int(self.d) or self.d <= 0:
            raise ValueError(f"d must be a positive int, got {self.d!r}")
        if not is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")

    def project(self, G: np.ndarray, *, block_size: int = DEFAULT_BLOCK_SIZE) -> np.ndarray:
        """Returns G P, shape [m, d], in G's float dtype, generating P block_size rows at a time.

        Args:
            G: [m, p] (or [p]).
            block_size: rows of P per step (does not change the result).
        """
        if not is_int(block_size) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        G = np.asarray(G)
        single = G.ndim == 1
        G2 = G[None] if single else G
        if G2.ndim != 2 or G2.shape[1] != self.p:
            raise ValueError(f"G must have shape [m, {self.p}], got shape {G.shape}")
        dtype = G2.dtype if np.issubdtype(G2.dtype, np.floating) else np.dtype(np.float64)
        G2 = G2.astype(dtype, copy=False)
        block = min(block_size, self.p)
        cached = _cached_blocks(self.p, self.d, self.seed, block, dtype)
        fn = _block_fn(block, self.d, dtype.name)
        product = _product_fn(block, self.d, dtype.name)
        key = jax.random.PRNGKey(self.seed)
        acc = jnp.zeros((G2.shape[0], self.d), dtype=dtype)
        for i, start in enumerate(range(0, self.p, block)):
            stop = min(start + block, self.p)
            G_block = G2[:, start:stop]
            if stop - start < block:
                G_block = np.concatenate([G_block, np.zeros((G2.shape[0], block - (stop - start)), dtype=dtype)], 1)
            if cached is None:
                acc = fn(acc, jnp.asarray(G_block), key, jnp.asarray(start, dtype=jnp.uint32))
            else:
                acc = product(acc, jnp.asarray(G_block), cached[i])
        out = np.asarray(acc)
        return out[0] if single else out

    def matrix(self, *, dtype: DTypeLike = np.float64, block_size: int = DEFAULT_BLOCK_SIZE) -> np.ndarray:
        """Returns the dense P [p, d] (for tests and small p only)."""
        if not is_int(block_size) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        dtype = np.dtype(dtype)
        block = min(block_size, self.p)
        fn = _rows_fn(block, self.d, dtype.name)
        key = jax.random.PRNGKey(self.seed)
        parts = [np.asarray(fn(key, jnp.asarray(start, dtype=jnp.uint32))) for start in range(0, self.p, block)]
        return np.concatenate(parts)[: self.p]


def make_projection(p: int, d: int, *, seed: int) -> GaussianProjection:
    """Returns the seeded Gaussian projection from p to d dimensions (entries N(0, 1/d)).

    Reference: Johnson & Lindenstrauss 1984; Park et al. 2023 (arXiv:2303.14186).
    """
    return GaussianProjection(p=p, d=d, seed=seed)


def project(G: np.ndarray, *, d: int, seed: int, block_size: int = DEFAULT_BLOCK_SIZE) -> np.ndarray:
    """Returns G P for the seeded Gaussian projection P [p, d] (p = G.shape[-1]), entries N(0, 1/d).

    <G_a P, G_b P> ~= <G_a, G_b>, unbiased with variance (<a, b>^2 + ||a||^2 ||b||^2) / d.

    Reference: Johnson & Lindenstrauss 1984; Park et al. 2023 (arXiv:2303.14186).

    Args:
        G: [m, p] (or [p]).
        d: output dimension.
        seed: PRNG seed.
        block_size: rows of P generated per step (does not change the result).
    """
    G = np.asarray(G)
    if G.ndim not in (1, 2):
        raise ValueError(f"G must have shape [m, p], got shape {G.shape}")
    return make_projection(G.shape[-1], d, seed=seed).project(G, block_size=block_size)


def layer_seed(seed: int, layer: int, side: int) -> int:
    """The seed of one side (0: inputs, 1: output gradients, 2: a norm's vector) of layer `layer`'s projection in
    scope="model" (LoGra, Choe et al. 2024, arXiv:2405.13954): a pure function of the run's seed, the same on every
    machine."""
    if not is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    return int((int(seed) * 1_000_003 + 3 * int(layer) + int(side) + 1) % 2**32)


def compute_projected_ggn(phi: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """sum_i sum_c p_ic phi_ic phi_ic^T [d, d] float64: the Gauss-Newton matrix of the cross-entropy (summed over
    examples) in a projected gradient space, from the projected gradients phi [classes, m, d] of each example's
    loss at every class c and the class probabilities probs [m, classes] (diag p - p p^T = sum_c p_c (p - e_c)
    (p - e_c)^T, and phi_ic = S^T J_i^T (p_i - e_c)).

    Reference: Schraudolph 2002 (Gauss-Newton); Choe et al. 2024 (LoGra, arXiv:2405.13954).
    """
    phi, probs = np.asarray(phi, np.float64), np.asarray(probs, np.float64)
    if phi.ndim != 3 or probs.shape != phi.shape[1::-1]:
        raise ValueError(f"phi [classes, m, d] and probs [m, classes] must agree, got {phi.shape} and {probs.shape}")
    out = np.zeros((phi.shape[2], phi.shape[2]), np.float64)
    for c in range(len(phi)):  # one [d, m] x [m, d] product per class: no [classes, m, d, d] intermediate
        out += (phi[c] * probs[:, c : c + 1]).T @ phi[c]
    return out
