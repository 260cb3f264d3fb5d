"""Gradient methods on the head scope: score_i = q . g_i with g_i the head gradient of example i at its label.

- grad-dot: q = g_q.
- grad-cos: q = g_q / |g_q| against g_i / |g_i| (space "grad-unit").
- lissa / exact: q = (C + l2 I + dI)^-1 g_q (Koh & Liang 2017, arXiv:1703.04730, sign flipped so that helpful
  is positive), solved by deflated LiSSA (Agarwal et al. 2017, arXiv:1602.03943) or the dense eigendecomposition.

When the head has more parameters than `project_above`, the stored spaces hold projected gradients: FAISS proposes
candidates and `train_vectors` recomputes g_i from the cached features for exact scores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

import influence as inf
from api.scorers.base import StoredTrainSide, register

if TYPE_CHECKING:
    from api.engine import Engine, Queries


class HeadGradient(StoredTrainSide):
    """Base of the head-scope gradient scorers: train-side vectors g_i (stored, or recomputed where projected)."""

    method = "grad-dot"
    space = "grad"
    unit = False  # both sides normalised (grad-cos)
    #: the query vector is a curvature solve x_q: candidates from the whitened space "grad-whitened" where the run
    #: has one (`api.scorers.base.search`); a raw gradient (grad-dot) is estimated better by the raw space
    whitened_candidates = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.projected = engine.run.projection is not None

    def train_vectors(self, rows: slice | np.ndarray) -> np.ndarray:
        if self.projected:
            g = self.engine.train_gradients(rows)
        else:
            g = np.asarray(self.engine.run.array("grad_vectors")[rows])
        return np.asarray(inf.normalize_rows(g)) if self.unit else g

    def scores(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact scores q . g_i [m, len(rows)] of training rows; where the space is projected, by forward-mode
        directional derivatives of the rows' losses along q (`influence.Head.gradient_products`): no gradient of a
        candidate is formed."""
        if not self.projected or self.unit:
            return super().scores(q, rows)
        train = self.engine.run.train
        return self.engine.head.gradient_products(np.asarray(train.features[rows]), train.labels[rows], q)

    def gradients(self, queries: Queries) -> np.ndarray:
        return self.engine.gradients(queries.h, queries.targets)

    def query_vectors(self, queries: Queries) -> tuple[np.ndarray, dict[str, float]]:
        g = self.gradients(queries)
        return (np.asarray(inf.normalize_rows(g)) if self.unit else g), {}


@register("lissa", scope="head")
class Lissa(HeadGradient):
    """Influence by LiSSA; stored test examples at their cached target read the build's query cache."""

    method = "lissa"
    whitened_candidates = True

    def query_vectors(self, queries: Queries) -> tuple[np.ndarray, dict[str, float]]:
        engine, g = self.engine, self.gradients(queries)
        cache = engine.query_cache if engine.use_query_cache else None
        rows = queries.test_rows
        if rows is None or cache is None:
            return engine.solve(g, "lissa")
        solutions, cached_targets, residuals = cache
        hit = cached_targets[rows] == queries.targets
        q = np.empty(g.shape, np.result_type(g.dtype, solutions.dtype))
        q[hit] = solutions[rows[hit]]
        diag = {"damping": engine.damping, "cached": float(hit.mean())}
        if hit.any():
            diag["residual_max"] = float(residuals[rows[hit]].max())
        if not hit.all():
            q[~hit], solved = engine.solve(g[~hit], "lissa")
            diag |= {**solved, "residual_max": max(solved["residual_max"], diag.get("residual_max", 0.0))}
        return q, diag


@register("exact", scope="head")
class Exact(HeadGradient):
    method = "exact"
    whitened_candidates = True

    def query_vectors(self, queries: Queries) -> tuple[np.ndarray, dict[str, float]]:
        self.engine.require_exact()
        return self.engine.solve(self.gradients(queries), "exact")


@register("grad-dot", scope="head")
class GradDot(HeadGradient):
    pass


@register("grad-cos", scope="head")
class GradCos(HeadGradient):
    method = "grad-cos"
    space = "grad-unit"
    unit = True
