"""Damping calibrated against retraining: the d of (C + l2 I + d I) whose influence best predicts retrained heads.

Influence functions linearise a non-convex model around theta*; the damping d decides how far flat directions of
C + l2 I are trusted, and the best d differs from model to model (0.01-0.03 on a Fashion-MNIST MLP, 0 on a convex
head). Rather than a constant, a build measures it, with the question the linear datamodeling score asks:

    K seeded subsets S_k of the training set (each a fraction alpha of it), the head refit on each from one fixed
    initialisation (``refit_heads``); m test queries with their correct-class margins z_k(q) under refit k;
    for each d on a grid,
        pred_k(q; d) = g_q^T (C + l2 I + d I)^-1 G_k,        G_k = sum_{i in S_k} g_i     (one solve per subset)
        LDS(d)       = mean_q Spearman_k(pred_k(q; d), z_k(q))
    and the damping chosen is argmax_d LDS(d) (``select_damping``).

g are per-example loss gradients at theta*, so pred is the summed influence sum_{i in S_k} score(q, i) of the
subset (score > 0: i supports q's label). The cost is K head refits plus K x |grid| solves: no per-example
score is formed. Convex heads (one linear layer, l2 > 0) need no damping (the undamped inverse is the exact
first-order response; Koh & Liang 2017) and are not calibrated.

References: Park et al. 2023, TRAK (LDS; arXiv:2303.14186); Bae et al. 2022, "If Influence Functions are the
Answer, Then What is the Question?" (damping and the retraining they approximate; arXiv:2209.05364); Koh & Liang
2017 (arXiv:1703.04730).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from influence.head import apply_head, flatten_params
from influence.noise import init_head_params
from influence.objective import cross_entropy, make_loss_fn

#: grid of relative dampings d / lambda_max (besides 0): half decades from 1e-5 to 1e-1
RELATIVE_GRID = tuple(10.0 ** (-j / 2) for j in range(2, 11))


def subset_masks(n: int, k: int, fraction: float, seed: int) -> np.ndarray:
    """K seeded random subsets of n rows, each of round(fraction n) rows: bool masks [k, n]."""
    if not (isinstance(k, int) and k >= 3):
        raise ValueError(f"k (subsets) must be an int >= 3, got {k!r}")
    if not (0.0 < fraction < 1.0):
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    size = max(1, round(fraction * n))
    rng = np.random.default_rng([seed, 23])
    masks = np.zeros((k, n), bool)
    for row in masks:
        row[rng.choice(n, size=size, replace=False)] = True
    return masks


def damping_grid(top_eigenvalue: float, *extra: float) -> np.ndarray:
    """{0} U lambda_max x RELATIVE_GRID U extra, sorted ascending, float64."""
    if not (math.isfinite(top_eigenvalue) and top_eigenvalue > 0):
        raise ValueError(f"top_eigenvalue must be a finite float > 0, got {top_eigenvalue!r}")
    values = {0.0, *(top_eigenvalue * r for r in RELATIVE_GRID), *(float(e) for e in extra)}
    return np.array(sorted(values), np.float64)


def spectral_predictions(eigenvalues: np.ndarray, U: np.ndarray, W: np.ndarray, damping: float) -> np.ndarray:
    """pred [m, K] = U diag(1 / (lambda + d)) W^T, i.e. pred_k(q; d) = x_q^T (A + d I)^-1 w_k for a symmetric
    A = V diag(lambda) V^T given in its eigenbasis: U = X V [m, r] (the queries' vectors), W = W_raw V [K, r] (the
    subsets' summed vectors). One eigendecomposition serves every damping of a grid."""
    lam = np.asarray(eigenvalues, np.float64) + float(damping)
    if np.any(lam <= 0):
        raise ValueError(f"eigenvalues + damping must be > 0, got min {float(lam.min())!r}")
    return (np.asarray(U, np.float64) / lam) @ np.asarray(W, np.float64).T


def correct_class_margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """z_y - max_{c != y} z_c of logits [..., m, C] at labels [m]: [..., m] float64."""
    z = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    own = np.take_along_axis(z, np.broadcast_to(labels[:, None], (*z.shape[:-1], 1)), axis=-1)[..., 0]
    others = z.copy()
    np.put_along_axis(others, np.broadcast_to(labels[:, None], (*z.shape[:-1], 1)), -np.inf, axis=-1)
    return own - others.max(axis=-1)


def rank_correlations(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Spearman correlation per row of pred and truth [m, K] -> [m] (NaN where a row is constant)."""
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    if pred.shape != truth.shape or pred.ndim != 2:
        raise ValueError(f"pred and truth must be [m, K] of one shape, got {pred.shape} and {truth.shape}")
    a = scipy.stats.rankdata(pred, axis=1)
    b = scipy.stats.rankdata(truth, axis=1)
    a -= a.mean(axis=1, keepdims=True)
    b -= b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(axis=1) / np.where(denom > 0, denom, 1.0), np.nan)


def select_damping(grid: Sequence[float], lds: Sequence[float]) -> float:
    """The damping of the grid with the highest LDS (the smallest such one on ties; NaN scores never chosen)."""
    grid_a, lds_a = np.asarray(grid, np.float64), np.asarray(lds, np.float64)
    if grid_a.shape != lds_a.shape or grid_a.ndim != 1 or len(grid_a) == 0:
        raise ValueError(f"grid and lds must be 1-D of one length, got {grid_a.shape} and {lds_a.shape}")
    if not np.any(np.isfinite(lds_a)):
        raise ValueError("lds has no finite value: no damping can be chosen")
    order = np.argsort(grid_a, kind="stable")
    best = max(order, key=lambda j: (np.nan_to_num(lds_a[j], nan=-np.inf), -grid_a[j]))
    return float(grid_a[best])


def subset_gradient_sums(
    spec: Sequence[Mapping[str, Any]],
    params: Sequence[Mapping[str, Any]],
    h: np.ndarray,
    y: np.ndarray,
    masks: np.ndarray,
    *,
    chunk_rows: int = 1024,
) -> np.ndarray:
    """G_k = sum_{i in S_k} grad_theta CE(f(h_i; theta*), y_i) for every mask row: [K, p] float64.

    One reverse-mode pass per chunk of rows with K cotangents (``jax.vjp``): no [n, p] gradient is formed.
    """
    theta, unravel = flatten_params(params)
    loss_fn = make_loss_fn(spec, unravel)
    masks = np.asarray(masks, np.float32)

    @jax.jit
    def chunk_sums(th: jax.Array, hc: jax.Array, yc: jax.Array, wc: jax.Array) -> jax.Array:
        losses, vjp = jax.vjp(lambda t: loss_fn(t, hc, yc), th)
        return jax.vmap(lambda w: vjp(w.astype(losses.dtype))[0])(wc)

    out = np.zeros((len(masks), theta.shape[0]), np.float64)
    n = len(y)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        pad = chunk_rows - (stop - start) if n > chunk_rows else 0
        hc = np.concatenate([np.asarray(h[start:stop]), np.zeros((pad, *h.shape[1:]), h.dtype)])
        yc = np.concatenate([np.asarray(y[start:stop]), np.zeros(pad, np.asarray(y).dtype)])
        wc = np.concatenate([masks[:, start:stop], np.zeros((len(masks), pad), np.float32)], axis=1)
        out += np.asarray(chunk_sums(theta, jnp.asarray(hc), jnp.asarray(yc), jnp.asarray(wc)), np.float64)
    return out


def refit_heads(
    spec: Sequence[Mapping[str, Any]],
    h: np.ndarray,
    y: np.ndarray,
    masks: np.ndarray,
    *,
    l2: float,
    target_losses: np.ndarray,
    seed: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    max_steps: int = 3000,
    on_epoch: Callable[[int, int], None] | None = None,
) -> tuple[list[list[dict[str, jax.Array]]], np.ndarray]:
    """Trains K copies of the head from ONE fresh initialisation (seed), copy k on the rows of masks[k] only:
    Adam (lr) on shuffled minibatches of (1/b) sum CE + (l2/2) ||theta||^2, all K in one vmapped step, each
    copy stopping once its mean training CE over its rows is <= target_losses[k] (or at max_epochs).

    The masks must have equal row counts (one batch layout for all copies). The stopping rule stands in for the
    user's unknown training procedure, as in `influence.noise.fit_head_adam`. Returns (K parameter lists,
    epochs run per copy [K]).
    """
    masks = np.asarray(masks, bool)
    sizes = masks.sum(axis=1)
    if len(set(sizes.tolist())) != 1:
        raise ValueError(f"masks must select equally many rows each, got {sorted(set(sizes.tolist()))}")
    k, size = len(masks), int(sizes[0])
    rows = np.stack([np.flatnonzero(m) for m in masks])  # [K, size]
    theta0, unravel = flatten_params(init_head_params(spec, seed))
    h_dev, y_dev = jnp.asarray(h, jnp.float32), jnp.asarray(y)
    b = min(batch_size, size)
    steps = math.ceil(size / b)
    targets = jnp.asarray(np.asarray(target_losses, np.float32))

    def objective(th: jax.Array, idx: jax.Array) -> jax.Array:
        logits = apply_head(spec, unravel(th), h_dev[idx])
        return jnp.mean(cross_entropy(logits, y_dev[idx])) + 0.5 * l2 * jnp.vdot(th, th)

    def adam(th: jax.Array, m: jax.Array, v: jax.Array, t: jax.Array, idx: jax.Array) -> tuple[jax.Array, ...]:
        g = jax.grad(objective)(th, idx)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
        return th - lr * m_hat / (jnp.sqrt(v_hat) + 1e-8), m, v

    @jax.jit
    def epoch(state: tuple[jax.Array, ...], batches: jax.Array, active: jax.Array) -> tuple[jax.Array, ...]:
        def step(carry: tuple[jax.Array, ...], idx: jax.Array) -> tuple[tuple[jax.Array, ...], None]:
            th, m, v, t = carry
            t = t + 1
            new = jax.vmap(adam, in_axes=(0, 0, 0, None, 0))(th, m, v, t, idx)
            keep = active[:, None]
            return (*tuple(jnp.where(keep, a, b_) for a, b_ in zip(new, (th, m, v), strict=True)), t), None

        return jax.lax.scan(step, state, batches)[0]

    @jax.jit
    def mean_losses(th: jax.Array, idx: jax.Array) -> jax.Array:
        def one(t: jax.Array, r: jax.Array) -> jax.Array:
            return jnp.mean(cross_entropy(apply_head(spec, unravel(t), h_dev[r]), y_dev[r]))

        return jax.vmap(one)(th, idx)

    th = jnp.broadcast_to(theta0, (k, theta0.shape[0]))
    state = (th, jnp.zeros_like(th), jnp.zeros_like(th), jnp.asarray(0.0, theta0.dtype))
    rngs = [np.random.default_rng([seed, 29, j]) for j in range(k)]
    epochs = np.zeros(k, np.int64)
    active = np.ones(k, bool)
    rows_dev = jnp.asarray(rows)
    for e in range(math.ceil(max_steps / steps)):
        perms = []
        for j in range(k):
            perm = rows[j][rngs[j].permutation(size)]
            perms.append(np.concatenate([perm, perm[: steps * b - size]]).reshape(steps, b))
        batches = jnp.asarray(np.stack(perms, axis=1))  # [steps, K, b]
        state = epoch(state, batches, jnp.asarray(active))
        epochs[active] += 1
        active &= np.asarray(mean_losses(state[0], rows_dev) > targets)
        if on_epoch is not None:
            on_epoch(e + 1, int(active.sum()))
        if not active.any():
            break
    return [unravel(state[0][j]) for j in range(k)], epochs


def calibration_lds(
    predictions: Callable[[float], np.ndarray], margins: np.ndarray, grid: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """(mean LDS [len(grid)], its standard error) of predictions(d) [m, K] against margins [m, K] for d in grid."""
    means, errors = [], []
    for d in grid:
        rho = rank_correlations(predictions(float(d)), margins)
        rho = rho[np.isfinite(rho)]
        means.append(float(rho.mean()) if len(rho) else float("nan"))
        errors.append(float(rho.std(ddof=1) / math.sqrt(len(rho))) if len(rho) > 1 else float("nan"))
    return np.array(means), np.array(errors)
