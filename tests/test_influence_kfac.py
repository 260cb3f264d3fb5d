"""K-FAC / EK-FAC curvature of the head and preconditioned CG, checked in float64 against dense matrices built here
independently (jax.jacobian of the logits, jnp.linalg.solve), never from influence.kfac's own functions."""

import json
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from influence import (
    KroneckerCurvature,
    KroneckerSums,
    apply_head,
    compute_correction_sums,
    compute_factor_sums,
    compute_kronecker_factors,
    fit_kronecker_curvature,
    flatten_params,
    kronecker_layout,
    make_head_matvec,
    solve_pcg,
)

L2 = 1e-2
DAMPING = 1e-3


def linear(n_in: int, n_out: int, bias: bool = True) -> dict:
    return {"kind": "linear", "in_features": n_in, "out_features": n_out, "bias": bias}


def random_linear(rng: np.random.Generator, n_in: int, n_out: int, bias: bool = True) -> dict:
    layer = {"weight": rng.normal(size=(n_out, n_in))}
    if bias:
        layer["bias"] = rng.normal(size=n_out)
    return layer


def mlp_head(seed: int = 0, n: int = 12):
    """4 -> 5 -> layernorm -> tanh -> 3."""
    rng = np.random.default_rng(seed)
    spec = [
        linear(4, 5),
        {"kind": "layernorm", "normalized_shape": [5], "eps": 1e-5, "elementwise_affine": True},
        {"kind": "tanh"},
        linear(5, 3),
    ]
    params = [
        random_linear(rng, 4, 5),
        {"weight": 1.0 + 0.2 * rng.normal(size=5), "bias": 0.2 * rng.normal(size=5)},
        {},
        random_linear(rng, 5, 3),
    ]
    return spec, params, rng.normal(size=(n, 4))


def linear_head(seed: int = 1, n: int = 10):
    """Logistic regression 4 -> 3."""
    rng = np.random.default_rng(seed)
    return [linear(4, 3)], [random_linear(rng, 4, 3)], rng.normal(size=(n, 4))


def shared_head(seed: int = 2, n: int = 9):
    """A linear layer shared over 2 positions ([n, 2, 3] -> [n, 2, 4]), gelu, flatten, a bias-free linear 8 -> 3."""
    rng = np.random.default_rng(seed)
    spec = [linear(3, 4), {"kind": "gelu"}, {"kind": "flatten"}, linear(8, 3, bias=False)]
    params = [random_linear(rng, 3, 4), {}, {}, random_linear(rng, 8, 3, bias=False)]
    return spec, params, rng.normal(size=(n, 2, 3))


HEADS = {"mlp": mlp_head, "linear": linear_head, "shared": shared_head}


# ------------------------------------------------------------------------------------------ independent references


def dense_ggn(spec, params, h) -> np.ndarray:
    """C = (1/n) sum_i J_i^T (diag p_i - p_i p_i^T) J_i with J_i = jax.jacobian of the logits w.r.t. theta."""
    theta, unravel = flatten_params(params)

    def logits(t, x):
        return apply_head(spec, unravel(t), x[None])[0]

    J = np.asarray(jax.vmap(lambda x: jax.jacobian(logits)(theta, x))(jnp.asarray(h)))  # [n, C, p]
    z = np.asarray(apply_head(spec, params, h))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    H = np.stack([np.diag(pi) - np.outer(pi, pi) for pi in p])
    return np.einsum("ncp,ncd,ndq->pq", J, H, J) / len(h)


def theta_index(spec, params):
    """Per parameterised layer: the theta indices of [W | b] ([out, k]) or of its flat parameters, via unravel."""
    theta, unravel = flatten_params(params)
    idx = unravel(jnp.arange(theta.shape[0], dtype=jnp.float64))
    out = {}
    for layer, (s, p) in enumerate(zip(spec, idx, strict=True)):
        if s["kind"] == "linear":
            w = np.asarray(p["weight"]).astype(int)
            out[layer] = np.concatenate([w, np.asarray(p["bias"]).astype(int)[:, None]], 1) if s["bias"] else w
        elif p:
            out[layer] = np.concatenate([np.asarray(p[k]).astype(int).ravel() for k in sorted(p)])
    return out


def reference_factors(spec, params, h, layer):
    """A = (1/(n T)) sum a a^T and G = (1/n) sum_i sum_t J_t^T (diag p - p p^T) J_t, J_t = d logits / d s_t."""
    a = np.asarray(apply_head(spec[:layer], params[:layer], h))
    if spec[layer]["bias"]:
        a = np.concatenate([a, np.ones((*a.shape[:-1], 1))], -1)
    a = a.reshape(len(h), -1, a.shape[-1])
    s = np.asarray(apply_head(spec[: layer + 1], params[: layer + 1], h))

    def logits_of_s(s_i):
        return apply_head(spec[layer + 1 :], params[layer + 1 :], s_i[None])[0]

    z = np.asarray(apply_head(spec, params, h))
    G = 0.0
    for s_i, z_i in zip(s, z, strict=True):
        p = np.exp(z_i - z_i.max())
        p /= p.sum()
        J = np.asarray(jax.jacobian(logits_of_s)(jnp.asarray(s_i))).reshape(len(p), -1, s.shape[-1])  # [C, T, o]
        G = G + np.einsum("cto,cd,dtq->oq", J, np.diag(p) - np.outer(p, p), J)
    A = np.einsum("ntk,ntj->kj", a, a) / (a.shape[0] * a.shape[1])
    return A, G / len(h)


def fit(spec, params, h, kind, **kw):
    kw.setdefault("l2", L2)
    kw.setdefault("damping", DAMPING)
    return fit_kronecker_curvature(spec, params, h, kind=kind, **kw)


# ------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("name", sorted(HEADS))
def test_layout_matches_flatten_params(name):
    spec, params, _ = HEADS[name]()
    index = theta_index(spec, params)
    blocks = kronecker_layout(spec)
    assert [b.layer for b in blocks] == sorted(index)
    for b in blocks:
        flat = np.sort(index[b.layer].ravel())
        np.testing.assert_array_equal(flat, np.arange(b.offset, b.offset + b.size))


# ------------------------------------------------------------------------------------------ (a) factors and K-FAC


@pytest.mark.parametrize("name", sorted(HEADS))
def test_factors_equal_reference(name):
    spec, params, h = HEADS[name]()
    factors = compute_kronecker_factors(spec, compute_factor_sums(spec, params, h))
    for b, A, G, diag in zip(factors.blocks, factors.a, factors.g, factors.diagonal, strict=True):
        if A is None:
            C = dense_ggn(spec, params, h)
            idx = theta_index(spec, params)[b.layer]
            np.testing.assert_allclose(diag, np.diag(C)[idx], rtol=1e-10, atol=1e-14)
            continue
        A_ref, G_ref = reference_factors(spec, params, h, b.layer)
        np.testing.assert_allclose(A, A_ref, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(G, G_ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_kfac_inverse_equals_dense_block_diagonal(name):
    """(kron(G, A) + (l2 + d) I)^-1 per linear block in theta's layout, (diag + l2 + d)^-1 elsewhere."""
    spec, params, h = HEADS[name]()
    factors = compute_kronecker_factors(spec, compute_factor_sums(spec, params, h))
    curvature = KroneckerCurvature.from_factors(factors, l2=L2, damping=DAMPING)
    index = theta_index(spec, params)
    p = sum(b.size for b in factors.blocks)
    dense = np.zeros((p, p))
    for b, A, G, diag in zip(factors.blocks, factors.a, factors.g, factors.diagonal, strict=True):
        idx = index[b.layer].ravel()  # row-major over [W | b]: kron(G, A) acts on it
        dense[np.ix_(idx, idx)] = np.diag(diag) if A is None else np.kron(G, A)
    expected = np.linalg.inv(dense + (L2 + DAMPING) * np.eye(p))
    np.testing.assert_allclose(curvature.solve(np.eye(p)), expected, rtol=1e-9, atol=1e-12)
    # a damping override replaces the stored one
    expected_2 = np.linalg.inv(dense + (L2 + 0.5) * np.eye(p))
    np.testing.assert_allclose(curvature.solve(np.eye(p), damping=0.5), expected_2, rtol=1e-9, atol=1e-12)


def test_kfac_is_exact_for_one_example_of_a_linear_head():
    """With n = 1 and one linear layer, C = sum_c p_c (d_c d_c^T) (x) (a a^T) = G (x) A exactly."""
    spec, params, h = linear_head(n=1)
    C = dense_ggn(spec, params, h)
    p = C.shape[0]
    expected = np.linalg.inv(C + (L2 + DAMPING) * np.eye(p))
    for kind in ("kfac", "ekfac"):
        np.testing.assert_allclose(fit(spec, params, h, kind).solve(np.eye(p)), expected, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------ (b) EK-FAC


def eigenbasis_vectors(curvature, block, index, p):
    """Columns: vec(Q_G[:, j] Q_A[:, k]^T) placed in theta's layout, ordered as Lambda[j, k]."""
    i = curvature.blocks.index(block)
    q_a, q_g = curvature.q_a[i], curvature.q_g[i]
    U = np.zeros((p, block.size))
    idx = index[block.layer]
    col = 0
    for j in range(q_g.shape[1]):
        for k in range(q_a.shape[1]):
            U[idx, col] = np.outer(q_g[:, j], q_a[:, k])
            col += 1
    return U


@pytest.mark.parametrize("name", sorted(HEADS))
def test_ekfac_eigenvalues_equal_dense_ggn_diagonal_in_eigenbasis(name):
    spec, params, h = HEADS[name]()
    C = dense_ggn(spec, params, h)
    p = C.shape[0]
    index = theta_index(spec, params)
    curvature = fit(spec, params, h, "ekfac")
    assert curvature.kind == "ekfac"
    for b, lam in zip(curvature.blocks, curvature.eigenvalues, strict=True):
        if b in curvature.blocks and curvature.q_a[curvature.blocks.index(b)] is None:
            idx = index[b.layer]
            np.testing.assert_allclose(lam, np.diag(C)[idx], rtol=1e-10, atol=1e-14)
            continue
        U = eigenbasis_vectors(curvature, b, index, p)
        np.testing.assert_allclose(U.T @ U, np.eye(b.size), atol=1e-10)  # an orthonormal basis of the block
        np.testing.assert_allclose(lam.ravel(), np.diag(U.T @ C @ U), rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_ekfac_is_closer_to_the_ggn_block_than_kfac(name):
    """The corrected eigenvalues are the Frobenius-optimal diagonal in the K-FAC eigenbasis (George et al. 2018)."""
    spec, params, h = HEADS[name]()
    C = dense_ggn(spec, params, h)
    p = C.shape[0]
    index = theta_index(spec, params)
    kfac, ekfac = fit(spec, params, h, "kfac"), fit(spec, params, h, "ekfac")
    for i, b in enumerate(kfac.blocks):
        if kfac.q_a[i] is None:
            continue
        U = eigenbasis_vectors(kfac, b, index, p)
        idx = np.sort(index[b.layer].ravel())
        block = C[np.ix_(idx, idx)]
        U_b = U[idx]
        err_k = np.linalg.norm(block - U_b @ np.diag(kfac.eigenvalues[i].ravel()) @ U_b.T)
        err_e = np.linalg.norm(block - U_b @ np.diag(ekfac.eigenvalues[i].ravel()) @ U_b.T)
        assert err_e <= err_k + 1e-12


def dense_kronecker(curvature, spec, params):
    """The approximation as a dense [p, p] matrix built here: per linear block U diag(Lambda) U^T with U the
    columns vec(Q_G[:, j] Q_A[:, k]^T) in theta's layout, diag(Lambda) on a diagonal block (without l2, damping)."""
    index = theta_index(spec, params)
    p = curvature.n_params
    dense = np.zeros((p, p))
    for i, b in enumerate(curvature.blocks):
        lam = np.asarray(curvature.eigenvalues[i], np.float64).ravel()
        if curvature.q_a[i] is None:
            idx = index[b.layer]
            dense[np.ix_(idx, idx)] = np.diag(lam)
        else:
            U = eigenbasis_vectors(curvature, b, index, p)
            dense += U @ np.diag(lam) @ U.T
    return dense


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_fractional_powers_equal_the_dense_matrix_power(name, kind):
    """K^-1/2 and K^1/2 (K = the approximation + (l2 + d) I, the whitening of stage "whitened") equal
    scipy's fractional_matrix_power of the dense matrix built from the same factors; their product is the identity
    and -1 is the inverse."""
    spec, params, h = HEADS[name]()
    curvature = fit(spec, params, h, kind)
    K = dense_kronecker(curvature, spec, params)
    p = K.shape[0]
    rng = np.random.default_rng(3)
    R = rng.normal(size=(4, p))
    for damping in (None, 0.3):
        shifted = K + (L2 + (DAMPING if damping is None else damping)) * np.eye(p)
        for power in (-0.5, 0.5, -1.0, 1.0):
            expected = np.real(scipy.linalg.fractional_matrix_power(shifted, power))
            got = curvature.power(np.eye(p), power, damping=damping)  # row j: K^power e_j (K symmetric)
            np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-11)
            np.testing.assert_allclose(curvature.power(R, power, damping=damping), R @ expected, rtol=1e-8, atol=1e-11)
        half, inv_half = curvature.power(R, 0.5, damping=damping), curvature.power(R, -0.5, damping=damping)
        np.testing.assert_allclose(curvature.power(half, -0.5, damping=damping), R, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(np.sum(half * inv_half, 1), np.sum(R * R, 1), rtol=1e-9)
    np.testing.assert_allclose(curvature.power(R, -1.0), curvature.solve(R), rtol=1e-12, atol=1e-14)
    assert curvature.power(R.astype(np.float32), -0.5).dtype == np.float32
    with pytest.raises(ValueError, match="power"):
        curvature.power(R, float("nan"))


def test_whitened_inner_product_is_the_score_for_any_curvature_model():
    """y . z = x . g with z = K^-1/2 g, y = K^1/2 x, for EK-FAC, K-FAC and an arbitrary damping: the identity the
    projected index rests on, exact without a projection."""
    spec, params, h = HEADS["mlp"]()
    rng = np.random.default_rng(4)
    p = fit(spec, params, h, "kfac").n_params
    x, g = rng.normal(size=(3, p)), rng.normal(size=(7, p))
    for kind in ("kfac", "ekfac"):
        curvature = fit(spec, params, h, kind)
        for damping in (None, 2.0):
            y, z = curvature.power(x, 0.5, damping=damping), curvature.power(g, -0.5, damping=damping)
            np.testing.assert_allclose(y @ z.T, x @ g.T, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------------------ (d) PCG


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("kind", [None, "kfac", "ekfac"])
def test_pcg_equals_dense_solve(name, kind):
    spec, params, h = HEADS[name]()
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, len(h))
    theta, unravel = flatten_params(params)
    p = theta.shape[0]
    C = dense_ggn(spec, params, h)
    B = rng.normal(size=(3, p))
    B[1] = 0.0  # a zero right-hand side stays zero
    expected = np.asarray(jnp.linalg.solve(jnp.asarray(C + (L2 + DAMPING) * np.eye(p)), jnp.asarray(B.T)).T)
    matvec = make_head_matvec(spec, unravel, theta, h, y, l2=L2)
    precondition = None if kind is None else fit(spec, params, h, kind)
    result = solve_pcg(matvec, B, precondition=precondition, damping=DAMPING, tol=1e-12, max_iter=500)
    assert result.method == ("cg" if kind is None else "pcg")
    assert result.damping == DAMPING
    np.testing.assert_array_equal(result.x[1], 0.0)
    assert result.residual[1] == 0.0
    assert np.all(result.residual <= 1e-10)
    rel = np.linalg.norm(result.x - expected, axis=1) / np.maximum(np.linalg.norm(expected, axis=1), 1e-300)
    assert np.all(rel <= 1e-8), rel


def test_pcg_with_ekfac_needs_far_fewer_iterations():
    """Logistic regression on anisotropic, non-centred features (cond(C + l2 I) ~ 1e5): EK-FAC captures the input
    covariance, so PCG needs a small fraction of plain CG's products for the same residual."""
    rng = np.random.default_rng(3)
    n, d = 600, 20
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    h = rng.normal(size=(n, d)) @ (basis * np.geomspace(0.03, 30.0, d)).T + 1.0
    spec, params = [linear(d, 3)], [random_linear(rng, d, 3)]
    params[0]["weight"] *= 0.3
    theta, unravel = flatten_params(params)
    matvec = make_head_matvec(spec, unravel, theta, h, np.zeros(n, np.int64), l2=1e-4)
    B = rng.normal(size=(4, theta.shape[0]))
    kw = {"damping": 1e-4, "tol": 1e-8, "max_iter": 2000}
    plain = solve_pcg(matvec, B, precondition=None, **kw)
    ekfac = solve_pcg(matvec, B, precondition=fit(spec, params, h, "ekfac", l2=1e-4, damping=1e-4), **kw)
    kfac = solve_pcg(matvec, B, precondition=fit(spec, params, h, "kfac", l2=1e-4, damping=1e-4), **kw)
    assert np.all(plain.residual <= 1e-7) and np.all(ekfac.residual <= 1e-7) and np.all(kfac.residual <= 1e-7)
    assert ekfac.depth * 4 <= plain.depth, (ekfac.depth, plain.depth)
    assert kfac.depth * 4 <= plain.depth, (kfac.depth, plain.depth)
    np.testing.assert_allclose(ekfac.x, plain.x, rtol=1e-5, atol=1e-8 * np.abs(plain.x).max())


def test_pcg_accepts_a_callable_preconditioner_and_stops_at_max_iter():
    spec, params, h = mlp_head()
    theta, unravel = flatten_params(params)
    matvec = make_head_matvec(spec, unravel, theta, h, np.zeros(len(h), np.int64), l2=L2)
    B = np.random.default_rng(0).normal(size=(2, theta.shape[0]))
    curvature = fit(spec, params, h, "ekfac")
    by_object = solve_pcg(matvec, B, precondition=curvature, damping=DAMPING, tol=1e-10)
    by_callable = solve_pcg(
        matvec, B, precondition=curvature.preconditioner(damping=DAMPING), damping=DAMPING, tol=1e-10
    )
    np.testing.assert_allclose(by_object.x, by_callable.x, rtol=1e-12)
    assert by_object.depth == by_callable.depth
    short = solve_pcg(matvec, B, precondition=curvature, damping=DAMPING, tol=1e-12, max_iter=2)
    assert short.depth == 2
    assert np.all(short.residual > 1e-10)


def test_float32_rows_stay_float32():
    spec, params, h = mlp_head()
    curvature = fit(spec, params, h, "ekfac")
    G = np.random.default_rng(0).normal(size=(3, curvature.n_params))
    x32 = curvature.solve(G.astype(np.float32))
    assert x32.dtype == np.float32
    np.testing.assert_allclose(x32, curvature.solve(G), rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------------ (e) chunking, storage


@pytest.mark.parametrize("name", sorted(HEADS))
def test_chunked_sums_equal_one_shot_sums(name):
    spec, params, h = HEADS[name]()
    whole = compute_factor_sums(spec, params, h)
    parts = compute_factor_sums(spec, params, h[:5]) + compute_factor_sums(spec, params, h[5:])
    # a padded chunk: rows with weight 0 add nothing
    padded = np.concatenate([h[5:], np.zeros((3, *h.shape[1:]))])
    weights = np.concatenate([np.ones(len(h) - 5), np.zeros(3)])
    masked = compute_factor_sums(spec, params, h[:5]) + compute_factor_sums(spec, params, padded, weights=weights)
    assert whole.n == parts.n == masked.n == len(h)
    for other in (parts, masked):
        assert sorted(other.arrays) == sorted(whole.arrays)
        for key in whole.arrays:
            np.testing.assert_allclose(other.arrays[key], whole.arrays[key], rtol=1e-12, atol=1e-14)
    kfac = KroneckerCurvature.from_factors(compute_kronecker_factors(spec, whole), l2=L2)
    c_whole = compute_correction_sums(spec, params, h, kfac)
    c_parts = compute_correction_sums(spec, params, h[:4], kfac) + compute_correction_sums(spec, params, h[4:], kfac)
    for key in c_whole.arrays:
        np.testing.assert_allclose(c_parts.arrays[key], c_whole.arrays[key], rtol=1e-12, atol=1e-14)
    G = np.random.default_rng(0).normal(size=(2, kfac.n_params))
    for kind in ("kfac", "ekfac"):
        one = fit(spec, params, h, kind, batch_size=len(h))
        chunked = fit(spec, params, h, kind, batch_size=4)
        np.testing.assert_allclose(chunked.solve(G), one.solve(G), rtol=1e-10)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_to_arrays_round_trip(kind):
    spec, params, h = mlp_head()
    curvature = fit(spec, params, h, kind)
    arrays, description = curvature.to_arrays()
    assert set(arrays) == {"eigenvalues", "bases"}
    assert arrays["eigenvalues"].shape == (curvature.n_params,)
    assert all(a.dtype == np.float64 and a.ndim == 1 for a in arrays.values())
    description = json.loads(json.dumps(description))
    reopened = KroneckerCurvature.from_arrays(arrays, description)
    assert reopened.kind == kind and reopened.l2 == L2 and reopened.damping == DAMPING
    assert reopened.blocks == curvature.blocks
    G = np.random.default_rng(0).normal(size=(2, curvature.n_params))
    np.testing.assert_array_equal(reopened.solve(G), curvature.solve(G))

    sums = compute_factor_sums(spec, params, h)
    sum_arrays, sum_description = sums.to_arrays()
    again = KroneckerSums.from_arrays(sum_arrays, json.loads(json.dumps(sum_description)))
    assert again.kind == "factors" and again.n == sums.n
    for key in sums.arrays:
        np.testing.assert_array_equal(again.arrays[key], sums.arrays[key])


# ------------------------------------------------------------------------------------------ (f) errors


def test_errors_name_the_argument():
    spec, params, h = mlp_head()
    theta, unravel = flatten_params(params)
    matvec = make_head_matvec(spec, unravel, theta, h, np.zeros(len(h), np.int64), l2=L2)
    curvature = fit(spec, params, h, "kfac")
    p = curvature.n_params
    B = np.ones((1, p))
    with pytest.raises(ValueError, match="kind must be one of"):
        fit(spec, params, h, "diagonal")
    with pytest.raises(ValueError, match="kind must be one of"):
        replace(curvature, kind="kfc")
    with pytest.raises(ValueError, match="damping must be a finite float >= 0, got -1"):
        fit(spec, params, h, "ekfac", damping=-1.0)
    with pytest.raises(ValueError, match="l2 must be a finite float >= 0"):
        fit(spec, params, h, "ekfac", l2=-1.0)
    with pytest.raises(ValueError, match="damping must be a finite float >= 0"):
        curvature.solve(B, damping=-0.1)
    with pytest.raises(ValueError, match=rf"G must have shape \[m, {p}\], got shape \(1, {p + 1}\)"):
        curvature.solve(np.ones((1, p + 1)))
    with pytest.raises(ValueError, match=r"G must have shape"):
        curvature.solve(np.ones(p))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        fit(spec, params, h, "kfac", batch_size=0)
    with pytest.raises(ValueError, match="h has shape"):
        compute_factor_sums(spec, params, np.ones((3, 7)))
    with pytest.raises(ValueError, match="h must have shape"):
        compute_factor_sums(spec, params, np.ones(4))
    with pytest.raises(ValueError, match="weights must have shape"):
        compute_factor_sums(spec, params, h, weights=np.ones(2))
    factor_sums = compute_factor_sums(spec, params, h)
    correction_sums = compute_correction_sums(spec, params, h, curvature)
    with pytest.raises(ValueError, match="other: cannot add"):
        _ = factor_sums + correction_sums
    with pytest.raises(ValueError, match="sums must be KroneckerSums of kind 'correction'"):
        curvature.with_correction(factor_sums)
    with pytest.raises(ValueError, match="sums must be KroneckerSums of kind 'factors'"):
        compute_kronecker_factors(spec, correction_sums)
    with pytest.raises(ValueError, match="curvature: fitted on another head"):
        other_spec, other_params, other_h = linear_head()
        compute_correction_sums(other_spec, other_params, other_h, curvature)
    with pytest.raises(ValueError, match="damping must be a finite float >= 0"):
        solve_pcg(matvec, B, precondition=curvature, damping=-1e-3)
    with pytest.raises(ValueError, match="tol must be a float in"):
        solve_pcg(matvec, B, precondition=None, damping=0.0, tol=0.0)
    with pytest.raises(ValueError, match="max_iter must be an int >= 1"):
        solve_pcg(matvec, B, precondition=None, damping=0.0, max_iter=0)
    with pytest.raises(ValueError, match=r"B must have shape \[m, p\]"):
        solve_pcg(matvec, np.ones(p), precondition=None, damping=0.0)
    with pytest.raises(ValueError, match="precondition covers"):
        solve_pcg(matvec, np.ones((1, p + 2)), precondition=curvature, damping=0.0)
    with pytest.raises(ValueError, match="precondition must be"):
        solve_pcg(matvec, B, precondition="ekfac", damping=0.0)
    arrays, description = curvature.to_arrays()
    with pytest.raises(ValueError, match=r"arrays\['eigenvalues'\] has shape"):
        KroneckerCurvature.from_arrays({**arrays, "eigenvalues": arrays["eigenvalues"][:-1]}, description)
    # a dead input feature gives a zero eigenvalue: without l2 or damping the approximation is singular
    dead = h.copy()
    dead[:, 0] = 0.0
    singular = fit_kronecker_curvature(spec, params, dead, kind="kfac", l2=0.0)
    with pytest.raises(ValueError, match="pass damping > 0"):
        singular.solve(B)
