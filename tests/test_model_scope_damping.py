"""The damping of a scope="model" run calibrated against warm-started refits (stage "model-damping").

References built here in float64: the grid's predictions equal phi_q^T (C + d I)^-1 sum_{i in S_k} phi_i from dense
solves; the recorded LDS per damping equals the Spearman correlation of those predictions with the refits'
margins; a refit of zero epochs leaves the model's own margins; the task's model is untouched by the refits; the
choice is deterministic for a run and every exact solve of the run uses it.
"""

import copy

import numpy as np
import pytest
import scipy.stats
import torch
from test_model_scope import L2, data, make_task

import influence as inf
from api import build_index, open_index
from indexer import IndexConfig
from indexer.model_calibration import CALIBRATION_SEED, EXTRA_RELATIVE, refit_margins
from influence.damping import correct_class_margins, spectral_predictions, subset_masks
from store import load_array

N_TEST = 12
CONFIG = IndexConfig(damping_subsets=4, damping_queries=N_TEST, project_above=100, layer_projection_dim=4)


@pytest.fixture(scope="module")
def task():
    t = make_task()
    return type(t)(model=t.model, train=t.train, test=data(N_TEST, 2), l2=L2, scope="model")


@pytest.fixture(scope="module")
def run(task, tmp_path_factory):
    before = copy.deepcopy(task.model.state_dict())
    path = tmp_path_factory.mktemp("runs") / "calibrated"
    build_index(task, path, config=CONFIG, progress=False).close()
    after = task.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the refits train copies
    return path


def test_spectral_predictions_equal_dense_solves():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((9, 7))
    A = X.T @ X / 9 + 0.01 * np.eye(7)
    Q, Wraw = rng.standard_normal((3, 7)), rng.standard_normal((5, 7))
    lam, V = np.linalg.eigh(A)
    for d in (0.0, 0.1, 3.0):
        want = Q @ np.linalg.solve(A + d * np.eye(7), Wraw.T)
        np.testing.assert_allclose(spectral_predictions(lam, Q @ V, Wraw @ V, d), want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="eigenvalues \\+ damping must be > 0"):
        spectral_predictions(np.array([-1.0, 1.0]), np.ones((1, 2)), np.ones((1, 2)), 0.5)


def test_zero_epoch_refits_give_the_models_margins(task):
    xs = [x for x, _ in task.test]
    labels = np.array([t for _, t in task.test])
    y = np.array([t for _, t in task.train])
    margins = refit_margins(task, y, subset_masks(len(y), 3, 0.5, 0), xs, labels, l2=L2, seed=0, epochs=0)
    with torch.no_grad():
        own = correct_class_margins(task.model(torch.stack(xs)).numpy(), labels)
    np.testing.assert_allclose(margins, np.repeat(own[:, None], 3, axis=1), rtol=1e-12)


def test_the_chosen_damping_maximises_the_recorded_lds_of_dense_solves(task, run):
    with open_index(run, task=task) as index:
        record = index.run.extra["model"]
        cal = record["damping_calibration"]
        assert cal["chosen_by"] == "calibration" and cal["subsets"] == 4 and cal["queries"] == N_TEST
        top = record["top_eigenvalue"]
        assert record["rule_damping"] == inf.compute_damping(top, L2) == cal["rule_damping"]
        grid = np.array(cal["grid"])
        assert 0.0 in grid and record["rule_damping"] in grid
        np.testing.assert_allclose([top * r for r in EXTRA_RELATIVE], grid[-2:])
        assert record["damping"] == cal["damping"] == grid[np.nanargmax(cal["lds"])]

        # the LDS of every damping from dense solves and the refits' margins, recomputed here
        y = np.array([t for _, t in task.train])
        masks = subset_masks(len(y), 4, 0.5, CALIBRATION_SEED)
        queries = np.sort(np.random.default_rng([CALIBRATION_SEED, 31]).choice(N_TEST, size=N_TEST, replace=False))
        xs = [task.test[int(i)][0] for i in queries]
        labels = np.array([task.test[int(i)][1] for i in queries])
        margins = refit_margins(task, y, masks, xs, labels, l2=L2, seed=CALIBRATION_SEED)
        C = np.asarray(load_array(index.run.paths.array("model_curvature")), np.float64)
        phi = np.asarray(index.run.array("model_train_vectors"), np.float64)
        from indexer.model_stage import embed_inputs

        phi_q = embed_inputs(task, xs, labels, record)
        for d, lds in zip(grid, cal["lds"], strict=True):
            pred = phi_q @ np.linalg.solve(C + d * np.eye(len(C)), (masks.astype(float) @ phi).T)
            rho = [scipy.stats.spearmanr(p, z).statistic for p, z in zip(pred, margins, strict=True)]
            np.testing.assert_allclose(np.nanmean(rho), lds, rtol=1e-6, atol=1e-9)

        # every exact solve of the run uses the chosen damping
        ids = list(range(3))
        got = index.pairwise_scores(ids, method="exact")
    with open_index(run, task=task, lissa=inf.LissaConfig(damping=record["damping"])) as index:
        np.testing.assert_allclose(got, index.pairwise_scores(ids, method="exact"), rtol=1e-10)


def test_the_choice_is_deterministic_and_switched_off_by_damping_subsets_0(task, run, tmp_path):
    build_index(task, tmp_path / "again", config=CONFIG, progress=False).close()
    off = IndexConfig(damping_subsets=0, project_above=100, layer_projection_dim=4)
    build_index(task, tmp_path / "off", config=off, progress=False).close()
    with open_index(run) as a, open_index(tmp_path / "again") as b, open_index(tmp_path / "off") as c:
        assert a.run.extra["model"]["damping_calibration"]["lds"] == b.run.extra["model"]["damping_calibration"]["lds"]
        assert a.run.extra["model"]["damping"] == b.run.extra["model"]["damping"]
        rec = c.run.extra["model"]
        assert rec["damping_calibration"] == {
            "damping": rec["damping"],
            "chosen_by": "rule",
            "reason": "IndexConfig(damping_subsets=0)",
        }
        assert rec["damping"] == inf.compute_damping(rec["top_eigenvalue"], L2)
