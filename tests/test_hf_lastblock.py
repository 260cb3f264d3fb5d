"""The torch.func backend of scope="last-block" (indexer.torch_backend) on a tiny BERT built in code.

Per-example gradients of the last block + head equal torch autograd one text at a time (float64, texts padded
in shared micro-batches); the torch GGN/Hessian products equal the JAX head matvec on the head-only scope
(float64) and LiSSA solves with either agree; on the last-block scope the GGN product equals J^T H_logits J v
from explicit Jacobians and the Hessian product a central difference of gradients; the projections are what
they claim; unsupported encoders and bad input are refused by name.
"""

import numpy as np
import pytest
import torch
from torch import nn

import influence as inf
from indexer import Task, TaskError, UnsupportedLayerError
from indexer.hf import HFEncoderClassifier
from indexer.torch_backend import (
    HeadScope,
    LastBlockScope,
    SketchProjection,
    TorchGaussianProjection,
    compute_projected_grads,
    compute_torch_per_example_grads,
    embed_texts,
    make_torch_matvec,
    make_torch_projection,
)

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_hf_task import make_tokenizer, sentiment_corpus, tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def perturbed(kind: str, tokenizer, dtype=torch.float64) -> nn.Module:
    model = tiny_model(kind, len(tokenizer)).eval()
    torch.manual_seed(1)
    for p in model.parameters():  # HF initialises biases to 0 and LayerNorm to 1: make every parameter count
        p.data.add_(0.05 * torch.randn_like(p))
    return model.to(dtype)


def autograd_grad(model: nn.Module, scope: LastBlockScope, tokenizer, text: str, label: int) -> np.ndarray:
    """d CE / d (last block + head) of one text alone (no padding), by plain autograd on the full model."""
    enc = tokenizer([text], return_tensors="pt")
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    logits = out if isinstance(out, torch.Tensor) else out.logits
    loss = nn.functional.cross_entropy(logits, torch.tensor([label]))
    # the model's own parameters: its last block, and the head layers (the model's modules) in the scope's order
    wanted = [
        scope.body_block.get_parameter(k[6:]) if k.startswith("block.") else scope.head.get_parameter(k[5:])
        for k in scope.names
    ]
    owned = {id(v) for v in model.parameters()}
    assert all(id(v) in owned for v in wanted)
    grads = torch.autograd.grad(loss, wanted)
    return torch.cat([g.reshape(-1) for g in grads]).numpy()


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "encoder+linear"])
def test_per_example_grads_equal_autograd_one_text_at_a_time_float64(kind, tokenizer):
    model = perturbed(kind, tokenizer)
    data = sentiment_corpus(11, seed=3)
    texts, labels = [t for t, _ in data], np.array([y for _, y in data])
    scope = LastBlockScope(model, tokenizer, batch_size=4, dtype=torch.float64)
    batches = scope.block_inputs(texts)
    assert any(int(b.mask.sum(1).min()) < b.mask.shape[1] for b in batches)  # some texts are padded
    got = compute_projected_grads(scope, batches, labels, None, chunk=3)
    assert got.shape == (11, scope.n_params) and got.dtype == np.float64
    for i in range(len(texts)):
        expected = autograd_grad(model, scope, tokenizer, texts[i], int(labels[i]))
        assert np.abs(expected).max() > 1e-3
        np.testing.assert_allclose(got[i], expected, atol=1e-11, rtol=1e-9)


def test_scope_logits_reproduce_the_model_and_leave_its_attention_alone(tokenizer):
    model = perturbed("bert", tokenizer, torch.float32)
    before = model.config._attn_implementation
    texts = [t for t, _ in sentiment_corpus(9, seed=4)]
    scope = LastBlockScope(model, tokenizer, batch_size=4)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**enc).logits.numpy()
        got = np.zeros_like(expected)
        for b in scope.block_inputs(texts):
            got[b.positions] = scope.logits(scope.params, b.hidden, b.mask).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert model.config._attn_implementation == before
    assert {m.config._attn_implementation for m in scope.block.modules() if hasattr(m, "config")} == {"eager"}


def head_scope_data(tokenizer):
    model = perturbed("bert", tokenizer, torch.float32)
    data = sentiment_corpus(40, seed=5)
    task = Task.from_hf(model, tokenizer, train=data)
    h = np.asarray(task.features([t for t, _ in data]), np.float64)
    y = np.array([lbl for _, lbl in data])
    return task, h, y


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_torch_matvec_equals_the_jax_head_matvec_on_the_head_scope_float64(curvature, tokenizer):
    task, h, y = head_scope_data(tokenizer)
    head = task.translated_head()
    theta, unravel = inf.flatten_params(head.params)
    theta = np.asarray(theta, np.float64)
    jax_mv = inf.make_head_matvec(head.spec, unravel, theta, h, y, l2=1e-3, curvature=curvature)
    scope = HeadScope(task.head_modules, dtype=torch.float64)
    np.testing.assert_allclose(scope.theta(), theta, rtol=0, atol=1e-7)  # same flat order (float32 values)
    scope.params = scope.unflatten(torch.from_numpy(theta))  # the exact same float64 point
    torch_mv = make_torch_matvec(scope, [torch.from_numpy(h)], y, l2=1e-3, curvature=curvature, batch_size=64)
    rng = np.random.default_rng(0)
    V = rng.normal(size=(3, len(theta)))
    for v in V:
        expected = np.asarray(jax_mv(v))
        np.testing.assert_allclose(np.asarray(torch_mv(v)), expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    if curvature == "hessian":
        return
    # the solvers take it unchanged: LiSSA through the torch matvec equals LiSSA through the JAX one
    top = inf.estimate_top_eigenvalue(jax_mv, len(theta), iters=50)
    config = inf.LissaConfig(damping=1e-2, depth=30, scale=1.5 * top)
    a = inf.solve_lissa(torch_mv, V[:2], config=config, l2=1e-3, top_eigenvalue=top)
    b = inf.solve_lissa(jax_mv, V[:2], config=config, l2=1e-3, top_eigenvalue=top)
    np.testing.assert_allclose(np.asarray(a.x), np.asarray(b.x), rtol=1e-8, atol=1e-10 * np.abs(b.x).max())


def test_head_scope_per_example_grads_equal_the_jax_path(tokenizer):
    task, h, y = head_scope_data(tokenizer)
    head = task.translated_head()
    theta, unravel = inf.flatten_params(head.params)
    expected = np.asarray(inf.compute_per_example_grads(head.spec, unravel, np.asarray(theta, np.float64), h, y))
    scope = HeadScope(task.head_modules, dtype=torch.float64)
    scope.params = scope.unflatten(torch.from_numpy(np.asarray(theta, np.float64)))
    got = compute_torch_per_example_grads(scope, [torch.from_numpy(h)], y, chunk=7).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_last_block_ggn_and_hessian_products_float64(tokenizer):
    model = perturbed("bert", tokenizer)
    data = sentiment_corpus(7, seed=6)
    texts, y = [t for t, _ in data], np.array([lbl for _, lbl in data])
    scope = LastBlockScope(model, tokenizer, batch_size=3, dtype=torch.float64)
    batches = scope.block_inputs(texts)  # 3 length-sorted micro-batches, padded differently
    ggn = make_torch_matvec(scope, batches, y, l2=0.0, curvature="ggn", batch_size=2)
    hess = make_torch_matvec(scope, batches, y, l2=0.5, curvature="hessian", batch_size=2)
    v = torch.from_numpy(np.random.default_rng(1).normal(size=scope.n_params))
    theta = scope.flatten(scope.params)

    # GGN: (1/n) sum_i J_i^T (diag p_i - p_i p_i^T) J_i v with explicit Jacobians [b, classes, p] per batch
    expected = torch.zeros_like(v)
    for b in batches:

        def logits_of(t: torch.Tensor, b=b) -> torch.Tensor:
            return scope.logits(scope.unflatten(t), b.hidden, b.mask)

        J = torch.func.jacrev(logits_of)(theta)
        p = torch.softmax(logits_of(theta), -1)
        H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        expected += torch.einsum("icp,icd,id->p", J, H, J @ v) / len(y)
    got = torch.from_numpy(np.array(ggn(v.numpy())))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12 * expected.abs().max().item())

    # Hessian: central difference of the mean-loss gradient (error O(eps^2)), plus l2 v
    def mean_loss(t: torch.Tensor) -> torch.Tensor:
        params = scope.unflatten(t)
        return sum(
            nn.functional.cross_entropy(
                scope.logits(params, b.hidden, b.mask), torch.from_numpy(y[b.positions]), reduction="sum"
            )
            for b in batches
        ) / len(y)

    eps = 1e-4
    fd = (torch.func.grad(mean_loss)(theta + eps * v) - torch.func.grad(mean_loss)(theta - eps * v)) / (2 * eps)
    fd += 0.5 * v
    got = torch.from_numpy(np.array(hess(v.numpy())))
    assert ((got - fd).norm() / fd.norm()).item() < 1e-6
    assert (got - 0.5 * v - torch.from_numpy(np.array(ggn(v.numpy())))).abs().max() > 1e-6  # H != GGN here


def test_sketch_projection_is_its_matrix_and_preserves_inner_products():
    S = SketchProjection(p=300, d=32, seed=3, buckets=64)  # folds 300 coordinates to 64 buckets, then Gaussian
    M = S.matrix()
    G = torch.from_numpy(np.random.default_rng(0).normal(size=(5, 300)))
    np.testing.assert_allclose(S.project(G).numpy(), G.numpy() @ M, rtol=1e-6, atol=1e-6)
    P = inf.make_projection(64, 32, seed=3).matrix(dtype=np.float32)  # influence.projection's P (float32 draw)
    np.testing.assert_allclose(np.abs(M), np.abs(P[np.arange(300) % 64]), rtol=1e-6)
    assert np.array_equal(SketchProjection(p=300, d=32, seed=3, buckets=64).matrix(), M)  # a function of the seed
    # unbiased: E[S S^T] = I, so the mean of <S^T x, S^T y> over seeds approaches <x, y>
    x, y = G[0].numpy(), G[1].numpy() + G[0].numpy()
    est = [(x @ m) @ (y @ m) for m in (SketchProjection(p=300, d=32, seed=s, buckets=64).matrix() for s in range(300))]
    sd = np.sqrt(2 * (x @ x) * (y @ y) / 32 / 300)
    assert abs(np.mean(est) - x @ y) < 4 * sd
    # no fold when p <= buckets: exactly influence.project
    small = SketchProjection(p=50, d=8, seed=5).matrix()
    np.testing.assert_allclose(small, inf.make_projection(50, 8, seed=5).matrix(dtype=np.float32), rtol=1e-6)


def test_gaussian_kind_projects_exactly_like_influence_project():
    G = np.random.default_rng(2).normal(size=(4, 500)).astype(np.float32)
    P = make_torch_projection(500, 32, seed=7, kind="gaussian")
    assert isinstance(P, TorchGaussianProjection)
    got = P.project(torch.from_numpy(G)).numpy()
    np.testing.assert_allclose(got, np.asarray(inf.project(G, d=32, seed=7)), rtol=1e-5, atol=1e-5)


def test_embeddings_of_texts_are_the_projected_gradients(tokenizer):
    model = perturbed("bert", tokenizer, torch.float32)
    data = sentiment_corpus(10, seed=8)
    texts, y = [t for t, _ in data], np.array([lbl for _, lbl in data])
    scope = LastBlockScope(model, tokenizer, batch_size=3)
    emb = embed_texts(scope, texts, y, dim=64, seed=1)
    full = compute_projected_grads(scope, scope.block_inputs(texts), y, None)
    expected = full @ SketchProjection(p=scope.n_params, d=64, seed=1).matrix()
    np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_bad_input_and_unsupported_encoders_are_refused_by_name(tokenizer):
    class Plain(nn.Module):
        def forward(self, input_ids, attention_mask):
            return None

    with pytest.raises(UnsupportedLayerError, match="encoder Plain is unsupported for scope='last-block'"):
        LastBlockScope(HFEncoderClassifier(Plain(), nn.Linear(4, 2)), tokenizer)
    scope = LastBlockScope(perturbed("bert", tokenizer, torch.float32), tokenizer)
    with pytest.raises(TaskError, match="texts\\[1\\] must be a str"):
        scope.block_inputs(["ok", 3])
    with pytest.raises(TaskError, match="batch_size must be a positive int, got 0"):
        LastBlockScope(perturbed("bert", tokenizer), tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="buckets must be a positive int, got 0"):
        SketchProjection(p=5, d=10, seed=0, buckets=0)
    with pytest.raises(ValueError, match="kind must be one of"):
        make_torch_projection(5, 8, seed=0, kind="dense")
    [b] = scope.block_inputs(["good day", "bad day"])
    with pytest.raises(ValueError, match="targets must have shape \\[2\\]"):
        compute_projected_grads(scope, [b], [0, 1, 2], None)
