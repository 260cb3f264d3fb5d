"""Gradient methods on the last-block scope (`Task.from_hf(..., scope="last-block")`, `indexer.block`).

Train side: projected last-block gradients phi_i = S^T g_i (space "block", or "block-unit" normalised). Query
side: phi_q (grad-dot), phi_q / |phi_q| (grad-cos), or the Galerkin projection of the full-space influence onto
span(S) in full-space units, (p / d) (A + delta B)^-1 phi_q with A = S^T C S + l2 S^T S, B = S^T S, solved by
the pencil's eigendecomposition (exact) or LiSSA (`influence.ProjectedCurvature`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

import influence as inf
from api.scorers.base import StoredTrainSide, register

if TYPE_CHECKING:
    from api.engine import Engine, Queries


class BlockGradient(StoredTrainSide):
    method = "grad-dot"
    space = "block"
    projected = False
    unit = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def train_vectors(self, rows: slice | np.ndarray) -> np.ndarray:
        g = np.asarray(self.engine.run.array("block_train_vectors")[rows], np.float64)
        return np.asarray(inf.normalize_rows(g)) if self.unit else g

    def query_vectors(self, queries: Queries) -> tuple[np.ndarray, dict[str, float]]:
        phi = self.engine.block_gradients(queries)
        return (np.asarray(inf.normalize_rows(phi)) if self.unit else phi), {}


@register("grad-dot", scope="last-block")
class BlockGradDot(BlockGradient):
    pass


@register("grad-cos", scope="last-block")
class BlockGradCos(BlockGradient):
    method = "grad-cos"
    space = "block-unit"
    unit = True


class BlockInfluence(BlockGradient):
    def query_vectors(self, queries: Queries) -> tuple[np.ndarray, dict[str, float]]:
        phi = self.engine.block_gradients(queries)
        return self.engine.block_curvature.solve(phi, method=self.method, lissa=self.engine.lissa_config)


@register("exact", scope="last-block")
class BlockExact(BlockInfluence):
    method = "exact"


@register("lissa", scope="last-block")
class BlockLissa(BlockInfluence):
    method = "lissa"
