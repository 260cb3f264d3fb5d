"""Does `explain` on a projected head return the exact top-10? Raw projected gradients against the whitened space
(issue 14 item 3).

Model: the Fashion-MNIST MLP 784-128-10 of issue 14 (whole MLP as the head: 101,770 parameters, so the default
build projects head gradients to 1,024 dimensions), trained on N seeded training images (default 60,000; Adam
lr 1e-3, batch 256, 15 epochs, l2 = 1e-3), indexed by `build_index` with the default IndexConfig. For 50 seeded
test queries at their predicted class, the exact all-row top-10 proponents and opponents of the default method
(`lissa`) and of `grad-dot` are taken from dense scores computed chunk by chunk (`Scorer.train_vectors`); `explain`'s
top-10 is compared with them at candidate budgets of 0.5%, 1% and 5% of the training set per sign, taking the
candidates from the raw projected space ("grad") and from the whitened one ("grad-whitened"). Reported: recall@10
over both signs (mean over queries), explain seconds per query, build time per stage.

    python -m experiments.projected_recall [--n-train 60000] [--queries 50]     (needs `make data`)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from experiments.common import CACHE, RESULTS, fresh, load_fashion_mnist, make_fmnist_mlp, save_results, train_minibatch

L2 = 1e-3
BUDGETS = (0.005, 0.01, 0.05)
METHODS = ("lissa", "grad-dot")


def exact_top(index, method: str, test_ids: list[int], k: int, chunk: int = 2048):
    """(top-k ids by score, bottom-k ids) per query from dense scores, computed chunk by chunk."""
    from api.scorers import scorer_for

    engine = index.engine
    scorer = scorer_for(engine, method)
    q, _ = scorer.query_vectors(engine.prepare(test_ids, None, None))
    n = len(index.train_ids)
    scores = np.empty((len(test_ids), n), np.float64)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        scores[:, sl] = q @ np.asarray(scorer.train_vectors(sl), np.float64).T
    ids = np.asarray(index.train_ids)
    top = [ids[np.argsort(-row, kind="stable")[:k]] for row in scores]
    bottom = [ids[np.argsort(row, kind="stable")[:k]] for row in scores]
    return top, bottom


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=60_000)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--out", default=str(RESULTS / "projected_recall.json"))
    args = ap.parse_args()
    from api import build_index
    from indexer import Task

    torch.set_num_threads(2)
    xtr, ytr, xte, yte = load_fashion_mnist(args.n_train, seed=0)
    t0 = time.perf_counter()
    model = train_minibatch(make_fmnist_mlp(128, 0), torch.tensor(xtr), torch.tensor(ytr), l2=L2, epochs=15, seed=0)
    train_s = time.perf_counter() - t0
    task = Task(
        model=model,
        train=torch.utils.data.TensorDataset(torch.tensor(xtr), torch.tensor(ytr)),
        test=torch.utils.data.TensorDataset(torch.tensor(xte), torch.tensor(yte)),
        l2=L2,
    )
    run = fresh(CACHE / f"projected_recall_{args.n_train}")
    t0 = time.perf_counter()
    index = build_index(task, run, progress=True)
    build_s = time.perf_counter() - t0
    test_ids = sorted(np.random.default_rng(0).choice(len(xte), size=args.queries, replace=False).tolist())
    n = len(index.train_ids)
    res = {
        "model": f"Fashion-MNIST MLP 784-128-10, {n} training images, l2 = 1e-3, Adam 15 epochs",
        "n_train": n,
        "n_params": index.run.n_params,
        "projection": {"dim": index.run.projection.dim, "seed": index.run.projection.seed},
        "train_seconds": train_s,
        "build_seconds": build_s,
        "build_stage_seconds": index.manifest.extra.get("stage_seconds"),
        "queries": len(test_ids),
        "k": 10,
        "methods": {},
    }
    for method in METHODS:
        t0 = time.perf_counter()
        top, bottom = exact_top(index, method, test_ids, 10)
        out = {"exact_seconds": time.perf_counter() - t0, "budgets": {}}
        for budget in BUDGETS:
            cands = max(1, round(budget * n))
            index.engine.min_candidates = cands
            row = {"candidates_per_sign": cands}
            for whitened in (False, True):
                index.engine.use_whitened_space = whitened
                index.explain(test_ids=test_ids[:1], k=10, method=method)  # compile, untimed
                t0 = time.perf_counter()
                exps = index.explain(test_ids=test_ids, k=10, method=method)
                seconds = (time.perf_counter() - t0) / len(test_ids)
                found = []
                for exp, t, b in zip(exps, top, bottom, strict=True):
                    found.append(len(set(t.tolist()) & {p.example_id for p in exp.proponents}) / 10)
                    found.append(len(set(b.tolist()) & {p.example_id for p in exp.opponents}) / 10)
                name = "whitened" if whitened else "raw"
                row[name] = {"recall_at_10": float(np.mean(found)), "seconds_per_query": seconds}
                print(
                    f"{method:8s} budget {budget:.3f} ({cands} per sign) {name:8s} recall@10 {np.mean(found):.3f}  {seconds:.3f} s/query",
                    flush=True,
                )
            out["budgets"][f"{budget:g}"] = row
        res["methods"][method] = out
    index.close()
    save_results(res, Path(args.out), plot)


def plot(res, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(res["methods"]), figsize=(8, 3.2), sharey=True)
    for ax, (method, out) in zip(np.atleast_1d(axes), res["methods"].items(), strict=True):
        budgets = list(out["budgets"])
        for name in ("raw", "whitened"):
            ax.plot(
                [float(b) * 100 for b in budgets],
                [out["budgets"][b][name]["recall_at_10"] for b in budgets],
                "o-",
                label=name,
            )
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("candidates per sign (% of training set)")
        ax.set_xscale("log")
        ax.axhline(0.95, color="gray", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("recall@10 of the exact top-10")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle(
        f"Fashion-MNIST MLP, n = {res['n_train']:,}, p = {res['n_params']:,} projected to {res['projection']['dim']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
