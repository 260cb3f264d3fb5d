"""The service's start-up warm-up (api.warmup) and the padded query batches (api.engine.pad_rows): after the
warm-up, explaining a batch of any size up to the service's largest compiles nothing, and padding changes no
answer."""

import logging
import time

import jax
import numpy as np
import pytest
from fastapi.testclient import TestClient

from api import open_index
from api.engine import batch_bucket, pad_rows
from api.service import create_app
from api.warmup import warm_up


def test_batches_are_padded_to_powers_of_two_by_repeating_the_last_row():
    assert [batch_bucket(m) for m in (1, 2, 3, 4, 5, 8, 9, 64, 65)] == [1, 2, 4, 4, 8, 8, 16, 64, 128]
    a = np.arange(10.0).reshape(5, 2)
    padded = pad_rows(a)
    assert padded.shape == (8, 2) and (padded[:5] == a).all() and (padded[5:] == a[-1]).all()
    assert pad_rows(a[:4]) is not None and pad_rows(a[:4]).shape == (4, 2)


def test_a_padded_batch_answers_as_each_query_alone(digits_mlp_run, digits_mlp_task):
    with open_index(digits_mlp_run, task=digits_mlp_task) as index:
        engine = index.engine
        q = engine.prepare(list(index.test_ids[:3]), None)
        g = engine.gradients(q.h, q.targets)
        x, _ = engine.solve(g, "exact")
        for i in range(3):
            np.testing.assert_allclose(engine.logits(q.h[i : i + 1])[0], q.logits[i], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(
                engine.gradients(q.h[i : i + 1], q.targets[i : i + 1])[0], g[i], rtol=1e-5, atol=1e-6
            )
            np.testing.assert_allclose(engine.solve(g[i : i + 1], "exact")[0][0], x[i], rtol=1e-4, atol=1e-6)


@pytest.fixture
def compiles(caplog):
    """The JAX programs compiled while the block runs (JAX logs each one under jax_log_compiles)."""
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):

            def count(fn) -> int:
                caplog.clear()
                fn()
                return sum("Compiling" in r.getMessage() for r in caplog.records)

            yield count
    finally:
        jax.config.update("jax_log_compiles", False)


def test_after_the_warm_up_no_batch_size_compiles(digits_mlp_run, digits_mlp_task, compiles):
    with open_index(digits_mlp_run, task=digits_mlp_task) as index:
        assert warm_up(index, max_queries=8) == 4  # buckets 1, 2, 4, 8
        ids = list(index.test_ids)
        engine = index.engine
        # the capture works: a shape never used compiles
        assert compiles(lambda: engine.head.logits(np.asarray(index.engine.run.test.features[:37]))) > 0
        for m in (1, 3, 5, 7, 8):
            assert compiles(lambda m=m: index.explain(test_ids=ids[10 : 10 + m], k=10)) == 0, m
            q = engine.prepare(ids[20 : 20 + m], None)
            assert compiles(lambda q=q: engine.solve(engine.gradients(q.h, q.targets), "lissa")) == 0, m


@pytest.mark.slow
def test_the_service_warms_up_at_start_and_says_so(digits_mlp_run):
    with TestClient(create_app(digits_mlp_run, warm=False)) as client:
        assert client.get("/health").json()["warm"] == "off"
    with TestClient(create_app(digits_mlp_run, warm=True)) as client:
        deadline = time.monotonic() + 300
        while (state := client.get("/health").json()["warm"]) == "running" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert state == "done"
        r = client.post("/explain", json={"test_ids": [0, 1, 2], "k": 3})
        assert r.status_code == 200 and len(r.json()) == 3
