"""Task.from_hf: Hugging Face classifiers built from configs in code with a locally trained tokenizer (no download).

The JAX translation of each HF head reproduces the full model's logits; length-sorted micro-batches give the same
features as one text at a time; a tiny BERT builds, reopens and explains with the training texts as previews;
a model saved and reloaded with HF_HUB_OFFLINE=1 works; unsupported models and bad input are refused by name.
"""

import os

import numpy as np
import pytest
import torch
from torch import nn

import influence as inf
from api import build_index, open_index
from api.cli import format_explanation
from indexer import Task, TaskError, UnsupportedLayerError
from indexer.hf import HFEncoderClassifier

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

NEG = ["bad", "awful", "hate", "boring", "sad", "terrible"]
POS = ["good", "great", "love", "fun", "nice", "lovely"]
FILLER = ["the", "a", "movie", "film", "was", "it", "today", "chair", "table", "really", "and", "my", "day"]


def sentiment_corpus(n: int, seed: int) -> list[tuple[str, int]]:
    """Texts of 2..14 filler words with 0 (neutral), or 1-2 negative/positive words: labels 0 neg, 1 neutral, 2 pos."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        label = int(rng.integers(3))
        words = list(rng.choice(FILLER, size=int(rng.integers(2, 15))))
        if label != 1:
            words += list(rng.choice(NEG if label == 0 else POS, size=int(rng.integers(1, 3))))
        rng.shuffle(words)
        out.append((" ".join(words), label))
    return out


def make_tokenizer():
    """A WordPiece tokenizer trained on the synthetic corpus, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    text = [t for t, _ in sentiment_corpus(300, seed=99)]
    tok.train_from_iterator(text, trainers.WordPieceTrainer(vocab_size=120, special_tokens=special))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


TINY = {
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "num_labels": 3,
}


def tiny_model(kind: str, vocab: int) -> nn.Module:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(0)
    if kind == "bert":
        return BertForSequenceClassification(BertConfig(vocab_size=vocab, num_hidden_layers=2, **TINY))
    if kind == "roberta":
        return RobertaForSequenceClassification(RobertaConfig(vocab_size=vocab, num_hidden_layers=2, **TINY))
    if kind == "distilbert":
        cfg = DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64, pad_token_id=0)
        cfg.num_labels = 3
        cfg.max_position_embeddings = 64
        return DistilBertForSequenceClassification(cfg)
    encoder = BertModel(BertConfig(vocab_size=vocab, num_hidden_layers=2, **TINY), add_pooling_layer=False)
    return HFEncoderClassifier(encoder, nn.Linear(32, 3), pooling="mean")


def full_logits(model: nn.Module, tokenizer, texts: list[str]) -> np.ndarray:
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return np.asarray(out if isinstance(out, torch.Tensor) else out.logits)


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "encoder+linear"])
def test_jax_translation_of_each_hf_head_reproduces_the_model_logits(kind, tokenizer):
    model = tiny_model(kind, len(tokenizer)).eval()
    for p in model.parameters():  # HF initialises biases to 0: make every parameter count
        p.data.add_(0.05 * torch.randn_like(p))
    data = sentiment_corpus(40, seed=1)
    task = Task.from_hf(model, tokenizer, train=data)
    texts = [t for t, _ in data]
    head = task.translated_head()
    got = np.asarray(inf.apply_head(head.spec, head.params, task.features(texts)))
    expected = full_logits(model, tokenizer, texts)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)
    kinds = [layer["kind"] for layer in head.spec]
    assert kinds[-1] == "linear" and head.n_classes == 3
    assert ("tanh" in kinds) == (kind in ("bert", "roberta")) and ("relu" in kinds) == (kind == "distilbert")


def test_length_sorted_micro_batches_give_each_text_its_own_features(tokenizer):
    model = tiny_model("bert", len(tokenizer)).eval()
    texts = [t for t, _ in sentiment_corpus(23, seed=2)]
    task = Task.from_hf(model, tokenizer, train=[(t, 0) for t in texts], batch_size=4)
    batches = task.body_module.tokenize(texts)
    lengths = [int(b["attention_mask"].sum(1).max()) for _, b in batches]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]  # sorted: short micro-batches pad little
    together = task.features(texts)
    alone = np.concatenate([task.features([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)


def finetune(model: nn.Module, tokenizer, data: list[tuple[str, int]], *, epochs: int = 8) -> nn.Module:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for s in range(0, len(data), 32):
            batch = data[s : s + 32]
            enc = tokenizer([t for t, _ in batch], padding=True, return_tensors="pt")
            out = model(**enc, labels=torch.tensor([y for _, y in batch]))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def tiny_bert_run(tokenizer, tmp_path_factory):
    train, test = sentiment_corpus(240, seed=3), sentiment_corpus(30, seed=4)
    model = finetune(tiny_model("bert", len(tokenizer)), tokenizer, train)
    task = Task.from_hf(model, tokenizer, train=train, test=test, l2=1e-3)
    path = tmp_path_factory.mktemp("runs") / "tiny-bert"
    build_index(task, path, progress=False).close()
    return task, path


@pytest.mark.slow
def test_tiny_bert_build_reopen_explain_shows_training_texts(tiny_bert_run):
    task, path = tiny_bert_run
    train_texts = [t for t, _ in task.train]
    with open_index(path) as index:  # stored test ids need no model
        assert index.info()["extra"]["test_accuracy"] >= 0.9
        exps = index.explain(test_ids=[0, 1, 2], k=5, method="lissa")
        exact = index.explain(test_ids=[0, 1, 2], k=5, method="exact")
    for exp, ref in zip(exps, exact, strict=True):
        assert len(exp.proponents) == 5
        for p in exp.proponents + exp.opponents:
            assert p.preview == train_texts[p.example_id] and p.label == task.train[p.example_id][1]
        assert [p.example_id for p in exp.proponents] == [p.example_id for p in ref.proponents]
        np.testing.assert_allclose(
            [p.score for p in exp.proponents], [p.score for p in ref.proponents], rtol=2e-2, atol=1e-6
        )
        # a confident text classifier is supported by training texts of its predicted class
        assert sum(p.label == exp.prediction for p in exp.proponents) >= 4
    shown = format_explanation(exps[0], images=False)
    assert exps[0].proponents[0].preview[:40] in shown


@pytest.mark.slow
def test_raw_texts_explain_like_the_stored_test_example(tiny_bert_run):
    task, path = tiny_bert_run
    with open_index(path, task=task) as index:
        [stored] = index.explain(test_ids=[5], k=8, method="lissa")
        [raw] = index.explain(inputs=[task.test[5][0]], k=8, method="lissa")
        with pytest.raises(ValueError, match=r"inputs must be a batch \(a list\), got one str"):
            index.explain(inputs=task.test[5][0])
    assert raw.test_id is None and raw.prediction == stored.prediction
    assert [p.example_id for p in raw.proponents] == [p.example_id for p in stored.proponents]
    np.testing.assert_allclose([p.score for p in raw.proponents], [p.score for p in stored.proponents], rtol=1e-3)


def test_model_saved_and_reloaded_offline_builds_the_same_task(tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    model = tiny_model("bert", len(tokenizer)).eval()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    data = sentiment_corpus(10, seed=5)
    a = Task.from_hf(model, tokenizer, train=data)
    b = Task.from_hf(loaded, loaded_tok, train=data)
    assert a.fingerprint() == b.fingerprint()
    texts = [t for t, _ in data]
    np.testing.assert_allclose(a.features(texts), b.features(texts), atol=1e-6, rtol=0)


def test_unsupported_models_and_bad_input_are_refused_by_name(tokenizer):
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

    data = sentiment_corpus(4, seed=6)
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, num_labels=2))
    with pytest.raises(UnsupportedLayerError, match="GPT2ForSequenceClassification is unsupported"):
        Task.from_hf(gpt2, tokenizer, train=data)
    regression = BertForSequenceClassification(
        BertConfig(vocab_size=50, num_hidden_layers=1, **(TINY | {"num_labels": 1}))
    )
    with pytest.raises(UnsupportedLayerError, match="regression"):
        Task.from_hf(regression, tokenizer, train=data)
    multi = BertForSequenceClassification(
        BertConfig(vocab_size=50, num_hidden_layers=1, problem_type="multi_label_classification", **TINY)
    )
    with pytest.raises(UnsupportedLayerError, match="multi_label_classification"):
        Task.from_hf(multi, tokenizer, train=data)
    model = tiny_model("bert", len(tokenizer))
    with pytest.raises(TaskError, match="scope must be one of"):
        Task.from_hf(model, tokenizer, train=data, scope="everything")
    with pytest.raises(TaskError, match=r"train\[1\]: label must be an int"):
        Task.from_hf(model, tokenizer, train=[("fine", 0), ("good", "positive")])
    with pytest.raises(TaskError, match=r"test\[0\]: text must be a str"):
        Task.from_hf(model, tokenizer, train=data, test=[(3, 0)])
    with pytest.raises(TaskError, match="tokenizer must be"):
        Task.from_hf(model, "bert-base-uncased", train=data)
