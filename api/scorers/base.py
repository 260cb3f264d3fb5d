"""The scorer interface, the registry, and the top-k search every scorer shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np

import influence as inf
from api.methods import METHOD_HELP as DECLARED_HELP
from store import search_both_signs

if TYPE_CHECKING:
    from api.engine import Engine, Queries

TopK = tuple[np.ndarray, np.ndarray]
"""(ids, scores) of one query's top-k, best first."""


class Scorer(Protocol):
    """How one method scores queries against the training set in one scope."""

    method: str
    #: the FAISS space holding the train-side vectors
    space: str
    #: True when that space is projected: FAISS proposes candidates, `train_vectors` re-scores them exactly
    projected: bool

    def query_vectors(self, queries: Queries) -> tuple[np.ndarray, dict[str, float]]:
        """Query-side vectors ``[m, d]`` (full space, unprojected) and solver diagnostics."""
        ...

    def train_vectors(self, rows: slice | np.ndarray) -> np.ndarray:
        """Train-side vectors of training rows ``[c, d]``: score = query_vector . train_vector."""
        ...

    def scores(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact scores of query vectors q [m, d] against training rows, ``[m, len(rows)]`` (the re-scoring of
        projected candidates)."""
        ...


#: scope -> method -> scorer class (constructed as `cls(engine)`)
METHODS_BY_SCOPE: dict[str, dict[str, Callable[[Engine], Scorer]]] = {}
#: method -> one line of help, in registration order
METHOD_HELP: dict[str, str] = {}


def register(method: str, *, scope: str | tuple[str, ...], help: str | None = None) -> Callable[[type], type]:
    """Class decorator: registers a scorer class (constructed as `cls(engine)`) for `method` in `scope`(s).

    A method's help line is declared in `api.methods.METHOD_HELP` (where the command line reads the names without
    importing this package). A method defined at run time in Python, not declared there, passes `help` (once,
    where it is first registered); the command line does not offer it.
    """
    if help is None:
        help = DECLARED_HELP.get(method)
    if help is None and method not in METHOD_HELP:
        raise ValueError(f"register: method {method!r} is not declared in api/methods.py, so it needs help=")

    def wrap(cls: type) -> type:
        for s in (scope,) if isinstance(scope, str) else scope:
            METHODS_BY_SCOPE.setdefault(s, {})[method] = cls
        if help is not None:
            METHOD_HELP.setdefault(method, help)
        return cls

    return wrap


class StoredTrainSide:
    """Base of scorers whose train-side vectors are cheap to read: exact scores are q . train_vectors(rows)."""

    def train_vectors(self, rows: slice | np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def scores(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return q @ self.train_vectors(rows).T


def methods_help() -> str:
    """One line for CLI help: the methods, `|`-separated."""
    return "|".join(METHOD_HELP)


def check_method(method: object) -> str:
    """The method name, or a ValueError naming it and the choices."""
    if not isinstance(method, str) or method not in METHOD_HELP:
        raise ValueError(f"method must be one of {tuple(METHOD_HELP)}, got {method!r}")
    return method


def scorer_for(engine: Engine, method: object) -> Scorer:
    """The scorer of `method` for the engine's run scope (cached on the engine)."""
    method = check_method(method)
    scope = engine.run.scope
    cls = METHODS_BY_SCOPE.get(scope, {}).get(method)
    if cls is None:
        raise ValueError(f"method {method!r} is not defined on scope={scope!r} runs")
    cache = engine.__dict__.setdefault("_scorers", {})
    if method not in cache:
        cache[method] = cls(engine)
    return cache[method]


def search(engine: Engine, scorer: Scorer, q: np.ndarray, k: int) -> tuple[list[TopK], list[TopK]]:
    """Top-k highest and lowest (ids, scores) per query vector row, exact scores.

    An exact space answers from FAISS directly; a projected one proposes max(20 k, `engine.min_candidates`)
    candidates per sign, which are re-scored exactly and ranked with `influence.topk_both_signs` (ties: smaller
    id first). Candidates for influence scores (a curvature solve q against raw gradients, `whitened_candidates`)
    come from the whitened space where the run has one: P K^1/2 q against P K^-1/2 g_i
    (`indexer.training_set.whitened_stage`; K^1/2 q deflated along the ReLU rescaling directions,
    `influence.symmetry`), whose inner product estimates q . g_i; grad-dot's from the raw projected space.
    """
    if not scorer.projected:
        index = engine.run.space(scorer.space)
        pos, neg = search_both_signs(index, np.ascontiguousarray(q, np.float32), k)
        return [(h.ids, h.scores) for h in pos], [(h.ids, h.scores) for h in neg]
    space = scorer.space
    whiten = space == "grad" and engine.use_whitened_space and getattr(scorer, "whitened_candidates", False)
    half = engine.whitening_half if whiten else None
    if half is not None:
        space, q_search = "grad-whitened", np.asarray(half(np.asarray(q, np.float32)))
    else:
        q_search = q
    index = engine.run.space(space)
    qp = engine.project(q_search)
    n_cand = min(index.ntotal, max(20 * k, engine.min_candidates))
    pos_hits, neg_hits = search_both_signs(index, np.ascontiguousarray(qp), n_cand)
    out_pos, out_neg = [], []
    for j in range(len(q)):
        cand = np.union1d(pos_hits[j].ids, neg_hits[j].ids)
        s = scorer.scores(q[j : j + 1], engine.run.train.rows(cand))
        (ps, pid), (ns, nid) = inf.topk_both_signs(s, cand, k)
        out_pos.append((pid[0], ps[0]))
        out_neg.append((nid[0], ns[0]))
    return out_pos, out_neg
