"""LiSSA convergence: relative error against the exact solve versus depth, per damping, digits and FMNIST heads.

Usage: .venv/bin/python -m experiments.lissa_convergence [--quick]   (from the repository root; `make lissa`)

Heads: digits logistic regression (l2 = 1e-2 and 1e-3), the digits MLP 64-32-10 (l2 = 1e-3, GGN curvature) and
Fashion-MNIST logistic regression (5,000 train, 2x2-pooled pixels, l2 = 1e-3; the leave-one-out head).
Queries: gradients of m stored test points at their predicted class (the product default). For each damping in
{auto, 1e-4, 1e-3, 1e-2} the scale is automatic (1.5 (lambda_max + damping)) and the recursion
x_{j+1} = v + x_j - (A + dI) x_j / scale is run with the index's own jitted matvec, the iterate read at depths
100 ... 20000 (one run, checkpointed; checked equal to `Engine.solve(g, "lissa")` at depth 1000). Errors:
||x - x*|| / ||x*|| of the solution and ||S - S*|| / ||S*|| of the scores over all training points, x* the exact
eigendecomposition solve at the same damping. Time per query: `Engine.solve(g, "lissa")` with the library's
LissaConfig at depth 1000 and at the automatic depth (m queries batched, divided by m; and one query alone).
The automatic defaults (LissaConfig()) are recorded with their error, and their bias against the undamped
solution (damping 0: the influence the objective defines).
"""

from __future__ import annotations

import argparse
import json
import os
import time

# One BLAS thread, set before numpy loads: see experiments.fidelity_common.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from experiments import fidelity_common as fc  # noqa: E402

DEPTHS = (100, 200, 500, 1000, 2000, 5000, 10000, 20000)
DAMPINGS = ("auto", 1e-4, 1e-3, 1e-2)
# label -> (index, queries, max depth). The MLP matvec is ~10x the digits LR one on this shared 2-core machine
# (2 queries, depths up to 10,000); the Fashion-MNIST LR one (5,000 x 1,970) ~25x (2 queries, up to 2,000).
HEADS = {
    "lr_l2=1e-2": (lambda: fc.digits_index("lr", 1e-2), 8, 20000),
    "lr_l2=1e-3": (lambda: fc.digits_index("lr", 1e-3), 8, 20000),
    "mlp_l2=1e-3": (lambda: fc.digits_index("mlp", 1e-3), 2, 10000),
    "fmnist_lr_l2=1e-3": (lambda: fc.fmnist_index(1e-3, n_train=5000, pool=2), 2, 2000),
}


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def study(label, index, m, depths, seed=0):
    import jax
    import jax.numpy as jnp

    import influence as inf

    print(f"== {label}", flush=True)
    engine = index.engine  # the run's head, curvature operator (C + l2 I) and its dense eigendecomposition
    engine.require_exact()
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(index.test_ids), size=m, replace=False))
    h = np.asarray(index.run.test.features[rows])
    pred = engine.logits(h).argmax(1)
    g = np.asarray(engine.gradients(h, pred))  # float32, as the library solves it
    G = fc.train_gradients(index)
    es = engine.eigen_solver
    top = engine.top_eigenvalue
    batched = jax.vmap(engine.matvec)

    @jax.jit
    def advance(X, V, k, scale, d):
        def body(_, X):
            return V + X - (batched(X).astype(V.dtype) + d * X) / scale

        return jax.lax.fori_loop(0, k, body, X)

    out = {
        "n_params": int(engine.head.theta.size),
        "l2": index.run.l2,
        "lambda_max": top,
        "lambda_min_of_C_plus_l2": float(es.min_eigenvalue),
        "test_ids": [int(index.test_ids[r]) for r in rows],
        "dampings": {},
    }
    exact0 = es.solve(g.astype(np.float64), damping=0.0)
    for dm in DAMPINGS:
        d = float(inf.compute_damping(top, index.run.l2, None if dm == "auto" else dm))
        scale = 1.5 * (top + d)
        exact = es.solve(g.astype(np.float64), damping=d)
        S_exact = exact @ G.T
        V = jnp.asarray(g)
        X = V
        done, errs, serrs = 0, [], []
        t = time.perf_counter()
        for depth in depths:
            X = advance(X, V, depth - done, jnp.asarray(scale, V.dtype), jnp.asarray(d, V.dtype))
            done = depth
            x = np.asarray(X, np.float64) / scale
            errs.append(rel(x, exact))
            serrs.append(rel(x @ G.T, S_exact))
        el = time.perf_counter() - t
        key = "auto" if dm == "auto" else f"{dm:g}"
        bound = [float((1 - (es.min_eigenvalue + d) / scale) ** k) for k in depths]
        out["dampings"][key] = {
            "damping": d,
            "scale": scale,
            "condition_number": (top + d) / (es.min_eigenvalue + d),
            "depths": list(depths),
            "rel_error_solution": errs,
            "rel_error_scores": serrs,
            "error_bound": bound,
            "bias_vs_undamped_solution": rel(exact, exact0),
            "bias_vs_undamped_scores": rel(S_exact, exact0 @ G.T),
            "curve_seconds": el,
        }
        print(
            f"  damping {key:>6s} (={d:.3g}, kappa {(top + d) / (es.min_eigenvalue + d):.0f}): "
            + " ".join(f"{k}:{e:.2g}" for k, e in zip(depths, errs, strict=True))
            + f"  bias vs undamped {rel(exact, exact0):.3g}",
            flush=True,
        )

    # sanity: the checkpointed recursion equals the library's solve at depth 1000 (auto damping)
    from api import open_index

    lib = open_index(index.run.root, lissa=inf.LissaConfig(depth=1000))
    x_lib, _ = lib.engine.solve(g, "lissa")
    d_auto = out["dampings"]["auto"]
    x_chk = (
        np.asarray(advance(jnp.asarray(g), jnp.asarray(g), 1000, d_auto["scale"], d_auto["damping"])) / d_auto["scale"]
    )
    out["check_library_vs_checkpointed_depth1000"] = rel(x_chk, np.asarray(x_lib, np.float64))

    # timing of the library's solve: depth 1000 and the automatic defaults
    timings = {}
    for name, cfg in (("depth=1000", inf.LissaConfig(depth=1000)), ("defaults", inf.LissaConfig())):
        ix = open_index(index.run.root, lissa=cfg).engine
        ix.solve(g[:1], "lissa")  # compile
        t = time.perf_counter()
        x, diag = ix.solve(g, "lissa")
        batch_s = time.perf_counter() - t
        t = time.perf_counter()
        ix.solve(g[:1], "lissa")
        one_s = time.perf_counter() - t
        exact = es.solve(g.astype(np.float64), damping=diag["damping"])
        timings[name] = {
            "depth": int(diag["depth"]),
            "scale": diag["scale"],
            "damping": diag["damping"],
            "seconds_per_query_batched": batch_s / m,
            "seconds_one_query": one_s,
            "rel_error_solution": rel(x, exact),
            "rel_error_scores": rel(np.asarray(x, np.float64) @ G.T, exact @ G.T),
            "rel_error_solution_vs_undamped": rel(x, exact0),
            "rel_error_scores_vs_undamped": rel(np.asarray(x, np.float64) @ G.T, exact0 @ G.T),
            "residual_max": diag["residual_max"],
        }
        print(f"  library {name}: {timings[name]}", flush=True)
    out["library"] = timings
    out["automatic_defaults"] = timings["defaults"]
    return out


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (label, r) in zip(axes[0], results.items(), strict=True):
        for key, dd in r["dampings"].items():
            (line,) = ax.loglog(
                dd["depths"], dd["rel_error_solution"], "o-", ms=3, label=f"damping {key} ({dd['damping']:.2g})"
            )
            ax.loglog(dd["depths"], dd["rel_error_scores"], "x:", ms=3, color=line.get_color())
        a = r["automatic_defaults"]
        ax.loglog([a["depth"]], [max(a["rel_error_solution"], 1e-12)], "k*", ms=12, label="automatic defaults")
        ax.axhline(0.02, color="gray", lw=0.7, ls="--")
        ax.set_title(f"{label} (p={r['n_params']})", fontsize=10)
        ax.set_xlabel("LiSSA depth")
        ax.set_ylabel("relative error vs exact (o solution, x scores)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--heads", nargs="+", default=list(HEADS), choices=list(HEADS), help="recompute these; others are kept"
    )
    args = ap.parse_args()
    depths = DEPTHS[:5] if args.quick else DEPTHS
    m = 4 if args.quick else 8
    t0 = time.perf_counter()
    old = fc.RESULTS / "lissa_convergence.json"
    results = json.loads(old.read_text())["results"] if old.exists() else {}
    for label in args.heads:
        make_index, mm, max_depth = HEADS[label]
        results[label] = study(label, make_index(), min(m, mm), [d for d in depths if d <= max_depth])
    results = {k: results[k] for k in HEADS if k in results}
    summary = {
        label: {
            "defaults": {
                k: r["automatic_defaults"][k]
                for k in ("depth", "scale", "damping", "rel_error_solution", "rel_error_scores", "seconds_one_query")
            },
            "depth_for_2pct_error_auto_damping": next(
                (
                    k
                    for k, e in zip(
                        r["dampings"]["auto"]["depths"], r["dampings"]["auto"]["rel_error_solution"], strict=True
                    )
                    if e <= 0.02
                ),
                None,
            ),
        }
        for label, r in results.items()
    }
    path = fc.write_json(
        "lissa_convergence.json",
        {"protocol": __doc__, "summary": summary, "results": results, "seconds": time.perf_counter() - t0},
    )
    plot(results, fc.RESULTS / "lissa_convergence.png")
    print(f"\nsummary: {summary}\nwrote {path} and lissa_convergence.png")


if __name__ == "__main__":
    main()
