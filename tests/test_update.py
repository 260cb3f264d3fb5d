"""Incremental maintenance (indexer/update.py): after adds and deletes, results equal a fresh build."""

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from api import build_index, open_index
from indexer import IndexConfig, Task
from indexer.update import add_examples, delete_examples
from store import ConfigMismatchError, MetadataStore, load_manifest, verify_run
from store.vectors import FaissVectorIndex

pytestmark = pytest.mark.slow
CONFIG = IndexConfig(deflation_rank=8)
N0, N_ADD = 1100, 120
DELETED = [5, 77, N0 + 10]


def _task(base: Task, rows: np.ndarray, *, ids: np.ndarray | None = None) -> Task:
    x, y = base.train.tensors
    xt, yt = base.test.tensors
    return Task(
        model=base.model,
        train=TensorDataset(x[rows], y[rows]),
        test=TensorDataset(xt[:40], yt[:40]),
        l2=base.l2,
        train_ids=None if ids is None else ids.tolist(),
    )


@pytest.fixture(scope="module")
def updated_and_fresh(tmp_path_factory, digits_logreg_task):
    base = digits_logreg_task
    x, y = base.train.tensors
    root = tmp_path_factory.mktemp("update")
    task = _task(base, np.arange(N0))
    build_index(task, root / "updated", config=CONFIG, progress=False).close()
    added = add_examples(task, root / "updated", TensorDataset(x[N0 : N0 + N_ADD], y[N0 : N0 + N_ADD]))
    deleted = delete_examples(root / "updated", DELETED)
    final = np.setdiff1d(np.arange(N0 + N_ADD), DELETED)
    build_index(_task(base, final, ids=final), root / "fresh", config=CONFIG, progress=False).close()
    return root / "updated", root / "fresh", added, deleted, final


def test_adds_and_deletes_equal_a_fresh_build(updated_and_fresh):
    updated, fresh, added, deleted, final = updated_and_fresh
    assert added.example_ids == tuple(range(N0, N0 + N_ADD)) and added.n_train == N0 + N_ADD
    assert deleted.example_ids == tuple(DELETED) and deleted.n_train == len(final)
    assert verify_run(updated) == [] and verify_run(fresh) == []
    a, b = open_index(updated), open_index(fresh)
    assert np.array_equal(a.train_ids, final) and np.array_equal(b.train_ids, final)
    test_ids = list(range(12))
    for method in ("exact", "grad-dot", "grad-cos", "representer", "ekfac", "kfac"):
        sa, sb = a.pairwise_scores(test_ids, method=method), b.pairwise_scores(test_ids, method=method)
        np.testing.assert_allclose(sa, sb, rtol=2e-4, atol=2e-5 * np.abs(sb).max(), err_msg=method)
        ea, eb = a.explain(test_ids=test_ids, k=8, method=method), b.explain(test_ids=test_ids, k=8, method=method)
        for x, z in zip(ea, eb, strict=True):
            assert [p.example_id for p in x.proponents] == [p.example_id for p in z.proponents], method
            assert [p.example_id for p in x.opponents] == [p.example_id for p in z.opponents], method
            assert not {p.example_id for p in (*x.proponents, *x.opponents)} & set(DELETED)
    np.testing.assert_allclose(a.engine.top_eigenvalue, b.engine.top_eigenvalue, rtol=1e-6)
    a.close()
    b.close()


def test_faiss_and_sqlite_stay_consistent(updated_and_fresh):
    updated, *_, final = updated_and_fresh
    manifest = load_manifest(updated)
    with MetadataStore(updated / "metadata.sqlite", create=False) as meta:
        assert meta.tombstones("train").tolist() == sorted(DELETED)
        assert np.array_equal(meta.ids("train"), final)
    for space in ("grad", "grad-unit", "representer"):
        index = FaissVectorIndex.load(updated / "vectors" / f"{space}.faiss")
        assert np.array_equal(np.sort(index.ids()), final)
        assert manifest.spaces[space]["ntotal"] == len(final)
    assert [u["op"] for u in manifest.extra["updates"]] == ["add", "delete"]


def test_bad_updates_change_nothing(updated_and_fresh, digits_logreg_task, tmp_path):
    updated, *_ = updated_and_fresh
    before = (updated / "manifest.json").read_bytes()
    x, y = digits_logreg_task.train.tensors
    with pytest.raises(ValueError, match="already deleted"):
        delete_examples(updated, [DELETED[0]])
    with pytest.raises(ValueError, match="not stored"):
        delete_examples(updated, [10**9])
    task = _task(digits_logreg_task, np.arange(N0))
    with pytest.raises(ValueError, match="already used"):
        add_examples(task, updated, TensorDataset(x[:1], y[:1]), ids=[DELETED[1]])  # a tombstoned id
    other = Task(model=torch.nn.Sequential(torch.nn.Linear(64, 10)), train=task.train, test=task.test, l2=task.l2)
    with pytest.raises(ConfigMismatchError, match="fingerprint"):
        add_examples(other, updated, TensorDataset(x[:1], y[:1]))
    assert (updated / "manifest.json").read_bytes() == before
    assert verify_run(updated) == []


def test_verify_reports_a_torn_update(updated_and_fresh, tmp_path):
    import shutil

    updated, *_ = updated_and_fresh
    copy = tmp_path / "copy"
    shutil.copytree(updated, copy)
    index = FaissVectorIndex.load(copy / "vectors" / "grad.faiss")
    index.remove(index.ids()[:1])
    index.save(copy / "vectors" / "grad.faiss")
    problems = verify_run(copy)
    assert any("grad.faiss" in p and "ids differ" in p for p in problems)


def test_add_without_curvature_refresh_notes_staleness(digits_logreg_task, tmp_path):
    x, y = digits_logreg_task.train.tensors
    task = _task(digits_logreg_task, np.arange(300))
    build_index(task, tmp_path / "r", config=IndexConfig(deflation_rank=4, exact_max_params=0), progress=False).close()
    report = add_examples(task, tmp_path / "r", TensorDataset(x[300:330], y[300:330]), refresh_curvature=False)
    assert report.stale == ("curvature",) and report.refreshed == ("representer",)
    assert load_manifest(tmp_path / "r").extra["curvature_stale"] == {"n_train_at_curvature": 300}
    assert verify_run(tmp_path / "r") == []


def test_updates_that_refresh_the_curvature_rebuild_the_query_cache(digits_logreg_task, tmp_path):
    x, y = digits_logreg_task.train.tensors
    task = _task(digits_logreg_task, np.arange(300))
    build_index(task, tmp_path / "r", config=IndexConfig(cache_queries=True), progress=False).close()
    added = add_examples(task, tmp_path / "r", TensorDataset(x[300:330], y[300:330]))
    deleted = delete_examples(tmp_path / "r", [3, 305])
    for report in (added, deleted):
        assert report.refreshed == ("representer", "curvature", "query cache") and report.stale == ()
        assert {"representer_refit", "curvature", "queries", "sqlite"} <= set(report.timings)
    test_ids = list(range(0, 40, 4))
    with open_index(tmp_path / "r") as cached, open_index(tmp_path / "r") as solved:
        assert cached.engine.query_cache is not None  # the cache describes the updated run again
        solved.engine.use_query_cache = False
        for a, b in zip(
            cached.explain(test_ids=test_ids, k=5, method="lissa"),
            solved.explain(test_ids=test_ids, k=5, method="lissa"),
            strict=True,
        ):
            assert a.diagnostics["cached"] == 1.0 and "cached" not in b.diagnostics
            assert [p.example_id for p in a.proponents] == [p.example_id for p in b.proponents]
            np.testing.assert_allclose(
                [p.score for p in a.proponents], [p.score for p in b.proponents], rtol=1e-4, atol=1e-6
            )
    assert verify_run(tmp_path / "r") == []
