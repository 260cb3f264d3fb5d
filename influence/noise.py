"""Label-noise signals: self-influence from eigenpairs, out-of-sample probabilities, confident learning, fusion.

    self_influence_i   = g_i^T (C + l2 I + d I)^-1 g_i
                       = sum_j (q_j . g_i)^2 / (lambda_j + d)                    (all p eigenpairs: exact)
                       ~ sum_{j<=k} (q_j . g_i)^2 / (lambda_j + d) + ||(I - Q_k Q_k^T) g_i||^2 / (l2 + d)
                                                                                 (top-k eigenpairs, low rank)
    loo_loss_i         = loss_i + self_influence_i / n       (removing i raises its own loss by ~ this much)
    p_oos              = softmax(Theta_(-f) phi_i) with Theta_(-f) refit on the other folds (K-fold)
    oos_loss_i         = -log p_oos[i, y_i]
    confident learning = max_{c != y_i} p_oos[i, c] - p_oos[i, y_i]  (normalised margin, negated)
    fused              = mean over signals of rank_percentile(signal)

The low-rank form treats the directions outside the top-k eigenspace as having curvature l2 (their smallest
possible value), so it equals the exact value when k = p and never under-weights a direction
(``self_influence_complement``: l2 + d, or lambda_k + d when l2 + d = 0).

Reference: Koh & Liang 2017 (arXiv:1703.04730) self-influence for mislabel detection; Schioppa et al. 2022
(arXiv:2112.03052) Arnoldi / low-rank influence; Northcutt, Jiang & Chuang 2021 (arXiv:1911.00068) confident
learning; Pleiss et al. 2020 / Pruthi et al. 2020 (arXiv:2002.08484) self-scores.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.stats

from influence.eigen import compute_top_eigenpairs as _top_eigenpairs
from influence.objective import cross_entropy, softmax


# ------------------------------------------------------------------------------------------------ ranks
def rank_percentiles(scores: np.ndarray) -> np.ndarray:
    """Returns the average rank of each score divided by n, in (0, 1]; ties share their mean rank.

    Args:
        scores: [n], higher = more suspicious.
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"scores must have shape [n] with n >= 1, got shape {scores.shape}")
    return scipy.stats.rankdata(scores, method="average") / scores.size


def fuse_ranks(signals: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None) -> np.ndarray:
    """Weighted mean of the rank percentiles of each signal, [n] (scale-free, so no signal dominates by units).

    Args:
        signals: name -> scores [n], higher = more suspicious.
        weights: name -> weight (default 1 each).
    """
    if not signals:
        raise ValueError("signals must name at least one signal, got none")
    total = 0.0
    out: np.ndarray | None = None
    for name, s in signals.items():
        w = 1.0 if weights is None else float(weights.get(name, 1.0))
        r = w * rank_percentiles(s)
        out = r if out is None else out + r
        total += w
    if out is None or total <= 0:
        raise ValueError(f"weights must sum to > 0, got {weights!r}")
    return out / total


def rank_order(scores: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
    """Positions sorted by score descending, ties by id (or position) ascending."""
    scores = np.asarray(scores, np.float64)
    key = np.arange(scores.size) if ids is None else np.asarray(ids)
    return np.lexsort((key, -scores))


# ------------------------------------------------------------------------------------- self-influence
def compute_self_influence_eigen(
    grads: np.ndarray,
    eigenvalues: np.ndarray,
    eigenvectors: np.ndarray,
    *,
    damping: float,
    complement: float | None = None,
) -> np.ndarray:
    """Returns g_i^T (C + d I)^-1 g_i from eigenpairs of C (which already includes l2), [n].

    With all p eigenpairs this is exact: ||diag(lambda + d)^-1/2 Q^T g_i||^2. With k < p (top-k), the part of
    g_i outside span(Q) is divided by ``complement`` (the curvature assumed there: ``self_influence_complement``).

    Args:
        grads: per-example gradients [n, p].
        eigenvalues: [k] eigenvalues of C + l2 I.
        eigenvectors: [p, k] orthonormal columns.
        damping: d.
        complement: curvature + damping assumed outside span(Q) (required when k < p).
    """
    g = np.asarray(grads, np.float64)
    eigenvalues = np.asarray(eigenvalues, np.float64)
    Q = np.asarray(eigenvectors, np.float64)
    if g.ndim != 2 or Q.ndim != 2 or Q.shape[0] != g.shape[1] or eigenvalues.shape != (Q.shape[1],):
        raise ValueError(
            f"grads [n, p], eigenvalues [k], eigenvectors [p, k] must agree, got {g.shape}, {eigenvalues.shape}, "
            f"{Q.shape}"
        )
    shifted = eigenvalues + float(damping)
    if np.any(shifted <= 0):
        raise ValueError(f"eigenvalues + damping must be > 0, got min {float(shifted.min())!r}")
    coeffs = g @ Q
    out = np.einsum("ij,ij->i", coeffs, coeffs / shifted)
    if Q.shape[1] < Q.shape[0]:
        if complement is None or not complement > 0:
            raise ValueError(f"complement must be > 0 when only {Q.shape[1]} < {Q.shape[0]} eigenpairs are given")
        rest = np.maximum(np.einsum("ij,ij->i", g, g) - np.einsum("ij,ij->i", coeffs, coeffs), 0.0)
        out = out + rest / complement
    return out


def self_influence_complement(l2: float, damping: float, eigenvalues: np.ndarray) -> float:
    """Returns the curvature + damping assumed outside the top-k eigenspace in the low-rank self-influence.

    l2 + d: the smallest curvature C + l2 I can have there (C PSD), so no direction is under-weighted. When that
    is 0 (no l2 and no damping) it would divide by zero; then lambda_k + d, lambda_k the smallest of the k
    computed eigenvalues (the largest curvature the complement can have): finite, and still exact for k = p.

    Args:
        l2: the L2 coefficient inside C + l2 I.
        damping: d.
        eigenvalues: the k computed top eigenvalues of C + l2 I.
    """
    complement = l2 + damping
    if complement <= 0:
        complement = float(np.min(eigenvalues)) + damping
    return complement


def loo_loss(loss: np.ndarray, self_influence: np.ndarray, n_train: int) -> np.ndarray:
    """Returns the influence estimate of the leave-one-out loss, loss_i + self_influence_i / n, [n].

    Removing example i from the mean-loss objective moves the optimum by ~ H^-1 g_i / n, which raises i's own
    loss by ~ g_i^T H^-1 g_i / n (Koh & Liang 2017, arXiv:1703.04730, sec. 2).

    Args:
        loss: the model's training cross-entropy per example [n].
        self_influence: g_i^T (C + l2 I + d I)^-1 g_i [n].
        n_train: n, the number of training examples in the objective.
    """
    return np.asarray(loss, np.float64) + np.asarray(self_influence, np.float64) / n_train


def oos_loss(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Returns the out-of-sample cross-entropy -log p_oos[i, y_i], [n] (probabilities clipped at 1e-300).

    Args:
        probs: out-of-sample class probabilities [n, C] (K-fold refits).
        labels: given labels [n].
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-300, None))


def fused_loss_score(losses: Mapping[str, np.ndarray], labels: np.ndarray) -> np.ndarray:
    """Returns mean_s rank_percentile(loss_s + log t_y) over the named losses (``class_normalized_loss``), [n].

    Each loss (e.g. the training and the out-of-sample cross-entropy) is class-normalised so that a hard class
    does not crowd the top, then ranked; the ranks are averaged (``fuse_ranks``).

    Args:
        losses: name -> per-example loss [n].
        labels: given labels [n].
    """
    return fuse_ranks({name: class_normalized_loss(loss, labels) for name, loss in losses.items()})


def compute_top_eigenpairs(
    matvec: Callable[[jax.Array], jax.Array], p: int, *, k: int, seed: int = 0, tol: float = 1e-4
) -> tuple[np.ndarray, np.ndarray]:
    """Deprecated: ``influence.compute_top_eigenpairs(matvec, p, rank=k, seed=seed, tol=tol,
    algorithm="lanczos")``, (eigenvalues [k] descending, Q [p, k]) in float64; kept until api/noise.py calls the
    one solver directly.

    Args:
        matvec: v -> C v on vectors [p].
        p: dimension.
        k: number of eigenpairs (1 <= k < p).
        seed: seed of the Lanczos start vector.
        tol: relative accuracy of the eigenvalues.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < p:
        raise ValueError(f"k must be an int in [1, {p}), got {k!r}")
    return _top_eigenpairs(matvec, p, rank=k, seed=seed, tol=tol, algorithm="lanczos")


# ---------------------------------------------------------------------------- out-of-sample probabilities
@functools.lru_cache(maxsize=1)
def _softmax_objective() -> Callable[..., tuple[jax.Array, jax.Array]]:
    def objective(theta: jax.Array, phi: jax.Array, y: jax.Array, lam: jax.Array) -> jax.Array:
        return jnp.mean(cross_entropy(phi @ theta.T, y)) + lam * jnp.vdot(theta, theta)

    return jax.jit(jax.value_and_grad(objective))


def fit_softmax_regression(
    phi_aug: np.ndarray, y: np.ndarray, theta0: np.ndarray, *, lam: float, max_iter: int = 300, tol: float = 1e-6
) -> np.ndarray:
    """Theta = argmin (1/n) sum_i CE(Theta phi_i, y_i) + lam ||Theta||^2 by L-BFGS from theta0, [C, d+1].

    Args:
        phi_aug: bias-augmented features [n, d+1].
        y: labels [n].
        theta0: warm start [C, d+1].
        lam: L2 coefficient (> 0).
        max_iter: L-BFGS iterations.
        tol: gradient tolerance.
    """
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a finite float > 0, got {lam!r}")
    theta0 = np.asarray(theta0, np.float64)
    dtype = np.asarray(phi_aug).dtype if np.asarray(phi_aug).dtype == np.float64 else np.float32
    vg = _softmax_objective()
    phi_dev, y_dev = jnp.asarray(phi_aug, dtype), jnp.asarray(y)
    lam_dev = jnp.asarray(lam, dtype)
    shape = theta0.shape

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = vg(jnp.asarray(flat.reshape(shape), dtype), phi_dev, y_dev, lam_dev)
        return float(value), np.asarray(grad, np.float64).ravel()

    res = scipy.optimize.minimize(
        fun, theta0.ravel(), jac=True, method="L-BFGS-B", options={"maxiter": max_iter, "gtol": tol}
    )
    return np.asarray(res.x, np.float64).reshape(shape)


def fold_assignments(n: int, folds: int, seed: int) -> np.ndarray:
    """A seeded random fold id in [0, folds) for each of n rows, folds as equal as possible."""
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= n:
        raise ValueError(f"folds must be an int in [2, {n}], got {folds!r}")
    out = np.empty(n, np.int64)
    out[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return out


def compute_out_of_sample_probs(
    phi_aug: np.ndarray,
    y: np.ndarray,
    theta0: np.ndarray,
    *,
    lam: float,
    folds: int = 5,
    seed: int = 0,
    max_iter: int = 300,
    repeats: int = 1,
    on_fold: Callable[[int], None] | None = None,
    map_folds: Callable[..., Sequence[Any]] | None = None,
) -> np.ndarray:
    """K-fold out-of-sample class probabilities [n, C]: each fold scored by a softmax regression fit on the rest
    (averaged over `repeats` K-fold runs, see `kfold_probs`; `map_folds` as there).

    Args:
        phi_aug: bias-augmented features [n, d+1].
        y: labels [n].
        theta0: warm start [C, d+1] (the model's own last layer).
        lam: L2 coefficient of lam ||Theta||^2.
        folds: K.
        seed: seed of the fold assignment.
        max_iter: L-BFGS iterations per fold.
        repeats: K-fold runs averaged (fold seeds seed, ..., seed + repeats - 1).
        on_fold: called with the fold index after each fold (progress).
    """
    phi_aug = np.asarray(phi_aug)
    y = np.asarray(y)

    def fit_and_predict(keep: np.ndarray, held: np.ndarray, _: int) -> np.ndarray:
        theta = fit_softmax_regression(phi_aug[keep], y[keep], theta0, lam=lam, max_iter=max_iter)
        return softmax(np.asarray(phi_aug[held], np.float64) @ theta.T)

    return kfold_probs(len(y), folds, seed, fit_and_predict, on_fold, repeats=repeats, map_folds=map_folds)


def kfold_probs(
    n: int,
    folds: int,
    seed: int,
    fit_and_predict: Callable[[np.ndarray, np.ndarray, int], Any],
    on_fold: Callable[[int], None] | None = None,
    *,
    repeats: int = 1,
    map_folds: Callable[[Callable[[tuple[int, int]], Any], list[tuple[int, int]]], Sequence[Any]] | None = None,
    info: list[Any] | None = None,
) -> np.ndarray:
    """[n, C] probabilities, each fold's rows predicted by `fit_and_predict(keep_mask, held_mask, fit_seed)` (a
    model fit on the other folds; fit_seed = the run's fold seed + the fold's index, for refits that draw an
    initialisation); folds from `fold_assignments(n, folds, run_seed)`.

    With `repeats` = R > 1 the K-fold procedure runs R times with fold seeds seed, ..., seed + R - 1 and the
    probabilities are averaged, p = (1/R) sum_r p^(r) (repeated cross-validation: the fold-to-fold and
    initialisation noise of one run falls as 1/R in variance).

    `map_folds(fn, jobs)`: runs ``fn`` on every (fold seed, fold) job and returns the results in job order
    (e.g. as tasks on a cluster; None: here, in turn); the sums are taken in the same order either way.
    `fit_and_predict` may return (probabilities, extra): the extras are appended to `info` in job order.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int | np.integer) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(folds, bool) or not isinstance(folds, int | np.integer) or folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds!r}")

    def one(job: tuple[int, int]) -> Any:
        run_seed, f = job
        held = fold_assignments(n, folds, run_seed) == f
        return fit_and_predict(~held, held, run_seed + f)

    jobs = [(run_seed, f) for run_seed in range(seed, seed + repeats) for f in range(folds)]
    results: Any = (one(job) for job in jobs) if map_folds is None else map_folds(one, jobs)
    total: np.ndarray | None = None
    probs = np.zeros((0, 0))
    for (run_seed, f), p in zip(jobs, results, strict=True):
        if isinstance(p, tuple):
            p, extra = p
            if info is not None:
                info.append(extra)
        if f == 0:
            probs = np.zeros((n, p.shape[1]), np.float64)
        probs[fold_assignments(n, folds, run_seed) == f] = p
        if on_fold is not None:
            on_fold(f)
        if f == folds - 1:
            total = probs if total is None else total + probs
    return np.asarray(total) / repeats


def count_linear_layers(spec: Sequence[Mapping[str, Any]]) -> int:
    return sum(layer["kind"] == "linear" for layer in spec)


def init_head_params(spec: Sequence[Mapping[str, Any]], seed: int) -> list[dict[str, np.ndarray]]:
    """Fresh parameters for the head's layers as torch initialises them (float32): linear weight and bias
    ~ U(-1/sqrt(in), 1/sqrt(in)) (`nn.Linear`'s default), layernorm weight 1 and bias 0."""
    rng = np.random.default_rng([seed, 7])
    out: list[dict[str, np.ndarray]] = []
    for layer in spec:
        if layer["kind"] == "linear":
            bound = 1.0 / math.sqrt(layer["in_features"])
            params = {"weight": rng.uniform(-bound, bound, (layer["out_features"], layer["in_features"]))}
            if layer["bias"]:
                params["bias"] = rng.uniform(-bound, bound, layer["out_features"])
        elif layer["kind"] == "layernorm" and layer["elementwise_affine"]:
            shape = tuple(int(v) for v in layer["normalized_shape"])
            params = {"weight": np.ones(shape), "bias": np.zeros(shape)}
        else:
            params = {}
        out.append({k: v.astype(np.float32) for k, v in params.items()})
    return out


def fit_head_adam(
    spec: Sequence[Mapping[str, Any]],
    h: np.ndarray,
    y: np.ndarray,
    *,
    l2: float,
    target_loss: float,
    seed: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    max_epochs: int = 200,
) -> tuple[list[dict[str, jax.Array]], int]:
    """Trains the whole head from a fresh initialisation: Adam (Kingma & Ba 2015, lr `lr`) on shuffled
    minibatches of (1/b) sum CE + (l2/2) ||theta||^2, epoch after epoch until the mean training CE over (h, y) is
    at most `target_loss` (or `max_epochs`). Returns (params, epochs run).

    The stopping rule stands in for the user's unknown training procedure: a refit stops when it fits its rows
    as closely as the user's model fits them (`target_loss` = the model's own mean loss on those rows).
    """
    from influence.head import apply_head, flatten_params

    theta, unravel = flatten_params(init_head_params(spec, seed))
    h_dev, y_dev = jnp.asarray(h, jnp.float32), jnp.asarray(y)
    n = len(y)
    b = min(batch_size, n)
    steps = math.ceil(n / b)

    def batch_objective(th: jax.Array, rows: jax.Array) -> jax.Array:
        logits = apply_head(spec, unravel(th), h_dev[rows])
        return jnp.mean(cross_entropy(logits, y_dev[rows])) + 0.5 * l2 * jnp.vdot(th, th)

    @jax.jit
    def epoch(state: tuple[jax.Array, ...], batches: jax.Array) -> tuple[jax.Array, ...]:
        def step(carry: tuple[jax.Array, ...], rows: jax.Array) -> tuple[tuple[jax.Array, ...], None]:
            th, m, v, t = carry
            g = jax.grad(batch_objective)(th, rows)
            t = t + 1
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
            return (th - lr * m_hat / (jnp.sqrt(v_hat) + 1e-8), m, v, t), None

        return jax.lax.scan(step, state, batches)[0]

    @jax.jit
    def mean_loss(th: jax.Array) -> jax.Array:
        return jnp.mean(cross_entropy(apply_head(spec, unravel(th), h_dev), y_dev))

    rng = np.random.default_rng([seed, 11])
    state = (theta, jnp.zeros_like(theta), jnp.zeros_like(theta), jnp.asarray(0.0, theta.dtype))
    done = 0
    while done < max_epochs:
        perm = rng.permutation(n)
        perm = np.concatenate([perm, perm[: steps * b - n]])  # the last batch wraps around: one shape, one compile
        state = epoch(state, jnp.asarray(perm.reshape(steps, b)))
        done += 1
        if float(mean_loss(state[0])) <= target_loss:
            break
    return unravel(state[0]), done


def compute_out_of_sample_probs_head(
    spec: Sequence[Mapping[str, Any]],
    h: np.ndarray,
    y: np.ndarray,
    model_losses: np.ndarray,
    *,
    l2: float,
    folds: int = 5,
    seed: int = 0,
    repeats: int = 1,
    max_epochs: int = 200,
    on_fold: Callable[[int], None] | None = None,
    map_folds: Callable[..., Sequence[Any]] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """K-fold out-of-sample probabilities [n, C] from refits of the *whole* head (`fit_head_adam`), each trained
    on the other folds until it fits them as closely as the model does (mean of `model_losses` over them).

    For a head with hidden layers, refitting only its last layer on the penultimate features leaks the held-out
    labels (those features were trained on them); a whole-head refit does not. Such a refit is non-convex and
    starts from a random initialisation (fold k of the run with fold seed s: seed s + k), so its probabilities
    vary from run to run: `repeats` = R > 1 averages R K-fold runs (`kfold_probs`). Returns (probs, epochs per
    fold, R * K entries).
    """
    from influence.head import apply_head

    h, y, model_losses = np.asarray(h), np.asarray(y), np.asarray(model_losses, np.float64)
    epochs: list[int] = []  # per fold, in job order (`kfold_probs` collects the second item of each result)

    def fit_and_predict(keep: np.ndarray, held: np.ndarray, fit_seed: int) -> np.ndarray:
        target = float(model_losses[keep].mean())
        params, done = fit_head_adam(
            spec, h[keep], y[keep], l2=l2, target_loss=target, seed=fit_seed, max_epochs=max_epochs
        )
        rows = np.flatnonzero(held)
        logits = [
            np.asarray(apply_head(spec, params, h[rows[s : s + 4096]]), np.float64) for s in range(0, len(rows), 4096)
        ]
        return softmax(np.concatenate(logits)), done

    probs = kfold_probs(
        len(y), folds, seed, fit_and_predict, on_fold, repeats=repeats, map_folds=map_folds, info=epochs
    )
    return probs, epochs


# ------------------------------------------------------------------------------------- confident learning
def per_class_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """t_c = mean of p[i, c] over examples labelled c (confident learning's per-class thresholds), [C]."""
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels)
    n_classes = probs.shape[1]
    t = np.ones(n_classes)
    for c in range(n_classes):
        mask = labels == c
        if mask.any():
            t[c] = probs[mask, c].mean()
    return t


def class_normalized_loss(loss: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """-log(p_i,y_i / t_y_i) = loss_i + log t_y_i, with t_c = mean_{j: y_j = c} p_j,c = mean exp(-loss_j), [n].

    An example's self-confidence p_i,y_i = exp(-loss_i) measured against the average self-confidence of its
    class, the per-class threshold of confident learning (Northcutt et al. 2021, JAIR, eq. 2): a low
    confidence is less suspicious in a class the model finds hard (shirts) than in an easy one (trousers).
    Only a per-class shift of the loss, so within a class the order is the loss order.

    Args:
        loss: per-example cross-entropy at the given label [n] (in-sample or out-of-sample).
        labels: given labels [n].
    """
    loss = np.asarray(loss, np.float64)
    labels = np.asarray(labels)
    if loss.ndim != 1 or labels.shape != loss.shape:
        raise ValueError(f"loss and labels must both have shape [n], got {loss.shape} and {labels.shape}")
    if not np.all(np.isfinite(loss)):
        raise ValueError("loss must be finite, got NaN or inf entries")
    out = loss.copy()
    for c in np.unique(labels):
        mask = labels == c
        out[mask] += np.log(np.mean(np.exp(-loss[mask])))
    return out


def confident_learning_scores(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Returns max_{c != y} p[i, c] - p[i, y_i] in [-1, 1], higher = more suspicious (negated normalised margin).

    Reference: Northcutt, Jiang & Chuang 2021 (arXiv:1911.00068), "normalized_margin" ranking.
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.int64)
    rows = np.arange(len(labels))
    given = probs[rows, labels]
    others = probs.copy()
    others[rows, labels] = -np.inf
    return others.max(axis=1) - given


def suggest_labels(probs: np.ndarray, labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Suggested label per example: the most probable other class under the out-of-sample probabilities when it
    is confident (p >= its class threshold t_c, or above the given label's p), else the model's prediction.

    Args:
        probs: out-of-sample probabilities [n, C].
        labels: given labels [n].
        predictions: the model's predicted classes [n].
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.int64)
    rows = np.arange(len(labels))
    others = probs.copy()
    others[rows, labels] = -np.inf
    alt = others.argmax(axis=1)
    p_alt = probs[rows, alt]
    confident = (p_alt >= per_class_thresholds(probs, labels)[alt]) | (p_alt > probs[rows, labels])
    return np.where(confident, alt, np.asarray(predictions, np.int64))


# ------------------------------------------------------------------------------------------- evaluation
def detection_auc(scores: np.ndarray, is_noisy: np.ndarray) -> float:
    """ROC AUC of scores for the noisy rows (Mann-Whitney U with tied ranks averaged: a constant gives 0.5)."""
    scores = np.asarray(scores, np.float64)
    pos = np.asarray(is_noisy, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"is_noisy must contain both classes, got {n_pos} noisy and {n_neg} clean")
    ranks = scipy.stats.rankdata(scores, method="average")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fraction_found(order: np.ndarray, is_noisy: np.ndarray, checked: float) -> float:
    """Fraction of the noisy rows among the first round(checked * n) positions of `order`."""
    pos = np.asarray(is_noisy, bool)
    m = round(checked * len(pos))
    return float(pos[np.asarray(order)[:m]].sum() / max(pos.sum(), 1))
