"""scope="model" on a tiny CNN: influence through every layer (LoGra per-layer projections, `indexer.logra`).

References in float64 from `model_reference` (torch.func Jacobians one example at a time, dense Gauss-Newton,
dense projection S): with projection off the run's `exact` scores are g_q^T (G + l2 I)^-1 g_i over every
parameter of the model; with projection on, the same formula in the projected space, and the stored per-layer
vectors are P_out^T (dL/dW) P_in. Batch size, chunking and an interrupted build change nothing; unsupported
layers and unknown module names are refused by name.
"""

import numpy as np
import pytest
import torch
from model_reference import gradients_and_ggn, influence_scores, jacobians, projection
from torch import nn

import influence as inf
from api import build_index, open_index
from indexer import IndexConfig, Task, TaskError, UnsupportedLayerError
from indexer.layers import resolve_layers
from indexer.logra import layer_projection_record
from store import load_manifest

L2 = 1e-2
N_TRAIN, N_TEST = 48, 6
OFF = IndexConfig(damping_subsets=0)
ON = IndexConfig(damping_subsets=0, project_above=100, layer_projection_dim=4)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    ).double()


def data(n: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    y = (X[:, 0, :4].sum((1, 2)) > 0).long() + (X[:, 0, 4:].sum((1, 2)) > 2).long()
    return list(zip(X, y.tolist(), strict=True))


def make_task(**kwargs) -> Task:
    model = tiny_cnn()
    train = data(N_TRAIN, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    X, y = torch.stack([x for x, _ in train]), torch.tensor([t for _, t in train])
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return Task(model=model.eval(), train=train, test=data(N_TEST, 2), l2=L2, scope="model", **kwargs)


@pytest.fixture(scope="module")
def task():
    return make_task()


@pytest.fixture(scope="module")
def runs(task, tmp_path_factory):
    out = {}
    for name, config in (("off", OFF), ("on", ON)):
        path = tmp_path_factory.mktemp("runs") / name
        build_index(task, path, config=config, progress=False).close()
        out[name] = path
    return out


@pytest.fixture(scope="module")
def reference(task):
    names = task.model_scope.names
    logits, J = jacobians(task.model, names, [x for x, _ in task.train])
    y = np.array([t for _, t in task.train])
    g, G = gradients_and_ggn(logits, J, y)
    qlogits, Jq = jacobians(task.model, names, [x for x, _ in task.test])
    gq, _ = gradients_and_ggn(qlogits, Jq, qlogits.argmax(1))
    return {"names": names, "g": g, "G": G, "gq": gq}


def scores(path, method, task=None, **kw):
    with open_index(path, task=task, lissa=inf.LissaConfig(damping=0.0)) as index:
        return index.pairwise_scores(list(range(N_TEST)), method=method, **kw)


def test_scope_model_takes_every_layer_and_records_it(task, runs):
    assert task.model_scope.names == ["0", "2", "5", "7"]
    assert task.model_scope.n_params == sum(p.numel() for p in task.model.parameters())
    manifest = load_manifest(runs["off"])
    assert manifest.task["scope"] == "model" and manifest.task["model_layers"] == ["0", "2", "5", "7"]
    assert manifest.extra["model"]["dim"] == task.model_scope.n_params and manifest.extra["model"]["layer_dim"] is None
    on = load_manifest(runs["on"]).extra["model"]
    assert on["layer_dim"] == 4 and on["seed"] == 0 and all("seeds" in r for r in on["layers"])
    # kept whole from the last layer back while they fit project_above=100 together: "7" (27), "0" (40), not the
    # 222 and 440 entries of "2" and "5"
    assert on["whole_budget"] == 100
    assert [(r["k_in"], r["k_out"]) for r in on["layers"]] == [(10, 4), (4, 4), (4, 4), (9, 3)]
    assert on["dim"] == 40 + 16 + 16 + 27


def test_projection_off_exact_scores_are_the_full_gauss_newton_influence(runs, reference):
    expected = influence_scores(reference["gq"], reference["g"], reference["G"], L2)
    for method in ("exact", "lissa"):
        got = scores(runs["off"], method)
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
    np.testing.assert_allclose(
        scores(runs["off"], "grad-dot"), reference["gq"] @ reference["g"].T, rtol=1e-4, atol=1e-6
    )


def test_projection_on_per_layer_vectors_and_scores_are_the_projected_formula(task, runs, reference):
    S = projection(task.model, reference["names"], 4, 0, whole_budget=ON.project_above)
    phi, phiq, GS = reference["g"] @ S, reference["gq"] @ S, S.T @ reference["G"] @ S
    with open_index(runs["on"]) as index:
        stored = np.asarray(index.run.array("model_train_vectors"), np.float64)
        A = np.asarray(index.run.array("model_curvature"))
    # per layer P_out^T (dL/dW) P_in from the full gradient
    np.testing.assert_allclose(stored, phi, rtol=1e-4, atol=1e-5 * np.abs(phi).max())
    np.testing.assert_allclose(A, GS + L2 * np.eye(len(GS)), rtol=1e-8, atol=1e-10)
    expected = influence_scores(phiq, phi, GS, L2)
    np.testing.assert_allclose(scores(runs["on"], "exact"), expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


def test_layer_table_per_example_gradients_for_embedding_conv1d_and_norms():
    """Embedding (padding_idx), Conv1d ("same"), LayerNorm, eval BatchNorm1d, Linear: full and projected."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 4, padding_idx=0)
            self.conv = nn.Conv1d(4, 5, 3, padding="same", dilation=2)
            self.ln = nn.LayerNorm(5)
            self.bn = nn.BatchNorm1d(5)
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            h = self.conv(self.emb(x).transpose(1, 2)).transpose(1, 2)
            h = self.bn(self.ln(torch.tanh(h)).transpose(1, 2)).mean(2)
            return self.fc(h)

    torch.manual_seed(1)
    net = Net().double()
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.running_var.uniform_(0.5, 2.0)
    X = torch.randint(0, 11, (5, 7))
    X[:, -2:] = 0
    y = np.array([0, 1, 2, 1, 0])
    task = Task(
        model=net, train=list(zip(X, y.tolist(), strict=True)), body=nn.Identity(), head=nn.Identity(), scope="model"
    )
    scope = task.model_scope
    assert [layer.kind for layer in scope.layers] == ["embedding", "conv", "norm", "norm", "linear"]
    logits, J = jacobians(net, scope.names, list(X))
    g, _ = gradients_and_ggn(logits, J, y)
    for k in (None, 2):
        record = layer_projection_record(scope.layers, k=k, seed=3)
        _, [phi] = scope.gradients(list(X), [y], record)
        np.testing.assert_allclose(phi, g @ projection(net, scope.names, k, 3), atol=1e-12)


def test_batch_size_and_chunking_do_not_change_the_run(runs, tmp_path):
    other = make_task(batch_size=5)
    path = tmp_path / "small-batches"
    config = IndexConfig(damping_subsets=0, project_above=100, layer_projection_dim=4, chunk_rows=7)
    build_index(other, path, config=config, progress=False).close()
    with open_index(path) as a, open_index(runs["on"]) as b:
        for name in ("model_train_vectors", "model_test_vectors", "model_curvature"):
            np.testing.assert_allclose(a.run.array(name), b.run.array(name), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scores(path, "exact"), scores(runs["on"], "exact"), rtol=1e-5, atol=1e-7)


def test_interrupted_build_resumes_to_the_same_arrays(task, runs, tmp_path, monkeypatch):
    from store import ChunkedArray

    original, calls = ChunkedArray.write_chunk, {"n": 0}

    def flaky(self, i, arr):
        if "model_" in str(getattr(self, "path", "")) or "model_" in repr(self):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt("simulated kill")
        return original(self, i, arr)

    monkeypatch.setattr(ChunkedArray, "write_chunk", flaky)
    config = IndexConfig(damping_subsets=0, project_above=100, layer_projection_dim=4, chunk_rows=10)
    path = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        build_index(task, path, config=config, progress=False)
    assert "model" not in load_manifest(path).stages
    monkeypatch.setattr(ChunkedArray, "write_chunk", original)
    build_index(task, path, config=config, progress=False).close()
    with open_index(path) as a, open_index(runs["on"]) as b:
        for name in ("model_train_vectors", "model_test_vectors", "model_curvature"):
            np.testing.assert_array_equal(a.run.array(name), b.run.array(name))


def test_explain_stored_ids_and_raw_inputs_agree_and_other_targets_need_the_model(task, runs):
    with open_index(runs["on"], task=task) as index:
        [stored] = index.explain(test_ids=[2], k=5, method="exact")
        [raw] = index.explain(inputs=torch.stack([task.test[2][0]]).numpy(), k=5, method="exact")
        assert [p.example_id for p in stored.proponents] == [p.example_id for p in raw.proponents]
        np.testing.assert_allclose([p.score for p in stored.proponents], [p.score for p in raw.proponents], rtol=1e-4)
        other = index.pairwise_scores([0, 1], method="grad-dot", targets=[2, 2])
        rep = index.pairwise_scores([0, 1], method="representer")
        assert other.shape == rep.shape == (2, N_TRAIN)
    with open_index(runs["on"]) as index, pytest.raises(ValueError, match="scope='model'"):
        predicted = int(index.run.array("model_test_targets")[0])
        index.pairwise_scores([0], method="grad-dot", targets=[(predicted + 1) % 3])


def test_dump_and_noise_run_and_a_delete_without_the_task_is_refused(task, runs, tmp_path):
    import pyarrow.parquet as pq

    from indexer.update import delete_examples

    with open_index(runs["on"], task=task) as index:
        out = index.dump(tmp_path / "d.parquet", k=3, method="exact", progress=False)
        assert len(pq.read_table(out)) > 0
        assert len(index.find_label_noise()) > 0
    before = {p.name: p.stat().st_mtime_ns for p in runs["on"].rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"task: deleting from the scope='model' run .* pass task="):
        delete_examples(runs["on"], [0])
    assert {p.name: p.stat().st_mtime_ns for p in runs["on"].rglob("*") if p.is_file()} == before


def test_unsupported_layers_and_unknown_names_are_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 2))
    train = [(torch.randn(4), 0), (torch.randn(4), 1)]
    with pytest.raises(UnsupportedLayerError, match=r"module '1' \(PReLU\)"):
        Task(model=model, train=train, scope="model")
    assert [layer.name for layer in resolve_layers(model, ["0", "2"])] == ["0", "2"]
    with pytest.raises(TaskError, match="'fc9'"):
        Task(model=model, train=train, scope=["0", "fc9"])
    grouped = nn.Sequential(nn.Conv1d(4, 4, 1, groups=2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedLayerError, match=r"module '0' \(Conv1d\): groups=2"):
        Task(model=grouped, train=[(torch.randn(4, 1), 0)], scope="model")
    with pytest.raises(TaskError, match="scope must be"):
        Task(model=model, train=train, scope="everything")


def test_the_service_explains_a_model_scope_run(task, runs, monkeypatch):
    from fastapi.testclient import TestClient

    from api.service import create_app

    monkeypatch.delenv("INFLUENCE_API_KEY", raising=False)
    x = torch.stack([task.test[i][0] for i in (0, 3)]).numpy()
    with open_index(runs["on"]) as index:
        want = [e.to_dict() for e in index.explain(test_ids=[0, 3], k=4, method="exact")]
    with TestClient(create_app(runs["on"], task=task)) as c:
        got = c.post("/explain", json={"test_ids": [0, 3], "k": 4, "method": "exact"})
        assert got.status_code == 200, got.text
        assert [g["proponents"] for g in got.json()] == [w["proponents"] for w in want]
        raw = c.post("/explain", json={"inputs": x.reshape(2, -1).tolist(), "k": 4, "method": "exact"})
        assert raw.status_code == 200, raw.text
        assert [[p["example_id"] for p in e["proponents"]] for e in raw.json()] == [
            [p["example_id"] for p in w["proponents"]] for w in want
        ]
        ekfac = c.post("/explain", json={"test_ids": [0, 3], "k": 4, "method": "ekfac"})
        assert ekfac.status_code == 200, ekfac.text
        with open_index(runs["on"]) as index:
            want = [e.to_dict() for e in index.explain(test_ids=[0, 3], k=4, method="ekfac")]
        assert [g["proponents"] for g in ekfac.json()] == [w["proponents"] for w in want]
