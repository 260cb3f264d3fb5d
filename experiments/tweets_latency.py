"""Explain latency on the 38k-tweet MiniLM index: LiSSA at several deflation ranks, against the exact solve.

The head (Linear 384 -> 3 on frozen mean-pooled MiniLM features, l2 = 1e-3) has 1,155 parameters; LiSSA's
automatic depth is ceil(scale / (l2 + d) ln(1 / tol)) with the scale set by the largest non-deflated eigenvalue,
so deflating more of the curvature's top eigenpairs at build time (`IndexConfig.deflation_rank`) cuts the depth,
and every LiSSA step is a pass over all 36k cached features. Same model, same features (the cache written by
`tweets_features.py`), same 20 stored test tweets for every variant; the first call (JIT) is timed separately.
Results -> experiments/results/tweets_latency.json (run after tweets_minilm.py: `make tweets`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
from tweets_features import load_tweets, model_dir
from tweets_minilm import CACHE, L2, ROOT, CachedTextBody, fresh, train_head

from api import build_index
from indexer import IndexConfig, Task
from indexer.hf import HFEncoderClassifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "experiments/results/tweets_latency.json"))
    args = ap.parse_args()
    from transformers import AutoModel, AutoTokenizer

    texts, labels, _ = load_tweets()
    feats = np.load(CACHE / "features.npy")
    perm = np.random.default_rng(0).permutation(len(texts))  # the split of tweets_minilm.py
    test_rows, train_rows = np.sort(perm[: args.n_test]), np.sort(perm[args.n_test :])
    train = [(texts[i], int(labels[i])) for i in train_rows]
    test = [(texts[i], int(labels[i])) for i in test_rows]
    head = train_head(feats[train_rows], labels[train_rows], L2)
    model = HFEncoderClassifier(AutoModel.from_pretrained(model_dir()), head, pooling="mean").eval()
    task = Task.from_hf(model, AutoTokenizer.from_pretrained(model_dir()), train=train, test=test, l2=L2)
    task = dataclasses.replace(task, body=CachedTextBody(texts, feats), head=task.head)
    ids = list(range(args.queries + 1))
    out: dict = {"n_train": len(train), "l2": L2, "queries": args.queries, "variants": []}
    for rank in args.ranks:
        t0 = time.perf_counter()
        index = build_index(
            task,
            fresh(CACHE / "runs" / f"tweets-latency-r{rank}"),
            config=IndexConfig(deflation_rank=rank),
            progress=False,
        )
        build_s = time.perf_counter() - t0
        row: dict = {"deflation_rank": rank, "build_seconds": build_s}
        for method in ("lissa", "exact"):
            t0 = time.perf_counter()
            index.explain(test_ids=[ids[0]], k=10, method=method)
            row[f"{method}_first_call_s"] = time.perf_counter() - t0
            times, diags, scores = [], [], []
            for tid in ids[1:]:
                t0 = time.perf_counter()
                [exp] = index.explain(test_ids=[tid], k=10, method=method)
                times.append(time.perf_counter() - t0)
                diags.append(exp.diagnostics or {})
                scores.append([p.score for p in exp.proponents])
            row[f"{method}_median_ms"] = 1e3 * statistics.median(times)
            row[f"{method}_scores"] = scores
            if method == "lissa":
                row["lissa_depth"] = diags[0].get("depth")
                row["lissa_residual_max"] = max(d.get("residual_max", 0.0) for d in diags)
        rel = [
            abs(a[0] - b[0]) / abs(b[0])
            for a, b in zip(row["lissa_scores"], row["exact_scores"], strict=True)
            if a and b
        ]
        row["lissa_vs_exact_top_score_rel_err_max"] = max(rel) if rel else None
        del row["lissa_scores"], row["exact_scores"]
        out["variants"].append(row)
        print(row)
        index.close()
        Path(args.out).write_text(json.dumps(out, indent=1))  # after every variant: builds take minutes
    plot(out, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out}")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["variants"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(x - 0.2, [r["lissa_median_ms"] for r in rows], 0.4, label="lissa")
    ax.bar(x + 0.2, [r["exact_median_ms"] for r in rows], 0.4, label="exact")
    ax.axhline(200, color="k", ls="--", lw=1, label="target 200 ms")
    ax.set_xticks(x, [f"rank {r['deflation_rank']}\ndepth {r['lissa_depth']:.0f}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("median explain latency (ms), k=10")
    ax.set_title(f"38k-tweet index, {out['queries']} stored test tweets")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
