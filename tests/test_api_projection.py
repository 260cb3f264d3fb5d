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
    assert "grad-whitened" in projected.manifest.spaces
    assert projected.manifest.extra["whitened"] == {"model": "ekfac", "damping": projected.manifest.extra["damping"]}
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


def _lissa_scores(index, test_ids):
    """(query vectors x_q [m, p], unprojected train gradients g_i [n, p], exact scores x_q . g_i [m, n])."""
    from api.scorers import scorer_for

    scorer = scorer_for(index.engine, "lissa")
    q, _ = scorer.query_vectors(index.engine.prepare(test_ids, None, None))
    G = np.asarray(scorer.train_vectors(slice(0, len(index.train_ids))), np.float64)
    return np.asarray(q, np.float64), G, q @ G.T


def test_the_whitening_keeps_the_exact_score_without_projection_for_both_models(projected):
    """(K^1/2 x_q) . (K^-1/2 g_i) = x_q . g_i in full space for the run's EK-FAC and for the spectral model of its
    top eigenpairs: only the projection's noise separates the whitened space's estimate from the score."""
    from indexer.training_set import whitening_powers

    q, G, exact = _lissa_scores(projected, [0, 5, 11])
    extra, damping = projected.manifest.extra, projected.manifest.extra["damping"]
    for model in ("ekfac", "spectral"):
        down, up = whitening_powers(projected.run.paths, extra, {"model": model, "damping": damping})
        # float32 eigenvectors (the spectral model's stored U): exact to ~1e-6 of the largest score
        got = np.asarray(up(q)) @ np.asarray(down(G)).T
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-6 * np.abs(exact).max())
    # the engine's query side, deflated along the ReLU rescaling directions, keeps them too (float32 basis)
    down = whitening_powers(projected.run.paths, extra, extra["whitened"])[0]
    got = np.asarray(projected.engine.whitening_half(q)) @ np.asarray(down(G)).T
    np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-5 * np.abs(exact).max())


def test_the_ekfac_whitened_space_estimates_the_scores_better_than_the_spectral_one(projected):
    """P K^1/2 x_q . P K^-1/2 g_i against x_q . g_i over every training row, K the run's EK-FAC (what the build
    stored: the FAISS space's own vectors) or the spectral model of its 16 top eigenpairs (the build's model before
    EK-FAC): the EK-FAC estimate has the lower relative error, both beat raw projected gradients, and the engine's
    query side (K^1/2 x_q deflated along the ReLU rescaling directions, `influence.symmetry`) beats plain EK-FAC."""
    import influence as inf
    from indexer.training_set import whitening_powers

    q, G, exact = _lissa_scores(projected, list(range(20)))
    proj, extra, engine = projected.run.projection, projected.manifest.extra, projected.engine
    stored = np.asarray(projected.run.array("whitened_vectors"), np.float64)
    ekfac_up = whitening_powers(projected.run.paths, extra, extra["whitened"])[1]
    ekfac_est = np.asarray(engine.project(np.asarray(ekfac_up(q))), np.float64) @ stored.T
    deflated_est = np.asarray(engine.project(np.asarray(engine.whitening_half(q))), np.float64) @ stored.T
    down, up = whitening_powers(projected.run.paths, extra, {"model": "spectral", "damping": extra["damping"]})
    z = np.asarray(inf.project(np.asarray(down(G)), seed=proj.seed, d=proj.dim), np.float64)
    spectral_est = np.asarray(engine.project(np.asarray(up(q))), np.float64) @ z.T
    raw_est = (
        np.asarray(engine.project(q), np.float64) @ np.asarray(inf.project(G, seed=proj.seed, d=proj.dim), np.float64).T
    )

    def error(est):
        return float(np.mean(np.linalg.norm(est - exact, axis=1) / np.linalg.norm(exact, axis=1)))

    errors = [error(e) for e in (deflated_est, ekfac_est, spectral_est, raw_est)]
    # measured when written: 2.01 (EK-FAC, deflated), 2.14 (EK-FAC), 2.49 (spectral), 3.92 (raw); 256 of 2,410 dims
    assert errors == sorted(errors), errors
