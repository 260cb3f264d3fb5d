"""The stored test predictions a training example supports or opposes most: the "why is it suspicious" side
of data cleaning, one training example against every stored test query.

A column of `Index.pairwise_scores(all stored test ids)`: the query vectors of every stored test example
(under ``method``, at its predicted class) are computed once per opened engine and kept on it (an update
that reopens the run drops them); each call then costs one training vector times that matrix.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from store import UnknownExampleError

from .engine import check_k
from .scorers import scorer_for

__all__ = ["AffectedQuery", "ExampleInfluence", "example_influence"]


@dataclasses.dataclass(frozen=True)
class AffectedQuery:
    """A stored test query and the score of the training example on it (> 0 supports, < 0 opposes)."""

    test_id: int
    score: float
    prediction: int
    label: int | None
    preview: str = ""


@dataclasses.dataclass(frozen=True)
class ExampleInfluence:
    """The test predictions a training example supports most (highest scores first) and opposes most
    (lowest first), under ``method``."""

    example_id: int
    method: str
    supports: tuple[AffectedQuery, ...]
    opposes: tuple[AffectedQuery, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _test_side(index: Any, method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int | None]]:
    """Query vectors [m, d], test ids, predictions and labels of every stored test example (cached on the engine)."""
    cache = vars(index.engine).setdefault("_support_queries", {})
    if method not in cache:
        scorer = scorer_for(index.engine, method)
        queries = index.engine.prepare([int(v) for v in index.test_ids], None)
        q, _ = scorer.query_vectors(queries)
        ids = np.asarray(queries.test_ids, np.int64)
        cache[method] = (np.asarray(q), ids, np.asarray(queries.predictions), list(queries.labels))
    return cache[method]


def example_influence(index: Any, example_id: Any, *, k: int = 5, method: str = "lissa") -> ExampleInfluence:
    """The ``k`` stored test predictions ``example_id`` supports most and the ``k`` it opposes most.

    Scores are the example's column of ``index.pairwise_scores(index.test_ids, method=method)``; only positive
    scores support and only negative ones oppose (as in `Index.explain`). Ties: smaller test id first.

    Raises:
        UnknownExampleError: ``example_id`` is not a stored training example.
        ValueError: a bad ``k`` or ``method`` (named in the message), or a run without stored test examples.
    """
    if isinstance(example_id, bool) or not isinstance(example_id, int | np.integer):
        raise ValueError(f"example_id must be an int, got {example_id!r}")
    k = check_k(k)
    scorer = scorer_for(index.engine, method)
    rows = np.flatnonzero(np.asarray(index.train_ids) == int(example_id))
    if len(rows) == 0:
        raise UnknownExampleError("train", [int(example_id)])
    if len(index.test_ids) == 0:
        raise ValueError("the run has no stored test examples to score example_id against")
    q, test_ids, predictions, labels = _test_side(index, method)
    row = int(rows[0])
    column = q @ np.asarray(scorer.train_vectors(slice(row, row + 1)), q.dtype)[0]
    by_high = np.lexsort((test_ids, -column))
    by_low = np.lexsort((test_ids, column))
    picked = [[int(j) for j in by_high[:k] if column[j] > 0], [int(j) for j in by_low[:k] if column[j] < 0]]
    wanted = sorted({int(test_ids[j]) for part in picked for j in part})
    previews = {r.example_id: r.preview for r in index.metadata.get("test", wanted)} if wanted else {}

    def affected(j: int) -> AffectedQuery:
        tid = int(test_ids[j])
        return AffectedQuery(tid, float(column[j]), int(predictions[j]), labels[j], previews.get(tid, ""))

    return ExampleInfluence(
        int(example_id), method, tuple(affected(j) for j in picked[0]), tuple(affected(j) for j in picked[1])
    )
