"""Incremental maintenance of a built run: add training examples, delete (tombstone) them.

The model is fixed (same fingerprint), so per-example quantities of the examples already indexed do not change:
cut features h_i, head gradients g_i (at theta, the model's own head) and their FAISS vectors. What depends on
the whole training set is recomputed:

- the representer fit (Yeh et al. 2018: Theta* = argmin (1/n) sum_i CE(Theta phi_i, y_i) + lam ||Theta||^2,
  alpha_i = -(softmax(Theta* phi_i) - onehot(y_i)) / (2 lam n)) is refitted, warm-started from the stored Theta*,
  and its FAISS space rebuilt (every alpha_i changes with n);
- the curvature (mean over the training set, + l2) is recomputed when `refresh_curvature=True` (default). With
  False its stored eigenpairs / top eigenvalue are kept and the manifest notes them as stale (LiSSA still iterates
  on the current training set; deflation and "exact" then use the old curvature).

Adds get new ids (default: after every id ever used); deletes remove the rows from the arrays, FAISS and SQLite
and record the ids as tombstones, so they never appear in results and are never reused. FAISS ids stay equal to
the SQLite ids; `store.verify_run` (`influence info --verify`) checks it. After adds and deletes with refreshes,
results equal a fresh build on the same examples with the same ids.

Each file is replaced atomically, arrays first, then FAISS, then SQLite (one transaction), the manifest last; an
update killed in between leaves a run that `verify_run` reports as inconsistent (re-run from a copy).
"""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import influence as inf
from store import (
    ConfigMismatchError,
    CorruptRunError,
    ExampleRecord,
    FaissVectorIndex,
    MetadataStore,
    RunPaths,
    build_vector_index,
    load_array,
    load_manifest,
    load_tensors,
    save_array,
    save_manifest,
)
from store.arrays import replace_array

from .build import IndexConfig, example_hash, iterate, params_from_tensors, write_curvature
from .errors import TaskError
from .task import Task

#: arrays with one row per training example, rewritten on every update
ROW_ARRAYS = ("train_features", "train_labels", "train_ids", "train_logits", "grad_vectors", "train_phi")


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


class _Run:
    """The pieces of a complete run directory an update reads."""

    def __init__(self, run: str | Path) -> None:
        self.paths = RunPaths(Path(run))
        self.manifest = load_manifest(self.paths.root)
        if "complete" not in self.manifest.stages:
            raise CorruptRunError(f"run: {self.paths.root} is not a complete build (stages {self.manifest.stages})")
        if self.manifest.task.get("scope", "head") != "head":
            raise ValueError(
                f"run: {self.paths.root} was built with scope={self.manifest.task['scope']!r}; incremental adds and "
                "deletes cover scope='head' runs only (its last-block curvature is over the training set): rebuild"
            )
        self.spec = self.manifest.head["spec"]
        self.params = params_from_tensors(self.spec, load_tensors(self.paths.head))
        self.theta, self.unravel = inf.flatten_params(self.params)
        self.config = IndexConfig(**self.manifest.methods)
        self.l2 = float(self.manifest.task["l2"])
        self.arrays = {name: np.asarray(load_array(self.paths.array(name))) for name in ROW_ARRAYS}

    def gradients(self, h: np.ndarray, y: np.ndarray) -> np.ndarray:
        g = np.asarray(inf.compute_per_example_grads(self.spec, self.unravel, self.theta, h, y))
        proj = self.manifest.projection
        if proj:
            g = np.asarray(inf.project(g, seed=proj["seed"], d=proj["dim"]))
        return g.astype(np.float32)


def _check_ids(ids: Any, name: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"{name}: must be a 1-D sequence of int ids, got {ids!r}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name}: must be >= 0, got {arr[arr < 0][:10].tolist()}")
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{name}: must be unique, duplicated {uniq[counts > 1][:10].tolist()}")
    return arr


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
    r = _Run(run)
    if task.fingerprint() != r.manifest.model_fingerprint:
        raise ConfigMismatchError(
            f"task: model fingerprint {task.fingerprint()[:16]} differs from the run's "
            f"{r.manifest.model_fingerprint[:16]} ({r.paths.root}): adds need the model the run was built with"
        )
    m = len(train)
    if m == 0:
        raise ValueError("train: no examples to add")
    old_ids = r.arrays["train_ids"]
    with MetadataStore(r.paths.metadata, create=False) as meta:
        retired = meta.tombstones("train")
    if ids is None:
        start = int(max(old_ids.max(initial=-1), retired.max(initial=-1))) + 1
        new_ids = np.arange(start, start + m, dtype=np.int64)
    else:
        new_ids = _check_ids(ids, "ids")
        if len(new_ids) != m:
            raise ValueError(f"ids: must have one id per new example ({m}), got {len(new_ids)}")
        used = np.intersect1d(new_ids, np.concatenate([old_ids, retired]))
        if used.size:
            raise ValueError(f"ids: already used in this run (stored or deleted): {used[:10].tolist()}")

    # body forward over the new examples only
    n_classes = int(r.manifest.head["n_classes"])
    fshape = tuple(r.manifest.extra["feature_shape"])
    hs, ys, hashes, previews = [], [], [], []
    from tqdm.auto import tqdm

    bar = tqdm(total=m, desc="features add", unit="ex", disable=not progress)
    for x, y, raw in iterate(train, range(m), task.batch_size):
        h = np.asarray(task.features(x), np.float32)
        if tuple(h.shape[1:]) != fshape:
            raise ValueError(f"train: examples give features {tuple(h.shape[1:])}, the run has {fshape}")
        if not np.isfinite(h).all():
            raise ValueError("train: some new examples give non-finite features (NaN/inf)")
        if (y < 0).any() or (y >= n_classes).any():
            raise ValueError(f"train: labels must be in [0, {n_classes}), got {y.min().item()}..{y.max().item()}")
        hs.append(h)
        ys.append(y.numpy())
        hashes.extend(example_hash(v) for v in raw)
        previews.extend(task.preview(v) for v in raw)
        bar.update(len(y))
    bar.close()
    h_new, y_new = np.concatenate(hs), np.concatenate(ys).astype(np.int64)
    t_forward = time.perf_counter() - t0
    logits = np.asarray(inf.apply_head(r.spec, r.params, h_new), np.float32)
    losses = np.asarray(inf.cross_entropy(logits, y_new))
    margins = np.asarray(inf.compute_margins(logits, y_new))
    phi_new = np.asarray(inf.augment_features(np.asarray(inf.penultimate_features(r.spec, r.params, h_new))))
    g_new = r.gradients(h_new, y_new)

    a = r.arrays
    arrays = {
        "train_features": np.concatenate([a["train_features"], h_new.astype(a["train_features"].dtype)]),
        "train_labels": np.concatenate([a["train_labels"], y_new]),
        "train_ids": np.concatenate([old_ids, new_ids]),
        "train_logits": np.concatenate([a["train_logits"], logits]),
        "grad_vectors": np.concatenate([a["grad_vectors"], g_new]),
        "train_phi": np.concatenate([a["train_phi"], phi_new.astype(a["train_phi"].dtype)]),
    }
    records = [
        ExampleRecord(
            split="train",
            example_id=int(new_ids[i]),
            label=int(y_new[i]),
            prediction=int(logits[i].argmax()),
            loss=float(losses[i]),
            margin=float(margins[i]),
            content_hash=hashes[i],
            preview=previews[i],
        )
        for i in range(m)
    ]

    def faiss_change(index: FaissVectorIndex, space: str) -> None:
        vecs = g_new if space == "grad" else np.asarray(inf.normalize_rows(g_new), np.float32)
        index.add(vecs, new_ids)

    def sqlite_change(meta: MetadataStore) -> None:
        meta.append("train", records)

    return _commit(
        r, "add", new_ids, arrays, faiss_change, sqlite_change, refresh_curvature, t0, t_forward, refresh_representer
    )


def delete_examples(run: str | Path, ids: Any, *, refresh_curvature: bool = True) -> UpdateReport:
    """Deletes training examples from the built run `run`: they never appear in results again.

    Their rows leave the arrays, FAISS and SQLite; their ids are tombstoned (kept in SQLite, never reused).
    No model is needed.

    Raises:
        UnknownExampleError / ValueError: Unknown, repeated or already deleted ids, or deleting every example;
            nothing is written.
    """
    t0 = time.perf_counter()
    r = _Run(run)
    del_ids = _check_ids(ids, "ids")
    if del_ids.size == 0:
        raise ValueError("ids: nothing to delete")
    old_ids = r.arrays["train_ids"]
    missing = np.setdiff1d(del_ids, old_ids)
    if missing.size:
        with MetadataStore(r.paths.metadata, create=False) as meta:
            gone = np.intersect1d(missing, meta.tombstones("train"))
        raise ValueError(
            f"ids: not stored training examples: {missing[:10].tolist()}"
            + (f" (already deleted: {gone[:10].tolist()})" if gone.size else "")
        )
    keep = ~np.isin(old_ids, del_ids)
    if not keep.any():
        raise ValueError("ids: cannot delete every training example of a run")
    arrays = {name: value[keep] for name, value in r.arrays.items()}

    def faiss_change(index: FaissVectorIndex, space: str) -> FaissVectorIndex:
        if index.supports_remove:
            index.remove(del_ids)
            return index
        vecs = arrays["grad_vectors"]  # HNSW cannot drop vectors: rebuild from the stored ones
        if space == "grad-unit":
            vecs = np.asarray(inf.normalize_rows(vecs), np.float32)
        rebuilt, _ = build_vector_index(vecs, arrays["train_ids"], factory=r.config.factory)
        return rebuilt

    def sqlite_change(meta: MetadataStore) -> None:
        meta.delete("train", del_ids.tolist(), deleted_at=datetime.now(UTC).isoformat(timespec="seconds"))

    return _commit(r, "delete", del_ids, arrays, faiss_change, sqlite_change, refresh_curvature, t0, 0.0)


def _commit(
    r: _Run, op, changed_ids, arrays, faiss_change, sqlite_change, refresh_curvature, t0, t_forward, refit=True
) -> UpdateReport:
    """Refits what depends on the whole training set, then replaces the files: arrays, FAISS, SQLite, manifest."""
    timings = {"prepare": time.perf_counter() - t0 - t_forward, "body_forward": t_forward}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        timings[name] = now - mark
        mark = now

    labels = arrays["train_labels"]
    ids = arrays["train_ids"]
    # representer: warm-started refit on all current examples; every alpha_i changes with n
    rep = dict(r.manifest.extra.get("representer") or {})
    lam = float(rep["lambda"])
    phi = np.asarray(arrays["train_phi"], np.float64)
    theta0 = np.asarray(load_array(r.paths.array("representer_theta")), np.float64)
    if refit:
        theta, alpha, grad_norm = inf.fit_representer(phi, labels, theta0, lam=lam)
    else:  # alpha_i = -(softmax(Theta* phi_i) - onehot(y_i)) / (2 lam n) at the stored Theta*, current n
        theta, alpha, grad_norm = theta0, inf.compute_representer_alpha(phi, labels, theta0, lam=lam), float("nan")
    alpha = np.asarray(alpha)
    emb = np.asarray(inf.compute_representer_embeddings(alpha, phi), np.float32)
    lap("representer_refit")
    rep_index, rep_spec = build_vector_index(emb, ids, factory=r.config.factory)

    spaces = dict(r.manifest.spaces)
    grad_indexes = {}
    for space in ("grad", "grad-unit"):
        if space not in spaces:
            continue
        index = FaissVectorIndex.load(r.paths.vector(space))
        changed = faiss_change(index, space)
        grad_indexes[space] = changed if changed is not None else index
        spaces[space] = {**spaces[space], "ntotal": grad_indexes[space].ntotal}
    spaces["representer"] = rep_spec
    lap("faiss_update")

    # write: arrays, FAISS, SQLite (one transaction), manifest last
    for name, value in arrays.items():
        replace_array(r.paths.array(name), value)
    save_array(r.paths.array("representer_alpha"), alpha.astype(np.float32))
    save_array(r.paths.array("representer_theta"), np.asarray(theta, np.float32))
    stale: list[str] = []
    tracin = r.paths.array("tracin_self_influence")
    if tracin.exists():  # per-example and model-only, but new examples would need the checkpoints
        values = np.asarray(load_array(tracin))
        if op == "delete":
            save_array(tracin, values[np.isin(r.arrays["train_ids"], ids)])
        else:
            save_array(tracin, np.concatenate([values, np.full(len(ids) - len(values), np.nan)]))
            stale.append("tracin_self_influence (NaN for added examples)")
    lap("write_arrays")
    for space, index in grad_indexes.items():
        index.save(r.paths.vector(space))
    rep_index.save(r.paths.vector("representer"))
    lap("write_faiss")
    with MetadataStore(r.paths.metadata, create=False) as meta:
        sqlite_change(meta)
    lap("sqlite")

    extra = dict(r.manifest.extra)
    refreshed = ["representer"] if refit else ["representer alpha"]
    if refresh_curvature:
        h = arrays["train_features"]
        extra |= write_curvature(
            r.paths, r.spec, int(r.manifest.head["n_params"]), r.unravel, r.theta, h, labels, l2=r.l2, config=r.config
        )
        extra.pop("curvature_stale", None)
        refreshed.append("curvature")
        lap("curvature")
    else:
        note = extra.get("curvature_stale") or {"n_train_at_curvature": len(r.arrays["train_ids"])}
        extra["curvature_stale"] = note
        stale.append("curvature")
    if refit:
        extra["representer"] = {**rep, "grad_norm": float(grad_norm), "fidelity": None}
        extra.pop("representer_stale", None)
    else:
        extra["representer_stale"] = extra.get("representer_stale") or {"n_train_at_fit": len(r.arrays["train_ids"])}
        stale.append("representer fit")
    extra["n_train"] = len(ids)
    updates = list(extra.get("updates", []))
    updates.append(
        {
            "op": op,
            "n": len(changed_ids),
            "n_train": len(ids),
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "curvature_refreshed": bool(refresh_curvature),
        }
    )
    extra["updates"] = updates
    manifest = load_manifest(r.paths.root)
    save_manifest(r.paths.root, dataclasses.replace(manifest, spaces=spaces, extra=extra))
    return UpdateReport(
        op=op,
        example_ids=tuple(int(v) for v in changed_ids),
        n_train=len(ids),
        seconds=time.perf_counter() - t0,
        refreshed=tuple(refreshed),
        stale=tuple(stale),
        timings=timings,
    )
