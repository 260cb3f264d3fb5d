"""The one top-k kernel: against a full lexicographic sort with many ties, streamed in tiles == one shot, and the
candidate re-scoring rule of explain (stable argsort over sorted ids) == topk_both_signs."""

import numpy as np
import pytest

import influence.topk
from influence import StreamingTopK, merge_topk, select_topk, topk_both_signs


def _reference(scores: np.ndarray, rows: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Positions of the top k of one row by the full sort: key, then the smaller row."""
    return np.lexsort((rows, -scores if largest else scores))[:k]


def test_select_topk_equals_a_full_sort_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        b, c, k = int(rng.integers(1, 5)), int(rng.integers(1, 40)), int(rng.integers(1, 50))
        scores = rng.integers(-3, 4, size=(b, c)).astype(np.float32)  # many ties
        ids = rng.permutation(10 * c)[:c].astype(np.int64)  # unsorted ids
        per_row = np.stack([rng.permutation(ids) for _ in range(b)])
        for largest in (True, False):
            for rows in (ids, per_row):
                got_scores, got_rows = select_topk(scores, rows, k, largest=largest)
                assert got_scores.shape == got_rows.shape == (b, min(k, c))
                for j in range(b):
                    r = rows if rows.ndim == 1 else rows[j]
                    ref = _reference(scores[j], r, k, largest)
                    assert got_rows[j].tolist() == r[ref].tolist()
                    assert np.array_equal(got_scores[j], scores[j][ref])


@pytest.mark.parametrize("seed_columns", [1, 3, 1024])
def test_streaming_in_tiles_equals_one_shot(seed_columns) -> None:
    """Every path of merge_topk: the partial-sort seed, the doubling spans, the threshold merges."""
    rng = np.random.default_rng(seed_columns)
    for _ in range(200):
        b, n, k, c = rng.integers(1, 5), int(rng.integers(1, 60)), int(rng.integers(1, 12)), int(rng.integers(1, 20))
        scores = rng.integers(-5, 6, size=(b, n)).astype(np.float32)
        for largest in (True, False):
            best, stream = None, StreamingTopK(k, largest=largest, seed_columns=seed_columns)
            for start in range(0, n, c):
                tile = scores[:, start : start + c]
                best = merge_topk(best, tile, start, k, largest=largest, seed_columns=seed_columns)
                stream.update(tile, start)
            one_shot = select_topk(scores, np.arange(n), k, largest=largest)
            assert np.array_equal(best[0], one_shot[0]) and np.array_equal(best[1], one_shot[1])
            assert np.array_equal(stream.result[0], one_shot[0]) and np.array_equal(stream.result[1], one_shot[1])
            for j in range(b):
                assert best[1][j].tolist() == _reference(scores[j], np.arange(n), k, largest).tolist()


def test_seed_columns_default_is_read_at_call_time(monkeypatch) -> None:
    monkeypatch.setattr(influence.topk, "SEED_COLUMNS", 2)
    scores = np.random.default_rng(0).normal(size=(3, 50))
    got = merge_topk(None, scores, 0, 4, largest=True)
    want = select_topk(scores, np.arange(50), 4, largest=True)
    assert np.array_equal(got[1], want[1])


def test_topk_both_signs_is_explains_rescoring_rule() -> None:
    """api/index.py at 3b64ee1: cand = np.union1d(...) (sorted ids), np.argsort(-s, kind="stable")[:k] and
    np.argsort(s, kind="stable")[:k]: ties to the smaller id, as topk_both_signs."""
    rng = np.random.default_rng(1)
    for _ in range(100):
        c, k = int(rng.integers(1, 30)), int(rng.integers(1, 40))
        cand = np.union1d(rng.integers(0, 1000, c), rng.integers(0, 1000, c))
        s = rng.integers(-2, 3, size=len(cand)).astype(np.float64)
        (ps, pid), (ns, nid) = topk_both_signs(s[None], cand, k)
        order = np.argsort(-s, kind="stable")
        assert pid[0].tolist() == cand[order[:k]].tolist() and np.array_equal(ps[0], s[order[:k]])
        order = np.argsort(s, kind="stable")
        assert nid[0].tolist() == cand[order[:k]].tolist() and np.array_equal(ns[0], s[order[:k]])


def test_streaming_topk_refuses_out_of_order_tiles_and_bad_k() -> None:
    stream = StreamingTopK(2, largest=True)
    with pytest.raises(ValueError, match="no tile"):
        _ = stream.result
    stream.update(np.ones((1, 4)), 0)
    with pytest.raises(ValueError, match="increasing row order"):
        stream.update(np.ones((1, 4)), 2)
    with pytest.raises(ValueError, match="k must be"):
        StreamingTopK(0, largest=True)
    with pytest.raises(ValueError, match="k must be"):
        select_topk(np.ones((1, 3)), np.arange(3), 0, largest=True)
    with pytest.raises(ValueError, match="must agree"):
        select_topk(np.ones((1, 3)), np.arange(4), 1, largest=True)
