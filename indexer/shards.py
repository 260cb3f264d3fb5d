"""Per-example build stages in chunks, here or as shards on a Ray cluster (a distributed build).

`run_chunks(ctx, name, chunks, compute, commit)` is the one loop of the chunked stages ("features", "grad",
"whitened"):
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

`sum_chunks(ctx, name, n_chunks, compute)` is the same loop for statistics that are sums over the training set
(the K-FAC factors and the EK-FAC correction of the "kronecker" stage): each chunk's partial sums are a shard,
and the driver adds them in chunk order, so the total is the same number here and on a cluster.

`space_adder(ctx, array, normalize=...)` fills an IVF FAISS space of a distributed build the way FAISS builds
indexes in pieces: the driver trains the empty index once (`store.build_vector_index`), Ray tasks each add one
range of rows read from the stored array (on the shared run directory) to a copy of it, and the driver merges
the parts in id order (`store.FaissVectorIndex.merge_parts`); the index is byte-identical to one filled in one
process. Exact ("Flat") and HNSW spaces are filled by the driver (a flat index is the array in id order; an HNSW
graph is built sequentially).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from store import FaissVectorIndex, ShardFiles

from .context import BuildContext

Compute = Callable[[int], dict[str, np.ndarray]]
Commit = Callable[[int, dict[str, np.ndarray]], None]

#: chunks in flight per actor (one computing, one queued, so an actor never waits for the driver)
IN_FLIGHT = 2


def run_chunks(
    ctx: BuildContext,
    name: str,
    chunks: Iterable[int],
    compute: Compute,
    commit: Commit,
    *,
    desc: str,
    model: Any = None,
) -> None:
    """Computes and commits every chunk of `chunks`; see the module docstring.

    Args:
        ctx: The build's context (``ctx.distributed``: on the connected Ray cluster).
        name: The declared array whose shards hold the chunks (`store.layout.ARRAYS`).
        chunks: The chunk indices still missing.
        compute: ``chunk -> {key: array}``; in a distributed build it is pickled to the workers (cloudpickle).
        commit: Writes one computed chunk into the run (driver only).
        desc: The progress bar's label.
        model: The `indexer.Task` whose model ``compute`` runs (the "features" stage), or None. On a cluster
            with GPUs such a stage runs one actor per GPU, each moving its copy of the model to its GPU (where
            torch sees CUDA); without GPUs, and for stages that run only the JAX head, one actor per CPU.
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
    for chunk in _ray_shards(ctx, name, todo, compute, model):
        commit(chunk, shards.read(chunk))
        bar.update()
    bar.close()
    shards.remove()


def sum_chunks(ctx: BuildContext, name: str, n_chunks: int, compute: Compute, *, desc: str) -> dict[str, np.ndarray]:
    """The key-wise sum over chunks ``0 .. n_chunks - 1`` of ``compute(chunk)`` (partial sums of one chunk of
    training rows), added in chunk order whatever order a cluster finishes them in.

    Args:
        ctx: The build's context (``ctx.distributed``: the partial sums are shards of the actor pool).
        name: The declared scratch array whose shards hold the partial sums (`store.layout.ARRAYS`).
        n_chunks: How many chunks.
        compute: ``chunk -> {key: partial sum}``, every chunk with the same keys and shapes.
        desc: The progress bar's label.
    """
    total: dict[str, np.ndarray] = {}
    waiting: dict[int, dict[str, np.ndarray]] = {}
    order = iter(range(n_chunks))
    nxt = next(order, None)

    def add(chunk: int, part: dict[str, np.ndarray]) -> None:
        nonlocal nxt
        waiting[chunk] = part
        while nxt is not None and nxt in waiting:
            for key, value in waiting.pop(nxt).items():
                total[key] = value if key not in total else total[key] + value
            nxt = next(order, None)

    run_chunks(ctx, name, range(n_chunks), compute, add, desc=desc)
    return total


#: fewest rows per part of a FAISS space filled on the cluster
MIN_PART_ROWS = 4096


def space_adder(
    ctx: BuildContext, array: str, *, normalize: bool = False
) -> Callable[[FaissVectorIndex, np.ndarray, np.ndarray], None] | None:
    """The ``add`` of `store.build_vector_index` for a space of the stored rows of ``array`` (unit rows with
    ``normalize``, `influence.normalize_rows`): in parts on the cluster in a distributed build (see the module
    docstring); None (the driver adds) in one process."""
    if not ctx.distributed:
        return None
    root = str(ctx.paths.root)

    def add(index: FaissVectorIndex, vectors: np.ndarray, ids: np.ndarray) -> None:
        if not index.mergeable:
            index.add(vectors, ids)
            return
        import ray

        n = len(ids)
        parts = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        rows = max(MIN_PART_ROWS, -(-n // parts))
        trained = ray.put(index.to_bytes())
        task = ray.remote(num_cpus=1, max_retries=3)(_fill_part)
        refs = [
            task.remote(trained, root, array, normalize, s, min(s + rows, n), ids[s : s + rows])
            for s in range(0, n, rows)
        ]
        index.merge_parts([FaissVectorIndex.from_bytes(data) for data in ray.get(refs)])

    return add


def _fill_part(
    trained: np.ndarray, root: str, array: str, normalize: bool, start: int, stop: int, ids: np.ndarray
) -> np.ndarray:
    """A Ray task: rows [start, stop) of the run's ``array`` added to a copy of the trained index; serialized."""
    import influence as inf
    from store import RunPaths, load_array

    x = np.asarray(load_array(RunPaths(root).array(array))[start:stop], np.float32)
    if normalize:
        x = np.asarray(inf.normalize_rows(x), np.float32)
    part = FaissVectorIndex.from_bytes(trained)
    part.add(x, ids)
    return part.to_bytes()


def actor_resources(cluster: dict[str, float], *, model: bool) -> tuple[int, dict[str, float]]:
    """(how many actors, the resources of each) for a stage on a cluster with `cluster` resources: one per GPU
    (1 CPU + 1 GPU each) when the stage runs the model and the cluster has GPUs, else one per CPU."""
    gpus = int(cluster.get("GPU", 0))
    if model and gpus > 0:
        return gpus, {"num_cpus": 1, "num_gpus": 1}
    return max(1, int(cluster.get("CPU", 1))), {"num_cpus": 1}


def _ray_shards(ctx: BuildContext, name: str, chunks: list[int], compute: Compute, model: Any) -> Iterable[int]:
    """Yields each chunk of `chunks` once its shard file is on disk, as the actor pool finishes them."""
    if not chunks:
        return
    import ray

    if not ray.is_initialized():
        raise RuntimeError("a distributed build needs a connected Ray cluster (api.build_index(..., ray=...))")
    n_actors, resources = actor_resources(ray.cluster_resources(), model=model is not None)
    worker = ray.remote(max_restarts=-1, max_task_retries=-1, **resources)(ShardWorker)
    compute_ref = ray.put(compute)
    root = str(ctx.paths.root)
    actors = [worker.remote(compute_ref, root, name, model is not None) for _ in range(min(n_actors, len(chunks)))]
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

    def __init__(self, compute: Compute, root: str, name: str, model: bool = False) -> None:
        from store import RunPaths

        self.compute, self.shards = compute, ShardFiles(RunPaths(root), name)
        if model:  # the Task among compute's arguments moves its model to this actor's GPU, if it has one
            import ray
            import torch

            from .task import Task

            if ray.get_gpu_ids() and torch.cuda.is_available():  # Ray sets CUDA_VISIBLE_DEVICES to this GPU
                for arg in getattr(compute, "args", ()):
                    if isinstance(arg, Task):
                        arg.to_device("cuda")

    def shard(self, chunk: int) -> int:
        """Computes chunk `chunk`, writes its shard file (atomically) and returns `chunk`."""
        self.shards.write(chunk, self.compute(chunk))
        return chunk

    def pid(self) -> int:
        """This worker's process id (fault tests kill it)."""
        import os

        return os.getpid()
