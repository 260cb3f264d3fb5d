"""Gradient similarity and self-influence as inner products.

    score(q, i)        = <u_q, w_i>                      (grad-dot: u = g_q; influence: u = H^-1 g_q)
    cosine(q, i)       = <g_q / ||g_q||, g_i / ||g_i||>  (grad-cos)
    tracin_self(i)     = sum_c eta_c ||g_i(theta_c)||^2

Reference: Koh & Liang 2017 (arXiv:1703.04730); Pruthi et al. 2020, "Estimating Training Data Influence by
Tracing Gradient Descent" (arXiv:2002.08484); Charpiat et al. 2019, "Input Similarity from the Neural Network
Perspective" (grad-cos).
"""

from __future__ import annotations

import numpy as np


def normalize_rows(G: np.ndarray) -> np.ndarray:
    """Returns G_i / ||G_i|| row-wise; zero rows stay zero.

    Args:
        G: [n, d].
    """
    G = np.asarray(G)
    if G.ndim != 2:
        raise ValueError(f"G must have shape [n, d], got shape {G.shape}")
    norms = np.linalg.norm(G, axis=1, keepdims=True)
    safe = np.where(norms > 0, norms, 1)
    return (G / safe).astype(G.dtype if np.issubdtype(G.dtype, np.floating) else np.float64)


def accumulate_tracin_self_influence(total: np.ndarray, grads: np.ndarray, learning_rate: float) -> np.ndarray:
    """TracIn self-influence, one checkpoint at a time: total_i += eta_c ||g_i(theta_c)||^2.

    TracInCP(i, i) = sum_c eta_c <g_i(theta_c), g_i(theta_c)> (Pruthi et al. 2020, eq. 3, with the query equal to
    the training example): large for examples whose loss the optimiser kept pushing on, e.g. mislabeled ones.

    Args:
        total: running sums [n] (float64), updated in place and returned.
        grads: per-example gradients at checkpoint c, [n, p].
        learning_rate: eta_c > 0, the learning rate in effect around checkpoint c.
    """
    grads = np.asarray(grads)
    if grads.ndim != 2 or total.shape != (grads.shape[0],):
        raise ValueError(f"grads must have shape [{total.shape[0]}, p], got shape {grads.shape}")
    if not np.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError(f"learning_rate must be a finite float > 0, got {learning_rate!r}")
    g = grads.astype(np.float64, copy=False)
    total += learning_rate * np.einsum("ij,ij->i", g, g)
    return total
