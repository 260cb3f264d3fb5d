"""Offline data loaders for the experiments.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (the four idx ``.gz`` files under
``/usr/share/datasets/fashion-mnist``): ``apt-get install -y dataset-fashion-mnist``.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

FASHION_DIRS = (
    os.environ.get("FASHION_MNIST_DIR", ""),
    "/usr/share/datasets/fashion-mnist",
)
FASHION_CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")
# a fixed confusable class per class, for the class-dependent noise variant
FASHION_CONFUSABLE = {0: 6, 6: 0, 2: 4, 4: 2, 5: 7, 7: 9, 9: 5, 1: 3, 3: 1, 8: 0}


class DatasetMissingError(FileNotFoundError):
    """A data package the experiment needs is not installed."""


def _fashion_dir() -> Path:
    for d in FASHION_DIRS:
        if d and (Path(d) / "train-images-idx3-ubyte.gz").exists():
            return Path(d)
    raise DatasetMissingError(
        "Fashion-MNIST not found (looked in "
        + ", ".join(d for d in FASHION_DIRS if d)
        + "): install the Debian package with `apt-get install -y dataset-fashion-mnist` "
        "(or set FASHION_MNIST_DIR to a folder holding the four idx .gz files)"
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(
    n_train: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train [n, 784] float32 in [0, 1], y_train int64, x_test [10000, 784], y_test); n_train subsamples
    the 60k training images (seeded, stratification not needed at these sizes)."""
    d = _fashion_dir()
    xtr = _read_idx(d / "train-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
    ytr = _read_idx(d / "train-labels-idx1-ubyte.gz").astype(np.int64)
    xte = _read_idx(d / "t10k-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
    yte = _read_idx(d / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    if n_train is not None and n_train < len(xtr):
        keep = np.sort(np.random.default_rng(seed).choice(len(xtr), size=n_train, replace=False))
        xtr, ytr = xtr[keep], ytr[keep]
    return xtr, ytr, xte, yte
