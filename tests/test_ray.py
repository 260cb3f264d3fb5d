"""Jobs on a Ray cluster (issue 16): a two-node cluster on loopback gives the single-process results.

The cluster (`ray_cluster` in conftest.py) is shared by the module; this process is connected to it, so every
``ray=`` value below runs on it.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from api import build_index, open_index
from api.ray_cluster import RAY_INSTALL, RayNotInstalledError, check_ray, ray_session
from indexer import IndexConfig

ARRAYS = ("train_features", "train_labels", "train_ids", "train_logits", "test_features", "grad_vectors")
KRONECKER = ("kronecker_bases", "kfac_eigenvalues", "ekfac_eigenvalues")  # sums of per-shard partial sums


@pytest.mark.parametrize("value", ["remote", "", "host:", "host:0", "host:70000", "http://h:1", 7, ["local"]])
def test_bad_ray_values_are_refused_by_name_before_anything_is_written(value, digits_mlp_task, tmp_path):
    with pytest.raises(ValueError, match="ray must be"):
        check_ray(value)
    with pytest.raises(ValueError, match="ray must be"):
        build_index(digits_mlp_task, tmp_path / "run", progress=False, ray=value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", [None, "local", "auto", "10.0.0.5:6379", "ray://head.example:10001", "[::1]:6379"])
def test_good_ray_values_pass(value):
    assert check_ray(value) == value


def test_without_ray_the_error_says_how_to_install_it(monkeypatch, digits_mlp_task, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as when the extra is not installed
    with pytest.raises(RayNotInstalledError, match=RAY_INSTALL.replace("[", r"\[").replace("]", r"\]")):
        build_index(digits_mlp_task, tmp_path / "run", progress=False, ray="local")
    with ray_session(None) as distributed:  # ray=None never imports Ray
        assert distributed is False


def test_every_node_of_the_test_cluster_is_on_loopback(ray_cluster):
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    assert all(n["NodeManagerAddress"].startswith("127.") for n in nodes), [n["NodeManagerAddress"] for n in nodes]


def _assert_same_run(a, b, arrays=ARRAYS + KRONECKER, spaces=("grad", "grad-unit")):
    """Two built runs hold the same arrays (float32 round-off), FAISS ids and explanations."""
    for name in arrays:
        x, y = np.asarray(a.run.array(name)), np.asarray(b.run.array(name))
        assert x.shape == y.shape, name
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=name)
    q = np.asarray(a.run.array("grad_vectors"))[:5]
    for space in spaces:
        ia, ib = a.run.space(space), b.run.space(space)
        np.testing.assert_array_equal(ia.ids(), ib.ids())  # FAISS ids in id order
        for ha, hb in zip(ia.search(q, 10), ib.search(q, 10), strict=True):
            np.testing.assert_array_equal(ha.ids, hb.ids)
    for method in ("lissa", "grad-dot", "representer", "ekfac"):
        ea, eb = a.explain(test_ids=[0, 5], k=5, method=method), b.explain(test_ids=[0, 5], k=5, method=method)
        for x, y in zip(ea, eb, strict=True):
            assert [p.example_id for p in x.proponents] == [p.example_id for p in y.proponents], method
            assert [p.example_id for p in x.opponents] == [p.example_id for p in y.opponents], method
            np.testing.assert_allclose([p.score for p in x.proponents], [p.score for p in y.proponents], rtol=1e-4)


@pytest.mark.slow
def test_a_build_on_two_nodes_equals_the_single_process_build(ray_cluster, digits_mlp_task, digits_mlp_run, tmp_path):
    out = tmp_path / "ray-run"
    config = IndexConfig(chunk_rows=256)  # several shards per stage; chunking never changes the results
    with build_index(digits_mlp_task, out, config=config, progress=False, ray=ray_cluster.address) as index:
        assert not (out / "shards").exists()  # the driver committed and removed every shard
        with open_index(digits_mlp_run) as ref:
            _assert_same_run(index, ref)


@pytest.mark.slow
def test_a_projected_head_built_on_two_nodes_equals_the_single_process_build_ivf_spaces_byte_for_byte(
    ray_cluster, digits_mlp_task, tmp_path, monkeypatch
):
    """A projected head (grad-whitened space too) with IVF spaces, built on two nodes and in one process: the same
    arrays, ids, hits and explanations. FAISS's recipe for indexes built in pieces (trained once by the driver,
    each part added by a Ray task, parts merged in id order) gives byte for byte the index one process fills from
    the same vectors (ids, lists). (Flat spaces, added by the driver, are the two-node build's above.)"""
    import influence as inf
    from indexer import shards
    from store import build_vector_index

    monkeypatch.setattr(shards, "MIN_PART_ROWS", 200)  # several parts on this small training set
    # no dense curvature (exact_max_params=0) and no damping calibration: driver-side stages, the same in both builds
    config = IndexConfig(
        chunk_rows=300,
        project_above=1000,
        projection_dim=128,
        exact_max_params=0,
        damping_subsets=0,
        factory="IVF8,Flat",
    )
    spaces = ("grad", "grad-unit", "grad-whitened")
    with build_index(digits_mlp_task, tmp_path / "one", config=config, progress=False) as ref:
        assert ref.manifest.projection is not None
        with build_index(digits_mlp_task, tmp_path / "ray", config=config, progress=False, ray="auto") as index:
            assert not (tmp_path / "ray" / "shards").exists()
            _assert_same_run(index, ref, ARRAYS + KRONECKER + ("whitened_vectors",), spaces)
            ids = np.asarray(index.run.array("train_ids"))
            grads = np.ascontiguousarray(index.run.array("grad_vectors"))
            for space, vectors in zip(
                spaces,
                (
                    grads,
                    np.asarray(inf.normalize_rows(grads), np.float32),
                    np.ascontiguousarray(index.run.array("whitened_vectors")),
                ),
                strict=True,
            ):
                here, spec = build_vector_index(vectors, ids, factory="IVF8,Flat")
                built = index.run.space(space)
                assert here.mergeable and built.ntotal == len(ids) > 3 * 200, space
                np.testing.assert_array_equal(built.to_bytes(), here.to_bytes(), err_msg=space)
                np.testing.assert_array_equal(built.to_bytes(), ref.run.space(space).to_bytes(), err_msg=space)
                assert index.manifest.spaces[space] == spec == ref.manifest.spaces[space]


@pytest.mark.parametrize("dense", [False, True])
def test_a_dump_on_two_nodes_equals_the_single_process_dump(ray_cluster, digits_mlp_run, tmp_path, dense):
    import pyarrow.parquet as pq

    from api.dump import dump_paths

    with open_index(digits_mlp_run) as index:
        test_ids = index.test_ids[:70].tolist()
        options = {"k": 7, "method": "grad-dot" if dense else "lissa", "block_size": 16, "dense": dense}
        one = index.dump(tmp_path / "one.parquet", test_ids, progress=False, **options)
        two = index.dump(tmp_path / "two.parquet", test_ids, progress=False, ray="auto", **options)
    a, b = dump_paths(one), dump_paths(two)
    _assert_same_table(pq.read_table(one), pq.read_table(two), floats=("score",))
    sums = ("sum_positive", "sum_negative", "sum_positive_misclassified", "sum_negative_misclassified")
    _assert_same_table(pq.read_table(a["aggregates"]), pq.read_table(b["aggregates"]), floats=sums)
    if dense:
        np.testing.assert_allclose(np.load(a["dense"]), np.load(b["dense"]), rtol=1e-5, atol=1e-6)
    assert not b["work"].exists()


def _assert_same_table(a, b, *, floats):
    """Equal columns; the `floats` to float32 round-off (a worker's JAX and BLAS may sum in another order)."""
    assert a.column_names == b.column_names
    for name in a.column_names:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        if name in floats:  # sums over queries: round-off relative to the column's scale
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * float(np.abs(x).max(initial=1e-6)), err_msg=name)
        else:
            assert x == y, name


@pytest.mark.slow
@pytest.mark.parametrize("oos_refit", ["last-layer", "whole-head"])
def test_a_noise_job_on_two_nodes_equals_the_single_process_job(ray_cluster, digits_mlp_run, tmp_path, oos_refit):
    import shutil

    runs = [tmp_path / "one", tmp_path / "two"]  # two copies: the out-of-sample probabilities are cached per run
    for run in runs:
        shutil.copytree(digits_mlp_run, run)
    options = {"oos_refit": oos_refit, "folds": 3, "oos_repeats": 1, "progress": False}
    with open_index(runs[0]) as index:
        one = index.find_label_noise(**options)
    with open_index(runs[1]) as index:
        two = index.find_label_noise(ray="auto", **options)
    assert [s.example_id for s in one] == [s.example_id for s in two]
    assert [s.suggested_label for s in one] == [s.suggested_label for s in two]
    np.testing.assert_allclose([s.score for s in one], [s.score for s in two], rtol=1e-6)


@pytest.mark.parametrize("command", ["index", "dump", "noise"])
def test_cli_refuses_a_bad_ray_address_in_one_line(command, digits_mlp_run, tmp_path):
    from typer.testing import CliRunner

    from api.cli import app

    args = {
        "index": ["index", "indexer.demo:digits_task", "--out", str(tmp_path / "run")],
        "dump": ["dump", str(digits_mlp_run), "--out", str(tmp_path / "d.parquet")],
        "noise": ["noise", str(digits_mlp_run), "--png", "none"],
    }[command]
    result = CliRunner().invoke(app, [*args, "--ray", "nowhere"])
    assert result.exit_code == 2
    assert "ray must be" in result.output and "'nowhere'" in result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "d.parquet").exists()


def test_stages_that_run_the_model_ask_for_one_gpu_per_actor_where_the_cluster_has_gpus():
    from indexer.shards import actor_resources

    assert actor_resources({"CPU": 8.0, "GPU": 2.0}, model=True) == (2, {"num_cpus": 1, "num_gpus": 1})
    assert actor_resources({"CPU": 8.0, "GPU": 2.0}, model=False) == (8, {"num_cpus": 1})  # JAX head stages
    assert actor_resources({"CPU": 3.0}, model=True) == (3, {"num_cpus": 1})
    assert actor_resources({}, model=False) == (1, {"num_cpus": 1})


@pytest.mark.slow
def test_chunks_that_run_the_model_go_to_the_gpu_node_of_a_cluster(ray_cluster, digits_mlp_task, tmp_path):
    """A third node advertises a GPU: a stage that runs the model (model=task) gets one actor per GPU, placed on
    that node; its copy of the Task stays on the CPU since this machine has no CUDA. Without model=, one actor
    per CPU as before."""
    import functools
    import types

    import ray

    from indexer.shards import run_chunks
    from store import RunPaths

    def where(task, chunk):  # nested: pickled by value to the workers
        import ray

        return {"node": np.array(ray.get_runtime_context().get_node_id()), "device": np.array(str(task.device))}

    gpu_node = ray_cluster.add_node(num_cpus=1, num_gpus=1, node_ip_address="127.0.0.1")
    try:
        ray_cluster.wait_for_nodes()
        gpu_node_id = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU"))
        ctx = types.SimpleNamespace(distributed=True, progress=False, paths=RunPaths(tmp_path))
        seen = {}
        run_chunks(
            ctx,
            "train_features",
            range(6),
            functools.partial(where, digits_mlp_task),
            lambda chunk, out: seen.__setitem__(chunk, (str(out["node"]), str(out["device"]))),
            desc="where",
            model=digits_mlp_task,
        )
        assert sorted(seen) == list(range(6))
        assert set(seen.values()) == {(gpu_node_id, "cpu")}
    finally:
        ray_cluster.remove_node(gpu_node)
