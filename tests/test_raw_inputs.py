"""Raw `inputs` of any shape and type, for an image, a tabular and a text run: a 422 / ValueError, never a 500.

Property-based (hypothesis, derandomized): arbitrary JSON values, lists of texts, rows of numbers of any width
and rows of the right width go to `POST /explain` of a real service started with the task, and the same
values (and numpy / torch batches) to `Index.explain(inputs=...)`. Every answer is a 200 or a 422 naming
`inputs`; every Python error is a ValueError. The issue's cases are pinned: `["hello"]` on the wine (tabular)
run was an HTTP 500 (`'list' object has no attribute 'detach'`).
"""

from __future__ import annotations

import json

import hypothesis
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import strategies as st

from api import build_index, open_index
from api.service import create_app

pytestmark = pytest.mark.slow

KINDS = ("image", "tabular", "text")
SETTINGS = hypothesis.settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)


@pytest.fixture(scope="module", params=KINDS)
def served(request, tmp_path_factory, monkeypatch_module):
    """(kind, task, open Index with the task, TestClient of the service started with the task)."""
    from small_runs import digits_cnn_task, text_task, wine_task

    monkeypatch_module.delenv("INFLUENCE_API_KEY", raising=False)
    task = {"image": digits_cnn_task, "tabular": wine_task, "text": text_task}[request.param]()
    path = tmp_path_factory.mktemp("inputs") / request.param
    build_index(task, path, progress=False).close()
    index = open_index(path, task=task)
    with TestClient(create_app(path, task=task), raise_server_exceptions=False) as client:
        yield request.param, task, index, client
    index.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def width(task) -> int:
    x0 = task.train[0][0]
    return 1 if isinstance(x0, str) else int(np.prod(np.shape(x0)))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12,
)


def raw_inputs(n_values: int):
    """What a client may send as `inputs`: anything JSON, texts, rows of any width, rows of the right width."""
    finite = st.floats(-1e3, 1e3, allow_nan=False)
    return st.one_of(
        json_values,
        st.lists(st.text(max_size=40), min_size=1, max_size=3),
        st.lists(st.lists(finite, max_size=n_values + 3), min_size=1, max_size=3),
        st.lists(st.lists(finite, min_size=n_values, max_size=n_values), min_size=1, max_size=3),
    )


def check_answer(response, value) -> None:
    assert response.status_code in (200, 422), (value, response.status_code, response.text)
    body = response.json()
    if response.status_code == 422:
        assert body["detail"] and "inputs" in json.dumps(body), (value, body)
    else:
        assert len(body) == len(value) and all(len(e["proponents"]) <= 3 for e in body)


def test_the_issues_cases_are_refused_by_name(served):
    kind, _, index, client = served
    if kind == "text":
        bad, says = [[0.5] * 13], "takes texts"
    else:
        bad, says = ["hello"], "takes numbers"
    response = client.post("/explain", json={"inputs": bad, "k": 3})
    assert response.status_code == 422 and says in response.json()["detail"], response.text
    with pytest.raises(ValueError, match=says):
        index.explain(inputs=bad, k=3)
    with pytest.raises(ValueError, match="inputs"):
        index.explain(inputs=[], k=3)


def test_a_right_input_answers_like_its_stored_test_example(served):
    """HTTP rows are flattened: an image's 64 values are reshaped to [1, 8, 8] (its training examples' shape)."""
    kind, task, index, client = served
    x = task.test[0][0]
    sent = [x] if kind == "text" else [np.asarray(x, np.float64).reshape(-1).tolist()]
    response = client.post("/explain", json={"inputs": sent, "k": 3, "method": "grad-dot"})
    assert response.status_code == 200, response.text
    [stored] = index.explain(test_ids=[int(index.test_ids[0])], k=3, method="grad-dot")
    [got] = response.json()
    assert got["prediction"] == stored.prediction
    assert [p["example_id"] for p in got["proponents"]] == [p.example_id for p in stored.proponents]


def test_no_raw_input_gets_a_500_over_http(served):
    _, task, _, client = served

    @SETTINGS
    @hypothesis.given(value=raw_inputs(width(task)))
    def check(value):
        body = json.dumps({"inputs": value, "k": 3, "method": "grad-dot"})  # inf goes out as `Infinity`
        check_answer(client.post("/explain", content=body, headers={"content-type": "application/json"}), value)

    check()


def test_every_refused_python_input_is_a_value_error(served):
    _, task, index, _ = served
    n = width(task)
    arrays = st.one_of(
        raw_inputs(n),
        st.builds(lambda s, d: np.zeros(s, d), st.lists(st.integers(0, 9), max_size=4), st.sampled_from(["f4", "i8"])),
        st.builds(lambda s: torch.ones(s), st.lists(st.integers(0, 9), max_size=4)),
        st.text(max_size=10),
    )

    @SETTINGS
    @hypothesis.given(value=arrays)
    def check(value):
        try:
            out = index.explain(inputs=value, k=3, method="grad-dot")
        except ValueError as err:
            assert "inputs" in str(err) or "NaN" in str(err), err
        else:
            assert len(out) >= 1

    check()
