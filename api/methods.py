"""The method names and their one-line help, declared without importing a solver.

The command line lists and checks `--method` against these names before it imports torch, JAX or FAISS, so
`influence --help` and a mistyped method answer at once. The scorers (`api.scorers`) register one class per
method and scope under these names; `api.scorers.register` takes a method's help from here (a method defined
at run time in Python may pass ``help=`` instead, but only the names declared here reach the command line).
"""

from __future__ import annotations

#: influence methods (`Index.explain`, dumps, pairwise scores) -> one line of help, "lissa" first (the default)
METHOD_HELP: dict[str, str] = {
    "lissa": "influence by an iterative solve of the exact curvature (default; CG on Gauss-Newton runs, else LiSSA)",
    "exact": "influence with the dense eigendecomposition of the curvature (small heads)",
    "grad-dot": "gradient inner product g_q . g_i (no curvature)",
    "grad-cos": "gradient cosine similarity",
    "ekfac": "influence with the EK-FAC approximation of the curvature",
    "kfac": "influence with the K-FAC approximation of the curvature",
    "representer": "representer points of the last linear layer",
}

#: the label-noise job's signals (`api.noise`), each a method of its own, higher = more suspicious
SIGNALS = (
    "self-influence",
    "loss",
    "margin",
    "representer",
    "confident-learning",
    "oos-loss",
    "loo-loss",
    "tracin",
    "grad-cos",
)
#: every label-noise method: the signals and "fused" (the default)
NOISE_METHODS = (*SIGNALS, "fused")
