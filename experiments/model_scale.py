"""Influence at model scale (issue 14): the Fashion-MNIST MLP, every method of ours beside kronfluence, one run.

Usage: .venv/bin/python -m experiments.model_scale [--quick] [--resume] [--refresh-kronfluence]
       [--kronfluence-path .peers/kronfluence]   (from the repository root; `make model-scale` installs the peer)

The recipe of shared/EVALUATION.md ("Model scale, measured here side by side"): Fashion-MNIST MLP 784-128-10, the
whole MLP as the head (101,770 parameters), 5,000 seeded training / 1,000 seeded test images
(`fidelity_common.fmnist_arrays`), Adam lr 1e-3, batches of 256, 15 epochs, l2 = 1e-3 explicit
(`common.train_minibatch`). The model is trained once and cached: ours, kronfluence and the retrains all start from
the same weights and the same initialisation.

LDS (Park et al. 2023): 50 seeded half subsets of the training set (`fidelity_common.half_masks`), the MLP retrained
from the same initialisation with the same procedure on each (torch, one thread; the correct-class margins
z_y - max_{c != y} z_c of all 1,000 test points cached in experiments/cache/model_scale/); 100 seeded test queries
scored at their TRUE label; LDS(q) = Spearman over the subsets between sum_{i in S_k} score(q, i) and the retrained
margin (`fidelity_common.lds_per_point`); reported: mean +- standard error over the queries.

Methods, same model, same machine, same process:
- ours through the public API: a fresh `build_index` (timed), then every method of `api.METHODS` that applies to this
  head (a method raising "needs a head with at most ..." is skipped with its reason, so methods added later are
  picked up): `index.pairwise_scores(test_ids, method=m, targets=labels)` on a fresh `open_index` (query cache off)
  after one warm-up call on other ids, timed; `explain(test_ids=[i], k=10)` median over 10 calls after a first one
  on another fresh `open_index`. Plus the LiSSA damping sweep through `open_index(run, lissa=LissaConfig(damping=d))`,
  each LDS beside the default's chosen damping (`index.engine.damping`).
- kronfluence (`.peers/kronfluence`, its own way): an `Analyzer` on the torch MLP, factors fitted on the 5,000
  training images (EK-FAC and K-FAC, true Fisher with sampled labels, its defaults), pairwise scores of the 100
  queries with its classification example's measurement (the true label's margin against the logsumexp of the
  others) and its damping heuristic (`damping_factor=None`: 0.1 x the mean eigenvalue); fit and pairwise timed
  separately. Cached by configuration (experiments/cache/model_scale/), so a re-run recomputes only ours.
- the machine's float32 matmul rate (GFLOP/s) at the start and the end of the run.

Writes experiments/results/model_scale.json and model_scale.png (with --quick: experiments/cache/model_scale/quick/,
a smoke test on 1,000 training images, 2 epochs, 10 subsets, 20 queries). --resume keeps a complete run directory
of the same model and the per-method results already measured on it (an interrupted run continues).
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

from experiments import common
from experiments import fidelity_common as fc

FULL = {
    "model": {"n_train": 5000, "hidden": 128, "l2": 1e-3, "epochs": 15, "seed": 0},
    "n_subsets": 50,
    "n_queries": 100,
    "explain_calls": 10,
}
QUICK = {
    "model": {"n_train": 1000, "hidden": 128, "l2": 1e-3, "epochs": 2, "seed": 0},
    "n_subsets": 10,
    "n_queries": 20,
    "explain_calls": 3,
}
DAMPINGS = (0.0, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1)  # the LiSSA sweep (absolute damping added to C + l2 I)
KRONFLUENCE_STRATEGIES = ("ekfac", "kfac")
KRONFLUENCE_VERSION = "1.0.1"
WORK = common.CACHE / "model_scale"
NEEDS_SMALLER_HEAD = "needs a head with at most"


def tag(cfg: dict) -> str:
    """A configuration as a file-name tag (cache keys)."""
    return "_".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in cfg.items())


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


# ------------------------------------------------------------------------------------- model and ground truth
def one_thread_torch():
    import torch

    class _Ctx:
        def __enter__(self):
            self.n = torch.get_num_threads()
            torch.set_num_threads(1)

        def __exit__(self, *exc):
            torch.set_num_threads(self.n)

    return _Ctx()


def trained_model(cfg: dict, xtr: np.ndarray, ytr: np.ndarray):
    """The MLP trained once with the recipe (torch, one thread), cached as safetensors; (model, seconds or None)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = WORK / f"model_{tag(cfg)}.safetensors"
    model = common.make_fmnist_mlp(cfg["hidden"], cfg["seed"])
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval(), None
    t0 = time.perf_counter()
    with one_thread_torch():
        x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
        common.train_minibatch(model, x, y, l2=cfg["l2"], epochs=cfg["epochs"], seed=cfg["seed"])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval(), time.perf_counter() - t0


def margins_of(model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Correct-class margins z_y - max_{c != y} z_c [m] (float64)."""
    import torch

    with torch.no_grad():
        z = model(torch.from_numpy(x)).double().numpy()
    zy = z[np.arange(len(y)), y].copy()
    z[np.arange(len(y)), y] = -np.inf
    return zy - z.max(1)


def retrain_margins(cfg: dict, xtr, ytr, xte, yte, masks: np.ndarray) -> tuple[np.ndarray, float]:
    """Margins [K, n_test] of the MLP retrained from the same initialisation, with the same procedure, on each half
    subset (torch, one thread); cached in experiments/cache/model_scale/ every 10 subsets (resumable)."""
    import torch

    path = WORK / f"retrain_margins_{tag(cfg)}.npz"
    cache = fc.load_cache(path)
    margins = np.zeros((len(masks), len(yte)))
    done = 0
    if "masks" in cache:
        k = min(len(cache["margins"]), len(masks))
        if np.array_equal(cache["masks"][:k], masks[:k]):
            done = k
            margins[:done] = cache["margins"][:done]
    t0 = time.perf_counter()
    x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    with one_thread_torch():
        for k in range(done, len(masks)):
            model = common.make_fmnist_mlp(cfg["hidden"], cfg["seed"])
            sel = torch.from_numpy(np.flatnonzero(masks[k]))
            common.train_minibatch(model, x[sel], y[sel], l2=cfg["l2"], epochs=cfg["epochs"], seed=cfg["seed"])
            margins[k] = margins_of(model, xte, yte)
            if (k + 1) % 10 == 0 or k + 1 == len(masks):
                fc.save_cache(path, {"masks": masks[: k + 1], "margins": margins[: k + 1]})
                el = time.perf_counter() - t0
                print(f"    retrained {k + 1}/{len(masks)} ({el:.0f} s, {el / (k + 1 - done):.1f} s each)", flush=True)
    return margins, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------------ ours
def build_ours(task, run: Path, resume: bool) -> tuple[Any, dict[str, Any]]:
    from api import build_index, open_index

    if resume:
        try:
            index = open_index(run)
            prev = json.loads((run.parent / f"{run.name}.partial.json").read_text())
            print(f"  reusing the run directory {run} (built in {prev['build']['seconds']:.0f} s)", flush=True)
            return index, prev
        except Exception:  # (absent, incomplete or from another model: build afresh)
            pass
    common.fresh(run)
    (run.parent / f"{run.name}.partial.json").unlink(missing_ok=True)
    common.peak_rss_reset()
    t0 = time.perf_counter()
    index = build_index(task, run, progress=False)
    build_s = time.perf_counter() - t0
    rec = {
        "build": {
            "seconds": build_s,
            "peak_rss_mb": common.peak_rss_mb(),
            "at": datetime.datetime.now().isoformat(timespec="seconds"),
        },
        "methods": {},
        "damping_sweep": {},
    }
    print(f"  build_index: {build_s:.1f} s", flush=True)
    return index, rec


def save_partial(run: Path, rec: dict) -> None:
    (run.parent / f"{run.name}.partial.json").write_text(json.dumps(rec, indent=1, default=float))


def our_method(run: Path, method: str, test_ids, labels, warm_ids, warm_labels, explain_ids, masks, truth, lissa=None):
    """One method of ours: pairwise scores of the queries at their labels on a fresh open_index (after a warm-up
    call on other ids) and the explain latency on another fresh one. Returns (record, scores) or raises."""
    from api import open_index

    index = open_index(run, lissa=lissa)
    index.engine.use_query_cache = False
    common.peak_rss_reset()
    t0 = time.perf_counter()
    index.pairwise_scores(warm_ids, method=method, targets=warm_labels)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    S = np.asarray(index.pairwise_scores(test_ids, method=method, targets=labels), np.float64)
    pairwise_s = time.perf_counter() - t0
    rec: dict[str, Any] = {
        "damping": index.engine.damping if method in ("lissa", "exact") else None,
        "warmup_seconds": warm_s,
        "pairwise_seconds": pairwise_s,
        "pairwise_seconds_per_query": pairwise_s / len(test_ids),
        "pairwise_peak_rss_mb": common.peak_rss_mb(),
        **lds_record(S, masks, truth),
    }
    index.close()
    if explain_ids is not None:
        index = open_index(run, lissa=lissa)
        index.engine.use_query_cache = False
        first_s, first, times, _ = common.explain_latencies(index, explain_ids, method, k=10)
        rec["explain"] = {
            "first_call_seconds": first_s,
            "median_seconds": float(np.median(times)),
            "calls": len(times),
            "seconds": times,
            "diagnostics": first.diagnostics,
        }
        index.close()
    return rec, S


def run_ours(task, run: Path, q: dict, masks, truth, explain_calls: int, resume: bool) -> dict[str, Any]:
    import api
    import influence

    index, rec = build_ours(task, run, resume)
    rec["n_params"] = int(index.run.n_params)
    rec["default_damping"] = float(index.engine.damping)
    rec["damping_calibration"] = index.run.extra.get("damping_calibration")
    rec["default_method"] = api.METHODS[0]
    rec["methods_registered"] = list(api.METHODS)
    index.close()
    save_partial(run, rec)
    args = (q["test_ids"], q["labels"], q["warm_ids"], q["warm_labels"])
    for m in api.METHODS:
        if m in rec["methods"]:
            print(f"  {m:12s} (measured before on this run)", flush=True)
            continue
        try:
            r, _ = our_method(run, m, *args, q["explain_ids"][: explain_calls + 1], masks, truth)
        except ValueError as err:
            if NEEDS_SMALLER_HEAD not in str(err):
                raise
            rec["methods"][m] = {"skipped": str(err)}
            print(f"  {m:12s} skipped: {err}", flush=True)
        else:
            rec["methods"][m] = r
            print(
                f"  {m:12s} LDS {r['lds_mean']:.3f} +- {r['lds_se']:.3f}  pairwise {r['pairwise_seconds']:.1f} s"
                f"  explain median {r['explain']['median_seconds'] * 1e3:.0f} ms",
                flush=True,
            )
        save_partial(run, rec)
    default = rec["methods"].get("lissa", {})
    for d in DAMPINGS:
        key = f"{d:g}"
        if key in rec["damping_sweep"]:
            continue
        if "lds_mean" in default and float(default["damping"]) == d:
            rec["damping_sweep"][key] = {"same_as_default": True} | {
                k: default[k] for k in ("lds_mean", "lds_se", "lds_median", "pairwise_seconds", "damping")
            }
            rec["damping_sweep"][key]["diagnostics"] = default["explain"]["diagnostics"]
        else:
            r, _ = our_method(
                run, "lissa", *args, q["explain_ids"][:2], masks, truth, lissa=influence.LissaConfig(damping=d)
            )
            rec["damping_sweep"][key] = {k: v for k, v in r.items() if k != "per_query"} | {
                "diagnostics": r["explain"]["diagnostics"],
                "per_query": r["per_query"],
            }
        s = rec["damping_sweep"][key]
        print(f"  lissa damping {key:6s} LDS {s['lds_mean']:.3f} +- {s['lds_se']:.3f}  {s['diagnostics']}", flush=True)
        save_partial(run, rec)
    return rec


# ----------------------------------------------------------------------------------------------- kronfluence
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


def run_kronfluence(path: str, cfg: dict, model, xtr, ytr, xq, yq, masks, truth, refresh: bool) -> dict[str, Any]:
    """Each strategy's scores and times, cached by configuration (model, queries, strategy, version)."""
    out: dict[str, Any] = {}
    for strategy in KRONFLUENCE_STRATEGIES:
        key = f"kronfluence{KRONFLUENCE_VERSION}_{strategy}_dampNone_{tag(cfg)}_m{len(yq)}"
        cache = WORK / f"{key}.npz"
        if cache.exists() and not refresh:
            with np.load(cache) as z:
                S, meta = np.asarray(z["scores"], np.float64), json.loads(str(z["meta"]))
            meta["cached"] = True
            if S.shape != (len(yq), len(ytr)):
                raise SystemExit(f"{cache}: scores of shape {S.shape}, expected {(len(yq), len(ytr))}: delete it")
        else:
            try:
                r = kronfluence_scores(path, model, xtr, ytr, xq, yq, strategy, WORK / "kronfluence" / key)
            except Exception as err:  # (a peer's failure is a result: say why, go on)
                out[strategy] = {"failed": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
                print(f"  kronfluence {strategy}: FAILED {type(err).__name__}: {err}", flush=True)
                continue
            S = r.pop("scores")
            meta = r | {"cached": False}
            np.savez(cache, scores=S.astype(np.float32), meta=np.asarray(json.dumps(meta)))
        out[strategy] = meta | lds_record(S, masks, truth)
        o = out[strategy]
        print(
            f"  kronfluence {strategy:5s} LDS {o['lds_mean']:.3f} +- {o['lds_se']:.3f}  fit {o['fit_seconds']:.1f} s"
            f"  pairwise {o['pairwise_seconds']:.1f} s{'  (cached)' if o['cached'] else ''}",
            flush=True,
        )
    return out


# ------------------------------------------------------------------------------------------------ reporting
def table_rows(res: dict) -> list[dict[str, Any]]:
    rows = []
    ours = res["ours"]
    for m, r in ours["methods"].items():
        if "skipped" in r:
            rows.append({"method": f"ours {m}", "skipped": r["skipped"]})
            continue
        extra = f", damping {r['damping']:g}" if r.get("damping") is not None else ""
        rows.append(
            {
                "method": f"ours {m}{' (default)' if m == ours['default_method'] else ''}{extra}",
                "lds": r["lds_mean"],
                "se": r["lds_se"],
                "build_or_fit_s": ours["build"]["seconds"],
                "pairwise_s": r["pairwise_seconds"],
                "explain_median_ms": r["explain"]["median_seconds"] * 1e3,
            }
        )
    for d, r in ours["damping_sweep"].items():
        if r.get("same_as_default"):
            continue
        rows.append(
            {
                "method": f"ours lissa, damping {d}",
                "lds": r["lds_mean"],
                "se": r["lds_se"],
                "pairwise_s": r["pairwise_seconds"],
                "explain_median_ms": r["explain"]["median_seconds"] * 1e3,
            }
        )
    for s, r in res.get("kronfluence", {}).get("strategies", {}).items():
        if "failed" in r:
            rows.append({"method": f"kronfluence {s}", "skipped": r["failed"]})
            continue
        rows.append(
            {
                "method": f"kronfluence {s}{' (cached)' if r['cached'] else ''}",
                "lds": r["lds_mean"],
                "se": r["lds_se"],
                "build_or_fit_s": r["fit_seconds"],
                "pairwise_s": r["pairwise_seconds"],
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'method':48s} {'LDS':>14s} {'build/fit s':>11s} {'pairwise s':>10s} {'explain ms':>10s}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['method']:48s} skipped: {r['skipped'][:90]}")
            continue

        def f(k, fmt, r=r):
            return format(r[k], fmt) if r.get(k) is not None else "-"

        lds = f"{r['lds']:.3f} +- {r['se']:.3f}"
        print(
            f"{r['method']:48s} {lds:>14s} {f('build_or_fit_s', '.1f'):>11s} {f('pairwise_s', '.1f'):>10s}"
            f" {f('explain_median_ms', '.0f'):>10s}"
        )


def targets(res: dict) -> dict[str, Any]:
    """Issue 14's targets on this benchmark, as measured in this run."""
    ours = res["ours"]
    d = ours["methods"].get(ours["default_method"], {})
    ek = res.get("kronfluence", {}).get("strategies", {}).get("ekfac", {})
    if "lds_mean" not in d:
        return {}
    out: dict[str, Any] = {
        "default_lds_ge_0.55": d["lds_mean"] >= 0.55,
        "explain_median_le_200ms": d["explain"]["median_seconds"] <= 0.2,
    }
    sweep = {k: v["lds_mean"] for k, v in ours["damping_sweep"].items() if "lds_mean" in v}
    if sweep:
        best = max(sweep, key=sweep.get)
        out["best_sweep_damping"] = best
        out["default_within_0.02_of_best_damping"] = d["lds_mean"] >= sweep[best] - 0.02
    if "lds_mean" in ek:
        out["default_lds_ge_kronfluence_ekfac_plus_0.10"] = d["lds_mean"] >= ek["lds_mean"] + 0.10
        out["pairwise_le_2x_kronfluence_ekfac"] = d["pairwise_seconds"] <= 2 * ek["pairwise_seconds"]
        out["build_le_2x_kronfluence_ekfac_fit"] = ours["build"]["seconds"] <= 2 * ek["fit_seconds"]
        out["ratios"] = {
            "pairwise_ours_over_kronfluence_ekfac": d["pairwise_seconds"] / ek["pairwise_seconds"],
            "build_ours_over_kronfluence_ekfac_fit": ours["build"]["seconds"] / ek["fit_seconds"],
        }
    return out


def plot(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
    rows = [r for r in table_rows(res) if "lds" in r]
    names = [r["method"].replace(" (cached)", "") for r in rows]
    colors = ["tab:orange" if n.startswith("kronfluence") else "tab:blue" for n in names]
    a1.barh(range(len(rows)), [r["lds"] for r in rows], xerr=[r["se"] for r in rows], color=colors, capsize=3)
    a1.set_yticks(range(len(rows)), names, fontsize=7)
    a1.invert_yaxis()
    a1.axvline(0.55, color="gray", ls="--", lw=0.8)
    a1.set_xlabel("LDS (mean +- s.e. over queries)")
    c = res["config"]
    a1.set_title(
        f"Fashion-MNIST MLP, {res['ours']['n_params']:,} params, {c['model']['n_train']} train, "
        f"{c['n_subsets']} retrains, {c['n_queries']} queries",
        fontsize=8,
    )
    sweep = res["ours"]["damping_sweep"]
    ds = [float(k) for k in sweep if "lds_mean" in sweep[k]]
    xs = [d if d > 0 else min(x for x in ds if x > 0) / 10 for d in ds]
    ys = [sweep[f"{d:g}"]["lds_mean"] for d in ds]
    es = [sweep[f"{d:g}"]["lds_se"] for d in ds]
    a2.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label="ours lissa")
    a2.set_xscale("log")
    a2.set_xticks(xs, ["0" if d == 0 else f"{d:g}" for d in ds], fontsize=7)
    dd = res["ours"]["default_damping"]
    a2.axvline(dd if dd > 0 else min(xs), color="tab:blue", ls=":", lw=1, label=f"default damping ({dd:g})")
    for s, r in res.get("kronfluence", {}).get("strategies", {}).items():
        if "lds_mean" in r:
            a2.axhline(
                r["lds_mean"], color="tab:orange", ls="--" if s == "ekfac" else ":", lw=1, label=f"kronfluence {s}"
            )
    a2.set_xlabel("LiSSA damping (added to C + l2 I)")
    a2.set_ylabel("LDS")
    a2.legend(fontsize=7)
    a2.set_title("damping sweep", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 1,000 train, 2 epochs, 10 subsets, 20 queries")
    ap.add_argument("--resume", action="store_true", help="keep a complete run directory and its measured methods")
    ap.add_argument("--refresh-kronfluence", action="store_true", help="recompute kronfluence (else cached)")
    ap.add_argument("--kronfluence-path", default=str(common.PEERS / "kronfluence"))
    ap.add_argument("--no-kronfluence", action="store_true")
    args = ap.parse_args()
    P = QUICK if args.quick else FULL
    cfg = P["model"]
    out_dir = WORK / "quick" if args.quick else common.RESULTS
    WORK.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "protocol": __doc__,
        "config": P | {"dampings": list(DAMPINGS)},
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "code": code_version(),
        "machine": {"cpus": os.cpu_count(), "load_average_start": os.getloadavg()},
    }
    res["machine"]["matmul_gflop_s_float32_start"] = gflops()
    print(f"== model scale {'(quick) ' if args.quick else ''}{cfg}", flush=True)

    import torch
    from torch.utils.data import TensorDataset

    from indexer import Task

    xtr, ytr, xte, yte = fc.fmnist_arrays(cfg["n_train"], 1, cfg["seed"])
    model, train_s = trained_model(cfg, xtr, ytr)
    res["model"] = {
        "train_accuracy": float((margins_of(model, xtr, ytr) > 0).mean()),
        "test_accuracy_1000": float((margins_of(model, xte, yte) > 0).mean()),
        "train_seconds": train_s,
    }
    print(f"  model: train acc {res['model']['train_accuracy']:.3f}, test {res['model']['test_accuracy_1000']:.3f}")
    n = len(ytr)
    masks = fc.half_masks(P["n_subsets"], n, np.random.default_rng(cfg["seed"]))
    margins_all, retrain_s = retrain_margins(cfg, xtr, ytr, xte, yte, masks)
    res["retrain_seconds_now"] = retrain_s
    perm = np.random.default_rng(cfg["seed"] + 1).permutation(len(yte))
    rows = np.sort(perm[: P["n_queries"]])
    other = perm[P["n_queries"] :]
    truth = margins_all[:, rows].T  # [m, K]
    q = {
        "test_ids": [int(r) for r in rows],  # the Task's test ids are positions in the test set
        "labels": yte[rows],
        "warm_ids": [int(r) for r in other[:2]],
        "warm_labels": yte[other[:2]],
        "explain_ids": [int(r) for r in other[2 : 2 + P["explain_calls"] + 1]],
    }
    res["queries"] = {"test_rows": q["test_ids"], "explain_ids": q["explain_ids"]}

    print("== ours", flush=True)
    task = Task(
        model=model,
        train=TensorDataset(torch.from_numpy(xtr), torch.from_numpy(ytr)),
        test=TensorDataset(torch.from_numpy(xte), torch.from_numpy(yte)),
        l2=cfg["l2"],
        name=f"model-scale-{tag(cfg)}",
    )
    res["ours"] = run_ours(task, WORK / f"run_{tag(cfg)}", q, masks, truth, P["explain_calls"], args.resume)

    print("== kronfluence", flush=True)
    kpath = Path(args.kronfluence_path)
    if args.no_kronfluence:
        res["kronfluence"] = {"failed": "not run (--no-kronfluence)"}
    elif not (kpath / "kronfluence").exists():
        res["kronfluence"] = {"failed": f"kronfluence not installed in {kpath}: run `make .peers/.kronfluence`"}
        print(f"  {res['kronfluence']['failed']}")
    else:
        res["kronfluence"] = {
            "version": KRONFLUENCE_VERSION,
            "path": str(kpath),
            "strategies": run_kronfluence(
                str(kpath), cfg, model, xtr, ytr, xte[rows], yte[rows], masks, truth, args.refresh_kronfluence
            ),
        }

    res["machine"]["matmul_gflop_s_float32_end"] = gflops()
    res["machine"]["load_average_end"] = os.getloadavg()
    res["targets"] = targets(res)
    res["table"] = table_rows(res)
    res["seconds"] = time.perf_counter() - t_start
    print_table(res["table"])
    print(f"\ntargets: {json.dumps(res['targets'], default=float)}")
    print(
        f"matmul float32: {res['machine']['matmul_gflop_s_float32_start']:.1f} / "
        f"{res['machine']['matmul_gflop_s_float32_end']:.1f} GFLOP/s (start / end)"
    )
    common.save_results(res, out_dir / ("model_scale_quick.json" if args.quick else "model_scale.json"), plot)


if __name__ == "__main__":
    sys.exit(main())
