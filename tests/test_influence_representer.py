"""Representer points (Yeh et al. 2018, arXiv:1811.09720): stationarity, decomposition, embeddings."""

import numpy as np
import pytest

from influence import (
    augment_features,
    compute_fidelity,
    compute_representer_embeddings,
    compute_representer_logits,
    compute_representer_queries,
    fit_representer,
    resolve_representer_lambda,
)

LAM = 1e-2
N_CLASSES = 3


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(80, 5))
    y = (phi @ rng.normal(size=(5, N_CLASSES))).argmax(1)
    phi_aug = augment_features(phi)
    theta0 = 0.1 * rng.normal(size=(N_CLASSES, 6))
    theta, alpha, grad_norm = fit_representer(phi_aug, y, theta0, lam=LAM)
    phi_q = augment_features(rng.normal(size=(7, 5)))
    return phi_aug, y, theta, alpha, grad_norm, phi_q


def test_augment_features_appends_ones() -> None:
    out = augment_features(np.zeros((2, 3), dtype=np.float32))
    assert out.shape == (2, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, -1], 1.0)


def test_fit_reaches_a_stationary_point(fitted) -> None:
    phi_aug, y, theta, alpha, grad_norm, _ = fitted
    assert grad_norm < 1e-6
    assert theta.shape == (N_CLASSES, 6) and alpha.shape == (80, N_CLASSES)
    # alpha from its formula, and each alpha row sums to zero (softmax minus one-hot).
    logits = phi_aug @ theta.T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(alpha, -(probs - np.eye(N_CLASSES)[y]) / (2 * LAM * 80), rtol=1e-12)
    np.testing.assert_allclose(alpha.sum(1), 0.0, atol=1e-14)


def test_representer_logits_equal_model_logits(fitted) -> None:
    phi_aug, _, theta, alpha, _, phi_q = fitted
    expected = phi_q @ theta.T
    got = compute_representer_logits(alpha, phi_aug, phi_q)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)
    assert compute_fidelity(got, expected) == pytest.approx(1.0, abs=1e-12)


def test_embeddings_and_queries_give_representer_scores(fitted) -> None:
    phi_aug, _, _, alpha, _, phi_q = fitted
    classes = np.array([0, 1, 2, 2, 1, 0, 1])
    embeddings = compute_representer_embeddings(alpha, phi_aug)
    queries = compute_representer_queries(phi_q, classes, N_CLASSES)
    assert embeddings.shape == (80, N_CLASSES * 6) and queries.shape == (7, N_CLASSES * 6)
    np.testing.assert_allclose(embeddings[3, 6:12], alpha[3, 1] * phi_aug[3])
    expected = alpha[:, classes].T * (phi_q @ phi_aug.T)
    np.testing.assert_allclose((queries @ embeddings.T), expected, rtol=1e-12, atol=1e-15)
    # Summing the scores over the training set gives the query's logit for that class.
    logits = compute_representer_logits(alpha, phi_aug, phi_q)
    np.testing.assert_allclose((queries @ embeddings.T).sum(1), logits[np.arange(7), classes], rtol=1e-10)


def test_fit_rejects_bad_input(fitted) -> None:
    phi_aug, y, theta, *_ = fitted
    with pytest.raises(ValueError, match="lam"):
        fit_representer(phi_aug, y, theta, lam=0.0)
    with pytest.raises(ValueError, match="theta0"):
        fit_representer(phi_aug, y, theta[:, :-1], lam=LAM)
    with pytest.raises(ValueError, match="y must lie"):
        fit_representer(phi_aug, y + 3, theta, lam=LAM)


def test_representer_lambda_rule() -> None:
    assert resolve_representer_lambda(0.02, None) == 0.01  # the model's own (l2/2) ||theta||^2
    assert resolve_representer_lambda(0.0, None) == 1e-3  # no L2: a small lambda, the fit needs one
    assert resolve_representer_lambda(0.02, 0.5) == 0.5  # an explicit lambda wins
    for l2, override in ((0.02, 0.0), (0.02, -1.0), (-1.0, None), (float("nan"), None), (0.02, True)):
        with pytest.raises(ValueError, match=r"override|l2"):
            resolve_representer_lambda(l2, override)
