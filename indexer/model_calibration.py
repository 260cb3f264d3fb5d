"""The build stage "model-damping": the damping of a scope="model" run, calibrated against refits of the model.

The question of the head's stage "damping" (`indexer.calibration`, `influence.damping`), asked in phi's space
(`indexer.model_stage`): K seeded half subsets S_k of the training set, the scope's parameters refit on each;
m stored test queries (a seeded sample) with their correct-class margins z_k(q) under refit k; for each d of a
grid

    pred_k(q; d) = phi_q^T (G + l2 I + d I)^-1 sum_{i in S_k} phi_i = sum_j u_qj w_kj / (lambda_j + d)
    LDS(d)       = mean_q Spearman_k(pred_k(q; d), z_k(q)),

with G + l2 I = V diag(lambda) V^T the stage "model-curvature"'s dense matrix, u_q = V^T phi_q (the query's
projected gradient at its true label), w_k = V^T sum_{i in S_k} phi_i (`influence.damping.spectral_predictions`:
one eigendecomposition for the whole grid). The chosen d = argmax LDS(d) replaces the rule's in the manifest's
extra["model"]["damping"] (methods "exact" / "lissa", the noise self-influence), the rule's kept as "rule_damping"
(K-FAC / EK-FAC keep it, as on the head) and the evidence as extra["model"]["damping_calibration"].

Why: in a projected space of a few hundred dimensions per layer, G's small eigenvalues are mostly noise and the
eigenvalue rule's damping (1e-3 lambda_max) inverts them; on a Fashion-MNIST CNN (1,000 images, d = 800) the
exact score's LDS against 16 retrains went from 0.43 at the rule's damping to 0.54 at d = 3-10, a relative
damping the head's grid does not reach, so this grid runs up to lambda_max.

The refits: the Task holds the trained model but neither its initialisation nor its training recipe, so each
refit starts at theta* (a copy of the model, the scope's parameters free, the rest frozen, eval mode: the function
the scores are taken of) and runs REFIT_EPOCHS epochs of Adam (lr 1e-3, the task's batch size, seeded order) on
mean CE + (l2 / 2) ||theta_scope||^2 over the subset's rows: the proximal response to the change of data that
influence functions approximate (the PBRF of Bae et al. 2022, arXiv:2209.05364). On that CNN the damping these
warm-started refits select (3) matches the optimum against retraining from the initialisation (3-10). Cost:
K x REFIT_EPOCHS x n / 2 forward-backward passes of the model, sequential on the task's device.

Runs where calibration does not apply keep the rule's damping and say why in the record: no stored test
examples (or too few), too few training rows, `IndexConfig(damping_subsets=0)`.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from influence.damping import (
    calibration_lds,
    correct_class_margins,
    damping_grid,
    select_damping,
    spectral_predictions,
    subset_masks,
)
from store import load_array

from .calibration import (
    CALIBRATION_SEED,
    MIN_QUERIES,
    MIN_TRAIN_ROWS,
    SUBSET_FRACTION,
    calibration_queries,
    calibration_record,
)
from .context import BuildContext, ManifestPatch
from .model_stage import embed_inputs

#: epochs of each warm-started refit
REFIT_EPOCHS = 3
#: the refits' Adam step size
REFIT_LR = 1e-3
#: relative dampings d / lambda_max added to the head's grid (which stops at 1e-1): projected spaces need more
EXTRA_RELATIVE = (10.0**-0.5, 1.0)
#: rows per matrix product when summing phi over the subsets
SUM_ROWS = 8192


def skip_reason(ctx: BuildContext) -> str | None:
    """Why the damping of this scope="model" run is not calibrated (None when it is)."""
    if ctx.config.damping_subsets == 0:
        return "IndexConfig(damping_subsets=0)"
    n_test = int(ctx.manifest.task.get("n_test", 0))
    if ctx.task.test is None or n_test < MIN_QUERIES:
        return f"{n_test} stored test examples (calibration needs >= {MIN_QUERIES})"
    n_train = int(ctx.manifest.task.get("n_train", 0))
    if n_train < MIN_TRAIN_ROWS:
        return f"{n_train} training examples (calibration needs >= {MIN_TRAIN_ROWS})"
    return None


def refit_margins(
    task: Any,
    y: np.ndarray,
    masks: np.ndarray,
    query_xs: list[Any],
    query_labels: np.ndarray,
    *,
    l2: float,
    seed: int,
    epochs: int = REFIT_EPOCHS,
    on_epoch: Any = None,
) -> np.ndarray:
    """Correct-class margins [m, K] of the queries under K warm-started refits of the task's model (see the module
    docstring), refit k on the training rows of masks[k] (labels y [n])."""
    scope, b = task.model_scope, task.batch_size
    out = np.empty((len(query_labels), len(masks)), np.float64)
    for k, mask in enumerate(masks):
        model = copy.deepcopy(scope.model).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        params = scope.parameters_of(model)
        for p in params:
            p.requires_grad_(True)
        forward = scope.forward_of(model)
        opt = torch.optim.Adam(params, lr=REFIT_LR)
        rows = np.flatnonzero(mask)
        rng = np.random.default_rng([seed, 41, k])
        with torch.enable_grad():
            for _ in range(epochs):
                order = rng.permutation(rows)
                for s in range(0, len(order), b):
                    batch = order[s : s + b]
                    logits = forward([task.train[int(i)][0] for i in batch])
                    target = torch.as_tensor(y[batch], dtype=torch.int64, device=logits.device)
                    loss = F.cross_entropy(logits, target) + 0.5 * l2 * sum((p * p).sum() for p in params)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                if on_epoch is not None:
                    on_epoch()
        with torch.no_grad():
            logits = torch.cat([forward(query_xs[s : s + b]).double().cpu() for s in range(0, len(query_xs), b)])
        out[:, k] = correct_class_margins(logits.numpy(), query_labels)
    return out


def subset_sums(vectors: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """sum_{i in S_k} phi_i for every mask row [K, d] float64 (vectors [n, d], memory-mapped, read in blocks)."""
    out = np.zeros((len(masks), vectors.shape[1]), np.float64)
    for s in range(0, len(vectors), SUM_ROWS):
        out += masks[:, s : s + SUM_ROWS].astype(np.float64) @ np.asarray(vectors[s : s + SUM_ROWS], np.float64)
    return out


def model_damping_stage(ctx: BuildContext) -> ManifestPatch:
    """Calibrates the damping of a scope="model" run against refits of its model (see the module docstring)."""
    record = ctx.manifest.extra["model"]
    rule = float(record.get("rule_damping", record["damping"]))
    reason = skip_reason(ctx)
    if reason is not None:
        calibration = {"damping": rule, "chosen_by": "rule", "reason": reason}
        return ManifestPatch(extra={"model": record | {"damping": rule, "damping_calibration": calibration}})
    t0 = time.perf_counter()
    task, k, seed = ctx.task, ctx.config.damping_subsets, CALIBRATION_SEED
    task.model_scope.check_record(record)
    _, y = ctx.split("train")
    _, yt = ctx.split("test")
    queries = calibration_queries(len(yt), ctx.config.damping_queries, seed)
    yq = np.asarray(yt[queries], np.int64)
    xq = [task.test[int(i)][0] for i in queries]
    masks = subset_masks(len(y), k, SUBSET_FRACTION, seed)

    bar = tqdm(total=k * REFIT_EPOCHS, desc="model damping: refits", unit="epoch", disable=not ctx.progress)
    margins = refit_margins(task, y, masks, xq, yq, l2=ctx.l2, seed=seed, on_epoch=lambda: bar.update(1))
    bar.close()

    lam, V = np.linalg.eigh(np.asarray(load_array(ctx.paths.array("model_curvature")), np.float64))
    U = embed_inputs(task, xq, yq, record) @ V
    W = subset_sums(load_array(ctx.paths.array("model_train_vectors")), masks) @ V
    top = float(record["top_eigenvalue"])
    grid = damping_grid(top, rule, *(top * r for r in EXTRA_RELATIVE))
    lds, se = calibration_lds(lambda d: spectral_predictions(lam, U, W, d), margins, grid)
    chosen = select_damping(grid, lds)
    calibration = calibration_record(chosen, rule, grid, lds, se, subsets=k, queries=len(queries), seed=seed) | {
        "refit": {"start": "trained model", "epochs": REFIT_EPOCHS, "optimizer": "adam", "lr": REFIT_LR},
        "seconds": time.perf_counter() - t0,
    }
    updated = record | {"damping": chosen, "rule_damping": rule, "damping_calibration": calibration}
    return ManifestPatch(extra={"model": updated})
