"""Small real Tasks of the three input kinds (images, tabular rows, texts) for the tests of inputs and previews.

Each trains in about a second on bundled data (scikit-learn's digits and wine, a synthetic text corpus with a
locally trained tokenizer): nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from indexer import Task
from indexer.demo import load_digits_split, train_classifier

WINE_FEATURES = (
    "alcohol",
    "malic_acid",
    "ash",
    "alcalinity_of_ash",
    "magnesium",
    "total_phenols",
    "flavanoids",
    "nonflavanoid_phenols",
    "proanthocyanins",
    "color_intensity",
    "hue",
    "od280/od315_of_diluted_wines",
    "proline",
)


def digits_cnn_task(n_train: int = 300, n_test: int = 40, **task_kwargs) -> Task:
    """A digits CNN: images [1, 8, 8] through Conv2d + ReLU (the body) and Flatten + Linear (the head)."""
    xtr, ytr, xte, yte = load_digits_split(0)
    xtr, xte = xtr[:n_train].reshape(-1, 1, 8, 8), xte[:n_test].reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    train_classifier(model, torch.from_numpy(xtr), torch.from_numpy(ytr[:n_train]), l2=1e-3, epochs=100)
    return Task(
        model=model,
        train=TensorDataset(torch.from_numpy(xtr), torch.from_numpy(ytr[:n_train])),
        test=TensorDataset(torch.from_numpy(xte), torch.from_numpy(yte[:n_test])),
        l2=1e-3,
        name="digits-cnn",
        **task_kwargs,
    )


def wine_task(**task_kwargs) -> Task:
    """A wine MLP over 13 standardised tabular features (3 classes)."""
    from sklearn.datasets import load_wine

    data = load_wine()
    x = ((data.data - data.data.mean(0)) / data.data.std(0)).astype(np.float32)
    y = data.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    test, train = perm[:30], perm[30:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 3))
    train_classifier(model, torch.from_numpy(x[train]), torch.from_numpy(y[train]), l2=1e-2, epochs=100)
    return Task(
        model=model,
        train=TensorDataset(torch.from_numpy(x[train]), torch.from_numpy(y[train])),
        test=TensorDataset(torch.from_numpy(x[test]), torch.from_numpy(y[test])),
        l2=1e-2,
        name="wine-mlp",
        **task_kwargs,
    )


def text_task(n_train: int = 60, n_test: int = 10, **task_kwargs) -> Task:
    """A tiny BERT (untrained, built from a config) over the synthetic sentiment corpus of test_hf_task."""
    from test_hf_task import make_tokenizer, sentiment_corpus, tiny_model

    tokenizer = make_tokenizer()
    model = tiny_model("bert", len(tokenizer)).eval()
    return Task.from_hf(
        model,
        tokenizer,
        train=sentiment_corpus(n_train, seed=3),
        test=sentiment_corpus(n_test, seed=4),
        l2=1e-3,
        **task_kwargs,
    )
