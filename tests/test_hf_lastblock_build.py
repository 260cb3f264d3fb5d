"""scope="last-block" end to end: Task.from_hf(..., scope="last-block") -> build_index -> reopen -> explain.

A tiny BERT (built from a config in code, fine-tuned for a few epochs) is indexed over its last transformer
block + head. The reference is computed independently in float64: full per-example gradients by torch.func,
the dense projection S, and the Gauss-Newton matrix through the torch curvature product on every column of S,
so that the run's scores must equal phi_q^T (S^T C S + l2 S^T S + delta I)^-1 phi_i (influence in the random
subspace theta* + S w, indexer.block). Then: LiSSA agrees with the eigendecomposition, stored test gradients
need no model, other targets and raw texts do (and agree), previews are texts, dumps and the head-scope
label-noise job run on the same run, and what this scope does not support is refused by name.
"""

import copy

import numpy as np
import pytest
import torch

import influence as inf
from api import build_index, open_index
from indexer import IndexConfig, Task, TaskError
from indexer.torch_backend import LastBlockScope, compute_projected_grads, make_torch_matvec, make_torch_projection
from indexer.update import add_examples
from store import load_manifest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_hf_task import finetune, make_tokenizer, sentiment_corpus, tiny_model

pytestmark = pytest.mark.slow

DIM = 40
L2 = 1e-2


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def block_run(tokenizer, tmp_path_factory):
    train, test = sentiment_corpus(96, seed=3), sentiment_corpus(10, seed=4)
    model = finetune(tiny_model("bert", len(tokenizer)), tokenizer, train, epochs=3)
    task = Task.from_hf(model, tokenizer, train=train, test=test, l2=L2, scope="last-block", batch_size=16)
    path = tmp_path_factory.mktemp("runs") / "tiny-bert-block"
    build_index(task, path, config=IndexConfig(projection_dim=DIM), progress=False).close()
    return task, path


@pytest.fixture(scope="module")
def reference(block_run):
    """Float64 scores phi_q^T (S^T C S + l2 S^T S + delta I)^-1 phi_i from full gradients and dense S."""
    task, _ = block_run
    model = copy.deepcopy(task.model).double()
    scope = LastBlockScope(model, task.block.tokenizer, batch_size=16, dtype=torch.float64)
    texts, labels = [t for t, _ in task.train], np.array([y for _, y in task.train])
    batches = scope.block_inputs(texts)
    G = compute_projected_grads(scope, batches, labels, None)  # [n, p] unprojected
    S = make_torch_projection(scope.n_params, DIM, seed=0, kind="sketch").matrix()  # [p, DIM]
    product = make_torch_matvec(scope, batches, labels, l2=0.0, curvature="ggn").product
    CS = np.stack([product(torch.as_tensor(S[:, j])).numpy() for j in range(DIM)], axis=1)
    A, B = S.T @ CS + L2 * S.T @ S, S.T @ S
    # the damping of C + l2 I's top Ritz value on span(S): max of the Rayleigh quotient v^T A v / v^T B v
    Binv_half = np.linalg.inv(np.linalg.cholesky(B))
    top_ritz = float(np.linalg.eigvalsh(Binv_half @ A @ Binv_half.T)[-1])
    damping = inf.resolve_damping(top_ritz, L2, None)
    test_texts = [t for t, _ in task.test]
    with torch.no_grad():
        logits = torch.cat([scope.logits(scope.params, b.hidden, b.mask) for b in scope.block_inputs(test_texts)])
    order = np.concatenate([b.positions for b in scope.block_inputs(test_texts)])
    pred = np.empty(len(test_texts), np.int64)
    pred[order] = logits.argmax(1).numpy()
    Gq = compute_projected_grads(scope, scope.block_inputs(test_texts), pred, None)
    phi_train, phi_q = G @ S, Gq @ S
    # influence restricted to theta* + S w, in full-space units p / d
    solved = (scope.n_params / DIM) * np.linalg.solve(A + damping * B, phi_q.T).T
    return {
        "exact": solved @ phi_train.T,
        "grad-dot": phi_q @ phi_train.T,
        "phi_train": phi_train,
        "pred": pred,
        "scope": scope,
        "S": S,
        "A": A,
        "B": B,
        "damping": damping,
    }


def test_the_run_records_the_scope_and_stores_projected_block_gradients(block_run, reference):
    task, path = block_run
    manifest = load_manifest(path)
    assert manifest.task["scope"] == "last-block" and manifest.task["block_params"] == task.block.n_params
    record = manifest.extra["block"]
    assert record["dim"] == DIM and record["curvature_rows"] == len(task.train) and record["curvature"] == "ggn"
    assert {"block", "block-unit", "grad", "representer"} <= set(manifest.spaces)
    with open_index(path) as index:
        stored = np.asarray(index.run.array("block_train_vectors"), np.float64)
        curvature = index.engine.block_curvature
        A, B, (mu, V) = curvature.A, curvature.B, curvature.pencil
        damping = curvature.damping
    scale = np.abs(reference["phi_train"]).max()
    np.testing.assert_allclose(stored, reference["phi_train"], atol=2e-5 * scale, rtol=0)
    # A = S^T C S + l2 S^T S (C the GGN through the torch curvature product), B = S^T S
    np.testing.assert_allclose(A, reference["A"], atol=1e-4 * np.abs(reference["A"]).max(), rtol=0)
    np.testing.assert_allclose(B, reference["B"], rtol=1e-5)
    np.testing.assert_allclose(V.T @ B @ V, np.eye(DIM), atol=1e-8)  # B-orthonormal Ritz vectors
    assert mu[0] >= mu[-1] >= L2 * (1 - 1e-6)  # Ritz values of C + l2 I, C PSD
    assert damping == pytest.approx(reference["damping"], rel=1e-4)
    # S^T S ~ (p / d) I: the restricted model sees d / p of a gradient's squared norm
    assert np.trace(B) / DIM == pytest.approx(task.block.n_params / DIM, rel=0.05)


@pytest.mark.parametrize("method", ["exact", "grad-dot"])
def test_scores_equal_the_float64_subspace_influence(block_run, reference, method):
    task, path = block_run
    ids = list(range(len(task.test)))
    with open_index(path) as index:
        dense = index.pairwise_scores(ids, method=method)
        exps = index.explain(test_ids=ids, k=5, method=method)
    ref = reference[method]
    np.testing.assert_allclose(dense, ref, atol=1e-3 * np.abs(ref).max(), rtol=0)
    for j, exp in enumerate(exps):
        assert exp.prediction == reference["pred"][j]
        top = np.argsort(-ref[j])[:5]
        got = [p.example_id for p in exp.proponents]
        assert got == [int(i) for i in top if ref[j, i] > 0][: len(got)]
        np.testing.assert_allclose([p.score for p in exp.proponents], ref[j, got], rtol=2e-3)


def test_lissa_agrees_with_the_eigendecomposition_and_previews_are_texts(block_run):
    task, path = block_run
    with open_index(path) as index:
        lissa = index.explain(test_ids=[0, 1, 2], k=5, method="lissa")
        exact = index.explain(test_ids=[0, 1, 2], k=5, method="exact")
        cos = index.explain(test_ids=[0], k=3, method="grad-cos")
    for a, b in zip(lissa, exact, strict=True):
        assert [p.example_id for p in a.proponents] == [p.example_id for p in b.proponents]
        np.testing.assert_allclose([p.score for p in a.proponents], [p.score for p in b.proponents], rtol=1e-2)
        assert a.diagnostics["residual_max"] < 1e-2
        for p in a.proponents + a.opponents:
            assert p.preview == task.train[p.example_id][0] and p.label == task.train[p.example_id][1]
    assert all(-1 - 1e-6 <= p.score <= 1 + 1e-6 for p in cos[0].proponents + cos[0].opponents)


def test_other_targets_and_raw_texts_need_the_model_and_then_agree(block_run, reference):
    task, path = block_run
    other = (reference["pred"][3] + 1) % 3
    with open_index(path) as index, pytest.raises(ValueError, match="need the model"):
        index.explain(test_ids=[3], targets=[other], method="grad-dot")
    with open_index(path, task=task) as index:
        [at_other] = index.explain(test_ids=[3], targets=[other], k=4, method="grad-dot")
        [stored] = index.explain(test_ids=[3], k=4, method="exact")
        [raw] = index.explain(inputs=[task.test[3][0]], k=4, method="exact")
    scope = reference["scope"]
    g = compute_projected_grads(scope, scope.block_inputs([task.test[3][0]]), [other], None)
    ref = (g @ reference["S"]) @ reference["phi_train"].T
    top = np.argsort(-ref[0])[:4]
    assert [p.example_id for p in at_other.proponents] == [int(i) for i in top if ref[0, i] > 0]
    assert raw.test_id is None and raw.prediction == stored.prediction
    assert [p.example_id for p in raw.proponents] == [p.example_id for p in stored.proponents]
    np.testing.assert_allclose([p.score for p in raw.proponents], [p.score for p in stored.proponents], rtol=1e-3)


def test_dump_and_label_noise_run_on_a_last_block_run(block_run, tmp_path):
    import pyarrow.parquet as pq

    task, path = block_run
    with open_index(path) as index:
        out = index.dump(tmp_path / "dump.parquet", k=3, method="exact", progress=False)
        exps = index.explain(test_ids=list(range(len(task.test))), k=3, method="exact")
        suspects = index.find_label_noise(method="loss", top=5)
    table = pq.read_table(out).to_pylist()
    for exp in exps:
        rows = sorted((r for r in table if r["test_id"] == exp.test_id and r["score"] > 0), key=lambda r: r["rank"])
        assert [r["example_id"] for r in rows] == [p.example_id for p in exp.proponents]
        np.testing.assert_allclose([r["score"] for r in rows], [p.score for p in exp.proponents], rtol=1e-5)
    assert len(suspects) == 5 and all(s.preview == task.train[s.example_id][0] for s in suspects)


def test_resuming_the_block_stage_gives_the_same_arrays(block_run, tmp_path):
    import dataclasses
    import shutil

    from store import RunPaths, load_array, save_manifest

    task, path = block_run
    copy_path = tmp_path / "run"
    shutil.copytree(path, copy_path)
    manifest = load_manifest(copy_path)
    # as if killed after the block vectors were written but before the stage was recorded
    stages = tuple(s for s in manifest.stages if s not in ("block", "complete"))
    save_manifest(copy_path, dataclasses.replace(manifest, stages=stages))
    paths = RunPaths(copy_path)
    for name in ("block_curvature", "block_gram"):
        paths.array(name).unlink()
    build_index(task, copy_path, config=IndexConfig(projection_dim=DIM), progress=False).close()
    for name in ("block_train_vectors", "block_test_vectors", "block_curvature", "block_gram"):
        np.testing.assert_array_equal(
            np.asarray(load_array(RunPaths(path).array(name))), np.asarray(load_array(paths.array(name)))
        )


def test_unsupported_options_are_refused_by_name(block_run, tokenizer, tmp_path):
    task, path = block_run
    with pytest.raises(TaskError, match="curvature='hessian' is not available for scope='last-block'"):
        build_index(task, tmp_path / "h", config=IndexConfig(curvature="hessian", projection_dim=DIM), progress=False)
    assert not (tmp_path / "h").exists()
    with pytest.raises(ValueError, match=r"scope='last-block'.*rebuild"):
        add_examples(task, path, sentiment_corpus(3, seed=9))
    with pytest.raises(TaskError, match="scope must be one of"):
        Task.from_hf(task.model, tokenizer, train=sentiment_corpus(4, seed=0), scope="block")
    with pytest.raises(TaskError, match="scope='last-block' needs block="):
        Task(model=task.model, train=task.train, body=task.body_module, head=task.head, scope="last-block")
