"""One scorer per method and scope, behind one registry.

Every method is an inner product of a query-side vector with stored train-side vectors: a scorer says how to
compute the query vectors (`query_vectors`), the train-side vectors of any rows (`train_vectors`), which FAISS
space holds them (`space`) and whether that space is projected, so that FAISS only proposes candidates and the
scores are recomputed exactly (`projected`). `METHODS`, the HTTP schema and the CLI help come from this registry.

Adding a method: its name and help line in `api.methods.METHOD_HELP` (the command line reads them without importing
this package), and a new module here with a class decorated `@register("name", scope="head")` that implements
`Scorer`, imported below. Adding a scope: register the methods it supports under its name.
"""

from api.scorers import head, kronecker, lastblock, model, representer  # noqa: F401  (each module registers its scorers)
from api.scorers.base import METHOD_HELP, Scorer, check_method, methods_help, register, scorer_for, search

#: every registered method, in registration order ("lissa" first: the default)
METHODS: tuple[str, ...] = tuple(METHOD_HELP)

__all__ = ["METHODS", "METHOD_HELP", "Scorer", "check_method", "methods_help", "register", "scorer_for", "search"]
