"""Does `explain` on a projected head return the exact top-10? Raw projected gradients against the whitened space
(issue 14 item 3).

Model: the Fashion-MNIST MLP 784-128-10 of issue 14 (whole MLP as the head: 101,770 parameters, so the default
build projects head gradients to 1,024 dimensions), trained on N seeded training images (default 60,000; Adam
lr 1e-3, batch 256, 15 epochs, l2 = 1e-3), indexed by `build_index` with the default IndexConfig (the whitened space
"grad-whitened" holds P K^-1/2 g_i, K the run's EK-FAC; the record `whitened` says which model). For seeded test
queries at their predicted class, the exact all-row top-10 proponents and opponents of the default method (`lissa`)
and of `grad-dot` come from dense scores computed chunk by chunk (`Scorer.train_vectors`). Reported:

- offline: explain's search replayed on the dense arrays (the c highest and c lowest FAISS inner products per
  query are the candidates, their union re-scored exactly) for c in PER_SIGN, candidates from the raw projected
  space ("grad") and from the whitened one: recall@10 per sign and both, the union's size as a share of n;
- explain itself at c = 0.5% of n per sign (floor 200), raw and whitened: recall@10 and seconds per query;
- build time per stage. The dense exact scores and estimates go to experiments/cache/ (npz) for analysis.

    python -m experiments.projected_recall [--n-train 60000] [--queries 50]     (needs `make data`)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import influence as inf
from experiments.common import CACHE, RESULTS, fresh, load_fashion_mnist, make_fmnist_mlp, save_results, train_minibatch

L2 = 1e-3
#: explain is measured at this share of the training set per sign (the union of both signs <= 1%)
BUDGET = 0.005
METHODS = ("lissa", "grad-dot")


#: candidates per sign of the offline curve (the union of both signs is re-scored); explain's floor is 20 k = 200
PER_SIGN = (50, 100, 150, 200, 300, 500, 1000, 2000)


def dense_scores(index, method: str, test_ids: list[int], chunk: int = 2048):
    """(query vectors q [m, p], exact scores q . g_i [m, n]) from the unprojected training gradients, chunk by chunk."""
    from api.scorers import scorer_for

    engine = index.engine
    scorer = scorer_for(engine, method)
    q, _ = scorer.query_vectors(engine.prepare(test_ids, None, None))
    n = len(index.train_ids)
    scores = np.empty((len(test_ids), n), np.float64)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        scores[:, sl] = q @ np.asarray(scorer.train_vectors(sl), np.float64).T
    return np.asarray(q, np.float32), scores


def estimates(index, q: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(the FAISS inner products of every training row [m, n]: "raw" P q . P g_i (space "grad"), "whitened"
    P y . P K^-1/2 g_i with the engine's query side y (K^1/2 q deflated along the ReLU rescaling directions,
    `influence.symmetry`) against the vectors the build stored (space "grad-whitened"), "whitened_undeflated" the
    same with y = K^1/2 q; the engine's P y [m, d])."""
    from indexer.training_set import whitening_powers

    engine, run = index.engine, index.run
    raw = engine.project(q) @ np.asarray(run.array("grad_vectors"), np.float32).T
    stored = np.asarray(run.array("whitened_vectors"))
    white = engine.project(np.asarray(engine.whitening_half(q), np.float32))
    up = whitening_powers(run.paths, run.extra, run.extra["whitened"])[1]  # K^1/2 without the deflation
    plain = engine.project(np.asarray(up(q), np.float32))
    return {
        "raw": raw.astype(np.float64),
        "whitened_undeflated": (plain @ stored.T).astype(np.float64),
        "whitened": (white @ stored.T).astype(np.float64),
    }, white


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the k highest, of the k lowest) per row, ties by position (`influence.topk_both_signs`)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k], np.argsort(scores, axis=1, kind="stable")[:, :k]


def offline_recall(exact: np.ndarray, est: np.ndarray, per_sign: int, k: int = 10) -> dict[str, float]:
    """explain's search replayed on the dense arrays: the per_sign highest and lowest estimates are the candidates,
    their union is re-scored exactly, its top-k / bottom-k compared with the all-row exact top-k / bottom-k."""
    top, bottom = top_k(exact, k)
    cand_pos, cand_neg = top_k(est, per_sign)
    rec_pos, rec_neg, union = [], [], []
    for j in range(len(exact)):
        cand = np.union1d(cand_pos[j], cand_neg[j])
        union.append(len(cand))
        s = exact[j, cand]
        found_top = cand[np.argsort(-s, kind="stable")[:k]]
        found_bottom = cand[np.argsort(s, kind="stable")[:k]]
        rec_pos.append(len(set(top[j].tolist()) & set(found_top.tolist())) / k)
        rec_neg.append(len(set(bottom[j].tolist()) & set(found_bottom.tolist())) / k)
    n = exact.shape[1]
    return {
        "candidates_per_sign": per_sign,
        "union_mean": float(np.mean(union)),
        "union_share": float(np.mean(union) / n),
        "recall_at_10": float(np.mean(rec_pos + rec_neg)),
        "recall_at_10_proponents": float(np.mean(rec_pos)),
        "recall_at_10_opponents": float(np.mean(rec_neg)),
        "min_query_recall": float(np.min(np.add(rec_pos, rec_neg) / 2)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=60_000)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--out", default=str(RESULTS / "projected_recall.json"))
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to measure")
    ap.add_argument("--skip-explain", action="store_true", help="the offline replay only (no explain calls)")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="measure the complete run already in experiments/cache (query-side changes need no rebuild)",
    )
    args = ap.parse_args()
    from api import build_index, open_index
    from indexer import Task

    torch.set_num_threads(2)
    run = CACHE / f"projected_recall_{args.n_train}"
    if args.reuse:
        index, train_s, build_s = open_index(run), None, None
        n_test = len(index.run.test.labels)
    else:
        xtr, ytr, xte, yte = load_fashion_mnist(args.n_train, seed=0)
        t0 = time.perf_counter()
        model = make_fmnist_mlp(128, 0)
        model = train_minibatch(model, torch.tensor(xtr), torch.tensor(ytr), l2=L2, epochs=15, seed=0)
        train_s = time.perf_counter() - t0
        task = Task(
            model=model,
            train=torch.utils.data.TensorDataset(torch.tensor(xtr), torch.tensor(ytr)),
            test=torch.utils.data.TensorDataset(torch.tensor(xte), torch.tensor(yte)),
            l2=L2,
        )
        t0 = time.perf_counter()
        index = build_index(task, fresh(run), progress=True)
        build_s = time.perf_counter() - t0
        n_test = len(xte)
    test_ids = sorted(np.random.default_rng(0).choice(n_test, size=args.queries, replace=False).tolist())
    n = len(index.train_ids)
    res = {
        "model": f"Fashion-MNIST MLP 784-128-10, {n} training images, l2 = 1e-3, Adam 15 epochs",
        "n_train": n,
        "n_params": index.run.n_params,
        "projection": {"dim": index.run.projection.dim, "seed": index.run.projection.seed},
        "whitened": index.manifest.extra.get("whitened"),
        "damping": index.manifest.extra.get("damping"),
        "reused_build": bool(args.reuse),
        "rescaling_directions": len(inf.rescaling_directions(index.run.spec, index.run.params)),
        "train_seconds": train_s,
        "build_seconds": build_s,
        "build_stage_seconds": index.manifest.extra.get("stage_seconds"),
        "queries": len(test_ids),
        "k": 10,
        "methods": {},
    }
    dumps = {}
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        q, exact = dense_scores(index, method, test_ids)
        out = {"exact_seconds": time.perf_counter() - t0, "offline": {}, "explain": {}}
        est, white = estimates(index, q)
        dumps |= {f"{method}_exact": exact, f"{method}_query_whitened": white}
        dumps |= {f"{method}_{name}": e for name, e in est.items()}
        for name, e in est.items():
            out["offline"][name] = [offline_recall(exact, e, c) for c in PER_SIGN if c <= n // 2]
            out["pearson_" + name] = float(np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(e, exact, strict=True)]))
            for row in out["offline"][name]:
                print(
                    f"{method:8s} {name:8s} {row['candidates_per_sign']:5d} per sign (union {row['union_share']:.2%})"
                    f" recall@10 {row['recall_at_10']:.3f} (+ {row['recall_at_10_proponents']:.3f},"
                    f" - {row['recall_at_10_opponents']:.3f})",
                    flush=True,
                )
        res["methods"][method] = out
        if args.skip_explain:
            continue
        # explain itself at the budget that keeps the union within 1% (its floor: 20 k = 200 per sign)
        cands = max(1, round(BUDGET * n))
        index.engine.min_candidates = cands
        top, bottom = top_k(exact, 10)
        ids = np.asarray(index.train_ids)
        for whitened in (False, True):
            index.engine.use_whitened_space = whitened
            index.explain(test_ids=test_ids[:1], k=10, method=method)  # compile, untimed
            t0 = time.perf_counter()
            exps = index.explain(test_ids=test_ids, k=10, method=method)
            seconds = (time.perf_counter() - t0) / len(test_ids)
            found = []
            for exp, t, b in zip(exps, top, bottom, strict=True):
                found.append(len(set(ids[t].tolist()) & {p.example_id for p in exp.proponents}) / 10)
                found.append(len(set(ids[b].tolist()) & {p.example_id for p in exp.opponents}) / 10)
            name = "whitened" if whitened else "raw"
            out["explain"][name] = {
                "candidates_per_sign": max(cands, 200),
                "recall_at_10": float(np.mean(found)),
                "seconds_per_query": seconds,
            }
            print(
                f"{method:8s} explain {name:8s} {max(cands, 200)} per sign recall@10 {np.mean(found):.3f}  {seconds:.3f} s/query",
                flush=True,
            )
        res["methods"][method] = out
    index.close()
    np.savez(CACHE / f"projected_recall_{args.n_train}_scores.npz", test_ids=np.asarray(test_ids), **dumps)
    save_results(res, Path(args.out), plot)


def plot(res, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(res["methods"]), figsize=(8, 3.2), sharey=True)
    for ax, (method, out) in zip(np.atleast_1d(axes), res["methods"].items(), strict=True):
        for name, rows in out["offline"].items():
            ax.plot([r["union_share"] * 100 for r in rows], [r["recall_at_10"] for r in rows], "o-", label=name)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("candidates re-scored (union of both signs, % of n)")
        ax.set_xscale("log")
        ax.axhline(0.95, color="gray", lw=0.8, ls="--")
        ax.axvline(1.0, color="gray", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("recall@10 of the exact top-10")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    model = (res.get("whitened") or {}).get("model", "spectral")
    fig.suptitle(
        f"Fashion-MNIST MLP, n = {res['n_train']:,}, p = {res['n_params']:,} projected to {res['projection']['dim']}"
        f", whitened by {model}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
