"""The Python API: `build_index`, `open_index` and the `Index` facade over a run directory.

Every method is an inner product between a query-side vector (computed in `influence/`) and stored train-side
vectors (FAISS): influence `(H + dI)^-1 g_q . g_i`, representer `onehot(c) x phi_q . vec(alpha_i phi_i^T)`,
grad-dot `g_q . g_i`, grad-cos `g_q/|g_q| . g_i/|g_i|`. Where gradients are projected, FAISS returns
candidates and the scores are recomputed exactly from the cached features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

import influence as inf
from indexer import IndexConfig, Task, build_run
from indexer.build import params_from_tensors
from indexer.queries import query_cache_key
from store import (
    ConfigMismatchError,
    CorruptRunError,
    FaissVectorIndex,
    MetadataStore,
    RunPaths,
    UnknownExampleError,
    load_array,
    load_manifest,
    load_tensors,
    search_both_signs,
)

from .records import Explanation, Influencer, Suspect

METHODS = ("lissa", "exact", "representer", "grad-dot", "grad-cos")
SPACE_OF = {
    "lissa": "grad",
    "exact": "grad",
    "grad-dot": "grad",
    "grad-cos": "grad-unit",
    "representer": "representer",
}
#: spaces of the gradient methods in a scope="last-block" run (projected last-block gradients, `indexer.block`)
BLOCK_SPACE_OF = {"lissa": "block", "exact": "block", "grad-dot": "block", "grad-cos": "block-unit"}
MAX_K = 10_000


def build_index(task: Task, out: str | Path, *, config: IndexConfig | None = None, progress: bool = True) -> Index:
    """Builds (or resumes) the run directory `out` for `task` and opens it."""
    build_run(task, out, config=config, progress=progress)
    return Index(out, task=task)


def open_index(path: str | Path, *, task: Task | None = None, lissa: inf.LissaConfig | None = None) -> Index:
    """Opens a built run directory. Stored test ids need no model; raw `inputs=` need `task=`."""
    return Index(path, task=task, lissa=lissa)


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1 or k > MAX_K:
        raise ValueError(f"k must be an int in [1, {MAX_K}], got {k!r}")
    return int(k)


class Index:
    """A built run directory, ready to answer queries."""

    #: candidates per sign fetched from a projected FAISS space before exact re-scoring (at least 20 k)
    min_candidates: int = 1000
    #: read LiSSA vectors of stored test examples from the build's query cache when valid (False: always solve)
    use_query_cache: bool = True

    def __init__(self, path: str | Path, *, task: Task | None = None, lissa: inf.LissaConfig | None = None) -> None:
        self.paths = RunPaths(Path(path))
        self.manifest = load_manifest(self.paths.root)
        if "complete" not in self.manifest.stages:
            raise CorruptRunError(
                f"run directory {self.paths.root} is incomplete (stages done: {list(self.manifest.stages)}); "
                "run the same `influence index` / build_index again to resume it"
            )
        if task is not None and task.fingerprint() != self.manifest.model_fingerprint:
            raise ConfigMismatchError(
                f"task= model fingerprint {task.fingerprint()[:16]} differs from the run's "
                f"{self.manifest.model_fingerprint[:16]} ({self.paths.root}): this run was built for another model"
            )
        self.task = task
        self.lissa_config = lissa or inf.LissaConfig()
        self.metadata = MetadataStore(self.paths.metadata, create=False)
        head = self.manifest.head
        self.spec: list[dict[str, Any]] = head["spec"]
        self.n_classes: int = int(head["n_classes"])
        self.params = params_from_tensors(self.spec, load_tensors(self.paths.head))
        self.theta, self.unravel = inf.flatten_params(self.params)
        self.l2 = float(self.manifest.task["l2"])
        self.train_features = load_array(self.paths.array("train_features"))
        self.train_labels = np.asarray(load_array(self.paths.array("train_labels")))
        self.train_ids = np.asarray(load_array(self.paths.array("train_ids")))
        self._train_row = self._row_lookup(self.train_ids)
        if self.manifest.task["n_test"]:
            self.test_features = load_array(self.paths.array("test_features"))
            self.test_labels = np.asarray(load_array(self.paths.array("test_labels")))
            self.test_ids = np.asarray(load_array(self.paths.array("test_ids")))
        else:
            self.test_features, self.test_labels, self.test_ids = None, None, np.zeros(0, np.int64)
        self._test_row = self._row_lookup(self.test_ids)
        self._spaces: dict[str, FaissVectorIndex] = {}
        #: "head" or "last-block": the parameters the gradient methods take influence over
        self.scope: str = self.manifest.task.get("scope", "head")

    # ------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _row_lookup(ids: np.ndarray) -> dict[int, int] | None:
        """None when ids are positions (id == row); else an id -> row dict."""
        if np.array_equal(ids, np.arange(len(ids))):
            return None
        return {int(v): i for i, v in enumerate(ids)}

    def _rows(self, ids: Sequence[int], split: str) -> np.ndarray:
        lookup, n = (self._train_row, len(self.train_ids)) if split == "train" else (self._test_row, len(self.test_ids))
        rows, missing = [], []
        for v in ids:
            if isinstance(v, bool) or not isinstance(v, int | np.integer):
                raise ValueError(f"{split}_ids must be integers, got {v!r}")
            v = int(v)
            row = (v if 0 <= v < n else None) if lookup is None else lookup.get(v)
            if row is None:
                missing.append(v)
            else:
                rows.append(row)
        if missing:
            raise UnknownExampleError(f"unknown {split} example ids: {missing[:20]} ({n} stored)")
        return np.asarray(rows, np.int64)

    def space(self, name: str) -> FaissVectorIndex:
        if name not in self._spaces:
            # memory-mapped when the file is large next to the available memory
            self._spaces[name] = FaissVectorIndex.load(self.paths.vector(name), mmap="auto")
        return self._spaces[name]

    @property
    def projection(self) -> dict[str, Any] | None:
        return self.manifest.projection

    def space_of(self, method: str) -> str:
        """The FAISS space a method searches (its train-side vectors)."""
        if self.scope == "last-block" and method in BLOCK_SPACE_OF:
            return BLOCK_SPACE_OF[method]
        return SPACE_OF[method]

    def rescored(self, method: str) -> bool:
        """True when the method's FAISS space holds projected head gradients: FAISS gives candidates and the
        scores are recomputed exactly from the cached features."""
        return self.projection is not None and self.space_of(method) in ("grad", "grad-unit")

    @cached_property
    def _train_h(self) -> np.ndarray:
        return np.asarray(self.train_features)

    @cached_property
    def matvec(self):
        """(C + l2 I) v over all cached training features, jit-compiled once per Index."""
        n = len(self._train_h)
        return inf.make_head_matvec(
            self.spec,
            self.unravel,
            self.theta,
            self._train_h,
            self.train_labels,
            l2=self.l2,
            curvature=self.manifest.methods["curvature"],
            batch_size=None if n <= 16_384 else 4096,
        )

    @property
    def top_eigenvalue(self) -> float:
        return float(self.manifest.extra["top_eigenvalue"])

    @cached_property
    def damping(self) -> float:
        """The damping d of (H + l2 I + d I), shared by every solver of this Index.

        Automatic: max(0, 1e-3 lambda_ref - l2) with lambda_ref the top eigenvalue of the operator LiSSA
        iterates on: lambda_max, or with deflation the largest non-deflated eigenvalue (<= lambda_r). That keeps
        LiSSA's condition number <= ~1000 while damping (which biases scores) is as small as possible: on the
        digits MLP it is 0 with deflation instead of 1e-3 (a 10% shift of the scores) without.
        """
        ref = self.top_eigenvalue if self.deflation is None else float(np.min(self.deflation[0]))
        return float(inf.resolve_damping(ref, self.l2, self.lissa_config.damping))

    @cached_property
    def eigen_solver(self) -> inf.EigenSolver:
        path = self.paths.array("curvature_eigenvalues")
        if not path.exists():
            raise ValueError(
                f"method 'exact' needs a head with at most exact_max_params={self.manifest.methods['exact_max_params']}"
                f" parameters; this head has {self.manifest.head['n_params']}: use method='lissa'"
            )
        return inf.EigenSolver.from_arrays(
            np.asarray(load_array(path)), np.asarray(load_array(self.paths.array("curvature_eigenvectors")))
        )

    def features_of(self, inputs: Any) -> np.ndarray:
        """Cut features of raw inputs through the task's body (needs `task=`)."""
        if self.task is None:
            raise ValueError("inputs= needs the model: open the index with open_index(path, task=task)")
        import torch

        if isinstance(inputs, str):
            raise ValueError(f"inputs must be a list of texts, got one str: pass [{inputs[:40]!r}]")
        if isinstance(inputs, list | tuple) and inputs and all(isinstance(t, str) for t in inputs):
            return self.task.features(list(inputs))  # a text body (Task.from_hf) tokenizes the texts itself
        x = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(np.asarray(inputs))
        if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise ValueError(f"inputs must be a float tensor/array, got dtype {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError("inputs contain NaN or inf")
        try:
            h = self.task.features(x.float())
        except RuntimeError as err:
            raise ValueError(f"inputs of shape {tuple(x.shape)} do not fit the model: {err}") from err
        fshape = tuple(self.manifest.extra["feature_shape"])
        if h.ndim != len(fshape) + 1 or tuple(h.shape[1:]) != fshape:
            raise ValueError(f"inputs of shape {tuple(x.shape)} give features {tuple(h.shape)}, expected [m, {fshape}]")
        return h

    def logits(self, h: np.ndarray) -> np.ndarray:
        return np.asarray(inf.apply_head(self.spec, self.params, h), np.float64)

    def query_gradients(self, h: np.ndarray, targets: np.ndarray) -> np.ndarray:
        return np.asarray(inf.compute_per_example_grads(self.spec, self.unravel, self.theta, h, targets))

    @cached_property
    def deflation(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Top eigenpairs of the curvature stored at build time (deflated in LiSSA), if any."""
        path = self.paths.array("curvature_top_eigenvalues")
        if not path.exists():
            return None
        vecs = np.asarray(load_array(self.paths.array("curvature_top_eigenvectors")))
        return np.asarray(load_array(path)), np.ascontiguousarray(vecs, dtype=self._train_h.dtype)

    def solve(self, g: np.ndarray, method: str) -> tuple[np.ndarray, dict[str, float]]:
        """(C + l2 I + dI)^-1 g for each row of g, by LiSSA or the dense eigendecomposition."""
        if method == "exact":
            x = self.eigen_solver.solve(g.astype(np.float64), damping=self.damping)
            return np.asarray(x), {"damping": self.damping}
        result = inf.solve_lissa(
            self.matvec,
            g,
            config=dataclasses.replace(self.lissa_config, damping=self.damping),
            l2=self.l2,
            top_eigenvalue=self.top_eigenvalue,
            min_eigenvalue_floor=self.l2 + self.damping,
            deflation=self.deflation,
        )
        diag = {
            "damping": result.damping,
            "scale": result.scale,
            "depth": float(result.depth),
            "residual_max": float(np.max(result.residual)),
        }
        return np.asarray(result.x), diag

    @cached_property
    def query_cache(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(solutions [n_test, p], targets [n_test], residuals [n_test]) stored by the build's "queries" stage.

        None unless the run was built with `IndexConfig(cache_queries=True)` and the cache still describes this
        run and this Index's LiSSA options (`indexer.queries.query_cache_key`); then LiSSA solves at query time.
        """
        record = self.manifest.extra.get("query_cache")
        if record is None or "queries" not in self.manifest.stages:
            return None
        lam = None if self.deflation is None else self.deflation[0]
        key = query_cache_key(
            self.train_ids,
            self.train_labels,
            len(self.train_features),
            self.top_eigenvalue,
            lam,
            l2=self.l2,
            damping=self.damping,
            lissa=dataclasses.replace(self.lissa_config, damping=self.damping),
        )
        if key != record["key"]:
            return None
        return tuple(
            np.asarray(load_array(self.paths.array(name)))
            for name in ("query_solutions", "query_targets", "query_residuals")
        )

    def lissa_vectors(
        self, g: np.ndarray, targets: np.ndarray, test_rows: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, float]]:
        """LiSSA vectors of g [m, p]: read from the query cache for stored test rows at their cached target."""
        cache = self.query_cache if self.use_query_cache else None
        if test_rows is None or cache is None:
            return self.solve(g, "lissa")
        solutions, cached_targets, residuals = cache
        hit = cached_targets[test_rows] == targets
        q = np.empty(g.shape, np.result_type(g.dtype, solutions.dtype))
        q[hit] = solutions[test_rows[hit]]
        diag = {"damping": self.damping, "cached": float(hit.mean())}
        if hit.any():
            diag["residual_max"] = float(residuals[test_rows[hit]].max())
        if not hit.all():
            q[~hit], solved = self.solve(g[~hit], "lissa")
            diag |= {**solved, "residual_max": max(solved["residual_max"], diag.get("residual_max", 0.0))}
        return q, diag

    def query_vectors(
        self,
        method: str,
        h: np.ndarray,
        targets: np.ndarray,
        *,
        test_rows: np.ndarray | None = None,
        texts: Sequence[str] | None = None,
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Query-side vectors [m, d_full] for a method (unprojected), plus solver diagnostics.

        `test_rows`: the stored test rows of h, if any: method "lissa" then reads the build's query cache (and a
        last-block run its stored query gradients). `texts`: the raw texts of h (a last-block run needs them).
        """
        if self.scope == "last-block" and method in BLOCK_SPACE_OF:
            return self.block_query_vectors(method, targets, test_rows, texts)
        if method == "representer":
            params = self.params
            phi = inf.augment_features(np.asarray(inf.penultimate_features(self.spec, params, h), np.float64))
            return np.asarray(inf.compute_representer_queries(phi, targets, self.n_classes)), {}
        g = self.query_gradients(h, targets)
        if method == "grad-dot":
            return g, {}
        if method == "grad-cos":
            return np.asarray(inf.normalize_rows(g)), {}
        if method == "lissa":
            return self.lissa_vectors(g, targets, test_rows)
        return self.solve(g, method)

    def train_scores(self, method: str, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact scores of the query vectors q [m, p] against training rows (re-scoring FAISS candidates)."""
        if self.scope == "last-block" and method in BLOCK_SPACE_OF:
            g = np.asarray(self.block_train[rows], np.float64)
            if method == "grad-cos":
                g = np.asarray(inf.normalize_rows(g))
            return q @ g.T
        g = self.query_gradients(np.asarray(self.train_features[rows]), self.train_labels[rows])
        if method == "grad-cos":
            g = np.asarray(inf.normalize_rows(g))
        return q @ g.T

    # ------------------------------------------------------------------------------ scope="last-block"
    @property
    def block_record(self) -> dict[str, Any]:
        return self.manifest.extra["block"]

    @cached_property
    def block_train(self) -> np.ndarray:
        """Projected last-block gradients phi_i of the training examples at their labels [n, d]."""
        return load_array(self.paths.array("block_train_vectors"))

    @cached_property
    def block_curvature(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(A, B, mu, V): A = S^T C S + l2 S^T S, B = S^T S [d, d] (float64), and the pencil's eigenpairs
        A V = B V diag(mu), V^T B V = I, mu largest first (`indexer.block`)."""
        import scipy.linalg

        A = np.asarray(load_array(self.paths.array("block_curvature")), np.float64)
        B = np.asarray(load_array(self.paths.array("block_gram")), np.float64)
        mu, V = scipy.linalg.eigh((A + A.T) / 2, (B + B.T) / 2)
        return A, B, mu[::-1].copy(), V[:, ::-1].copy()

    @cached_property
    def block_damping(self) -> float:
        """The automatic damping, as for the head: max(0, 1e-3 mu_max - l2), mu_max the top Ritz value of
        C + l2 I on span(S), unless the LissaConfig gives one."""
        return float(inf.resolve_damping(float(self.block_curvature[2][0]), self.l2, self.lissa_config.damping))

    @cached_property
    def block_projection(self):
        from indexer.block import block_projection

        return block_projection(self._block_scope(), self.block_record)

    def _block_scope(self):
        if self.task is None or self.task.block is None:
            raise ValueError(
                "this run takes influence over the last transformer block: gradients of raw texts, or of stored "
                "test examples at a class other than the predicted one, need the model: "
                "open_index(path, task=Task.from_hf(..., scope='last-block'))"
            )
        return self.task.block

    def block_gradients(self, texts: Sequence[str], targets: np.ndarray) -> np.ndarray:
        """phi = S^T g of texts at targets, through the task's last-block scope (needs `task=`)."""
        from indexer.block import BLOCK_CHUNK_ROWS, embed_block

        return embed_block(
            self._block_scope(), list(texts), targets, self.block_projection, chunk_rows=BLOCK_CHUNK_ROWS
        )

    def block_query_vectors(
        self, method: str, targets: np.ndarray, test_rows: np.ndarray | None, texts: Sequence[str] | None
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Query vectors of a last-block run: phi_q (grad-dot), phi_q/|phi_q| (grad-cos), or
        (p / d) (A + delta B)^-1 phi_q, solved by the pencil's eigendecomposition ("exact") or by LiSSA
        ("lissa"); see `indexer.block`."""
        if test_rows is not None:
            stored = np.asarray(load_array(self.paths.array("block_test_targets")))[test_rows]
            hit = stored == targets
            phi = np.empty((len(targets), self.block_record["dim"]), np.float64)
            phi[hit] = np.asarray(load_array(self.paths.array("block_test_vectors")))[test_rows[hit]]
            if not hit.all():
                if self.task is None or self.task.test is None:
                    self._block_scope()  # raises: the model is needed
                miss = [self.task.test[int(r)][0] for r in test_rows[~hit]]
                phi[~hit] = self.block_gradients(miss, targets[~hit])
        elif texts is not None:
            phi = np.asarray(self.block_gradients(texts, targets), np.float64)
        else:
            raise ValueError("a last-block run needs test_rows= or texts= for its query gradients")
        if method == "grad-dot":
            return phi, {}
        if method == "grad-cos":
            return np.asarray(inf.normalize_rows(phi)), {}
        _, _, mu, V = self.block_curvature
        damping = self.block_damping
        units = self.block_record["n_params"] / self.block_record["dim"]  # p / d: full-space units
        if method == "exact":
            return units * ((phi @ V) / (mu + damping)) @ V.T, {"damping": damping}
        M, lam, vecs = self.block_lissa_operator
        r = self.deflation_rank_block
        result = inf.solve_lissa(
            Partial(jnp.matmul, jnp.asarray(M)),
            phi,
            config=dataclasses.replace(self.lissa_config, damping=0.0),
            top_eigenvalue=float(lam[-1]),
            min_eigenvalue_floor=float(max(lam[0], 1e-12 * lam[-1])),
            deflation=(lam[::-1][:r].copy(), vecs[:, ::-1][:, :r].copy()),
        )
        diag = {
            "damping": damping,
            "scale": result.scale,
            "depth": float(result.depth),
            "residual_max": float(np.max(result.residual)),
        }
        return units * np.asarray(result.x), diag

    @cached_property
    def block_lissa_operator(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(M, eigenvalues ascending, eigenvectors) of M = A + delta B, the matrix LiSSA iterates on (damping
        inside M, deflated by its top eigenpairs). Passed to the jitted loop as a pytree leaf of the matvec, so
        it compiles once, not once per query."""
        A, B, _, _ = self.block_curvature
        M = A + self.block_damping * B
        lam, vecs = np.linalg.eigh((M + M.T) / 2)
        return M, lam, vecs

    @property
    def deflation_rank_block(self) -> int:
        """Top eigenpairs of A + delta B deflated in the block LiSSA (the build's deflation_rank, below d)."""
        return int(min(self.manifest.methods.get("deflation_rank", 64), self.block_record["dim"] - 1))

    # -------------------------------------------------------------------------------------------- queries
    def prepare(
        self, test_ids: Sequence[int] | None, inputs: Any, targets: Sequence[int] | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int | None], list[int | None]]:
        """Validates a query and returns (h, logits, targets, test_ids, labels)."""
        if (test_ids is None) == (inputs is None):
            raise ValueError("pass exactly one of test_ids= or inputs=")
        if test_ids is not None:
            if isinstance(test_ids, int | np.integer):
                test_ids = [int(test_ids)]
            if len(test_ids) == 0:
                raise ValueError("test_ids is empty")
            if self.test_features is None:
                raise UnknownExampleError(f"this run stores no test examples; unknown test ids {list(test_ids)[:20]}")
            rows = self._rows(test_ids, "test")
            h = np.asarray(self.test_features[rows])
            labels: list[int | None] = [int(v) for v in self.test_labels[rows]]
            qids: list[int | None] = [int(v) for v in self.test_ids[rows]]
        else:
            h = self.features_of(inputs)
            labels, qids = [None] * len(h), [None] * len(h)
        logits = self.logits(h)
        if targets is None:
            tgt = logits.argmax(1)
        else:
            tgt = np.asarray(targets)
            if tgt.ndim == 0:
                tgt = np.full(len(h), int(tgt))
            if tgt.dtype.kind not in "iu" or tgt.shape != (len(h),) or (tgt < 0).any() or (tgt >= self.n_classes).any():
                raise ValueError(f"targets must be {len(h)} class ids in [0, {self.n_classes}), got {targets!r}")
        return h, logits, tgt.astype(np.int64), qids, labels

    def scores_topk(
        self, method: str, q: np.ndarray, k: int
    ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[np.ndarray, np.ndarray]]]:
        """Top-k highest and lowest (ids, scores) per query row, exact scores."""
        index = self.space(self.space_of(method))
        if not self.rescored(method):
            pos, neg = search_both_signs(index, np.ascontiguousarray(q, np.float32), k)
            return [(h.ids, h.scores) for h in pos], [(h.ids, h.scores) for h in neg]
        proj = self.projection
        qp = np.asarray(inf.project(q.astype(np.float32), seed=proj["seed"], d=proj["dim"]), np.float32)
        n_cand = min(index.ntotal, max(20 * k, self.min_candidates))
        pos, neg = search_both_signs(index, np.ascontiguousarray(qp), n_cand)
        out_pos, out_neg = [], []
        for j in range(len(q)):
            cand = np.union1d(pos[j].ids, neg[j].ids)
            rows = self._rows(cand, "train")
            s = self.train_scores(method, q[j : j + 1], rows)[0]
            order = np.argsort(-s, kind="stable")
            out_pos.append((cand[order[:k]], s[order[:k]]))
            order = np.argsort(s, kind="stable")
            out_neg.append((cand[order[:k]], s[order[:k]]))
        return out_pos, out_neg

    def influencers(self, ids: np.ndarray, scores: np.ndarray) -> tuple[Influencer, ...]:
        if len(ids) == 0:
            return ()
        records = self.metadata.get("train", [int(v) for v in ids])
        return tuple(
            Influencer(
                example_id=r.example_id,
                score=float(s),
                label=r.label,
                prediction=r.prediction,
                loss=r.loss,
                preview=r.preview,
                content_hash=r.content_hash,
                suspect_score=r.suspect_score,
            )
            for r, s in zip(records, scores, strict=True)
        )

    def explain(
        self,
        test_ids: Sequence[int] | None = None,
        *,
        inputs: Any = None,
        k: int = 10,
        method: str = "lissa",
        targets: Sequence[int] | None = None,
    ) -> list[Explanation]:
        """Why did the model predict this? One Explanation per query, proponents and opponents of each.

        Args:
            test_ids: ids of stored test examples.
            inputs: raw inputs (a batch) instead, run through the task's body (needs `open_index(..., task=)`).
            k: number of proponents and of opponents.
            method: one of "lissa", "exact", "representer", "grad-dot", "grad-cos".
            targets: classes to explain instead of the predicted ones.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        k = _check_k(k)
        h, logits, tgt, qids, labels = self.prepare(test_ids, inputs, targets)
        rows = None if test_ids is None else self._rows(qids, "test")
        texts = list(inputs) if inputs is not None and all(isinstance(t, str) for t in inputs) else None
        q, diag = self.query_vectors(method, h, tgt, test_rows=rows, texts=texts)
        pos, neg = self.scores_topk(method, q, k)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        out = []
        for j in range(len(h)):
            (pid, ps), (nid, ns) = pos[j], neg[j]
            keep_p, keep_n = ps > 0, ns < 0
            out.append(
                Explanation(
                    test_id=qids[j],
                    prediction=int(logits[j].argmax()),
                    label=labels[j],
                    target=int(tgt[j]),
                    method=method,
                    proponents=self.influencers(pid[keep_p], ps[keep_p]),
                    opponents=self.influencers(nid[keep_n], ns[keep_n]),
                    probabilities=tuple(float(v) for v in probs[j]),
                    diagnostics=diag or None,
                )
            )
        return out

    def pairwise_scores(self, test_ids: Sequence[int], *, method: str = "lissa") -> np.ndarray:
        """Dense scores [m, n_train] (the reference the top-k results are checked against; small runs only)."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        h, _, tgt, qids, _ = self.prepare(test_ids, None, None)
        rows = self._rows(qids, "test") if self.scope == "last-block" else None  # its stored query gradients
        q, _ = self.query_vectors(method, h, tgt, test_rows=rows)
        if method == "representer":
            alpha = np.asarray(load_array(self.paths.array("representer_alpha")), np.float64)
            emb = np.asarray(
                inf.compute_representer_embeddings(
                    alpha, np.asarray(load_array(self.paths.array("train_phi")), np.float64)
                )
            )
            return q @ emb.T
        return self.train_scores(method, q, np.arange(len(self.train_ids)))

    def find_label_noise(self, **kwargs: Any) -> list[Suspect]:
        """Every training example ranked by how likely its label is wrong, most suspicious first.

        See `api.noise.find_label_noise` for the signals and options.
        """
        from .noise import find_label_noise

        return find_label_noise(self, **kwargs)

    def dump(
        self,
        path: str | Path,
        test_ids: Sequence[int] | None = None,
        *,
        k: int = 100,
        method: str = "lissa",
        block_size: int = 256,
        progress: bool = True,
        dense: bool = False,
        aggregates: bool = True,
        on_block: Callable[[int, int], None] | None = None,
    ) -> Path:
        """Streams top-k proponents and opponents of many queries to a Parquet file, in blocks of queries.

        One row per (query, kept training example): `test_id`, `kind` ("proponent" | "opponent"), `rank`
        (1 = strongest within its kind), `example_id`, `score`, `label`, `method`. Memory is bounded by one
        block of queries; resumable after a kill (same arguments); the file appears atomically when complete.
        `test_ids=None` dumps every stored test example. `dense=True` also writes every score to
        `<stem>.dense.npy`; `aggregates` writes per-training-example sums and counts to
        `<stem>.aggregates.parquet`; `on_block(done_queries, total_queries)` is called after each block is
        durably written. See `api.dump`.
        """
        from .dump import dump

        return dump(
            self,
            path,
            test_ids,
            k=k,
            method=method,
            block_size=block_size,
            progress=progress,
            dense=dense,
            aggregates=aggregates,
            on_block=on_block,
        )

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "path": str(self.paths.root),
            "schema_version": m.schema_version,
            "model_fingerprint": m.model_fingerprint,
            "task": m.task,
            "head": {
                "n_classes": self.n_classes,
                "n_params": m.head["n_params"],
                "layers": [s["kind"] for s in self.spec],
            },
            "projection": m.projection,
            "spaces": m.spaces,
            "stages": list(m.stages),
            "extra": m.extra,
        }

    def close(self) -> None:
        self.metadata.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Index({str(self.paths.root)!r}, n_train={len(self.train_ids)}, n_test={len(self.test_ids)})"
