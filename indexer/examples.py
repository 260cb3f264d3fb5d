"""The per-example build stages: what each example contributes on its own (features, metadata, gradients, TracIn).

Their rows of the examples already stored never change while the model is fixed, so an incremental update
(`indexer.update`) computes them for the new examples only, with the helpers below (`forward_examples`,
`head_outputs`, `example_records`, `head_gradients`), and appends or drops rows.

- "features": the body forward over train and test in resumable chunks: cut features h_i, labels, content
  hashes and previews (`arrays/<split>_strings_NNNNN.json`);
- "metadata": head logits, predictions, losses and margins -> arrays + SQLite (one transaction per split);
- "grad": per-example head gradients g_i at the examples' own labels (projected when the head is large) ->
  FAISS spaces "grad" (inner product) and "grad-unit" (cosine);
- "tracin": TracIn self-influence sum_c eta_c ||g_i(theta_c)||^2 over the Task's checkpoints
  (Pruthi et al. 2020, arXiv:2002.08484).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

import influence as inf
from store import ExampleRecord, MetadataStore, atomic_write_json, build_vector_index, content_hash, save_array

from .context import BuildContext, ManifestPatch
from .errors import TaskError
from .task import Task

LOGIT_ROWS = 4096
"""Examples per head forward of the "metadata" stage."""


def label_of(value: Any, position: int, name: str) -> int:
    """One example's label as an int class id: an int, or a float / 0-d tensor / array holding a whole number.

    Raises:
        TaskError: The label is not a whole number (a float label such as 0.9 is never truncated), not one
            value, or not a number; the message names the dataset, the example's position and the value.
    """
    v = value
    if isinstance(v, torch.Tensor | np.ndarray):
        if (v.size if isinstance(v, np.ndarray) else v.numel()) != 1:
            raise TaskError(f"{name}: example {position} has a label of shape {tuple(v.shape)}; labels are class ids")
        v = v.item()
    if isinstance(v, bool | np.bool_):
        return int(v)
    if isinstance(v, int | np.integer):
        return int(v)
    if isinstance(v, float | np.floating) and math.isfinite(v) and float(v).is_integer():
        return int(v)
    shown = f"{v:.6g}" if isinstance(v, float | np.floating) else repr(v)
    raise TaskError(
        f"{name}: example {position} has label {shown}; labels must be integer class ids (float labels are "
        "refused, not truncated)"
    )


def iterate(
    ds: Any, indices: range, batch_size: int, *, name: str = "dataset"
) -> Iterator[tuple[Any, torch.Tensor, list[Any]]]:
    """Batches `(x, y, raw_items)` of the examples at `indices` (texts stay a list of str for a text body).

    Labels are checked one by one (`label_of`); `name` is how errors name the dataset.
    """
    loader = DataLoader(Subset(ds, list(indices)), batch_size=batch_size, shuffle=False, collate_fn=lambda b: b)
    position = indices.start
    for items in loader:
        xs = [item[0] for item in items]
        ys = [label_of(item[1], position + j, name) for j, item in enumerate(items)]
        position += len(items)
        x = xs if all(isinstance(v, str) for v in xs) else torch.stack([torch.as_tensor(v) for v in xs])
        y = torch.as_tensor(ys, dtype=torch.int64)
        yield x, y, xs


def example_hash(x: Any) -> str:
    """The content hash of one raw example (a text, or an array-like input)."""
    if isinstance(x, str):
        return content_hash(x.encode())
    return content_hash(
        np.ascontiguousarray(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)).tobytes()
    )


def task_splits(task: Task) -> Iterator[tuple[str, Any]]:
    """(split, dataset) of the Task: train, then test when it has one."""
    yield "train", task.train
    if task.test is not None:
        yield "test", task.test


@dataclasses.dataclass(frozen=True)
class ForwardedExamples:
    """The body forward of some examples: cut features h [m, *feature_shape] float32, labels y [m] int64,
    content hashes and previews [m]."""

    h: np.ndarray
    y: np.ndarray
    hashes: list[str]
    previews: list[str]


def forward_examples(
    task: Task,
    ds: Any,
    rows: range,
    *,
    n_classes: int,
    name: str,
    feature_shape: tuple[int, ...] | None = None,
    bar: Any = None,
) -> ForwardedExamples:
    """Runs the Task's body over the examples `rows` of `ds`, checking what it gives.

    Args:
        name: How errors name the dataset ("train dataset", "train").
        feature_shape: When given, the feature shape every example must give (an update of a built run).
        bar: A progress bar advanced by the examples done.

    Raises:
        TaskError: An example gives features of another shape or non-finite ones, or a label outside
            [0, n_classes); the message names the example's position in `ds`.
    """
    hs, ys, hashes, previews = [], [], [], []
    done = 0
    for x, y, raw in iterate(ds, rows, task.batch_size, name=name):
        h = np.asarray(task.features(x), np.float32)
        if feature_shape is not None and tuple(h.shape[1:]) != feature_shape:
            raise TaskError(f"{name}: examples give features {tuple(h.shape[1:])}, the run has {feature_shape}")
        if not np.isfinite(h).all():
            first = rows.start + done + int(np.argmax(~np.isfinite(h).reshape(len(h), -1).all(1)))
            raise TaskError(f"{name}: example {first} gives non-finite features (NaN/inf)")
        outside = (y < 0) | (y >= n_classes)
        if outside.any():
            j = int(torch.argmax(outside.to(torch.int8)))
            raise TaskError(
                f"{name}: example {rows.start + done + j} has label {int(y[j])}, outside the model's classes "
                f"[0, {n_classes})"
            )
        hs.append(h)
        ys.append(y.numpy())
        hashes.extend(example_hash(v) for v in raw)
        previews.extend(task.preview(v) for v in raw)
        done += len(y)
        if bar is not None:
            bar.update(len(y))
    return ForwardedExamples(np.concatenate(hs), np.concatenate(ys).astype(np.int64), hashes, previews)


def head_outputs(
    spec: list[dict[str, Any]], params: Any, h: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits [m, classes] float32, losses [m], margins [m]) of the head on cut features h at labels y."""
    logits = np.concatenate(
        [np.asarray(inf.apply_head(spec, params, h[i : i + LOGIT_ROWS])) for i in range(0, len(h), LOGIT_ROWS)]
    ).astype(np.float32)
    return logits, np.asarray(inf.cross_entropy(logits, y)), np.asarray(inf.compute_margins(logits, y))


def example_records(
    split: str,
    ids: np.ndarray,
    y: np.ndarray,
    logits: np.ndarray,
    losses: np.ndarray,
    margins: np.ndarray,
    hashes: list[str],
    previews: list[str],
) -> Iterator[ExampleRecord]:
    """The SQLite records of examples (one per row of the arrays)."""
    preds = logits.argmax(1)
    for i in range(len(y)):
        yield ExampleRecord(
            split=split,
            example_id=int(ids[i]),
            label=int(y[i]),
            prediction=int(preds[i]),
            loss=float(losses[i]),
            margin=float(margins[i]),
            content_hash=hashes[i],
            preview=previews[i],
        )


def head_gradients(ctx: BuildContext, h: np.ndarray, y: np.ndarray, *, project: bool = True) -> np.ndarray:
    """Per-example head gradients g_i [m, d] float32 at labels y, projected when the run projects them (and
    `project`)."""
    g = ctx.head.gradients(np.asarray(h), y)
    proj = ctx.manifest.projection
    if proj and project:
        g = inf.project(g, seed=proj.seed, d=proj.dim)
    return np.asarray(g, np.float32)


# ------------------------------------------------------------------------------------------------ stages
def _forward_chunk(
    task: Task, ds: Any, split: str, n: int, chunk_rows: int, n_classes: int, chunk: int
) -> dict[str, Any]:
    """One chunk of the "features" stage: features h, labels y, content hashes and previews of its rows."""
    start = chunk * chunk_rows
    out = forward_examples(
        task, ds, range(start, min(start + chunk_rows, n)), n_classes=n_classes, name=f"{split} dataset"
    )
    return {"h": out.h, "y": out.y, "hash": out.hashes, "preview": out.previews}


def features_stage(ctx: BuildContext) -> ManifestPatch:
    """Body forward over train and test in resumable chunks (shards on a Ray cluster in a distributed build):
    features, labels, hashes, previews."""
    from .shards import run_chunks

    task, paths, rows = ctx.task, ctx.paths, ctx.config.chunk_rows
    for split, ds in task_splits(task):
        n = len(ds)
        x0, _, _ = next(iterate(ds, range(1), 1, name=f"{split} dataset"))
        fshape = tuple(task.features(x0).shape[1:])
        feats = ctx.chunked(paths.split_array(split, "features"), shape=(n, *fshape), dtype=np.float32, chunk_rows=rows)
        labels = ctx.chunked(paths.split_array(split, "labels"), shape=(n,), dtype=np.int64, chunk_rows=rows)

        def commit(
            chunk: int, out: dict[str, Any], feats: Any = feats, labels: Any = labels, split: str = split
        ) -> None:
            strings = {"hash": [str(v) for v in out["hash"]], "preview": [str(v) for v in out["preview"]]}
            atomic_write_json(paths.strings(split, chunk), strings)
            labels.write_chunk(chunk, out["y"])
            feats.write_chunk(chunk, out["h"])

        compute = functools.partial(_forward_chunk, task, ds, split, n, rows, ctx.n_classes)
        run_chunks(
            ctx, f"{split}_features", feats.missing_chunks(), compute, commit, desc=f"features {split}", model=task
        )
    return ManifestPatch(extra={"feature_shape": list(fshape)})


def metadata_stage(ctx: BuildContext) -> ManifestPatch:
    """Logits, predictions, losses and margins of every example -> arrays + SQLite (one transaction per split)."""
    task, paths = ctx.task, ctx.paths
    extra: dict[str, Any] = {}
    with MetadataStore(paths.metadata) as meta:
        for split, ds in task_splits(task):
            h, y = ctx.split(split)
            logits, losses, margins = head_outputs(ctx.spec, ctx.params, h, y)
            save_array(paths.split_array(split, "logits"), logits)
            ids = task.ids(split)
            hashes: list[str] = []
            previews: list[str] = []
            for chunk in range(math.ceil(len(ds) / ctx.config.chunk_rows)):
                strings = json.loads(paths.strings(split, chunk).read_text())
                hashes.extend(strings["hash"])
                previews.extend(strings["preview"])
            save_array(paths.split_array(split, "ids"), ids)
            meta.replace_split(split, example_records(split, ids, y, logits, losses, margins, hashes, previews))
            extra[f"{split}_accuracy"] = float((logits.argmax(1) == y).mean())
    return ManifestPatch(extra=extra)


def _grad_chunk(ctx: BuildContext, chunk_rows: int, chunk: int) -> dict[str, np.ndarray]:
    """One chunk of the "grad" stage: the head gradients of its rows, from the stored features and labels."""
    h, y = ctx.split("train")
    sl = slice(chunk * chunk_rows, min((chunk + 1) * chunk_rows, len(y)))
    return {"g": head_gradients(ctx, h[sl], y[sl])}


def grad_stage(ctx: BuildContext) -> ManifestPatch:
    """Per-example head gradients at the examples' own labels (shards on a Ray cluster in a distributed build)
    -> FAISS "grad" and "grad-unit"."""
    from .shards import run_chunks, space_adder

    h, _ = ctx.split("train")
    proj = ctx.manifest.projection
    dim = proj.dim if proj else ctx.n_params
    vectors = ctx.chunked(
        ctx.paths.array("grad_vectors"),
        shape=(len(h), dim),
        dtype=np.float32,
        chunk_rows=min(ctx.config.chunk_rows, 1024),
    )
    remote_ctx = dataclasses.replace(ctx, task=None, progress=False)  # what a worker needs: head, run files
    run_chunks(
        ctx,
        "grad_vectors",
        vectors.missing_chunks(),
        functools.partial(_grad_chunk, remote_ctx, min(ctx.config.chunk_rows, 1024)),
        lambda chunk, out: vectors.write_chunk(chunk, out["g"]),
        desc="gradients",
    )
    g_all = np.ascontiguousarray(vectors.array())
    ids = ctx.ids("train")
    spaces = {}
    for space, vecs, unit in (
        ("grad", g_all, False),
        ("grad-unit", np.asarray(inf.normalize_rows(g_all), np.float32), True),
    ):
        add = space_adder(ctx, "grad_vectors", normalize=unit)
        index, spaces[space] = build_vector_index(vecs, ids, factory=ctx.config.factory, add=add)
        index.save(ctx.paths.vector(space))
    return ManifestPatch(spaces=spaces)


def has_checkpoints(ctx: BuildContext) -> bool:
    """Whether the Task has TracIn checkpoints (without, the "tracin" stage has nothing to do)."""
    return ctx.task is not None and bool(ctx.task.checkpoints)


def tracin_stage(ctx: BuildContext) -> ManifestPatch:
    """TracIn self-influence sum_c eta_c ||g_i(theta_c)||^2 over the Task's checkpoints.

    Each checkpoint is loaded into the model in turn (restored afterwards, also on error); the body runs
    again when it has parameters, since the cut features move with the checkpoint.
    """
    from .task import load_checkpoint

    task = ctx.task
    model = task.model
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    body_has_params = any(True for _ in task.body_module.parameters())
    n = len(task.train)
    total = np.zeros(n, np.float64)
    try:
        for state, lr in tqdm(task.checkpoints, desc="tracin", unit="ckpt", disable=not ctx.progress):
            model.load_state_dict(load_checkpoint(state))
            translated = task.translated_head()
            head = inf.Head(translated.spec, translated.params)
            h_cached, y = ctx.split("train")
            step = task.batch_size if body_has_params else 1024
            for start in range(0, n, step):
                sl = slice(start, min(start + step, n))
                if body_has_params:
                    x, _, _ = next(iterate(task.train, range(sl.start, sl.stop), step))
                    h = task.features(x)
                else:
                    h = np.asarray(h_cached[sl])
                g = head.gradients(h, y[sl])
                inf.accumulate_tracin_self_influence(total[sl], np.asarray(g), lr)
    finally:
        model.load_state_dict(original)
    save_array(ctx.paths.array("tracin_self_influence"), total)
    return ManifestPatch(extra={"tracin": {"checkpoints": len(task.checkpoints)}})
