"""Contract tests run against every vector index, plus FAISS persistence and approximate recall."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from store.errors import CorruptRunError, RunNotFoundError
from store.vectors import (
    FaissVectorIndex,
    Hits,
    NumpyVectorIndex,
    VectorIndex,
    search_both_signs,
)

DIM = 12
N = 300

Factory = Callable[[int], VectorIndex]
FACTORIES: dict[str, Factory] = {
    "numpy": NumpyVectorIndex,
    "faiss": lambda dim: FaissVectorIndex.create(dim),
}


@pytest.fixture(params=sorted(FACTORIES))
def make_index(request: pytest.FixtureRequest) -> Factory:
    return FACTORIES[request.param]


def _data(seed: int = 0, n: int = N, dim: int = DIM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)  # sparse, unordered ids
    queries = rng.standard_normal((7, dim)).astype(np.float32)
    return vectors, ids, queries


def _brute_force(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> list[Hits]:
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    out = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[:k]
        out.append(Hits(ids[order], row[order]))
    return out


def _assert_hits_match(got: list[Hits], want: list[Hits]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.ids.dtype == np.int64 and g.scores.dtype == np.float32
        np.testing.assert_array_equal(g.ids, w.ids)
        np.testing.assert_allclose(g.scores, w.scores, rtol=1e-5, atol=1e-5)


class TestVectorIndexContract:
    """Every VectorIndex implementation must pass these."""

    def test_is_a_vector_index(self, make_index: Factory) -> None:
        index = make_index(DIM)
        assert isinstance(index, VectorIndex)
        assert index.dim == DIM and index.ntotal == 0

    def test_search_equals_brute_force(self, make_index: Factory) -> None:
        vectors, ids, queries = _data()
        index = make_index(DIM)
        index.add(vectors[:100], ids[:100])
        index.add(vectors[100:], ids[100:])
        assert index.ntotal == N
        np.testing.assert_array_equal(index.ids(), ids)
        _assert_hits_match(index.search(queries, 10), _brute_force(vectors, ids, queries, 10))

    def test_both_signs_are_highest_and_lowest(self, make_index: Factory) -> None:
        vectors, ids, queries = _data(1)
        index = make_index(DIM)
        index.add(vectors, ids)
        top, bottom = search_both_signs(index, queries, 5)
        truth = queries.astype(np.float64) @ vectors.astype(np.float64).T
        for q, (t, b) in enumerate(zip(top, bottom, strict=True)):
            order = np.argsort(truth[q], kind="stable")
            np.testing.assert_array_equal(t.ids, ids[order[::-1][:5]])
            np.testing.assert_array_equal(b.ids, ids[order[:5]])
            # Opponent scores are the true (negative) inner products, lowest first.
            np.testing.assert_allclose(b.scores, truth[q, order[:5]], rtol=1e-5)
            assert np.all(np.diff(b.scores) >= 0) and np.all(np.diff(t.scores) <= 0)
            assert b.scores[0] < 0 < t.scores[0]

    def test_k_larger_than_ntotal_is_clipped(self, make_index: Factory) -> None:
        vectors, ids, queries = _data(2, n=4)
        index = make_index(DIM)
        index.add(vectors, ids)
        hits = index.search(queries[:2], 50)
        assert [len(h) for h in hits] == [4, 4]
        assert set(hits[0].ids.tolist()) == set(ids.tolist())

    def test_empty_index_returns_empty_hits(self, make_index: Factory) -> None:
        _, _, queries = _data()
        hits = make_index(DIM).search(queries[:3], 5)
        assert [len(h) for h in hits] == [0, 0, 0]

    def test_float64_is_converted(self, make_index: Factory) -> None:
        vectors, ids, queries = _data(3)
        index = make_index(DIM)
        index.add(vectors.astype(np.float64), ids)
        _assert_hits_match(index.search(queries.astype(np.float64), 3), _brute_force(vectors, ids, queries, 3))

    @pytest.mark.parametrize(
        ("argument", "mutate"),
        [
            ("vectors", lambda v, i: (np.where(np.arange(v.size).reshape(v.shape) == 5, np.nan, v), i)),
            ("vectors", lambda v, i: (np.where(np.arange(v.size).reshape(v.shape) == 5, np.inf, v), i)),
            ("vectors", lambda v, i: (v[:, :-1], i)),
            ("vectors", lambda v, i: (v.astype(np.int32), i)),
            ("vectors", lambda v, i: (v[0], i[:1])),
            ("ids", lambda v, i: (v, np.concatenate([i[:-1], i[:1]]))),
            ("ids", lambda v, i: (v, i.astype(np.float32))),
            ("ids", lambda v, i: (v, i[:-1])),
            ("ids", lambda v, i: (v, -i - 1)),
        ],
    )
    def test_bad_add_raises_naming_argument(self, make_index: Factory, argument: str, mutate) -> None:
        vectors, ids, _ = _data(4, n=10)
        index = make_index(DIM)
        bad_vectors, bad_ids = mutate(vectors, ids)
        with pytest.raises(ValueError, match=argument):
            index.add(bad_vectors, bad_ids)
        assert index.ntotal == 0

    def test_ids_already_present_are_refused(self, make_index: Factory) -> None:
        vectors, ids, _ = _data(5, n=10)
        index = make_index(DIM)
        index.add(vectors, ids)
        with pytest.raises(ValueError, match=rf"ids.*{ids[3]}"):
            index.add(vectors[3:4], ids[3:4])
        assert index.ntotal == 10

    @pytest.mark.parametrize(
        ("argument", "queries", "k"),
        [
            ("queries", np.full((1, DIM), np.nan, np.float32), 3),
            ("queries", np.ones((1, DIM + 1), np.float32), 3),
            ("queries", np.ones((1, DIM), np.int64), 3),
            ("queries", np.ones(DIM, np.float32), 3),
            ("k", np.ones((1, DIM), np.float32), 0),
            ("k", np.ones((1, DIM), np.float32), -2),
            ("k", np.ones((1, DIM), np.float32), 2.5),
        ],
    )
    def test_bad_search_raises_naming_argument(
        self, make_index: Factory, argument: str, queries: np.ndarray, k: int
    ) -> None:
        vectors, ids, _ = _data(6, n=10)
        index = make_index(DIM)
        index.add(vectors, ids)
        with pytest.raises(ValueError, match=rf"^{argument}:"):
            index.search(queries, k)


def test_numpy_ties_go_to_smaller_id() -> None:
    index = NumpyVectorIndex(2)
    index.add(np.ones((4, 2), np.float32), np.array([9, 3, 7, 1]))
    np.testing.assert_array_equal(index.search(np.ones((1, 2), np.float32), 4)[0].ids, [1, 3, 7, 9])


@pytest.mark.parametrize("mmap", [False, True])
def test_faiss_save_load_gives_identical_results(tmp_path: Path, mmap: bool) -> None:
    vectors, ids, queries = _data(7)
    index = FaissVectorIndex.create(DIM)
    index.add(vectors, ids)
    path = tmp_path / "vectors" / "grad.faiss"
    index.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["grad.faiss"]  # no temp file left

    loaded = FaissVectorIndex.load(path, mmap=mmap)
    assert (loaded.dim, loaded.ntotal) == (DIM, N)
    np.testing.assert_array_equal(loaded.ids(), ids)
    for a, b in zip(index.search(queries, 20), loaded.search(queries, 20), strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.scores, b.scores)
    if mmap:
        with pytest.raises(ValueError, match="read-only"):
            loaded.add(vectors[:1], np.array([10**9]))


def test_faiss_load_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(RunNotFoundError, match=r"nope.faiss"):
        FaissVectorIndex.load(tmp_path / "nope.faiss")
    bad = tmp_path / "bad.faiss"
    bad.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(CorruptRunError, match=r"bad.faiss"):
        FaissVectorIndex.load(bad)
    # A valid FAISS file that is not an IndexIDMap2 is refused too.
    import faiss

    plain = tmp_path / "plain.faiss"
    faiss.write_index(faiss.IndexFlatIP(DIM), str(plain))
    with pytest.raises(CorruptRunError, match=r"plain.faiss"):
        FaissVectorIndex.load(plain)


def test_faiss_ivf_recall_against_exact() -> None:
    rng = np.random.default_rng(8)
    dim, n_clusters = 32, 40
    centers = rng.standard_normal((n_clusters, dim)).astype(np.float32) * 3
    assign = rng.integers(0, n_clusters, size=4000)
    vectors = (centers[assign] + rng.standard_normal((4000, dim))).astype(np.float32)
    ids = np.arange(4000, dtype=np.int64) * 2
    queries = (centers[rng.integers(0, n_clusters, 50)] + rng.standard_normal((50, dim))).astype(np.float32)

    exact = FaissVectorIndex.create(dim)
    exact.add(vectors, ids)
    approx = FaissVectorIndex.create(dim, factory="IVF16,Flat")
    with pytest.raises(ValueError, match="train"):
        approx.add(vectors, ids)
    approx.train(vectors)
    approx.add(vectors, ids)
    approx.set_nprobe(8)

    recalls = [
        len(np.intersect1d(a.ids, e.ids)) / 10
        for a, e in zip(approx.search(queries, 10), exact.search(queries, 10), strict=True)
    ]
    assert np.mean(recalls) >= 0.9


def test_create_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dim"):
        FaissVectorIndex.create(0)
    with pytest.raises(ValueError, match="factory"):
        FaissVectorIndex.create(8, factory="NotAnIndex,,")
    with pytest.raises(ValueError, match="nprobe"):
        FaissVectorIndex.create(8).set_nprobe(4)


def test_hits_are_read_only() -> None:
    hits = Hits(np.array([1, 2]), np.array([0.5, 0.25]))
    assert hits.ids.dtype == np.int64 and hits.scores.dtype == np.float32
    with pytest.raises(ValueError):
        hits.ids[0] = 7
    assert hits.to_dict() == {"ids": [1, 2], "scores": [0.5, 0.25]}


def test_faiss_reconstruct() -> None:
    vectors, ids, _ = _data(9, n=20)
    index = FaissVectorIndex.create(DIM)
    index.add(vectors, ids)
    np.testing.assert_array_equal(index.reconstruct(ids[[4, 0]]), vectors[[4, 0]])
    with pytest.raises(ValueError, match="ids"):
        index.reconstruct(np.array([10**9]))


# ------------------------------------------------------------------ approximate indexes, recall, mmap, remove
def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(32, dim))
    return (centres[rng.integers(0, 32, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def test_compute_recall_counts_the_overlap():
    from store.vectors import compute_recall

    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 9, 1], [8, -1, -1, -1]])
    assert compute_recall(exact, approx) == pytest.approx((3 / 4 + 1 / 4) / 2)
    with pytest.raises(ValueError, match="exact, approx"):
        compute_recall(exact, approx[0])


def test_resolve_factory_fills_in_the_list_count():
    from store.vectors import resolve_factory

    assert resolve_factory("IVF,PQ8", 100_000) == "IVF1264,PQ8"
    assert resolve_factory("IVF,PQ8", 10_000) == "IVF256,PQ8"  # >= 39 training vectors per list
    assert resolve_factory("IVF,Flat", 100) == "IVF2,Flat"
    assert resolve_factory("HNSW32", 10) == "HNSW32"
    with pytest.raises(ValueError, match="factory"):
        resolve_factory("", 10)


@pytest.mark.parametrize("factory", ["Flat", "IVF,Flat", "IVF,SQfp16", "SQfp16", "HNSW16", "IVF,PQ8x4"])
def test_built_index_records_the_recall_it_reaches(tmp_path, factory):
    from store.vectors import build_vector_index, exact_neighbours, measure_recall

    data = _clustered(4200, 16)
    x, queries = data[:4000], np.concatenate([data[4000:], -data[4000:]])  # proponents and opponents
    ids = np.arange(4000, dtype=np.int64) * 3 + 1
    index, spec = build_vector_index(x, ids, factory=factory, n_queries=100)
    assert spec["ntotal"] == 4000 and spec["dim"] == 16 and spec["metric"] == "ip"
    # PQ codes and HNSW graphs on inner products can fall short of the target: recorded, not promised
    promised = factory in ("Flat", "IVF,Flat", "IVF,SQfp16", "SQfp16")
    if promised:
        assert spec["recall@10"] >= 0.95
    assert 0.3 < spec["recall@10"] <= 1.0
    if factory.startswith("IVF"):
        assert spec["nprobe"] >= 1 and spec["factory"].startswith("IVF102,")
    if factory.startswith("HNSW"):
        assert spec["ef_search"] >= 10
    index.save(tmp_path / "v.faiss")
    # the tuned search breadth is saved with the index: fresh queries on the reloaded index reach the recall
    loaded = FaissVectorIndex.load(tmp_path / "v.faiss", mmap=True)
    recall = measure_recall(loaded, queries, exact_neighbours(x, ids, queries, 10))
    assert recall == pytest.approx(spec["recall@10"], abs=0.08) or (promised and recall >= 0.95)


def test_float16_storage_halves_the_file(tmp_path):
    from store.vectors import build_vector_index

    x = _clustered(3000, 64)
    for factory in ("Flat", "SQfp16"):
        index, _ = build_vector_index(x, np.arange(3000), factory=factory)
        index.save(tmp_path / f"{factory}.faiss")
    ratio = (tmp_path / "SQfp16.faiss").stat().st_size / (tmp_path / "Flat.faiss").stat().st_size
    assert 0.5 < ratio < 0.6  # 2 of 4 bytes per value, plus the 8-byte ids


def test_bad_factory_is_named():
    from store.vectors import build_vector_index

    with pytest.raises(ValueError, match="factory: FAISS cannot build 'IVFnope'"):
        build_vector_index(_clustered(100, 8), np.arange(100), factory="IVFnope")


def test_mmap_auto_and_read_only_refuses_changes(tmp_path):
    x = _clustered(500, 8)
    index = FaissVectorIndex.create(8)
    index.add(x, np.arange(500))
    index.save(tmp_path / "v.faiss")
    assert not FaissVectorIndex.load(tmp_path / "v.faiss", mmap="auto").read_only  # small next to RAM
    mapped = FaissVectorIndex.load(tmp_path / "v.faiss", mmap=True)
    assert mapped.read_only
    with pytest.raises(ValueError, match="read-only"):
        mapped.remove(np.array([1]))
    with pytest.raises(ValueError, match="mmap"):
        FaissVectorIndex.load(tmp_path / "v.faiss", mmap="sometimes")


def test_remove_drops_ids_from_results():
    from store.vectors import build_vector_index

    x = _clustered(600, 8)
    for factory in ("Flat", "IVF,Flat"):
        index, _ = build_vector_index(x, np.arange(600), factory=factory)
        top = index.search(x[:1], 5)[0].ids
        assert index.remove(top[:2]) == 2
        assert index.ntotal == 598 and not np.isin(top[:2], index.ids()).any()
        assert not np.isin(top[:2], index.search(x[:1], 5)[0].ids).any()
        with pytest.raises(ValueError, match="not in the index"):
            index.remove(top[:1])
    hnsw, _ = build_vector_index(x, np.arange(600), factory="HNSW16")
    assert not hnsw.supports_remove
    with pytest.raises(ValueError, match="cannot remove"):
        hnsw.remove(np.array([3]))


def test_one_pass_both_signs_equals_two_faiss_searches(tmp_path):
    x = _clustered(3000, 16)
    index = FaissVectorIndex.create(16)
    index.add(x, np.arange(3000) * 7)
    assert index.flat_vectors() is not None
    queries = _clustered(20, 16, seed=5)
    one_pass = search_both_signs(index, queries[:3], 8)  # <= ONE_PASS_MAX_QUERIES: one read of the vectors
    top, bottom = index.search(queries[:3], 8), index.search(-queries[:3], 8)
    for a, b in zip(one_pass[0], top, strict=True):
        assert a.ids.tolist() == b.ids.tolist()
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
    for a, b in zip(one_pass[1], bottom, strict=True):
        assert a.ids.tolist() == b.ids.tolist()
        np.testing.assert_allclose(a.scores, -b.scores, rtol=1e-5)
    index.remove(one_pass[0][0].ids[:2])  # the view follows removals
    again = search_both_signs(index, queries[:1], 8)[0][0]
    assert again.ids.tolist()[:6] == one_pass[0][0].ids.tolist()[2:]


def test_max_train_trains_on_a_sample():
    from store.vectors import build_vector_index

    x = _clustered(3000, 8)
    index, spec = build_vector_index(x, np.arange(3000), factory="IVF16,Flat", max_train=16 * 39)
    assert index.ntotal == 3000 and spec["recall@10"] >= 0.95
