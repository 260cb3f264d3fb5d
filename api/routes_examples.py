"""HTTP incremental updates: `POST /examples` and `DELETE /examples/{example_id}` (behind the API key).

- `POST /examples` (a run served with `--task`): adds the Task's training examples that the run does not hold,
  i.e. whose ids (`Task.train_ids`, default: positions in the train dataset) are neither stored nor deleted
  (tombstoned ids are never re-added). Body (optional): `{"refresh_curvature": true}`.
- `DELETE /examples/{example_id}?refresh_curvature=true`: deletes one training example; its id is tombstoned.

Both run `indexer.update.add_examples` / `delete_examples`, so they carry the same guarantees: every input is
checked before anything is written (an unknown or already deleted id -> 404, a Task without new examples or
deleting the last example -> 422), each file is replaced atomically, and the results equal a fresh build on
the same examples. The update holds the service's index lock (explains wait for it) and the served index is
reopened afterwards, whatever happened, so it never serves a half-updated view. An update while a dump job is
queued or running is refused with 409 (the job reads the training set being changed).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Query
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from store import UnknownExampleError

from .jobs import DumpJobs, JobNotDoneError

INT64 = {"ge": -(2**63), "le": 2**63 - 1}


class DumpRunningError(JobNotDoneError):
    """An update was asked for while a dump job reads the training set."""


class AddRequest(BaseModel):
    """Options of `POST /examples`."""

    model_config = {"extra": "forbid"}

    refresh_curvature: bool = Field(True, description="recompute the curvature over the new training set")


class UpdateOut(BaseModel):
    """What an update did (`indexer.update.UpdateReport`)."""

    op: str
    example_ids: list[int]
    n_train: int
    seconds: float
    refreshed: list[str]
    stale: list[str]


def pending_train_examples(task: Any, stored: np.ndarray, retired: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions in `task.train`, their ids) of the Task's training examples that are neither stored nor
    tombstoned in the run."""
    task_ids = np.asarray(task.ids("train"), np.int64)
    positions = np.flatnonzero(~np.isin(task_ids, np.concatenate([stored, retired])))
    return positions, task_ids[positions]


def add_example_routes(
    app: FastAPI,
    index: Any,
    lock: threading.Lock,
    auth: list[Any],
    errors: Callable[..., dict[Any, Any]],
    *,
    ids: dict[str, np.ndarray],
    jobs: DumpJobs,
) -> None:
    """Registers `POST /examples` and `DELETE /examples/{example_id}` on `app` (see the module docstring).

    Args:
        index: The served `api.Index`; reopened in place after each update.
        lock: The lock that serialises the service's index calls.
        ids: The service's `{"train": ids, "test": ids}` (paging); its train ids are refreshed after an update.
        jobs: The run's dump jobs (an update waits for none: it is refused while one is queued or running).
    """

    def not_busy() -> None:
        running = [r.job for r in jobs.all_jobs() if r.status in ("queued", "running")]
        if running:
            raise DumpRunningError(f"dump jobs {running[:5]} are reading the training set: update when they are done")

    def reopen() -> None:
        from .index import Index

        root, task, lissa = index.paths.root, index.engine.task, index.engine.lissa_config
        index.close()
        Index.__init__(index, root, task=task, lissa=lissa)
        ids["train"] = np.asarray(index.train_ids)
        jobs.reset_engine()

    def report(rep: Any) -> UpdateOut:
        return UpdateOut(**{k: v for k, v in rep.to_dict().items() if k in UpdateOut.model_fields})

    @app.post("/examples", response_model=UpdateOut, dependencies=auth, responses=errors(409, 422))
    def add(body: AddRequest | None = None) -> UpdateOut:
        """Adds the served Task's training examples that the run does not hold (needs `serve --task`)."""
        from torch.utils.data import Subset

        from indexer.update import add_examples

        task = index.engine.task
        if task is None:
            raise ValueError("POST /examples needs the model and its data: serve the run with --task")
        options = body or AddRequest()
        with lock:
            not_busy()
            positions, new_ids = pending_train_examples(
                task, np.asarray(index.train_ids), index.metadata.tombstones("train")
            )
            if len(positions) == 0:
                raise ValueError(
                    f"the task's train set ({len(task.train)} examples) has none that the run does not hold "
                    "(stored or deleted)"
                )
            try:
                rep = add_examples(
                    task,
                    index.paths.root,
                    Subset(task.train, positions.tolist()),
                    ids=new_ids,
                    refresh_curvature=options.refresh_curvature,
                )
            finally:
                reopen()
        return report(rep)

    @app.delete("/examples/{example_id}", response_model=UpdateOut, dependencies=auth, responses=errors(404, 409, 422))
    def delete(
        example_id: Annotated[int, PathParam(**INT64)],
        refresh_curvature: bool = Query(True, description="recompute the curvature over the new training set"),
    ) -> UpdateOut:
        """Deletes one training example: it never appears in results again and its id is never reused."""
        from indexer.update import delete_examples

        with lock:
            not_busy()
            if example_id not in set(np.asarray(index.train_ids).tolist()):
                gone = example_id in set(index.metadata.tombstones("train").tolist())
                raise UnknownExampleError(
                    f"train example {example_id} is " + ("already deleted" if gone else "not in this run")
                )
            try:
                rep = delete_examples(
                    index.paths.root, [example_id], refresh_curvature=refresh_curvature, task=index.engine.task
                )
            finally:
                reopen()
        return report(rep)
