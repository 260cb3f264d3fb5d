"""`POST /dumps` background jobs: the file equals `Index.dump`'s, jobs survive a restart, paths stay inside.

A copy of the digits run per module, so job records written here do not leak into other tests' runs.
"""

import json
import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from api import open_index
from api.jobs import BLOCK_SIZE, job_id_of
from api.service import create_app

pytestmark = pytest.mark.slow

REQUEST = {"test_ids": list(range(0, 150, 2)), "k": 5, "method": "grad-dot"}


@pytest.fixture(scope="module")
def run(digits_mlp_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("dumps") / "run"
    shutil.copytree(digits_mlp_run, path, ignore=shutil.ignore_patterns("dumps"))
    return path


def wait_done(client, job, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/dumps/{job}").json()
        if body["status"] in ("done", "failed"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job} not finished after {timeout} s: {body}")


def read_parquet(content: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(content))


@pytest.fixture(scope="module")
def finished(run):
    with TestClient(create_app(run)) as client:
        response = client.post("/dumps", json=REQUEST)
        assert response.status_code == 202, response.text
        job = response.json()["job"]
        assert response.headers["location"] == f"/dumps/{job}"
        status = wait_done(client, job)
        topk = client.get(status["file"])
        aggregates = client.get(status["aggregates"])
    return job, status, topk, aggregates


def test_a_dump_job_writes_what_index_dump_writes(run, finished, tmp_path):
    job, status, topk, aggregates = finished
    assert status["status"] == "done" and status["error"] is None
    assert status["done"] == status["total"] == status["n_queries"] == len(REQUEST["test_ids"])
    assert job == job_id_of(REQUEST["test_ids"], REQUEST["k"], REQUEST["method"])
    assert topk.status_code == 200 and topk.headers["content-type"] == "application/vnd.apache.parquet"
    with open_index(run) as index:
        ref = index.dump(
            tmp_path / "ref.parquet", REQUEST["test_ids"], k=5, method="grad-dot", block_size=BLOCK_SIZE, progress=False
        )
    assert read_parquet(topk.content).equals(pq.read_table(ref))
    assert read_parquet(aggregates.content).equals(pq.read_table(tmp_path / "ref.aggregates.parquet"))
    assert set(read_parquet(topk.content).column("test_id").to_pylist()) == set(REQUEST["test_ids"])
    assert sorted(p.name for p in (run / "dumps").iterdir()) == sorted(
        [f"{job}.json", f"{job}.parquet", f"{job}.aggregates.parquet"]
    )


def test_the_same_request_is_the_same_job_and_a_restarted_server_knows_it(run, finished):
    job, _, topk, _ = finished
    with TestClient(create_app(run)) as client:
        again = client.post("/dumps", json=REQUEST)
        assert again.status_code == 200 and again.json()["job"] == job and again.json()["status"] == "done"
        assert [j["job"] for j in client.get("/dumps").json()] == [job]
        assert client.get(f"/dumps/{job}/file").content == topk.content


def test_a_job_left_running_by_a_killed_server_is_finished_by_the_next(run, finished):
    """A record left "running" (the server died mid-dump) is re-queued at start and resumed by Index.dump."""
    request = {"test_ids": [1, 3, 5], "k": 4, "method": "representer"}
    job = job_id_of(request["test_ids"], request["k"], request["method"])
    record = {
        "job": job,
        "status": "running",
        "test_ids": request["test_ids"],
        "k": 4,
        "method": "representer",
        "done": 0,
        "total": 3,
        "error": None,
        "created": 1.0,
        "finished": None,
    }
    (run / "dumps" / f"{job}.json").write_text(json.dumps(record))
    with TestClient(create_app(run)) as client:
        status = wait_done(client, job)
        assert status["status"] == "done" and status["done"] == 3
        table = read_parquet(client.get(status["file"]).content)
    assert sorted(set(table.column("test_id").to_pylist())) == [1, 3, 5]


def test_bad_dump_requests(run, finished):
    n_records = len(list((run / "dumps").glob("*.json")))
    with TestClient(create_app(run)) as client:
        for body, status in [
            ({"test_ids": [1, 99999], "k": 5}, 404),
            ({"test_ids": [], "k": 5}, 422),
            ({"test_ids": [1], "k": 0}, 422),
            ({"test_ids": [1], "k": 5, "method": "nope"}, 422),
            ({"test_ids": [1], "path": "/etc/passwd"}, 422),
        ]:
            response = client.post("/dumps", json=body)
            assert response.status_code == status, response.text
            assert response.json()["detail"]
        assert client.get("/dumps/ffffffffffffffff").status_code == 404
        assert client.get("/dumps/ffffffffffffffff/file").status_code == 404
        for bad in ("not-a-job", "0123456789ABCDEF", "0123456789abcdef0", "%2e%2e"):
            assert client.get(f"/dumps/{bad}").status_code == 422, bad
            assert client.get(f"/dumps/{bad}/file").status_code == 422, bad
        for bad in ("..%2F..%2Fmanifest.json", "../manifest.json", "%2e%2e/%2e%2e/manifest.json"):
            assert client.get(f"/dumps/{bad}").status_code == 404, bad  # no route: never a file
            assert client.get(f"/dumps/{bad}/file").status_code == 404, bad
        job = finished[0]
        assert client.get(f"/dumps/{job}/file?part=../../manifest").status_code == 422
    assert len(list((run / "dumps").glob("*.json"))) == n_records


def test_an_unfinished_or_failed_job_has_no_file_yet_and_a_failed_one_is_retried(run):
    request = {"test_ids": [2, 4], "k": 3, "method": "grad-dot"}
    job = job_id_of(request["test_ids"], request["k"], request["method"])
    failed = {
        "job": job,
        "status": "failed",
        "test_ids": [2, 4],
        "k": 3,
        "method": "grad-dot",
        "done": 0,
        "total": 2,
        "error": "OSError: disk full",
        "created": 2.0,
        "finished": None,
    }
    (run / "dumps" / f"{job}.json").write_text(json.dumps(failed))
    with TestClient(create_app(run)) as client:
        status = client.get(f"/dumps/{job}").json()
        assert status["status"] == "failed" and "disk full" in status["error"]
        response = client.get(f"/dumps/{job}/file")
        assert response.status_code == 409 and "failed" in response.json()["detail"]
        retry = client.post("/dumps", json=request)
        assert retry.status_code == 202 and retry.json()["job"] == job
        assert wait_done(client, job)["status"] == "done"
