"""The test predictions a training example supports or opposes (issue 17 item 5): Index.example_influence and
`GET /examples/{id}/influence` against the example's column of `pairwise_scores` over every stored test id."""

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api import open_index
from api.service import create_app
from store import UnknownExampleError

pytestmark = pytest.mark.slow


def test_supports_and_opposes_are_the_column_of_pairwise_scores(digits_mlp_run):
    with open_index(digits_mlp_run) as index:
        test_ids = [int(v) for v in index.test_ids]
        full = index.pairwise_scores(test_ids)  # [n_test, n_train], the run's default method
        row = 7
        example_id = int(index.train_ids[row])
        got = index.example_influence(example_id, k=5)
        again = index.example_influence(example_id, k=5)  # from the cached test side
        with pytest.raises(UnknownExampleError):
            index.example_influence(-5)
        with pytest.raises(ValueError, match="k must be"):
            index.example_influence(example_id, k=0)
    column = {t: float(full[j, row]) for j, t in enumerate(test_ids)}
    assert got == again and got.example_id == example_id and got.method == "lissa"
    for part, sign in ((got.supports, 1), (got.opposes, -1)):
        scores = [a.score for a in part]
        np.testing.assert_allclose(scores, [column[a.test_id] for a in part], rtol=1e-5, atol=1e-9)
        want = sorted((v for v in column.values() if sign * v > 0), key=lambda v: -sign * v)[:5]
        np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-9)
    assert got.supports and got.opposes

    with TestClient(create_app(digits_mlp_run)) as client:
        r = client.get(f"/examples/{example_id}/influence?k=5")
        assert r.status_code == 200, r.text
        body = r.json()
        assert [a["test_id"] for a in body["supports"]] == [a.test_id for a in got.supports]
        assert [a["test_id"] for a in body["opposes"]] == [a.test_id for a in got.opposes]
        np.testing.assert_allclose([a["score"] for a in body["supports"]], [a.score for a in got.supports], rtol=1e-6)
        assert {"prediction", "label", "preview"} <= set(body["supports"][0])
        assert client.get("/examples/999999/influence").status_code == 404
        assert client.get(f"/examples/{example_id}/influence?k=0").status_code == 422
        assert client.get(f"/examples/{example_id}/influence?method=magic").status_code == 422
