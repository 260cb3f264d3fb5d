"""End to end on digits: build, explain with every method, exactness against dense references, reopen."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from api import METHODS, open_index
from store import ConfigMismatchError, UnknownExampleError

pytestmark = pytest.mark.slow


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.endswith(("-wal", "-shm")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("method", METHODS)
def test_topk_equals_argsort_of_dense_scores(digits_mlp_run, method):
    index = open_index(digits_mlp_run)
    test_ids = [0, 7, 11]
    exps = index.explain(test_ids=test_ids, k=8, method=method)
    dense = index.pairwise_scores(test_ids, method=method)
    for exp, row in zip(exps, dense, strict=True):
        top = np.argsort(-row, kind="stable")[:8]
        top = top[row[top] > 0]
        assert [p.example_id for p in exp.proponents] == top.tolist()
        np.testing.assert_allclose([p.score for p in exp.proponents], row[top], rtol=2e-3, atol=1e-6)
        bottom = np.argsort(row, kind="stable")[:8]
        bottom = bottom[row[bottom] < 0]
        assert [p.example_id for p in exp.opponents] == bottom.tolist()
        assert all(p.label == index.run.train.labels[p.example_id] for p in exp.proponents + exp.opponents)
    index.close()


def test_lissa_matches_exact_on_the_mlp_head(digits_mlp_run):
    index = open_index(digits_mlp_run)
    test = index.run.test
    g = index.engine.gradients(np.asarray(test.features[:5]), np.asarray(test.labels[:5]))
    x_lissa, diag = index.engine.solve(g, "lissa")
    x_exact, _ = index.engine.solve(g, "exact")
    rel = np.linalg.norm(x_lissa - x_exact, axis=1) / np.linalg.norm(x_exact, axis=1)
    assert rel.max() <= 1e-2, (rel, diag)
    assert diag["residual_max"] <= 1e-2
    index.close()


def test_representer_fidelity(digits_mlp_run):
    index = open_index(digits_mlp_run)
    assert index.manifest.extra["representer"]["fidelity"] >= 0.99
    index.close()


def test_logreg_exact_scores_equal_the_closed_form(digits_logreg_task, digits_logreg_run):
    """Multinomial logistic regression in closed form (numpy, float64): with x~ = [x, 1], p = softmax(W x~),
    g(x, c) = (p - e_c) (x) x~ and H = (1/n) sum_i (diag(p_i) - p_i p_i^T) (x) x~_i x~_i^T + l2 I;
    score = g_q^T H^-1 g_i. The index's "exact" scores must equal it, and LiSSA must agree (Pearson >= 0.99)."""
    from api import Index
    from influence import LissaConfig

    index = Index(digits_logreg_run, lissa=LissaConfig(damping=0.0))
    task = digits_logreg_task
    lin = task.model[0]
    w = np.concatenate([lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()[:, None]], 1)

    def augment(x):
        return np.concatenate([np.asarray(x, np.float64), np.ones((len(x), 1))], 1)

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def grads(xa, classes):
        p = softmax(xa @ w.T)
        p[np.arange(len(xa)), classes] -= 1.0
        return np.einsum("ic,ij->icj", p, xa).reshape(len(xa), -1)

    x, y = augment(task.train.tensors[0]), task.train.tensors[1].numpy()
    p = softmax(x @ w.T)
    a = np.einsum("ic,cd->icd", p, np.eye(p.shape[1])) - np.einsum("ic,id->icd", p, p)
    hess = np.einsum("icd,ij,ik->cjdk", a, x, x).reshape(w.size, w.size) / len(x) + task.l2 * np.eye(w.size)
    xq = augment(task.test.tensors[0][:4])
    gq = grads(xq, (xq @ w.T).argmax(1))
    rows = np.arange(0, len(x), 7)
    closed = np.linalg.solve(hess, gq.T).T @ grads(x[rows], y[rows]).T

    exact = index.pairwise_scores([0, 1, 2, 3], method="exact")
    np.testing.assert_allclose(exact[:, rows], closed, rtol=1e-3, atol=1e-4 * np.abs(closed).max())
    lissa = index.pairwise_scores([0, 1, 2, 3], method="lissa")
    assert np.corrcoef(lissa.ravel(), exact.ravel())[0, 1] >= 0.99
    index.close()


def test_reopen_gives_identical_explanations(digits_mlp_run):
    first = [e.to_dict() for e in open_index(digits_mlp_run).explain(test_ids=[1, 2], k=5, method="exact")]
    second = [e.to_dict() for e in open_index(digits_mlp_run).explain(test_ids=[1, 2], k=5, method="exact")]
    assert first == second


def test_raw_inputs_need_the_task_and_match_stored_queries(digits_mlp_task, digits_mlp_run):
    index = open_index(digits_mlp_run, task=digits_mlp_task)
    x = digits_mlp_task.test.tensors[0][:2]
    from_inputs = index.explain(inputs=x, k=5, method="grad-dot")
    stored = index.explain(test_ids=[0, 1], k=5, method="grad-dot")
    for a, b in zip(from_inputs, stored, strict=True):
        assert [p.example_id for p in a.proponents] == [p.example_id for p in b.proponents]
        assert a.test_id is None and a.prediction == b.prediction
    with pytest.raises(ValueError, match="task="):
        open_index(digits_mlp_run).explain(inputs=x)
    with pytest.raises(ValueError, match="NaN"):
        index.explain(inputs=torch.full((1, 64), float("nan")))
    with pytest.raises(ValueError, match="shape"):
        index.explain(inputs=torch.zeros(1, 63))
    with pytest.raises(ValueError, match="dtype"):
        index.explain(inputs=torch.zeros(1, 64, dtype=torch.int64))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"test_ids": [10_000]}, UnknownExampleError, "10000"),
        ({"test_ids": [-1]}, UnknownExampleError, "-1"),
        ({"test_ids": [0], "k": 0}, ValueError, "k must be"),
        ({"test_ids": [0], "method": "magic"}, ValueError, "magic"),
        ({"test_ids": [0], "targets": [10]}, ValueError, "targets"),
        ({}, ValueError, "exactly one"),
    ],
)
def test_bad_queries_get_clear_errors_and_write_nothing(digits_mlp_run, kwargs, error, match):
    before = tree_digest(digits_mlp_run)
    index = open_index(digits_mlp_run)
    with pytest.raises(error, match=match):
        index.explain(**kwargs)
    index.close()
    assert tree_digest(digits_mlp_run) == before


def test_another_model_is_refused(digits_mlp_run, digits_logreg_task):
    with pytest.raises(ConfigMismatchError, match="fingerprint"):
        open_index(digits_mlp_run, task=digits_logreg_task)


def test_runs_built_before_the_damping_was_stored_open_with_the_same_damping(digits_mlp_run, tmp_path):
    """Runs written before the build stored its damping (`extra["damping"]`, and its calibration) get the
    eigenvalue rule's, the value the calibration record keeps as `rule_damping`."""
    import json
    import shutil

    from influence import LissaConfig

    old = tmp_path / "old"
    shutil.copytree(digits_mlp_run, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["extra"].pop("damping")
    rule = manifest["extra"].pop("damping_calibration")["rule_damping"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with open_index(digits_mlp_run, lissa=LissaConfig(damping=rule)) as new_run, open_index(old) as old_run:
        assert old_run.engine.damping == new_run.engine.damping == rule
        a = old_run.explain(test_ids=[3, 5], k=5, method="lissa")
        b = new_run.explain(test_ids=[3, 5], k=5, method="lissa")
        assert [[p.example_id for p in e.proponents] for e in a] == [[p.example_id for p in e.proponents] for e in b]
