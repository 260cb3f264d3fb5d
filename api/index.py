"""The Python API: `build_index`, `open_index` and the `Index` facade over a run directory.

`Index` is thin: the run on disk is a `store.OpenedRun`, the shared math an `api.engine.Engine`, each method a
scorer of `api.scorers` (query-side vectors, train-side vectors, FAISS space), and the jobs (`api.dump`,
`api.noise`) take the engine. Every method is an inner product between a query-side vector and stored
train-side vectors: influence `(H + dI)^-1 g_q . g_i`, representer `onehot(c) x phi_q . vec(alpha_i phi_i^T)`,
grad-dot `g_q . g_i`, grad-cos `g_q/|g_q| . g_i/|g_i|`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import influence as inf
from indexer import IndexConfig, Task, build_run
from store import OpenedRun

from .decisions import Decisions
from .engine import Engine, check_k
from .ray_cluster import ray_session
from .records import Explanation, Influencer, Suspect
from .scorers import METHODS, scorer_for, search

__all__ = ["METHODS", "Index", "build_index", "open_index"]


def build_index(task: Task, out: str | Path, *, config: IndexConfig | None = None, progress=True, ray=None) -> Index:
    """Builds (or resumes) the run directory `out` for `task` and opens it; `ray`: `api.ray_cluster`."""
    with ray_session(ray) as distributed:  # the value is checked before anything is written
        build_run(task, out, config=config, progress=progress, distributed=distributed)
    return Index(out, task=task)


def open_index(path: str | Path, *, task: Task | None = None, lissa: inf.LissaConfig | None = None) -> Index:
    """Opens a built run directory. Stored test ids need no model; raw `inputs=` need `task=`."""
    return Index(path, task=task, lissa=lissa)


class Index(Decisions):
    """A built run directory, ready to answer queries.

    Attributes:
        run: The opened run directory (`store.OpenedRun`): manifest, metadata, arrays, FAISS spaces.
        engine: The math shared by the scorers and jobs (`api.engine.Engine`): head, curvature, damping.
    """

    def __init__(self, path: str | Path, *, task: Task | None = None, lissa: inf.LissaConfig | None = None) -> None:
        self.run = OpenedRun(path, fingerprint=None if task is None else task.fingerprint())
        self.engine = Engine(self.run, task=task, lissa=lissa)

    # ------------------------------------------------------------------------------ what the run holds
    @property
    def paths(self):
        return self.run.paths

    @property
    def manifest(self):
        return self.run.manifest

    @property
    def metadata(self):
        return self.run.metadata

    @property
    def n_classes(self) -> int:
        return self.run.n_classes

    @property
    def train_ids(self) -> np.ndarray:
        return self.run.train.ids

    @property
    def test_ids(self) -> np.ndarray:
        return np.zeros(0, np.int64) if self.run.test is None else self.run.test.ids

    # -------------------------------------------------------------------------------------------- queries
    def influencers(self, ids: np.ndarray, scores: np.ndarray) -> tuple[Influencer, ...]:
        """Records of training examples with their scores, joined from SQLite."""
        if len(ids) == 0:
            return ()
        records = self.run.metadata.get("train", [int(v) for v in ids])
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
            method: one of `METHODS` ("lissa", "exact", "representer", "grad-dot", "grad-cos").
            targets: classes to explain instead of the predicted ones.
        """
        scorer = scorer_for(self.engine, method)
        k = check_k(k)
        queries = self.engine.prepare(test_ids, inputs, targets)
        q, diag = scorer.query_vectors(queries)
        pos, neg = search(self.engine, scorer, q, k)
        probs = np.asarray(inf.softmax(queries.logits))
        out = []
        for j in range(len(queries)):
            (pid, ps), (nid, ns) = pos[j], neg[j]
            keep_p, keep_n = ps > 0, ns < 0
            out.append(
                Explanation(
                    test_id=queries.test_ids[j],
                    prediction=int(queries.predictions[j]),
                    label=queries.labels[j],
                    target=int(queries.targets[j]),
                    method=method,
                    proponents=self.influencers(pid[keep_p], ps[keep_p]),
                    opponents=self.influencers(nid[keep_n], ns[keep_n]),
                    probabilities=tuple(float(v) for v in probs[j]),
                    diagnostics=diag or None,
                )
            )
        return out

    def pairwise_scores(self, test_ids: Sequence[int], *, method: str = "lissa", targets: Any = None) -> np.ndarray:
        """Dense scores [m, n_train] of stored test examples (the reference top-k results are checked against;
        small runs only). `targets=` as in `explain`."""
        scorer = scorer_for(self.engine, method)
        q, _ = scorer.query_vectors(self.engine.prepare(test_ids, None, targets))
        return q @ scorer.train_vectors(slice(None)).T

    def example_influence(self, example_id: int, *, k: int = 5, method: str = "lissa") -> Any:
        """The stored test predictions a training example supports / opposes most (`api.support`)."""
        from .support import example_influence

        return example_influence(self, example_id, k=k, method=method)

    def find_label_noise(self, **kwargs: Any) -> list[Suspect]:
        """Every training example ranked by how likely its label is wrong, most suspicious first.

        See `api.noise.find_label_noise` for the signals and options.
        """
        from .noise import find_label_noise

        return find_label_noise(self.engine, **kwargs)

    def dump(self, path: str | Path, test_ids: Sequence[int] | None = None, **options: Any) -> Path:
        """Streams top-k proponents and opponents of many queries to a Parquet file, in blocks of queries.

        One row per (query, kept training example): `test_id`, `kind` ("proponent" | "opponent"), `rank`
        (1 = strongest within its kind), `example_id`, `score`, `label`, `method`. Memory is bounded by one
        block of queries; resumable after a kill (same arguments); the file appears atomically when complete.
        Options (`k=100`, `method="lissa"`, `block_size=256`, `progress=True`, `dense=False`, `aggregates=True`,
        `on_block=None`, `ray=None`) as in `api.dump.dump`.
        """
        from .dump import dump

        return dump(self.engine, path, test_ids, **options)

    def info(self) -> dict[str, Any]:
        """What the run holds, as plain JSON."""
        return self.run.info()

    def close(self) -> None:
        self.run.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Index({str(self.run.root)!r}, n_train={len(self.train_ids)}, n_test={len(self.test_ids)})"
