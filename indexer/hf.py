"""Hugging Face sequence classifiers as Tasks: a frozen text encoder as the body, the classifier as the head.

`Task.from_hf(model, tokenizer, train=[(text, label), ...], test=..., scope="head")` splits a transformers
sequence classifier into

- a body, `TextBody`: tokenizes a batch of texts (sorted by token length so that micro-batches carry little
  padding), runs the frozen encoder (torch, no grad) and returns the classifier's input per text (the hidden
  state of the first token, or a masked mean for `HFEncoderClassifier(pooling="mean")`), in the input order;
- a head: the model's own classification layers, which `indexer.translate` turns into the JAX head spec:

  | model | body output | head |
  |---|---|---|
  | BERT (MiniLM, ...) `*ForSequenceClassification` | `[CLS]` last hidden state | pooler dense, tanh, dropout, classifier |
  | RoBERTa / XLM-R | `<s>` last hidden state | dense, tanh, out_proj (dropouts are identities in eval) |
  | DistilBERT | `[CLS]` last hidden state | pre_classifier, ReLU, dropout, classifier |
  | `HFEncoderClassifier(encoder, head)` | CLS or masked-mean pooled hidden state | `head` (Linear, ...) |

Previews are the texts themselves. Anything else (another architecture, regression or multi-label problem types)
is refused with an error naming what is unsupported.

This module is a leaf of the package (torch, `indexer.errors`, `indexer.translate`): `indexer.torch_backend`
builds the last-block scope on it, and `experiments/tweets_features.py` imports it alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .errors import TaskError, UnsupportedLayerError
from .translate import flatten_modules

SCOPES = ("head", "last-block", "model")
POOLINGS = ("cls", "mean")


class HFEncoderClassifier(nn.Module):
    """A Hugging Face encoder (e.g. `AutoModel`) with a torch classification head on its pooled output.

    Args:
        encoder: a transformers encoder returning `last_hidden_state` [batch, tokens, hidden].
        head: torch layers mapping the pooled hidden state [batch, hidden] to logits (e.g. `nn.Linear`).
        pooling: "cls" (first token) or "mean" (mean over non-padding tokens, as sentence-transformers do).
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, *, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise TaskError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.encoder, self.head, self.pooling = encoder, head, pooling

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pool_hidden(hidden, attention_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return self.head(self.pool(hidden, attention_mask))


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[batch, tokens, hidden] -> [batch, hidden]: the first token, or the mean over unmasked tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class TextBody(nn.Module):
    """The frozen encoder as a Task body: a list of texts in, the head's input [n, hidden] out (input order).

    Texts are tokenized once without padding, sorted by length, and run in micro-batches of `batch_size`
    padded to the longest text of the micro-batch, so a batch of short and long texts costs little padding.
    """

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer: Any,
        *,
        pooling: str,
        batch_size: int = 64,
        max_length: int = 128,
    ) -> None:
        super().__init__()
        self.encoder, self.tokenizer, self.pooling = encoder, tokenizer, pooling
        self.batch_size, self.max_length = batch_size, max_length

    def tokenize(self, texts: Sequence[str]) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
        """Micro-batches `(positions, padded encodings)`, shortest texts first."""
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        order = sorted(range(len(texts)), key=lambda i: len(enc["input_ids"][i]))
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        batches = []
        for s in range(0, len(order), self.batch_size):
            pos = order[s : s + self.batch_size]
            padded = self.tokenizer.pad({k: [enc[k][i] for i in pos] for k in keys}, return_tensors="pt")
            batches.append((pos, {k: padded[k] for k in keys}))
        return batches

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        texts = check_texts(texts, "texts")
        out: torch.Tensor | None = None
        device = next(self.encoder.parameters()).device  # the encoder may sit on a GPU
        for pos, cpu_batch in self.tokenize(texts):
            batch = {k: v.to(device) for k, v in cpu_batch.items()}
            hidden = self.encoder(**batch).last_hidden_state
            pooled = pool_hidden(hidden, batch["attention_mask"], self.pooling)
            if out is None:
                out = pooled.new_empty((len(texts), pooled.shape[1]))
            out[torch.as_tensor(pos, device=device)] = pooled
        if out is None:
            raise TaskError("texts is empty")
        return out.cpu()


def check_texts(texts: Any, name: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TaskError(f"{name} must be a list of strings, got {type(texts).__name__}")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TaskError(f"{name}[{bad[0]}] must be a str, got {type(texts[bad[0]]).__name__}: {texts[bad[0]]!r:.80}")
    return list(texts)


def check_pairs(data: Any, name: str) -> list[tuple[str, int]]:
    """Validates a text dataset [(text, label), ...] (labels ints >= 0)."""
    if data is None:
        return None  # type: ignore[return-value]
    if isinstance(data, str | bytes) or not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TaskError(f"{name} must be a list of (text, label) pairs, got {type(data).__name__}")
    out = []
    for i in range(len(data)):
        item = data[i]
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise TaskError(f"{name}[{i}] must be a (text, label) pair, got {item!r:.80}")
        text, label = item
        if not isinstance(text, str):
            raise TaskError(f"{name}[{i}]: text must be a str, got {type(text).__name__}")
        if isinstance(label, bool) or (not isinstance(label, int) and not (hasattr(label, "__index__"))):
            raise TaskError(f"{name}[{i}]: label must be an int class id, got {label!r}")
        if int(label) < 0:
            raise TaskError(f"{name}[{i}]: label must be >= 0, got {label!r}")
        out.append((text, int(label)))
    return out


def split_hf_model(model: nn.Module) -> tuple[nn.Module, str, list[nn.Module]]:
    """(encoder, pooling, head layers) of a supported Hugging Face classifier; refuses anything else."""
    if isinstance(model, HFEncoderClassifier):
        return model.encoder, model.pooling, flatten_modules(model.head)
    name = type(model).__name__
    config = getattr(model, "config", None)
    problem = getattr(config, "problem_type", None)
    if problem not in (None, "single_label_classification"):
        raise UnsupportedLayerError(
            f"model {name}: problem_type={problem!r} is unsupported; only single-label classification "
            "(cross-entropy over num_labels >= 2 classes) is"
        )
    if config is not None and getattr(config, "num_labels", 2) < 2:
        raise UnsupportedLayerError(
            f"model {name}: num_labels={config.num_labels} (regression) is unsupported; it needs >= 2 classes"
        )
    if name == "BertForSequenceClassification":
        pooler = model.bert.pooler
        if pooler is None or type(pooler.activation) is not nn.Tanh:
            raise UnsupportedLayerError(f"model {name}: a BERT pooler with a Tanh activation is required")
        return model.bert, "cls", [pooler.dense, nn.Tanh(), model.dropout, model.classifier]
    if name in ("RobertaForSequenceClassification", "XLMRobertaForSequenceClassification"):
        head = model.classifier
        return model.roberta, "cls", [head.dense, nn.Tanh(), head.out_proj]
    if name == "DistilBertForSequenceClassification":
        return model.distilbert, "cls", [model.pre_classifier, nn.ReLU(), model.dropout, model.classifier]
    raise UnsupportedLayerError(
        f"model {name} is unsupported: Task.from_hf knows BertForSequenceClassification (also MiniLM), "
        "RobertaForSequenceClassification, XLMRobertaForSequenceClassification, DistilBertForSequenceClassification "
        "and indexer.hf.HFEncoderClassifier(encoder, head) for any encoder with last_hidden_state"
    )


def task_kwargs_from_hf(
    model: nn.Module,
    tokenizer: Any,
    *,
    train: Any,
    test: Any,
    scope: str,
    batch_size: int,
    max_length: int,
) -> dict[str, Any]:
    """The Task fields for a Hugging Face classifier (see `Task.from_hf`), all but the last-block scope's
    `block`, which `Task.from_hf` adds (`indexer.torch_backend` imports this module, not the reverse)."""
    if isinstance(scope, str) and scope not in SCOPES:
        raise TaskError(f"scope must be one of {SCOPES} or a list of module names, got {scope!r}")
    if not isinstance(model, nn.Module):
        raise TaskError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(tokenizer) or not hasattr(tokenizer, "pad"):
        raise TaskError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    for arg, value in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TaskError(f"{arg} must be a positive int, got {value!r}")
    encoder, pooling, head = split_hf_model(model)
    model.eval()
    body = TextBody(encoder, tokenizer, pooling=pooling, batch_size=batch_size, max_length=max_length)
    return {
        "scope": scope,
        "model": model,
        "train": check_pairs(train, "train"),
        "test": check_pairs(test, "test"),
        "body": body,
        "head": nn.Sequential(*head),
        # the body sorts each of these batches by token length before cutting it into micro-batches
        "batch_size": 16 * batch_size,
        "name": type(model).__name__,
    }
