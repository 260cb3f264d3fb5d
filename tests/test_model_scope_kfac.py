"""Methods "kfac" / "ekfac" on scope="model": the Kronecker-factored model of the projected Gauss-Newton matrix.

Float64 references built here: the preconditioner equals the inverse of the dense matrix assembled from the same
factors (np.kron per block, scipy block_diag); on the tiny CNN with LoGra projection, the K-FAC factors of each
linear layer equal S_l (x) A_l from the layer's inputs (forward hook) and the output gradients of every class
(torch.autograd on the hooked output, one example at a time), the EK-FAC eigenvalues equal diag(Q^T G_ll Q) with
G = S^T G_full S the dense projected GGN from torch.func per-example Jacobians (`model_reference`), and the run's
scores equal phi_q^T (K + l2 I)^-1 phi_i with those dense matrices.
"""

import numpy as np
import pytest
import scipy.linalg
import torch
from model_reference import gradients_and_ggn, jacobians, projection
from test_model_scope import L2, N_TEST, ON, make_task
from torch import nn

import influence as inf
from api import build_index, open_index
from indexer.training_set import load_kronecker


def dense_matrix(curvature: inf.KroneckerCurvature) -> np.ndarray:
    """K [p, p] (without l2 and damping): per linear block kron(Q_S, Q_A) diag(Lambda) kron(Q_S, Q_A)^T, per
    diagonal block diag(Lambda)."""
    blocks = []
    for b, qa, qg, lam in zip(curvature.blocks, curvature.q_a, curvature.q_g, curvature.eigenvalues, strict=True):
        if isinstance(b, inf.LinearBlock):
            Q = np.kron(qg, qa)
            blocks.append(Q @ np.diag(np.ravel(lam)) @ Q.T)
        else:
            blocks.append(np.diag(lam))
    return scipy.linalg.block_diag(*blocks)


def random_psd(rng, n):
    X = rng.standard_normal((n, n + 2))
    return X @ X.T / n


def test_preconditioner_equals_the_dense_matrix_of_the_same_factors():
    rng = np.random.default_rng(0)
    blocks = inf.matrix_layout([(3, 4), 5, (2, 3)])
    assert [b.size for b in blocks] == [12, 5, 6] and blocks[1].offset == 12
    A = {0: random_psd(rng, 4), 2: random_psd(rng, 3)}
    S = {0: random_psd(rng, 3), 2: random_psd(rng, 2)}
    diag = rng.uniform(0.1, 1.0, 5)
    factors = inf.KroneckerFactors(
        blocks=blocks, a=(A[0], None, A[2]), g=(S[0], None, S[2]), diagonal=(None, diag, None), n=7
    )
    kfac = inf.KroneckerCurvature.from_factors(factors, l2=0.05, damping=0.01)
    K = scipy.linalg.block_diag(np.kron(S[0], A[0]), np.diag(diag), np.kron(S[2], A[2]))
    np.testing.assert_allclose(dense_matrix(kfac), K, atol=1e-12)
    R = rng.standard_normal((4, 23))
    np.testing.assert_allclose(kfac.solve(R), np.linalg.solve(K + 0.06 * np.eye(23), R.T).T, rtol=1e-10, atol=1e-12)

    # EK-FAC from per-class gradients: Lambda = diag((Q_S (x) Q_A)^T C_ll (Q_S (x) Q_A)), C = mean_i sum_c p g g^T
    m, classes = 6, 3
    g = rng.standard_normal((m, classes, 23))
    p = rng.dirichlet(np.ones(classes), m)
    C = np.einsum("mca,mc,mcb->ab", g, p, g) / m
    ekfac = kfac.with_correction(inf.ggn_correction_sums(kfac, C, m))
    for b, qa, qg, lam in zip(ekfac.blocks, ekfac.q_a, ekfac.q_g, ekfac.eigenvalues, strict=True):
        if isinstance(b, inf.LinearBlock):
            Q = np.kron(qg, qa)
            sl = slice(b.offset, b.offset + b.size)
            direct = np.einsum("mc,mcj->j", p, (g[:, :, sl] @ Q) ** 2) / m
            np.testing.assert_allclose(np.ravel(lam), np.diag(Q.T @ C[sl, sl] @ Q), rtol=1e-10)
            np.testing.assert_allclose(np.ravel(lam), direct, rtol=1e-10)
    np.testing.assert_allclose(
        ekfac.solve(R), np.linalg.solve(dense_matrix(ekfac) + 0.06 * np.eye(23), R.T).T, rtol=1e-10, atol=1e-12
    )
    diagonal = inf.ggn_diagonal_sums(blocks, C, m)
    assert list(diagonal) == ["layer1.diagonal"]
    np.testing.assert_allclose(diagonal["layer1.diagonal"], np.einsum("mcq,mc->q", g[:, :, 12:17] ** 2, p))
    with pytest.raises(ValueError, match=r"ggn must have shape \(23, 23\)"):
        inf.ggn_correction_sums(kfac, C[:5, :5], m)
    with pytest.raises(ValueError, match=r"shapes\[0\]"):
        inf.matrix_layout([(0, 3)])


@pytest.fixture(scope="module")
def task():
    return make_task()


@pytest.fixture(scope="module")
def run(task, tmp_path_factory):
    path = tmp_path_factory.mktemp("kfac") / "on"
    build_index(task, path, config=ON, progress=False).close()
    return path


@pytest.fixture(scope="module")
def reference(task):
    names = task.model_scope.names
    S = projection(task.model, names, 4, 0, whole_budget=ON.project_above)
    logits, J = jacobians(task.model, names, [x for x, _ in task.train])
    y = np.array([t for _, t in task.train])
    g, G = gradients_and_ggn(logits, J, y)
    qlogits, Jq = jacobians(task.model, names, [x for x, _ in task.test])
    gq, _ = gradients_and_ggn(qlogits, Jq, qlogits.argmax(1))
    return {"phi": g @ S, "phiq": gq @ S, "G": S.T @ G @ S}


def layer_factors(model: nn.Module, name: str, xs, P_in, P_out):
    """A = mean_i mean_t a~ a~^T (a~ = P_in^T [x_t, 1]) and S = mean_i sum_c p_ic sum_t s~_ct s~_ct^T
    (s~_ct = P_out^T dCE_c/dy_t) of one nn.Linear (one position) or nn.Conv2d (x_t the patch at output
    position t, F.unfold), one example at a time."""
    module = dict(model.named_modules())[name]
    kept = {}

    def hook(mod, args, out):
        kept["x"], kept["y"] = args[0].detach(), out
        return out.clone()  # the next layer is an in-place ReLU: keep the layer's own output

    handle = module.register_forward_hook(hook)
    A, S = 0.0, 0.0
    try:
        for x in xs:
            logits = model(x[None])[0]
            inp = kept["x"]
            if isinstance(module, nn.Conv2d):
                patches = nn.functional.unfold(inp, module.kernel_size, padding=module.padding, stride=module.stride)
                inp = patches[0].T  # [positions, C_in k]
            a = torch.cat([inp, torch.ones(len(inp), 1, dtype=x.dtype)], 1).numpy() @ P_in
            A = A + a.T @ a / len(a)
            p = torch.softmax(logits.detach(), 0).numpy()
            for c in range(len(p)):
                (grad,) = torch.autograd.grad(
                    nn.functional.cross_entropy(logits[None], torch.tensor([c])), kept["y"], retain_graph=True
                )
                s = grad[0].reshape(grad.shape[1], -1).T.numpy() if grad.dim() == 4 else grad.numpy()
                s = s @ P_out
                S = S + p[c] * s.T @ s
    finally:
        handle.remove()
    return A / len(xs), S / len(xs)


def test_kfac_factors_and_ekfac_eigenvalues_on_the_projected_cnn(task, run, reference):
    with open_index(run) as index:
        record = index.run.extra["model"]
        curv = load_kronecker(index.run.paths, index.run.extra, damping=0.0, prefix="model_")
    kfac, ekfac = curv["kfac"], curv["ekfac"]
    dims = [(r["k_out"], r["k_in"]) for r in record["layers"]]
    # the last layer (27 entries) and the first (40) fit project_above=100 together and stay whole
    assert [(b.out_features, b.in_features) for b in kfac.blocks] == dims == [(4, 10), (4, 4), (4, 4), (3, 9)]
    G = reference["G"]
    # EK-FAC: the diagonal of each block of the dense projected GGN in the K-FAC eigenbasis
    for b, qa, qg, lam in zip(ekfac.blocks, ekfac.q_a, ekfac.q_g, ekfac.eigenvalues, strict=True):
        Q, sl = np.kron(qg, qa), slice(b.offset, b.offset + b.size)
        np.testing.assert_allclose(np.ravel(lam), np.diag(Q.T @ G[sl, sl] @ Q), rtol=1e-6, atol=1e-10)
    # K-FAC of the convolutions ("0", "2") and the nn.Linear layers ("5", "7"): S (x) A from hooks and autograd
    xs = [x for x, _ in task.train]
    K = dense_matrix(kfac)
    for i, name in enumerate(["0", "2", "5", "7"]):
        module = dict(task.model.named_modules())[name]
        n_in, n_out = module.weight[0].numel() + 1, module.weight.shape[0]
        k_in, k_out = dims[i][1], dims[i][0]
        P_in = np.eye(n_in) if k_in == n_in else inf.make_projection(n_in, k_in, seed=inf.layer_seed(0, i, 0)).matrix()
        P_out = (
            np.eye(n_out)
            if k_out == n_out
            else inf.make_projection(n_out, k_out, seed=inf.layer_seed(0, i, 1)).matrix()
        )
        A, S = layer_factors(task.model, name, xs, P_in, P_out)
        b = kfac.blocks[i]
        sl = slice(b.offset, b.offset + b.size)
        np.testing.assert_allclose(K[sl, sl], np.kron(S, A), rtol=1e-6, atol=1e-9 * np.abs(K[sl, sl]).max())
    # the run's scores: phi_q^T (K + l2 I)^-1 phi_i with K assembled densely from the same factors
    d = len(G)
    for method, curvature in (("kfac", kfac), ("ekfac", ekfac)):
        with open_index(run, lissa=inf.LissaConfig(damping=0.0)) as index:
            got = index.pairwise_scores(list(range(N_TEST)), method=method)
        M = dense_matrix(curvature) + L2 * np.eye(d)
        expected = np.linalg.solve(M, reference["phiq"].T).T @ reference["phi"].T
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_ekfac_is_closer_to_the_exact_scores_than_kfac_and_explains(task, run):
    with open_index(run, task=task, lissa=inf.LissaConfig(damping=0.0)) as index:
        exact = index.pairwise_scores(list(range(N_TEST)), method="exact")
        err = {
            m: np.abs(index.pairwise_scores(list(range(N_TEST)), method=m) - exact).mean() for m in ("kfac", "ekfac")
        }
        [e] = index.explain(test_ids=[1], k=3, method="ekfac")
        assert len(e.proponents) == 3 and e.proponents[0].score >= e.proponents[-1].score
    assert err["ekfac"] <= err["kfac"] * 1.05, err
