"""Label-noise detection benchmark (EVALUATION.md, "Label-noise detection").

Per dataset, noise type and seed: flip 10% of the training labels (uniformly to another class, or each to one
fixed confusable class), train the model on the noisy labels, build the index, rank every training example
with every signal of `api.noise` plus the baselines in the same run (random, training loss, cleanlab
`find_label_issues` on the same out-of-sample probabilities), and report AUC, the fraction of flips found after
checking 5/10/20/30% of the data, and the test accuracy after retraining with the checked 10% fixed. The
fused job (given a built index) is timed and its peak memory measured (VmHWM reset before the job).

    .venv/bin/python -m experiments.label_noise                         # digits MLP, 5 seeds, both noises
    .venv/bin/python -m experiments.label_noise --datasets fmnist-logreg fmnist-mlp --fmnist-train 20000

(from the repository root; `make bench-noise`, `make bench-noise-fmnist`, `make bench-noise-60k`).

cleanlab is never a project dependency: put it on PYTHONPATH (e.g. `pip install --no-deps --target
/tmp/cleanlab_target cleanlab pandas termcolor python-dateutil pytz tzdata`) or pass --cleanlab-path; without
it the script falls back to its own confident-learning ranking by self-confidence and says so in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from api import build_index
from api.noise import compute_noise_signals, find_label_noise
from experiments import common
from indexer import Task
from influence import noise as nz

FIX_FRACTION = 0.10
RETRAIN_METHODS = ("none", "random", "loss", "cleanlab", "self-influence", "confident-learning", "fused", "oracle")


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


# ---------------------------------------------------------------------------------------------- one run
def run_one(
    name: str, data: dict[str, Any], noise: str, seed: int, workdir: Path, retrain: bool = True
) -> dict[str, Any]:
    x, y_true, l2 = data["x"], data["y"], data["l2"]
    y_noisy, is_flip = common.flip_labels(y_true, n_classes=10, seed=seed, kind=noise, confusable=data["confusable"])
    t0 = time.perf_counter()
    checkpoints: list = []
    model = common.train_noise_model(name, x, y_noisy, l2, seed, checkpoints)
    t_train = time.perf_counter() - t0
    if name == "fmnist-mlp":
        # TracIn over every third epoch's checkpoint (5 of 15): the TracIn stage costs one gradient pass over
        # the training set per checkpoint, the largest part of this 101k-parameter build on 2 CPU cores.
        checkpoints = checkpoints[2::3]
    task = Task(
        model=model,
        train=TensorDataset(torch.from_numpy(x), torch.from_numpy(y_noisy)),
        test=None,
        checkpoints=checkpoints,
        l2=l2,
        name=f"{name}-{noise}-{seed}",
        batch_size=1024,
    )
    t0 = time.perf_counter()
    index = build_index(task, workdir / f"{name}-{noise}-{seed}", progress=False)
    t_build = time.perf_counter() - t0

    common.peak_rss_reset()
    t0 = time.perf_counter()
    find_label_noise(index.engine, method="fused", progress=False)
    t_job = time.perf_counter() - t0
    job_peak = common.peak_rss_mb()

    res = compute_noise_signals(index.engine, progress=False)  # reuses the job's cached self-influence and p_oos
    scores = {m: res.score(m) for m in (*res.signals, "fused")}
    orders = {m: nz.rank_order(s, res.ids) for m, s in scores.items()}
    rng = np.random.default_rng(seed)
    orders["random"] = rng.permutation(len(y_true))
    scores["random"] = common.order_to_score(orders["random"])
    orders["cleanlab"], cl_info = common.cleanlab_order(res.labels, res.oos_probs)
    scores["cleanlab"] = common.order_to_score(orders["cleanlab"])

    metrics = common.detection_metrics(scores, orders, is_flip)
    n_fix = round(FIX_FRACTION * len(y_true))
    for m in RETRAIN_METHODS if retrain else ():
        fixed = y_noisy.copy()
        if m == "oracle":
            fixed = y_true.copy()
        elif m != "none":
            checked = orders[m][:n_fix]
            fixed[checked] = y_true[checked]  # a person checks these and restores the true label
        acc = accuracy(common.train_noise_model(name, x, fixed, l2, seed), data["xt"], data["yt"])
        metrics.setdefault(m, {})["test_acc_after_fix"] = acc
    top = orders["fused"][:n_fix]
    found = top[is_flip[top]]
    out = {
        "seed": seed,
        "n_train": len(y_true),
        "n_flipped": int(is_flip.sum()),
        "train_seconds": t_train,
        "build_seconds": t_build,
        "job_seconds": t_job,
        "job_peak_rss_mb": job_peak,
        "train_accuracy_noisy": float(index.manifest.extra["train_accuracy"]),
        "suggested_equals_true_on_found": float(np.mean(res.suggested[found] == y_true[found])) if len(found) else None,
        "self_influence_solver": res.info.get("self-influence"),
        "oos_refit": {k: v for k, v in res.info["confident-learning"].items() if k != "cached"},
        "tracin_checkpoints": len(checkpoints),
        "cleanlab": cl_info,
        "metrics": metrics,
    }
    index.close()
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = common.summarise_metrics(runs, ddof=1) | common.wins_every_seed(runs)
    for k in ("job_seconds", "job_peak_rss_mb", "build_seconds"):
        out[k] = float(np.median([r[k] for r in runs]))
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results["experiments"])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
    xs = [0.0, *common.CHECKED]
    for ax, key in zip(axes[0], keys, strict=True):
        summ = results["experiments"][key]["summary"]
        for m in (
            "fused",
            "self-influence",
            "confident-learning",
            "loss",
            "cleanlab",
            "representer",
            "random",
            "tracin",
            "grad-cos",
        ):
            if m not in summ:
                continue
            ys = [0.0] + [summ[m][f"found@{round(c * 100)}"]["mean"] for c in common.CHECKED]
            ax.plot(
                xs, ys, marker="o", lw=2.2 if m == "fused" else 1.2, label=f"{m} (AUC {summ[m]['auc']['mean']:.3f})"
            )
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("fraction of training data checked")
        ax.set_ylabel("fraction of flipped labels found")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    torch.set_num_threads(1)  # 2-core machine: torch with 2 threads beside JAX runs ~20x slower here
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["digits-mlp"], choices=common.NOISE_DATASETS)
    ap.add_argument("--noise", nargs="+", default=["uniform", "class"], choices=["uniform", "class"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--fmnist-train", type=int, default=20_000, help="Fashion-MNIST training subsample (60000 = all)")
    ap.add_argument("--cleanlab-path", default="/tmp/cleanlab_target", help="extra sys.path entry holding cleanlab")
    ap.add_argument("--out", default=str(common.RESULTS / "label_noise.json"))
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed + seeds - 1")
    ap.add_argument("--merge", nargs="+", default=None, help="merge the runs of these result files into --out and exit")
    ap.add_argument("--no-retrain", action="store_true", help="skip the test-accuracy-after-fix retrains (timing runs)")
    args = ap.parse_args()
    common.add_sys_path(args.cleanlab_path)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "protocol": "10% of training labels flipped; found@k = fraction of flips among the top k% of the ranking; "
        "test_acc_after_fix: retrain with the top 10% checked and their true labels restored",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
        },
        "args": vars(args),
        "experiments": {},
    }
    if out_path.exists():
        results["experiments"] = json.loads(out_path.read_text()).get("experiments", {})
    if args.merge:  # runs of one (dataset, noise) split over several processes or machines
        merged: dict[str, dict[int, Any]] = {}
        for f in args.merge:
            part = json.loads(Path(f).read_text())
            results["machine"] = part.get("machine", results["machine"])
            for key, exp in part["experiments"].items():
                for run in exp["runs"]:
                    merged.setdefault(key, {})[run["seed"]] = run
        for key, by_seed in merged.items():
            runs = [by_seed[k] for k in sorted(by_seed)]
            results["experiments"][key] = {"runs": runs, "summary": summarise(runs)}
        out_path.write_text(json.dumps(results, indent=1))
        plot(results, out_path.with_suffix(".png"))
        print(f"wrote {out_path} and {out_path.with_suffix('.png')}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            data = common.load_noise_dataset(name, args.fmnist_train)
            for noise in args.noise:
                key = f"{name}/{noise}"
                runs = []
                for seed in range(args.first_seed, args.first_seed + args.seeds):
                    t0 = time.perf_counter()
                    runs.append(run_one(name, data, noise, seed, Path(tmp), retrain=not args.no_retrain))
                    m = runs[-1]["metrics"]
                    print(
                        f"{key} seed {seed}: AUC fused {m['fused']['auc']:.4f} loss {m['loss']['auc']:.4f} "
                        f"cleanlab {m['cleanlab']['auc']:.4f} | found@10 fused {m['fused']['found@10']:.3f} "
                        f"loss {m['loss']['found@10']:.3f} cleanlab {m['cleanlab']['found@10']:.3f} "
                        f"| job {runs[-1]['job_seconds']:.1f}s ({time.perf_counter() - t0:.0f}s total)",
                        flush=True,
                    )
                results["experiments"][key] = {"runs": runs, "summary": summarise(runs)}
                out_path.write_text(json.dumps(results, indent=1))
                plot(results, out_path.with_suffix(".png"))
    print(f"wrote {out_path} and {out_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
