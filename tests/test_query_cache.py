"""The build's query cache (`IndexConfig(cache_queries=True)`, stage "queries", `indexer.queries`).

Cached LiSSA vectors must equal the un-cached LiSSA path (same recursion, float rounding apart) and the dense
float64 solve to the LiSSA tolerance, with both operators ("dense" eigendecomposition, "data" training-set
product); the stage resumes after an interruption; a changed run or other LiSSA options fall back to solving.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from torch.utils.data import TensorDataset

import indexer.queries as queries
import influence as inf
from api import build_index, open_index
from api.engine import Engine, Queries
from api.scorers import scorer_for
from indexer import IndexConfig, Task
from indexer.update import add_examples, delete_examples
from store import ConfigMismatchError

TEST_IDS = list(range(0, 360, 9))


def build(task, path, **config) -> None:
    build_index(task, path, config=IndexConfig(cache_queries=True, **config), progress=False).close()


@pytest.fixture(scope="module")
def cached_runs(tmp_path_factory, digits_logreg_task):
    root = tmp_path_factory.mktemp("query-cache")
    build(digits_logreg_task, root / "dense")
    build(digits_logreg_task, root / "data", exact_max_params=0)
    return root


def stored_query(index, ids):
    queries = index.engine.prepare(ids, None, None)
    return queries.h, queries.targets, queries.test_rows


def lissa_vectors(index, h, targets, test_rows=None):
    """The lissa scorer's query vectors; with `test_rows` the queries are the stored test examples at those rows."""
    queries = Queries(h, index.engine.logits(h), targets, [None] * len(h), [None] * len(h), test_rows)
    return scorer_for(index.engine, "lissa").query_vectors(queries)


@pytest.mark.parametrize("operator", ["dense", "data"])
def test_cached_vectors_equal_uncached_lissa_and_the_dense_solve(cached_runs, operator):
    index = open_index(cached_runs / operator)
    assert index.manifest.extra["query_cache"]["operator"] == operator
    assert index.engine.query_cache is not None
    h, tgt, rows = stored_query(index, TEST_IDS)
    cached, diag = lissa_vectors(index, h, tgt, test_rows=rows)
    assert diag["cached"] == 1.0
    uncached, diag_solved = lissa_vectors(index, h, tgt)
    assert "cached" not in diag_solved
    # same recursion, same depth / scale / damping: equal up to float32 rounding of two operators
    rel = np.linalg.norm(cached - uncached, axis=1) / np.linalg.norm(uncached, axis=1)
    assert rel.max() <= 1e-4, rel.max()
    # and the LiSSA answer to its tolerance, against the float64 dense solve
    g = index.engine.gradients(h, tgt).astype(np.float64)
    reference = open_index(cached_runs / "dense")
    exact = reference.engine.eigen_solver.solve(g, damping=reference.engine.damping)
    assert reference.engine.damping == index.engine.damping
    rel_exact = np.linalg.norm(cached - exact, axis=1) / np.linalg.norm(exact, axis=1)
    assert rel_exact.max() <= index.engine.lissa_config.tol, rel_exact.max()
    reference.close()
    index.close()


def test_explain_reads_the_cache_and_gives_the_uncached_answer(cached_runs):
    with open_index(cached_runs / "dense") as cached, open_index(cached_runs / "dense") as uncached:
        uncached.engine.use_query_cache = False  # the same run, solving at query time
        fast = cached.explain(test_ids=TEST_IDS, k=10, method="lissa")
        slow = uncached.explain(test_ids=TEST_IDS, k=10, method="lissa")
        dense = uncached.pairwise_scores(TEST_IDS, method="exact")
        for a, b, row in zip(fast, slow, dense, strict=True):
            assert a.diagnostics["cached"] == 1.0 and "cached" not in b.diagnostics
            assert [p.example_id for p in a.proponents][:5] == [p.example_id for p in b.proponents][:5]
            np.testing.assert_allclose(
                [p.score for p in a.proponents], [p.score for p in b.proponents], rtol=1e-4, atol=1e-6
            )
            np.testing.assert_allclose(
                [p.score for p in a.opponents], [p.score for p in b.opponents], rtol=1e-4, atol=1e-6
            )
            exact = row[[p.example_id for p in a.proponents]]
            np.testing.assert_allclose([p.score for p in a.proponents], exact, rtol=1e-2)


def test_a_lissa_dump_reads_the_cache(cached_runs, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    with open_index(cached_runs / "dense") as index:
        expected = index.explain(test_ids=TEST_IDS[:6], k=3, method="lissa")

        def no_solve(*args, **kwargs):
            raise AssertionError("the dump solved LiSSA although every query is in the cache")

        monkeypatch.setattr(Engine, "solve", no_solve)
        out = index.dump(tmp_path / "d.parquet", TEST_IDS[:6], k=3, method="lissa", progress=False)
    rows = pq.read_table(out).to_pylist()
    for exp in expected:
        got = sorted((r for r in rows if r["test_id"] == exp.test_id and r["score"] > 0), key=lambda r: r["rank"])
        assert [r["example_id"] for r in got] == [p.example_id for p in exp.proponents]


def test_other_targets_and_raw_inputs_are_solved(cached_runs, digits_logreg_task):
    with open_index(cached_runs / "dense", task=digits_logreg_task) as index:
        h, tgt, rows = stored_query(index, TEST_IDS[:4])
        other = (tgt + 1) % index.n_classes
        mixed = np.where(np.arange(4) % 2 == 0, tgt, other)
        q, diag = lissa_vectors(index, h, mixed, test_rows=rows)
        assert diag["cached"] == 0.5 and "depth" in diag
        solved, _ = lissa_vectors(index, h, mixed)
        rel = np.linalg.norm(q - solved, axis=1) / np.linalg.norm(solved, axis=1)
        assert rel.max() <= 1e-4
        x = digits_logreg_task.test[TEST_IDS[0]][0][None]
        [exp] = index.explain(inputs=x.numpy(), k=5, method="lissa")
        assert "cached" not in exp.diagnostics


def test_other_lissa_options_or_a_changed_run_fall_back(cached_runs):
    with open_index(cached_runs / "dense", lissa=inf.LissaConfig(tol=1e-3)) as index:
        assert index.engine.query_cache is None
        [exp] = index.explain(test_ids=[0], k=3, method="lissa")
        assert "cached" not in exp.diagnostics
    with open_index(cached_runs / "dense") as index:
        record = index.manifest.extra["query_cache"]
        engine = index.engine

        def key(labels):
            return queries.query_cache_key(
                index.train_ids,
                labels,
                len(index.run.train.features),
                engine.top_eigenvalue,
                engine.deflation[0],
                l2=index.run.l2,
                damping=engine.damping,
                lissa=dataclasses.replace(engine.lissa_config, damping=engine.damping),
            )

        assert record["key"] == key(index.run.train.labels)
        labels = index.run.train.labels.copy()
        labels[0] = (labels[0] + 1) % index.n_classes
        changed = key(labels)
        assert changed != record["key"]


@pytest.mark.slow
def test_the_stage_resumes_after_an_interruption(digits_logreg_task, tmp_path, monkeypatch, cached_runs):
    calls = {"n": 0}
    solve = inf.HeadCurvature.run_iterative  # one call per block of right-hand sides

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed during the second block")
        return solve(*args, **kwargs)

    monkeypatch.setattr(inf.HeadCurvature, "run_iterative", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(digits_logreg_task, tmp_path / "run")
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert "queries" not in manifest["stages"] and "tracin" in manifest["stages"]
    calls["n"] = 10  # no more interruptions; count the blocks solved on resume
    build(digits_logreg_task, tmp_path / "run")
    assert calls["n"] == 11  # 360 test rows = 2 blocks of 256: only the missing one is solved again
    with open_index(tmp_path / "run") as resumed, open_index(cached_runs / "dense") as whole:
        a, b = resumed.engine.query_cache, whole.engine.query_cache
        assert a is not None and b is not None
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6 * np.abs(b[0]).max())


def test_config_is_checked_and_old_runs_resume(digits_logreg_task, cached_runs, tmp_path):
    with pytest.raises(ValueError, match=r"cache_queries must be a bool, got 'yes'"):
        IndexConfig(cache_queries="yes")
    path = tmp_path / "old"
    shutil.copytree(cached_runs / "dense", path)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["methods"]["cache_queries"]  # a run written before the option existed holds its default
    (path / "manifest.json").write_text(json.dumps(manifest))
    build_index(digits_logreg_task, path, progress=False).close()
    with pytest.raises(ConfigMismatchError, match="another config"):
        build(digits_logreg_task, path)


@pytest.mark.slow
def test_an_incremental_update_invalidates_the_cache(digits_logreg_task, tmp_path):
    base = digits_logreg_task
    x, y = base.train.tensors
    n0 = len(x) - 20
    task = Task(model=base.model, train=TensorDataset(x[:n0], y[:n0]), test=base.test, l2=base.l2)
    build(task, tmp_path / "run")
    with open_index(tmp_path / "run") as index:
        assert index.engine.query_cache is not None
        [before] = index.explain(test_ids=[3], k=3)
        assert before.diagnostics["cached"] == 1.0
    # the fast path keeps the stored curvature: only the training set (and so the LiSSA operator) changes
    add_examples(
        task, tmp_path / "run", TensorDataset(x[n0:], y[n0:]), refresh_curvature=False, refresh_representer=False
    )
    with open_index(tmp_path / "run") as index:
        assert index.engine.query_cache is None
        [after] = index.explain(test_ids=[3], k=3)
        assert "cached" not in after.diagnostics
    delete_examples(tmp_path / "run", [0, 1], refresh_curvature=False)
    with open_index(tmp_path / "run") as index:
        assert index.engine.query_cache is None
