"""Speed of the HVP: the library's JAX LiSSA against the same LiSSA with torch double backprop, side by side.

Usage: .venv/bin/python -m experiments.hvp_speed [--depth 1000] [--repeats 3]   (from the repository root; `make hvp`)

Same head (the digits MLP 64-32-10, whole MLP as the head), the same cached training features (all n rows,
full batch), the same float32 parameters, the same recursion x_{j+1} = v + x_j - ((H + l2 I) x_j + d x_j) / scale
with the same depth, scale and damping, one query at a time:
- torch: the way pytorch-influence-functions / dattri write it: each step recomputes the loss, takes
  g = autograd.grad(loss, params, create_graph=True), then autograd.grad(<g, v>, params) (double backprop);
- JAX Hessian: ``influence.lissa`` under ``jax.jit`` with the Hessian matvec of an index built with
  ``IndexConfig(curvature="hessian")`` (its ``Engine.matvec``, forward-over-reverse);
- torch GGN: torch.func.jvp through the logits, the softmax cross-entropy Hessian, torch.func.vjp back;
- JAX GGN: ``Engine.solve(g, "lissa")`` of the default (GGN) index with LissaConfig(depth, scale, damping),
  the end-to-end library path (includes its residual check).
Agreement: relative difference of the solutions of each pair. Times: median over repeats (after one warm-up),
seconds per query; ratio = torch / JAX. The machine's numpy float32/float64 matmul GFLOP/s is measured in the
same run, and the HVP's useful FLOP rate is estimated from the layer shapes.
"""

from __future__ import annotations

import argparse
import os
import time

CORES = os.cpu_count() or 1
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(CORES)  # speed run, set before numpy loads: every framework gets all cores

import numpy as np  # noqa: E402

from experiments import fidelity_common as fc  # noqa: E402
from experiments.common import matmul_gflop_s  # noqa: E402


def median_time(fn, repeats):
    fn()  # warm-up / compile
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), ts, out


def torch_lissa_double_backprop(model, X, y, v, *, l2, depth, scale, damping):
    """pytorch-influence-functions style s_test, with the library's recursion and full-batch loss."""
    import torch

    params = [p for p in model.parameters()]
    vs = [t.clone() for t in v]
    h = [t.clone() for t in v]
    for _ in range(depth):
        loss = torch.nn.functional.cross_entropy(model(X), y) + 0.5 * l2 * sum((p**2).sum() for p in params)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * e).sum() for g, e in zip(grads, h, strict=True))
        hv = torch.autograd.grad(dot, params)
        with torch.no_grad():
            h = [v_ + e - (hv_ + damping * e) / scale for v_, e, hv_ in zip(vs, h, hv, strict=True)]
    return [e / scale for e in h]


def torch_lissa_ggn(model, X, y, v, *, l2, depth, scale, damping):
    """The same recursion with the GGN product J^T (diag p - p p^T) J v by torch.func jvp / vjp."""
    import torch
    from torch.func import functional_call, jvp, vjp

    names = [n for n, _ in model.named_parameters()]
    theta = tuple(p.detach() for p in model.parameters())
    n = X.shape[0]

    def f(*ps):
        return functional_call(model, dict(zip(names, ps, strict=True)), (X,))

    logits, vjp_fn = vjp(f, *theta)
    probs = torch.softmax(logits, -1)

    def ggn(e):
        _, jv = jvp(f, theta, tuple(e))
        hjv = probs * jv - probs * (probs * jv).sum(-1, keepdim=True)
        return [a / n + l2 * b for a, b in zip(vjp_fn(hjv), e, strict=True)]

    with torch.no_grad():
        h = [t.clone() for t in v]
        for _ in range(depth):
            cv = ggn(h)
            h = [v_ + e - (c + damping * e) / scale for v_, e, c in zip(v, h, cv, strict=True)]
    return [e / scale for e in h]


def flat_torch(ts):
    return np.concatenate([t.detach().numpy().ravel() for t in ts])


def to_torch_blocks(index, flat):
    """Library flat vector -> list of torch tensors in model.parameters() order (weight, bias per linear)."""
    import torch

    blocks = index.engine.head.unravel(np.asarray(flat))
    out = []
    for layer, p in zip(index.run.spec, blocks, strict=True):
        if layer["kind"] == "linear":
            out += [torch.from_numpy(np.asarray(p["weight"]).copy()), torch.from_numpy(np.asarray(p["bias"]).copy())]
    return out


def from_torch_blocks(index, ts):
    """Inverse of to_torch_blocks, via the library's own flattening."""
    import influence as inf

    params, k = [], 0
    for layer in index.run.spec:
        if layer["kind"] == "linear":
            params.append({"weight": ts[k].detach().numpy(), "bias": ts[k + 1].detach().numpy()})
            k += 2
        else:
            params.append({})
    return np.asarray(inf.flatten_params(params)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ggn-depth", type=int, default=100, help="depth of the (slow in torch) GGN comparison")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import torch
    from threadpoolctl import threadpool_limits

    import influence as inf

    torch.set_num_threads(CORES)
    t0 = time.perf_counter()
    ggn_index = fc.digits_index("mlp", 1e-3)
    hess_index = fc.digits_index("mlp", 1e-3, curvature="hessian")
    ggn, hess = ggn_index.engine, hess_index.engine  # each run's head and curvature operator
    assert np.array_equal(np.asarray(ggn.head.theta), np.asarray(hess.head.theta)), "indexes of different models"
    index = hess_index
    l2, top = index.run.l2, ggn.top_eigenvalue
    damping = float(ggn.damping)  # the automatic damping of the default index
    scale = 1.5 * (top + damping)
    depth = args.depth
    X = np.asarray(index.run.train.features, np.float32)
    y = np.asarray(index.run.train.labels, np.int64)
    row = 0
    h = np.asarray(index.run.test.features[row : row + 1])
    pred = hess.logits(h).argmax(1)
    g = np.asarray(hess.gradients(h, pred), np.float32)  # [1, p]
    print(
        f"MLP head p={hess.head.theta.size}, n={len(y)}, depth={depth}, scale={scale:.4g}, damping={damping:.3g}, l2={l2:g}"
    )

    # ---- machine ceiling
    with threadpool_limits(CORES):
        gf64 = fc.machine_gflops(1024)
        a = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
        gf32 = matmul_gflop_s(a, a, repeats=5, reduce=min)
    print(f"numpy matmul: {gf64:.1f} GFLOP/s float64, {gf32:.1f} GFLOP/s float32 ({CORES} cores)")

    # ---- JAX, Hessian (influence.lissa with the run's Engine.matvec)
    mv_h = hess.matvec
    run_h = jax.jit(lambda v: inf.lissa(mv_h, v, depth=depth, scale=scale, damping=damping))
    v_j = jnp.asarray(g[0])
    t_jax_h, ts_jax_h, x_jax_h = median_time(lambda: np.asarray(run_h(v_j).block_until_ready()), args.repeats)

    # ---- torch, Hessian by double backprop
    model = fc.torch_head(index)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    with torch.no_grad():
        assert np.allclose(model(Xt[:5]).numpy(), hess.logits(X[:5]), atol=1e-4)
    v_t = to_torch_blocks(index, g[0])
    assert np.allclose(from_torch_blocks(index, v_t), g[0])

    def time_torch(lissa_fn, d: int):
        """Median time of a torch LiSSA (same recursion, scale, damping) at depth d, its runs and its solution
        in the library's flat order."""
        run = lambda: lissa_fn(model, Xt, yt, v_t, l2=l2, depth=d, scale=scale, damping=damping)  # noqa: E731
        return median_time(lambda: from_torch_blocks(index, run()), args.repeats)

    def rel_diff(a, b) -> float:
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    t_torch_h, ts_torch_h, x_torch_h = time_torch(torch_lissa_double_backprop, depth)
    agree_h = rel_diff(x_torch_h, x_jax_h)
    print(
        f"Hessian: torch double backprop {t_torch_h:.3f}s, JAX {t_jax_h:.3f}s per query: {t_torch_h / t_jax_h:.1f}x; rel diff {agree_h:.2e}"
    )

    # ---- GGN: torch.func jvp/vjp vs the library's Engine.solve on the default index
    from api import open_index

    gd = min(args.ggn_depth, depth)
    lib = open_index(ggn_index.run.root, lissa=inf.LissaConfig(depth=gd, scale=scale, damping=damping)).engine
    t_jax_g, ts_jax_g, (x_jax_g, diag) = median_time(lambda: lib.solve(g, "lissa"), args.repeats)
    x_jax_g = np.asarray(x_jax_g[0], np.float64)
    mv_g = ggn.matvec
    run_g = jax.jit(lambda v: inf.lissa(mv_g, v, depth=gd, scale=scale, damping=damping))
    t_jax_g_core, _, x_jax_g_core = median_time(lambda: np.asarray(run_g(v_j).block_until_ready()), args.repeats)
    t_torch_g, ts_torch_g, x_torch_g = time_torch(torch_lissa_ggn, gd)
    agree_g = rel_diff(x_torch_g, x_jax_g)
    print(
        f"GGN (depth {gd}): torch.func jvp/vjp {t_torch_g:.3f}s, JAX Engine.solve {t_jax_g:.3f}s (bare lissa {t_jax_g_core:.3f}s) "
        f"per query: {t_torch_g / t_jax_g:.1f}x; rel diff {agree_g:.2e}"
    )

    # exact solution for reference (GGN, same damping): both are LiSSA at a fixed depth, not converged answers
    ggn.require_exact()
    exact_g = ggn.eigen_solver.solve(g.astype(np.float64), damping=damping)[0]
    # ---- useful FLOPs of one HVP step over n rows (forward 2 n sum(in*out); HVP ~ 4 forward passes)
    fwd = 2 * len(y) * sum(s["in_features"] * s["out_features"] for s in index.run.spec if s["kind"] == "linear")
    flops_query = 4 * fwd * depth
    res = {
        "protocol": __doc__,
        "head": {"kind": "digits MLP 64-32-10", "n_params": int(hess.head.theta.size), "n_train": len(y)},
        "lissa": {"depth": depth, "scale": scale, "damping": damping, "l2": l2, "batch": "full (all n rows)"},
        "machine": {"cores": CORES, "numpy_matmul_gflops_float64": gf64, "numpy_matmul_gflops_float32": gf32},
        "hessian": {
            "torch_double_backprop_s_per_query": t_torch_h,
            "torch_runs": ts_torch_h,
            "jax_lissa_s_per_query": t_jax_h,
            "jax_runs": ts_jax_h,
            "ratio_torch_over_jax": t_torch_h / t_jax_h,
            "rel_diff_solutions": agree_h,
        },
        "ggn": {
            "depth": gd,
            "torch_func_jvp_vjp_s_per_query": t_torch_g,
            "torch_runs": ts_torch_g,
            "jax_index_solve_s_per_query": t_jax_g,
            "jax_runs": ts_jax_g,
            "jax_bare_lissa_s_per_query": t_jax_g_core,
            "ratio_torch_over_jax_index_solve": t_torch_g / t_jax_g,
            "rel_diff_solutions": agree_g,
            "rel_diff_bare_vs_index_solve": rel_diff(x_jax_g_core, x_jax_g),
            "rel_error_vs_exact_at_this_depth": rel_diff(x_jax_g, exact_g),
            "solve_diagnostics": {k: float(v) for k, v in diag.items()},
        },
        "flops": {
            "estimated_useful_flop_per_query": flops_query,
            "jax_hessian_gflops": flops_query / t_jax_h / 1e9,
            "torch_hessian_gflops": flops_query / t_torch_h / 1e9,
            "jax_ggn_gflops": flops_query * gd / depth / t_jax_g_core / 1e9,
            "fraction_of_float32_matmul_ceiling_jax_hessian": flops_query / t_jax_h / 1e9 / gf32,
        },
        "target": "JAX >= 10x faster per query than torch double backprop",
        "seconds": time.perf_counter() - t0,
        "versions": {"torch": torch.__version__, "jax": jax.__version__},
    }
    path = fc.write_json("hvp_speed.json", res)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [
        "torch double\nbackprop (H)",
        "JAX lissa (H)",
        f"torch.func\njvp/vjp (GGN)\ndepth {gd}",
        f"JAX Engine.solve\n(GGN) depth {gd}",
    ]
    vals = [t_torch_h, t_jax_h, t_torch_g, t_jax_g]
    ax.bar(names, vals, color=["tab:red", "tab:blue", "tab:orange", "tab:cyan"])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.2f}s", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(f"seconds per query (H: depth {depth})")
    ax.set_title(
        f"LiSSA on the digits MLP head: H {t_torch_h / t_jax_h:.1f}x, GGN {t_torch_g / t_jax_g:.1f}x", fontsize=10
    )
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(fc.RESULTS / "hvp_speed.png", dpi=110)
    print(f"wrote {path} and hvp_speed.png")


if __name__ == "__main__":
    main()
