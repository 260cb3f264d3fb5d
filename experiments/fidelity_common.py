"""Shared helpers of the fidelity experiments (leave-one-out, LDS, LiSSA convergence, HVP speed).

- cached run directories of the digits tasks under experiments/cache/runs/ (built once, reopened after);
- dense scores of a method for given query targets (the true label by default, Koh & Liang's test loss);
- a float64 numpy model of a Linear/ReLU head (objective, gradient, per-example losses) and warm-started
  L-BFGS retraining on a weighted subset of the training set: the ground truth the scores are checked against.

fidelity_loo, fidelity_lds and lissa_convergence pin numpy's BLAS to one thread before numpy loads (tiny matmuls
on a shared 2-core machine: one BLAS thread is ~30x faster than two oversubscribed ones; retraining is not
bit-reproducible across thread counts); hvp_speed, a speed run, gives every framework all cores.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.optimize

from experiments.common import CACHE, RESULTS, load_fashion_mnist, matmul_gflop_s

METHODS = ("exact", "lissa", "representer", "grad-dot")


# ------------------------------------------------------------------------------------------------ indexes
def _open_or_build(path: Path, make_task: Callable[[], Any], config: Any = None):
    from api import build_index, open_index

    try:
        return open_index(path)
    except Exception:  # absent or incomplete: build (resumes an interrupted build)
        return build_index(make_task(), path, config=config, progress=False)


_TASKS: dict[tuple, Any] = {}


def digits_index(kind: str, l2: float, *, curvature: str = "ggn", hidden: int = 32, seed: int = 0, rebuild: str = ""):
    """The digits logistic regression ("lr") or MLP ("mlp") index, cached under experiments/cache/runs/."""
    from indexer import IndexConfig
    from indexer.demo import digits_logreg_task, digits_task

    key = (kind, l2, hidden, seed)

    def make_task():
        if key not in _TASKS:
            if kind == "lr":
                _TASKS[key] = digits_logreg_task(n_flips=0, seed=seed, l2=l2)
            else:
                _TASKS[key] = digits_task(n_flips=0, seed=seed, l2=l2, hidden=hidden)
        return _TASKS[key]

    name = f"digits_{kind}{'' if kind == 'lr' else hidden}_l2{l2:g}_s{seed}"
    if rebuild:
        # the SAME model re-indexed with the current build (deflation, automatic damping from the deflated
        # spectrum): the cached run predates them, and retraining is not bit-reproducible across thread counts
        old = digits_index(kind, l2, hidden=hidden, seed=seed)
        return _open_or_build(CACHE / "runs" / f"{name}_{rebuild}", lambda: task_from_index(old), IndexConfig())
    if curvature == "ggn":
        return _open_or_build(CACHE / "runs" / name, make_task, IndexConfig(curvature=curvature))
    # Another curvature: the SAME model as the default index (retraining is not bit-reproducible across
    # thread counts), rebuilt from its stored head parameters.
    ggn = digits_index(kind, l2, hidden=hidden, seed=seed)
    return _open_or_build(
        CACHE / "runs" / f"{name}_{curvature}", lambda: task_from_index(ggn), IndexConfig(curvature=curvature)
    )


FMNIST_TEST = 1000  # stored test points of the Fashion-MNIST indexes (a seeded subsample of the 10k test set)


def fmnist_arrays(n_train: int, pool: int = 1, seed: int = 0):
    """Fashion-MNIST pixels in [0, 1]: (x_train, y_train, x_test, y_test), `FMNIST_TEST` test points.

    pool > 1 averages pool x pool pixel blocks (pool = 2: 14 x 14 = 196 features), which keeps a logistic
    regression head (10 * 196 + 10 = 1,970 parameters) under the dense-eigendecomposition limit of method
    "exact" (4,096) and its retraining cheap enough for ~1,000 leave-one-out refits on 2 cores.
    """
    xtr, ytr, xte, yte = load_fashion_mnist(n_train, seed=seed)
    keep = np.sort(np.random.default_rng(seed + 7).choice(len(xte), size=FMNIST_TEST, replace=False))
    xte, yte = xte[keep], yte[keep]
    if pool > 1:
        s = 28 // pool

        def p(x):
            return x.reshape(-1, s, pool, s, pool).mean((2, 4)).reshape(-1, s * s).astype(np.float32)

        xtr, xte = p(xtr), p(xte)
    return xtr, ytr, xte, yte


def fmnist_index(l2: float, *, n_train: int, pool: int = 2, seed: int = 0):
    """Fashion-MNIST L2 logistic regression on (pooled) pixels, full-batch Adam + L-BFGS polish
    (indexer.demo.train_classifier), indexed with the default IndexConfig, cached under experiments/cache/runs/.
    (The Fashion-MNIST MLP of the LDS is not indexed: see fidelity_lds.mlp_model.)"""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from indexer import IndexConfig, Task
    from indexer.demo import train_classifier

    name = f"fmnist_lr_n{n_train}_p{pool}_l2{l2:g}_s{seed}"

    def make_task():
        torch.set_num_threads(1)
        xtr, ytr, xte, yte = fmnist_arrays(n_train, pool, seed)
        x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(xtr.shape[1], 10))
        train_classifier(model, x, y, l2=l2, epochs=100, lr=1e-2, seed=seed)
        return Task(
            model=model.eval(),
            train=TensorDataset(x, y),
            test=TensorDataset(torch.from_numpy(xte), torch.from_numpy(yte)),
            l2=l2,
            name=name,
        )

    return _open_or_build(CACHE / "runs" / name, make_task, IndexConfig())


def torch_head(index):
    """The index's Linear/ReLU head as a torch nn.Sequential (float32 parameters)."""
    import torch
    from torch import nn

    layers: list[nn.Module] = []
    for layer, p in zip(index.run.spec, index.run.params, strict=True):
        if layer["kind"] == "linear":
            lin = nn.Linear(layer["in_features"], layer["out_features"])
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.asarray(p["weight"], np.float32)))
                lin.bias.copy_(torch.from_numpy(np.asarray(p["bias"], np.float32)))
            layers.append(lin)
        elif layer["kind"] == "relu":
            layers.append(nn.ReLU())
        else:
            raise ValueError(f"torch_head supports linear/relu heads, got {layer['kind']!r}")
    return nn.Sequential(*layers)


def task_from_index(index):
    """A Task whose model is the index's head (body = identity) on the index's cached features."""
    import torch
    from torch.utils.data import TensorDataset

    from indexer import Task

    def ds(split):
        x = torch.from_numpy(np.array(split.features, np.float32))
        return TensorDataset(x, torch.from_numpy(np.array(split.labels, np.int64)))

    run = index.run
    return Task(model=torch_head(index).eval(), train=ds(run.train), test=ds(run.test), l2=run.l2, name="from-index")


# ------------------------------------------------------------------------------------------------- scores
# Every method is q . v_i (api.scorers): the query side of stored test rows at given targets through the method's
# scorer (`api.scorers.scorer_for(index.engine, method)`), the train side in float64. Gradient methods recompute
# g_i from the cached features (`Engine.train_gradients`, cached per run) rather than reading the stored vectors.
_TRAIN_G: dict[str, np.ndarray] = {}


def train_gradients(index) -> np.ndarray:
    """g_i of every training example at its label [n, p] float64 (`Engine.train_gradients`), cached per run."""
    key = str(index.run.root)  # not id(index): ids are reused once an Index is garbage-collected
    if key not in _TRAIN_G:
        _TRAIN_G[key] = np.asarray(index.engine.train_gradients(slice(None)), np.float64)
    return _TRAIN_G[key]


def query_vectors(index, test_rows: np.ndarray, targets: np.ndarray, method: str) -> tuple[np.ndarray, dict]:
    """Query-side vectors [m, p] of `method` for stored test rows at `targets` (not necessarily the prediction).

    Always solved (LiSSA never reads the build's query cache here: the queries carry no stored rows).
    """
    from api.engine import Queries
    from api.scorers import scorer_for

    engine, test = index.engine, index.run.test
    test_rows = np.asarray(test_rows, np.int64)
    h = np.asarray(test.features[test_rows])
    queries = Queries(
        h=h,
        logits=engine.logits(h),
        targets=np.asarray(targets, np.int64),
        test_ids=[int(v) for v in test.ids[test_rows]],
        labels=[int(v) for v in test.labels[test_rows]],
    )
    q, diag = scorer_for(engine, method).query_vectors(queries)
    return np.asarray(q, np.float64), diag


def train_vectors(index, method: str) -> np.ndarray:
    """Train-side vectors [n, p] of `method` (float64)."""
    from api.scorers import scorer_for

    if method == "representer":
        return np.asarray(scorer_for(index.engine, method).train_vectors(slice(None)), np.float64)
    G = train_gradients(index)
    if method == "grad-cos":
        G = G / np.maximum(np.linalg.norm(G, axis=1, keepdims=True), 1e-30)
    return G


def method_scores(index, test_rows: np.ndarray, targets: np.ndarray, method: str) -> tuple[np.ndarray, dict]:
    """Dense scores [m, n_train] of `method` for stored test rows, explained at `targets` (not the prediction).

    The scores of `Index.pairwise_scores(..., targets=)`, but in float64 with g_i recomputed and LiSSA always
    solved; checked against it at the predicted class in `check_against_pairwise`.
    """
    q, diag = query_vectors(index, test_rows, targets, method)
    return q @ train_vectors(index, method).T, diag


def check_against_pairwise(index, test_rows: np.ndarray, methods=METHODS) -> dict[str, float]:
    """Max relative difference between method_scores at the predicted class and Index.pairwise_scores."""
    out = {}
    pred = index.engine.logits(np.asarray(index.run.test.features[test_rows])).argmax(1)
    for m in methods:
        a, _ = method_scores(index, test_rows, pred, m)
        b = index.pairwise_scores([int(index.test_ids[r]) for r in test_rows], method=m)
        out[m] = float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
    return out


# --------------------------------------------------------------------------- linear datamodeling score
def half_masks(n_subsets: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """[n_subsets, n] bool: each row a random half (n // 2) of the training set, drawn in turn from `rng`."""
    masks = np.zeros((n_subsets, n), bool)
    for k in range(n_subsets):
        masks[k, rng.choice(n, size=n // 2, replace=False)] = True
    return masks


def lds_per_point(scores: np.ndarray, masks: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """LDS (Park et al. 2023) per query [m]: Spearman over the subsets k between the summed scores
    sum_{i in S_k} score(q, i) (scores [m, n], masks [K, n]) and the retrained outcome truth [m, K]."""
    from scipy import stats

    pred = scores @ masks.T.astype(np.float64)  # [m, K]
    return np.array([stats.spearmanr(pred[j], truth[j])[0] for j in range(len(pred))])


# ---------------------------------------------------------------------------------- float64 numpy head
class NumpyHead:
    """A Linear/ReLU head in float64: flat parameters, objective and gradient, per-example CE and margins.

    objective(theta; w, norm) = (1/norm) sum_j w_j CE(f(h_j), y_j) + (l2/2) ||theta||^2 (weights and biases),
    the library's objective when w = 1 and norm = n.
    """

    def __init__(self, spec: list[dict], params: list[dict], l2: float) -> None:
        for layer in spec:
            if layer["kind"] not in ("linear", "relu"):
                raise ValueError(f"NumpyHead supports linear/relu layers only, got {layer['kind']!r}")
        self.spec, self.l2 = spec, float(l2)
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        flat = []
        for layer, p in zip(spec, params, strict=True):
            if layer["kind"] == "linear":
                W = np.asarray(p["weight"], np.float64)
                b = np.asarray(p.get("bias", np.zeros(W.shape[0])), np.float64)
                self.shapes.append((W.shape, b.shape))
                flat += [W.ravel(), b.ravel()]
        self.theta0 = np.concatenate(flat)

    def unflatten(self, theta: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        out, k = [], 0
        for ws, bs in self.shapes:
            nw, nb = int(np.prod(ws)), int(np.prod(bs))
            out.append((theta[k : k + nw].reshape(ws), theta[k + nw : k + nw + nb]))
            k += nw + nb
        return out

    def forward(self, theta: np.ndarray, X: np.ndarray, keep: bool = False):
        layers = self.unflatten(theta)
        acts, a, li = [], X, 0
        for layer in self.spec:
            acts.append(a)
            if layer["kind"] == "linear":
                W, b = layers[li]
                a = a @ W.T + b
                li += 1
            else:
                a = np.maximum(a, 0.0)
        return (a, acts) if keep else a

    @staticmethod
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    def losses(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        return -self.log_softmax(self.forward(theta, X))[np.arange(len(y)), y]

    def margins(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Correct-class margin z_y - max_{c != y} z_c."""
        z = self.forward(theta, X)
        zy = z[np.arange(len(y)), y]
        z2 = z.copy()
        z2[np.arange(len(y)), y] = -np.inf
        return zy - z2.max(1)

    def objective(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray, w: np.ndarray, norm: float):
        z, acts = self.forward(theta, X, keep=True)
        logp = self.log_softmax(z)
        n = len(y)
        f = -(w * logp[np.arange(n), y]).sum() / norm + 0.5 * self.l2 * theta @ theta
        d = np.exp(logp)
        d[np.arange(n), y] -= 1.0
        d *= (w / norm)[:, None]
        grads: list[np.ndarray] = []
        layers = self.unflatten(theta)
        li = len(layers) - 1
        for layer, a in zip(reversed(self.spec), reversed(acts), strict=True):
            if layer["kind"] == "linear":
                W, _ = layers[li]
                grads = [(d.T @ a).ravel(), d.sum(0), *grads]
                d = d @ W
                li -= 1
            else:
                d = d * (a > 0)
        return f, np.concatenate(grads) + self.l2 * theta

    def fit(
        self,
        theta0: np.ndarray,
        X: np.ndarray,
        y: np.ndarray,
        w: np.ndarray,
        norm: float,
        *,
        gtol: float = 1e-10,
        maxiter: int = 5000,
    ) -> tuple[np.ndarray, float, int]:
        """Warm-started L-BFGS to a tight gradient tolerance; returns (theta, final grad inf-norm, iterations)."""
        res = scipy.optimize.minimize(
            self.objective,
            theta0,
            args=(X, y, w, norm),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": maxiter, "gtol": gtol, "ftol": 0.0, "maxcor": 50, "maxls": 50},
        )
        _, g = self.objective(res.x, X, y, w, norm)
        return res.x, float(np.max(np.abs(g))), int(res.nit)

    def linear_hessian(self, theta: np.ndarray, X: np.ndarray, w: np.ndarray, norm: float) -> np.ndarray:
        """Dense Hessian of `objective` for a single linear layer (multinomial logistic regression), float64:
        H = (1/norm) sum_j w_j (diag(p_j) - p_j p_j^T) kron [x_j, 1][x_j, 1]^T + l2 I, in the flat order
        [W.ravel(), b]."""
        if len(self.shapes) != 1:
            raise ValueError("linear_hessian needs a head of exactly one linear layer")
        k, d = self.shapes[0][0]
        P = np.exp(self.log_softmax(self.forward(theta, X)))
        Xa = np.concatenate([X, np.ones((len(X), 1))], 1) * np.sqrt(w / norm)[:, None]
        H = np.zeros((k, d + 1, k, d + 1))
        for c in range(k):
            for e in range(c, k):
                s = P[:, c] * ((c == e) - P[:, e])
                H[c, :, e, :] = Xa.T @ (Xa * s[:, None])
                H[e, :, c, :] = H[c, :, e, :].T
        # reorder [class, feature | bias] -> [W (class-major), b]
        order = np.concatenate([(np.arange(k)[:, None] * (d + 1) + np.arange(d)).ravel(), np.arange(k) * (d + 1) + d])
        H = H.reshape(k * (d + 1), k * (d + 1))[np.ix_(order, order)]
        return H + self.l2 * np.eye(len(order))

    def fit_preconditioned(
        self, theta0, X, y, w, norm, chol, *, gtol: float = 1e-10, maxiter: int = 50
    ) -> tuple[np.ndarray, float, int]:
        """theta <- theta - H0^-1 grad(theta), with H0 = chol the Cholesky factor of a nearby Hessian (the full
        model's): for a leave-one-out refit of a strictly convex objective the contraction factor is
        ||I - H0^-1 H|| = O(1/n), so a few steps reach |grad|_inf < gtol (the first step from the full model is
        Koh & Liang's one-step Newton prediction). Only the stopping test (the gradient) decides convergence;
        if it stalls or the objective rises, L-BFGS finishes from the current point."""
        import scipy.linalg

        theta = theta0.copy()
        f, g = self.objective(theta, X, y, w, norm)
        for it in range(1, maxiter + 1):
            step = scipy.linalg.cho_solve(chol, g)
            new = theta - step
            f_new, g_new = self.objective(new, X, y, w, norm)
            if not (f_new <= f + 1e-12 * abs(f)) and np.max(np.abs(g_new)) > np.max(np.abs(g)):
                break
            theta, f, g = new, f_new, g_new
            if np.max(np.abs(g)) < gtol:
                return theta, float(np.max(np.abs(g))), it
        th, gn, nit = self.fit(theta, X, y, w, norm, gtol=gtol)
        return th, gn, maxiter + nit


def numpy_head(index) -> tuple[NumpyHead, np.ndarray, np.ndarray]:
    """The index's head in float64, and the float64 training set (features, labels)."""
    run = index.run
    head = NumpyHead(run.spec, run.params, run.l2)
    return head, np.asarray(run.train.features, np.float64), np.asarray(run.train.labels, np.int64)


# ------------------------------------------------------------------------------------------------- misc
def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def load_cache(path: Path) -> dict[str, np.ndarray]:
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    return {}


def save_cache(path: Path, data: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **data)
    tmp.replace(path)


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    return path


def machine_gflops(n: int = 1024, repeats: int = 5) -> float:
    """numpy float64 matmul GFLOP/s on this machine (best of `repeats`): the compute ceiling of the run."""
    a = np.random.default_rng(0).standard_normal((n, n))
    b = np.random.default_rng(1).standard_normal((n, n))
    return matmul_gflop_s(a, b, repeats=repeats, reduce=min)
