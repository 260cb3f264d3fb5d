"""The label-noise job's self-influence signal on scope="model" (`api.noise.model_self_influence`):
phi_i^T (G + l2 I + d I)^-1 phi_i over the whole model's projected per-layer gradients, checked against the dense
float64 formula from torch.func per-example Jacobians (`model_reference`: S^T g_i at the stored labels and
S^T G S), and flipped labels rank at the top of it."""

import numpy as np
import pytest
import torch
from model_reference import gradients_and_ggn, jacobians, projection
from test_model_scope import L2, ON, data
from torch import nn

import influence as inf
from api import build_index, open_index
from indexer import Task

FLIPPED = [5, 20, 33]


@pytest.fixture(scope="module")
def flipped(tmp_path_factory):
    """A CNN trained on clean labels, indexed with the labels of FLIPPED changed to another class."""
    from test_model_scope import tiny_cnn

    model = tiny_cnn()
    clean = data(48, 1)
    X, y = torch.stack([x for x, _ in clean]), torch.tensor([t for _, t in clean])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    train = [(x, (t + 1) % 3 if i in FLIPPED else t) for i, (x, t) in enumerate(clean)]
    task = Task(model=model.eval(), train=train, test=data(6, 2), l2=L2, scope="model")
    path = tmp_path_factory.mktemp("noise") / "run"
    build_index(task, path, config=ON, progress=False).close()
    return task, path


def test_self_influence_is_the_dense_whole_model_formula_and_finds_the_flips(flipped):
    task, path = flipped
    names = task.model_scope.names
    logits, J = jacobians(task.model, names, [x for x, _ in task.train])
    g, G = gradients_and_ggn(logits, J, np.array([t for _, t in task.train]))
    S = projection(task.model, names, 4, 0, whole_budget=ON.project_above)
    phi, GS = g @ S, S.T @ G @ S
    expected = np.einsum("nd,nd->n", phi, np.linalg.solve(GS + L2 * np.eye(len(GS)), phi.T).T)
    with open_index(path, lissa=inf.LissaConfig(damping=0.0)) as index:
        suspects = index.find_label_noise(method="self-influence")
    got = np.array([s.signals["self-influence"] for s in sorted(suspects, key=lambda s: s.example_id)])
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert [s.score for s in suspects] == sorted((s.score for s in suspects), reverse=True)
    top = [s.example_id for s in suspects[: 2 * len(FLIPPED)]]
    assert set(FLIPPED) <= set(top), top
    # the build's damping rule when the LissaConfig sets none: (G + l2 I + d I)^-1
    with open_index(path) as index:
        d = float(index.run.extra["model"]["damping"])
        [first] = index.find_label_noise(method="self-influence", top=1)
    i = first.example_id
    np.testing.assert_allclose(
        first.score, phi[i] @ np.linalg.solve(GS + (L2 + d) * np.eye(len(GS)), phi[i]), rtol=1e-4
    )
