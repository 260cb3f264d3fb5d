"""Influence through the whole model (issue 15): a Fashion-MNIST CNN, ours scope="model" against scope="head".

Usage: .venv/bin/python -m experiments.cnn_model_scope [--quick]   (from the repository root)

Model: Conv(1, 8, 5)-ReLU-MaxPool2-Conv(8, 16, 5)-ReLU-MaxPool2-Flatten-Linear(256, H)-ReLU-Linear(H, 10), trained with
Adam (lr 1e-3, batches of 128) on seeded Fashion-MNIST training images (`fidelity_common.fmnist_arrays`) with the
explicit L2 term (l2 / 2) ||theta||^2 the Task declares. LDS (Park et al. 2023): seeded half subsets of the training
set (`fidelity_common.half_masks`), the CNN retrained from the same initialisation with the same procedure on each,
the correct-class margin z_y - max_{c != y} z_c of seeded test queries after each retrain; the scores of every method
at the queries' TRUE label (`pairwise_scores(..., targets=labels)`); LDS per query = Spearman over the subsets between
the summed scores of the subset and the retrained margin; reported mean +- standard error over the queries.

Ours: `build_index` of the same trained model with Task(scope="model") (every conv and linear layer, LoGra projection
per layer, projected Gauss-Newton) and with the default head scope (the trailing layers that translate to JAX), build
time and the scoring time of the queries for each method, peak RSS of the process. Peers (kronfluence, TRAK) are not
run here (not installed in this session's environment): the JSON says so.

Writes experiments/results/cnn_model_scope.json (--quick: a smaller smoke run, cnn_model_scope_quick.json).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from experiments import fidelity_common as fc

FULL = {"n_train": 5000, "hidden": 128, "epochs": 8, "l2": 1e-3, "n_subsets": 50, "n_queries": 100}
QUICK = {"n_train": 1000, "hidden": 32, "epochs": 4, "l2": 1e-3, "n_subsets": 12, "n_queries": 30}


def make_cnn(hidden: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, l2: float, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), 128):
            idx = order[s : s + 128]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss = loss + 0.5 * l2 * sum((p**2).sum() for p in model.parameters())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        z = model(x).double()
    true = z[torch.arange(len(y)), y]
    z[torch.arange(len(y)), y] = -torch.inf
    return (true - z.max(1).values).numpy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    c = QUICK if args.quick else FULL
    torch.set_num_threads(2)
    xtr, ytr, xte, yte = fc.fmnist_arrays(c["n_train"])
    X, Y = torch.as_tensor(xtr).reshape(-1, 1, 28, 28), torch.as_tensor(ytr)
    Xq_all, Yq_all = torch.as_tensor(xte).reshape(-1, 1, 28, 28), torch.as_tensor(yte)
    rng = np.random.default_rng(0)
    q = np.sort(rng.choice(len(Xq_all), size=c["n_queries"], replace=False))
    Xq, Yq = Xq_all[q], Yq_all[q]
    init = make_cnn(c["hidden"], 0).state_dict()
    model = make_cnn(c["hidden"], 0)
    t0 = time.perf_counter()
    train(model, X, Y, epochs=c["epochs"], l2=c["l2"], seed=0)
    train_s = time.perf_counter() - t0
    acc = float((model(Xq_all).argmax(1) == Yq_all).float().mean())
    masks = fc.half_masks(c["n_subsets"], len(X), np.random.default_rng(1))
    truth = np.empty((len(q), len(masks)))
    t0 = time.perf_counter()
    for k, mask in enumerate(masks):
        sub = make_cnn(c["hidden"], 0)
        sub.load_state_dict(init)
        idx = torch.as_tensor(np.flatnonzero(mask))
        truth[:, k] = margins(train(sub, X[idx], Y[idx], epochs=c["epochs"], l2=c["l2"], seed=0), Xq, Yq)
    retrain_s = time.perf_counter() - t0
    print(f"trained (acc {acc:.3f}, {train_s:.1f}s); {len(masks)} retrains in {retrain_s:.0f}s", flush=True)

    from api import build_index
    from indexer import Task

    train_ds = list(zip(X, Y.tolist(), strict=True))
    test_ds = list(zip(Xq, Yq.tolist(), strict=True))
    results = {}
    tmp = Path(tempfile.mkdtemp(prefix="cnn_model_scope_"))
    try:
        for scope in ("model", "head"):
            task = Task(model=model, train=train_ds, test=test_ds, l2=c["l2"], scope=scope, batch_size=128)
            t0 = time.perf_counter()
            index = build_index(task, tmp / scope, progress=False)
            build_s = time.perf_counter() - t0
            row = {"build_s": build_s, "methods": {}}
            if scope == "model":
                row["model_record"] = {k: v for k, v in index.run.extra["model"].items() if k != "layers"}
            for method in ("exact", "lissa", "grad-dot", "grad-cos", "representer"):
                try:
                    t0 = time.perf_counter()
                    s = index.pairwise_scores(list(range(len(q))), method=method, targets=Yq.numpy())
                    score_s = time.perf_counter() - t0
                except ValueError as err:
                    row["methods"][method] = {"skipped": str(err)[:200]}
                    continue
                lds = fc.lds_per_point(s, masks, truth)
                row["methods"][method] = {
                    "lds": float(np.nanmean(lds)),
                    "lds_se": float(np.nanstd(lds, ddof=1) / np.sqrt(np.isfinite(lds).sum())),
                    "score_s": score_s,
                }
                print(scope, method, row["methods"][method], flush=True)
            index.close()
            results[scope] = row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {
        "config": c,
        "n_params": sum(p.numel() for p in model.parameters()),
        "test_accuracy": acc,
        "train_s": train_s,
        "retrain_s": retrain_s,
        "ours": results,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peers": "not run: kronfluence / TRAK are not installed in this session's environment (.peers absent)",
        "machine": "2 shared CPU cores, torch threads 2, other developers' jobs running",
    }
    path = fc.write_json("cnn_model_scope_quick.json" if args.quick else "cnn_model_scope.json", out)
    print(path)


if __name__ == "__main__":
    main()
