"""Per-example build stages in chunks, here or as shards on a Ray cluster (a distributed build).

`run_chunks(ctx, name, chunks, compute, commit)` is the one loop of the chunked stages ("features", "grad"):
``compute(chunk) -> {key: array}`` makes one chunk's rows from what it closes over (the Task, the run
directory's files), ``commit(chunk, arrays)`` writes them into the run (the stage's `store.ChunkedArray` and
sidecars, with their done mask).

- In one process (``ctx.distributed`` False) each chunk is computed and committed in turn, as before.
- In a distributed build (`api.build_index(..., ray=...)`, Ray already connected) an actor pool holds ``compute``
  (the model, deserialized once per actor; one actor per CPU of the cluster, at most one per chunk). Each actor
  computes a chunk and writes it as a shard file (`store.ShardFiles`, written atomically: the file is the shard's
  done-mark) into the run directory, which therefore lives on storage every node sees. The driver alone commits
  shards into the run's arrays as they finish, so the arrays, SQLite and the manifest keep one writer; then it
  removes the shard files. A killed actor is restarted by Ray and its chunk retried; a shard a killed driver left
  on disk is committed on resume without recomputing it. Every chunk is committed exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from store import ShardFiles

from .context import BuildContext

Compute = Callable[[int], dict[str, np.ndarray]]
Commit = Callable[[int, dict[str, np.ndarray]], None]

#: chunks in flight per actor (one computing, one queued, so an actor never waits for the driver)
IN_FLIGHT = 2


def run_chunks(
    ctx: BuildContext, name: str, chunks: Iterable[int], compute: Compute, commit: Commit, *, desc: str
) -> None:
    """Computes and commits every chunk of `chunks`; see the module docstring.

    Args:
        ctx: The build's context (``ctx.distributed``: on the connected Ray cluster).
        name: The declared array whose shards hold the chunks (`store.layout.ARRAYS`).
        chunks: The chunk indices still missing.
        compute: ``chunk -> {key: array}``; in a distributed build it is pickled to the workers (cloudpickle).
        commit: Writes one computed chunk into the run (driver only).
        desc: The progress bar's label.
    """
    chunks = list(chunks)
    bar = tqdm(total=len(chunks), desc=desc, unit="chunk", disable=not ctx.progress)
    if not ctx.distributed:
        for chunk in chunks:
            commit(chunk, compute(chunk))
            bar.update()
        bar.close()
        return
    shards = ShardFiles(ctx.paths, name)
    todo = []
    for chunk in chunks:  # resuming: what the workers of a killed driver finished is on disk
        if shards.exists(chunk):
            commit(chunk, shards.read(chunk))
            bar.update()
        else:
            todo.append(chunk)
    for chunk in _ray_shards(ctx, name, todo, compute):
        commit(chunk, shards.read(chunk))
        bar.update()
    bar.close()
    shards.remove()


def _ray_shards(ctx: BuildContext, name: str, chunks: list[int], compute: Compute) -> Iterable[int]:
    """Yields each chunk of `chunks` once its shard file is on disk, as the actor pool finishes them."""
    if not chunks:
        return
    import ray

    if not ray.is_initialized():
        raise RuntimeError("a distributed build needs a connected Ray cluster (api.build_index(..., ray=...))")
    n_cpus = int(ray.cluster_resources().get("CPU", 1))
    worker = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=-1)(ShardWorker)
    compute_ref = ray.put(compute)
    actors = [worker.remote(compute_ref, str(ctx.paths.root), name) for _ in range(max(1, min(n_cpus, len(chunks))))]
    pending: dict[Any, Any] = {}
    queue = list(chunks)
    try:
        for actor in actors:
            for _ in range(IN_FLIGHT):
                if queue:
                    pending[actor.shard.remote(queue.pop(0))] = actor
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ref)
            chunk = ray.get(ref)
            if queue:
                pending[actor.shard.remote(queue.pop(0))] = actor
            yield chunk
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)


class ShardWorker:
    """A Ray actor holding one stage's ``compute`` (the model, deserialized once): computes chunks and writes
    each as a shard file of the run directory ``root``."""

    def __init__(self, compute: Compute, root: str, name: str) -> None:
        from store import RunPaths

        self.compute, self.shards = compute, ShardFiles(RunPaths(root), name)

    def shard(self, chunk: int) -> int:
        """Computes chunk `chunk`, writes its shard file (atomically) and returns `chunk`."""
        self.shards.write(chunk, self.compute(chunk))
        return chunk

    def pid(self) -> int:
        """This worker's process id (fault tests kill it)."""
        import os

        return os.getpid()
