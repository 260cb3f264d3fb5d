"""Leave-one-out agreement (Koh & Liang 2017, Fig. 2) on digits and Fashion-MNIST: score / n vs retraining.

Usage: .venv/bin/python -m experiments.fidelity_loo [--quick]   (from the repository root; `make loo`)

Logistic regression (convex, l2 = 1e-2 and 1e-3): the full model is first refit in float64 (L-BFGS to
|grad|_inf < 1e-10), then for each removed training example i the model is retrained warm-started on
    (1/(n-1)) sum_{j != i} CE_j + (l2/2) ||W, b||^2
to the same tolerance, and the actual change of each test point's loss (at its TRUE label, as Koh & Liang) is
compared with the prediction. Removing a point from a mean also re-weights the other n-1 points by n/(n-1),
so to first order the change is (score_i + c_q) / (n-1), with c_q = g_q^T H^-1 (l2 theta) the same for every i;
exact and LiSSA predictions include c_q (their own solve), representer and grad-dot use score / n (Pearson
per test point is unaffected by the offset). As a check the l2 = 1e-2 model is also retrained on the
influence-function definition itself, (1/n) sum_{j != i} CE_j + ..., where the prediction is score_i / n.

Fashion-MNIST logistic regression (l2 = 1e-3): 5,000 training images (seeded subsample), 2x2-average-pooled
pixels (196 features, 1,970 parameters: under the 4,096-parameter limit of method "exact"), 1,000 stored test
images. Same protocol; each refit iterates theta <- theta - H0^-1 grad(theta) with H0 the full model's float64
Hessian (Cholesky), which contracts by O(1/n) per step (~5 steps, 1 s, instead of ~100 L-BFGS iterations,
18 s here), to the same |grad|_inf < 1e-10 test (L-BFGS takes over if it stalls); cross-checked against
L-BFGS refits to 2e-7 in the parameters.

MLP (64-32-10, whole MLP as the head, non-convex): the trained float32 model is not an exact stationary point,
so actual = loss(T(theta; without i)) - loss(T(theta; all)), T = 300 L-BFGS iterations warm-started from the
indexed parameters, the same deterministic procedure for both (the drift of T cancels). Fewer removals. Scored
with the current index defaults (64 deflated eigenpairs, damping from the deflated spectrum: 0 here) on the
same model, re-indexed.

Retrained parameters are cached in experiments/cache/loo_*.npz; re-runs only score.
"""

from __future__ import annotations

import argparse
import os
import time

# One BLAS thread, set before numpy loads: see experiments.fidelity_common.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from experiments import fidelity_common as fc  # noqa: E402

FMNIST_TRAIN = 5000
FMNIST_L2 = 1e-3


def pick_test_points(margins: np.ndarray, n_mis: int, n_low: int, n_rand: int, seed: int) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    mis = np.flatnonzero(margins < 0)
    chosen, kinds = [], []
    for r in rng.choice(mis, size=min(n_mis, len(mis)), replace=False):
        chosen.append(int(r))
        kinds.append("misclassified")
    for r in np.argsort(np.where(margins >= 0, margins, np.inf))[:n_low]:
        chosen.append(int(r))
        kinds.append("low-margin")
    pool = np.setdiff1d(np.flatnonzero(margins >= 0), chosen)
    for r in rng.choice(pool, size=n_rand, replace=False):
        chosen.append(int(r))
        kinds.append("random")
    return chosen, kinds


def retrain_all(head, X, y, base, remove_ids, *, norm_kind, fixed_iters, cache_path, chol=None, log_every=50):
    """Retrained parameters for each removed id (cached); returns (dict id -> theta, stats)."""
    cache = fc.load_cache(cache_path)
    done = {int(i): k for k, i in enumerate(cache.get("ids", np.zeros(0, np.int64)))}
    ids = list(cache.get("ids", np.zeros(0, np.int64)).astype(np.int64))
    thetas = list(cache.get("thetas", np.zeros((0, base.size))))
    gnorms = list(cache.get("gnorms", np.zeros(0)))
    nits = list(cache.get("nits", np.zeros(0, np.int64)))
    todo = [int(i) for i in remove_ids if int(i) not in done]
    n = len(y)
    t0 = time.perf_counter()
    for k, i in enumerate(todo):
        w = np.ones(n)
        w[i] = 0.0
        norm = n - 1.0 if norm_kind == "n-1" else float(n)
        if fixed_iters:
            th, gn, it = head.fit(base, X, y, w, norm, gtol=1e-30, maxiter=fixed_iters)
        elif chol is not None:
            th, gn, it = head.fit_preconditioned(base, X, y, w, norm, chol, gtol=1e-10)
        else:
            th, gn, it = head.fit(base, X, y, w, norm, gtol=1e-10)
        ids.append(i)
        thetas.append(th)
        gnorms.append(gn)
        nits.append(it)
        if (k + 1) % log_every == 0 or k + 1 == len(todo):
            fc.save_cache(
                cache_path,
                {
                    "ids": np.asarray(ids),
                    "thetas": np.asarray(thetas),
                    "gnorms": np.asarray(gnorms),
                    "nits": np.asarray(nits),
                },
            )
            el = time.perf_counter() - t0
            print(f"    retrained {k + 1}/{len(todo)} ({el:.0f}s, {el / (k + 1):.2f}s each)", flush=True)
    by_id = {int(i): th for i, th in zip(ids, thetas, strict=True)}
    sel = [ids.index(int(i)) for i in remove_ids]
    return by_id, {
        "max_grad_inf_norm": float(np.max(np.asarray(gnorms)[sel])) if sel else float("nan"),
        "median_iterations": float(np.median(np.asarray(nits)[sel])) if sel else float("nan"),
        "retrained_now": len(todo),
        "seconds_now": time.perf_counter() - t0,
    }


def run_experiment(label, index, *, n_top, n_rand, tests, norm_kind, fixed_iters, seed=0, precondition=False):
    print(f"== {label}", flush=True)
    head, X, y = fc.numpy_head(index)
    n = len(y)
    Xte = np.asarray(index.run.test.features, np.float64)
    yte = np.asarray(index.run.test.labels, np.int64)
    base_path = fc.CACHE / f"loo_{label}_base.npz"
    base_c = fc.load_cache(base_path)
    if "theta" in base_c:
        base, base_info = base_c["theta"], {"grad_inf_norm": float(base_c["gnorm"]), "iterations": int(base_c["nit"])}
    else:
        t = time.perf_counter()
        if fixed_iters:
            base, gn, it = head.fit(head.theta0, X, y, np.ones(n), float(n), gtol=1e-30, maxiter=fixed_iters)
        else:
            base, gn, it = head.fit(head.theta0, X, y, np.ones(n), float(n), gtol=1e-10)
        fc.save_cache(base_path, {"theta": base, "gnorm": np.asarray(gn), "nit": np.asarray(it)})
        base_info = {"grad_inf_norm": gn, "iterations": it}
        print(f"  base fit {time.perf_counter() - t:.1f}s |grad|={gn:.2g} iters={it}", flush=True)
    chol = None
    if precondition:  # Newton-type refits preconditioned by the full model's Hessian (single linear layer)
        import scipy.linalg

        t = time.perf_counter()
        chol = scipy.linalg.cho_factor(head.linear_hessian(base, X, np.ones(n), float(n)))
        if base_info["grad_inf_norm"] > 1e-10:  # polish the full model to the refits' tolerance
            base, gn, it = head.fit_preconditioned(base, X, y, np.ones(n), float(n), chol, gtol=1e-11)
            fc.save_cache(base_path, {"theta": base, "gnorm": np.asarray(gn), "nit": np.asarray(it)})
            base_info = {"grad_inf_norm": gn, "iterations": base_info["iterations"] + it}
        print(f"  Hessian + Cholesky + polish {time.perf_counter() - t:.1f}s", flush=True)
    base_info["max_abs_change_from_indexed_params"] = float(np.max(np.abs(base - head.theta0)))
    _, g0 = head.objective(head.theta0, X, y, np.ones(n), float(n))
    base_info["indexed_params_grad_inf_norm"] = float(np.max(np.abs(g0)))

    margins = head.margins(base, Xte, yte)
    rows, kinds = pick_test_points(margins, *tests, seed=seed)
    targets = yte[rows]
    scores, vecs, diags = {}, {}, {}
    for m in fc.METHODS:
        t = time.perf_counter()
        q, diags[m] = fc.query_vectors(index, np.asarray(rows), targets, m)
        vecs[m] = q
        scores[m] = q @ fc.train_vectors(index, m).T
        diags[m] = {k: float(v) for k, v in diags[m].items()} | {"seconds": time.perf_counter() - t}
    rng = np.random.default_rng(seed + 1)
    random_ids = rng.choice(n, size=n_rand, replace=False)
    top_ids = {r: np.argsort(-np.abs(scores["exact"][j]))[:n_top] for j, r in enumerate(rows)}
    remove = np.unique(np.concatenate([random_ids, *top_ids.values()]))
    print(f"  {len(rows)} test points, {len(remove)} distinct removals", flush=True)
    cache_path = fc.CACHE / f"loo_{label}_{norm_kind}{'_T' + str(fixed_iters) if fixed_iters else ''}.npz"
    thetas, rstats = retrain_all(
        head, X, y, base, remove, norm_kind=norm_kind, fixed_iters=fixed_iters, cache_path=cache_path, chol=chol
    )

    base_loss = head.losses(base, Xte[rows], targets)
    l2_theta = index.run.l2 * np.asarray(index.engine.head.theta, np.float64)
    out = {
        "n_train": n,
        "l2": index.run.l2,
        "representer_fidelity": index.run.extra["representer"]["fidelity"],
        "retrain_objective": "(1/(n-1)) sum_{j!=i} CE_j + l2/2 |theta|^2"
        if norm_kind == "n-1"
        else "(1/n) sum_{j!=i} CE_j + l2/2 |theta|^2",
        "procedure": f"{fixed_iters} L-BFGS iterations from the indexed params, minus the same on all data"
        if fixed_iters
        else (
            "theta <- theta - H0^-1 grad (H0 = the full model's Hessian, Cholesky) to |grad|_inf < 1e-10, "
            "from the float64 refit of the full model"
            if precondition
            else "L-BFGS to |grad|_inf < 1e-10, warm start from the float64 refit of the full model"
        ),
        "base_fit": base_info,
        "retrain": rstats,
        "solver": diags,
        "test_points": [
            {"test_id": int(index.test_ids[r]), "label": int(yte[r]), "kind": k, "margin": float(margins[r])}
            for r, k in zip(rows, kinds, strict=True)
        ],
        "n_removed_per_test_point": n_top + n_rand,
        "methods": {},
    }
    actual_all, pred_all = [], {m: [] for m in fc.METHODS}
    per_point = {m: [] for m in fc.METHODS}
    offsets = {}
    for j, r in enumerate(rows):
        ids = np.concatenate([top_ids[r], random_ids])
        new = np.array([head.losses(thetas[int(i)], Xte[r : r + 1], targets[j : j + 1])[0] for i in ids])
        actual = new - base_loss[j]
        actual_all.append(actual)
        for m in fc.METHODS:
            s = scores[m][j, ids]
            if norm_kind == "n-1" and m in ("exact", "lissa"):
                c = float(vecs[m][j] @ l2_theta)
                offsets.setdefault(m, []).append(c)
                pred = (s + c) / (n - 1)
            else:
                pred = s / n
            pred_all[m].append(pred)
            per_point[m].append(fc.pearson(pred, actual))
    actual_cat = np.concatenate(actual_all)
    for m in fc.METHODS:
        p = np.concatenate(pred_all[m])
        slope = float(np.polyfit(p, actual_cat, 1)[0])
        res = {
            "pearson_per_test_point": per_point[m],
            "pearson_mean": float(np.mean(per_point[m])),
            "pearson_min": float(np.min(per_point[m])),
            "pearson_pooled": fc.pearson(p, actual_cat),
            "spearman_pooled": float(stats.spearmanr(p, actual_cat)[0]),
            "slope_actual_vs_predicted": slope,
        }
        if m in offsets:
            res["offset_c_q"] = offsets[m]
            res["pearson_pooled_without_offset"] = fc.pearson(
                np.concatenate(
                    [scores[m][j, np.concatenate([top_ids[r], random_ids])] / n for j, r in enumerate(rows)]
                ),
                actual_cat,
            )
        out["methods"][m] = res
        print(
            f"  {m:12s} pearson mean {res['pearson_mean']:.4f} (min {res['pearson_min']:.4f}) "
            f"pooled {res['pearson_pooled']:.4f} slope {slope:.3f}",
            flush=True,
        )
    return out, {"actual": actual_all, "pred": pred_all}


def plot(results, scatter, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    fig, axes = plt.subplots(len(labels), len(fc.METHODS), figsize=(4 * len(fc.METHODS), 3.6 * len(labels)))
    axes = np.atleast_2d(axes)
    for a, label in enumerate(labels):
        for b, m in enumerate(fc.METHODS):
            ax = axes[a, b]
            for j, (act, pred) in enumerate(zip(scatter[label]["actual"], scatter[label]["pred"][m], strict=True)):
                ax.scatter(pred, act, s=6, alpha=0.6, label=f"test {results[label]['test_points'][j]['test_id']}")
            if m in ("exact", "lissa"):
                lim = np.max(np.abs(np.concatenate(scatter[label]["actual"])))
                ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.7)
            r = results[label]["methods"][m]
            ax.set_title(f"{label}\n{m}: r={r['pearson_mean']:.3f} (pooled {r['pearson_pooled']:.3f})", fontsize=9)
            ax.set_xlabel("predicted change of test loss", fontsize=8)
            ax.set_ylabel("actual (retrained)", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer removals (smoke test)")
    ap.add_argument("--skip-mlp", action="store_true")
    ap.add_argument("--skip-fmnist", action="store_true")
    ap.add_argument("--fmnist-train", type=int, default=FMNIST_TRAIN)
    args = ap.parse_args()
    k = 20 if args.quick else 100
    t0 = time.perf_counter()
    results, scatter = {}, {}
    lr2 = fc.digits_index("lr", 1e-2)
    results["lr_l2=1e-2"], scatter["lr_l2=1e-2"] = run_experiment(
        "lr_l2=1e-2", lr2, n_top=k, n_rand=k, tests=(3, 2, 2), norm_kind="n-1", fixed_iters=0
    )
    results["lr_l2=1e-2_ifdef"], scatter["lr_l2=1e-2_ifdef"] = run_experiment(
        "lr_l2=1e-2", lr2, n_top=k, n_rand=k, tests=(3, 2, 2), norm_kind="n", fixed_iters=0
    )
    lr3 = fc.digits_index("lr", 1e-3)
    results["lr_l2=1e-3"], scatter["lr_l2=1e-3"] = run_experiment(
        "lr_l2=1e-3", lr3, n_top=k, n_rand=k, tests=(3, 2, 2), norm_kind="n-1", fixed_iters=0
    )
    if not args.skip_fmnist:
        fm = fc.fmnist_index(FMNIST_L2, n_train=args.fmnist_train, pool=2)
        label = f"fmnist_lr_l2={FMNIST_L2:g}_n{args.fmnist_train}"
        results[label], scatter[label] = run_experiment(
            label, fm, n_top=k, n_rand=k, tests=(3, 2, 2), norm_kind="n-1", fixed_iters=0, precondition=True
        )
        results[label]["data"] = "Fashion-MNIST, 2x2-average-pooled pixels (196 features), seeded training subsample"
    if not args.skip_mlp:
        mlp = fc.digits_index("mlp", 1e-3, rebuild="current")
        km = 10 if args.quick else 30
        results["mlp_l2=1e-3"], scatter["mlp_l2=1e-3"] = run_experiment(
            "mlp_l2=1e-3", mlp, n_top=km, n_rand=km, tests=(2, 1, 2), norm_kind="n-1", fixed_iters=300
        )
    summary = {
        label: {m: round(r["methods"][m]["pearson_mean"], 4) for m in fc.METHODS} for label, r in results.items()
    }
    out = {
        "protocol": __doc__,
        "summary_pearson_mean_over_test_points": summary,
        "targets": {"exact": 0.99, "lissa": 0.97, "applies_to": "logistic regression"},
        "results": results,
        "seconds": time.perf_counter() - t0,
    }
    path = fc.write_json("fidelity_loo.json", out)
    plot(results, scatter, fc.RESULTS / "fidelity_loo.png")
    print(f"\nsummary (Pearson, mean over test points): {summary}\nwrote {path} and fidelity_loo.png")


if __name__ == "__main__":
    main()
