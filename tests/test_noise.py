"""Label-noise job: planted flips on digits are found, results land in SQLite, self-influence is the pairwise
diagonal, the grad-cos control is constant, bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest

from influence import noise as nz

N_FLIPS = 144  # 10% of the 1,437 digits training examples


@pytest.fixture(scope="module")
def noisy_digits(tmp_path_factory):
    from api import build_index
    from indexer.demo import digits_task, flip_labels, load_digits_split

    task = digits_task(n_flips=N_FLIPS, seed=0)
    _, y_true, _, _ = load_digits_split(0)
    _, flips = flip_labels(y_true, N_FLIPS, 10, 0)
    is_flip = np.zeros(len(y_true), bool)
    is_flip[flips] = True
    index = build_index(task, tmp_path_factory.mktemp("runs") / "digits-noisy", progress=False)
    yield index, y_true, is_flip
    index.close()


@pytest.fixture(scope="module")
def signals(noisy_digits):
    from api.noise import compute_noise_signals

    index, _, _ = noisy_digits
    return compute_noise_signals(index.engine, progress=False)


def test_planted_flips_are_found(noisy_digits, signals):
    _, y_true, is_flip = noisy_digits
    auc = {m: nz.detection_auc(signals.score(m), is_flip) for m in (*signals.signals, "fused")}
    assert auc["fused"] >= 0.97
    assert auc["fused"] >= auc["loss"]
    order = nz.rank_order(signals.score("fused"), signals.ids)
    assert nz.fraction_found(order, is_flip, 0.10) >= 0.85  # precision@10% >= 0.85 with 10% flipped
    found = order[:N_FLIPS][is_flip[order[:N_FLIPS]]]
    assert np.mean(signals.suggested[found] == y_true[found]) >= 0.85


def test_results_written_to_sqlite_in_order(noisy_digits):
    index, _, _ = noisy_digits
    suspects = index.find_label_noise(progress=False)
    assert len(suspects) == len(index.train_ids)
    scores = [s.score for s in suspects]
    assert scores == sorted(scores, reverse=True)
    stored = index.metadata.top_suspects(25)
    assert [r.example_id for r in stored] == [s.example_id for s in suspects[:25]]
    assert [r.suggested_label for r in stored] == [s.suggested_label for s in suspects[:25]]
    assert stored[0].suspect_score == pytest.approx(suspects[0].score)
    assert set(suspects[0].signals) >= {"loss", "oos-loss", "confident-learning", "representer", "margin"}
    by_self_influence = index.find_label_noise(top=3, method="self-influence", progress=False)
    assert {"self-influence", "loss", "oos-loss"} <= set(by_self_influence[0].signals)
    top = index.find_label_noise(top=7, method="loss", progress=False)
    assert len(top) == 7 and top[0].signals["loss"] >= top[-1].signals["loss"]


def test_self_influence_is_the_pairwise_diagonal(noisy_digits, signals):
    index, _, _ = noisy_digits
    rows = np.array([0, 5, 17, 300, 1000])
    from api.scorers import scorer_for

    g = index.engine.train_gradients(rows)
    s, _ = index.engine.solve(g, "exact")
    # [m, m]: query = training example i at its own label
    pairwise = s @ scorer_for(index.engine, "exact").train_vectors(rows).T
    np.testing.assert_allclose(np.diag(pairwise), signals.signals["self-influence"][rows], rtol=1e-4)


def test_low_rank_self_influence_is_exact_when_the_complement_is():
    rng = np.random.default_rng(0)
    p = 12
    q, _ = np.linalg.qr(rng.standard_normal((p, p)))
    lam = np.concatenate([np.linspace(5.0, 1.0, 8), np.full(4, 0.3)])  # the last 4 eigenvalues equal the complement
    C = (q * lam) @ q.T
    g = rng.standard_normal((6, p))
    exact = np.einsum("ij,ij->i", g, np.linalg.solve(C + 0.1 * np.eye(p), g.T).T)
    full = nz.compute_self_influence_eigen(g, lam, q, damping=0.1)
    low = nz.compute_self_influence_eigen(g, lam[:8], q[:, :8], damping=0.1, complement=0.3 + 0.1)
    np.testing.assert_allclose(full, exact, rtol=1e-10)
    np.testing.assert_allclose(low, exact, rtol=1e-10)


def test_low_rank_eigenpairs_match_eigh():
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    a = rng.standard_normal((40, 30))
    C = a.T @ a / 40
    lam, Q = nz.compute_top_eigenpairs(lambda v: jnp.asarray(C, jnp.float32) @ v, 30, k=5, tol=1e-8)
    ref = np.linalg.eigvalsh(C)[::-1][:5]
    np.testing.assert_allclose(lam, ref, rtol=1e-4)
    np.testing.assert_allclose(np.abs(Q.T @ Q), np.eye(5), atol=1e-4)


def test_grad_cos_control_is_constant(noisy_digits, signals):
    _, _, is_flip = noisy_digits
    s = signals.signals["grad-cos"]
    assert np.all(s == s[0])
    assert nz.detection_auc(s, is_flip) == pytest.approx(0.5)


def test_whole_head_refits_find_the_planted_flips(noisy_digits):
    from api.noise import compute_noise_signals

    index, _, is_flip = noisy_digits
    whole = compute_noise_signals(index.engine, signals=("loss", "oos-loss"), oos_refit="whole-head", progress=False)
    assert whole.info["confident-learning"]["refit"] == "whole head"
    assert whole.info["confident-learning"]["repeats"] == 2  # the default for non-convex refits
    assert nz.detection_auc(whole.score("oos-loss"), is_flip) >= 0.97
    order = nz.rank_order(whole.score("fused"), whole.ids)
    assert nz.fraction_found(order, is_flip, 0.10) >= 0.85


def test_whole_head_refit_stops_at_the_model_fit_and_is_out_of_sample():
    """Random labels on random features: a 2-layer head can fit them (in sample) but not predict held-out ones."""
    rng = np.random.default_rng(0)
    h, y = rng.normal(size=(600, 20)).astype(np.float32), rng.integers(0, 3, 600)
    spec = [
        {"kind": "linear", "in_features": 20, "out_features": 64, "bias": True},
        {"kind": "relu"},
        {"kind": "linear", "in_features": 64, "out_features": 3, "bias": True},
    ]
    params, epochs = nz.fit_head_adam(spec, h, y, l2=0.0, target_loss=0.5, seed=0, batch_size=64, lr=3e-3)
    import influence as inf

    fitted = float(np.mean(np.asarray(inf.cross_entropy(inf.apply_head(spec, params, h), y))))
    assert fitted <= 0.5 and 1 < epochs < 200  # stopped by the rule, at the asked fit
    model_losses = np.full(600, 0.5)
    probs, per_fold = nz.compute_out_of_sample_probs_head(spec, h, y, model_losses, l2=0.0, folds=3, seed=1)
    assert len(per_fold) == 3 and np.allclose(probs.sum(1), 1)
    held_out_accuracy = float(np.mean(probs.argmax(1) == y))
    assert held_out_accuracy < 0.45  # chance is 1/3: nothing of a held-out random label leaks
    again, _ = nz.compute_out_of_sample_probs_head(spec, h, y, model_losses, l2=0.0, folds=3, seed=1)
    np.testing.assert_array_equal(probs, again)  # seeded
    other, _ = nz.compute_out_of_sample_probs_head(spec, h, y, model_losses, l2=0.0, folds=3, seed=2)
    both, per_fold = nz.compute_out_of_sample_probs_head(spec, h, y, model_losses, l2=0.0, folds=3, seed=1, repeats=2)
    assert len(per_fold) == 6
    np.testing.assert_allclose(both, (probs + other) / 2, rtol=1e-12)  # the mean of the two K-fold runs
    assert not np.allclose(probs, other)  # and the two runs differ (other folds, other initialisations)
    with pytest.raises(ValueError, match="repeats"):
        nz.compute_out_of_sample_probs_head(spec, h, y, model_losses, l2=0.0, folds=3, repeats=0)


def test_auto_refit_follows_the_head():
    from api.noise import resolve_oos_refit

    mlp = [
        {"kind": "linear", "in_features": 8, "out_features": 4, "bias": True},
        {"kind": "relu"},
        {"kind": "linear", "in_features": 4, "out_features": 3, "bias": True},
    ]
    linear = mlp[-1:]
    assert resolve_oos_refit("auto", None, mlp) == ("whole-head", 2)
    assert resolve_oos_refit("auto", None, linear) == ("last-layer", 1)
    assert resolve_oos_refit("whole-head", None, linear) == ("last-layer", 1)  # one layer: the same refit
    assert resolve_oos_refit("last-layer", 3, mlp) == ("last-layer", 3)
    for bad in (0, -1, 2.5, True, "2"):
        with pytest.raises(ValueError, match="oos_repeats"):
            resolve_oos_refit("auto", bad, mlp)


def test_bad_arguments_are_refused(noisy_digits):
    index, _, _ = noisy_digits
    with pytest.raises(ValueError, match="oos_refit must be one of"):
        index.find_label_noise(oos_refit="all", progress=False)
    with pytest.raises(ValueError, match="oos_repeats"):
        index.find_label_noise(oos_repeats=0, progress=False)
    with pytest.raises(ValueError, match="method"):
        index.find_label_noise(method="tracin-magic", progress=False)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="top"):
            index.find_label_noise(top=bad, progress=False)
    with pytest.raises(ValueError, match="folds"):
        index.find_label_noise(folds=1, progress=False)


def test_fusion_and_ranking_helpers():
    r = nz.rank_percentiles(np.array([3.0, 1.0, 2.0, 2.0]))
    np.testing.assert_allclose(r, [1.0, 0.25, 0.625, 0.625])
    fused = nz.fuse_ranks({"a": np.array([1.0, 2.0, 3.0]), "b": np.array([30.0, 20.0, 10.0])})
    np.testing.assert_allclose(fused, [2 / 3, 2 / 3, 2 / 3])
    np.testing.assert_array_equal(nz.rank_order(np.array([1.0, 5.0, 5.0, 0.0])), [1, 2, 0, 3])
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1]])
    labels = np.array([0, 1, 0])
    cl = nz.confident_learning_scores(probs, labels)
    assert cl.argmax() == 2
    assert nz.suggest_labels(probs, labels, probs.argmax(1)).tolist() == [0, 1, 1]
    assert nz.detection_auc(np.array([0.1, 0.9, 0.2]), np.array([False, True, False])) == 1.0


def test_low_rank_self_influence_uses_the_build_eigenpairs(tmp_path, digits_logreg_task, digits_logreg_run):
    """Heads without a dense eigendecomposition: top-k eigenpairs stored by the build + l2 on the complement,
    checked against the same truncation of the dense float64 eigendecomposition of another build."""
    from api import build_index, open_index
    from api.noise import compute_self_influence
    from indexer import IndexConfig
    from store import load_array

    index = build_index(
        digits_logreg_task, tmp_path / "lowrank", config=IndexConfig(exact_max_params=0), progress=False
    )
    assert not index.paths.array("curvature_eigenvalues").exists()
    got, info = compute_self_influence(index.engine, rank=32, progress=False)
    assert info["eigenpairs"] == "build" and info["rank"] == 32
    with open_index(digits_logreg_run) as dense:
        lam = np.asarray(load_array(dense.paths.array("curvature_eigenvalues")))
        Q = np.asarray(load_array(dense.paths.array("curvature_eigenvectors")))
        top = np.argsort(-lam)[:32]
        g = dense.engine.train_gradients(slice(None)).astype(np.float64)
        want = nz.compute_self_influence_eigen(
            g, lam[top], Q[:, top], damping=index.engine.damping, complement=index.run.l2 + index.engine.damping
        )
    np.testing.assert_allclose(got, want, rtol=2e-3)
    index.close()


def test_class_normalized_loss_is_log_of_confidence_over_class_threshold():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 4)) * 2
    labels = rng.integers(0, 4, 200)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    loss = -np.log(p[np.arange(200), labels])
    t = nz.per_class_thresholds(p, labels)
    want = -np.log(p[np.arange(200), labels] / t[labels])
    np.testing.assert_allclose(nz.class_normalized_loss(loss, labels), want, rtol=1e-12)
    # within a class the order is the loss order; a constant shift of one class's losses changes nothing
    shifted = loss + 3.0 * (labels == 2)
    np.testing.assert_allclose(nz.class_normalized_loss(shifted, labels), want, rtol=1e-9)
    with pytest.raises(ValueError, match="finite"):
        nz.class_normalized_loss(np.array([np.nan, 1.0]), np.array([0, 1]))


def test_cli_noise_table_csv_and_png(noisy_digits, tmp_path):
    import matplotlib.image as mpimg
    import pyarrow.csv as pacsv
    from typer.testing import CliRunner

    from api.cli import app

    index, _, is_flip = noisy_digits
    truth = tmp_path / "flips.txt"
    truth.write_text("\n".join(str(int(i)) for i in index.train_ids[is_flip]))
    out, png = tmp_path / "suspects.csv", tmp_path / "noise.png"
    args = ["noise", str(index.paths.root), "--top", "5", "--out", str(out), "--png", str(png)]
    result = CliRunner().invoke(app, [*args, "--known-wrong", str(truth)])
    assert result.exit_code == 0, result.output
    assert "suggested" in result.output and f"wrote {png}" in result.output
    n_wrong = int(is_flip.sum())
    ranked = [int(line.split()[1]) for line in result.output.splitlines() if line[:4].strip().isdigit()]
    assert len(ranked) == 5
    found = [line for line in result.output.splitlines() if line.startswith("known wrong: found")]
    assert len(found) == 1 and f" of {n_wrong} in the top {n_wrong} suspects" in found[0], result.output
    assert int(found[0].split()[3]) == len(
        set(pacsv.read_csv(out).column("example_id").to_pylist()[:n_wrong]) & {int(i) for i in index.train_ids[is_flip]}
    )
    assert not list(index.paths.root.glob("*.png"))  # no PNG in the run directory unless asked for
    table = pacsv.read_csv(out)
    assert table.num_rows == len(index.train_ids) and "signal_loss" in table.column_names
    image = mpimg.imread(png)
    assert image.shape[0] > 100 and image[..., :3].std() > 0.05  # a drawn figure, not a blank canvas
    bad = CliRunner().invoke(app, [*args, "--known-wrong", str(tmp_path / "missing.txt")])
    assert bad.exit_code != 0 and "--known-wrong" in bad.output
    bad = CliRunner().invoke(app, [*args, "--oos-refit", "everything"])
    assert bad.exit_code == 2 and "oos_refit must be one of" in bad.output


def test_job_caches_miss_after_the_training_set_changes_even_at_the_same_size(
    tmp_path, digits_logreg_task, digits_logreg_run
):
    """The self-influence cache is keyed on the training rows: a delete then an add (same n, other ids) recomputes,
    and the result is the old one with the re-added example's row moved to the end."""
    import shutil

    from api import open_index
    from api.noise import compute_self_influence
    from indexer.update import add_examples, delete_examples

    path = shutil.copytree(digits_logreg_run, tmp_path / "run")
    with open_index(path) as index:
        first, info = compute_self_influence(index.engine, progress=False)
        assert "cached" not in info
        assert compute_self_influence(index.engine, progress=False)[1]["cached"]
    delete_examples(path, [0])
    add_examples(digits_logreg_task, path, [digits_logreg_task.train[0]], ids=[10_000])
    with open_index(path) as index:
        got, info = compute_self_influence(index.engine, progress=False)
        assert "cached" not in info and len(got) == len(first)
        np.testing.assert_allclose(got, np.concatenate([first[1:], first[:1]]), rtol=1e-5)
