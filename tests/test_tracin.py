"""TracIn self-influence from Task checkpoints: formula vs an independent torch computation, errors, noise job."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from api import build_index
from indexer import Task
from indexer.errors import TaskError


def _tiny_task(checkpoints=None, **kw):
    from indexer.demo import load_digits_split

    xtr, ytr, _, _ = load_digits_split(0)
    xtr, ytr = torch.from_numpy(xtr[:300]), torch.from_numpy(ytr[:300])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    train = torch.utils.data.TensorDataset(xtr, ytr)
    return Task(model=model, train=train, l2=1e-3, checkpoints=checkpoints, **kw), model, xtr, ytr


def _torch_tracin(model, states, x, y):
    """sum_c lr_c ||grad_theta CE(f(x_i; theta_c), y_i)||^2, one example at a time with autograd (float64)."""
    total = np.zeros(len(x))
    for state, lr in states:
        m = copy.deepcopy(model).double()
        m.load_state_dict({k: v.double() for k, v in state.items()})
        x = x.double()
        for i in range(len(x)):
            m.zero_grad()
            nn.functional.cross_entropy(m(x[i : i + 1]), y[i : i + 1]).backward()
            total[i] += lr * sum(float((p.grad.double() ** 2).sum()) for p in m.parameters())
    return total


def test_tracin_self_influence_matches_torch(tmp_path):
    _, model, x, y = _tiny_task()
    final = {k: v.clone() for k, v in model.state_dict().items()}
    early = {k: 0.5 * v for k, v in final.items()}
    path = tmp_path / "early.pt"
    torch.save(early, path)
    checkpoints = [(str(path), 0.1), (final, 0.02)]
    task, model, x, y = _tiny_task(checkpoints)
    index = build_index(task, tmp_path / "run", progress=False)
    got = np.asarray(np.load(index.paths.array("tracin_self_influence")))
    want = _torch_tracin(model, [(early, 0.1), (final, 0.02)], x, y)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-8)
    # the model's own weights are restored after the stage
    for k, v in model.state_dict().items():
        assert torch.equal(v, final[k])
    suspects = index.find_label_noise(method="tracin", top=5, progress=False)
    assert [s.example_id for s in suspects] == list(np.argsort(-want, kind="stable")[:5])
    assert suspects[0].signals["tracin"] == pytest.approx(want.max(), rel=1e-4)
    index.close()


def test_tracin_requires_checkpoints(digits_logreg_run):
    from api import open_index

    with open_index(digits_logreg_run) as index, pytest.raises(ValueError, match=r"tracin.*checkpoints"):
        index.find_label_noise(method="tracin", progress=False)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "non-empty"),
        ([({}, 0.1)], "keys differ"),
        ([("/nonexistent/ckpt.pt", 0.1)], "existing file"),
        ([(None, -1.0)], "learning_rate"),
        ([("x",)], "pair"),
    ],
)
def test_bad_checkpoints_are_refused(bad, match):
    with pytest.raises(TaskError, match=match):
        _tiny_task(bad)
