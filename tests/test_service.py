"""The HTTP service's edges on a real digits run: limits, one status per error class, auth, raw inputs.

Real FastAPI app over a real run directory (FAISS + SQLite), driven by Starlette's TestClient (no network).
"""

import json
import time
import typing

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api import open_index
from api.index import METHODS
from api.service import MAX_BATCH, MAX_K, ExplainRequest, check_bind, create_app, serve
from store import ConfigMismatchError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(digits_mlp_run, monkeypatch_module):
    monkeypatch_module.delenv("INFLUENCE_API_KEY", raising=False)
    with TestClient(create_app(digits_mlp_run)) as c:
        yield c


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def assert_error(response, status, *words):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "detail"} and body["detail"], body
    for w in words:
        assert w in json.dumps(body), (w, body)
    return body


def test_method_names_in_the_schema_are_the_index_methods():
    assert set(typing.get_args(ExplainRequest.model_fields["method"].annotation)) == set(METHODS)


def test_health_reports_limits_and_the_schema_lists_every_route(client):
    health = client.get("/health").json()
    assert health["limits"]["max_k"] == MAX_K and health["limits"]["max_batch"] == MAX_BATCH
    assert health["key_required"] is False and health["accepts_inputs"] is False
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/health", "/examples", "/examples/{example_id}", "/explain", "/noise", "/dumps", "/dumps/{job}"} <= set(
        paths
    )
    assert "ErrorOut" in json.dumps(paths["/explain"]["post"]["responses"]["422"])


@pytest.mark.parametrize(
    ("payload", "status", "words"),
    [
        ({"test_ids": [99999]}, 404, ["99999", "UnknownExampleError"]),
        ({"test_ids": [1, 99999, 5]}, 404, ["99999"]),
        ({"test_ids": [1], "k": 0}, 422, ["k"]),
        ({"test_ids": [1], "k": MAX_K + 1}, 422, ["k", str(MAX_K)]),
        ({"test_ids": list(range(MAX_BATCH + 1))}, 422, ["test_ids", str(MAX_BATCH)]),
        ({"test_ids": [2**70]}, 422, ["test_ids"]),
        ({"test_ids": [1], "method": "magic"}, 422, ["method"]),
        ({"test_ids": [1], "k": "ten"}, 422, ["k"]),
        ({"test_ids": [1], "k": True}, 422, ["k"]),
        ({"test_ids": [1], "k": 2.5}, 422, ["k"]),
        ({"test_ids": ["1"]}, 422, ["test_ids"]),
        ({"test_ids": []}, 422, ["test_ids"]),
        ({}, 422, ["exactly one of test_ids or inputs"]),
        ({"test_ids": [1], "inputs": [[0.0] * 64]}, 422, ["exactly one"]),
        ({"test_ids": [1], "surprise": 1}, 422, ["surprise"]),
        ({"test_ids": [1], "targets": [42]}, 422, ["targets"]),
        ({"test_ids": [1], "targets": [1, 2]}, 422, ["targets", "one class per query"]),
        ({"inputs": [[0.5] * 64]}, 422, ["inputs= needs the model"]),
        ([1, 2, 3], 422, ["body"]),
    ],
)
def test_each_bad_request_gets_one_status_and_a_json_body_saying_what_was_wrong(client, payload, status, words):
    assert_error(client.post("/explain", json=payload), status, *words)


def test_malformed_json_and_wrong_content_are_422_not_500(client):
    assert_error(client.post("/explain", content=b"{oops", headers={"content-type": "application/json"}), 422)
    assert_error(client.post("/explain", content=b"NaN", headers={"content-type": "application/json"}), 422)
    assert_error(client.post("/explain", content=b"test_ids=1"), 422)


def test_unknown_routes_and_methods_answer_json(client):
    assert_error(client.get("/no/such/route"), 404)
    assert_error(client.delete("/explain"), 405)
    assert_error(client.get("/examples/123456"), 404, "123456")
    assert_error(client.get("/examples/1?split=validation"), 422, "split")
    assert_error(client.get(f"/examples/{2**64}"), 422, "example_id")
    assert_error(client.get("/noise?limit=0"), 422, "limit")
    assert_error(client.get("/examples?offset=-1"), 422, "offset")


def test_body_over_the_limit_is_refused_before_it_is_read(digits_mlp_run):
    with TestClient(create_app(digits_mlp_run, max_body_bytes=256)) as small:
        ok = json.dumps({"test_ids": [1, 2], "k": 3}).encode()
        assert small.post("/explain", content=ok, headers={"content-type": "application/json"}).status_code == 200
        big = json.dumps({"test_ids": [1], "k": 3, "method": "lissa" + " " * 300}).encode()
        assert_error(small.post("/explain", content=big, headers={"content-type": "application/json"}), 413, "256")

        read = {"chunks": 0}

        def chunked():  # no Content-Length: refused as soon as the bytes read pass the limit
            for _ in range(1000):
                read["chunks"] += 1
                yield b" " * 100

        response = small.post("/explain", content=chunked(), headers={"content-type": "application/json"})
        assert_error(response, 413)
    with pytest.raises(ValueError, match="max_body_bytes"):
        create_app(digits_mlp_run, max_body_bytes=0)


def test_pages_of_examples_and_single_examples_agree_with_the_store(client, digits_mlp_run):
    page = client.get("/examples?split=test&offset=10&limit=5").json()
    assert page["offset"] == 10 and len(page["examples"]) == 5
    with open_index(digits_mlp_run) as index:
        assert page["total"] == len(index.test_ids)
        [rec] = index.metadata.get("test", [12])
    assert page["examples"][2] == client.get("/examples/12?split=test").json() == rec.to_dict()
    assert client.get(f"/examples?split=test&offset={page['total']}").json()["examples"] == []


def test_explain_answers_the_python_api_for_every_method(client, digits_mlp_run):
    with open_index(digits_mlp_run) as index:
        for method in ("lissa", "representer", "grad-cos"):
            got = client.post("/explain", json={"test_ids": [7, 3], "k": 4, "method": method}).json()
            want = [e.to_dict() for e in index.explain(test_ids=[7, 3], k=4, method=method)]
            assert [g["proponents"] for g in got] == [w["proponents"] for w in want]
            assert [g["opponents"] for g in got] == [w["opponents"] for w in want]
            assert [g["prediction"] for g in got] == [w["prediction"] for w in want]


def test_raw_inputs_need_the_task_and_match_the_python_api(digits_mlp_run, digits_mlp_task):
    x = np.stack([digits_mlp_task.test[i][0].numpy() for i in (0, 4)])
    with TestClient(create_app(digits_mlp_run, task=digits_mlp_task)) as c:
        assert c.get("/health").json()["accepts_inputs"] is True
        got = c.post("/explain", json={"inputs": x.tolist(), "k": 3, "method": "grad-dot"})
        assert got.status_code == 200, got.text
        by_id = c.post("/explain", json={"test_ids": [0, 4], "k": 3, "method": "grad-dot"}).json()
        body = got.json()
        assert [e["test_id"] for e in body] == [None, None]
        assert [[p["example_id"] for p in e["proponents"]] for e in body] == [
            [p["example_id"] for p in e["proponents"]] for e in by_id
        ]
        assert_error(c.post("/explain", json={"inputs": [[0.1] * 63]}), 422, "shape")
        assert_error(c.post("/explain", json={"inputs": [[0.1] * 64, [0.1] * 3]}), 422, "same length")
        nan = b'{"inputs": [[NaN' + b", 0.0" * 63 + b"]]}"
        assert_error(c.post("/explain", content=nan, headers={"content-type": "application/json"}), 422, "inputs")


def test_a_run_of_another_model_is_refused_at_start(digits_mlp_run, digits_logreg_task):
    with pytest.raises(ConfigMismatchError, match="another model"):
        create_app(digits_mlp_run, task=digits_logreg_task)


def test_api_key_from_argument_or_environment(digits_mlp_run, monkeypatch):
    monkeypatch.setenv("INFLUENCE_API_KEY", "from-env")
    with TestClient(create_app(digits_mlp_run)) as c:
        assert c.get("/health").json()["key_required"] is True
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # no data there
        for method, path, body in [
            ("post", "/explain", {"test_ids": [1], "k": 2}),
            ("get", "/examples/1", None),
            ("get", "/examples", None),
            ("get", "/noise", None),
            ("post", "/dumps", {"test_ids": [1], "k": 2}),
            ("get", "/dumps", None),
            ("get", "/dumps/0123456789abcdef", None),
        ]:
            kwargs = {} if body is None else {"json": body}
            assert_error(getattr(c, method)(path, **kwargs), 401, "X-API-Key")
            assert_error(getattr(c, method)(path, headers={"X-API-Key": "wrong"}, **kwargs), 401)
        ok = c.post("/explain", json={"test_ids": [1], "k": 2}, headers={"X-API-Key": "from-env"})
        assert ok.status_code == 200
    with TestClient(create_app(digits_mlp_run, api_key="from-arg")) as c:
        assert c.get("/examples/1", headers={"X-API-Key": "from-env"}).status_code == 401
        assert c.get("/examples/1", headers={"X-API-Key": "from-arg"}).status_code == 200


def test_non_loopback_bind_needs_a_key(digits_mlp_run, monkeypatch):
    monkeypatch.delenv("INFLUENCE_API_KEY", raising=False)
    for host in ("0.0.0.0", "192.168.1.4", "::", "example.org"):
        with pytest.raises(ValueError, match="api-key"):
            check_bind(host, None)
        with pytest.raises(ValueError, match="INFLUENCE_API_KEY"):
            serve(digits_mlp_run, host=host)
    assert check_bind("0.0.0.0", "k") == {"default": "k"}
    assert check_bind("0.0.0.0", "ann:a1,bob:b2") == {"ann": "a1", "bob": "b2"}  # the CLI's named keys
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert check_bind(host, None) is None
    monkeypatch.setenv("INFLUENCE_API_KEY", "env-key")
    assert check_bind("0.0.0.0", None) == {"default": "env-key"}


def test_cli_serve_refuses_a_public_bind_without_a_key(digits_mlp_run, monkeypatch):
    from typer.testing import CliRunner

    from api.cli import app

    monkeypatch.delenv("INFLUENCE_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["serve", str(digits_mlp_run), "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "not loopback" in result.output


def test_concurrent_explains_are_batched_and_answer_as_alone(digits_mlp_run):
    import threading

    from api.service import ExplainBatcher
    from store import UnknownExampleError

    with open_index(digits_mlp_run) as index:
        calls = []
        original = index.explain

        def counting(**kwargs):
            calls.append(len(kwargs["test_ids"]))
            return original(**kwargs)

        index.explain = counting
        lock = threading.Lock()
        batcher = ExplainBatcher(index, lock)
        requests = [[3], [7, 8], [99999], [3], [11], [12, 13, 14], [15]]
        results: dict[int, object] = {}

        def ask(i):
            try:
                results[i] = batcher.explain(requests[i], k=4, method="lissa")
            except Exception as err:  # the one bad request must get its own error
                results[i] = err

        with lock:  # everything queues while the index is busy, then runs in as few calls as possible
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
            for t in threads:
                t.start()
            time.sleep(0.5)
        for t in threads:
            t.join(120)
        batcher.stop()
        index.explain = original
        assert isinstance(results[2], UnknownExampleError) and "99999" in str(results[2])
        assert len(calls) < 2 * len(requests) and max(calls) > 2  # batched (the failed batch is retried alone)
        for i, ids in enumerate(requests):
            if i == 2:
                continue
            alone = index.explain(test_ids=ids, k=4, method="lissa")
            for got, want in zip(results[i], alone, strict=True):
                assert got.test_id == want.test_id and got.prediction == want.prediction
                assert [p.example_id for p in got.proponents] == [p.example_id for p in want.proponents]
                assert [p.example_id for p in got.opponents] == [p.example_id for p in want.opponents]
                np.testing.assert_allclose(
                    [p.score for p in got.proponents], [p.score for p in want.proponents], rtol=1e-4
                )


def test_noise_says_when_the_job_has_not_run(digits_mlp_run, tmp_path):
    """`GET /noise` before the label-noise job: 409 saying so (it used to be `[]`, the same as "no suspects");
    after it, each suspect with the signals behind its rank ({} for a run whose job stored none)."""
    import shutil

    import sqlalchemy as sa

    from store import load_noise_signals

    run = tmp_path / "run"
    shutil.copytree(digits_mlp_run, run, ignore=shutil.ignore_patterns("dumps"))
    with TestClient(create_app(run)) as c:
        assert_error(c.get("/noise"), 409, "NoiseNotRunError", "has not run", "influence noise")
        assert_error(c.get("/noise?offset=5"), 409, "has not run")
        suspects = c.app.state.index.find_label_noise(method="loss", progress=False, top=5)
        got = c.get("/noise?limit=5")
        assert got.status_code == 200, got.text
        scores = [s["suspect_score"] for s in got.json()]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True)
        # the signals behind each rank, stored with the job's result: the same as the Python suspects'
        assert [s["example_id"] for s in got.json()] == [s.example_id for s in suspects]
        for item, suspect in zip(got.json(), suspects, strict=True):
            assert set(item["signals"]) == set(suspect.signals) and "loss" in item["signals"]
            np.testing.assert_allclose([item["signals"][k] for k in suspect.signals], list(suspect.signals.values()))
        with c.app.state.index.metadata.session_scope() as session:  # a run whose job ran before signals existed
            session.execute(sa.text("DROP TABLE noise_signals"))
        old = c.get("/noise?limit=5")
        assert old.status_code == 200 and [s["signals"] for s in old.json()] == [{}] * 5
        assert load_noise_signals(c.app.state.index.metadata, [suspects[0].example_id]) == {suspects[0].example_id: {}}
        past_the_end = c.get("/noise", params={"offset": len(c.app.state.index.train_ids)})
        assert past_the_end.status_code == 200 and past_the_end.json() == []


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_work_offline(client, page):
    """The docs pages reference only the service's own assets (no CDN), and each of them answers 200."""
    import re

    html = client.get(page)
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html.text)
    urls += re.findall(r"""url:\s*['"]([^'"]+)['"]""", html.text)  # the schema Swagger UI loads
    urls += re.findall(r"""spec-url=["']([^"']+)["']""", html.text)  # the schema ReDoc loads
    scripts = [u for u in urls if u.endswith(".js")]
    assert scripts, html.text
    assert [u for u in urls if "://" in u or u.startswith("//")] == [], urls
    for url in set(urls):
        got = client.get(url)
        assert got.status_code == 200, (url, got.status_code)
        assert len(got.content) > 0
