"""Probe (the job's own refit functions, no index): does averaging R K-fold runs of the out-of-sample refits help?

`find_label_noise`'s out-of-sample probabilities come from one K-fold run of refits (`oos_refit`): for a head with
one linear layer, convex L-BFGS refits of it warm-started from the model (`influence.noise.
compute_out_of_sample_probs`); for a head with hidden layers, refits of the whole head from fresh initialisations
(`influence.noise.compute_out_of_sample_probs_head`). Both depend on the fold split, the whole-head refit also on
its initialisation and minibatch order. This probe runs the refit the job picks for each model with R = 1 and
R = 2 (fold seeds 0 and 1, probabilities averaged: repeated cross-validation) on the label-noise benchmark's
data, flips and models (experiments.label_noise: Fashion-MNIST 10k, 10% uniform flips, seeds 0-4) and scores
the job's non-exact fused rule (mean rank of the class-normalised training loss and out-of-sample loss), the
out-of-sample loss alone and training loss.

Usage: .venv/bin/python -m experiments.noise_oos_repeats_probe [--models fmnist-mlp fmnist-logreg] [--seeds 5]
Results -> experiments/results/noise_oos_repeats_probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import influence as inf
from api.noise import fused_score as api_fused_score
from experiments import common
from indexer.translate import translate_head
from influence import noise as nz


def fused_score(loss: np.ndarray, oos_loss: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The job's fused rule (`api.noise.fused_score`) on these losses."""
    return api_fused_score({"loss": loss, "oos-loss": oos_loss}, labels)


def oos_runs(name: str, model: torch.nn.Module, x: np.ndarray, y: np.ndarray, loss: np.ndarray, l2: float, runs: int):
    """One K-fold run per fold seed 0..runs-1 of the refit the job picks for this model (5 folds)."""
    head = translate_head(list(model))
    if nz.count_linear_layers(head.spec) >= 2:
        return [
            nz.compute_out_of_sample_probs_head(head.spec, x, y, loss, l2=l2, folds=5, seed=r)[0] for r in range(runs)
        ], "whole-head"
    last = head.params[inf.last_linear_index(head.spec)]
    theta0 = np.concatenate([np.asarray(last["weight"], np.float64), np.asarray(last["bias"], np.float64)[:, None]], 1)
    phi = inf.augment_features(np.asarray(x, np.float64))
    return [
        nz.compute_out_of_sample_probs(phi, y, theta0, lam=l2 / 2, folds=5, seed=r) for r in range(runs)
    ], "last-layer"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["fmnist-mlp", "fmnist-logreg"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--fmnist-train", type=int, default=10_000)
    ap.add_argument("--out", default=str(common.RESULTS / "noise_oos_repeats_probe.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    results: dict[str, object] = {"args": vars(args), "models": {}}
    for name in args.models:
        data = common.load_noise_dataset(name, args.fmnist_train)
        x, y, l2 = data["x"], data["y"], data["l2"]
        rows = np.arange(len(y))
        runs = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            noisy, is_flip, model = common.train_on_flips(name, data, seed)
            with torch.no_grad():
                logits = model(torch.from_numpy(x)).double().numpy()
            loss = np.asarray(inf.cross_entropy(logits, noisy), np.float64)
            probs, refit = oos_runs(name, model, x, noisy, loss, l2, 2)
            scores = {"loss": loss}
            for label, p in (("R=1", probs[0]), ("R=2", (probs[0] + probs[1]) / 2)):
                oos_loss = -np.log(np.clip(p[rows, noisy], 1e-300, None))
                scores[f"oos-loss {label}"] = oos_loss
                scores[f"fused {label}"] = fused_score(loss, oos_loss, noisy)
            orders = {m: np.argsort(-s, kind="stable") for m, s in scores.items()}
            metrics = common.detection_metrics(scores, orders, is_flip, checked=(0.1,))
            runs.append({"seed": seed, "refit": refit, "seconds": time.perf_counter() - t0, "metrics": metrics})
            print(name, seed, {m: round(v["found@10"], 3) for m, v in metrics.items()}, flush=True)
        summary = {
            m: {key: float(np.mean([r["metrics"][m][key] for r in runs])) for key in ("auc", "found@10")}
            for m in runs[0]["metrics"]
        }
        results["models"][name] = {"runs": runs, "summary": summary}
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
