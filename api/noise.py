"""The label-noise job: every training example ranked by how likely its label is wrong, with a suggested label.

Signals (higher = more suspicious), each selectable as `method`:

- ``self-influence``: g_i^T (C + l2 I + d I)^-1 g_i at the example's own label (d = the run's damping,
  `Engine.damping`). On a scope="model" run it is taken over the whole model: phi_i^T (G + l2 I + d I)^-1 phi_i
  with the run's projected per-layer gradients and projected Gauss-Newton matrix, exact (``model_self_influence``);
  ``loo-loss`` follows it.
  Exact from the stored dense eigendecomposition when the head has it (heads up to ``exact_max_params``,
  e.g. the digits MLP); otherwise from the top-``rank`` eigenpairs of C + l2 I, with the remaining
  directions at curvature l2 + d (see ``influence.noise``): the build's eigenpairs (computed over all rows
  to deflate LiSSA) when it stored at least ``rank``, else a block eigensolve on the JAX curvature matvec
  over up to ``curvature_rows`` training rows, computed once. One Lanczos run replaces n LiSSA runs; the
  per-example work is then one gradient and one [p, k] product, chunked.
- ``loss``: the model's training cross-entropy; ``margin``: minus the logit margin z_y - max_{c != y} z_c.
- ``representer``: alpha_{i, y_i} = (1 - p_{i, y_i}) / (2 lambda n) of the representer fit (Yeh et al. 2018).
- ``confident-learning``: max_{c != y} p_oos[c] - p_oos[y] with p_oos from K-fold refits of the head
  (``oos_refit="auto"``): for a head with one linear layer, convex refits of it on the cached features (L2
  softmax regression, warm-started from the model); for a head with hidden layers, whose penultimate features
  have seen every label, refits of the whole head from fresh initialisations, averaged over two K-fold runs
  (``oos_repeats``; see ``resolve_oos_refit``).
- ``tracin``: TracIn self-influence sum_c eta_c ||g_i(theta_c)||^2 over the Task's training checkpoints
  (Pruthi et al. 2020), computed at build time; only for runs whose Task supplied ``checkpoints``.
- ``grad-cos``: the gradient-cosine self score, 1 for every example (a negative control).
- ``oos-loss``: the out-of-sample cross-entropy -log p_oos[y] (the same K-fold refits): the loss of a model that
  did not see the example, so memorised flips do not hide.
- ``loo-loss``: the influence-function estimate of the leave-one-out loss, loss_i + self_influence_i / n
  (removing example i raises its own loss by about g_i^T H^-1 g_i / n; Koh & Liang 2017, sec. 2).
- ``fused`` (default): the mean rank percentile of the training loss and the K-fold out-of-sample loss, each
  class-normalised (loss + log t_y with t_y the mean self-confidence of the example's class: confident
  learning's per-class threshold, ``influence.noise.class_normalized_loss``), so that a hard class does not
  crowd the top. The out-of-sample loss is the loss of a model that did not see the example (memorised flips
  do not hide); the training loss steadies its fold-to-fold noise. Chosen on the benchmark's evidence
  (README, label noise): fusing ranks with self-influence or the confident-learning margin lowered the
  fraction of flips found at 10% checked on Fashion-MNIST, and with whole-head out-of-sample refits this rule
  finds more flips on the digits MLP than the exact influence estimate of the leave-one-out loss
  (``loo-loss``) that fused used for heads with an exact eigendecomposition before; all remain methods.

``suggested_label`` is the most probable other class under p_oos when that is confident, else the model's
prediction. Scores and suggested labels are written to the run's SQLite (``suspect_score``); the expensive
intermediate arrays (self-influence, p_oos) are cached under ``arrays/`` so an interrupted job resumes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

import influence as inf
from influence import noise as nz
from store import OpenedRun, atomic_write_json, load_array, save_array, save_noise_signals

from .methods import NOISE_METHODS, SIGNALS
from .ray_cluster import ray_session
from .records import Suspect

if TYPE_CHECKING:
    from .engine import Engine

FUSED_SIGNALS = ("loss", "oos-loss")
DEFAULT_SIGNALS = ("loss", "margin", "representer", "confident-learning", "oos-loss")
#: eigenpair residuals of the low-rank self-influence solver, relative to the top eigenvalue
SELF_INFLUENCE_TOL = 1e-4


@dataclass(frozen=True, kw_only=True)
class NoiseSignals:
    """All label-noise signals of one run, aligned with `ids` (the run's training rows).

    Attributes:
        ids: training example ids [n].
        labels: given labels [n].
        predictions: the model's predictions [n].
        signals: name -> scores [n], higher = more suspicious.
        oos_probs: K-fold out-of-sample probabilities [n, C].
        suggested: suggested labels [n].
        info: how each signal was computed (solver, rank, seconds).
    """

    ids: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray
    signals: dict[str, np.ndarray]
    oos_probs: np.ndarray
    suggested: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def score(self, method: str) -> np.ndarray:
        """The ranking score of `method`: a signal, or a rule combining signals (COMBINED)."""
        combine = COMBINED.get(method)
        return self.signals[method] if combine is None else combine(self.signals, self.labels)


def fused_score(signals: dict[str, np.ndarray], labels: np.ndarray) -> np.ndarray:
    """The default label-noise score, mean_s rank_percentile(loss_s + log t_y) over s in FUSED_SIGNALS (the
    training and out-of-sample losses; see the module docstring and `influence.noise.fused_loss_score`)."""
    return nz.fused_loss_score({s: signals[s] for s in FUSED_SIGNALS}, labels)


#: noise methods that combine signals: name -> (signals, labels) -> score [n]
COMBINED: dict[str, Callable[[dict[str, np.ndarray], np.ndarray], np.ndarray]] = {"fused": fused_score}


def _check_method(method: Any) -> str:
    if method not in NOISE_METHODS:
        raise ValueError(f"method must be one of {NOISE_METHODS}, got {method!r}")
    return method


def _check_top(top: Any, n: int) -> int:
    if top is None:
        return n
    if isinstance(top, bool) or not isinstance(top, int | np.integer) or top < 1:
        raise ValueError(f"top must be None or an int >= 1, got {top!r}")
    return min(int(top), n)


def _check_int(value: Any, name: str, lo: int, hi: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | np.integer)
        or value < lo
        or (hi is not None and value > hi)
    ):
        raise ValueError(f"{name} must be an int in [{lo}, {hi if hi is not None else 'inf'}], got {value!r}")
    return int(value)


def _grad_chunk_rows(p: int) -> int:
    return int(min(4096, max(64, 2**24 // max(p, 1))))


# ------------------------------------------------------------------------------------------ signals
def _cache_key(run: OpenedRun, config: dict[str, Any]) -> dict[str, Any]:
    """What a job cache is keyed on: `config` and the training rows it covers (their number and a SHA-1 of the
    run's training ids in row order), so that after an add or a delete, even one that keeps n, it misses."""
    ids = np.ascontiguousarray(np.asarray(run.array("train_ids"), np.int64))
    return config | {"train_rows": len(ids), "train_ids_sha1": hashlib.sha1(ids.tobytes()).hexdigest()}


def _cached(run: OpenedRun, name: str, config: dict[str, Any]) -> np.ndarray | None:
    """The job cache `arrays/<name>.npy` when its sidecar says it was computed with `config` over the run's
    current training rows (`_cache_key`), else None."""
    meta = run.paths.cache_config(name)
    path = run.paths.array(name)
    if path.exists() and meta.exists():
        try:
            if json.loads(meta.read_text()) == _cache_key(run, config):
                return np.asarray(load_array(path, mmap=False))
        except (OSError, ValueError):
            return None
    return None


def _save_cached(run: OpenedRun, name: str, config: dict[str, Any], arr: np.ndarray) -> None:
    save_array(run.paths.array(name), arr)
    atomic_write_json(run.paths.cache_config(name), _cache_key(run, config))


def model_self_influence(engine: Engine, *, progress: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """scope="model": phi_i^T (G + l2 I + d I)^-1 phi_i of every training row [n], exact, from the run's stored
    projected Gauss-Newton matrix (stage "model-curvature") and phi_i at the labels (`model_train_vectors`);
    d = the LissaConfig's damping when set, else the build's rule on G + l2 I (as the scorers of the scope)."""
    from .scorers.model import model_record

    run = engine.run
    d = engine.lissa_config.damping
    damping = float(model_record(engine)["damping"] if d is None else d)
    vectors = run.array("model_train_vectors")
    n = len(vectors)
    config: dict[str, Any] = {"solver": "exact", "scope": "model", "damping": damping, "n_train": n}
    cached = _cached(run, "noise_self_influence", config)
    if cached is not None:
        return cached, {**config, "cached": True}
    A = np.asarray(run.array("model_curvature"), np.float64)
    lam, Q = np.linalg.eigh(0.5 * (A + A.T))
    out = np.empty(n, np.float64)
    step = _grad_chunk_rows(len(A))
    for start in tqdm(range(0, n, step), desc="self-influence", unit="chunk", disable=not progress):
        sl = slice(start, min(start + step, n))
        out[sl] = nz.compute_self_influence_eigen(np.asarray(vectors[sl], np.float64), lam, Q, damping=damping)
    _save_cached(run, "noise_self_influence", config, out)
    return out, config


def compute_self_influence(
    engine: Engine, *, rank: int = 64, curvature_rows: int = 20_000, seed: int = 0, progress: bool = True
) -> tuple[np.ndarray, dict[str, Any]]:
    """Self-influence g_i^T (C + l2 I + d I)^-1 g_i of every training row, [n], and how it was computed (on a
    scope="model" run over the whole model's projected gradients: `model_self_influence`)."""
    run = engine.run
    if run.scope == "model":
        return model_self_influence(engine, progress=progress)
    train = run.train
    p = int(engine.head.theta.shape[0])
    solver = engine.eigen_solver
    exact = solver is not None
    stored = None if exact else engine.deflation
    n = len(train)
    damping = engine.damping
    config: dict[str, Any] = {"solver": "exact" if exact else "low-rank", "damping": damping}
    if stored is not None and len(stored[0]) >= min(rank, p - 1):
        # the build's top eigenpairs of the curvature over all rows (used to deflate LiSSA): no new eigensolve
        config.update(rank=min(rank, p - 1), eigenpairs="build")
    elif not exact:
        stored = None
        config.update(rank=min(rank, p - 1), curvature_rows=min(curvature_rows, n), seed=seed)
    cached = _cached(run, "noise_self_influence", config)
    if cached is not None:
        return cached, {**config, "cached": True}
    complement = None
    if solver is not None:
        lam, Q = solver.eigenvalues, solver.eigenvectors
    else:
        if stored is not None:
            lam, Q = stored[0][: config["rank"]], stored[1][:, : config["rank"]]
        else:
            rows = np.sort(np.random.default_rng(seed).choice(n, size=config["curvature_rows"], replace=False))
            matvec = engine.head.matvec(
                np.asarray(train.features[rows]),
                train.labels[rows],
                l2=run.l2,
                curvature=run.config["curvature"],
            )
            lam, Q = inf.compute_top_eigenpairs(
                matvec, p, rank=config["rank"], seed=seed, tol=SELF_INFLUENCE_TOL, algorithm="lanczos"
            )
        complement = nz.self_influence_complement(run.l2, damping, lam)
        config["complement"] = complement
    out = np.empty(n, np.float64)
    step = _grad_chunk_rows(p)
    for start in tqdm(range(0, n, step), desc="self-influence", unit="chunk", disable=not progress):
        sl = slice(start, min(start + step, n))
        g = engine.train_gradients(sl)
        out[sl] = nz.compute_self_influence_eigen(g, lam, Q, damping=damping, complement=complement)
    _save_cached(run, "noise_self_influence", config, out)
    return out, config


OOS_REFITS = ("auto", "last-layer", "whole-head")


def resolve_oos_refit(refit: Any, repeats: Any, spec: list[dict[str, Any]]) -> tuple[str, int]:
    """The out-of-sample refit actually run, (kind, repeats), from the arguments `oos_refit` / `oos_repeats`.

    "auto" (default): "whole-head" for heads with hidden layers (two or more linear layers), else "last-layer"
    (for a single linear layer the two coincide, and the convex last-layer refit is exact and cheaper).
    repeats None (default): 2 for whole-head refits (non-convex, from random initialisations: averaging two
    K-fold runs halves their variance), 1 for the deterministic convex last-layer refit. "whole-head" on a head
    with one linear layer runs the last-layer refit.
    """
    if refit not in OOS_REFITS:
        raise ValueError(f"oos_refit must be one of {OOS_REFITS}, got {refit!r}")
    if repeats is not None and (isinstance(repeats, bool) or not isinstance(repeats, int | np.integer) or repeats < 1):
        raise ValueError(f"oos_repeats must be None or an int >= 1, got {repeats!r}")
    kind = "whole-head" if refit != "last-layer" and nz.count_linear_layers(spec) >= 2 else "last-layer"
    return kind, int(repeats) if repeats is not None else (2 if kind == "whole-head" else 1)


def compute_oos_probs(
    engine: Engine,
    *,
    folds: int = 5,
    seed: int = 0,
    max_iter: int = 300,
    refit: str = "auto",
    repeats: int | None = None,
    progress: bool = True,
    map_folds: Callable[..., Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """K-fold out-of-sample probabilities [n, C], averaged over `repeats` K-fold runs (fold seeds seed, seed+1..);
    `map_folds` runs the refits (`influence.noise.kfold_probs`; `api.distributed.ray_map`: as Ray tasks).

    refit="last-layer": refits of the last linear layer on the cached penultimate features (for a head with one
    linear layer that is the whole head: exact convex refits). refit="whole-head": for heads with hidden
    layers, whose penultimate features were trained on the held-out labels too, refits of the whole head from a
    fresh initialisation until they fit their rows as closely as the model does
    (`influence.noise.compute_out_of_sample_probs_head`; see experiments/noise_full_refit_probe.py).
    refit="auto" (default) picks by the head (`resolve_oos_refit`).
    """
    run = engine.run
    refit, repeats = resolve_oos_refit(refit, repeats, run.spec)
    if refit == "whole-head":
        config = {"folds": folds, "seed": seed, "refit": "whole head", "l2": run.l2, "repeats": repeats}

        def whole_head(on_fold: Callable[[int], None]) -> tuple[np.ndarray, dict[str, Any]]:
            logits = np.asarray(run.array("train_logits"))
            model_losses = np.asarray(inf.cross_entropy(logits, run.train.labels), np.float64)
            probs, epochs = nz.compute_out_of_sample_probs_head(
                run.spec,
                np.asarray(run.train.features),
                run.train.labels,
                model_losses,
                l2=run.l2,
                folds=folds,
                seed=seed,
                repeats=repeats,
                on_fold=on_fold,
                map_folds=map_folds,
            )
            return probs, {"epochs": epochs}

        return _cached_folds(run, config, folds * repeats, "out-of-sample folds (whole head)", progress, whole_head)
    stored = run.extra.get("representer", {}).get("lambda")  # the build's lambda; the same rule for old runs
    lam = float(stored) if stored else inf.resolve_representer_lambda(run.l2)
    config = {"folds": folds, "seed": seed, "lambda": lam, "max_iter": max_iter}
    if repeats > 1:
        config["repeats"] = repeats

    def last_layer(on_fold: Callable[[int], None]) -> tuple[np.ndarray, dict[str, Any]]:
        last = run.params[inf.last_linear_index(run.spec)]
        weight = np.asarray(last["weight"], np.float64)
        bias = np.asarray(last.get("bias", np.zeros(weight.shape[0])), np.float64)
        probs = nz.compute_out_of_sample_probs(
            np.asarray(run.array("train_phi")),
            run.train.labels,
            np.concatenate([weight, bias[:, None]], axis=1),
            lam=lam,
            folds=folds,
            seed=seed,
            max_iter=max_iter,
            repeats=repeats,
            on_fold=on_fold,
            map_folds=map_folds,
        )
        return probs, {}

    return _cached_folds(run, config, folds * repeats, "out-of-sample folds", progress, last_layer)


def _cached_folds(
    run: OpenedRun,
    config: dict[str, Any],
    total: int,
    desc: str,
    progress: bool,
    compute: Callable[[Callable[[int], None]], tuple[np.ndarray, dict[str, Any]]],
) -> tuple[np.ndarray, dict[str, Any]]:
    """The out-of-sample probabilities of `config` from the run's cache, else computed (with a progress bar over
    the `total` folds) and cached; with the config (and what `compute` reports) as the second item."""
    cached = _cached(run, "noise_oos_probs", config)
    if cached is not None:
        return cached, {**config, "cached": True}
    with tqdm(total=total, desc=desc, unit="fold", disable=not progress) as bar:
        probs, info = compute(lambda _: bar.update())
    _save_cached(run, "noise_oos_probs", config, probs)
    return probs, {**config, **info}


def compute_noise_signals(
    engine: Engine,
    *,
    signals: tuple[str, ...] | None = None,
    folds: int = 5,
    seed: int = 0,
    rank: int = 64,
    curvature_rows: int = 20_000,
    oos_refit: str = "auto",
    oos_repeats: int | None = None,
    progress: bool = True,
    map_folds: Callable[..., Any] | None = None,
) -> NoiseSignals:
    """Computes the named signals (default: all of SIGNALS the run has) plus out-of-sample probabilities and
    suggestions. ``tracin`` exists only for runs built from a Task with checkpoints."""
    run = engine.run
    has_tracin = run.has("tracin_self_influence")
    names = tuple(s for s in SIGNALS if s != "tracin" or has_tracin) if signals is None else tuple(signals)
    for s in names:
        if s not in SIGNALS:
            raise ValueError(f"signals must be a subset of {SIGNALS}, got {s!r}")
    if "tracin" in names and not has_tracin:
        raise ValueError(
            "signal 'tracin' needs a run built from a Task with checkpoints=[(state_dict, learning_rate), ...]; "
            f"run {run.root} has none"
        )
    n = len(run.train)
    folds = _check_int(folds, "folds", 2, n)
    rank = _check_int(rank, "rank", 1)
    curvature_rows = _check_int(curvature_rows, "curvature_rows", 1)
    labels = np.asarray(run.train.labels, np.int64)
    logits = np.asarray(run.array("train_logits"), np.float64)
    predictions = logits.argmax(1)
    out: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {}
    if "loss" in names:
        out["loss"] = np.asarray(inf.cross_entropy(logits, labels), np.float64)
    if "margin" in names:
        out["margin"] = -np.asarray(inf.compute_margins(logits, labels), np.float64)
    if "representer" in names:
        alpha = np.asarray(run.array("representer_alpha"), np.float64)
        out["representer"] = alpha[np.arange(n), labels]
    probs, info["confident-learning"] = compute_oos_probs(
        engine, folds=folds, seed=seed, refit=oos_refit, repeats=oos_repeats, progress=progress, map_folds=map_folds
    )
    if "confident-learning" in names:
        out["confident-learning"] = nz.confident_learning_scores(probs, labels)
    if "oos-loss" in names:
        out["oos-loss"] = nz.oos_loss(probs, labels)
    if "self-influence" in names:
        out["self-influence"], info["self-influence"] = compute_self_influence(
            engine, rank=rank, curvature_rows=curvature_rows, seed=seed, progress=progress
        )
    if "loo-loss" in names:
        if "self-influence" not in out:
            out["self-influence"], info["self-influence"] = compute_self_influence(
                engine, rank=rank, curvature_rows=curvature_rows, seed=seed, progress=progress
            )
        out["loo-loss"] = nz.loo_loss(np.asarray(inf.cross_entropy(logits, labels)), out["self-influence"], n)
    if "tracin" in names:
        out["tracin"] = np.asarray(run.array("tracin_self_influence"), np.float64)
        info["tracin"] = run.extra.get("tracin", {})
    if "grad-cos" in names:
        # cos(g_i, g_i) = 1 whenever g_i != 0: by construction it carries no information (negative control)
        out["grad-cos"] = np.ones(n)
    return NoiseSignals(
        ids=np.asarray(run.train.ids, np.int64),
        labels=labels,
        predictions=predictions,
        signals=out,
        oos_probs=probs,
        suggested=nz.suggest_labels(probs, labels, predictions),
        info=info,
    )


def find_label_noise(
    engine: Engine,
    *,
    method: str = "fused",
    top: int | None = None,
    folds: int = 5,
    seed: int = 0,
    rank: int = 64,
    curvature_rows: int = 20_000,
    oos_refit: str = "auto",
    oos_repeats: int | None = None,
    progress: bool = True,
    ray: str | None = None,
) -> list[Suspect]:
    """Every training example ranked by how likely its label is wrong, most suspicious first.

    Also writes every example's score and suggested label to the run's SQLite (``suspect_score``,
    ``suggested_label``; read back with ``index.metadata.top_suspects``) and its signals (``noise_signals``;
    read back with ``store.load_noise_signals``), in the same order (through `store`).

    Args:
        engine: the opened run's engine (`Index.engine`).
        method: one of "fused" (default), "self-influence", "loss", "margin", "representer",
            "confident-learning", "oos-loss", "tracin" (runs with checkpoints), "grad-cos".
        top: return only the first `top` suspects (all are still scored and stored); None = all.
        folds: K of the out-of-sample refits (>= 2).
        seed: seed of the fold assignment and of the low-rank solver.
        rank: eigenpairs of the low-rank self-influence solver (heads without a dense eigendecomposition).
        curvature_rows: training rows the low-rank solver's curvature is estimated on.
        oos_refit: "auto" (default: "whole-head" for heads with hidden layers, else "last-layer"),
            "last-layer" or "whole-head": how the out-of-sample probabilities are refit (`resolve_oos_refit`).
        oos_repeats: K-fold runs averaged for the out-of-sample probabilities; None = 2 for whole-head refits,
            1 for last-layer refits.
        progress: show progress bars.
        ray: None (this process), or the Ray cluster (`api.ray_cluster`) whose tasks run the K-fold refits.
    """
    method = _check_method(method)
    run = engine.run
    resolve_oos_refit(oos_refit, oos_repeats, run.spec)  # refuse bad values before any work
    top = _check_top(top, len(run.train))
    with ray_session(ray) as distributed:  # `ray` is checked by name before any work
        return _find_label_noise(
            engine, method, top, folds, seed, rank, curvature_rows, oos_refit, oos_repeats, progress, distributed
        )


def _find_label_noise(
    engine, method, top, folds, seed, rank, curvature_rows, oos_refit, oos_repeats, progress, distributed
) -> list[Suspect]:
    """`find_label_noise` after its arguments are checked (`distributed`: the refits as tasks on the cluster)."""
    from .distributed import ray_map

    run = engine.run
    needed = (*DEFAULT_SIGNALS, *({"fused": FUSED_SIGNALS}.get(method, (method,))))
    names = tuple(s for s in SIGNALS if s in needed)
    result = compute_noise_signals(
        engine,
        signals=names,
        folds=folds,
        seed=seed,
        rank=rank,
        curvature_rows=curvature_rows,
        oos_refit=oos_refit,
        oos_repeats=oos_repeats,
        progress=progress,
        map_folds=ray_map if distributed else None,
    )
    score = np.asarray(result.score(method), np.float64)
    run.metadata.set_suspects(result.ids, score, result.suggested)
    save_noise_signals(run.metadata, result.ids, result.signals)  # the signals behind each rank, for GET /noise
    order = nz.rank_order(score, result.ids)[:top]
    records = run.metadata.get("train", [int(v) for v in result.ids[order]])
    return [
        Suspect(
            example_id=int(result.ids[i]),
            score=float(score[i]),
            label=int(result.labels[i]),
            suggested_label=int(result.suggested[i]),
            signals={k: float(v[i]) for k, v in result.signals.items()},
            preview=r.preview,
        )
        for i, r in zip(order, records, strict=True)
    ]


def plot_suspects(suspects: list[Suspect], path: str | Path, known_wrong: set[int] | None = None) -> Path:
    """PNG of a label-noise job: with `known_wrong` (ids whose labels are known to be wrong), the fraction of
    them found versus the fraction of the data checked, one curve per signal; otherwise the distribution of
    the ranking score (what a reviewer sees: how sharply the top separates from the bulk)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from store import save_figure

    path = Path(path)
    if path.suffix != ".png":
        raise ValueError(f"path must end in .png, got {str(path)!r}")
    if not suspects:
        raise ValueError("suspects is empty: nothing to plot")
    ids = np.array([s.example_id for s in suspects], np.int64)
    fig, ax = plt.subplots(figsize=(6, 4))
    if known_wrong:
        wrong = np.isin(ids, np.fromiter(known_wrong, np.int64))
        if not wrong.any():
            raise ValueError("known_wrong: none of these ids is a training example of this run")
        curves = {"job score": np.array([s.score for s in suspects])}
        curves |= {k: np.array([s.signals[k] for s in suspects]) for k in suspects[0].signals}
        checked = np.arange(1, len(ids) + 1) / len(ids)
        for name, score in curves.items():
            order = nz.rank_order(score, ids)
            found = np.cumsum(wrong[order]) / wrong.sum()
            ax.plot(
                checked,
                found,
                lw=2.2 if name == "job score" else 1.0,
                label=f"{name} (AUC {nz.detection_auc(score, wrong):.3f})",
            )
        ax.set_xlabel("fraction of training data checked")
        ax.set_ylabel("fraction of known-wrong labels found")
        ax.legend(fontsize=6)
    else:
        ax.hist([s.score for s in suspects], bins=60)
        ax.set_xlabel("label-noise score (higher = more suspicious)")
        ax.set_ylabel("training examples")
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path
