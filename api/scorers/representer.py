"""Representer points (Yeh et al. 2018, arXiv:1811.09720): score_i = alpha_ic phi_i . phi_q, c the target class.

Train side: vec(alpha_i phi_i^T) of the L2 fine-tuned last linear layer (space "representer"); query side:
onehot(c) x phi_q. Defined on every scope: the representer points stay on the last linear layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

import influence as inf
from api.scorers.base import StoredTrainSide, register

if TYPE_CHECKING:
    from api.engine import Engine, Queries


@register("representer", scope=("head", "last-block", "model"))
class Representer(StoredTrainSide):
    method = "representer"
    space = "representer"
    projected = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def query_vectors(self, queries: Queries) -> tuple[np.ndarray, dict[str, float]]:
        run = self.engine.run
        phi = np.asarray(inf.penultimate_features(run.spec, run.params, queries.h), np.float64)
        return np.asarray(
            inf.compute_representer_queries(inf.augment_features(phi), queries.targets, run.n_classes)
        ), {}

    def train_vectors(self, rows: slice | np.ndarray) -> np.ndarray:
        run = self.engine.run
        alpha = np.asarray(run.array("representer_alpha")[rows], np.float64)
        return np.asarray(
            inf.compute_representer_embeddings(alpha, np.asarray(run.array("train_phi")[rows], np.float64))
        )
