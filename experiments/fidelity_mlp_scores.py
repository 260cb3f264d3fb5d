"""Dense scores of the Fashion-MNIST MLP for the LDS (experiments.fidelity_lds), from arrays alone.

Usage: python -m experiments.fidelity_mlp_scores IN.npz OUT.npz   (from the repository root)

The whole MLP (784-128-10, 101,770 parameters) is the head, so LiSSA on its GGN over 5,000 training examples
costs ~200 GFLOP per step for 50 queries: hours on the shared 2-core machine, seconds on a GPU. This module
needs only numpy and the project's pure-JAX `influence` package (no store, no FAISS), so the same code runs in
process (fidelity_lds.py calls `compute_scores` when its score cache is missing) or on an accelerator machine
with the input written by `fidelity_lds.py --export-scores-input`. It mirrors `api.engine.Engine.solve`: the
curvature C + l2 I over all training examples (GGN), its top 64 eigenpairs by block subspace iteration (the build's
curvature stage, `indexer.training_set.curvature_stage`: same seed, iterations, float64 basis) deflated in LiSSA,
damping `compute_damping` of the smallest deflated eigenvalue (the index's automatic damping), the library's
automatic scale and depth.

Scores at the TRUE label (positive = helpful), [m test points, n train]:
- lissa[_damping=d]: g_q^T (C + l2 I + d I)^-1 g_i (Koh & Liang 2017);
- lissa_proj1024: the same through the index's 1,024-dim Gaussian projection P (P q) . (P g_i);
- grad-dot: g_q . g_i;
- tracin: sum_c lr_c g_q(theta_c) . g_i(theta_c) over the saved epoch checkpoints (Pruthi et al. 2020);
- tracin_last: the last checkpoint only.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def _params(W1, b1, W2, b2):
    return [{"weight": W1, "bias": b1}, {}, {"weight": W2, "bias": b2}]


def compute_scores(inp: dict[str, np.ndarray], dampings=(1e-2, 1e-1), chunk: int = 1000, log=print):
    import dataclasses

    import influence as inf

    spec = json.loads(str(inp["spec"]))
    l2 = float(inp["l2"])
    h = np.asarray(inp["train_h"], np.float32)
    y = np.asarray(inp["train_y"], np.int64)
    hq = np.asarray(inp["query_h"], np.float32)
    yq = np.asarray(inp["query_y"], np.int64)
    theta, unravel = inf.flatten_params(_params(inp["W1"], inp["b1"], inp["W2"], inp["b2"]))
    p, n = int(theta.size), len(y)

    def grads(th, hh, yy):
        return np.asarray(inf.compute_per_example_grads(spec, unravel, th, hh, yy), np.float32)

    def dot_train(q, th=theta):
        out = np.zeros((len(q), n))
        for a in range(0, n, chunk):
            out[:, a : a + chunk] = np.asarray(q, np.float64) @ grads(th, h[a : a + chunk], y[a : a + chunk]).T
        return out

    scores, diag = {}, {}
    t = time.perf_counter()
    g = grads(theta, hq, yq)
    scores["grad-dot"] = dot_train(g)
    diag["grad-dot"] = {"seconds": time.perf_counter() - t}
    log(f"  grad-dot {time.perf_counter() - t:.1f}s")

    t = time.perf_counter()
    total = np.zeros((len(yq), n))
    k = len(inp["ck_lr"])
    for c in range(k):
        th_c, _ = inf.flatten_params(_params(inp["ck_W1"][c], inp["ck_b1"][c], inp["ck_W2"][c], inp["ck_b2"][c]))
        s = float(inp["ck_lr"][c]) * dot_train(grads(th_c, hq, yq), th_c)
        total += s
        if c == k - 1:
            scores["tracin_last"] = s
    scores["tracin"] = total
    diag["tracin"] = {"checkpoints": k, "seconds": time.perf_counter() - t}
    diag["tracin_last"] = {"checkpoints": 1}
    log(f"  tracin ({k} checkpoints) {time.perf_counter() - t:.1f}s")

    t = time.perf_counter()
    matvec = inf.make_head_matvec(spec, unravel, theta, h, y, l2=l2, curvature="ggn", batch_size=None)
    lam, vecs = inf.compute_top_eigenpairs(matvec, p, rank=min(64, p - 1), dtype=np.float64)
    deflation = (np.asarray(lam), np.ascontiguousarray(np.asarray(vecs), dtype=np.float32))
    auto = float(inf.compute_damping(float(np.min(lam)), l2, None))
    diag["curvature"] = {
        "top_eigenvalue": float(lam[0]),
        "smallest_deflated_eigenvalue": float(np.min(lam)),
        "automatic_damping": auto,
        "seconds": time.perf_counter() - t,
    }
    log(f"  top-64 eigenpairs {time.perf_counter() - t:.1f}s, lambda_max {lam[0]:.4g}, auto damping {auto:.3g}")
    for d in [auto, *(d for d in dampings if d != auto)]:
        t = time.perf_counter()
        name = "lissa" if d == auto else f"lissa_damping={d:g}"
        res = inf.solve_lissa(
            matvec,
            g,
            config=dataclasses.replace(inf.LissaConfig(), damping=d),
            l2=l2,
            top_eigenvalue=float(lam[0]),
            min_eigenvalue_floor=l2 + d,
            deflation=deflation,
        )
        q = np.asarray(res.x, np.float32)
        scores[name] = dot_train(q)
        diag[name] = {
            "damping": d,
            "scale": float(res.scale),
            "depth": int(res.depth),
            "residual_max": float(np.max(res.residual)),
            "seconds": time.perf_counter() - t,
        }
        log(f"  {name} depth {res.depth} {time.perf_counter() - t:.1f}s")
        if d == auto:
            t = time.perf_counter()
            pq = np.asarray(inf.project(q, seed=0, d=1024), np.float64)
            out = np.zeros((len(q), n))
            for a in range(0, n, chunk):
                pg = np.asarray(inf.project(grads(theta, h[a : a + chunk], y[a : a + chunk]), seed=0, d=1024))
                out[:, a : a + chunk] = pq @ np.asarray(pg, np.float64).T
            scores["lissa_proj1024"] = out
            diag["lissa_proj1024"] = {"dim": 1024, "seed": 0, "seconds": time.perf_counter() - t}
    return scores, diag


def main() -> None:
    src, dst = sys.argv[1], sys.argv[2]
    with np.load(src) as z:
        inp = {k: z[k] for k in z.files}
    t = time.perf_counter()
    scores, diag = compute_scores(inp, log=lambda s: print(s, flush=True))
    import jax

    diag["device"] = str(jax.devices()[0])
    diag["total_seconds"] = time.perf_counter() - t
    np.savez(dst, **{k: v.astype(np.float32) for k, v in scores.items()}, diag=np.asarray(json.dumps(diag)))
    print(json.dumps(diag, indent=1))


if __name__ == "__main__":
    main()
