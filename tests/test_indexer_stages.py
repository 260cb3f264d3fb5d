"""The build stages as declared units (indexer.stages): the catalogue agrees with the run layout, one loop records
each stage with its manifest patch, and updates re-run what depends on the training set."""

import dataclasses

import numpy as np
import pytest

from indexer import IndexConfig
from indexer.context import BuildContext, ManifestPatch, Rewrite
from indexer.stages import STAGES, Stage, run_stages
from indexer.update import stages_to_rerun
from store import ARRAYS, SPACES, Manifest, RunPaths, load_array, load_manifest, save_manifest


def test_stage_names_and_order_are_those_of_existing_runs():
    names = [s.name for s in STAGES]
    existing = ["features", "metadata", "grad", "representer", "curvature", "tracin", "queries", "block"]
    assert [n for n in names if n in existing] == existing  # runs written before a new stage resume in order
    assert (
        names
        == [
            *existing[:5],
            "damping",
            "kronecker",
            "whitened",  # after "kronecker" (it whitens with the EK-FAC); older runs resume either way
            *existing[5:],
            "model",
            "model-curvature",
            "model-damping",
        ]
    )


def test_each_stage_writes_what_the_run_layout_says_it_does():
    for artifact in (*ARRAYS.values(), *SPACES.values()):
        writers = [s.name for s in STAGES if artifact.name in s.writes]
        expected = [artifact.writer] if artifact.writer in {s.name for s in STAGES} else []
        assert writers == expected, artifact
    with pytest.raises(ValueError, match="not declared in the run layout"):
        Stage("x", reads=("nope",), writes=(), per_example=True, run=lambda ctx: ManifestPatch())


def context(tmp_path, *, rerun=False, **manifest_fields):
    paths = RunPaths(tmp_path)
    paths.create_dirs()
    fields = {
        "model_fingerprint": "f" * 64,
        "task": {"l2": 0.1, "n_test": 0},
        "methods": IndexConfig().to_dict(),
        "head": {"spec": [], "n_classes": 2, "n_params": 3},
        "projection": None,
        "spaces": {},
        "extra": {"kept": 1, "stale_note": 2},
    } | manifest_fields
    manifest = Manifest(**fields)
    save_manifest(tmp_path, manifest)
    return BuildContext(paths=paths, config=IndexConfig(), manifest=manifest, spec=[], params=[], l2=0.1, rerun=rerun)


def test_one_loop_saves_each_patch_with_its_stage_mark_and_skips_recorded_stages(tmp_path):
    ran = []

    def run(name):
        def stage_fn(ctx):
            ran.append(name)
            # the stages before this one are recorded on disk, this one not yet
            recorded = load_manifest(ctx.paths.root).stages
            assert name not in recorded and recorded[-1] == {"b": "a0", "d": "c"}[name]
            return ManifestPatch(extra={name: len(ran)}, drop=("stale_note",))

        return stage_fn

    ctx = context(tmp_path, stages=("a0",))
    stages = [
        Stage("a0", reads=(), writes=(), per_example=True, run=run("a0")),
        Stage("b", reads=(), writes=(), per_example=True, run=run("b")),
        Stage("c", reads=(), writes=(), per_example=False, run=run("c"), applies=lambda ctx: False),
        Stage("d", reads=(), writes=(), per_example=False, run=run("d")),
    ]
    timings = {}
    manifest = run_stages(ctx, stages, timings=timings)
    assert ran == ["b", "d"]  # a0 is recorded, c has nothing to do (recorded all the same)
    assert manifest.stages == ("a0", "b", "c", "d") and load_manifest(tmp_path) == manifest == ctx.manifest
    assert manifest.extra == {"kept": 1, "b": 1, "d": 2}
    assert set(timings) == {"b", "c", "d"}
    # a rerun runs recorded stages too and leaves saving the manifest to its caller (an update saves it last)
    on_disk = load_manifest(tmp_path)
    rerun = dataclasses.replace(ctx, rerun=True)
    again = Stage("b", reads=(), writes=(), per_example=False, run=lambda ctx: ManifestPatch(extra={"b": 9}))
    assert run_stages(rerun, [again]).extra["b"] == 9 and rerun.manifest.stages == manifest.stages
    assert load_manifest(tmp_path) == on_disk


def test_stages_that_read_the_task_need_one(tmp_path):
    ctx = context(tmp_path, rerun=True)
    with pytest.raises(ValueError, match="reads the task"):
        run_stages(ctx, [s for s in STAGES if s.name == "features"])


@pytest.mark.parametrize(
    ("cache_queries", "refresh", "rerun", "kept"),
    [
        (True, True, ["representer", "curvature", "damping", "kronecker", "queries"], []),
        (True, False, ["representer"], ["curvature", "damping", "kronecker", "queries"]),
        (False, True, ["representer", "curvature", "damping", "kronecker"], []),
        (False, False, ["representer"], ["curvature", "damping", "kronecker"]),
    ],
)
def test_updates_rerun_the_training_set_stages_and_keep_what_reads_a_stale_one(
    tmp_path, cache_queries, refresh, rerun, kept
):
    recorded = tuple(s.name for s in STAGES)
    ctx = context(tmp_path, rerun=True, task={"l2": 0.1, "n_test": 5}, stages=recorded)
    ctx.config = IndexConfig(cache_queries=cache_queries)
    again, stale = stages_to_rerun(ctx, refresh_curvature=refresh)
    assert [s.name for s in again] == rerun and [s.name for s in stale] == kept


def test_an_update_does_not_add_a_stage_the_build_did_not_record(tmp_path):
    """A run built before the "damping" and "kronecker" stages existed: its updates re-run what it has, and add
    nothing (its damping stays the rule's)."""
    recorded = tuple(s.name for s in STAGES if s.name not in ("damping", "kronecker"))
    ctx = context(tmp_path, rerun=True, task={"l2": 0.1, "n_test": 5}, stages=recorded)
    again, stale = stages_to_rerun(ctx, refresh_curvature=True)
    assert [s.name for s in again] == ["representer", "curvature"] and stale == []


def test_a_rerun_rewrites_a_chunked_array_whole(tmp_path):
    path = RunPaths(tmp_path).array("query_depths")
    arr = Rewrite(path, shape=(5,), dtype=np.int64, chunk_rows=2)
    assert arr.missing_chunks() == [0, 1, 2]
    for i in arr.missing_chunks():
        sl = arr.chunk_slice(i)
        arr.write_chunk(i, np.arange(sl.start, sl.stop))
    assert not path.exists()
    arr.close()
    np.testing.assert_array_equal(load_array(path), np.arange(5))
