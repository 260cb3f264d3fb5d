"""scope="model" on a tiny BERT built from a config: influence through the embeddings, every attention and
feed-forward Linear, every LayerNorm, the pooler and the classifier (`Task.from_hf(..., scope="model")`).

References in float64 from `model_reference`: torch.func Jacobians of each text alone (no padding), so the
build's padded, length-mixed batches must give every text its own gradient; with projection off the run's `exact`
scores are g_q^T (G + l2 I)^-1 g_i over every parameter of the model, with projection on the same formula in
the LoGra space. Raw texts explain like the stored test example; a list of module names takes those modules.
"""

import numpy as np
import pytest
import torch
from model_reference import gradients_and_ggn, influence_scores, jacobians, projection

import influence as inf
from api import build_index, open_index
from indexer import IndexConfig, Task

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_hf_task import finetune, make_tokenizer, sentiment_corpus

pytestmark = pytest.mark.slow

L2 = 1e-2
CONFIGS = {
    "off": IndexConfig(damping_subsets=0, project_above=10**6),
    "on": IndexConfig(damping_subsets=0, project_above=100, layer_projection_dim=3),
}


def tiny_bert(vocab: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=40,
        pad_token_id=0,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = make_tokenizer()
    train, test = sentiment_corpus(40, seed=3), sentiment_corpus(6, seed=4)
    model = finetune(tiny_bert(len(tokenizer)), tokenizer, train, epochs=4).double().eval()
    task = Task.from_hf(model, tokenizer, train=train, test=test, l2=L2, scope="model", batch_size=16)
    runs = {}
    for name, config in CONFIGS.items():
        runs[name] = tmp_path_factory.mktemp("runs") / name
        build_index(task, runs[name], config=config, progress=False).close()
    names = task.model_scope.names
    enc = [dict(tokenizer(t, return_tensors="pt")) for t, _ in train]
    logits, J = jacobians(model, names, enc)
    g, G = gradients_and_ggn(logits, J, np.array([y for _, y in train]))
    qlogits, Jq = jacobians(model, names, [dict(tokenizer(t, return_tensors="pt")) for t, _ in test])
    gq, _ = gradients_and_ggn(qlogits, Jq, qlogits.argmax(1))
    return task, runs, {"names": names, "g": g, "G": G, "gq": gq, "model": model}


def exact(path, task=None):
    with open_index(path, task=task, lissa=inf.LissaConfig(damping=0.0)) as index:
        return index.pairwise_scores(list(range(len(index.run.test.ids))), method="exact")


def test_every_layer_of_the_encoder_and_head_is_in_scope(setup):
    task, _, ref = setup
    kinds = {layer.kind for layer in task.model_scope.layers}
    assert kinds == {"embedding", "linear", "norm"}
    assert task.model_scope.n_params == sum(p.numel() for p in task.model.parameters())
    assert "bert.embeddings.word_embeddings" in ref["names"] and "classifier" in ref["names"]


def test_projection_off_scores_are_the_full_gauss_newton_influence(setup):
    _, runs, ref = setup
    expected = influence_scores(ref["gq"], ref["g"], ref["G"], L2)
    np.testing.assert_allclose(exact(runs["off"]), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_projection_on_scores_and_vectors_are_the_projected_formula(setup):
    _, runs, ref = setup
    S = projection(ref["model"], ref["names"], 3, 0, whole_budget=100)
    phi, phiq, GS = ref["g"] @ S, ref["gq"] @ S, S.T @ ref["G"] @ S
    with open_index(runs["on"]) as index:
        stored = np.asarray(index.run.array("model_train_vectors"), np.float64)
    np.testing.assert_allclose(stored, phi, rtol=1e-4, atol=1e-5 * np.abs(phi).max())
    expected = influence_scores(phiq, phi, GS, L2)
    np.testing.assert_allclose(exact(runs["on"]), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_kfac_and_ekfac_on_the_projected_encoder(setup):
    """Embeddings, attention / feed-forward linears and LayerNorms: EK-FAC eigenvalues = diag(Q^T G_ll Q) of the
    torch.func projected GGN (a LayerNorm block: diag(G_ll)), and the scores = the dense formula of the factors."""
    from test_model_scope_kfac import dense_matrix

    from indexer.training_set import load_kronecker

    _, runs, ref = setup
    S = projection(ref["model"], ref["names"], 3, 0, whole_budget=100)
    phi, phiq, GS = ref["g"] @ S, ref["gq"] @ S, S.T @ ref["G"] @ S
    with open_index(runs["on"]) as index:
        curv = load_kronecker(index.run.paths, index.run.extra, damping=0.0, prefix="model_")
    kinds = set()
    for b, qa, qg, lam in zip(
        *(getattr(curv["ekfac"], k) for k in ("blocks", "q_a", "q_g", "eigenvalues")), strict=True
    ):
        sl = slice(b.offset, b.offset + b.size)
        Q = np.eye(b.size) if qa is None else np.kron(qg, qa)
        kinds.add(type(b).__name__)
        np.testing.assert_allclose(np.ravel(lam), np.diag(Q.T @ GS[sl, sl] @ Q), rtol=1e-5, atol=1e-9)
    assert kinds == {"LinearBlock", "DiagonalBlock"}
    for method in ("kfac", "ekfac"):
        with open_index(runs["on"], lissa=inf.LissaConfig(damping=0.0)) as index:
            got = index.pairwise_scores(list(range(len(index.run.test.ids))), method=method)
        M = dense_matrix(curv[method]) + L2 * np.eye(len(GS))
        expected = np.linalg.solve(M, phiq.T).T @ phi.T
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_raw_texts_explain_like_the_stored_test_example(setup):
    task, runs, _ = setup
    with open_index(runs["on"], task=task) as index:
        [stored] = index.explain(test_ids=[1], k=4, method="lissa")
        [raw] = index.explain(inputs=[task.test[1][0]], k=4, method="lissa")
    assert [p.example_id for p in stored.proponents] == [p.example_id for p in raw.proponents]
    np.testing.assert_allclose([p.score for p in stored.proponents], [p.score for p in raw.proponents], rtol=1e-3)
    assert isinstance(stored.proponents[0].preview, str)


def test_a_list_of_module_names_takes_those_modules(setup):
    task, _, _ = setup
    tokenizer = make_tokenizer()
    named = Task.from_hf(
        task.model, tokenizer, train=task.train, scope=["bert.encoder.layer.0.output", "classifier"]
    ).model_scope
    assert named.names == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.0.output.LayerNorm", "classifier"]
