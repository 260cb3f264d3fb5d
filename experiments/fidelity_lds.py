"""Linear datamodeling score (Park et al. 2023, TRAK) on digits L2 logistic regression.

Usage: .venv/bin/python experiments/fidelity_lds.py [--subsets 100] [--test-points 50]

100 random subsets S_k of half the training set; the model is retrained on each, in float64, warm-started from
the full model, on (1/|S|) sum_{i in S} CE_i + (l2/2) ||W, b||^2 with L-BFGS to |grad|_inf < 1e-8 (cached in
experiments/cache/lds_*.npz). For each of 50 random test points q, the prediction for subset k is the summed
score sum_{i in S_k} score(q, i) (scores at the TRUE label: positive = helpful = raises the correct-class
margin), the ground truth is the retrained correct-class margin z_y - max_{c != y} z_c; LDS(q) = Spearman
over the 100 subsets; reported: mean (and spread) over test points, per method.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fidelity_common as fc
import numpy as np
from scipy import stats


def retrain_subsets(label, head, X, y, base, masks, gtol=1e-8):
    path = fc.CACHE / f"lds_{label}.npz"
    cache = fc.load_cache(path)
    if "masks" in cache and np.array_equal(cache["masks"][: len(masks)], masks) and len(cache["thetas"]) >= len(masks):
        return cache["thetas"][: len(masks)], cache["gnorms"][: len(masks)]
    thetas, gnorms = [], []
    t0 = time.perf_counter()
    for k, m in enumerate(masks):
        th, gn, _ = head.fit(base, X, y, m.astype(np.float64), float(m.sum()), gtol=gtol)
        thetas.append(th)
        gnorms.append(gn)
        if (k + 1) % 20 == 0:
            print(f"    retrained {k + 1}/{len(masks)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    thetas, gnorms = np.asarray(thetas), np.asarray(gnorms)
    fc.save_cache(path, {"masks": masks, "thetas": thetas, "gnorms": gnorms})
    return thetas, gnorms


def lds(label, index, n_subsets, n_test, seed=0):
    print(f"== {label}", flush=True)
    head, X, y = fc.numpy_head(index)
    n = len(y)
    base, _gn, _ = head.fit(head.theta0, X, y, np.ones(n), float(n), gtol=1e-10)
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_subsets, n), bool)
    for k in range(n_subsets):
        masks[k, rng.choice(n, size=n // 2, replace=False)] = True
    t = time.perf_counter()
    thetas, gnorms = retrain_subsets(label, head, X, y, base, masks)
    retrain_s = time.perf_counter() - t
    rows = np.sort(np.random.default_rng(seed + 1).choice(len(index.test_ids), size=n_test, replace=False))
    Xq = np.asarray(index.test_features[rows], np.float64)
    yq = np.asarray(index.test_labels[rows], np.int64)
    margins = np.stack([head.margins(th, Xq, yq) for th in thetas], 1)  # [m, K]
    out = {
        "n_train": n,
        "l2": index.l2,
        "n_subsets": n_subsets,
        "subset_size": int(n // 2),
        "n_test_points": n_test,
        "retrain": {"max_grad_inf_norm": float(np.max(gnorms)), "seconds_now": retrain_s},
        "methods": {},
    }
    for m in fc.METHODS:
        S, diag = fc.method_scores(index, rows, yq, m)
        pred = S @ masks.T.astype(np.float64)  # [m, K]
        rho = np.array([stats.spearmanr(pred[j], margins[j])[0] for j in range(len(rows))])
        out["methods"][m] = {
            "lds_mean": float(np.nanmean(rho)),
            "lds_std": float(np.nanstd(rho)),
            "lds_median": float(np.nanmedian(rho)),
            "lds_min": float(np.nanmin(rho)),
            "per_test_point": rho.tolist(),
            "solver": {k: float(v) for k, v in diag.items()},
        }
        print(f"  {m:12s} LDS {np.nanmean(rho):.4f} +- {np.nanstd(rho):.4f} (min {np.nanmin(rho):.3f})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subsets", type=int, default=100)
    ap.add_argument("--test-points", type=int, default=50)
    args = ap.parse_args()
    t0 = time.perf_counter()
    results = {
        "lr_l2=1e-2": lds("lr_l2=1e-2", fc.digits_index("lr", 1e-2), args.subsets, args.test_points),
        "lr_l2=1e-3": lds("lr_l2=1e-3", fc.digits_index("lr", 1e-3), args.subsets, args.test_points),
    }
    summary = {lbl: {m: round(r["methods"][m]["lds_mean"], 4) for m in fc.METHODS} for lbl, r in results.items()}
    path = fc.write_json(
        "fidelity_lds.json",
        {
            "protocol": __doc__,
            "summary_lds_mean": summary,
            "targets": {"exact": 0.9, "lissa": 0.9},
            "results": results,
            "seconds": time.perf_counter() - t0,
        },
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (lbl, r) in zip(axes[0], results.items(), strict=True):
        ax.boxplot([r["methods"][m]["per_test_point"] for m in fc.METHODS])
        ax.set_xticks(range(1, len(fc.METHODS) + 1), list(fc.METHODS))
        ax.axhline(0.9, color="gray", ls="--", lw=0.7)
        ax.set_title(f"LDS, digits {lbl} ({r['n_subsets']} half subsets, {r['n_test_points']} test points)", fontsize=9)
        ax.set_ylabel("Spearman (per test point)")
    fig.tight_layout()
    fig.savefig(fc.RESULTS / "fidelity_lds.png", dpi=110)
    print(f"\nsummary (LDS, mean over test points): {summary}\nwrote {path} and fidelity_lds.png")


if __name__ == "__main__":
    main()
