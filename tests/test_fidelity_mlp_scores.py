"""experiments/fidelity_mlp_scores.compute_scores (the LDS scores of the Fashion-MNIST MLP) on a tiny MLP,
against dense float64 formulas built with torch autograd (independent of the influence package)."""

import json

import numpy as np
import pytest
import torch

from experiments.fidelity_mlp_scores import compute_scores


def _mlp_params(rng, d, h, k):
    return [rng.standard_normal(s).astype(np.float32) * 0.5 for s in ((h, d), (h,), (k, h), (k,))]


def _torch_logits(flat, x, d, h, k):
    W1 = flat[: h * d].reshape(h, d)
    b1 = flat[h * d : h * d + h]
    o = h * d + h
    W2 = flat[o : o + k * h].reshape(k, h)
    b2 = flat[o + k * h :]
    return torch.relu(x @ W1.T + b1) @ W2.T + b2


def _grads(flat, x, y, d, h, k):
    out = []
    for i in range(len(y)):
        f = flat.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(_torch_logits(f, x[i : i + 1], d, h, k), y[i : i + 1])
        (g,) = torch.autograd.grad(loss, f)
        out.append(g)
    return torch.stack(out)


@pytest.mark.slow  # ~90 s on the loaded 2-core machine, mostly JAX compilation (eigenpairs, 3 LiSSA solves)
def test_scores_match_dense_float64():
    rng = np.random.default_rng(0)
    d, h, k, n, m, l2 = 6, 5, 3, 40, 3, 1e-2
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, k, n)
    xq = rng.standard_normal((m, d)).astype(np.float32)
    yq = rng.integers(0, k, m)
    W1, b1, W2, b2 = _mlp_params(rng, d, h, k)
    ck = [_mlp_params(rng, d, h, k) for _ in range(2)]
    spec = [
        {"kind": "linear", "in_features": d, "out_features": h, "bias": True},
        {"kind": "relu"},
        {"kind": "linear", "in_features": h, "out_features": k, "bias": True},
    ]
    inp = {
        "spec": np.asarray(json.dumps(spec)),
        "l2": np.asarray(l2),
        "train_h": x,
        "train_y": y,
        "query_h": xq,
        "query_y": yq,
        "W1": W1,
        "b1": b1,
        "W2": W2,
        "b2": b2,
        "ck_W1": np.stack([c[0] for c in ck]),
        "ck_b1": np.stack([c[1] for c in ck]),
        "ck_W2": np.stack([c[2] for c in ck]),
        "ck_b2": np.stack([c[3] for c in ck]),
        "ck_lr": np.asarray([0.1, 0.05]),
    }
    scores, diag = compute_scores(inp, dampings=(0.1,), log=lambda s: None)

    def flat(ps):
        return torch.from_numpy(np.concatenate([p.ravel() for p in ps]).astype(np.float64))

    X, Y = torch.from_numpy(x).double(), torch.from_numpy(y)
    Xq, Yq = torch.from_numpy(xq).double(), torch.from_numpy(yq)
    theta = flat([W1, b1, W2, b2])
    G, Gq = _grads(theta, X, Y, d, h, k), _grads(theta, Xq, Yq, d, h, k)
    # GGN: (1/n) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i + l2 I, J_i the Jacobian of the logits
    p = theta.numel()
    C = torch.zeros(p, p, dtype=torch.float64)
    for i in range(n):
        J = torch.autograd.functional.jacobian(lambda f, i=i: _torch_logits(f, X[i : i + 1], d, h, k)[0], theta)
        pr = torch.softmax(_torch_logits(theta, X[i : i + 1], d, h, k)[0], 0)
        C += J.T @ (torch.diag(pr) - torch.outer(pr, pr)) @ J / n
    A = C + l2 * torch.eye(p, dtype=torch.float64)

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    np.testing.assert_allclose(scores["grad-dot"], (Gq @ G.T).numpy(), rtol=1e-4, atol=1e-6)
    tr = sum(
        lr * (_grads(flat(c), Xq, Yq, d, h, k) @ _grads(flat(c), X, Y, d, h, k).T)
        for c, lr in zip(ck, [0.1, 0.05], strict=True)
    )
    np.testing.assert_allclose(scores["tracin"], tr.numpy(), rtol=1e-4, atol=1e-6)
    auto = diag["curvature"]["automatic_damping"]
    assert auto == 0.0  # l2 = 1e-2 already conditions the deflated remainder
    exact = (Gq @ torch.linalg.solve(A, G.T)).numpy()
    assert rel(scores["lissa"], exact) < 1e-2
    exact_d = (Gq @ torch.linalg.solve(A + 0.1 * torch.eye(p, dtype=torch.float64), G.T)).numpy()
    assert rel(scores["lissa_damping=0.1"], exact_d) < 1e-2
    assert rel(scores["lissa_damping=0.1"], exact) > 0.05  # the damping changes the answer: not a vacuous pass
    # the projection (1024 > p dims here) keeps inner products up to JL noise
    assert np.corrcoef(scores["lissa_proj1024"].ravel(), scores["lissa"].ravel())[0, 1] > 0.9
