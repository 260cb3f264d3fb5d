"""The build stages, declared once: what each reads, what it writes, whether it is per-example; one loop runs them.

A stage is a function ``BuildContext -> ManifestPatch`` (`indexer.context`): it reads run files and the
context, writes its artifacts (names of `store.layout`), and returns what the manifest gains. `run_stages` runs
stages in `STAGES` order:

- a build (`indexer.build`) skips the stages its manifest records and saves each stage's patch together with its
  mark once its artifacts are on disk (one atomic manifest write), so a build killed anywhere resumes at the
  first unrecorded stage with the same command;
- an incremental update (`indexer.update`) re-runs the recorded stages that depend on the whole training set
  (``per_example=False``) on the changed training set, and saves the manifest last, after SQLite.

The names are those of every run directory written so far ("complete" is recorded after the last); "whitened"
ran before "kronecker" until it whitened with the EK-FAC (a build resumed from such a directory skips whichever
of the two its manifest records and runs the other).

| stage | reads | writes | per-example |
|---|---|---|---|
| features | task | <split>_features, <split>_labels, strings | yes |
| metadata | task, features, labels, strings | <split>_logits, <split>_ids, metadata.sqlite | yes |
| grad | train features, labels, ids | grad_vectors, spaces grad / grad-unit | yes |
| representer | train and test features, train labels, ids | train_phi, representer_alpha / _theta, space | no |
| curvature | train features, labels | curvature_(top_)eigenvalues / eigenvectors | no |
| damping | train and test features, labels, curvature arrays | the calibrated damping (manifest) | no |
| kronecker | train features | kronecker_bases, kfac_eigenvalues, ekfac_eigenvalues | no |
| whitened | train features, labels, ids, EK-FAC arrays (else curvature top eigenpairs) | whitened_vectors, space grad-whitened | no |
| tracin | task, train features, labels | tracin_self_influence | yes |
| queries | train and test arrays, curvature arrays | query_solutions / targets / residuals / depths | no |
| block | task, labels, logits, ids | block_* arrays, spaces block / block-unit | no |
| model | task, labels, logits, ids | model_train / test vectors, test targets, spaces model / model-unit | yes |
| model-curvature | task, train labels, the model record | model_curvature, model_kronecker_bases, model_(e)kfac_eigenvalues | no |
| model-damping | task, train and test labels, model_curvature, model_train_vectors | the calibrated damping (manifest) | no |

A scope="model" run skips the head's solve stages (curvature, damping, kronecker, whitened, queries: `is_head_solve`);
its "model-*" stages hold the curvature and damping every solve on it uses. The head's grad and representer stages
still run (the representer stays on the last linear layer).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from store import ARRAYS, SPACES, Manifest, save_manifest

from .block import block_stage, is_last_block
from .calibration import damping_stage
from .context import BuildContext, ManifestPatch
from .examples import features_stage, grad_stage, has_checkpoints, metadata_stage, tracin_stage
from .model_calibration import model_damping_stage
from .model_stage import is_model_scope, model_curvature_stage, model_stage
from .queries import has_query_cache, queries_stage
from .training_set import (
    curvature_stage,
    has_whitening_model,
    kronecker_stage,
    representer_stage,
    whitened_stage,
)

TASK = "task"
"""Pseudo-input: the Task itself (model, datasets); stages that read it run only when one is given."""
METADATA = "metadata.sqlite"
"""The SQLite example metadata."""
STRINGS = "strings"
"""The ``arrays/<split>_strings_NNNNN.json`` sidecars (content hashes and previews, `RunPaths.strings`)."""
_INPUTS = frozenset({TASK, METADATA, STRINGS}) | frozenset(ARRAYS) | frozenset(SPACES)


def _always(ctx: BuildContext) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Stage:
    """One build stage.

    Attributes:
        name: The name recorded in the manifest once the stage's artifacts are on disk.
        reads: What it reads: declared arrays and spaces (`store.layout`), `TASK`, `METADATA`, `STRINGS`; it also
            reads the manifest the stages before it left.
        writes: What it writes, the same kinds of names.
        per_example: True when each example's rows depend on that example alone (they never change while the
            model is fixed: an update computes them for new examples only); False when the outputs depend on
            the whole training set (an update re-runs the stage).
        run: Writes the artifacts and returns the manifest patch.
        applies: Whether the stage has anything to do for this run (a stage that has nothing to do is still
            recorded, with an empty patch).
    """

    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    per_example: bool
    run: Callable[[BuildContext], ManifestPatch]
    applies: Callable[[BuildContext], bool] = _always

    def __post_init__(self) -> None:
        unknown = sorted((set(self.reads) | set(self.writes)) - _INPUTS)
        if unknown:
            raise ValueError(f"stage {self.name!r}: {unknown} are not declared in the run layout (store.layout)")


def _both(stem: str) -> tuple[str, str]:
    return f"train_{stem}", f"test_{stem}"


CURVATURE_ARRAYS = (
    "curvature_top_eigenvalues",
    "curvature_top_eigenvectors",
    "curvature_eigenvalues",
    "curvature_eigenvectors",
)

KRONECKER_ARRAYS = ("kronecker_bases", "kfac_eigenvalues", "ekfac_eigenvalues")

MODEL_CURVATURE_ARRAYS = (
    "model_curvature",
    "model_kronecker_bases",
    "model_kfac_eigenvalues",
    "model_ekfac_eigenvalues",
)


def is_head_solve(ctx: BuildContext) -> bool:
    """Whether the run's influence solves are taken over the head (its curvature, damping, Kronecker models,
    whitened space and query cache): every scope but "model", whose stages "model-*" hold their own."""
    return not is_model_scope(ctx)


STAGES: tuple[Stage, ...] = (
    Stage(
        "features",
        reads=(TASK,),
        writes=(*_both("features"), *_both("labels"), STRINGS),
        per_example=True,
        run=features_stage,
    ),
    Stage(
        "metadata",
        reads=(TASK, *_both("features"), *_both("labels"), STRINGS),
        writes=(*_both("logits"), *_both("ids"), METADATA),
        per_example=True,
        run=metadata_stage,
    ),
    Stage(
        "grad",
        reads=("train_features", "train_labels", "train_ids"),
        writes=("grad_vectors", "grad", "grad-unit"),
        per_example=True,
        run=grad_stage,
    ),
    Stage(
        "representer",
        reads=("train_features", "train_labels", "train_ids", "test_features"),
        writes=("train_phi", "representer_alpha", "representer_theta", "representer"),
        per_example=False,
        run=representer_stage,
    ),
    Stage(
        "curvature",
        reads=("train_features", "train_labels"),
        writes=(*CURVATURE_ARRAYS, "curvature_dense_rows"),  # the last one: scratch chunks, removed at the end
        per_example=False,
        run=curvature_stage,
        applies=is_head_solve,
    ),
    Stage(
        "damping",
        reads=("train_features", "train_labels", "test_features", "test_labels", *CURVATURE_ARRAYS),
        writes=(),
        per_example=False,
        run=damping_stage,
        applies=is_head_solve,
    ),
    Stage(
        "kronecker",
        reads=("train_features",),
        writes=(*KRONECKER_ARRAYS, "kronecker_factor_sums", "kronecker_correction_sums"),  # the last two: scratch
        per_example=False,
        run=kronecker_stage,
        applies=is_head_solve,
    ),
    Stage(
        "whitened",
        reads=(
            "train_features",
            "train_labels",
            "train_ids",
            "curvature_top_eigenvalues",
            "curvature_top_eigenvectors",
            *KRONECKER_ARRAYS,
        ),
        writes=("whitened_vectors", "grad-whitened"),
        per_example=False,
        run=whitened_stage,
        applies=lambda ctx: is_head_solve(ctx) and has_whitening_model(ctx),
    ),
    Stage(
        "tracin",
        reads=(TASK, "train_features", "train_labels"),
        writes=("tracin_self_influence",),
        per_example=True,
        run=tracin_stage,
        applies=has_checkpoints,
    ),
    Stage(
        "queries",
        reads=(
            "train_features",
            "train_labels",
            "train_ids",
            "test_features",
            "test_logits",
            *CURVATURE_ARRAYS,
        ),
        writes=("query_solutions", "query_targets", "query_residuals", "query_depths"),
        per_example=False,
        run=queries_stage,
        applies=lambda ctx: is_head_solve(ctx) and has_query_cache(ctx),
    ),
    Stage(
        "block",
        reads=(TASK, "train_labels", "train_logits", "test_logits", "train_ids"),
        writes=(
            "block_train_vectors",
            "block_test_vectors",
            "block_test_targets",
            "block_curvature",
            "block_gram",
            "block",
            "block-unit",
        ),
        per_example=False,
        run=block_stage,
        applies=is_last_block,
    ),
    Stage(
        "model",
        reads=(TASK, "train_labels", "test_logits", "train_ids"),
        writes=("model_train_vectors", "model_test_vectors", "model_test_targets", "model", "model-unit"),
        per_example=True,
        run=model_stage,
        applies=is_model_scope,
    ),
    Stage(
        "model-curvature",
        reads=(TASK, "train_labels"),
        writes=MODEL_CURVATURE_ARRAYS,
        per_example=False,
        run=model_curvature_stage,
        applies=is_model_scope,
    ),
    Stage(
        "model-damping",
        reads=(TASK, "train_labels", "test_labels", "model_curvature", "model_train_vectors"),
        writes=(),
        per_example=False,
        run=model_damping_stage,
        applies=is_model_scope,
    ),
)
"""Every build stage, in build order."""


def stage(name: str) -> Stage:
    """The stage called ``name``."""
    for s in STAGES:
        if s.name == name:
            return s
    raise ValueError(f"stage: {name!r} is not a build stage; stages: {[s.name for s in STAGES]}")


def run_stages(
    ctx: BuildContext, stages: Sequence[Stage] = STAGES, *, timings: dict[str, float] | None = None
) -> Manifest:
    """Runs `stages` in order; returns the manifest they leave (also in ``ctx.manifest``).

    In a build (``ctx.rerun`` False) a stage the manifest records is skipped, and each stage's patch is saved
    with its mark as soon as the stage returns (its artifacts are on disk). In a rerun every stage runs and its
    patch is applied to ``ctx.manifest`` only: the caller saves the manifest last. ``timings`` receives the
    seconds of each stage run.
    """
    for st in stages:
        if not ctx.rerun and st.name in ctx.manifest.stages:
            continue
        if ctx.task is None and TASK in st.reads:
            raise ValueError(f"stage {st.name!r} reads the task: it cannot run without one")
        t0 = time.perf_counter()
        patch = st.run(ctx) if st.applies(ctx) else ManifestPatch()
        manifest = patch.apply(ctx.manifest)
        if not ctx.rerun:
            manifest = manifest.with_stage(st.name)
            save_manifest(ctx.paths.root, manifest)
        ctx.manifest = manifest
        if timings is not None:
            timings[st.name] = time.perf_counter() - t0
    return ctx.manifest
