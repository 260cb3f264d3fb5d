"""The iterative solve behind the default method at model scale: deflated LiSSA, plain CG, CG preconditioned by
the deflated eigenpairs, and CG preconditioned by EK-FAC, on the same operator (issue 14).

Model: the Fashion-MNIST MLP 784-128-10 of issue 14 (whole MLP as the head, 101,770 parameters, 5,000 seeded
training images, Adam lr 1e-3, 15 epochs, l2 = 1e-3). Operator: C + l2 I + d I with C the Gauss-Newton matrix over
the 5,000 training images (`influence.Head.matvec`), its top 64 eigenpairs computed as the build does (subspace
iterations on 4,096 rows, a final Rayleigh-Ritz step on all). Right-hand sides: the gradients of 8 test images at
their labels. Each solver runs to LiSSA's default target (relative residual about 1e-2 for LiSSA's automatic
depth; the CG variants stop at 1e-3); reported: curvature products, seconds (compile included), the true relative
residual, and the difference from the tightest solve.

    python -m experiments.solver_speed        (about 5 min on 2 cores; needs `make data`)
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

import influence as inf
from experiments.common import (
    RESULTS,
    load_fashion_mnist,
    make_fmnist_mlp,
    matmul_gflop_s,
    save_results,
    train_minibatch,
)

L2 = 1e-3
DAMPINGS = (0.0, 1e-3, 1e-2)
SPEC = [
    {"kind": "linear", "in_features": 784, "out_features": 128, "bias": True},
    {"kind": "relu"},
    {"kind": "linear", "in_features": 128, "out_features": 10, "bias": True},
]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    torch.set_num_threads(2)
    xtr, ytr, xte, yte = load_fashion_mnist(5000, seed=0)
    model = train_minibatch(make_fmnist_mlp(128, 0), torch.tensor(xtr), torch.tensor(ytr), l2=L2, epochs=15, seed=0)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = [{"weight": sd["0.weight"], "bias": sd["0.bias"]}, {}, {"weight": sd["2.weight"], "bias": sd["2.bias"]}]
    head = inf.Head(SPEC, params)
    p = int(head.theta.shape[0])
    matvec = head.matvec(xtr, ytr, l2=L2)
    rows = np.sort(np.random.default_rng(0).choice(len(xtr), size=4096, replace=False))
    sub = head.matvec(xtr[rows], ytr[rows], l2=L2, batch_size=None)
    (lam, vecs), t_eig = timed(
        lambda: inf.compute_top_eigenpairs(matvec, p, rank=64, dtype=np.float64, subspace_matvec=sub)
    )
    deflation = (np.asarray(lam), np.asarray(vecs, np.float32))
    ekfac, t_ekfac = timed(lambda: inf.fit_kronecker_curvature(SPEC, params, xtr, kind="ekfac", l2=L2))
    g = head.gradients(xte[:8], yte[:8])
    res = {
        "model": "Fashion-MNIST MLP 784-128-10, 5,000 training images, l2 = 1e-3, Adam 15 epochs",
        "n_params": p,
        "queries": 8,
        "top_eigenvalue": float(lam[0]),
        "smallest_deflated_eigenvalue": float(lam[-1]),
        "eigenpairs_seconds": t_eig,
        "ekfac_fit_seconds": t_ekfac,
        "matmul_gflops_f32": matmul_gflop_s(
            np.ones((1024, 1024), np.float32), np.ones((1024, 1024), np.float32), repeats=5
        ),
        "dampings": {},
    }
    for d in DAMPINGS:
        lissa = inf.HeadCurvature(matvec=matvec, l2=L2, top_eigenvalue=float(lam[0]), damping=d, deflation=deflation)
        solvers = {
            "lissa (deflated)": lambda lissa=lissa: lissa.run_iterative(g),
            "cg": lambda d=d: inf.solve_pcg(matvec, g, precondition=None, damping=d, tol=1e-3, max_iter=1000),
            "cg + deflation (default)": lambda lissa=lissa: dataclasses.replace(lissa, iterative="cg").run_iterative(g),
            "cg + ekfac": lambda d=d: inf.solve_pcg(matvec, g, precondition=ekfac, damping=d, tol=1e-3, max_iter=1000),
        }
        reference = inf.solve_pcg(
            matvec, g.astype(np.float64), precondition=None, damping=d, tol=1e-8, max_iter=3000
        ).x  # plain CG to 1e-8 in float64: the reference
        out = {}
        for name, run in solvers.items():
            result, seconds = timed(run)
            x = np.asarray(result.x, np.float64)
            out[name] = {
                "products": int(result.depth),
                "seconds": seconds,
                "residual_max": float(np.max(result.residual)),
                "error_vs_reference_max": float(
                    np.max(np.linalg.norm(x - reference, axis=1) / np.linalg.norm(reference, axis=1))
                ),
            }
            print(f"damping {d:g}  {name:26s} {out[name]}", flush=True)
        res["dampings"][f"{d:g}"] = out
    save_results(res, RESULTS / "solver_speed.json", plot)


def plot(res, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    names = list(next(iter(res["dampings"].values())))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs = np.arange(len(res["dampings"])) + j * width
        ax.bar(xs, [v[name]["products"] for v in res["dampings"].values()], width, label=name)
    ax.set_xticks(np.arange(len(res["dampings"])) + 0.4 - width / 2, [f"damping {d}" for d in res["dampings"]])
    ax.set_ylabel("curvature products (8 queries)")
    ax.set_yscale("log")
    ax.set_title(f"Fashion-MNIST MLP, p = {res['n_params']:,}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
