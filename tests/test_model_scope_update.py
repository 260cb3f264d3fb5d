"""Incremental add / delete on scope="model" runs (`indexer.update`): the new examples' phi through the model with
the run's seeds, the projected Gauss-Newton matrix and its K-FAC / EK-FAC recomputed over the changed training set
(stage "model-curvature"), FAISS spaces "model" / "model-unit" changed in place. After an add (a delete) the run
answers as a fresh build over the same examples with the same ids, to float32 round-off."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from test_model_scope import N_TEST, ON, make_task

import influence as inf
from api import build_index, open_index
from indexer import Task
from indexer.update import add_examples, delete_examples
from store import load_manifest, save_manifest, verify_run

METHODS = ("exact", "lissa", "ekfac", "kfac", "grad-dot", "grad-cos")
ARRAYS = ("model_train_vectors", "model_curvature", "model_kfac_eigenvalues", "model_ekfac_eigenvalues")


@pytest.fixture(scope="module")
def full():
    return make_task()


def subset_task(full: Task, rows: list[int]) -> Task:
    """The same model over some of the training examples, with their ids in the full task."""
    return Task(
        model=full.model, train=[full.train[i] for i in rows], test=full.test, l2=full.l2, scope="model", train_ids=rows
    )


def assert_same_run(a, b):
    with open_index(a, lissa=inf.LissaConfig(damping=0.0)) as x, open_index(b, lissa=inf.LissaConfig(damping=0.0)) as y:
        np.testing.assert_array_equal(x.train_ids, y.train_ids)
        for name in ARRAYS:
            want = np.asarray(y.run.array(name), np.float64)
            np.testing.assert_allclose(x.run.array(name), want, rtol=1e-5, atol=1e-6 * np.abs(want).max(), err_msg=name)
        for space in ("model", "model-unit"):
            assert x.run.manifest.spaces[space]["ntotal"] == len(y.train_ids)
        for method in METHODS:
            got = x.pairwise_scores(list(range(N_TEST)), method=method)
            want = y.pairwise_scores(list(range(N_TEST)), method=method)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=method)
            [e], [f] = x.explain(test_ids=[2], k=5, method=method), y.explain(test_ids=[2], k=5, method=method)
            assert [p.example_id for p in e.proponents] == [p.example_id for p in f.proponents], method


def test_add_then_delete_equal_fresh_builds(full, tmp_path):
    n = len(full.train)
    fresh = tmp_path / "fresh"
    build_index(full, fresh, config=ON, progress=False).close()

    first = list(range(n - 8))
    run = tmp_path / "run"
    build_index(subset_task(full, first), run, config=ON, progress=False).close()
    report = add_examples(subset_task(full, first), run, full.train[n - 8 :], ids=range(n - 8, n))
    assert report.example_ids == tuple(range(n - 8, n)) and "model curvature" in report.refreshed
    assert verify_run(run) == []
    assert_same_run(run, fresh)

    deleted = [3, 17, n - 2]
    report = delete_examples(run, deleted, task=full)
    assert "model curvature" in report.refreshed
    kept = [i for i in range(n) if i not in deleted]
    fresh_kept = tmp_path / "fresh-kept"
    build_index(subset_task(full, kept), fresh_kept, config=ON, progress=False).close()
    assert verify_run(run) == []
    assert_same_run(run, fresh_kept)
    with open_index(run) as index:
        assert not set(deleted) & {p.example_id for e in index.explain(test_ids=[0, 1], k=40) for p in e.proponents}


def test_refusals_and_a_kept_curvature(full, tmp_path):
    n = len(full.train)
    first = list(range(n - 4))
    run = tmp_path / "run"
    build_index(subset_task(full, first), run, config=ON, progress=False).close()
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    with pytest.raises(ValueError, match=r"task: its training set .* lacks the run's training ids \[0, 1, 2"):
        add_examples(subset_task(full, [n - 5]), run, full.train[n - 4 :], ids=range(n - 4, n))
    with pytest.raises(ValueError, match="pass task="):
        delete_examples(run, [0])
    with open_index(run) as a, open_index(copy) as b:
        np.testing.assert_array_equal(a.train_ids, b.train_ids)  # nothing written by the refused updates
    old = tmp_path / "old"  # a run built before the stage "model-curvature" existed
    shutil.copytree(copy, old)
    manifest = load_manifest(old)
    save_manifest(
        old, dataclasses.replace(manifest, stages=tuple(s for s in manifest.stages if s != "model-curvature"))
    )
    with pytest.raises(ValueError, match=r"before its curvature became the stage 'model-curvature'.*rebuild"):
        delete_examples(old, [0], refresh_curvature=False)
    # kept curvature: the rows go, G and its Kronecker factors stay those of the first examples
    report = delete_examples(run, [0, 1], refresh_curvature=False)
    assert "model curvature" in report.stale
    with open_index(run) as a, open_index(copy) as b:
        np.testing.assert_array_equal(a.run.array("model_curvature"), b.run.array("model_curvature"))
        np.testing.assert_array_equal(a.run.array("model_train_vectors"), b.run.array("model_train_vectors")[2:])
        assert a.run.manifest.spaces["model"]["ntotal"] == n - 6


def test_the_service_adds_and_deletes_on_a_model_scope_run(full, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from api.service import create_app

    monkeypatch.delenv("INFLUENCE_API_KEY", raising=False)
    n = len(full.train)
    run = tmp_path / "run"
    build_index(subset_task(full, list(range(n - 2))), run, config=ON, progress=False).close()
    with TestClient(create_app(run)) as c:  # no task: the curvature cannot be recomputed
        refused = c.delete("/examples/4")
        assert refused.status_code == 422 and "pass task=" in refused.text, refused.text
    with TestClient(create_app(run, task=full)) as c:
        added = c.post("/examples", json={"refresh_curvature": True})
        assert added.status_code == 200, added.text
        assert added.json()["example_ids"] == [n - 2, n - 1] and "model curvature" in added.json()["refreshed"]
        deleted = c.delete("/examples/4")
        assert deleted.status_code == 200 and "model curvature" in deleted.json()["refreshed"], deleted.text
    fresh = tmp_path / "fresh"
    build_index(subset_task(full, [i for i in range(n) if i != 4]), fresh, config=ON, progress=False).close()
    assert_same_run(run, fresh)


TASK_FILE = """
import torch
from indexer import Task

def full():
    saved = torch.load({data!r}, weights_only=False)
    return Task(model=saved["model"], train=saved["train"], test=saved["test"], l2=saved["l2"], scope="model")
"""


def test_cli_delete_takes_the_task_on_a_model_scope_run(full, tmp_path):
    from typer.testing import CliRunner

    from api.cli import app

    torch_file = tmp_path / "data.pt"
    torch.save({"model": full.model, "train": full.train, "test": full.test, "l2": full.l2}, torch_file)
    task_file = tmp_path / "cnn_task.py"
    task_file.write_text(TASK_FILE.format(data=str(torch_file)))
    run = tmp_path / "run"
    build_index(full, run, config=ON, progress=False).close()
    runner = CliRunner()
    refused = runner.invoke(app, ["delete", str(run), "--ids", "3"])
    assert refused.exit_code == 2 and "--task TASK" in refused.output, refused.output
    done = runner.invoke(app, ["delete", str(run), "--ids", "3", "7", "--task", f"{task_file}:full"])
    assert done.exit_code == 0, done.output
    assert "deleted 2 training examples" in done.output and "model curvature" in done.output, done.output
    fresh = tmp_path / "fresh"
    build_index(
        subset_task(full, [i for i in range(len(full.train)) if i not in (3, 7)]), fresh, config=ON, progress=False
    ).close()
    assert_same_run(run, fresh)
