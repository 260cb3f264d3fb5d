"""The label-noise job on the 38k tweets (MiniLM head) with the current `fused` default, against training loss and
cleanlab in the same run.

Reuses `tweets_minilm.py`'s cached MiniLM features, split, head training and run directories
(experiments/cache/tweets/runs/tweets-latency-cached from `tweets_latency.py` for the natural labels, tweets-flip-<seed>
from `tweets_minilm.py`; `build_index` resumes a complete run as is, after checking model and config, and builds
the missing ones with the cached features as the body). Two parts:

1. Natural labels: `find_label_noise()` on the model trained on the given labels; the top suspects' texts, and how
   the suspicion rank separates tweets whose annotator confidence is below 0.5.
2. 10% uniform flips injected on top of the natural noise (head retrained on the flipped labels), `--seeds` seeds:
   AUC and the fraction of flips found after checking 5/10/20/30% of the tweets, for `fused`, every signal of
   `api.noise`, random, and cleanlab `find_label_issues` on the same out-of-sample probabilities
   (`experiments/label_noise.py`'s `cleanlab_order`; cleanlab from `--cleanlab-path`, never a project dependency).

Results -> experiments/results/tweets_noise.json + .png (`make tweets-noise`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from label_noise import CHECKED, cleanlab_order, order_to_score
from tweets_features import load_tweets, model_dir
from tweets_minilm import CACHE, L2, NAMES, ROOT, CachedTextBody, flip_labels, train_head

from api import build_index
from api.noise import compute_noise_signals, find_label_noise
from indexer import IndexConfig, Task
from indexer.hf import HFEncoderClassifier
from influence import noise as nz


def metrics_of(scores: dict[str, np.ndarray], orders: dict[str, np.ndarray], is_flip: np.ndarray) -> dict:
    out = {}
    for m, s in scores.items():
        out[m] = {"auc": nz.detection_auc(s, is_flip)} | {
            f"found@{round(c * 100)}": nz.fraction_found(orders[m], is_flip, c) for c in CHECKED
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--workdir", default=str(CACHE / "runs"))
    ap.add_argument("--cleanlab-path", default="/tmp/cleanlab_target", help="extra sys.path entry holding cleanlab")
    ap.add_argument("--out", default=str(ROOT / "experiments/results/tweets_noise.json"))
    args = ap.parse_args()
    if args.cleanlab_path and Path(args.cleanlab_path).exists():
        sys.path.append(args.cleanlab_path)
    from transformers import AutoModel, AutoTokenizer

    work = Path(args.workdir)
    texts, labels, confidence = load_tweets()
    feats = np.load(CACHE / "features.npy")
    perm = np.random.default_rng(0).permutation(len(texts))  # the split of tweets_minilm.py
    test_rows, train_rows = np.sort(perm[: args.n_test]), np.sort(perm[args.n_test :])
    train = [(texts[i], int(labels[i])) for i in train_rows]
    test = [(texts[i], int(labels[i])) for i in test_rows]
    ytrain = labels[train_rows]
    encoder = AutoModel.from_pretrained(model_dir()).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    body = CachedTextBody(texts, feats)
    res: dict[str, Any] = {"l2": L2, "n_train": len(train), "machine": f"{os.cpu_count()} CPU cores (shared)"}

    def task_for(y: np.ndarray, with_test: bool) -> Task:
        head = train_head(feats[train_rows], y, L2)
        model = HFEncoderClassifier(encoder, head, pooling="mean").eval()
        data = [(t, int(v)) for (t, _), v in zip(train, y, strict=True)]
        task = Task.from_hf(model, tokenizer, train=data, test=test if with_test else None, l2=L2)
        return dataclasses.replace(task, body=body, head=task.head)

    # ---- 1. natural labels
    t0 = time.perf_counter()
    natural = work / "tweets-latency-cached"
    index = build_index(task_for(ytrain, True), natural, config=IndexConfig(cache_queries=True), progress=False)
    res["natural_build_or_resume_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    suspects = find_label_noise(index, progress=False)
    t_job = time.perf_counter() - t0
    index.close()
    conf = confidence[train_rows]
    order = np.array([s.example_id for s in suspects])
    score = order_to_score(order)
    ok = np.isfinite(conf)
    res["natural"] = {
        "method": "fused",
        "job_seconds": t_job,
        "mean_annotator_confidence_all": float(np.nanmean(conf)),
        "mean_annotator_confidence_top1pct": float(np.nanmean(conf[order[: len(order) // 100]])),
        "share_low_confidence_lt_0.5": float(np.mean(conf[ok] < 0.5)),
        "auc_low_confidence_lt_0.5": nz.detection_auc(score[ok], conf[ok] < 0.5),
        "top_suspects": [
            {
                "example_id": s.example_id,
                "text": train[s.example_id][0],
                "label": NAMES[s.label],
                "suggested_label": NAMES[s.suggested_label],
                "annotator_confidence": float(conf[s.example_id]),
                "score": s.score,
            }
            for s in suspects[:15]
        ],
    }
    print("natural", {k: v for k, v in res["natural"].items() if k != "top_suspects"})
    for s in res["natural"]["top_suspects"]:
        print(
            f"   {s['label']:>8} -> {s['suggested_label']:<8} conf={s['annotator_confidence']:.2f}  {s['text'][:90]!r}"
        )

    # ---- 2. injected 10% uniform flips
    runs = []
    for seed in range(args.seeds):
        noisy, flipped = flip_labels(ytrain, seed)
        is_flip = np.zeros(len(ytrain), bool)
        is_flip[flipped] = True
        t0 = time.perf_counter()
        index = build_index(task_for(noisy, False), work / f"tweets-flip-{seed}", progress=False)
        t_build = time.perf_counter() - t0
        if not np.array_equal(index.train_labels, noisy):
            raise SystemExit(f"run tweets-flip-{seed} holds other labels than flip_labels(seed={seed})")
        t0 = time.perf_counter()
        find_label_noise(index, progress=False)
        t_job = time.perf_counter() - t0
        sig = compute_noise_signals(index, progress=False)  # reuses the job's cached intermediate arrays
        scores = {m: sig.score(m) for m in (*sig.signals, "fused")}
        orders = {m: nz.rank_order(s, sig.ids) for m, s in scores.items()}
        orders["random"] = np.random.default_rng(seed).permutation(len(ytrain))
        scores["random"] = order_to_score(orders["random"])
        orders["cleanlab"], cl_info = cleanlab_order(sig.labels, sig.oos_probs)
        scores["cleanlab"] = order_to_score(orders["cleanlab"])
        metrics = metrics_of(scores, orders, is_flip)
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
    summary = {
        m: {
            key: {
                "mean": float(np.mean([r["metrics"][m][key] for r in runs])),
                "std": float(np.std([r["metrics"][m][key] for r in runs])),
            }
            for key in runs[0]["metrics"][m]
        }
        for m in runs[0]["metrics"]
    }
    f10 = np.array([[r["metrics"][m]["found@10"] for m in ("fused", "loss", "cleanlab")] for r in runs])
    res["injected_flips"] = {
        "fraction": 0.10,
        "kind": "uniform",
        "runs": runs,
        "summary": summary,
        "fused_beats_loss_every_seed@10": bool(np.all(f10[:, 0] > f10[:, 1])),
        "fused_beats_cleanlab_every_seed@10": bool(np.all(f10[:, 0] > f10[:, 2])),
    }
    out = Path(args.out)
    out.write_text(json.dumps(res, indent=1, default=float))
    plot(res, out.with_suffix(".png"))
    print(f"wrote {out}")


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = res["injected_flips"]["summary"]
    xs = [round(c * 100) for c in CHECKED]
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
