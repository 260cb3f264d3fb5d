"""Whole-model scope at scale (issue 15): a 60k-example Fashion-MNIST CNN index with scope="model", built,
explained and dumped on this machine.

Usage: .venv/bin/python -m experiments.cnn_model_scale [--n-train 60000] [--queries 10000] [--explains 20]
(`make cnn-model-scale`; needs `make data`). The CNN of experiments/cnn_model_scope.py (Conv(1,8,5)-ReLU-Pool-
Conv(8,16,5)-ReLU-Pool-Flatten-Linear(256,384)-ReLU-Linear(384,10), 105,962 parameters), trained 2 epochs with Adam
on all `--n-train` training images (the model's quality does not matter here), the 10,000 Fashion-MNIST test
images stored as the test set; `Task(scope="model")` with the default IndexConfig (every conv and linear layer,
LoGra projection 16 per side, projected Gauss-Newton over `curvature_rows` examples, the damping calibrated by
warm-started refits, stage "model-damping"). Measured: build seconds (per stage, `extra["stage_seconds_last"]`),
the median seconds of `explain(test_ids=[i], k=10)` with the default method after the first call (fresh ids, no
query cache), a top-100 dump of `--queries` test images (default method), the process's peak RSS, disk per
training example. The machine has 2 shared cores: the load average is recorded at start and end.

Writes experiments/results/cnn_model_scale.json and .png.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments import common

WORK = common.CACHE / "cnn_model_scale"


def make_task(n_train: int, epochs: int):
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from indexer import Task

    xtr, ytr, xte, yte = common.load_fashion_mnist(n_train, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 384),
        nn.ReLU(),
        nn.Linear(384, 10),
    )
    x = torch.from_numpy(xtr).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(ytr)
    xt = torch.from_numpy(xte).reshape(-1, 1, 28, 28)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for i in range(0, len(x), 128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 128]), y[i : i + 128]).backward()
            opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == torch.from_numpy(yte)).float().mean())
    task = Task(
        model=model,
        train=TensorDataset(x, y),
        test=TensorDataset(xt, torch.from_numpy(yte)),
        l2=1e-3,
        scope="model",
        name="cnn-model-scale",
    )
    return task, {"n_params": sum(p.numel() for p in model.parameters()), "test_accuracy": acc, "train_s": train_s}


def plot(res: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = res["build"]["stage_seconds"] or {}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.barh(list(stages), list(stages.values()), color="#4477aa")
    a.set_xlabel("seconds")
    a.set_title(f"build stages, scope='model', n={res['config']['n_train']:,}")
    names = ["build", "explain median x 1000", "dump"]
    vals = [res["build"]["seconds"], 1000 * res["explain"]["median_seconds"], res["dump"]["seconds"]]
    b.bar(names, vals, color=["#4477aa", "#ee6677", "#228833"])
    b.set_ylabel("seconds")
    b.set_title(f"peak RSS {res['peak_rss_mib']:.0f} MiB; {res['config']['queries']:,}-query top-100 dump")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-train", type=int, default=60_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--explains", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default="cnn_model_scale.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    from api import build_index

    res: dict[str, Any] = {
        "config": vars(args),
        "machine": {"cpus": os.cpu_count(), "load_average_start": os.getloadavg()},
    }
    task, res["model"] = make_task(args.n_train, args.epochs)
    print("model", res["model"], flush=True)
    WORK.mkdir(parents=True, exist_ok=True)
    out = WORK / f"run_{args.n_train}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    index = build_index(task, out, progress=True)
    build_s = time.perf_counter() - t0
    extra = index.run.extra
    res["build"] = {
        "seconds": build_s,
        "stages": list(index.manifest.stages),
        "stage_seconds": extra.get("stage_seconds_last"),
        "run_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
        "model_record": {k: v for k, v in extra["model"].items() if k not in ("layers", "kronecker")},
    }
    res["build"]["bytes_per_train_example"] = res["build"]["run_bytes"] / args.n_train
    print("build", {k: v for k, v in res["build"].items() if k != "model_record"}, flush=True)

    ids = index.test_ids
    rng = np.random.default_rng(0)
    picks = rng.choice(len(ids), size=args.explains + 1, replace=False)
    seconds = []
    for j in picks:
        t0 = time.perf_counter()
        index.explain(test_ids=[int(ids[j])], k=10)
        seconds.append(time.perf_counter() - t0)
    res["explain"] = {
        "method": "lissa (default)",
        "first_call_seconds": seconds[0],
        "median_seconds": float(np.median(seconds[1:])),
        "seconds": seconds,
    }
    print("explain", res["explain"]["median_seconds"], flush=True)

    dump_path = WORK / f"dump_{args.n_train}.parquet"
    dump_path.unlink(missing_ok=True)
    shutil.rmtree(WORK / f"dump_{args.n_train}.parquet.partial", ignore_errors=True)
    t0 = time.perf_counter()
    index.dump(dump_path, ids[: args.queries].tolist(), k=100, progress=True)
    res["dump"] = {"seconds": time.perf_counter() - t0, "queries": min(args.queries, len(ids)), "k": 100}
    print("dump", res["dump"], flush=True)
    index.close()
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["machine"]["load_average_end"] = os.getloadavg()
    common.save_results(res, common.RESULTS / args.out, plot)


if __name__ == "__main__":
    main()
