"""Influence with Kronecker-factored curvature of the head: score_i = g_q^T (K + (l2 + d) I)^-1 g_i.

K is the block-diagonal K-FAC approximation of the GGN C (Martens & Grosse 2015, arXiv:1503.05671), per linear
layer A_l (x) G_l from the layer's inputs and output gradients, or its EK-FAC refinement (George et al. 2018,
arXiv:1806.03884; Grosse et al. 2023, arXiv:2308.03296): the same eigenbasis with the eigenvalues replaced by the
diagonal of C in it. Where the run stores the top eigenpairs of C + l2 I, the model is exact on that subspace and
Kronecker-factored on the rest (`Engine.kronecker_inverse`, `influence.deflated_inverse`). The query side is one
application of the inverse: no iteration, so a query costs a gradient and a few small matrix products. Train side:
the head gradients g_i (space "grad", re-scored exactly where the run projects them), as for the other head methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np

from api.scorers.base import register
from api.scorers.head import HeadGradient

if TYPE_CHECKING:
    from api.engine import Queries


class KroneckerInfluence(HeadGradient):
    method = "ekfac"
    whitened_candidates = True

    def query_vectors(self, queries: Queries) -> tuple[np.ndarray, dict[str, float]]:
        inverse, diagnostics = self.engine.kronecker_inverse(self.method)
        g = self.gradients(queries)
        return np.asarray(inverse(jnp.asarray(g)), g.dtype), diagnostics


@register("ekfac", scope="head")
class EKFAC(KroneckerInfluence):
    method = "ekfac"


@register("kfac", scope="head")
class KFAC(KroneckerInfluence):
    method = "kfac"
