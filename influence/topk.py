"""Exact top-k of score matrices, one shot or streamed over column tiles, with one tie rule.

For each row q of scores S [b, c] whose columns are training rows (or example ids) r:

    topk_largest(q)  = the k entries with the largest S[q, r], ordered by (-S[q, r], r)
    topk_smallest(q) = the k entries with the smallest S[q, r], ordered by (S[q, r], r)

Ties go to the smaller row (id): the result is a prefix of the full lexicographic sort, so it does not depend on
how the columns are split into tiles, on the order of arrival, or on the selection algorithm. Streaming keeps a
running top-k per row: a tile's entries can only enter when strictly better than the current k-th (later tiles
hold larger rows, so a tie keeps the earlier row), which costs one comparison pass per tile instead of a sort.
Scores must not be NaN.

Used by the bulk dumps (streamed over training chunks), by re-scoring FAISS candidates (``topk_both_signs``) and
by exact flat searches, so every path returns the same examples in the same order.

Reference: the selection is a partial sort (introselect, Musser 1997, "Introspective Sorting and Selection
Algorithms") followed by a lexicographic sort of the survivors.
"""

from __future__ import annotations

import numpy as np

TopK = tuple[np.ndarray, np.ndarray]
"""(scores [b, k], rows [b, k]) per query row, best first."""

SEED_COLUMNS = 1024
"""Columns of the first tile that seed a running top-k by a partial sort; the rest of the tile is merged in spans
that double in width, so each span brings ~k candidates per row instead of a full sort."""


def select_topk(scores: np.ndarray, rows: np.ndarray, k: int, *, largest: bool) -> TopK:
    """Returns, per row of scores [b, c], the min(k, c) best (scores, rows), best first; ties go to the smaller row.

    Exact with ties: the k-th best key is found by a partial sort, then every entry at least as good is ordered
    by (key, row).

    Args:
        scores: [b, c].
        rows: the training rows (or ids) of the columns, [c] shared by all rows or [b, c].
        k: results per row (>= 1).
        largest: True for the highest scores, False for the lowest.

    Returns:
        (scores [b, min(k, c)], rows [b, min(k, c)]).
    """
    scores = np.asarray(scores)
    rows = np.asarray(rows)
    if scores.ndim != 2 or rows.shape not in ((scores.shape[1],), scores.shape):
        raise ValueError(f"scores [b, c] and rows [c] or [b, c] must agree, got {scores.shape} and {rows.shape}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    b, c = scores.shape
    kk = min(int(k), c)
    if kk == 0:
        return scores[:, :0], np.zeros((b, 0), rows.dtype)
    key = -scores if largest else scores
    kth = np.partition(key, kk - 1, axis=1)[:, kk - 1 : kk] if kk < c else key.max(1, keepdims=True)
    qi, ci = np.divmod(np.flatnonzero(key <= kth), c)  # 1-D flatnonzero: ~6x faster than a 2-D nonzero
    r_all = rows[ci] if rows.ndim == 1 else rows[qi, ci]
    k_all = key[qi, ci]
    order = np.lexsort((r_all, k_all, qi))
    q_sorted = qi[order]
    rank = np.arange(order.size) - np.searchsorted(q_sorted, np.arange(b))[q_sorted]
    keep = order[rank < kk]
    return scores[qi[keep], ci[keep]].reshape(b, kk), r_all[keep].reshape(b, kk)


def merge_topk(
    best: TopK | None,
    scores: np.ndarray,
    start: int,
    k: int,
    *,
    largest: bool,
    seed_columns: int | None = None,
) -> TopK:
    """Merges the scores [b, c] of rows start..start+c-1 into the running top-k (scores, rows) of each row.

    The tiles of one stream must arrive in increasing row order. Once a row holds k results, only entries
    strictly better than its current k-th can enter (one comparison pass). Without k results yet, the first
    max(k, seed_columns) columns are partially sorted and the rest follows in spans as wide as everything seen
    so far (the k-th best of n rows is beaten by ~k of the next n).

    Args:
        best: the running top-k, or None before the first tile.
        scores: the tile [b, c].
        start: the row of the tile's first column.
        k: results per row (>= 1).
        largest: True for the highest scores, False for the lowest.
        seed_columns: columns seeded by a partial sort; None = SEED_COLUMNS.

    Returns:
        the updated running top-k, (scores [b, <= k], rows [b, <= k]) best first.
    """
    seed = SEED_COLUMNS if seed_columns is None else seed_columns
    c = scores.shape[1]
    if best is None or best[0].shape[1] < k:
        m = min(c, max(k, seed))
        new = select_topk(scores[:, :m], np.arange(start, start + m), k, largest=largest)
        if best is not None:
            cat = (np.concatenate([best[0], new[0]], 1), np.concatenate([best[1], new[1]], 1))
            new = select_topk(cat[0], cat[1], k, largest=largest)
        best, seen = new, start + m
        while m < c and best[0].shape[1] == k:
            w = min(seen, c - m)
            best = _merge_full(best, scores[:, m : m + w], start + m, k, largest=largest)
            m, seen = m + w, seen + w
        return best  # m == c here: with columns left, m >= k, so `best` was full and the loop took them
    return _merge_full(best, scores, start, k, largest=largest)


def _merge_full(best: TopK, scores: np.ndarray, start: int, k: int, *, largest: bool) -> TopK:
    """``merge_topk`` for a full running top-k (k columns): candidates strictly better than each k-th."""
    b, c = scores.shape
    kth = best[0][:, -1:]
    qi, ci = np.divmod(np.flatnonzero(scores > kth if largest else scores < kth), c)
    if qi.size == 0:
        return best
    q_all = np.concatenate([np.repeat(np.arange(b), k), qi])
    s_all = np.concatenate([best[0].ravel(), scores[qi, ci]])
    r_all = np.concatenate([best[1].ravel(), start + ci])
    order = np.lexsort((r_all, -s_all if largest else s_all, q_all))
    q_sorted = q_all[order]
    rank = np.arange(order.size) - np.searchsorted(q_sorted, np.arange(b))[q_sorted]
    keep = order[rank < k]
    return s_all[keep].reshape(b, k), r_all[keep].reshape(b, k)


class StreamingTopK:
    """The running top-k of every query row over column tiles that arrive in increasing row order.

    ``update(scores, start)`` per tile, then ``result`` = (scores [b, min(k, n)], rows [b, min(k, n)]), equal to
    ``select_topk`` of the whole [b, n] matrix. seed_columns: see ``merge_topk``.
    """

    def __init__(self, k: int, *, largest: bool, seed_columns: int | None = None) -> None:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        self.k = int(k)
        self.largest = largest
        self.seed_columns = seed_columns
        self.best: TopK | None = None
        self._next = 0

    def update(self, scores: np.ndarray, start: int) -> None:
        """Merges the tile scores [b, c] of rows start..start+c-1 (start at or after the previous tile's end)."""
        scores = np.asarray(scores)
        if scores.ndim != 2:
            raise ValueError(f"scores must have shape [b, c], got {scores.shape}")
        if start < self._next:
            raise ValueError(f"tiles must arrive in increasing row order: start={start} < {self._next}")
        self.best = merge_topk(self.best, scores, start, self.k, largest=self.largest, seed_columns=self.seed_columns)
        self._next = start + scores.shape[1]

    @property
    def result(self) -> TopK:
        """(scores, rows) best first; raises before the first tile."""
        if self.best is None:
            raise ValueError("no tile has been merged yet")
        return self.best


def topk_both_signs(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[TopK, TopK]:
    """Returns the k highest and the k lowest scores per row of scores [m, c] with their ids, ties to the smaller id.

    For re-scoring a candidate set (``Index.explain`` over FAISS candidates) or an exact flat search: the same
    rule as the streamed dumps.

    Args:
        scores: [m, c].
        ids: the example ids of the columns, [c] or [m, c] (need not be sorted).
        k: results per row and sign (>= 1); min(k, c) are returned.

    Returns:
        ((scores [m, kk], ids [m, kk]) highest first, (scores [m, kk], ids [m, kk]) lowest first), kk = min(k, c).
    """
    return select_topk(scores, ids, k, largest=True), select_topk(scores, ids, k, largest=False)
