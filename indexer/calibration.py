"""The build stage "damping": the run's damping calibrated against refits of the head (`influence.damping`).

The "curvature" stage stores the eigenvalue rule's damping (`influence.compute_damping`). For a head with hidden
layers (non-convex: the rule's damping, ~0, leaves much of the achievable LDS unused) this stage refits the head
on K seeded half subsets of the training set from one initialisation, scores each damping of a grid by how well
g_q^T (C + l2 I + d I)^-1 sum_{i in S_k} g_i ranks the refits' correct-class margins of m stored test queries
(Spearman over the subsets, averaged over the queries: the linear datamodeling score), and stores the best one
(`extra["damping"]`) with its evidence (`extra["damping_calibration"]`: grid, LDS and standard error per damping,
subsets, queries, refit epochs, seconds). Every solver of the run reads the stored damping.

Runs where calibration does not apply keep the rule's damping and say why in the record: a convex head (one
linear layer), no stored test examples, too few training rows, `IndexConfig(damping_subsets=0)`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

import influence as inf
from influence.damping import (
    calibration_lds,
    correct_class_margins,
    damping_grid,
    refit_heads,
    select_damping,
    subset_gradient_sums,
    subset_masks,
)
from influence.noise import count_linear_layers
from store import load_array

from .context import BuildContext, ManifestPatch

#: fraction of the training set in each calibration subset (the LDS protocol's halves)
SUBSET_FRACTION = 0.5
#: the calibration's seed (subsets, query sample, the refits' one initialisation)
CALIBRATION_SEED = 0
#: the calibration's solves: ranking subsets needs ~1e-2 relative residuals, not the query path's 1e-3
CALIBRATION_SOLVE = inf.LissaConfig(tol=0.1)
#: the least training rows / test queries a calibration runs with
MIN_TRAIN_ROWS, MIN_QUERIES = 40, 10


def calibration_queries(n_test: int, count: int, seed: int) -> np.ndarray:
    """The stored test rows a calibration scores: a seeded sample of min(count, n_test), sorted."""
    return np.sort(np.random.default_rng([seed, 31]).choice(n_test, size=min(count, n_test), replace=False))


def calibration_record(
    chosen: float,
    rule: float,
    grid: np.ndarray,
    lds: np.ndarray,
    se: np.ndarray,
    *,
    subsets: int,
    queries: int,
    seed: int,
) -> dict[str, Any]:
    """The evidence of a calibrated damping (the manifest's `damping_calibration`): grid, LDS and s.e. per damping."""
    return {
        "damping": chosen,
        "chosen_by": "calibration",
        "rule_damping": rule,
        "grid": [float(d) for d in grid],
        "lds": [float(v) for v in lds],
        "lds_se": [float(v) for v in se],
        "subsets": subsets,
        "fraction": SUBSET_FRACTION,
        "queries": queries,
        "seed": seed,
    }


def skip_reason(ctx: BuildContext) -> str | None:
    """Why the damping of this run is not calibrated (None when it is)."""
    if ctx.config.damping_subsets == 0:
        return "IndexConfig(damping_subsets=0)"
    if count_linear_layers(ctx.spec) < 2:
        return "convex head (one linear layer): the undamped inverse is the exact response"
    n_test = int(ctx.manifest.task.get("n_test", 0))
    if n_test < MIN_QUERIES:
        return f"{n_test} stored test examples (calibration needs >= {MIN_QUERIES})"
    n_train = int(ctx.manifest.task.get("n_train", 0))
    if n_train < MIN_TRAIN_ROWS:
        return f"{n_train} training examples (calibration needs >= {MIN_TRAIN_ROWS})"
    return None


def _curvature(ctx: BuildContext, h: np.ndarray, y: np.ndarray) -> tuple[inf.HeadCurvature, str]:
    """The run's curvature operator (as `api.engine.Engine.curvature` builds it) and the solve method."""
    paths = ctx.paths
    deflation = None
    if paths.array("curvature_top_eigenvalues").exists():
        deflation = (
            np.asarray(load_array(paths.array("curvature_top_eigenvalues")), np.float64),
            load_array(paths.array("curvature_top_eigenvectors")),
        )
    eigen = None
    if paths.array("curvature_eigenvalues").exists():
        eigen = inf.EigenSolver.from_arrays(
            np.asarray(load_array(paths.array("curvature_eigenvalues"))),
            np.asarray(load_array(paths.array("curvature_eigenvectors"))),
        )
    op = inf.HeadCurvature(
        matvec=ctx.head.matvec(h, y, l2=ctx.l2, curvature=ctx.config.curvature),
        l2=ctx.l2,
        top_eigenvalue=float(ctx.manifest.extra["top_eigenvalue"]),
        damping=float(ctx.manifest.extra["damping"]),
        deflation=deflation,
        eigen=eigen,
        iterative="cg" if ctx.config.curvature == "ggn" else "lissa",
    )
    return op, "exact" if eigen is not None else "lissa"


def damping_stage(ctx: BuildContext) -> ManifestPatch:
    """Calibrates the run's damping against refits of the head (see the module docstring)."""
    rule = float(ctx.manifest.extra["damping"])
    reason = skip_reason(ctx)
    if reason is not None:
        return ManifestPatch(extra={"damping_calibration": {"damping": rule, "chosen_by": "rule", "reason": reason}})
    t0 = time.perf_counter()
    k, seed = ctx.config.damping_subsets, CALIBRATION_SEED
    h, y = ctx.split("train")
    h = np.asarray(h)
    ht, yt = ctx.split("test")
    queries = calibration_queries(len(yt), ctx.config.damping_queries, seed)
    hq, yq = np.asarray(ht[queries]), np.asarray(yt[queries])
    masks = subset_masks(len(y), k, SUBSET_FRACTION, seed)

    # the refits: one initialisation, each fit until it fits its rows as closely as the model fits them
    losses = _losses(ctx, h, y)
    targets = np.array([losses[m].mean() for m in masks])
    bar = tqdm(total=None, desc="damping: refits (epochs)", unit="epoch", disable=not ctx.progress)

    def on_epoch(_: int, active: int) -> None:
        bar.update(1)
        bar.set_postfix(active=active)

    params, epochs = refit_heads(ctx.spec, h, y, masks, l2=ctx.l2, target_losses=targets, seed=seed, on_epoch=on_epoch)
    bar.close()
    margins = np.stack(
        [correct_class_margins(np.asarray(inf.apply_head(ctx.spec, p, hq), np.float64), yq) for p in params], axis=1
    )  # [m, K]

    # the summed influence of each subset on each query, per damping: one solve per subset
    G = subset_gradient_sums(ctx.spec, ctx.params, h, y, masks).astype(np.float32)
    op, method = _curvature(ctx, h, y)
    grid = damping_grid(float(ctx.manifest.extra["top_eigenvalue"]), rule)
    solves = tqdm(total=len(grid), desc="damping: solves", unit="damping", disable=not ctx.progress)

    def predictions(d: float) -> np.ndarray:
        x, _ = dataclasses.replace(op, damping=d).solve(G, method=method, lissa=CALIBRATION_SOLVE)
        solves.update(1)
        return ctx.head.gradient_products(hq, yq, np.asarray(x, np.float32)).T  # [m, K]

    lds, se = calibration_lds(predictions, margins, grid)
    solves.close()
    chosen = select_damping(grid, lds)
    record = calibration_record(chosen, rule, grid, lds, se, subsets=k, queries=len(queries), seed=seed) | {
        "refit_epochs": [int(e) for e in epochs],
        "seconds": time.perf_counter() - t0,
    }
    return ManifestPatch(extra={"damping": chosen, "damping_calibration": record})


def _losses(ctx: BuildContext, h: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The model's per-example training CE [n] float64 (`influence.cross_entropy`), in chunks."""
    return np.concatenate(
        [
            np.asarray(inf.cross_entropy(ctx.head.logits(h[s : s + 4096]), y[s : s + 4096]), np.float64)
            for s in range(0, len(y), 4096)
        ]
    )
