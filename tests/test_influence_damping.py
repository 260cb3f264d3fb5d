"""The damping calibrated against refits (influence.damping, indexer.calibration): the pieces against float64
references built here (loop gradients, scipy's Spearman), the refits' isolation, and the build stage's record."""

import json

import jax
import numpy as np
import pytest
import scipy.stats

from influence.damping import (
    calibration_lds,
    correct_class_margins,
    damping_grid,
    rank_correlations,
    refit_heads,
    select_damping,
    subset_gradient_sums,
    subset_masks,
)
from influence.head import apply_head
from influence.objective import cross_entropy


def tiny_mlp(rng: np.random.Generator, d: int = 5, hidden: int = 4, c: int = 3):
    spec = [
        {"kind": "linear", "in_features": d, "out_features": hidden, "bias": True},
        {"kind": "tanh"},
        {"kind": "linear", "in_features": hidden, "out_features": c, "bias": True},
    ]
    params = [
        {"weight": rng.normal(size=(hidden, d)), "bias": rng.normal(size=hidden)},
        {},
        {"weight": rng.normal(size=(c, hidden)), "bias": rng.normal(size=c)},
    ]
    return spec, params


def test_subset_masks_are_seeded_halves():
    masks = subset_masks(11, 5, 0.5, seed=3)
    assert masks.shape == (5, 11) and masks.dtype == bool
    assert set(masks.sum(axis=1).tolist()) == {round(0.5 * 11)}
    np.testing.assert_array_equal(masks, subset_masks(11, 5, 0.5, seed=3))
    assert not np.array_equal(masks, subset_masks(11, 5, 0.5, seed=4))
    with pytest.raises(ValueError, match="fraction"):
        subset_masks(11, 5, 1.0, seed=0)
    with pytest.raises(ValueError, match="subsets"):
        subset_masks(11, 2, 0.5, seed=0)


def test_rank_correlations_equal_scipy_spearman():
    rng = np.random.default_rng(0)
    pred, truth = rng.normal(size=(7, 9)), rng.normal(size=(7, 9))
    truth[2, :4] = truth[2, 4]  # ties
    expected = [scipy.stats.spearmanr(pred[j], truth[j])[0] for j in range(7)]
    np.testing.assert_allclose(rank_correlations(pred, truth), expected, rtol=1e-12)
    assert np.isnan(rank_correlations(np.ones((1, 4)), rng.normal(size=(1, 4)))[0])


def test_select_damping_takes_the_best_and_the_smallest_on_ties():
    assert select_damping([0.0, 1e-3, 1e-2, 1e-1], [0.1, 0.4, 0.5, 0.2]) == 1e-2
    assert select_damping([1e-1, 1e-2, 0.0], [0.5, 0.5, np.nan]) == 1e-2
    with pytest.raises(ValueError, match="no finite"):
        select_damping([0.0, 1.0], [np.nan, np.nan])


def test_damping_grid_spans_the_spectrum_and_keeps_the_rule():
    grid = damping_grid(2.0, 0.123)
    assert grid[0] == 0.0 and 0.123 in grid and np.all(np.diff(grid) > 0)
    np.testing.assert_allclose(grid.max(), 2.0 * 0.1)
    np.testing.assert_allclose(grid[1], 2.0 * 1e-5)


def test_correct_class_margins_against_a_loop():
    rng = np.random.default_rng(1)
    z, y = rng.normal(size=(2, 6, 4)), rng.integers(0, 4, size=6)
    expected = np.array([[z[k, j, y[j]] - np.delete(z[k, j], y[j]).max() for j in range(6)] for k in range(2)])
    np.testing.assert_allclose(correct_class_margins(z, y), expected, rtol=1e-12)


@pytest.mark.parametrize("chunk_rows", [3, 64])
def test_subset_gradient_sums_equal_masked_sums_of_per_example_gradients(chunk_rows):
    rng = np.random.default_rng(2)
    spec, params = tiny_mlp(rng)
    h, y = rng.normal(size=(13, 5)), rng.integers(0, 3, size=13)
    masks = subset_masks(13, 4, 0.5, seed=0)

    def loss(layers, hi, yi):
        return cross_entropy(apply_head(spec, layers, hi[None]), yi[None])[0]

    grads = []
    for i in range(13):
        g = jax.grad(loss)(params, h[i], y[i])
        grads.append(np.concatenate([np.ravel(g[j][k]) for j in range(3) for k in sorted(g[j])]))
    expected = masks.astype(np.float64) @ np.array(grads)
    got = subset_gradient_sums(spec, params, h, y, masks, chunk_rows=chunk_rows)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_each_refit_sees_only_its_own_rows():
    """Changing labels outside subset k leaves refit k unchanged; refits reach their target losses."""
    rng = np.random.default_rng(4)
    spec, _ = tiny_mlp(rng)
    h = rng.normal(size=(40, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=40)
    masks = subset_masks(40, 3, 0.5, seed=1)
    targets = np.full(3, 0.3)
    params, epochs = refit_heads(spec, h, y, masks, l2=1e-3, target_losses=targets, seed=0, batch_size=8, lr=1e-2)
    y2 = y.copy()
    y2[~masks[0]] = (y2[~masks[0]] + 1) % 3
    params2, _ = refit_heads(spec, h, y2, masks, l2=1e-3, target_losses=targets, seed=0, batch_size=8, lr=1e-2)
    for a, b in zip(params[0], params2[0], strict=True):
        for key in a:
            np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=1e-6, atol=1e-7)
    assert not np.allclose(np.asarray(params[1][0]["weight"]), np.asarray(params2[1][0]["weight"]))
    for k in range(3):
        rows = masks[k]
        loss = float(np.mean(cross_entropy(apply_head(spec, params[k], h[rows]), y[rows])))
        assert loss <= 0.3 or epochs[k] * 3 >= 3000


def test_calibration_lds_scores_each_damping():
    rng = np.random.default_rng(5)
    truth = rng.normal(size=(20, 8))
    lds, se = calibration_lds(lambda d: truth + d * rng.normal(size=truth.shape), truth, [0.0, 10.0])
    assert lds[0] == pytest.approx(1.0) and lds[1] < 0.5 and se.shape == (2,)


def test_build_records_the_calibrated_damping(digits_mlp_run, digits_logreg_run):
    """The MLP run (hidden layer: calibrated) stores the chosen damping with its evidence; the convex run keeps
    the rule and says why; re-running the stage on the same run chooses the same damping."""
    import dataclasses

    from indexer.calibration import damping_stage
    from indexer.context import BuildContext
    from store import OpenedRun

    manifest = json.loads((digits_mlp_run / "manifest.json").read_text())
    record = manifest["extra"]["damping_calibration"]
    assert record["chosen_by"] == "calibration"
    assert manifest["extra"]["damping"] == record["damping"] == select_damping(record["grid"], record["lds"])
    assert len(record["grid"]) == len(record["lds"]) == len(record["lds_se"]) and record["subsets"] >= 3
    convex = json.loads((digits_logreg_run / "manifest.json").read_text())["extra"]
    assert convex["damping_calibration"]["chosen_by"] == "rule" and "convex" in convex["damping_calibration"]["reason"]

    ctx = BuildContext.for_update(OpenedRun(digits_mlp_run), task=None)
    ctx.manifest = dataclasses.replace(ctx.manifest, extra={**ctx.manifest.extra, "damping": record["rule_damping"]})
    again = damping_stage(ctx).extra["damping_calibration"]
    assert again["damping"] == record["damping"]
    np.testing.assert_allclose(again["lds"], record["lds"], rtol=1e-6)
