"""Explain latency on the 38k-tweet MiniLM index (head scope): LiSSA with the build's query cache, LiSSA solved
at query time, and the exact solve, on one index, in one run.

The head (Linear 384 -> 3 on frozen mean-pooled MiniLM features, l2 = 1e-3) has 1,155 parameters. Solved at
query time, deflated LiSSA (rank 64, the default) runs `depth` Gauss-Newton products over all 36,158 cached
training features per query. With `IndexConfig(cache_queries=True)` the build's "queries" stage solves the same
recursion once for all 2,000 stored test tweets (`indexer.queries`) and `explain(test_ids=...)` reads the stored
vector. Measured: first call (JIT, cache load) and the median of `--queries` warm calls on distinct stored test
tweets, k = 10, for each path; the agreement of the cached answers with the un-cached LiSSA answers (same
queries: top-10 ids and scores, query vectors) and with the dense float64 solve (all stored test tweets).
Results -> experiments/results/tweets_latency.json + .png (`python -m experiments.tweets_latency` from the repository
root, after experiments.tweets_minilm: `make tweets`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

import numpy as np

from api import build_index
from api.scorers import scorer_for
from experiments import common
from indexer import IndexConfig


def relative_errors(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


def agreement(cached: list, solved: list) -> dict:
    """Top-10 proponent / opponent ids and scores of the cached answers against the un-cached ones."""
    same_ids, rel = [], []
    for a, b in zip(cached, solved, strict=True):
        for ga, gb in ((a.proponents, b.proponents), (a.opponents, b.opponents)):
            same_ids.append([p.example_id for p in ga] == [p.example_id for p in gb])
            sb = {p.example_id: p.score for p in gb}
            rel += [abs(p.score - sb[p.example_id]) / abs(sb[p.example_id]) for p in ga if p.example_id in sb]
    return {"top10_lists_identical": float(np.mean(same_ids)), "score_rel_diff_max": float(max(rel))}


def data_operator_block(index, solutions: np.ndarray, targets: np.ndarray, m: int) -> dict:
    """The cache stage's cost for a head without a stored eigendecomposition: one block of m stored test rows
    solved together with the training-set product (operator "data"), against the dense-operator cache."""
    engine = index.engine
    # the training-set operator (C + l2 I) v over all cached features, deflated, with the run's damping: the
    # cache stage's operator "data" (`indexer.queries.lissa_operator(dense=False)` builds the same product)
    curvature = engine.curvature
    rows = np.arange(m)
    g = engine.gradients(np.asarray(index.run.test.features[rows]), targets[rows])
    config = engine.lissa_config
    curvature.run_iterative(g, lissa=dataclasses.replace(config, depth=1))  # compile for this block shape, untimed
    t0 = time.perf_counter()
    result = curvature.run_iterative(g, lissa=config)
    seconds = time.perf_counter() - t0
    return {
        "rows": m,
        "seconds": seconds,
        "seconds_per_query": seconds / m,
        "depth": result.depth,
        "rel_err_vs_dense_operator_cache_max": float(relative_errors(result.x, solutions[rows]).max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument(
        "--data-block", type=int, default=64, help="stored test rows solved with the training-set operator (0: skip)"
    )
    ap.add_argument("--out", default=str(common.RESULTS / "tweets_latency.json"))
    args = ap.parse_args()

    texts, labels, _ = common.load_tweets()
    feats = common.tweet_features()
    train_rows, _, train, test = common.split_tweets(
        texts, labels, args.n_test
    )  # the split of experiments.tweets_minilm
    head = common.train_head(feats[train_rows], labels[train_rows], common.TWEETS_L2)
    encoder, tokenizer = common.load_minilm()
    task = common.minilm_task(encoder, tokenizer, head, train, test, body=common.CachedTextBody(texts, feats))
    first, ids = 0, list(range(1, args.queries + 1))
    out: dict = {
        "n_train": len(train),
        "n_test": len(test),
        "l2": common.TWEETS_L2,
        "queries": args.queries,
        "k": 10,
        "machine": f"{os.cpu_count()} CPU cores (shared)",
        "load_average_start": os.getloadavg()[0],
    }
    config = IndexConfig(cache_queries=True)
    t0 = time.perf_counter()
    index = build_index(
        task, common.fresh(common.TWEETS_CACHE / "runs" / "tweets-latency-cached"), config=config, progress=False
    )
    out["build_seconds"] = time.perf_counter() - t0
    out["deflation_rank"] = config.deflation_rank
    out["query_cache"] = index.manifest.extra["query_cache"]
    print("build", out["build_seconds"], out["query_cache"])

    paths: dict = {}
    answers: dict = {}
    for name, method, use_cache in (
        ("lissa_cached", "lissa", True),
        ("lissa_solved", "lissa", False),
        ("exact", "exact", True),
    ):
        index.engine.use_query_cache = use_cache
        first_s, _, times, exps = common.explain_latencies(index, [first, *ids], method)
        diag = exps[0].diagnostics or {}
        paths[name] = {
            "first_call_s": first_s,
            "median_ms": 1e3 * statistics.median(times),
            "p90_ms": 1e3 * float(np.percentile(times, 90)),
            "max_ms": 1e3 * max(times),
            "diagnostics_of_first_warm_query": diag,
        }
        answers[name] = exps
        print(name, paths[name])
    out["paths"] = paths
    out["load_average_end"] = os.getloadavg()[0]
    out["speedup_median_cached_vs_solved"] = paths["lissa_solved"]["median_ms"] / paths["lissa_cached"]["median_ms"]
    out["cached_vs_solved_answers"] = agreement(answers["lissa_cached"], answers["lissa_solved"])
    out["cached_vs_exact_answers"] = agreement(answers["lissa_cached"], answers["exact"])

    # query vectors: cached against solved (the timed queries) and against the dense float64 solve (all tests)
    engine, lissa = index.engine, scorer_for(index.engine, "lissa")
    queries = engine.prepare(ids, None, None)
    rows = queries.test_rows
    engine.use_query_cache = True
    cached, _ = lissa.query_vectors(queries)
    engine.use_query_cache = False
    solved, _ = lissa.query_vectors(queries)
    engine.use_query_cache = True
    solutions, targets, residuals = engine.query_cache
    all_rows = np.arange(len(index.test_ids))
    g = engine.gradients(np.asarray(index.run.test.features), targets).astype(np.float64)
    exact = engine.eigen_solver.solve(g, damping=engine.damping)
    out["vectors"] = {
        "cached_vs_solved_rel_err_max": float(relative_errors(cached, solved).max()),
        "cached_vs_dense_solve_rel_err_max_all_tests": float(relative_errors(solutions[all_rows], exact).max()),
        "cached_vs_dense_solve_rel_err_median_all_tests": float(np.median(relative_errors(solutions, exact))),
        "solved_vs_dense_solve_rel_err_max": float(relative_errors(solved, exact[rows]).max()),
        "cached_residual_max": float(residuals.max()),
        "lissa_tol": engine.lissa_config.tol,
    }
    print(out["vectors"], out["cached_vs_solved_answers"])
    if args.data_block:
        out["data_operator_block"] = data_operator_block(index, solutions, targets, args.data_block)
        print(out["data_operator_block"])
    index.close()
    common.save_results(out, Path(args.out), plot)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["lissa_cached", "lissa_solved", "exact"]
    labels = ["LiSSA\n(query cache)", "LiSSA\n(solved per query)", "exact\n(eigendecomposition)"]
    paths = out["paths"]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.bar(x - 0.2, [paths[n]["median_ms"] for n in names], 0.4, label=f"median of {out['queries']} warm calls")
    ax.bar(x + 0.2, [1e3 * paths[n]["first_call_s"] for n in names], 0.4, label="first call (JIT)", alpha=0.6)
    ax.axhline(200, color="k", ls="--", lw=1, label="target 200 ms")
    ax.set_xticks(x, labels)
    ax.set_yscale("log")
    ax.set_ylabel("explain latency (ms), k = 10")
    ax.set_title(f"{out['n_train']:,}-tweet index, stored test tweets, 2 shared CPU cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
