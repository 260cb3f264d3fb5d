"""Gradient methods on scope="model" (every layer of the model, or the named modules; `indexer.model_stage`).

Train side: projected per-layer gradients phi_i = S^T g_i (LoGra; S = I when the run does not project), space
"model" (or "model-unit" normalised). Query side: phi_q (grad-dot), phi_q / |phi_q| (grad-cos), or
(G + l2 I + delta I)^-1 phi_q with G the projected Gauss-Newton matrix (exact: its eigendecomposition; lissa:
LiSSA on the same operator, `influence.ProjectedCurvature` with B = I; kfac / ekfac: the block-diagonal
Kronecker-factored model of G, one application of its inverse), so that the FAISS inner product is the score
phi_q^T (G + (l2 + delta) I)^-1 phi_i. Query gradients of stored test examples at their stored target are
read from the run; other targets and raw inputs go through the model (`open_index(path, task=...)`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

import influence as inf
from api.scorers.base import StoredTrainSide, register

if TYPE_CHECKING:
    from api.engine import Engine, Queries


def model_record(engine: Engine) -> dict[str, Any]:
    """The "model" stage's manifest record (dims, seeds, layers, damping)."""
    return engine.run.extra["model"]


def model_curvature(engine: Engine) -> inf.ProjectedCurvature:
    """G + l2 I of the run with the engine's damping (the LissaConfig's when set, else the build's), cached."""
    cache = engine.__dict__.setdefault("_model_cache", {})
    if "curvature" not in cache:
        A = np.asarray(engine.run.array("model_curvature"), np.float64)
        record = model_record(engine)
        damping = engine.lissa_config.damping
        cache["curvature"] = inf.ProjectedCurvature(
            A=A,
            B=np.eye(len(A)),
            full_space_scale=1.0,
            l2=engine.run.l2,
            damping=float(record["damping"] if damping is None else damping),
            deflation_rank=int(min(engine.run.config.get("deflation_rank", 64), len(A) - 1)),
        )
    return cache["curvature"]


def model_kronecker(engine: Engine, kind: str) -> inf.KroneckerCurvature:
    """The run's K-FAC or EK-FAC model of G in phi's space (stage "model-curvature"), with the engine's damping
    (the LissaConfig's when set, else the build's rule on G + l2 I: the calibrated damping of stage
    "model-damping" is measured for the exact operator, as on the head), cached."""
    from indexer.training_set import load_kronecker

    cache = engine.__dict__.setdefault("_model_cache", {})
    if "kronecker" not in cache:
        damping = engine.lissa_config.damping
        record = model_record(engine)
        damping = float(record.get("rule_damping", record["damping"]) if damping is None else damping)
        cache["kronecker"] = load_kronecker(engine.run.paths, engine.run.extra, damping=damping, prefix="model_")
    if kind not in cache["kronecker"]:
        raise ValueError(
            f"method {kind!r} on scope='model' needs the K-FAC factors of the 'model-curvature' stage, which "
            f"{engine.run.root} was built without: rebuild it"
        )
    return cache["kronecker"][kind]


def _through_model(engine: Engine, xs: list[Any], targets: np.ndarray) -> np.ndarray:
    from indexer.model_stage import embed_inputs

    task = engine.task
    if task is None or task.model_scope is None:
        raise ValueError(
            "this run takes influence over the whole model (scope='model'): gradients of raw inputs, or of stored "
            "test examples at a class other than the predicted one, need the model: "
            "open_index(path, task=Task(..., scope='model'))"
        )
    record = model_record(engine)
    task.model_scope.check_record(record)
    return embed_inputs(task, xs, targets, record)


def model_gradients(engine: Engine, queries: Queries) -> np.ndarray:
    """phi_q of the queries at their targets [m, d] float64: stored for stored test examples at their stored
    target, else through the task's model."""
    targets = queries.targets
    if queries.test_rows is None:
        if queries.raw is None:
            raise ValueError("a scope='model' run needs stored test ids or raw inputs for its query gradients")
        return _through_model(engine, queries.raw, targets)
    rows = queries.test_rows
    hit = np.asarray(engine.run.array("model_test_targets"))[rows] == targets
    phi = np.empty((len(targets), model_record(engine)["dim"]), np.float64)
    phi[hit] = np.asarray(engine.run.array("model_test_vectors"))[rows[hit]]
    if not hit.all():
        task = engine.task
        xs = [] if task is None or task.test is None else [task.test[int(r)][0] for r in rows[~hit]]
        phi[~hit] = _through_model(engine, xs, targets[~hit])
    return phi


class ModelGradient(StoredTrainSide):
    method = "grad-dot"
    space = "model"
    projected = False
    unit = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def train_vectors(self, rows: slice | np.ndarray) -> np.ndarray:
        g = np.asarray(self.engine.run.array("model_train_vectors")[rows], np.float64)
        return np.asarray(inf.normalize_rows(g)) if self.unit else g

    def query_vectors(self, queries: Queries) -> tuple[np.ndarray, dict[str, float]]:
        phi = model_gradients(self.engine, queries)
        return (np.asarray(inf.normalize_rows(phi)) if self.unit else phi), {}


@register("grad-dot", scope="model")
class ModelGradDot(ModelGradient):
    pass


@register("grad-cos", scope="model")
class ModelGradCos(ModelGradient):
    method = "grad-cos"
    space = "model-unit"
    unit = True


class ModelInfluence(ModelGradient):
    def query_vectors(self, queries: Queries) -> tuple[np.ndarray, dict[str, float]]:
        phi = model_gradients(self.engine, queries)
        return model_curvature(self.engine).solve(phi, method=self.method, lissa=self.engine.lissa_config)


@register("exact", scope="model")
class ModelExact(ModelInfluence):
    method = "exact"


@register("lissa", scope="model")
class ModelLissa(ModelInfluence):
    method = "lissa"


class ModelKronecker(ModelGradient):
    """score = phi_q^T (K + (l2 + d) I)^-1 phi_i, K the block-diagonal K-FAC / EK-FAC model of G: per layer
    (Q_S (x) Q_A) diag(Lambda) (Q_S (x) Q_A)^T from the projected factors A = E[a~ a~^T], S = E_c[p_c s~ s~^T]
    (Martens & Grosse 2015; EK-FAC's Lambda = diag of G's block in that basis, George et al. 2018); the query
    side is one application of the inverse, the train side the stored phi_i (space "model")."""

    method = "ekfac"

    def query_vectors(self, queries: Queries) -> tuple[np.ndarray, dict[str, float]]:
        curvature = model_kronecker(self.engine, self.method)
        return curvature.solve(model_gradients(self.engine, queries)), {"damping": curvature.damping}


@register("ekfac", scope="model")
class ModelEKFAC(ModelKronecker):
    method = "ekfac"


@register("kfac", scope="model")
class ModelKFAC(ModelKronecker):
    method = "kfac"
