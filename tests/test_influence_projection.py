"""Seeded Gaussian projection and the similarity helpers."""

import numpy as np
import pytest

from influence import (
    make_projection,
    normalize_rows,
    project,
)


def test_projection_is_deterministic_and_block_size_invariant() -> None:
    G = np.random.default_rng(0).normal(size=(4, 50))
    a = project(G, d=16, seed=3)
    np.testing.assert_array_equal(a, project(G, d=16, seed=3))
    np.testing.assert_allclose(project(G, d=16, seed=3, block_size=7), a, rtol=1e-12, atol=1e-14)
    assert not np.allclose(project(G, d=16, seed=4), a)
    proj = make_projection(50, 16, seed=3)
    P = proj.matrix()
    np.testing.assert_allclose(G @ P, a, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(proj.project(G[0]), a[0], rtol=1e-12, atol=1e-14)


def test_projection_keeps_float32() -> None:
    G = np.ones((2, 10), dtype=np.float32)
    assert project(G, d=4, seed=0).dtype == np.float32


def test_projection_entries_have_variance_one_over_d() -> None:
    P = make_projection(400, 64, seed=1).matrix()
    assert abs(P.mean()) < 3 / np.sqrt(P.size) / 8
    assert P.var() * 64 == pytest.approx(1.0, rel=0.03)


def test_projection_preserves_inner_products_better_with_larger_d() -> None:
    rng = np.random.default_rng(1)
    G = rng.normal(size=(20, 300))
    exact = G @ G.T
    errors = []
    for d in (16, 1024):
        Z = project(G, d=d, seed=0)
        errors.append(np.linalg.norm(Z @ Z.T - exact) / np.linalg.norm(exact))
    assert errors[1] < 0.2 and errors[1] < errors[0] / 3
    # Unbiased: averaged over seeds the projected inner product approaches the exact one.
    mean = np.mean([project(G[:2], d=32, seed=s) @ project(G[:2], d=32, seed=s).T for s in range(40)], axis=0)
    assert np.linalg.norm(mean - exact[:2, :2]) / np.linalg.norm(exact[:2, :2]) < 0.1


def test_projection_validation() -> None:
    with pytest.raises(ValueError, match="d must be"):
        make_projection(10, 0, seed=0)
    with pytest.raises(ValueError, match=r"G must have shape \[m, 10\]"):
        make_projection(10, 4, seed=0).project(np.ones((2, 9)))


def test_similarity_helpers() -> None:
    G = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(normalize_rows(G), [[0.6, 0.8], [0.0, 0.0]])
    Q = np.array([[1.0, 2.0]])
    np.testing.assert_allclose(Q @ G.T, [[11.0, 0.0]])
    np.testing.assert_allclose(np.einsum("ij,ij->i", G, 2 * G), [50.0, 0.0])
    with pytest.raises(ValueError, match="mismatch"):  # query and train vectors must agree on d
        Q @ np.ones((2, 3)).T


def test_kept_projection_blocks_give_the_products_of_blocks_drawn_afresh(monkeypatch) -> None:
    from influence import projection

    rng = np.random.default_rng(3)
    G = rng.standard_normal((5, 1000)).astype(np.float32)
    dense = G.astype(np.float64) @ make_projection(1000, 16, seed=9).matrix(dtype=np.float32)
    monkeypatch.setattr(projection, "_cache", projection.collections.OrderedDict())
    monkeypatch.setattr(projection, "CACHE_BYTES", 0)  # nothing fits: every call draws P afresh
    fresh = project(G, d=16, seed=9, block_size=256)
    assert not projection._cache
    monkeypatch.setattr(projection, "CACHE_BYTES", 4 * 256 * 16 * 4)  # exactly this projection's 4 blocks
    first, again = project(G, d=16, seed=9, block_size=256), project(G[:2], d=16, seed=9, block_size=256)
    assert list(projection._cache) == [(1000, 16, 9, 256, "float32")]
    np.testing.assert_array_equal(first, fresh)  # bit for bit: the same blocks, the same products
    np.testing.assert_array_equal(again, fresh[:2])
    np.testing.assert_allclose(first, dense, rtol=1e-4, atol=1e-4)
    project(G, d=16, seed=10, block_size=256)  # another projection: the least recently used one is dropped
    assert list(projection._cache) == [(1000, 16, 10, 256, "float32")]
