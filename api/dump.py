"""Bulk influence dumps: scores of many queries against the whole training set, streamed to disk.

For each block of queries the query-side vectors q_j are computed once (the method's scorer, `api.scorers`) and
the scores `S = Q G^T` against its train-side vectors G are formed one train chunk at a time, so memory is bounded by
`block_size x train_chunk` scores: a dense `n_test x n_train` matrix is never held. Per block the dump keeps

- the top-k proponents (highest positive scores) and opponents (lowest negative scores) of each query, kept
  by the streaming kernel `influence.StreamingTopK` (ties go to the smaller training row, as in `explain`) and
  written as one Parquet part file (one row per kept (query, training example) pair);
- optionally the dense block `S`, written into one on-disk memmap `<stem>.dense.npy` `[n_queries, n_train]`;
- per-training-example aggregates over the queries: sums of positive and of negative scores, how often the
  example is a top-k proponent / opponent, and the same restricted to misclassified queries. The "examples
  that hurt the most predictions" list for data cleaning (`read_aggregates(path)`, `store.harmful_column`) is
  `n_top_proponent_misclassified`: a misclassified query scored at its (wrong) prediction is pushed there by
  its proponents (with `targets="label"`, by the opponents of its true label: `n_top_opponent_misclassified`).

Resumable: work happens in `<path>.partial/`; after each block its part file (and dense rows) are made durable
and then the aggregate accumulators are written atomically together with the number of finished blocks, which
is the commit point. A re-call with the same arguments after a kill (even SIGKILL) continues from the last
committed block and produces the same files. Finished outputs appear atomically: `<path>` (top-k, Parquet),
`<stem>.aggregates.parquet` and, with `dense=True`, `<stem>.dense.npy` plus `<stem>.dense-ids.npz`.

The scores are exact: non-projected gradient spaces use the stored per-example gradients, projected ones
recompute each training gradient from the cached features, representer scores use alpha_ic phi_i . phi_q.
This module is the orchestration and the math; every file of the dump is written by `store.dumps`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import influence as inf
from store import (
    AGGREGATE_COLUMNS,
    TOPK_COLUMNS,
    DumpWork,
    UnknownExampleError,
    dump_paths,
    new_accumulators,
    read_aggregates,
)

from .engine import check_k
from .ray_cluster import ray_session
from .scorers import check_method, scorer_for

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["AGGREGATE_COLUMNS", "TOPK_COLUMNS", "dump", "dump_paths", "read_aggregates", "topk_columns"]

DUMP_FORMAT = 1
#: scores per (block x train chunk) tile; bounds the dump's working memory (~ 4 bytes each, a few copies)
TILE_SCORES = 16_777_216

OnBlock = Callable[[int, int], None]


def topk_columns(
    block: np.ndarray,
    pos: tuple[np.ndarray, np.ndarray],
    neg: tuple[np.ndarray, np.ndarray],
    train_ids: np.ndarray,
    train_labels: np.ndarray,
    method: str,
) -> dict[str, Any]:
    """The top-k file's columns (TOPK_COLUMNS) of one block: per query its proponents (score > 0), then its
    opponents (score < 0), each by rank.

    Args:
        block: The block's test ids [b].
        pos: The running top-k of the highest scores, (scores [b, k], train rows [b, k]) best first.
        neg: The same for the lowest scores.
        train_ids: Example id of each train row [n_train].
        train_labels: Label of each train row [n_train].
        method: The method's name, repeated in every row.
    """
    k = pos[0].shape[1]
    # [b, 2, k]: the kinds of one query are adjacent, proponents first; masks drop the wrong-signed entries
    score = np.stack([pos[0], neg[0]], 1)
    row = np.stack([pos[1], neg[1]], 1)
    keep = np.stack([pos[0] > 0, neg[0] < 0], 1)
    rank = np.broadcast_to(np.arange(1, k + 1, dtype=np.int32), keep.shape)  # wrong-signed entries come last
    kind = np.broadcast_to(np.array([0, 1])[None, :, None], keep.shape)
    test_id = np.broadcast_to(np.asarray(block, np.int64)[:, None, None], keep.shape)
    rows = row[keep]
    return {
        "test_id": test_id[keep],
        "kind": np.array(["proponent", "opponent"])[kind[keep]],
        "rank": rank[keep],
        "example_id": train_ids[rows],
        "score": score[keep],
        "label": np.asarray(train_labels[rows], np.int64),
        "method": np.full(len(rows), method),
    }


def _fingerprint(
    engine: Engine, ids: np.ndarray, k: int, method: str, block_size: int, dense: bool, targets: str | None
) -> str:
    """What makes two dumps the same: the run (path, model, build time, training ids), the queries and options."""
    h = hashlib.sha256()
    run = engine.run
    m = run.manifest
    desc = {
        "format": DUMP_FORMAT,
        "run": str(Path(run.paths.root).resolve()),
        "model": m.model_fingerprint,
        "created_at": m.created_at,
        "n_train": len(run.train),
        "k": k,
        "method": method,
        "block_size": block_size,
        "dense": dense,
        "lissa": repr(engine.lissa_config),
    }
    if targets is not None:  # absent for the default, so a dump started before the option existed resumes
        desc["targets"] = targets
    h.update(json.dumps(desc, sort_keys=True).encode())
    h.update(np.ascontiguousarray(ids, np.int64).tobytes())
    h.update(np.ascontiguousarray(run.train.ids, np.int64).tobytes())
    return h.hexdigest()


def _check_ids(engine: Engine, test_ids: Sequence[int] | None) -> np.ndarray:
    """The stored test ids to dump [m] int64 (all when None), each one checked before anything is written."""
    test = engine.run.test
    if test_ids is None:
        ids = np.zeros(0, np.int64) if test is None else np.asarray(test.ids, np.int64)
    else:
        if isinstance(test_ids, int | np.integer):
            test_ids = [int(test_ids)]
        ids = np.asarray([int(v) if not isinstance(v, bool) else v for v in test_ids], np.int64)
    if len(ids) == 0:
        raise ValueError("test_ids: nothing to dump (the run stores no test examples, or test_ids is empty)")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("test_ids: must be unique")
    if test is None:
        raise UnknownExampleError(f"this run stores no test examples; unknown test ids {ids[:20].tolist()}")
    test.rows(ids.tolist())
    return ids


def dump(
    engine: Engine,
    path: str | Path,
    test_ids: Sequence[int] | None = None,
    *,
    k: int = 100,
    method: str = "lissa",
    targets: str | None = None,
    block_size: int = 256,
    progress: bool = True,
    dense: bool = False,
    aggregates: bool = True,
    on_block: OnBlock | None = None,
    ray: str | None = None,
) -> Path:
    """Streams the scores of many queries against every training example to disk; see the module docstring.

    Args:
        engine: The open run's engine (`Index.engine`).
        path: The top-k Parquet file (must end in `.parquet`); companions are written beside it.
        test_ids: Stored test ids to dump; None = every stored test example.
        k: Proponents and opponents kept per query (rows with score <= 0 / >= 0 are dropped from each kind).
        method: One of `api.METHODS`.
        targets: The class each query is scored at: None = the model's prediction ("why this prediction"),
            "label" = the stored true label ("which training examples hurt the correct label").
        block_size: Queries per block (memory and checkpoint granularity).
        progress: Show a progress bar.
        dense: Also write every score into `<stem>.dense.npy` `[n_queries, n_train]` (a memmap on disk).
        aggregates: Also write per-training-example aggregates to `<stem>.aggregates.parquet`.
        on_block: Called as `on_block(done_queries, total_queries)` after each block is durably written.
        ray: None (this process), or the Ray cluster (`api.ray_cluster`) whose tasks score the blocks over the
            run's memory-mapped train-side vectors (the run directory and `path` on storage every node sees).

    Returns:
        `path`.
    """
    method = check_method(method)
    k = check_k(k)
    if targets not in (None, "label"):
        raise ValueError(f"targets must be None (the predictions) or 'label' (the true labels), got {targets!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    block_size = int(block_size)
    if on_block is not None and not callable(on_block):
        raise ValueError(f"on_block must be callable(done_queries, total_queries), got {on_block!r}")
    path = Path(path)
    if path.suffix != ".parquet":
        raise ValueError(f"path must end in .parquet, got {str(path)!r}")
    if not path.parent.is_dir():
        raise ValueError(f"path: parent directory of {str(path)!r} does not exist")
    ids = _check_ids(engine, test_ids)  # every id is valid before anything is written
    scorer = scorer_for(engine, method)
    with ray_session(ray) as distributed:  # `ray` is checked by name before anything is written
        return _dump(
            engine,
            scorer,
            path,
            ids,
            k,
            method,
            targets,
            block_size,
            progress,
            dense,
            aggregates,
            on_block,
            distributed,
        )


def _dump(
    engine, scorer, path, ids, k, method, targets, block_size, progress, dense, aggregates, on_block, distributed
):
    """`dump` after its arguments are checked (`distributed`: the blocks run as tasks on the connected cluster)."""
    from tqdm.auto import tqdm

    train = engine.run.train
    n_train = len(train)
    work = DumpWork(path)
    fingerprint = _fingerprint(engine, ids, k, method, block_size, dense, targets)
    resumed = work.resume(fingerprint, n_train)
    if resumed is None:
        spec = {"fingerprint": fingerprint, "k": k, "method": method, "block_size": block_size, "n": len(ids)}
        work.start(spec)
        done, acc = 0, new_accumulators(n_train)
    else:
        done, acc = resumed

    n_blocks = -(-len(ids) // block_size)
    dense_mm = None
    if dense:
        fresh = done == 0 or not work.dense_path.is_file()
        if fresh:  # no dense rows to resume from: every block again
            done, acc = 0, new_accumulators(n_train)
        dense_mm = work.open_dense((len(ids), n_train), fresh=fresh)

    # projected head gradients are recomputed at full size; other train sides are stored, so one row says
    dim = engine.run.n_params if scorer.projected else int(scorer.train_vectors(slice(0, 1)).shape[1])
    chunk_rows = max(1, min(n_train, TILE_SCORES // block_size, (256 << 20) // (4 * max(dim, 1))))
    train_labels = np.asarray(train.labels)
    train_ids = np.asarray(train.ids, np.int64)
    bar = tqdm(
        total=len(ids), initial=min(done * block_size, len(ids)), desc="dump", unit="query", disable=not progress
    )
    blocks = [(b, ids[b * block_size : (b + 1) * block_size]) for b in range(done, n_blocks)]
    options = {"k": k, "method": method, "targets": targets, "chunk_rows": chunk_rows, "aggregates": aggregates}
    if distributed:  # each block's part file and dense rows are written by its task; the driver reduces
        from .distributed import dump_blocks

        dense_shape = (len(ids), n_train) if dense else None
        scored = dump_blocks(
            engine, work, blocks, dense_shape=dense_shape, block_size=block_size, score_block=score_block, **options
        )
    else:
        scored = _local_blocks(engine, scorer, work, blocks, dense_mm, block_size, options)
    for b, block, deltas in scored:
        for name, delta in deltas.items():
            acc[name] += delta
        work.save_state(b + 1, acc)  # the commit point of this block
        bar.update(len(block))
        if on_block is not None:
            on_block(min((b + 1) * block_size, len(ids)), len(ids))
    bar.close()
    del dense_mm

    agg = {"example_id": train_ids, "label": train_labels.astype(np.int64), **acc} if aggregates else None
    return work.finish(n_blocks, dense_ids=(ids, train_ids) if dense else None, aggregates=agg, targets=targets)


def _local_blocks(
    engine: Engine, scorer: Any, work: DumpWork, blocks: list, dense_mm: Any, block_size: int, options: dict
) -> Any:
    """Scores the blocks in this process, in order: yields (block index, test ids, accumulator deltas) once the
    block's part file and dense rows are durable."""
    tile = np.empty(block_size * options["chunk_rows"], np.float32)  # one reused score buffer
    for b, block in blocks:
        rows = None if dense_mm is None else dense_mm[b * block_size : b * block_size + len(block)]
        columns, deltas = score_block(engine, scorer, block, dense_rows=rows, tile=tile, **options)
        work.write_block(b, columns, dense_mm)
        yield b, block, deltas


def score_block(
    engine: Engine,
    scorer: Any,
    block: np.ndarray,
    *,
    k: int,
    method: str,
    targets: str | None,
    chunk_rows: int,
    aggregates: bool,
    dense_rows: np.ndarray | None = None,
    tile: np.ndarray | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One block of queries against every training example: (its top-k file columns, its additions to the
    aggregate accumulators [n_train] each). Writes its dense scores into `dense_rows` [b, n_train] when given.

    The additions are what the block adds to each accumulator row (every training row lies in one train chunk),
    so adding them to the accumulators in block order gives the same numbers wherever the block was scored.
    """
    train = engine.run.train
    n_train = len(train)
    train_labels = np.asarray(train.labels)
    train_ids = np.asarray(train.ids, np.int64)
    if tile is None or tile.size < len(block) * chunk_rows:
        tile = np.empty(len(block) * chunk_rows, np.float32)  # one reused score buffer: no page faults per tile
    # stored test rows: LiSSA reads the build's query cache, a last-block run its stored query gradients
    labels = None if targets is None else engine.run.test.labels[engine.test_rows(block)]
    queries = engine.prepare(list(block), None, labels)
    q, _ = scorer.query_vectors(queries)
    q = np.ascontiguousarray(q, np.float32)
    mis = queries.predictions != np.asarray(queries.labels)
    # column sums over the block's queries and over its misclassified ones, as one [2, b] x [b, c] product
    weights = np.stack([np.ones(len(block)), mis]).astype(np.float32)
    pos, neg = inf.StreamingTopK(k, largest=True), inf.StreamingTopK(k, largest=False)
    deltas = new_accumulators(n_train) if aggregates else {}
    for start in range(0, n_train, chunk_rows):
        sl = slice(start, min(start + chunk_rows, n_train))
        s = tile[: len(block) * (sl.stop - start)].reshape(len(block), -1)
        np.matmul(q, np.ascontiguousarray(scorer.train_vectors(sl), np.float32).T, out=s)  # [b, c]
        pos.update(s, sl.start)
        neg.update(s, sl.start)
        if dense_rows is not None:
            dense_rows[:, sl] = s
        if aggregates:  # s is not needed after this: its positive part is taken in place
            total = weights @ s
            plus = weights @ np.maximum(s, 0.0, out=s)
            deltas["sum_positive"][sl] += plus[0]
            deltas["sum_negative"][sl] += total[0] - plus[0].astype(np.float64)
            deltas["sum_positive_misclassified"][sl] += plus[1]
            deltas["sum_negative_misclassified"][sl] += total[1] - plus[1].astype(np.float64)
    top, bottom = pos.result, neg.result  # (scores [b, k], rows [b, k]), best first; ties: smaller row
    if aggregates:
        opp_keep = bottom[0] < 0
        deltas["n_top_proponent"] += np.bincount(top[1][top[0] > 0], minlength=n_train)
        deltas["n_top_opponent"] += np.bincount(bottom[1][opp_keep], minlength=n_train)
        deltas["n_top_proponent_misclassified"] += np.bincount(top[1][(top[0] > 0) & mis[:, None]], minlength=n_train)
        deltas["n_top_opponent_misclassified"] += np.bincount(bottom[1][opp_keep & mis[:, None]], minlength=n_train)
    return topk_columns(block, top, bottom, train_ids, train_labels, method), deltas
