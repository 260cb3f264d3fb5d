"""Influence through the whole model (issue 15): a Fashion-MNIST CNN, ours scope="model" and scope="head" beside
kronfluence (EK-FAC, K-FAC over every layer) and TRAK (1 checkpoint; 5 independently trained models), one run.

Usage: .venv/bin/python -m experiments.cnn_model_scope [--quick] [--reuse-ours] [--refresh-peers]
       [--no-kronfluence] [--no-trak]   (from the repository root; `make cnn-model-scope` installs the peers)

Model: Conv(1, 8, 5)-ReLU-MaxPool2-Conv(8, 16, 5)-ReLU-MaxPool2-Flatten-Linear(256, H)-ReLU-Linear(H, 10)
(H = 384: 105,962 parameters), trained with Adam (lr 1e-3, batches of 128, 8 epochs, two torch threads) on 5,000
seeded Fashion-MNIST training images (`fidelity_common.fmnist_arrays`) with the explicit L2 term
(l2 / 2) ||theta||^2, l2 = 1e-3, the Task declares. The trained model, its initialisation and the retrain margins
are cached under experiments/cache/cnn_model_scope/<tag>/ (tag from the configuration), so a re-run skips them.

LDS (Park et al. 2023): 50 seeded half subsets of the training set (`fidelity_common.half_masks`), the CNN retrained
from the same initialisation with the same procedure on each; the correct-class margin z_y - max_{c != y} z_c of
100 seeded test queries after each retrain; every method's scores at the queries' TRUE label; LDS per query =
Spearman over the subsets between the summed scores of the subset and the retrained margin
(`fidelity_common.lds_per_point`); reported mean +- standard error over the queries.

Rows, same model, same machine, same process:
- ours: `build_index` of the trained model with Task(scope="model") (every conv and linear layer, LoGra projection
  per layer, projected Gauss-Newton) and with the default head scope, build seconds and peak RSS; then every method
  of `api.METHODS` on a fresh `open_index` (`pairwise_scores(ids, method=m, targets=labels)`), scoring seconds and
  peak RSS; a method the scope refuses is recorded with its reason. For scope="model", a damping sweep:
  `open_index(run, lissa=LissaConfig(damping=d))`, method "exact", beside the build's own damping. The run
  directories stay in experiments/cache/cnn_model_scope/<tag>/runs/ (--reuse-ours reuses them; default: built
  afresh).
- kronfluence 1.0.1 (`.peers/kronfluence`), EK-FAC and K-FAC over every Conv2d / Linear layer: factors fitted on the
  training set, pairwise scores of the queries with its classification example's margin measurement at the true
  label and its damping heuristic (damping_factor=None), fit and pairwise timed separately
  (`kronfluence_scores`, as model_scale.py). Scores cached by configuration ("cached": true in the JSON).
- TRAK (traker, `.peers/trak`): CPU, `BasicProjector` with a normal projection (proj_dim 2048, one block), model
  output "image_classification" (margin), float32; one row with the trained model (1 checkpoint), one with 5
  independently trained models (seeds 1..5, same recipe, cached); featurize + finalize + score timed. Cached like
  kronfluence.
A peer that fails is recorded with its reason ("failed") and the run goes on.

Writes experiments/results/cnn_model_scope.json and .png (--quick: a smoke run, cnn_model_scope_quick.json under
experiments/cache/cnn_model_scope/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from experiments import common
from experiments import fidelity_common as fc

FULL = {
    "n_train": 5000,
    "hidden": 384,
    "epochs": 8,
    "l2": 1e-3,
    "n_subsets": 50,
    "n_queries": 100,
    "trak_models": 5,
    "trak_proj_dim": 2048,
}
QUICK = {
    "n_train": 600,
    "hidden": 32,
    "epochs": 2,
    "l2": 1e-3,
    "n_subsets": 8,
    "n_queries": 12,
    "trak_models": 2,
    "trak_proj_dim": 256,
}
DAMPINGS = (0.0, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)  # added to G + l2 I (scope="model", method "exact")
KRONFLUENCE_STRATEGIES = ("ekfac", "kfac")
KRONFLUENCE_VERSION = "1.0.1"
TRAK_VERSION = "0.3.2"
WORK = common.CACHE / "cnn_model_scope"
THREADS = 2


# ------------------------------------------------ shared with model_scale.py, copied (scripts never import each other)
def gflops() -> float:
    """This machine's float32 matmul rate now (2048 x 2048, median of 5)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((2048, 2048)).astype(np.float32) for _ in range(2))
    return common.matmul_gflop_s(a, b, repeats=5)


def code_version() -> dict[str, Any]:
    """The commit measured (MODEL_SCALE_COMMIT when run from an exported snapshot) and whether the library's
    packages had uncommitted changes."""
    out: dict[str, Any] = {"commit": os.environ.get("MODEL_SCALE_COMMIT")}
    try:
        git = ["git", "-C", str(common.ROOT)]
        if out["commit"] is None:
            out["commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "api", "influence", "indexer", "store"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
        out["uncommitted_library_changes"] = [line for line in dirty if line.strip()]
    except (OSError, subprocess.CalledProcessError):
        out["uncommitted_library_changes"] = "unknown (not a git checkout: an exported snapshot of the commit)"
    return out


def mean_se(rho: np.ndarray) -> tuple[float, float]:
    r = np.asarray(rho, np.float64)
    r = r[np.isfinite(r)]
    return float(r.mean()), float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else float("nan")


def lds_record(scores: np.ndarray, masks: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    rho = fc.lds_per_point(np.asarray(scores, np.float64), masks, truth)
    m, se = mean_se(rho)
    return {"lds_mean": m, "lds_se": se, "lds_median": float(np.nanmedian(rho)), "per_query": rho.tolist()}


def tag(c: dict) -> str:
    """The model's configuration as a file-name tag (cache keys)."""
    return f"n{c['n_train']}_h{c['hidden']}_e{c['epochs']}_l2{c['l2']:g}"


# ------------------------------------------------------------------------------------- model and ground truth
def make_cnn(hidden: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
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


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, l2: float, seed: int) -> nn.Module:
    """Adam lr 1e-3, batches of 128, loss mean CE + (l2 / 2) ||theta||^2."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), 128):
            idx = order[s : s + 128]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss = loss + 0.5 * l2 * sum((p**2).sum() for p in model.parameters())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Correct-class margins z_y - max_{c != y} z_c [m] (float64)."""
    with torch.no_grad():
        z = model(x).double()
    true = z[torch.arange(len(y)), y].clone()
    z[torch.arange(len(y)), y] = -torch.inf
    return (true - z.max(1).values).numpy()


def cached_model(path: Path, c: dict, seed: int, X, Y) -> tuple[nn.Module, float | None]:
    """make_cnn(hidden, seed) trained with the recipe, cached as a state dict; (model, seconds or None)."""
    model = make_cnn(c["hidden"], seed)
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval(), None
    t0 = time.perf_counter()
    train(model, X, Y, epochs=c["epochs"], l2=c["l2"], seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, time.perf_counter() - t0


def retrain_margins(work: Path, c: dict, init: dict, X, Y, Xte, Yte, masks: np.ndarray) -> tuple[np.ndarray, float]:
    """Margins [K, n_test] of the CNN retrained from `init` on each half subset, cached every 5 subsets
    (resumable; a cache of other masks is recomputed)."""
    path = work / "retrain_margins.npz"
    cache = fc.load_cache(path)
    out = np.zeros((len(masks), len(Yte)))
    done = 0
    if "masks" in cache:
        k = min(len(cache["margins"]), len(masks))
        if np.array_equal(cache["masks"][:k], masks[:k]):
            done = k
            out[:done] = cache["margins"][:done]
    t0 = time.perf_counter()
    for k in range(done, len(masks)):
        sub = make_cnn(c["hidden"], 0)
        sub.load_state_dict(init)
        idx = torch.as_tensor(np.flatnonzero(masks[k]))
        out[k] = margins(train(sub, X[idx], Y[idx], epochs=c["epochs"], l2=c["l2"], seed=0), Xte, Yte)
        if (k + 1) % 5 == 0 or k + 1 == len(masks):
            fc.save_cache(path, {"masks": masks[: k + 1], "margins": out[: k + 1]})
            el = time.perf_counter() - t0
            print(f"    retrained {k + 1}/{len(masks)} ({el:.0f} s, {el / (k + 1 - done):.1f} s each)", flush=True)
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------------ ours
def build_or_reuse(task, run: Path, reuse: bool) -> tuple[Any, dict[str, Any]]:
    """A fresh `build_index` (timed, peak RSS), or with `reuse` the run directory and its build record."""
    from api import build_index, open_index

    record = run.parent / f"{run.name}.build.json"
    if reuse and record.exists():
        try:
            index = open_index(run, task=task)
            rec = json.loads(record.read_text()) | {"reused": True}
            print(f"  reusing {run} (built in {rec['seconds']:.0f} s)", flush=True)
            return index, rec
        except Exception as err:  # (absent, incomplete or another model's: build afresh)
            print(f"  cannot reuse {run} ({type(err).__name__}: {err}): building", flush=True)
    common.fresh(run)
    record.unlink(missing_ok=True)
    common.peak_rss_reset()
    t0 = time.perf_counter()
    index = build_index(task, run, progress=False)
    rec = {
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": common.peak_rss_mb(),
        "at": datetime.datetime.now().isoformat(timespec="seconds"),
        "reused": False,
    }
    record.write_text(json.dumps(rec))
    print(f"  build_index: {rec['seconds']:.1f} s, peak RSS {rec['peak_rss_mb']:.0f} MB", flush=True)
    return index, rec


def score_ours(run: Path, task, method: str, labels: np.ndarray, masks, truth, lissa=None) -> dict[str, Any]:
    """Pairwise scores of the queries (test ids 0..m-1) at their labels on a fresh open_index: LDS, seconds, RSS."""
    from api import open_index

    index = open_index(run, task=task, lissa=lissa)
    index.engine.use_query_cache = False
    common.peak_rss_reset()
    t0 = time.perf_counter()
    S = np.asarray(index.pairwise_scores(list(range(len(labels))), method=method, targets=labels), np.float64)
    rec = {"score_seconds": time.perf_counter() - t0, "score_peak_rss_mb": common.peak_rss_mb()}
    index.close()
    return rec | lds_record(S, masks, truth)


def run_ours(scope: str, make_task, run: Path, labels, masks, truth, reuse: bool) -> dict[str, Any]:
    import api
    import influence

    task = make_task(scope)
    index, build = build_or_reuse(task, run, reuse)
    rec: dict[str, Any] = {"build": build, "n_params": int(index.run.n_params), "methods": {}}
    if scope == "model":
        rec["model_record"] = {k: v for k, v in index.run.extra["model"].items() if k != "layers"}
        rec["default_damping"] = float(index.run.extra["model"]["damping"])
    else:
        rec["default_damping"] = float(index.engine.damping)
    index.close()
    for m in api.METHODS:
        try:
            r = score_ours(run, task, m, labels, masks, truth)
        except ValueError as err:
            rec["methods"][m] = {"skipped": str(err)}
            print(f"  {scope:5s} {m:12s} skipped: {str(err)[:120]}", flush=True)
            continue
        except Exception as err:
            rec["methods"][m] = {"failed": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            print(f"  {scope:5s} {m:12s} FAILED {type(err).__name__}: {err}", flush=True)
            continue
        rec["methods"][m] = r
        print(
            f"  {scope:5s} {m:12s} LDS {r['lds_mean']:.3f} +- {r['lds_se']:.3f}  score {r['score_seconds']:.1f} s",
            flush=True,
        )
    if scope == "model":
        sweep_method = "exact" if "lds_mean" in rec["methods"].get("exact", {}) else "lissa"
        rec["damping_sweep"] = {"method": sweep_method, "default_damping": rec["default_damping"], "rows": {}}
        for d in DAMPINGS:
            try:
                r = score_ours(run, task, sweep_method, labels, masks, truth, influence.LissaConfig(damping=d))
            except Exception as err:
                rec["damping_sweep"]["rows"][f"{d:g}"] = {"failed": f"{type(err).__name__}: {err}"}
                print(f"  model {sweep_method} damping {d:g} FAILED {err}", flush=True)
                continue
            rec["damping_sweep"]["rows"][f"{d:g}"] = r
            print(f"  model {sweep_method} damping {d:<6g} LDS {r['lds_mean']:.3f} +- {r['lds_se']:.3f}", flush=True)
    return rec


# ------------------------------------------------------------------------------------------------------ peers
def kronfluence_scores(path: str, model, xtr, ytr, xq, yq, strategy: str, out: Path) -> dict[str, Any]:
    """kronfluence's own pipeline on the torch MLP: fit_all_factors on the training set, then
    compute_pairwise_scores of the queries (margin measurement at the true label, damping heuristic)."""
    import logging

    import torch
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    common.add_sys_path(path)
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KTask

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")  # torch.cuda.amp on CPU

    class ClassificationTask(KTask):  # kronfluence's examples/cifar/analyze.py
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if not sample:
                return F.cross_entropy(logits, labels, reduction="sum")
            with torch.no_grad():
                probs = torch.nn.functional.softmax(logits.detach(), dim=-1)
                sampled = torch.multinomial(probs, num_samples=1).flatten()
            return F.cross_entropy(logits, sampled, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            logits = model(inputs)
            bindex = torch.arange(logits.shape[0])
            correct = logits[bindex, labels]
            others = logits.clone()
            others[bindex, labels] = -torch.inf
            return -(correct - others.logsumexp(dim=-1)).sum()

    import copy

    task = ClassificationTask()
    kmodel = prepare_model(copy.deepcopy(model).eval(), task)
    common.fresh(out)
    analyzer = Analyzer(
        analysis_name=strategy, model=kmodel, task=task, cpu=True, disable_tqdm=True, output_dir=str(out)
    )
    train = TensorDataset(torch.from_numpy(xtr), torch.from_numpy(ytr))
    query = TensorDataset(torch.from_numpy(xq), torch.from_numpy(yq))
    common.peak_rss_reset()
    rate_before = gflops()
    t0 = time.perf_counter()
    analyzer.fit_all_factors(
        factors_name=strategy,
        factor_args=FactorArguments(strategy=strategy),
        dataset=train,
        per_device_batch_size=None,
        overwrite_output_dir=True,
    )
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    analyzer.compute_pairwise_scores(
        scores_name=strategy,
        factors_name=strategy,
        query_dataset=query,
        train_dataset=train,
        per_device_query_batch_size=len(yq),
        score_args=ScoreArguments(damping_factor=None),
        overwrite_output_dir=True,
    )
    pairwise_s = time.perf_counter() - t0
    S = analyzer.load_pairwise_scores(strategy)["all_modules"].double().numpy()
    return {
        "scores": S,
        "fit_seconds": fit_s,
        "pairwise_seconds": pairwise_s,
        "pairwise_seconds_per_query": pairwise_s / len(yq),
        "peak_rss_mb": common.peak_rss_mb(),
        "matmul_gflop_s_float32_at_fit": rate_before,
        "at": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def cached_scores(path: Path, shape: tuple[int, int], refresh: bool, compute) -> dict[str, Any]:
    """compute() -> {"scores": [m, n], ...meta}, cached in `path` (npz; "cached": True when read back)."""
    if path.exists() and not refresh:
        with np.load(path) as z:
            S, meta = np.asarray(z["scores"], np.float64), json.loads(str(z["meta"]))
        if S.shape != shape:
            raise SystemExit(f"{path}: scores of shape {S.shape}, expected {shape}: delete it")
        return meta | {"cached": True, "scores": S}
    r = compute()
    S = np.asarray(r.pop("scores"), np.float64)
    meta = r | {"cached": False}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, scores=S.astype(np.float32), meta=np.asarray(json.dumps(meta, default=float)))
    return meta | {"scores": S}


def peer_row(name: str, fn, masks, truth) -> dict[str, Any]:
    """One peer's row: its cached or computed scores' LDS and times, or {"failed": reason}."""
    try:
        r = fn()
    except Exception as err:  # (a peer's failure is a result: say why, go on)
        print(f"  {name}: FAILED {type(err).__name__}: {err}", flush=True)
        return {"failed": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    S = r.pop("scores")
    r |= lds_record(S, masks, truth)
    times = ", ".join(f"{k} {v:.1f}" for k, v in r.items() if k.endswith("seconds"))
    print(f"  {name:24s} LDS {r['lds_mean']:.3f} +- {r['lds_se']:.3f}  {times}{' (cached)' * r['cached']}", flush=True)
    return r


def trak_scores(path: str, models: list[nn.Module], X, Y, Xq, Yq, proj_dim: int, out: Path) -> dict[str, Any]:
    """TRAK (Park et al. 2023) with traker on CPU: one TRAKer over `models` (model ids 0..), BasicProjector
    (normal, one block of proj_dim columns), float32; featurize the training set, finalize, score the queries."""
    import logging

    common.add_sys_path(path, front=True)
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    logging.getLogger("TRAK").setLevel(logging.WARNING)
    common.fresh(out)
    n_params = sum(p.numel() for p in models[0].parameters())
    projector = BasicProjector(
        grad_dim=n_params,
        proj_dim=proj_dim,
        seed=0,
        proj_type=ProjectionType.normal,
        device="cpu",
        block_size=proj_dim,
    )
    template = make_cnn(int(models[0][-1].in_features), 0).eval()
    traker = TRAKer(
        model=template,
        task="image_classification",
        train_set_size=len(X),
        save_dir=str(out),
        device="cpu",
        projector=projector,
        use_half_precision=False,
        logging_level=logging.WARNING,
    )
    common.peak_rss_reset()
    t0 = time.perf_counter()
    for mid, model in enumerate(models):
        traker.load_checkpoint(model.state_dict(), model_id=mid)
        for s in range(0, len(X), 250):
            traker.featurize(batch=(X[s : s + 250], Y[s : s + 250]), num_samples=len(X[s : s + 250]))
    traker.finalize_features()
    featurize_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for mid, model in enumerate(models):
        traker.start_scoring_checkpoint(exp_name="queries", checkpoint=model.state_dict(), model_id=mid,
                                        num_targets=len(Xq))  # fmt: skip
        if not projector.proj_matrix_available:  # finalize_features freed it; traker regenerates it only when
            projector.generate_sketch_matrix(projector.generator_states[0])  # the model id changes (1 block)
        traker.score(batch=(Xq, Yq), num_samples=len(Xq))
    S = np.asarray(traker.finalize_scores(exp_name="queries"), np.float64).T  # traker: [n_train, m]
    score_s = time.perf_counter() - t0
    return {
        "scores": S,
        "featurize_seconds": featurize_s,
        "score_seconds": score_s,
        "peak_rss_mb": common.peak_rss_mb(),
        "proj_dim": proj_dim,
        "n_models": len(models),
        "at": datetime.datetime.now().isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------------------------------------ reporting
def table_rows(res: dict) -> list[dict[str, Any]]:
    rows = []
    for scope in ("model", "head"):
        o = res["ours"].get(scope)
        if o is None:
            continue
        for m, r in o["methods"].items():
            name = f"ours {scope} {m}"
            if "lds_mean" not in r:
                rows.append({"row": name, "skipped": r.get("skipped") or r.get("failed")})
                continue
            rows.append(
                {
                    "row": name,
                    "lds": r["lds_mean"],
                    "se": r["lds_se"],
                    "build_s": o["build"]["seconds"],
                    "score_s": r["score_seconds"],
                    "peak_rss_mb": max(o["build"]["peak_rss_mb"], r["score_peak_rss_mb"]),
                }
            )
    for s, r in res.get("kronfluence", {}).get("strategies", {}).items():
        if "lds_mean" not in r:
            rows.append({"row": f"kronfluence {s}", "skipped": r.get("failed")})
            continue
        rows.append(
            {
                "row": f"kronfluence {s}",
                "lds": r["lds_mean"],
                "se": r["lds_se"],
                "build_s": r["fit_seconds"],
                "score_s": r["pairwise_seconds"],
                "peak_rss_mb": r["peak_rss_mb"],
                "cached": r["cached"],
            }
        )
    for k, r in res.get("trak", {}).get("rows", {}).items():
        if "lds_mean" not in r:
            rows.append({"row": f"TRAK {k}", "skipped": r.get("failed")})
            continue
        rows.append(
            {
                "row": f"TRAK {k}",
                "lds": r["lds_mean"],
                "se": r["lds_se"],
                "build_s": r["featurize_seconds"],
                "score_s": r["score_seconds"],
                "peak_rss_mb": r["peak_rss_mb"],
                "cached": r["cached"],
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'row':28s} {'LDS':>15s} {'build/fit s':>11s} {'score s':>8s} {'peak RSS MB':>11s}")
    for r in rows:
        if "lds" not in r:
            print(f"{r['row']:28s} skipped: {str(r['skipped'])[:100]}")
            continue
        lds = f"{r['lds']:.3f} +- {r['se']:.3f}"
        print(f"{r['row']:28s} {lds:>15s} {r['build_s']:11.1f} {r['score_s']:8.1f} {r['peak_rss_mb']:11.0f}")


def targets(res: dict) -> dict[str, Any]:
    """Issue 15's targets as measured: ours scope="model" (its default method, and its best) against the best
    peer row and against ours scope="head"; build and scoring time against kronfluence EK-FAC's fit / pairwise."""
    import api

    ours = res["ours"]
    default = api.METHODS[0]

    def lds(scope, m):
        return ours.get(scope, {}).get("methods", {}).get(m, {}).get("lds_mean")

    def best(scope):
        got = {m: r["lds_mean"] for m, r in ours.get(scope, {}).get("methods", {}).items() if "lds_mean" in r}
        return max(got.items(), key=lambda kv: kv[1]) if got else (None, None)

    peers = {r["row"]: r["lds"] for r in table_rows(res) if "lds" in r and not r["row"].startswith("ours")}
    out: dict[str, Any] = {"default_method": default}
    model_default, head_default = lds("model", default), lds("head", default)
    (bm, bm_lds), (bh, bh_lds) = best("model"), best("head")
    out["ours_model_default_lds"], out["ours_model_best"] = model_default, {"method": bm, "lds": bm_lds}
    out["ours_head_default_lds"], out["ours_head_best"] = head_default, {"method": bh, "lds": bh_lds}
    if peers:
        bp = max(peers, key=peers.get)
        out["best_peer"] = {"row": bp, "lds": peers[bp]}
        if model_default is not None:
            out["ours_model_ge_best_peer_plus_0.05"] = model_default >= peers[bp] + 0.05
    if model_default is not None and head_default is not None:
        out["ours_model_gt_ours_head"] = model_default > head_default
    if bm_lds is not None and bh_lds is not None:
        out["ours_model_best_gt_ours_head_best"] = bm_lds > bh_lds
    ek = res.get("kronfluence", {}).get("strategies", {}).get("ekfac", {})
    md = ours.get("model", {}).get("methods", {}).get(default, {})
    if "lds_mean" in ek and "score_seconds" in md:
        build = ours["model"]["build"]["seconds"]
        out["build_le_2x_kronfluence_ekfac_fit"] = build <= 2 * ek["fit_seconds"]
        out["scoring_le_2x_kronfluence_ekfac_pairwise"] = md["score_seconds"] <= 2 * ek["pairwise_seconds"]
        out["ratios"] = {
            "build_over_kronfluence_fit": build / ek["fit_seconds"],
            "scoring_over_kronfluence_pairwise": md["score_seconds"] / ek["pairwise_seconds"],
        }
    sweep = ours.get("model", {}).get("damping_sweep", {})
    got = {d: r["lds_mean"] for d, r in sweep.get("rows", {}).items() if "lds_mean" in r}
    if got:
        bd = max(got, key=got.get)
        out["damping_sweep_best"] = {"damping": float(bd), "lds": got[bd], "method": sweep["method"]}
        out["damping_default"] = sweep["default_damping"]
    return out


def plot(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [1.3, 1.1, 1]})
    rows = [r for r in table_rows(res) if "lds" in r]
    names = [r["row"] for r in rows]

    def color(n):
        return "tab:orange" if n.startswith("kronfluence") else "tab:green" if n.startswith("TRAK") else (
            "tab:blue" if n.startswith("ours model") else "tab:cyan")  # fmt: skip

    cols = [color(n) for n in names]
    a1.barh(range(len(rows)), [r["lds"] for r in rows], xerr=[r["se"] for r in rows], color=cols, capsize=3)
    a1.set_yticks(range(len(rows)), names, fontsize=7)
    a1.invert_yaxis()
    a1.axvline(0, color="gray", lw=0.6)
    a1.set_xlabel("LDS (mean +- s.e. over queries)")
    c = res["config"]
    a1.set_title(
        f"Fashion-MNIST CNN, {res['n_params']:,} params, {c['n_train']} train, {c['n_subsets']} retrains, "
        f"{c['n_queries']} queries",
        fontsize=8,
    )
    build = [r["build_s"] for r in rows]
    score = [r["score_s"] for r in rows]
    a2.barh(range(len(rows)), build, color=cols, alpha=0.5, label="build / fit / featurize")
    a2.barh(range(len(rows)), score, left=build, color=cols, label=f"scoring {c['n_queries']} queries")
    a2.set_yticks(range(len(rows)), names, fontsize=7)
    a2.invert_yaxis()
    a2.set_xscale("log")
    a2.set_xlabel("seconds (light: build / fit; dark: scoring)")
    a2.set_title("time on this machine (2 shared cores)", fontsize=8)
    sweep = res["ours"].get("model", {}).get("damping_sweep", {})
    pts = [(float(d), r) for d, r in sweep.get("rows", {}).items() if "lds_mean" in r]
    if pts:
        pos = [d for d, _ in pts if d > 0]
        floor = min(pos) / 10 if pos else 1e-5
        xs = [d if d > 0 else floor for d, _ in pts]
        a3.errorbar(xs, [r["lds_mean"] for _, r in pts], yerr=[r["lds_se"] for _, r in pts], marker="o", capsize=3,
                    label=f"ours model {sweep['method']}")  # fmt: skip
        a3.set_xscale("log")
        a3.set_xticks(xs, ["0" if d == 0 else f"{d:g}" for d, _ in pts], fontsize=7)
        dd = sweep["default_damping"]
        a3.axvline(max(dd, floor), color="tab:blue", ls=":", lw=1, label=f"build's damping ({dd:.3g})")
        for r in rows:
            if not r["row"].startswith("ours"):
                a3.axhline(r["lds"], color=color(r["row"]), ls="--", lw=0.8, label=r["row"])
        a3.set_xlabel("damping added to G + l2 I")
        a3.set_ylabel("LDS")
        a3.legend(fontsize=6)
        a3.set_title('scope="model" damping sweep', fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 600 train, H 32, 2 epochs, 8 subsets")
    ap.add_argument("--reuse-ours", action="store_true", help="reuse the cached run directories (else built afresh)")
    ap.add_argument("--refresh-peers", action="store_true", help="recompute the peers' scores (else cached)")
    ap.add_argument("--kronfluence-path", default=str(common.PEERS / "kronfluence"))
    ap.add_argument("--trak-path", default=str(common.PEERS / "trak"))
    ap.add_argument("--no-kronfluence", action="store_true")
    ap.add_argument("--no-trak", action="store_true")
    args = ap.parse_args()
    c = QUICK if args.quick else FULL
    work = WORK / tag(c)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(THREADS)
    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "protocol": __doc__,
        "config": c | {"dampings": list(DAMPINGS), "torch_threads": THREADS},
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "code": code_version(),
        "machine": {"cpus": os.cpu_count(), "load_average_start": os.getloadavg()},
    }
    res["machine"]["matmul_gflop_s_float32_start"] = gflops()
    print(f"== cnn model scope {'(quick) ' if args.quick else ''}{c}", flush=True)

    xtr, ytr, xte, yte = fc.fmnist_arrays(c["n_train"])
    xtr, xte = xtr.reshape(-1, 1, 28, 28), xte.reshape(-1, 1, 28, 28)
    X, Y, Xte, Yte = (torch.as_tensor(a) for a in (xtr, ytr, xte, yte))
    q = np.sort(np.random.default_rng(0).choice(len(Xte), size=c["n_queries"], replace=False))
    Xq, Yq = Xte[q], Yte[q]
    init_path = work / "init.pt"
    if not init_path.exists():
        torch.save(make_cnn(c["hidden"], 0).state_dict(), init_path)
    init = torch.load(init_path)
    model, train_s = cached_model(work / "model.pt", c, 0, X, Y)
    res["n_params"] = sum(p.numel() for p in model.parameters())
    res["model"] = {
        "train_accuracy": float((margins(model, X, Y) > 0).mean()),
        "test_accuracy_1000": float((margins(model, Xte, Yte) > 0).mean()),
        "train_seconds": train_s,
    }
    print(f"  model: {res['n_params']:,} params, {res['model']}", flush=True)
    masks = fc.half_masks(c["n_subsets"], len(X), np.random.default_rng(1))
    all_margins, retrain_s = retrain_margins(work, c, init, X, Y, Xte, Yte, masks)
    res["retrain_seconds_now"] = retrain_s
    truth = all_margins[:, q].T  # [m, K]
    res["queries"] = {"test_rows": q.tolist()}
    labels = Yq.numpy()

    print("== ours", flush=True)
    from indexer import Task

    train_ds = list(zip(X, Y.tolist(), strict=True))
    test_ds = list(zip(Xq, Yq.tolist(), strict=True))

    def make_task(scope):
        return Task(model=model, train=train_ds, test=test_ds, l2=c["l2"], scope=scope, batch_size=128)

    res["ours"] = {}
    for scope in ("model", "head"):
        res["ours"][scope] = run_ours(
            scope, make_task, work / "runs" / scope, labels, masks, truth, args.reuse_ours
        )  # fmt: skip
    import api

    res["ours"]["methods_registered"] = list(api.METHODS)

    shape = (len(q), len(X))
    print("== kronfluence", flush=True)
    kpath = Path(args.kronfluence_path)
    if args.no_kronfluence:
        res["kronfluence"] = {"failed": "not run (--no-kronfluence)"}
    elif not (kpath / "kronfluence").exists():
        res["kronfluence"] = {"failed": f"kronfluence not installed in {kpath}: run `make .peers/.kronfluence`"}
        print(f"  {res['kronfluence']['failed']}", flush=True)
    else:
        res["kronfluence"] = {"version": KRONFLUENCE_VERSION, "path": str(kpath), "strategies": {}}
        for s in KRONFLUENCE_STRATEGIES:
            key = f"kronfluence{KRONFLUENCE_VERSION}_{s}_dampNone_m{len(q)}"

            def compute(s=s, key=key):
                return kronfluence_scores(str(kpath), model, xtr, ytr, xte[q], yte[q], s, work / "kronfluence" / key)

            res["kronfluence"]["strategies"][s] = peer_row(
                f"kronfluence {s}",
                lambda key=key, compute=compute: cached_scores(work / f"{key}.npz", shape, args.refresh_peers, compute),
                masks,
                truth,
            )

    print("== TRAK", flush=True)
    tpath = Path(args.trak_path)
    if args.no_trak:
        res["trak"] = {"failed": "not run (--no-trak)"}
    elif not (tpath / "trak").exists():
        res["trak"] = {"failed": f"traker not installed in {tpath}: run `make .peers/.trak`"}
        print(f"  {res['trak']['failed']}", flush=True)
    else:
        res["trak"] = {"version": TRAK_VERSION, "path": str(tpath), "rows": {}, "independent_models": {}}
        seeds = list(range(1, c["trak_models"] + 1))
        others = []
        for s in seeds:
            m, sec = cached_model(work / f"model_seed{s}.pt", c, s, X, Y)
            others.append(m)
            res["trak"]["independent_models"][s] = {
                "test_accuracy_1000": float((margins(m, Xte, Yte) > 0).mean()),
                "train_seconds": sec,
            }
        for name, models in (("1 ckpt", [model]), (f"{len(seeds)} models", others)):
            key = f"trak{TRAK_VERSION}_{name.replace(' ', '')}_p{c['trak_proj_dim']}_m{len(q)}"

            def compute(models=models, key=key):
                return trak_scores(str(tpath), models, X, Y, Xq, Yq, c["trak_proj_dim"], work / "trak" / key)

            res["trak"]["rows"][name] = peer_row(
                f"TRAK {name}",
                lambda key=key, compute=compute: cached_scores(work / f"{key}.npz", shape, args.refresh_peers, compute),
                masks,
                truth,
            )

    res["machine"]["matmul_gflop_s_float32_end"] = gflops()
    res["machine"]["load_average_end"] = os.getloadavg()
    res["table"] = table_rows(res)
    res["targets"] = targets(res)
    res["seconds"] = time.perf_counter() - t_start
    print_table(res["table"])
    sweep = res["ours"]["model"].get("damping_sweep", {})
    print(f"\ndamping sweep ({sweep.get('method')}, build's damping {sweep.get('default_damping')}):")
    for d, r in sweep.get("rows", {}).items():
        print(f"  {d:>7s}  " + (f"{r['lds_mean']:.3f} +- {r['lds_se']:.3f}" if "lds_mean" in r else r["failed"]))
    print(f"\ntargets: {json.dumps(res['targets'], default=float)}")
    out = WORK / "cnn_model_scope_quick.json" if args.quick else common.RESULTS / "cnn_model_scope.json"
    common.save_results(res, out, plot)


if __name__ == "__main__":
    sys.exit(main())
