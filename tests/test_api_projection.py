"""Projected gradient spaces: FAISS gives candidates in the projected space, reported scores stay exact."""

import numpy as np
import pytest

from api import build_index
from indexer import IndexConfig
from store import ProjectionRecord

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def projected(tmp_path_factory, digits_mlp_task):
    config = IndexConfig(project_above=1000, projection_dim=256, exact_max_params=0, deflation_rank=16)
    index = build_index(digits_mlp_task, tmp_path_factory.mktemp("proj") / "run", config=config, progress=False)
    yield index
    index.close()


def test_projection_is_recorded(projected):
    assert projected.run.projection == ProjectionRecord(seed=0, dim=256, n_params=2410)
    assert projected.run.space("grad").dim == 256


@pytest.mark.parametrize("method", ["grad-dot", "grad-cos", "lissa"])
def test_default_candidates_give_the_exact_top_k(projected, method):
    test_ids = [0, 3, 9]
    dense = projected.pairwise_scores(test_ids, method=method)  # exact scores from the cached features
    for exp, row in zip(projected.explain(test_ids=test_ids, k=5, method=method), dense, strict=True):
        top = np.argsort(-row, kind="stable")[:5]
        assert [p.example_id for p in exp.proponents] == top[row[top] > 0].tolist()
        np.testing.assert_allclose([p.score for p in exp.proponents], row[top[: len(exp.proponents)]], rtol=1e-4)
        bottom = np.argsort(row, kind="stable")[:5]
        assert [p.example_id for p in exp.opponents] == bottom[row[bottom] < 0].tolist()


@pytest.mark.parametrize("method", ["grad-dot", "lissa"])
def test_few_candidates_cost_recall_never_score_accuracy(projected, method, monkeypatch):
    monkeypatch.setattr(projected.engine, "min_candidates", 60)  # 100 of 1438 candidates per sign
    test_ids = list(range(10))
    dense = projected.pairwise_scores(test_ids, method=method)
    found = []
    for exp, row in zip(projected.explain(test_ids=test_ids, k=5, method=method), dense, strict=True):
        for group in (exp.proponents, exp.opponents):
            ids = [p.example_id for p in group]
            np.testing.assert_allclose([p.score for p in group], row[ids], rtol=1e-4, atol=1e-7)
        true_top = set(np.argsort(-row, kind="stable")[:5].tolist())
        found.append(len(true_top & {p.example_id for p in exp.proponents}) / 5)
    # 256 Gaussian dims for 2410 parameters: recall@5 from 100 candidates was 0.78 (lissa) when written
    assert np.mean(found) >= 0.7


@pytest.mark.parametrize("method", ["grad-dot", "lissa"])
def test_the_whitened_space_keeps_more_of_the_exact_top_k_than_raw_projected_gradients(projected, method, monkeypatch):
    """Candidates from P M^1/2 q . P M^-1/2 g_i (space "grad-whitened") against P q . P g_i ("grad"), with the
    same small budget; the reported scores are exact either way."""
    assert "grad-whitened" in projected.manifest.spaces and projected.manifest.extra["whitened"]["rank"] == 16
    monkeypatch.setattr(projected.engine, "min_candidates", 30)
    test_ids = list(range(20))
    dense = projected.pairwise_scores(test_ids, method=method)
    recall = {}
    for whitened in (False, True):
        monkeypatch.setattr(projected.engine, "use_whitened_space", whitened)
        found = []
        for exp, row in zip(projected.explain(test_ids=test_ids, k=5, method=method), dense, strict=True):
            np.testing.assert_allclose(
                [p.score for p in exp.proponents], row[[p.example_id for p in exp.proponents]], rtol=1e-4, atol=1e-7
            )
            for group, order in ((exp.proponents, -row), (exp.opponents, row)):
                true = set(np.argsort(order, kind="stable")[:5].tolist())
                found.append(len(true & {p.example_id for p in group}) / 5)
        recall[whitened] = float(np.mean(found))
    # with the build's calibrated damping (larger than the old rule's 0) lissa's query solve is closer to the raw
    # gradient and the two spaces come within one hit of 200 (0.935 vs 0.945 for lissa when measured)
    assert recall[True] >= recall[False] - 0.015, recall
