"""Explain latency per method on built digits indexes (MLP head and logistic regression).

Builds two fresh run directories under experiments/cache/, then times `Index.explain` for one stored
test example at a time: the first call (including JIT compilation) separately, then the median and p90 of
the next queries. Writes experiments/results/explain_latency.json and .png.

    make bench     # or, from the repository root: .venv/bin/python -m experiments.explain_latency [--queries 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np

from api import METHODS, build_index, open_index
from experiments import common
from indexer.demo import digits_logreg_task, digits_task


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """This machine's float32 matmul rate (GFLOP/s), measured in the same run: the compute ceiling."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    return common.matmul_gflop_s(a, a, repeats=repeats, reduce=np.median)


def time_index(path: Path, queries: int) -> dict:
    index = open_index(path)
    test_ids = [int(v) for v in index.test_ids[: queries + 1]]
    out = {}
    for method in METHODS:
        first_s, first, times, _ = common.explain_latencies(index, test_ids, method)
        out[method] = {
            "first_call_s": first_s,
            "median_s": float(np.median(times)),
            "p90_s": float(np.percentile(times, 90)),
            "queries": len(times),
            "diagnostics": first.diagnostics,
        }
        print(f"  {method:12s} median {1e3 * out[method]['median_s']:8.1f} ms   first call {first_s:6.2f} s")
    info = index.info()
    index.close()
    return {"n_train": len(index.train_ids), "n_params": info["head"]["n_params"], "methods": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queries", type=int, default=20)
    args = parser.parse_args()
    results = {"machine": {"platform": platform.platform(), "matmul_gflops_f32": matmul_gflops()}, "runs": {}}
    for name, make in (("digits-mlp", digits_task), ("digits-logreg", digits_logreg_task)):
        path = common.CACHE / f"latency-{name}"
        shutil.rmtree(path, ignore_errors=True)  # a fresh build: the model is retrained each run
        task = make()
        t0 = time.perf_counter()
        build_index(task, path, progress=False).close()
        build_s = time.perf_counter() - t0
        print(f"{name}: built in {build_s:.1f} s")
        results["runs"][name] = time_index(path, args.queries) | {"build_s": build_s}
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / "explain_latency.json").write_text(json.dumps(results, indent=2))
    plot(results, common.RESULTS / "explain_latency.png")
    print(f"wrote {common.RESULTS / 'explain_latency.json'}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(results["runs"])
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        med = [1e3 * results["runs"][name]["methods"][m]["median_s"] for m in METHODS]
        ax.bar(np.arange(len(METHODS)) + j * width, med, width, label=name)
    ax.set_xticks(np.arange(len(METHODS)) + width * (len(names) - 1) / 2, METHODS)
    ax.set_ylabel("median explain latency (ms)")
    ax.set_yscale("log")
    ax.axhline(1000, color="gray", ls="--", lw=0.8)
    ax.legend()
    ax.set_title("explain(test_ids=[i], k=10), one query, 2-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
