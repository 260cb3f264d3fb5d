"""The embedded example tasks: scikit-learn's digits (bundled, no download), a model trained in seconds on them,
a few training labels flipped.

This module is not part of the build: it is the one place that makes small real Tasks, for

- the CLI: `influence demo` builds and explains `digits_task()`, and `digits_task` is a valid TASK for
  `influence index indexer.demo:digits_task --out runs/x`;
- the tests' fixtures (`tests/conftest.py`: the digits MLP and logistic-regression Tasks and their runs);
- the experiments (the digits data, label flips and the training procedure they retrain with).

Sections: the data (`load_digits_split`, `flip_labels`, `digit_preview`), the training procedure
(`make_mlp`, `train_classifier`: full-batch Adam then L-BFGS on the L2-regularised mean cross-entropy), and the
Tasks (`digits_task`, `digits_logreg_task`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from .task import Task

__all__ = [
    "SHADES",
    "digit_preview",
    "digits_logreg_task",
    "digits_task",
    "flip_labels",
    "load_digits_split",
    "make_mlp",
    "train_classifier",
]

SHADES = " .:-=+*#%@"
"""Characters of increasing ink, one per intensity decile (digit previews)."""


# -------------------------------------------------------------------------------------------------- data


def digit_preview(x: torch.Tensor) -> str:
    """An 8x8 digit as 8 rows of shade characters joined by '/' (intensities in [0, 1])."""
    a = np.clip(np.asarray(x, np.float64).reshape(8, 8), 0, 1)
    idx = np.minimum((a * len(SHADES)).astype(int), len(SHADES) - 1)
    return "/".join("".join(SHADES[i] for i in row) for row in idx)


def load_digits_split(
    seed: int = 0, test_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits scaled to [0, 1], split into train/test with a fixed permutation."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = round(test_fraction * len(x))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def flip_labels(y: np.ndarray, n_flips: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flips `n_flips` labels uniformly to another class; returns (noisy labels, flipped positions)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(y), size=n_flips, replace=False)
    noisy = y.copy()
    noisy[idx] = (y[idx] + rng.integers(1, n_classes, size=n_flips)) % n_classes
    return noisy, np.sort(idx)


# ---------------------------------------------------------------------------------------------- training
def make_mlp(n_in: int = 64, hidden: int = 32, n_classes: int = 10, seed: int = 0) -> nn.Sequential:
    """The demo MLP n_in -> hidden (ReLU) -> n_classes, initialised from `seed`."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    l2: float,
    epochs: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
    checkpoints: list[tuple[dict[str, torch.Tensor], float]] | None = None,
) -> nn.Module:
    """Full-batch Adam on mean cross-entropy + (l2/2)||theta||^2 (weights and biases), then L-BFGS polish.

    If `checkpoints` is a list, (state_dict, lr) snapshots are appended to it 10 times along the Adam phase
    (TracIn, `Task(checkpoints=...)`).
    """
    torch.manual_seed(seed)
    params = list(model.parameters())
    # These models are tiny: one thread is fastest, and torch's thread pool next to JAX's on a busy 2-core
    # machine made training 20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(model, params, x, y, l2=l2, epochs=epochs, lr=lr, checkpoints=checkpoints)
    finally:
        torch.set_num_threads(threads)


def _fit(
    model: nn.Module,
    params: list,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    l2: float,
    epochs: int,
    lr: float,
    checkpoints: list[tuple[dict[str, torch.Tensor], float]] | None = None,
) -> nn.Module:

    def objective() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(x), y)
        return loss + 0.5 * l2 * sum((p**2).sum() for p in params)

    opt = torch.optim.Adam(params, lr=lr)
    every = max(1, epochs // 10)
    for epoch in range(epochs):
        opt.zero_grad()
        objective().backward()
        opt.step()
        if checkpoints is not None and (epoch + 1) % every == 0:
            checkpoints.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, lr))
    lbfgs = torch.optim.LBFGS(params, lr=1, max_iter=200, tolerance_grad=1e-7, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    lbfgs.step(closure)
    return model.eval()


# ------------------------------------------------------------------------------------------------- tasks
def digits_task(n_flips: int = 30, seed: int = 0, l2: float = 1e-3, hidden: int = 32) -> Task:
    """Digits MLP (64-hidden-10) trained with `n_flips` flipped training labels; the whole MLP is the head."""
    xtr, ytr, xte, yte = load_digits_split(seed)
    ytr_noisy, _ = flip_labels(ytr, n_flips, 10, seed)
    model = make_mlp(hidden=hidden, seed=seed) if hidden else nn.Sequential(nn.Linear(64, 10))
    train_classifier(model, torch.from_numpy(xtr), torch.from_numpy(ytr_noisy), l2=l2, seed=seed)
    return Task(
        model=model,
        train=TensorDataset(torch.from_numpy(xtr), torch.from_numpy(ytr_noisy)),
        test=TensorDataset(torch.from_numpy(xte), torch.from_numpy(yte)),
        l2=l2,
        preview=digit_preview,
        name="digits-mlp" if hidden else "digits-logreg",
    )


def digits_logreg_task(n_flips: int = 0, seed: int = 0, l2: float = 1e-3) -> Task:
    """L2-regularised multinomial logistic regression on digits (convex: influence has a closed form)."""
    return digits_task(n_flips=n_flips, seed=seed, l2=l2, hidden=0)
