"""Incremental maintenance of a built run: add training examples, delete (tombstone) them.

The model is fixed (same fingerprint), so the outputs of the per-example stages (`Stage.per_example`,
`indexer.examples`) for the examples already indexed do not change: cut features h_i, logits, head gradients
g_i (at theta, the model's own head) and their FAISS vectors. An add computes them for the new examples only
(with the stages' own helpers) and appends them; a delete drops their rows. The stages that depend on the whole
training set are then re-run on the changed training set, through the same stage code as the build
(`indexer.stages.run_stages` with `BuildContext.rerun`):

- "representer" (Yeh et al. 2018: Theta* = argmin (1/n) sum_i CE(Theta phi_i, y_i) + lam ||Theta||^2,
  alpha_i = -(softmax(Theta* phi_i) - onehot(y_i)) / (2 lam n)): refitted, warm-started from the stored Theta*,
  and its FAISS space rebuilt (every alpha_i changes with n). With `refresh_representer=False` Theta* is kept and
  every alpha_i recomputed from it in closed form (noted in the manifest as `representer_stale`);
- "curvature" (mean over the training set, + l2, and the damping derived from it) when `refresh_curvature=True`
  (default). With False its stored eigenpairs / top eigenvalue / damping are kept and the manifest notes them as
  stale (`curvature_stale`; LiSSA still iterates on the current training set; deflation and "exact" then use
  the old curvature). Every stage that reads the curvature's arrays is then kept too (`stages_to_rerun`):
- "queries" (the query cache of a run built with `cache_queries=True`) when the curvature is refreshed; else
  the stored cache no longer matches the run (its key holds the training ids) and `explain` solves.
- "model-curvature" (scope="model" runs: the projected Gauss-Newton matrix G + l2 I, its damping rule and its
  K-FAC / EK-FAC) when the curvature is refreshed, through the model over every stored example (`RunRows`: each
  row's example found in the Task's training set by id, or among the added ones), so a delete needs the Task
  too. An add computes the new examples' projected per-layer gradients phi_i with the run's seeds and appends
  them to `model_train_vectors` and the FAISS spaces "model" / "model-unit"; a delete drops their rows.

Adds get new ids (default: after every id ever used); deletes remove the rows from the arrays, FAISS and SQLite
and record the ids as tombstones, so they never appear in results and are never reused. FAISS ids stay equal to
the SQLite ids; `store.verify_run` (`influence info --verify`) checks it. After adds and deletes with refreshes,
results equal a fresh build on the same examples with the same ids.

Each file is replaced atomically: the per-example arrays first, then their FAISS spaces, then the re-run stages
(each its arrays, then its FAISS space), then SQLite (one transaction), the manifest last; an update killed in
between leaves a run that `verify_run` reports as inconsistent (re-run from a copy).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

import influence as inf
from store import (
    FaissVectorIndex,
    MetadataStore,
    OpenedRun,
    build_vector_index,
    save_array,
    save_manifest,
)
from store.arrays import replace_array
from store.vectors import check_ids

from .context import BuildContext
from .errors import TaskError
from .examples import example_records, forward_examples, head_gradients, head_outputs
from .stages import STAGES, Stage, run_stages
from .task import Task

#: arrays of the per-example stages with one row per training example, rewritten on every update
ROW_ARRAYS = ("train_features", "train_labels", "train_ids", "train_logits", "grad_vectors")
#: the same for scope="model" runs (stage "model")
MODEL_ROW_ARRAYS = ("model_train_vectors",)
#: FAISS spaces of the per-example stages, changed in place (adds, removes), and the array of their vectors
ROW_SPACES = {
    "grad": "grad_vectors",
    "grad-unit": "grad_vectors",
    "model": "model_train_vectors",
    "model-unit": "model_train_vectors",
}
#: UpdateReport.timings key of each re-run stage
STAGE_TIMINGS = {"representer": "representer_refit", "curvature": "curvature", "queries": "queries"}


def space_vectors(space: str, vectors: np.ndarray) -> np.ndarray:
    """The FAISS vectors of a row space from its array's rows (normalised for the "-unit" spaces)."""
    return np.asarray(inf.normalize_rows(vectors), np.float32) if space.endswith("-unit") else vectors


class RunRows:
    """The training examples of a run's rows, in row order, as a dataset (`(x, y)` items): each row's example
    from the Task's training set (found by its id, `Task.ids("train")`) or from the examples being added.

    What stage "model-curvature" reads as `task.train` when an update re-runs it.
    """

    def __init__(self, items: list[tuple[Any, int]]) -> None:
        self.items = items

    @classmethod
    def of(cls, task: Task, ids: np.ndarray, added: Any = None, added_ids: np.ndarray | None = None) -> RunRows:
        own = {int(v): p for p, v in enumerate(task.ids("train"))}
        extra = {} if added_ids is None else {int(v): p for p, v in enumerate(added_ids)}
        missing = [int(v) for v in ids if int(v) not in own and int(v) not in extra]
        if missing:
            raise ValueError(
                f"task: its training set (ids Task.train_ids, default positions) lacks the run's training ids "
                f"{missing[:10]}: give the Task the run was built from (its scope='model' curvature is recomputed "
                "over every stored example)"
            )
        return cls([(added, extra[int(v)]) if int(v) in extra else (task.train, own[int(v)]) for v in ids])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        ds, j = self.items[i]
        return ds[j]


class _TaskOverRows:
    """The Task with `train` replaced by a `RunRows` (everything else read from the Task)."""

    def __init__(self, task: Task, rows: RunRows) -> None:
        self._task, self.train = task, rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)


@dataclasses.dataclass(frozen=True)
class UpdateReport:
    """What an update did.

    Attributes:
        op: "add" or "delete".
        example_ids: The ids added or deleted.
        n_train: Training examples after the update.
        seconds: Wall time of the update.
        refreshed: What was recomputed over the whole training set.
        stale: What was kept although it depends on the training set.
        timings: Seconds per step.
    """

    op: str
    example_ids: tuple[int, ...]
    n_train: int
    seconds: float
    refreshed: tuple[str, ...]
    stale: tuple[str, ...]
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: the stages that estimate the curvature of the training loss (kept together by refresh_curvature=False)
CURVATURE_STAGES = ("curvature", "damping", "kronecker", "model-curvature", "model-damping")


def stages_to_rerun(ctx: BuildContext, *, refresh_curvature: bool) -> tuple[list[Stage], list[Stage]]:
    """(stages to re-run, stages kept stale) among those that depend on the whole training set and apply.

    The curvature stages ("curvature", "kronecker") are kept when refresh_curvature is False, and so is every
    stage that reads what a kept stage wrote (the query cache solves against the curvature arrays). Stages the
    run's build did not record (a run built before the stage existed) are not added by an update.
    """
    rerun, kept, stale_outputs = [], [], set()
    for st in STAGES:
        if st.per_example or not st.applies(ctx) or st.name not in ctx.manifest.stages:
            continue
        if (st.name in CURVATURE_STAGES and not refresh_curvature) or stale_outputs & set(st.reads):
            kept.append(st)
            stale_outputs |= set(st.writes)
        else:
            rerun.append(st)
    return rerun, kept


def _open(run: str | Path, fingerprint: str | None = None) -> OpenedRun:
    r = OpenedRun(run, fingerprint=fingerprint)
    if r.scope not in ("head", "model"):
        r.close()
        raise ValueError(
            f"run: {r.root} was built with scope={r.scope!r}; incremental adds and deletes cover scope='head' and "
            "scope='model' runs (the last-block scope's projected curvature is not recomputed by an update): rebuild"
        )
    return r


def _model_scope_task(r: OpenedRun, task: Task | None, *, refresh_curvature: bool, op: str) -> None:
    """Checks what an update of a scope="model" run needs: the Task of its model and layers (its curvature is
    recomputed through the model)."""
    if r.scope != "model":
        return
    if "model-curvature" not in r.manifest.stages:
        raise ValueError(
            f"run: {r.root} was built with scope='model' before its curvature became the stage 'model-curvature' "
            "that an update re-runs: rebuild it (influence index) to update it incrementally"
        )
    if task is None and op == "delete" and not refresh_curvature:
        return
    if task is None:
        raise ValueError(
            f"task: deleting from the scope='model' run {r.root} recomputes its curvature through the model: "
            "pass task= (CLI: --task TASK), or refresh_curvature=False (--keep-curvature) to keep it stale"
        )
    if task.model_scope is None:
        raise ValueError(f"task: {r.root} was built with scope='model'; the Task has scope={task.scope!r}")
    task.model_scope.check_record(r.extra["model"])


def add_examples(
    task: Task,
    run: str | Path,
    train: Any,
    *,
    ids: Any = None,
    refresh_curvature: bool = True,
    refresh_representer: bool = True,
    progress: bool = False,
) -> UpdateReport:
    """Adds the examples of the dataset `train` (yielding `(x, y)`) to the built run `run`.

    Args:
        task: The Task the run was built for (its model computes the new features; same fingerprint).
        run: The run directory.
        train: New training examples.
        ids: Their example ids; default: consecutive ids after every id ever used (stored or tombstoned).
        refresh_curvature: Recompute the curvature eigenpairs over the new training set (see module docstring).
        refresh_representer: Refit Theta* on the new training set; False keeps the stored Theta* and only
            recomputes every alpha_i from it in closed form (the fast path; noted as stale in the manifest).
        progress: Show a progress bar for the body forward.

    Raises:
        ConfigMismatchError: `task` holds another model than the run.
        ValueError: Bad or already used ids, or an empty dataset; nothing is written.
    """
    t0 = time.perf_counter()
    if not isinstance(task, Task):
        raise TaskError(f"task must be an indexer.Task, got {type(task).__name__}")
    with _open(run, task.fingerprint()) as r:
        m = len(train)
        if m == 0:
            raise ValueError("train: no examples to add")
        old_ids = r.train.ids
        retired = r.metadata.tombstones("train")
        if ids is None:
            start = int(max(old_ids.max(initial=-1), retired.max(initial=-1))) + 1
            new_ids = np.arange(start, start + m, dtype=np.int64)
        else:
            new_ids = check_ids(ids, "ids")
            if len(new_ids) != m:
                raise ValueError(f"ids: must have one id per new example ({m}), got {len(new_ids)}")
            used = np.intersect1d(new_ids, np.concatenate([old_ids, retired]))
            if used.size:
                raise ValueError(f"ids: already used in this run (stored or deleted): {used[:10].tolist()}")
        _model_scope_task(r, task, refresh_curvature=refresh_curvature, op="add")
        ctx = BuildContext.for_update(r, task=task, progress=progress, refit_representer=refresh_representer)

        # the per-example stages' rows of the new examples only: body forward, head outputs, gradients
        bar = tqdm(total=m, desc="features add", unit="ex", disable=not progress)
        new = forward_examples(
            task,
            train,
            range(m),
            n_classes=ctx.n_classes,
            name="train",
            feature_shape=tuple(r.extra["feature_shape"]),
            bar=bar,
        )
        bar.close()
        t_forward = time.perf_counter() - t0
        logits, losses, margins = head_outputs(ctx.spec, ctx.params, new.h, new.y)
        g_new = head_gradients(ctx, new.h, new.y)
        records = list(example_records("train", new_ids, new.y, logits, losses, margins, new.hashes, new.previews))
        features = np.asarray(r.train.features)
        arrays = {
            "train_features": np.concatenate([features, new.h.astype(features.dtype)]),
            "train_labels": np.concatenate([r.train.labels, new.y]),
            "train_ids": np.concatenate([old_ids, new_ids]),
            "train_logits": np.concatenate([np.asarray(r.array("train_logits")), logits]),
            "grad_vectors": np.concatenate([np.asarray(r.array("grad_vectors")), g_new]),
        }
        added = {"grad_vectors": g_new}
        if r.scope == "model":  # phi of the new examples through the model, with the run's seeds and dims
            from .model_stage import embed_examples

            added["model_train_vectors"] = embed_examples(task, train, range(m), new.y, r.extra["model"])
            arrays["model_train_vectors"] = np.concatenate(
                [np.asarray(r.array("model_train_vectors")), added["model_train_vectors"]]
            )
            if refresh_curvature:  # stage "model-curvature" re-runs over every row
                rows = RunRows.of(task, arrays["train_ids"], train, new_ids)
                ctx.task = _TaskOverRows(task, rows)  # type: ignore[assignment]

        def change_space(index: FaissVectorIndex, space: str) -> FaissVectorIndex:
            index.add(space_vectors(space, added[ROW_SPACES[space]]), new_ids)
            return index

        def change_metadata(meta: MetadataStore) -> None:
            meta.append("train", records)

        return _update(
            ctx,
            r,
            op="add",
            changed_ids=new_ids,
            arrays=arrays,
            change_space=change_space,
            change_metadata=change_metadata,
            refresh_curvature=refresh_curvature,
            t0=t0,
            t_forward=t_forward,
        )


def delete_examples(
    run: str | Path, ids: Any, *, refresh_curvature: bool = True, task: Task | None = None
) -> UpdateReport:
    """Deletes training examples from the built run `run`: they never appear in results again.

    Their rows leave the arrays, FAISS and SQLite; their ids are tombstoned (kept in SQLite, never reused).
    No model is needed, except by a scope="model" run whose curvature is refreshed: its projected Gauss-Newton
    matrix is recomputed through the model over the remaining examples (`task`: the Task the run was built from;
    its training set must hold every remaining id).

    Raises:
        UnknownExampleError / ValueError: Unknown, repeated or already deleted ids, or deleting every example, or
            a scope="model" run refreshed without its task; nothing is written.
    """
    t0 = time.perf_counter()
    if task is not None and not isinstance(task, Task):
        raise TaskError(f"task must be an indexer.Task or None, got {type(task).__name__}")
    with _open(run, None if task is None else task.fingerprint()) as r:
        _model_scope_task(r, task, refresh_curvature=refresh_curvature, op="delete")
        del_ids = check_ids(ids, "ids")
        if del_ids.size == 0:
            raise ValueError("ids: nothing to delete")
        old_ids = r.train.ids
        missing = np.setdiff1d(del_ids, old_ids)
        if missing.size:
            gone = np.intersect1d(missing, r.metadata.tombstones("train"))
            raise ValueError(
                f"ids: not stored training examples: {missing[:10].tolist()}"
                + (f" (already deleted: {gone[:10].tolist()})" if gone.size else "")
            )
        keep = ~np.isin(old_ids, del_ids)
        if not keep.any():
            raise ValueError("ids: cannot delete every training example of a run")
        names = ROW_ARRAYS + (MODEL_ROW_ARRAYS if r.scope == "model" else ())
        arrays = {name: np.asarray(r.array(name))[keep] for name in names}
        factory = r.config.get("factory", "Flat")

        def change_space(index: FaissVectorIndex, space: str) -> FaissVectorIndex:
            if index.supports_remove:
                index.remove(del_ids)
                return index
            # HNSW cannot drop vectors: rebuild from the stored ones
            vecs = space_vectors(space, arrays[ROW_SPACES[space]])
            rebuilt, _ = build_vector_index(vecs, arrays["train_ids"], factory=factory)
            return rebuilt

        def change_metadata(meta: MetadataStore) -> None:
            meta.delete("train", del_ids.tolist(), deleted_at=datetime.now(UTC).isoformat(timespec="seconds"))

        ctx = BuildContext.for_update(r, task=None)
        if r.scope == "model" and task is not None:
            ctx.task = _TaskOverRows(task, RunRows.of(task, arrays["train_ids"]))  # type: ignore[assignment]
        return _update(
            ctx,
            r,
            op="delete",
            changed_ids=del_ids,
            arrays=arrays,
            change_space=change_space,
            change_metadata=change_metadata,
            refresh_curvature=refresh_curvature,
            t0=t0,
            t_forward=0.0,
        )


def _update(
    ctx: BuildContext,
    r: OpenedRun,
    *,
    op: str,
    changed_ids: np.ndarray,
    arrays: dict[str, np.ndarray],
    change_space: Callable[[FaissVectorIndex, str], FaissVectorIndex],
    change_metadata: Callable[[MetadataStore], None],
    refresh_curvature: bool,
    t0: float,
    t_forward: float,
) -> UpdateReport:
    """Writes the per-example rows, re-runs the training-set stages, then SQLite and the manifest, in that order.

    Args:
        arrays: The new contents of every `ROW_ARRAYS` array (and `MODEL_ROW_ARRAYS` of a scope="model" run).
        change_space: Changes a loaded `ROW_SPACES` index in place (or returns a rebuilt one).
        change_metadata: Changes the SQLite rows (one transaction).
    """
    timings = {"prepare": time.perf_counter() - t0 - t_forward, "body_forward": t_forward}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        timings[name] = now - mark
        mark = now

    n_before, ids = len(r.train), arrays["train_ids"]
    spaces = {}
    indexes = {}
    for space in ROW_SPACES:
        if space in r.manifest.spaces:
            indexes[space] = change_space(FaissVectorIndex.load(r.paths.vector(space)), space)
            spaces[space] = {**r.manifest.spaces[space], "ntotal": indexes[space].ntotal}
    lap("faiss_update")

    stale: list[str] = []
    for name, value in arrays.items():
        replace_array(r.paths.array(name), value)
    if r.has("tracin_self_influence"):  # per-example and model-only, but new examples would need the checkpoints
        values = np.asarray(r.array("tracin_self_influence"))
        if op == "delete":
            save_array(r.paths.array("tracin_self_influence"), values[np.isin(r.train.ids, ids)])
        else:
            filled = np.concatenate([values, np.full(len(ids) - len(values), np.nan)])
            save_array(r.paths.array("tracin_self_influence"), filled)
            stale.append("tracin_self_influence (NaN for added examples)")
    lap("write_arrays")
    for space, index in indexes.items():
        index.save(r.paths.vector(space))
    lap("write_faiss")

    rerun, kept = stages_to_rerun(ctx, refresh_curvature=refresh_curvature)
    stage_seconds: dict[str, float] = {}
    manifest = run_stages(ctx, rerun, timings=stage_seconds)
    timings |= {STAGE_TIMINGS.get(name, name): seconds for name, seconds in stage_seconds.items()}
    mark = time.perf_counter()
    with MetadataStore(r.paths.metadata, create=False) as meta:
        change_metadata(meta)
    lap("sqlite")

    extra = dict(manifest.extra)
    refreshed = ["representer" if ctx.refit_representer else "representer alpha"]
    if any(st.name == "model-curvature" for st in rerun):
        refreshed.append("model curvature")
    elif any(st.name == "model-curvature" for st in kept):
        stale.append("model curvature")
    if any(st.name == "curvature" for st in rerun):
        refreshed.append("curvature")
    else:
        extra["curvature_stale"] = extra.get("curvature_stale") or {"n_train_at_curvature": n_before}
        stale.append("curvature")
    if any(st.name == "queries" for st in rerun):
        refreshed.append("query cache")
    elif any(st.name == "queries" for st in kept):
        stale.append("query cache")
    if not ctx.refit_representer:
        stale.append("representer fit")
    extra["n_train"] = len(ids)
    extra["train_accuracy"] = float((arrays["train_logits"].argmax(1) == arrays["train_labels"]).mean())
    extra["updates"] = [
        *extra.get("updates", []),
        {
            "op": op,
            "n": len(changed_ids),
            "n_train": len(ids),
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "curvature_refreshed": bool(refresh_curvature),
        },
    ]
    save_manifest(r.root, dataclasses.replace(manifest, spaces={**manifest.spaces, **spaces}, extra=extra))
    return UpdateReport(
        op=op,
        example_ids=tuple(int(v) for v in changed_ids),
        n_train=len(ids),
        seconds=time.perf_counter() - t0,
        refreshed=tuple(refreshed),
        stale=tuple(stale),
        timings=timings,
    )
