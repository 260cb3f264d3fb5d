"""The HTTP service on a real digits run directory (FastAPI TestClient, no network)."""

import pytest
from fastapi.testclient import TestClient

from api import open_index
from api.service import create_app, is_loopback, serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(digits_mlp_run):
    return TestClient(create_app(digits_mlp_run))


def test_health_and_openapi(client):
    assert client.get("/health").json()["status"] == "ok"
    assert "/explain" in client.get("/openapi.json").json()["paths"]


def test_explain_matches_the_python_api(client, digits_mlp_run):
    response = client.post("/explain", json={"test_ids": [3, 4], "k": 5, "method": "exact"})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = open_index(digits_mlp_run).explain(test_ids=[3, 4], k=5, method="exact")
    assert [e["prediction"] for e in body] == [e.prediction for e in expected]
    assert [p["example_id"] for p in body[0]["proponents"]] == [p.example_id for p in expected[0].proponents]


@pytest.mark.parametrize(
    ("path", "payload", "status"),
    [
        ("/explain", {"test_ids": [99999]}, 404),
        ("/explain", {"test_ids": [1], "k": 0}, 422),
        ("/explain", {"test_ids": [1], "method": "magic"}, 422),
        ("/explain", {"test_ids": []}, 422),
        ("/explain", {"test_ids": [1], "targets": [42]}, 422),
    ],
)
def test_bad_requests_get_one_clear_status(client, path, payload, status):
    response = client.post(path, json=payload)
    assert response.status_code == status, response.text


def test_examples_route(client):
    body = client.get("/examples/5").json()
    assert body["example_id"] == 5 and body["split"] == "train"
    assert client.get("/examples/123456").status_code == 404


def test_api_key_is_enforced_when_set(digits_mlp_run):
    client = TestClient(create_app(digits_mlp_run, api_key="s3cret"))
    assert client.post("/explain", json={"test_ids": [1]}).status_code == 401
    assert client.post("/explain", json={"test_ids": [1], "k": 2}, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200


def test_non_loopback_bind_without_key_refuses_to_start(digits_mlp_run, monkeypatch):
    monkeypatch.delenv("INFLUENCE_API_KEY", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")
    with pytest.raises(ValueError, match="api-key"):
        serve(digits_mlp_run, host="0.0.0.0")
