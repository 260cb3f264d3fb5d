"""The label-noise job on the 38k tweets (MiniLM head) with the current `fused` default, against training loss and
cleanlab in the same run.

Reuses experiments.tweets_minilm's cached MiniLM features, split, head training and run directories
(experiments/cache/tweets/runs/tweets-latency-cached from experiments.tweets_latency for the natural labels,
tweets-flip-<seed> from experiments.tweets_minilm; `build_index` resumes a complete run as is, after checking model and config, and builds
the missing ones with the cached features as the body). Two parts:

1. Natural labels: `find_label_noise()` on the model trained on the given labels; the top suspects' texts, and how
   the suspicion rank separates tweets whose annotator confidence is below 0.5.
2. 10% uniform flips injected on top of the natural noise (head retrained on the flipped labels), `--seeds` seeds:
   AUC and the fraction of flips found after checking 5/10/20/30% of the tweets, for `fused`, every signal of
   `api.noise`, random, and cleanlab `find_label_issues` on the same out-of-sample probabilities
   (`experiments.common.cleanlab_order`; cleanlab from `--cleanlab-path`, never a project dependency).

Results -> experiments/results/tweets_noise.json + .png (`make tweets-noise`: `python -m experiments.tweets_noise`).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from api import build_index
from api.noise import compute_noise_signals, find_label_noise
from experiments import common
from indexer import IndexConfig, Task
from influence import noise as nz


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--workdir", default=str(common.TWEETS_CACHE / "runs"))
    ap.add_argument("--cleanlab-path", default="/tmp/cleanlab_target", help="extra sys.path entry holding cleanlab")
    ap.add_argument("--out", default=str(common.RESULTS / "tweets_noise.json"))
    args = ap.parse_args()
    common.add_sys_path(args.cleanlab_path)

    work = Path(args.workdir)
    texts, labels, confidence = common.load_tweets()
    feats = common.tweet_features()
    train_rows, _, train, test = common.split_tweets(
        texts, labels, args.n_test
    )  # the split of experiments.tweets_minilm
    ytrain = labels[train_rows]
    encoder, tokenizer = common.load_minilm()
    body = common.CachedTextBody(texts, feats)
    res: dict[str, Any] = {
        "l2": common.TWEETS_L2,
        "n_train": len(train),
        "machine": f"{os.cpu_count()} CPU cores (shared)",
    }

    def task_for(y: np.ndarray, with_test: bool) -> Task:
        head = common.train_head(feats[train_rows], y, common.TWEETS_L2)
        return common.minilm_task(
            encoder, tokenizer, head, common.relabelled(train, y), test if with_test else None, body=body
        )

    # ---- 1. natural labels
    t0 = time.perf_counter()
    natural = work / "tweets-latency-cached"
    index = build_index(task_for(ytrain, True), natural, config=IndexConfig(cache_queries=True), progress=False)
    res["natural_build_or_resume_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    suspects = find_label_noise(index.engine, progress=False)
    t_job = time.perf_counter() - t0
    index.close()
    res["natural"] = {"method": "fused", "job_seconds": t_job} | common.natural_noise_report(
        suspects, train, confidence[train_rows]
    )
    print("natural", {k: v for k, v in res["natural"].items() if k != "top_suspects"})
    common.print_suspects(res["natural"]["top_suspects"])

    # ---- 2. injected 10% uniform flips
    runs = []
    for seed in range(args.seeds):
        noisy, is_flip = common.flip_labels(ytrain, n_classes=3, seed=seed)
        t0 = time.perf_counter()
        index = build_index(task_for(noisy, False), work / f"tweets-flip-{seed}", progress=False)
        t_build = time.perf_counter() - t0
        if not np.array_equal(index.run.train.labels, noisy):
            raise SystemExit(f"run tweets-flip-{seed} holds other labels than flip_labels(seed={seed})")
        t0 = time.perf_counter()
        find_label_noise(index.engine, progress=False)
        t_job = time.perf_counter() - t0
        sig = compute_noise_signals(index.engine, progress=False)  # reuses the job's cached intermediate arrays
        scores = {m: sig.score(m) for m in (*sig.signals, "fused")}
        orders = {m: nz.rank_order(s, sig.ids) for m, s in scores.items()}
        orders["random"] = np.random.default_rng(seed).permutation(len(ytrain))
        scores["random"] = common.order_to_score(orders["random"])
        orders["cleanlab"], cl_info = common.cleanlab_order(sig.labels, sig.oos_probs)
        scores["cleanlab"] = common.order_to_score(orders["cleanlab"])
        metrics = common.detection_metrics(scores, orders, is_flip)
        n_fix = round(0.10 * len(ytrain))
        found = orders["fused"][:n_fix][is_flip[orders["fused"][:n_fix]]]
        runs.append(
            {
                "seed": seed,
                "n_flipped": int(is_flip.sum()),
                "build_or_resume_seconds": t_build,
                "job_seconds": t_job,
                "train_accuracy_noisy": float(index.manifest.extra["train_accuracy"]),
                "suggested_equals_original_on_found": float(np.mean(sig.suggested[found] == ytrain[found])),
                "self_influence_solver": sig.info.get("self-influence"),
                "cleanlab": cl_info,
                "metrics": metrics,
            }
        )
        index.close()
        print("seed", seed, {m: (round(v["auc"], 3), round(v["found@10"], 3)) for m, v in metrics.items()})
    res["injected_flips"] = {
        "fraction": 0.10,
        "kind": "uniform",
        "runs": runs,
        "summary": common.summarise_metrics(runs, ddof=0),
    } | common.wins_every_seed(runs)
    common.save_results(res, Path(args.out), plot)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = res["injected_flips"]["summary"]
    xs = [round(c * 100) for c in common.CHECKED]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in ("fused", "loss", "cleanlab", "oos-loss", "self-influence", "confident-learning", "random"):
        if m in summ:
            ax.errorbar(
                xs,
                [summ[m][f"found@{x}"]["mean"] for x in xs],
                yerr=[summ[m][f"found@{x}"]["std"] for x in xs],
                marker="o",
                capsize=2,
                label=f"{m} (AUC {summ[m]['auc']['mean']:.3f})",
            )
    ax.set_xlabel("% of training tweets checked")
    ax.set_ylabel("fraction of injected flips found")
    n = len(res["injected_flips"]["runs"])
    ax.set_title(f"tweets (MiniLM head), 10% uniform flips on natural noise, {n} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
