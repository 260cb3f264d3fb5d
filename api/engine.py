"""The query engine of an opened run: the math objects every scorer and job shares, built once per open.

`Engine` composes the three packages: an `store.OpenedRun` (what is on disk), the `influence` objects built from
it (the head as a JAX function, the curvature operator of the run's scope with its damping, the query cache) and,
when a `Task` is given, the model for raw inputs (`indexer.inputs`). Scorers (`api.scorers`) and jobs (`api.dump`,
`api.noise`) take an Engine; the `Index` facade holds one.

A query is prepared once (`Engine.prepare` -> `Queries`): its features h, logits, targets (the predicted class
unless `targets=`), stored ids, labels and rows, and raw texts when the body is a text encoder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

import influence as inf
from store import OpenedRun, UnknownExampleError

MAX_K = 10_000


def batch_bucket(m: int) -> int:
    """The query-batch size a batch of m is computed at: the next power of two (1, 2, 4, ...)."""
    return 1 << max(0, int(m) - 1).bit_length()


def pad_rows(a: np.ndarray) -> np.ndarray:
    """`a` ``[m, ...]`` padded to ``[batch_bucket(m), ...]`` by repeating its last row.

    JAX compiles a program per input shape, so a service answering batches of 1, 3, 5, ... queries would
    compile (seconds) for each new size; with padded batches it compiles once per power of two, and the
    start-up warm-up (`api.warmup`) compiles those. Every step is per query, so the padding rows (copies of a
    real one) change no answer and no batch maximum; the caller slices the first m rows.
    """
    m = len(a)
    if m == 0 or batch_bucket(m) == m:
        return a
    return np.concatenate([a, np.repeat(a[-1:], batch_bucket(m) - m, axis=0)])


def check_k(k: Any) -> int:
    """k as an int in [1, MAX_K], else a ValueError naming it."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1 or k > MAX_K:
        raise ValueError(f"k must be an int in [1, {MAX_K}], got {k!r}")
    return int(k)


@dataclasses.dataclass(frozen=True)
class Queries:
    """A validated batch of queries.

    Attributes:
        h: Cut features ``[m, *feature_shape]``.
        logits: Head logits ``[m, n_classes]`` float64.
        targets: The class each query is explained at ``[m]`` int64.
        test_ids: Stored test ids (None for raw inputs).
        labels: Stored labels (None for raw inputs).
        test_rows: Rows of the stored test examples ``[m]``, None for raw inputs.
        texts: The raw texts of a text body's queries, else None.
        raw: The raw inputs as given (rows of an array, or texts), else None (scope="model" takes gradients of
            them through the whole model).
    """

    h: np.ndarray
    logits: np.ndarray
    targets: np.ndarray
    test_ids: list[int | None]
    labels: list[int | None]
    test_rows: np.ndarray | None = None
    texts: list[str] | None = None
    raw: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(1)


class Engine:
    """An opened run plus the math built from it, shared by the scorers and jobs.

    Args:
        run: The opened run directory.
        task: The Task the run was built for (needed only for raw inputs and for last-block gradients the run
            does not store); its model fingerprint is checked by the caller (`OpenedRun(fingerprint=...)`).
        lissa: LiSSA options; None = `influence.LissaConfig()`. Its `damping`, when set, replaces the run's.
    """

    #: candidates per sign fetched from a projected FAISS space before exact re-scoring (at least 20 k)
    min_candidates: int = 1000
    #: read LiSSA vectors of stored test examples from the build's query cache when valid (False: always solve)
    use_query_cache: bool = True
    #: take candidates of projected runs from the whitened space "grad-whitened" where the run has one
    use_whitened_space: bool = True

    def __init__(self, run: OpenedRun, *, task: Any = None, lissa: inf.LissaConfig | None = None) -> None:
        self.run = run
        self.task = task
        self.lissa_config = lissa or inf.LissaConfig()

    # ----------------------------------------------------------------------------------------- the head
    @cached_property
    def head(self) -> inf.Head:
        """The head as one object (`influence.Head`): theta, logits, gradients, curvature products."""
        return inf.Head(self.run.spec, self.run.params)

    def logits(self, h: np.ndarray) -> np.ndarray:
        """Head logits of features h, ``[m, n_classes]`` float64."""
        m = len(h)
        return self.head.logits(pad_rows(h))[:m]

    def gradients(self, h: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Per-example head gradients g of the loss at ``targets``, ``[m, p]`` (unprojected)."""
        m = len(h)
        return self.head.gradients(pad_rows(h), pad_rows(np.asarray(targets)))[:m]

    def train_gradients(self, rows: slice | np.ndarray) -> np.ndarray:
        """g_i of training rows at their own labels, recomputed from the cached features ``[c, p]``."""
        train = self.run.train
        return self.gradients(np.asarray(train.features[rows]), train.labels[rows])

    # ------------------------------------------------------------------------------------ the curvature
    @cached_property
    def matvec(self) -> inf.MatVec:
        """(C + l2 I) v over all cached training features, jit-compiled once per Engine."""
        train = self.run.train
        return self.head.matvec(
            np.asarray(train.features),
            train.labels,
            l2=self.run.l2,
            curvature=self.run.config["curvature"],
        )

    @cached_property
    def deflation(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Top eigenpairs of C + l2 I stored at build time (deflated in LiSSA), if any."""
        if not self.run.has("curvature_top_eigenvalues"):
            return None
        vecs = self.run.array("curvature_top_eigenvectors")
        dtype = self.run.train.features.dtype
        return np.asarray(self.run.array("curvature_top_eigenvalues")), np.ascontiguousarray(vecs, dtype=dtype)

    @cached_property
    def eigen_solver(self) -> inf.EigenSolver | None:
        """The dense eigendecomposition of C + l2 I (heads up to `exact_max_params`), else None."""
        if not self.run.has("curvature_eigenvalues"):
            return None
        return inf.EigenSolver.from_arrays(
            np.asarray(self.run.array("curvature_eigenvalues")), np.asarray(self.run.array("curvature_eigenvectors"))
        )

    @property
    def top_eigenvalue(self) -> float:
        return float(self.run.extra["top_eigenvalue"])

    @cached_property
    def damping(self) -> float:
        """The damping d of (C + l2 I + d I): the LissaConfig's when set, else the build's (`extra["damping"]`),
        else, for runs built before it was stored, the same automatic rule computed here."""
        if self.lissa_config.damping is not None:
            return float(self.lissa_config.damping)
        stored = self.run.extra.get("damping")
        if stored is not None:
            return float(stored)
        ref = inf.reference_eigenvalue(self.top_eigenvalue, None if self.deflation is None else self.deflation[0])
        return float(inf.compute_damping(ref, self.run.l2))

    @cached_property
    def curvature(self) -> inf.HeadCurvature:
        """The curvature operator of the head scope, with this Engine's damping; "lissa" solves a GGN run by
        conjugate gradients preconditioned by the stored top eigenpairs, a Hessian run by deflated LiSSA."""
        return inf.HeadCurvature(
            matvec=self.matvec,
            l2=self.run.l2,
            top_eigenvalue=self.top_eigenvalue,
            damping=self.damping,
            deflation=self.deflation,
            eigen=self.eigen_solver,
            # the GGN is positive definite: conjugate gradients, preconditioned by the deflated eigenpairs
            iterative="cg" if self.run.config["curvature"] == "ggn" else "lissa",
        )

    @cached_property
    def _kronecker(self) -> dict[str, inf.KroneckerCurvature]:
        from indexer.training_set import load_kronecker

        return load_kronecker(self.run.paths, self.run.extra, damping=self.kronecker_damping)

    @property
    def kronecker_damping(self) -> float:
        """The damping of the plain K-FAC / EK-FAC models (runs without stored top eigenpairs; the deflated ones of
        `kronecker_inverse` use `damping`): the LissaConfig's when set, else the eigenvalue rule's. The build's
        calibrated damping (`indexer.calibration`) is measured for the exact operator; on the plain Kronecker
        models it lowered LDS (Fashion-MNIST MLP: EK-FAC 0.496 at the rule's 0, 0.427 at the calibrated 0.0148)."""
        if self.lissa_config.damping is not None:
            return float(self.lissa_config.damping)
        record = self.run.extra.get("damping_calibration") or {}
        return float(record.get("rule_damping", self.damping))

    def kronecker(self, kind: str) -> inf.KroneckerCurvature:
        """The run's K-FAC or EK-FAC approximation of C (`influence.kfac`, build stage "kronecker"), with
        `kronecker_damping`."""
        if kind not in self._kronecker:
            raise ValueError(
                f"method {kind!r} needs the run's Kronecker factors (build stage 'kronecker'), which "
                f"{self.run.root} was built without: run build_index / `influence index` on it again to add them"
            )
        return self._kronecker[kind]

    def kronecker_inverse(self, kind: str) -> tuple[Any, dict[str, float]]:
        """R -> the inverse of the run's K-FAC / EK-FAC model on the rows of R, and its diagnostics.

        Where the run stores the top eigenpairs of C + l2 I (heads with a hidden layer: build stage "curvature"),
        the model is exact on that subspace and Kronecker-factored on the rest (`influence.deflated_inverse`), at
        the operator's damping `damping` (the build's calibrated one); otherwise the plain Kronecker inverse at
        `kronecker_damping`. Fashion-MNIST MLP (issue 14, 100 queries): EK-FAC LDS 0.496 plain at the rule's 0,
        0.427 plain at the calibrated 0.0149, 0.508 deflated at 0.0149 (the exact solve: 0.511).
        """
        curvature = self.kronecker(kind)
        if self.deflation is None:
            return curvature.preconditioner(), {"damping": curvature.damping, "deflation_rank": 0.0}
        eigenvalues, vectors = self.deflation
        d = self.damping
        inverse = inf.deflated_inverse(eigenvalues, vectors, d, curvature.preconditioner(damping=d))
        return inverse, {"damping": d, "deflation_rank": float(len(eigenvalues))}

    #: the projection matrix of a projected run is kept in memory for queries when it is at most this large
    #: (101,770 x 1,024 float32: 417 MB); larger ones are regenerated block by block for every query batch
    max_projection_bytes: int = 1 << 30

    @cached_property
    def _projection_matrix(self) -> np.ndarray | None:
        proj = self.run.projection
        if proj is None or proj.n_params * proj.dim * 4 > self.max_projection_bytes:
            return None
        return inf.make_projection(proj.n_params, proj.dim, seed=proj.seed).matrix(dtype=np.float32)

    def project(self, q: np.ndarray) -> np.ndarray:
        """P q of query rows [m, p] -> [m, d] float32 with the run's seeded projection (`influence.project`);
        from the matrix kept in memory when it fits (`max_projection_bytes`), which turns a query's projection from
        generating p x d Gaussians into one matrix product."""
        proj = self.run.projection
        if proj is None:
            raise ValueError(f"run {self.run.root} does not project its gradients")
        P = self._projection_matrix
        if P is None:
            return np.asarray(inf.project(np.asarray(q, np.float32), seed=proj.seed, d=proj.dim), np.float32)
        return np.asarray(q, np.float32) @ P

    @cached_property
    def whitening_half(self) -> Any | None:
        """v -> K^1/2 v for rows of v, K the curvature model the build whitened the projected space "grad-whitened"
        with (`indexer.training_set.whitened_stage`: the run's EK-FAC, or in runs without Kronecker factors and
        those built before, the spectral model of the top eigenpairs), deflated along the ReLU rescaling
        directions (`influence.symmetry`); None when the run has no such space."""
        from indexer.training_set import whitening_powers

        record = self.run.extra.get("whitened")
        if record is None or "grad-whitened" not in self.run.manifest.spaces:
            return None
        up = whitening_powers(self.run.paths, self.run.extra, record)[1]
        # y = K^1/2 v without its component along K^1/2 of the head's ReLU rescaling directions, which every
        # z_i = K^-1/2 g_i is orthogonal to: the same y . z_i, a smaller ||y||, less projection noise
        return inf.deflated_rows(up, inf.rescaling_directions(self.run.spec, self.run.params))

    def require_exact(self) -> None:
        """Raises a ValueError naming the limit when the run has no dense eigendecomposition."""
        if self.eigen_solver is None:
            raise ValueError(
                f"method 'exact' needs a head with at most exact_max_params={self.run.config['exact_max_params']}"
                f" parameters; this head has {self.run.n_params}: use method='lissa'"
            )

    def solve(self, g: np.ndarray, method: str) -> tuple[np.ndarray, dict[str, float]]:
        """(C + l2 I + dI)^-1 g for each row of g by `method` ("lissa" or "exact"), plus diagnostics."""
        x, diagnostics = self.curvature.solve(pad_rows(g), method=method, lissa=self.lissa_config)
        return x[: len(g)], diagnostics

    @cached_property
    def query_cache(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(solutions [n_test, p], targets [n_test], residuals [n_test]) stored by the build's "queries" stage.

        None unless the run was built with `IndexConfig(cache_queries=True)` and the cache still describes this
        run and this Engine's LiSSA options (`indexer.queries.query_cache_key`); then LiSSA solves at query time.
        """
        from indexer.queries import query_cache_key

        record = self.run.extra.get("query_cache")
        if record is None or "queries" not in self.run.manifest.stages:
            return None
        train = self.run.train
        key = query_cache_key(
            train.ids,
            train.labels,
            len(train.features),
            self.top_eigenvalue,
            None if self.deflation is None else self.deflation[0],
            l2=self.run.l2,
            damping=self.damping,
            lissa=dataclasses.replace(self.lissa_config, damping=self.damping),
        )
        if key != record["key"]:
            return None
        return tuple(np.asarray(self.run.array(n)) for n in ("query_solutions", "query_targets", "query_residuals"))

    # ----------------------------------------------------------------------------- scope="last-block"
    @property
    def block_record(self) -> dict[str, Any]:
        """The last-block stage's manifest record (dim, n_params, seeds, damping, ...)."""
        return self.run.extra["block"]

    @cached_property
    def block_curvature(self) -> inf.ProjectedCurvature:
        """The projected curvature of a last-block run (`indexer.block`), with its damping."""
        A = np.asarray(self.run.array("block_curvature"), np.float64)
        B = np.asarray(self.run.array("block_gram"), np.float64)
        record = self.block_record
        if self.lissa_config.damping is not None:
            damping = float(self.lissa_config.damping)
        elif record.get("damping") is not None:
            damping = float(record["damping"])
        else:  # runs built before the damping was stored: the top Ritz value of C + l2 I on span(S)
            damping = inf.compute_damping(float(inf.pencil_eigh(A, B)[0][0]), self.run.l2)
        return inf.ProjectedCurvature(
            A=A,
            B=B,
            full_space_scale=record["n_params"] / record["dim"],  # p / d: scores in full-space units
            l2=self.run.l2,
            damping=damping,
            deflation_rank=int(min(self.run.config.get("deflation_rank", 64), record["dim"] - 1)),
        )

    @cached_property
    def _block_projection(self) -> Any:
        from indexer.block import block_projection

        return block_projection(self._block_scope(), self.block_record)

    def _block_scope(self) -> Any:
        if self.task is None or self.task.block is None:
            raise ValueError(
                "this run takes influence over the last transformer block: gradients of raw texts, or of stored "
                "test examples at a class other than the predicted one, need the model: "
                "open_index(path, task=Task.from_hf(..., scope='last-block'))"
            )
        return self.task.block

    def block_gradients(self, queries: Queries) -> np.ndarray:
        """phi_q = S^T g_q of the queries at their targets, ``[m, d]`` float64: stored for stored test examples
        at their stored target, else through the task's last-block scope (needs `task=`)."""
        from indexer.block import BLOCK_CHUNK_ROWS, embed_block

        def through_model(texts: list[str], targets: np.ndarray) -> np.ndarray:
            return embed_block(self._block_scope(), texts, targets, self._block_projection, chunk_rows=BLOCK_CHUNK_ROWS)

        targets = queries.targets
        if queries.test_rows is None:
            if queries.texts is None:
                raise ValueError("a last-block run needs stored test ids or texts for its query gradients")
            return np.asarray(through_model(queries.texts, targets), np.float64)
        rows = queries.test_rows
        hit = np.asarray(self.run.array("block_test_targets"))[rows] == targets
        phi = np.empty((len(targets), self.block_record["dim"]), np.float64)
        phi[hit] = np.asarray(self.run.array("block_test_vectors"))[rows[hit]]
        if not hit.all():
            if self.task is None or self.task.test is None:
                self._block_scope()  # raises: the model is needed
            phi[~hit] = through_model([self.task.test[int(r)][0] for r in rows[~hit]], targets[~hit])
        return phi

    # -------------------------------------------------------------------------------------------- queries
    def prepare(self, test_ids: Sequence[int] | None, inputs: Any, targets: Any = None) -> Queries:
        """Validates a query (exactly one of stored `test_ids` or raw `inputs`) and prepares it."""
        if (test_ids is None) == (inputs is None):
            raise ValueError("pass exactly one of test_ids= or inputs=")
        rows, texts, raw = None, None, None
        if test_ids is not None:
            if isinstance(test_ids, int | np.integer):
                test_ids = [int(test_ids)]
            if len(test_ids) == 0:
                raise ValueError("test_ids is empty")
            test = self.run.test
            rows = self.test_rows(test_ids)
            h = np.asarray(test.features[rows])
            labels: list[int | None] = [int(v) for v in test.labels[rows]]
            qids: list[int | None] = [int(v) for v in test.ids[rows]]
        else:
            from indexer.inputs import example_rows, features_of_inputs

            if self.task is None:
                raise ValueError("inputs= needs the model: open the index with open_index(path, task=task)")
            h = features_of_inputs(self.task, inputs, tuple(self.run.extra["feature_shape"]))
            labels, qids = [None] * len(h), [None] * len(h)
            if isinstance(inputs, list | tuple) and all(isinstance(t, str) for t in inputs):
                texts = list(inputs)
            raw = example_rows(self.task, inputs)
        logits = self.logits(h)
        tgt = self.check_targets(targets, len(h)) if targets is not None else logits.argmax(1)
        return Queries(h, logits, tgt.astype(np.int64), qids, labels, rows, texts, raw)

    def test_rows(self, test_ids: Sequence[int]) -> np.ndarray:
        """Rows of stored test ids, or an UnknownExampleError naming the unknown ones."""
        if self.run.test is None:
            raise UnknownExampleError(f"this run stores no test examples; unknown test ids {list(test_ids)[:20]}")
        return self.run.test.rows(test_ids)

    def check_targets(self, targets: Any, m: int) -> np.ndarray:
        """targets as ``[m]`` class ids in [0, n_classes) (one int broadcasts), else a ValueError naming them."""
        tgt = np.asarray(targets)
        if tgt.ndim == 0:
            tgt = np.full(m, tgt)
        n = self.run.n_classes
        if tgt.dtype.kind not in "iu" or tgt.shape != (m,) or (tgt < 0).any() or (tgt >= n).any():
            raise ValueError(f"targets must be {m} class ids in [0, {n}), got {targets!r}")
        return tgt

    @property
    def root(self) -> Path:
        return self.run.paths.root
