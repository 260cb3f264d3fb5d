"""Linear datamodeling score (Park et al. 2023, TRAK): digits L2 logistic regression, Fashion-MNIST MLP.

Usage: .venv/bin/python -m experiments.fidelity_lds [--subsets 100] [--test-points 50]   (from the repository root)

100 random subsets S_k of half the training set; the model is retrained on each, in float64, warm-started from
the full model, on (1/|S|) sum_{i in S} CE_i + (l2/2) ||W, b||^2 with L-BFGS to |grad|_inf < 1e-8 (cached in
experiments/cache/lds_*.npz). For each of 50 random test points q, the prediction for subset k is the summed
score sum_{i in S_k} score(q, i) (scores at the TRUE label: positive = helpful = raises the correct-class
margin), the ground truth is the retrained correct-class margin z_y - max_{c != y} z_c; LDS(q) = Spearman
over the 100 subsets; reported: mean (and spread) over test points, per method.

Fashion-MNIST MLP (784-128-10, the whole MLP as the head, 101,770 parameters): 5,000 training images (seeded
subsample), minibatch Adam (experiments.common.train_minibatch: lr 1e-3, batches of 256, 15 epochs, l2 = 1e-3, one
TracIn checkpoint per epoch). Each of the 100 half subsets is retrained from scratch with the same
initialisation and procedure (torch, one thread; ~10 s each here, cached in experiments/cache/), and the
correct-class margins of 50 random test points (of 1,000 stored) are the ground truth. Methods: LiSSA on the
GGN with 64 deflated eigenpairs at the automatic damping and at damping 1e-2 / 1e-1, the same LiSSA scores
through the index's 1,024-dim Gaussian projection, grad-dot, TracIn (15 checkpoints, and the last alone),
representer (Yeh et al., last layer). The scores come from experiments.fidelity_mlp_scores (pure JAX; see
there); the in-process CPU fallback takes hours on the shared 2-core machine, so they were computed on a GPU
(`--export-scores-input`, then `python -m experiments.fidelity_mlp_scores` there) and cached like the retrains.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# One BLAS thread, set before numpy loads: see experiments.fidelity_common.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from experiments import fidelity_common as fc  # noqa: E402


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
    masks = fc.half_masks(n_subsets, n, np.random.default_rng(seed))
    t = time.perf_counter()
    thetas, gnorms = retrain_subsets(label, head, X, y, base, masks)
    retrain_s = time.perf_counter() - t
    rows = np.sort(np.random.default_rng(seed + 1).choice(len(index.test_ids), size=n_test, replace=False))
    Xq = np.asarray(index.run.test.features[rows], np.float64)
    yq = np.asarray(index.run.test.labels[rows], np.int64)
    margins = np.stack([head.margins(th, Xq, yq) for th in thetas], 1)  # [m, K]
    out = {
        "n_train": n,
        "l2": index.run.l2,
        "n_subsets": n_subsets,
        "subset_size": int(n // 2),
        "n_test_points": n_test,
        "retrain": {"max_grad_inf_norm": float(np.max(gnorms)), "seconds_now": retrain_s},
        "methods": {},
    }
    for m in fc.METHODS:
        S, diag = fc.method_scores(index, rows, yq, m)
        rho = fc.lds_per_point(S, masks, margins)
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


# ------------------------------------------------------------------------------ Fashion-MNIST MLP
MLP = {"n_train": 5000, "hidden": 128, "l2": 1e-3, "epochs": 15, "seed": 0}
MLP_DAMPINGS = (0.0, 1e-2, 1e-1)  # absolute damping added to C + l2 I (the index's automatic value is listed too)


def retrain_mlp_subsets(xtr, ytr, xq, yq, masks, cfg):
    """Correct-class margins [K, m] of the MLP retrained from scratch (same init and procedure as the indexed
    model: experiments.common.train_minibatch, Adam lr 1e-3, batches of 256, cfg epochs) on each subset (cached)."""
    import torch

    path = fc.CACHE / f"lds_fmnist_mlp_{cfg_tag(cfg)}.npz"
    cache = fc.load_cache(path)
    done = 0
    margins = np.zeros((len(masks), len(yq)))
    if "masks" in cache and np.array_equal(cache["masks"][: len(cache["margins"])], masks[: len(cache["margins"])]):
        done = min(len(cache["margins"]), len(masks))
        margins[:done] = cache["margins"][:done]
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    x, y, xt = torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xq)
    for k in range(done, len(masks)):
        model = common.make_fmnist_mlp(cfg["hidden"], cfg["seed"], n_in=xtr.shape[1])
        sel = torch.from_numpy(np.flatnonzero(masks[k]))
        common.train_minibatch(model, x[sel], y[sel], l2=cfg["l2"], epochs=cfg["epochs"], seed=cfg["seed"])
        with torch.no_grad():
            z = model(xt).double().numpy()
        zy = z[np.arange(len(yq)), yq]
        z[np.arange(len(yq)), yq] = -np.inf
        margins[k] = zy - z.max(1)
        if (k + 1) % 10 == 0 or k + 1 == len(masks):
            fc.save_cache(path, {"masks": masks[: k + 1], "margins": margins[: k + 1]})
            el = time.perf_counter() - t0
            print(f"    retrained {k + 1}/{len(masks)} ({el:.0f}s, {el / (k + 1 - done):.1f}s each)", flush=True)
    return margins, time.perf_counter() - t0


MLP_SPEC = [
    {"kind": "linear", "in_features": 784, "out_features": MLP["hidden"], "bias": True},
    {"kind": "relu"},
    {"kind": "linear", "in_features": MLP["hidden"], "out_features": 10, "bias": True},
]


def cfg_tag(cfg: dict) -> str:
    """The MLP configuration as a file-name tag (cache keys)."""
    return "_".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in cfg.items())


def load_mlp(run) -> tuple[dict[str, np.ndarray], list[dict]]:
    """(head.safetensors' tensors, the head parameters in MLP_SPEC's layout) of an `mlp_model` directory."""
    from safetensors.numpy import load_file

    head = load_file(str(Path(run) / "head.safetensors"))
    params = [
        {"weight": head["0.weight"], "bias": head["0.bias"]},
        {},
        {"weight": head["2.weight"], "bias": head["2.bias"]},
    ]
    return head, params


def penultimate(params: list[dict], x: np.ndarray) -> np.ndarray:
    """[x's penultimate MLP features, 1] in float64: the representer's phi."""
    import influence as inf

    return inf.augment_features(np.asarray(inf.penultimate_features(MLP_SPEC, params, x), np.float64))


def mlp_model(cfg, xtr, ytr, xte, yte) -> Path:
    """The indexed model of the LDS, cached in experiments/cache/fmnist_mlp_<cfg>/: head.safetensors (trained
    by experiments.common.train_minibatch, one checkpoint per epoch), its 15 epoch checkpoints (TracIn), and Yeh et
    al.'s representer fit of its last layer (influence.fit_representer, lambda = l2/2 as the index builder).
    No Index is built: the curvature stage (top-64 eigenpairs of a 101,770-parameter GGN) takes hours on the
    shared 2-core machine; fidelity_mlp_scores.py recomputes it where the scores are computed."""
    import torch
    from safetensors.torch import save_file

    import influence as inf

    run = fc.CACHE / f"fmnist_mlp_{cfg_tag(cfg)}"
    if (run / "meta.json").exists():
        return run
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "head.safetensors").exists():
        torch.set_num_threads(1)
        model = common.make_fmnist_mlp(cfg["hidden"], cfg["seed"])
        ckpts: list = []
        common.train_minibatch(
            model,
            torch.from_numpy(xtr),
            torch.from_numpy(ytr),
            l2=cfg["l2"],
            epochs=cfg["epochs"],
            seed=cfg["seed"],
            checkpoints=ckpts,
        )
        torch.save(ckpts, run / "checkpoints.pt")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "head.safetensors"))
    head, params = load_mlp(run)
    lam = cfg["l2"] / 2
    phi = penultimate(params, xtr)
    theta0 = np.concatenate([head["2.weight"], head["2.bias"][:, None]], axis=1).astype(np.float64)
    _, alpha, grad_norm = inf.fit_representer(phi, ytr, theta0, lam=lam)
    np.save(run / "representer_alpha.npy", np.asarray(alpha, np.float64))
    phi_t = penultimate(params, xte)
    rep = np.asarray(inf.compute_representer_logits(np.asarray(alpha), phi, phi_t))
    logits = np.asarray(inf.apply_head(MLP_SPEC, params, xte), np.float64)
    meta = {
        "n_params": int(sum(v.size for v in head.values())),
        "test_accuracy": float((logits.argmax(1) == yte).mean()),
        "representer_lambda": lam,
        "representer_grad_norm": float(grad_norm),
        "representer_fidelity": float(inf.compute_fidelity(rep, logits)),
    }
    (run / "meta.json").write_text(json.dumps(meta, indent=1))
    return run


def representer_sweep(run, xtr, ytr, xte, lams=(5e-5, 5e-4, 5e-3, 2e-2, 5e-2)) -> list[dict]:
    """Representer fidelity of the MLP against Yeh et al.'s lambda, and how far the refit last layer moved."""
    import influence as inf

    head, params = load_mlp(run)
    phi, phi_t = penultimate(params, xtr), penultimate(params, xte)
    logits = np.asarray(inf.apply_head(MLP_SPEC, params, xte), np.float64)
    theta0 = np.concatenate([head["2.weight"], head["2.bias"][:, None]], axis=1).astype(np.float64)
    out = []
    for lam in lams:
        theta, alpha, _ = inf.fit_representer(phi, ytr, theta0, lam=lam)
        rep = np.asarray(inf.compute_representer_logits(np.asarray(alpha), phi, phi_t))
        out.append(
            {
                "lambda": lam,
                "fidelity": float(inf.compute_fidelity(rep, logits)),
                "refit_logits_vs_model_logits": float(inf.compute_fidelity(phi_t @ np.asarray(theta).T, logits)),
                "max_abs_change_of_last_layer": float(np.max(np.abs(np.asarray(theta) - theta0))),
            }
        )
        print(f"  representer lambda {lam:g}: fidelity {out[-1]['fidelity']:.4f}", flush=True)
    return out


def representer_scores(run, xq, yq) -> np.ndarray:
    """Yeh et al. representer scores [m, n] at the true labels, from the run's stored alpha and phi."""
    import influence as inf

    _, params = load_mlp(run)
    alpha = np.load(Path(run) / "representer_alpha.npy")
    h = np.asarray(fc.fmnist_arrays(MLP["n_train"], 1, MLP["seed"])[0])
    phi, phi_q = penultimate(params, h), penultimate(params, xq)
    q = np.asarray(inf.compute_representer_queries(phi_q, yq, 10))
    return q @ np.asarray(inf.compute_representer_embeddings(alpha, phi)).T


def mlp_scores_input(run_dir, xtr, ytr, xq, yq, cfg) -> dict[str, np.ndarray]:
    """The arrays fidelity_mlp_scores.compute_scores needs: the MLP's parameters (head.safetensors of
    mlp_model's directory), training pixels/labels, the query points and the epoch checkpoints."""
    import torch

    head, _ = load_mlp(run_dir)
    spec = MLP_SPEC
    ck = torch.load(Path(run_dir) / "checkpoints.pt", weights_only=True)
    stack = {k: np.stack([c[0][src].numpy() for c in ck]) for k, src in CK_KEYS.items()}
    return {
        "spec": np.asarray(json.dumps(spec)),
        "l2": np.asarray(cfg["l2"]),
        "train_h": xtr,
        "train_y": ytr,
        "query_h": xq,
        "query_y": yq,
        "W1": head["0.weight"],
        "b1": head["0.bias"],
        "W2": head["2.weight"],
        "b2": head["2.bias"],
        **stack,
        "ck_lr": np.asarray([c[1] for c in ck]),
    }


CK_KEYS = {"ck_W1": "0.weight", "ck_b1": "0.bias", "ck_W2": "2.weight", "ck_b2": "2.bias"}


def lds_fmnist_mlp(
    n_subsets: int, n_test: int, dampings: tuple[float, ...], seed: int = 0, export=None, retrain_only=False
) -> dict:
    cfg = MLP
    label = "fmnist_mlp"
    print(f"== {label} {cfg}", flush=True)
    xtr, ytr, xte, yte = fc.fmnist_arrays(cfg["n_train"], 1, cfg["seed"])
    n = len(ytr)
    masks = fc.half_masks(n_subsets, n, np.random.default_rng(seed))
    rows = np.sort(np.random.default_rng(seed + 1).choice(len(yte), size=n_test, replace=False))
    yq = yte[rows]
    score_path = fc.CACHE / f"lds_fmnist_mlp_scores_m{n_test}_s{seed}.npz"
    if export:  # needs only the trained model and its checkpoints
        run = mlp_model(cfg, xtr, ytr, xte, yte)
        np.savez(export, **mlp_scores_input(run, xtr, ytr, xte[rows], yq, cfg))
        print(
            f"wrote {export}: run `python -m experiments.fidelity_mlp_scores {export} OUT` and save OUT as {score_path}"
        )
        raise SystemExit(0)
    margins_all, retrain_s = retrain_mlp_subsets(xtr, ytr, xte, yte, masks, cfg)
    if retrain_only:
        raise SystemExit(0)
    margins = margins_all[:, rows].T  # [m, K]
    run = mlp_model(cfg, xtr, ytr, xte, yte)
    meta = json.loads((run / "meta.json").read_text())
    if "representer_lambda_sweep" not in meta:
        meta["representer_lambda_sweep"] = representer_sweep(run, xtr, ytr, xte)
        (run / "meta.json").write_text(json.dumps(meta, indent=1))
    out = {
        "model": f"784-{cfg['hidden']}-10 MLP, whole MLP as the head ({meta['n_params']} parameters)",
        "config": cfg,
        "test_accuracy_1000": meta["test_accuracy"],
        "n_subsets": n_subsets,
        "subset_size": int(n // 2),
        "n_test_points": n_test,
        "representer_fidelity": meta["representer_fidelity"],
        "representer_lambda": meta["representer_lambda"],
        "representer_lambda_sweep": meta["representer_lambda_sweep"],
        "seconds": {"retrain_now": retrain_s},
        "methods": {},
    }
    if not score_path.exists():  # in process (slow on CPU); or: --export-scores-input, run on a GPU, copy back
        from experiments.fidelity_mlp_scores import compute_scores

        inp = mlp_scores_input(run, xtr, ytr, xte[rows], yq, cfg)
        sc, dg = compute_scores(inp, dampings)
        np.savez(score_path, **{k: v.astype(np.float32) for k, v in sc.items()}, diag=np.asarray(json.dumps(dg)))
    with np.load(score_path) as z:
        scores = {k: np.asarray(z[k], np.float64) for k in z.files if k != "diag"}
        diags = json.loads(str(z["diag"]))
    out["curvature"] = diags.get("curvature")
    out["scores_computed_on"] = diags.get("device", "this machine (CPU)")
    out["seconds"]["scores"] = diags.get("total_seconds")
    scores["representer"] = representer_scores(run, xte[rows], yq)
    diags["representer"] = {}
    lis = scores["lissa"]
    out["pearson_of_projected_with_unprojected_lissa_scores"] = float(
        np.mean([fc.pearson(scores["lissa_proj1024"][j], lis[j]) for j in range(len(rows))])
    )
    for name, S in scores.items():
        rho = fc.lds_per_point(S, masks, margins)
        out["methods"][name] = {
            "lds_mean": float(np.nanmean(rho)),
            "lds_std": float(np.nanstd(rho)),
            "lds_median": float(np.nanmedian(rho)),
            "per_test_point": rho.tolist(),
            "solver": diags.get(name, {}),
        }
        print(f"  {name:22s} LDS {np.nanmean(rho):.4f} +- {np.nanstd(rho):.4f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subsets", type=int, default=100)
    ap.add_argument("--test-points", type=int, default=50)
    ap.add_argument("--mlp-test-points", type=int, default=50)
    ap.add_argument("--skip-fmnist", action="store_true")
    ap.add_argument("--export-scores-input", help="write the MLP scoring input (.npz) for an accelerator and stop")
    ap.add_argument("--retrain-only", action="store_true", help="only the MLP subset retrains (fills the cache)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.export_scores_input or args.retrain_only:
        lds_fmnist_mlp(
            args.subsets,
            args.mlp_test_points,
            MLP_DAMPINGS,
            export=args.export_scores_input,
            retrain_only=args.retrain_only,
        )
    results = {
        "lr_l2=1e-2": lds("lr_l2=1e-2", fc.digits_index("lr", 1e-2), args.subsets, args.test_points),
        "lr_l2=1e-3": lds("lr_l2=1e-3", fc.digits_index("lr", 1e-3), args.subsets, args.test_points),
    }
    summary = {lbl: {m: round(r["methods"][m]["lds_mean"], 4) for m in fc.METHODS} for lbl, r in results.items()}
    if not args.skip_fmnist:
        results["fmnist_mlp"] = lds_fmnist_mlp(args.subsets, args.mlp_test_points, MLP_DAMPINGS)
        summary["fmnist_mlp"] = {m: round(r["lds_mean"], 4) for m, r in results["fmnist_mlp"]["methods"].items()}
    path = fc.write_json(
        "fidelity_lds.json",
        {
            "protocol": __doc__,
            "summary_lds_mean": summary,
            "targets": {"exact": 0.9, "lissa": 0.9, "fmnist_mlp_best": 0.3},
            "results": results,
            "seconds": time.perf_counter() - t0,
        },
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (lbl, r) in zip(axes[0], results.items(), strict=True):
        names = list(r["methods"])
        ax.boxplot([r["methods"][m]["per_test_point"] for m in names])
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, fontsize=7)
        ax.axhline(0.3 if lbl == "fmnist_mlp" else 0.9, color="gray", ls="--", lw=0.7)
        ds = "Fashion-MNIST" if lbl == "fmnist_mlp" else "digits"
        ax.set_title(f"LDS, {ds} {lbl} ({r['n_subsets']} half subsets, {r['n_test_points']} test points)", fontsize=8)
        ax.set_ylabel("Spearman (per test point)")
    fig.tight_layout()
    fig.savefig(fc.RESULTS / "fidelity_lds.png", dpi=110)
    print(f"\nsummary (LDS, mean over test points): {summary}\nwrote {path} and fidelity_lds.png")


if __name__ == "__main__":
    main()
