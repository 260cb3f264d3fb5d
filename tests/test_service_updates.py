"""HTTP incremental updates on a real wine run: `POST /examples` and `DELETE /examples/{id}` behind the API key.

The run is built on the first 100 training examples; the service is started with the whole Task (same model,
148 training examples). The routes give what `indexer.update` gives in Python: new ids, tombstones, 404 / 422
on bad ids, nothing half-written on a refused update, and answers equal to a fresh open of the updated run.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from fastapi.testclient import TestClient
from torch.utils.data import Subset, TensorDataset

from api import build_index, open_index
from api.service import create_app
from store import verify_run

pytestmark = pytest.mark.slow

KEY = {"X-API-Key": "update-key"}
N_BUILT = 100


@pytest.fixture(scope="module")
def wine():
    from small_runs import wine_task

    return wine_task()


@pytest.fixture()
def run(wine, tmp_path_factory):
    path = tmp_path_factory.mktemp("updates") / "wine"
    build_index(dataclasses.replace(wine, train=Subset(wine.train, range(N_BUILT))), path, progress=False).close()
    return path


def test_add_then_delete_over_http(wine, run):
    n = len(wine.train)
    with TestClient(create_app(run, api_key=KEY["X-API-Key"], task=wine)) as c:
        assert c.post("/examples").status_code == 401
        assert c.delete("/examples/3").status_code == 401
        added = c.post("/examples", headers=KEY, json={"refresh_curvature": True})
        assert added.status_code == 200, added.text
        body = added.json()
        assert body["op"] == "add" and body["example_ids"] == list(range(N_BUILT, n)) and body["n_train"] == n
        assert c.get("/health").json()["n_train"] == n
        assert c.get(f"/examples/{n - 1}", headers=KEY).json()["label"] == int(wine.train[n - 1][1])
        again = c.post("/examples", headers=KEY)
        assert again.status_code == 422 and "none that the run does not hold" in again.json()["detail"]

        gone = c.delete("/examples/5", headers=KEY)
        assert gone.status_code == 200, gone.text
        assert gone.json()["example_ids"] == [5] and gone.json()["n_train"] == n - 1
        assert c.get("/examples/5", headers=KEY).status_code == 404
        twice = c.delete("/examples/5", headers=KEY)
        assert twice.status_code == 404 and "already deleted" in twice.json()["detail"]
        assert c.delete("/examples/100000", headers=KEY).status_code == 404
        assert c.delete("/examples/-1", headers=KEY).status_code == 404
        assert c.delete("/examples/abc", headers=KEY).status_code == 422
        # a deleted example is never re-added from the task's train set
        assert c.post("/examples", headers=KEY).status_code == 422

        served = c.post("/explain", headers=KEY, json={"test_ids": [0, 1, 2], "k": 5, "method": "exact"}).json()
        page = c.get("/examples", headers=KEY, params={"split": "train", "limit": 1000}).json()
    assert page["total"] == n - 1 and 5 not in [e["example_id"] for e in page["examples"]]
    assert verify_run(run) == []
    with open_index(run) as index:  # a fresh open of the updated run answers the same
        fresh = [e.to_dict() for e in index.explain(test_ids=[0, 1, 2], k=5, method="exact")]
    for got, want in zip(served, fresh, strict=True):
        assert [p["example_id"] for p in got["proponents"]] == [p["example_id"] for p in want["proponents"]]
        assert 5 not in [p["example_id"] for p in got["proponents"] + got["opponents"]]
        np.testing.assert_allclose(
            [p["score"] for p in got["proponents"]], [p["score"] for p in want["proponents"]], rtol=1e-5
        )


def test_a_refused_add_writes_nothing_and_a_run_without_the_task_refuses(wine, run):
    x, y = wine.train.tensors
    y = y.clone().float()
    y[N_BUILT + 3] = 0.5  # a float label among the new examples: refused by name, before anything is written
    bad = dataclasses.replace(wine, train=TensorDataset(x, y))

    def files():
        return {
            str(p.relative_to(run)): p.stat().st_mtime_ns
            for p in run.rglob("*")
            # SQLite's own files change when a reader closes (a WAL checkpoint): its rows are checked below
            if p.is_file() and ".sqlite" not in p.name
        }

    before = files()
    with TestClient(create_app(run, task=bad)) as c:
        refused = c.post("/examples")
        assert refused.status_code == 422 and "has label 0.5" in refused.json()["detail"], refused.text
        assert c.get("/health").json()["n_train"] == N_BUILT
        assert c.post("/explain", json={"test_ids": [0], "k": 3}).status_code == 200
    assert files() == before
    assert verify_run(run) == []
    with open_index(run) as index:
        assert len(index.train_ids) == N_BUILT and len(index.metadata.get("train", list(range(N_BUILT)))) == N_BUILT
    with TestClient(create_app(run)) as c:
        assert c.post("/examples").status_code == 422
        assert "--task" in c.post("/examples").json()["detail"]
        assert c.delete("/examples/0").status_code == 200  # a delete needs no model
        assert c.get("/health").json()["n_train"] == N_BUILT - 1
