"""The offline build: body forward -> cached features -> metadata, gradient and representer spaces, curvature.

`build_run` opens (or starts) the run directory and runs the stages of `indexer.stages` in order. Each is
recorded in the manifest only when its artifacts are on disk, so a build killed at any point resumes with the
same command: cached features are written in chunks with a done-mask, SQLite rows are replaced in one
transaction, FAISS files and arrays are written atomically.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

import influence as inf
from store import (
    ConfigMismatchError,
    HeadRecord,
    Manifest,
    ProjectionRecord,
    RunPaths,
    head_tensors,
    load_manifest,
    remove_stale_temps,
    save_manifest,
    save_tensors,
)
from store.atomic import is_temp_name

from .config import IndexConfig
from .context import BuildContext
from .errors import TaskError
from .examples import iterate
from .stages import run_stages
from .task import Task
from .translate import check_head_logits

__all__ = ["Builder", "IndexConfig", "build_run"]


def _is_unstarted(paths: RunPaths) -> bool:
    """True when the directory is empty or holds only what a start killed before its manifest leaves behind
    (the empty ``vectors/`` and ``arrays/``, the head tensors, a temporary file of an atomic write): safe to
    start over."""
    for entry in paths.root.iterdir():
        if entry in (paths.vectors_dir, paths.arrays_dir) and entry.is_dir() and not any(entry.iterdir()):
            continue
        if entry == paths.head or is_temp_name(entry.name):
            continue
        return False
    return True


class Builder:
    """Runs the build stages for one Task into one run directory."""

    def __init__(
        self, task: Task, out: str | Path, config: IndexConfig, progress: bool = True, *, distributed: bool = False
    ) -> None:
        self.task, self.config, self.progress, self.distributed = task, config, progress, distributed
        self.paths = RunPaths(Path(out))
        self.head = task.translated_head()
        self.fingerprint = task.fingerprint()
        if task.scope_kind != "head" and config.curvature != "ggn":
            raise TaskError(
                f"curvature={config.curvature!r} is not available for scope={task.scope_kind!r}: its projected curvature "
                "is the Gauss-Newton matrix (indexer.block); use IndexConfig(curvature='ggn')"
            )

    def open_or_start(self) -> Manifest:
        """The manifest of the run directory: the stored one when resuming (same model and config), else a new
        run's, saved with the head tensors once the torch and JAX heads agree."""
        paths = self.paths
        if paths.manifest.exists():
            manifest = load_manifest(paths.root)
            if manifest.model_fingerprint != self.fingerprint:
                raise ConfigMismatchError(
                    f"run directory {paths.root} was built for model {manifest.model_fingerprint[:16]}, "
                    f"not this model ({self.fingerprint[:16]}): use another --out"
                )
            # runs written before a config field existed hold its default
            stored = {**IndexConfig().to_dict(), **manifest.methods}
            if stored != self.config.to_dict() or manifest.task != self.task.config():
                raise ConfigMismatchError(
                    f"run directory {paths.root} was started with another config "
                    f"({manifest.methods}, {manifest.task}); use another --out or the same config"
                )
            if "complete" not in manifest.stages:  # resuming: drop what a killed build was half-way writing
                remove_stale_temps(paths.root)
            return manifest
        if paths.root.exists() and not _is_unstarted(paths):
            raise TaskError(f"out directory {paths.root} exists, is not empty and holds no run (no manifest.json)")
        logit_diff = self.check_translation()
        paths.create_dirs()
        save_tensors(paths.head, head_tensors(self.head.params))
        p = self.head.n_params
        projection = (
            ProjectionRecord(seed=self.config.projection_seed, dim=self.config.projection_dim, n_params=p)
            if p > self.config.project_above
            else None
        )
        manifest = Manifest(
            model_fingerprint=self.fingerprint,
            task=self.task.config(),
            methods=self.config.to_dict(),
            head=HeadRecord(spec=self.head.spec, n_classes=self.head.n_classes, n_params=p),
            projection=projection,
            spaces={},
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            extra={"max_abs_logit_diff": logit_diff},
        )
        save_manifest(paths.root, manifest)
        return manifest

    def check_translation(self) -> float:
        """The max abs difference of the torch and JAX head logits on up to 256 training examples (refused
        above `logit_tolerance`)."""
        n = min(len(self.task.train), 256)
        x, _, _ = next(iterate(self.task.train, range(n), n, name="train dataset"))
        h = self.task.features(x)
        bad = ~np.isfinite(h.reshape(len(h), -1)).all(1)
        if bad.any():
            raise TaskError(f"train dataset: example {int(np.argmax(bad))} gives non-finite features (NaN/inf)")
        with torch.no_grad():
            torch_logits = self.task.head_forward(torch.as_tensor(h)).numpy()
        jax_logits = np.asarray(inf.apply_head(self.head.spec, self.head.params, h))
        logit_diff = check_head_logits(torch_logits, jax_logits, tolerance=self.config.logit_tolerance)
        if torch_logits.ndim != 2:
            raise TaskError(f"model must output logits [batch, n_classes], got shape {torch_logits.shape}")
        return logit_diff

    def run(self) -> Manifest:
        """Runs every stage the manifest does not record yet, then records "complete"."""
        t0 = time.perf_counter()
        ctx = BuildContext(
            paths=self.paths,
            config=self.config,
            manifest=self.open_or_start(),
            spec=self.head.spec,
            params=self.head.params,
            l2=self.task.l2,
            task=self.task,
            progress=self.progress,
            distributed=self.distributed,
        )
        timings: dict[str, float] = {}
        manifest = run_stages(ctx, timings=timings)
        if "complete" not in manifest.stages:
            manifest = manifest.with_stage("complete")
            # seconds of the last attempt, in total and per stage it ran (a resumed build: the stages it redid)
            seconds = {"build_seconds_last": time.perf_counter() - t0, "stage_seconds_last": timings}
            manifest = dataclasses.replace(manifest, extra={**manifest.extra, **seconds})
            save_manifest(self.paths.root, manifest)
        return manifest


def build_run(
    task: Task,
    out: str | Path,
    *,
    config: IndexConfig | None = None,
    progress: bool = True,
    distributed: bool = False,
) -> Manifest:
    """Builds (or resumes) the run directory `out` for `task`; returns the final manifest.

    With `distributed` the per-example stages run as shards on the connected Ray cluster (`indexer.shards`);
    the results are the same.
    """
    if not isinstance(task, Task):
        raise TaskError(f"task must be an indexer.Task, got {type(task).__name__}")
    return Builder(task, out, config or IndexConfig(), progress=progress, distributed=distributed).run()
