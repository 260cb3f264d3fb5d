"""Which layers of a scope="model" run to project, and how far (issue 15): LDS of the Fashion-MNIST CNN of
`experiments/cnn_model_scope.py` against its retrains, per projection layout.

Usage: .venv/bin/python -m experiments.cnn_layer_dims [LAYOUT ...]   (run `make cnn-model-scope` first: this script
reads its cached model, initialisation and 50 retrain margins from experiments/cache/cnn_model_scope/<tag>/)

Layouts (`IndexConfig` fields; the whole-layer budget of `indexer.logra.unprojected_layers` is
min(project_above, exact_max_params), so exact_max_params=0 projects every layer as round 1 did):
- "k16": layer_projection_dim=16, every layer projected (d = 800, round 1's default);
- "k32", "k48": 32 / 48 per side, every layer projected;
- "k16+whole" (the default): 16 per side, the layers nearest the output kept whole while they fit 4,096 entries
  together (the 385 x 10 classifier and the first convolution);
- "k64+whole": 64 per side and the same whole layers.
For each layout: `build_index(Task(scope="model"), config=...)` (build seconds, d, the calibrated damping), then
`pairwise_scores` of the 100 queries at their true labels, method "exact" at the calibrated damping and at fixed
dampings added to G + l2 I, and "ekfac"; LDS mean +- standard error over the queries (Spearman over the 50 half
subsets, `fidelity_common.lds_per_point`).

Writes experiments/results/cnn_layer_dims.json and .png.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from experiments import common
from experiments import fidelity_common as fc

FULL = {"n_train": 5000, "hidden": 384, "epochs": 8, "l2": 1e-3, "n_subsets": 50, "n_queries": 100}
WORK = common.CACHE / "cnn_model_scope"
LAYOUTS = {
    "k16": {"layer_projection_dim": 16, "exact_max_params": 0},
    "k32": {"layer_projection_dim": 32, "exact_max_params": 0},
    "k48": {"layer_projection_dim": 48, "exact_max_params": 0},
    "k16+whole": {},
    "k64+whole": {"layer_projection_dim": 64},
}
DAMPINGS = (0.03, 0.1, 0.3, 1.0)


def tag(c: dict) -> str:
    """cnn_model_scope.py's cache tag (copied: scripts never import each other)."""
    return f"n{c['n_train']}_h{c['hidden']}_e{c['epochs']}_l2{c['l2']:g}"


def make_cnn(hidden: int) -> nn.Sequential:
    """cnn_model_scope.py's architecture (its trained weights are loaded over these)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def lds(scores: np.ndarray, masks: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    rho = fc.lds_per_point(scores, masks, truth)
    return {"lds_mean": float(np.mean(rho)), "lds_se": float(np.std(rho, ddof=1) / np.sqrt(len(rho)))}


def main() -> None:
    import influence as inf
    from api import build_index, open_index
    from indexer import IndexConfig, Task

    names = sys.argv[1:] or list(LAYOUTS)
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        sys.exit(f"unknown layout(s) {unknown}; choose from {list(LAYOUTS)}")
    c = FULL
    work = WORK / tag(c)
    for f in ("model.pt", "retrain_margins.npz"):
        if not (work / f).exists():
            sys.exit(f"{work / f} is missing: run `make cnn-model-scope` first")
    torch.set_num_threads(2)
    xtr, ytr, xte, yte = fc.fmnist_arrays(c["n_train"])
    X, Xte = torch.as_tensor(xtr.reshape(-1, 1, 28, 28)), torch.as_tensor(xte.reshape(-1, 1, 28, 28))
    q = np.sort(np.random.default_rng(0).choice(len(Xte), size=c["n_queries"], replace=False))
    model = make_cnn(c["hidden"])
    model.load_state_dict(torch.load(work / "model.pt"))
    model.eval()
    masks = fc.half_masks(c["n_subsets"], len(X), np.random.default_rng(1))
    cache = fc.load_cache(work / "retrain_margins.npz")
    if len(cache.get("margins", [])) < len(masks) or not np.array_equal(cache["masks"][: len(masks)], masks):
        sys.exit("the cached retrain margins are incomplete: run `make cnn-model-scope` first")
    truth = cache["margins"][: len(masks), q].T
    labels = yte[q]
    train = list(zip(X, ytr.tolist(), strict=True))
    test = list(zip(Xte[q], labels.tolist(), strict=True))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = common.RESULTS / "cnn_layer_dims.json"
    res: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    res |= {"protocol": __doc__, "config": c | {"dampings": list(DAMPINGS)}}
    res.setdefault("layouts", {})
    for name in names:
        task = Task(model=model, train=train, test=test, l2=c["l2"], scope="model", batch_size=128)
        run = work / "layouts" / name
        common.fresh(run)
        t0 = time.perf_counter()
        build_index(task, run, config=IndexConfig(**LAYOUTS[name]), progress=False).close()
        row: dict[str, Any] = {"config": LAYOUTS[name], "build_seconds": time.perf_counter() - t0}
        with open_index(run) as index:
            record = index.run.extra["model"]
        row |= {
            "dim": record["dim"],
            "dims": [
                (r["name"], r.get("k_in", r.get("k")), r.get("k_out"), r["in"], r["out"]) for r in record["layers"]
            ],
            "calibrated_damping": record["damping"],
            "rows": {},
        }
        for method, damping in [("exact", None), ("ekfac", None)] + [("exact", d) for d in DAMPINGS]:
            lissa = None if damping is None else inf.LissaConfig(damping=damping)
            with open_index(run, task=task, lissa=lissa) as index:
                S = index.pairwise_scores(list(range(len(labels))), method=method, targets=labels)
            key = f"{method} @ {'calibrated' if damping is None else f'{damping:g}'}"
            row["rows"][key] = lds(np.asarray(S, np.float64), masks, truth)
            print(f"  {name:10s} d {row['dim']:5d}  {key:18s} LDS {row['rows'][key]['lds_mean']:.3f}", flush=True)
        row |= {
            "commit": commit,
            "at": datetime.datetime.now().isoformat(timespec="seconds"),
            "load_average": list(os.getloadavg()),
        }
        res["layouts"][name] = row
        common.save_results(res, out, plot)


def plot(res: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, row in res["layouts"].items():
        keys = [k for k in row["rows"] if k.startswith("exact @ ") and k != "exact @ calibrated"]
        xs = [float(k.split("@ ")[1]) for k in keys]
        ys = [row["rows"][k]["lds_mean"] for k in keys]
        line = ax.plot(xs, ys, marker="o", label=f"{name} (d = {row['dim']:,})")[0]
        cal = row["rows"]["exact @ calibrated"]["lds_mean"]
        ax.scatter([row["calibrated_damping"]], [cal], marker="*", s=120, color=line.get_color(), zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("damping added to G + l2 I (star: the build's calibrated one)")
    ax.set_ylabel("LDS (100 queries, 50 retrains)")
    ax.set_title("CNN scope='model': exact score per projection layout")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
