"""Dump blocks and label-noise refits as Ray tasks (issue 16); `api.ray_cluster` connects, this module schedules.

- Dumps (`api.dump`): each block of queries is one task. It opens the run directory itself (memory-mapped
  train-side vectors, so the run lives on storage every node sees; the engine is opened once per worker process),
  scores the block (`api.dump.score_block`), commits its part file and dense rows (`store.DumpWork`) and returns
  its additions to the aggregates. The driver reduces them in block order and commits the dump's state after each
  block, as a dump in one process does, so the files are the same and a killed dump resumes the same way.
- Label noise (`api.noise`): each K-fold refit is one task (`ray_map`), results in fold order.

Tasks are retried by Ray when their worker dies (every task rewrites only its own files, atomically).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from store import DumpWork, OpenedRun

from .ray_cluster import import_ray

#: engines opened from run directories in this (worker) process, by what makes them the same
_ENGINES: dict[tuple[Any, ...], Any] = {}
RETRIES = 3


def _worker_engine(spec: dict[str, Any]) -> Any:
    """The engine of `spec` (run root, LiSSA config, task, flags), opened once per worker process."""
    from .engine import Engine

    key = (spec["root"], repr(spec["lissa"]), spec["flags"])
    if key not in _ENGINES:
        engine = Engine(OpenedRun(spec["root"]), task=spec["task"], lissa=spec["lissa"])
        for name, value in spec["flags"]:
            setattr(engine, name, value)
        _ENGINES[key] = engine
    return _ENGINES[key]


def _engine_spec(engine: Any) -> dict[str, Any]:
    flags = tuple((n, getattr(engine, n)) for n in ("min_candidates", "use_query_cache", "use_whitened_space"))
    return {"root": str(engine.run.root), "lissa": engine.lissa_config, "task": engine.task, "flags": flags}


def _dump_block(
    spec: dict[str, Any],
    path: str,
    b: int,
    block: np.ndarray,
    dense_shape: tuple[int, int] | None,
    block_size: int,
    options: dict[str, Any],
    score_block: Callable[..., tuple[dict[str, Any], dict[str, np.ndarray]]],
) -> dict[str, np.ndarray]:
    """One dump block on a worker: scores it (`score_block`: `api.dump.score_block`), commits its part file (and
    dense rows); returns its aggregate additions."""
    from .scorers import scorer_for

    engine = _worker_engine(spec)
    work = DumpWork(path)
    dense_mm = None if dense_shape is None else work.open_dense(dense_shape, fresh=False)
    rows = None if dense_mm is None else dense_mm[b * block_size : b * block_size + len(block)]
    columns, deltas = score_block(engine, scorer_for(engine, options["method"]), block, dense_rows=rows, **options)
    work.write_block(b, columns, dense_mm)
    return deltas


def _window() -> int:
    ray = import_ray()
    return 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))


def dump_blocks(
    engine: Any,
    work: DumpWork,
    blocks: Sequence[tuple[int, np.ndarray]],
    *,
    dense_shape: tuple[int, int] | None,
    block_size: int,
    score_block: Callable[..., Any],
    **options: Any,
) -> Iterator[tuple[int, np.ndarray, dict[str, np.ndarray]]]:
    """Scores `blocks` ((block index, test ids) each) with `score_block` as Ray tasks; yields (index, test ids, aggregate
    additions) in block order once each block's files are durable. At most two blocks per cluster CPU are in
    flight (their additions wait in the object store until the driver reduces them)."""
    ray = import_ray()
    task = ray.remote(num_cpus=1, max_retries=RETRIES)(_dump_block)
    spec = ray.put(_engine_spec(engine))
    path = str(work.paths["topk"])
    refs: list[Any] = []
    window = _window()
    for i, (b, block) in enumerate(blocks):
        while len(refs) < min(len(blocks), i + window):
            nb, nblock = blocks[len(refs)]
            refs.append(task.remote(spec, path, nb, nblock, dense_shape, block_size, options, score_block))
        deltas = ray.get(refs[i])
        refs[i] = None  # the driver holds one block's additions at a time
        yield b, block, deltas


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


def ray_map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[fn(item) for item in items]`` as Ray tasks (``fn`` shipped once through the object store), in order."""
    ray = import_ray()
    task = ray.remote(num_cpus=1, max_retries=RETRIES)(_call)
    fn_ref = ray.put(fn)
    return ray.get([task.remote(fn_ref, item) for item in items])


__all__ = ["dump_blocks", "ray_map"]
