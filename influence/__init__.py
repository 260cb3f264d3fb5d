"""Influence math in pure JAX/numpy: heads, objective, curvature products and operators, solvers, representers,
projections, the top-k kernel, label-noise formulas (``influence.noise``). Imports nothing else of this project.

Influence of training example i on query q (sign flipped so that helpful is positive):

    score(q, i) = g_q^T (C + l2 I + damping I)^-1 g_i,   removing i changes the query loss by ~ score / n

Reference: Koh & Liang 2017 (arXiv:1703.04730); Agarwal, Bullins & Hazan 2017 (arXiv:1602.03943);
Yeh et al. 2018 (arXiv:1811.09720).
"""

import jax

# float64 must be available for the exact reference checks; float32 inputs stay float32.
jax.config.update("jax_enable_x64", True)

from influence.curvature import (  # noqa: E402
    HeadCurvature,
    ProjectedCurvature,
    deflated_inverse,
    deflation_power,
    pencil_eigenvalues,
    pencil_eigh,
    reference_eigenvalue,
)
from influence.eigen import compute_top_eigenpairs, eigenpair_residuals  # noqa: E402
from influence.head import (  # noqa: E402
    HEAD_LAYER_KINDS,
    apply_head,
    flatten_params,
    last_linear_index,
    n_params,
    penultimate_features,
    validate_head_params,
    validate_head_spec,
)
from influence.head_ops import Head  # noqa: E402
from influence.hvp import (  # noqa: E402
    MatVec,
    compute_dense_curvature,
    dense_curvature_rows,
    make_head_matvec,
    make_hvp,
    resolve_batch_size,
)
from influence.kfac import (  # noqa: E402
    KRONECKER_KINDS,
    DiagonalBlock,
    KroneckerCurvature,
    KroneckerFactors,
    KroneckerSums,
    LinearBlock,
    compute_correction_sums,
    compute_factor_sums,
    compute_kronecker_factors,
    fit_kronecker_curvature,
    ggn_correction_sums,
    ggn_diagonal_sums,
    kronecker_layout,
    matrix_layout,
    solve_pcg,
)
from influence.objective import (  # noqa: E402
    compute_margins,
    compute_objective,
    compute_per_example_grads,
    cross_entropy,
    make_loss_fn,
    softmax,
)
from influence.projection import (  # noqa: E402
    GaussianProjection,
    compute_projected_ggn,
    layer_seed,
    make_projection,
    project,
)
from influence.representer import (  # noqa: E402
    augment_features,
    compute_fidelity,
    compute_representer_alpha,
    compute_representer_embeddings,
    compute_representer_logits,
    compute_representer_queries,
    fit_representer,
    resolve_representer_lambda,
)
from influence.similarity import accumulate_tracin_self_influence, normalize_rows  # noqa: E402
from influence.solvers import (  # noqa: E402
    EigenSolver,
    LissaConfig,
    LissaDivergenceError,
    SolveResult,
    compute_damping,
    estimate_top_eigenvalue,
    lissa,
    resolve_damping,
    solve_exact,
    solve_lissa,
)
from influence.symmetry import deflated_rows, rescaling_directions  # noqa: E402
from influence.topk import StreamingTopK, merge_topk, select_topk, topk_both_signs  # noqa: E402

__all__ = [
    "HEAD_LAYER_KINDS",
    "KRONECKER_KINDS",
    "DiagonalBlock",
    "EigenSolver",
    "GaussianProjection",
    "Head",
    "HeadCurvature",
    "KroneckerCurvature",
    "KroneckerFactors",
    "KroneckerSums",
    "LinearBlock",
    "LissaConfig",
    "LissaDivergenceError",
    "MatVec",
    "ProjectedCurvature",
    "SolveResult",
    "StreamingTopK",
    "accumulate_tracin_self_influence",
    "apply_head",
    "augment_features",
    "compute_correction_sums",
    "compute_damping",
    "compute_dense_curvature",
    "compute_factor_sums",
    "compute_fidelity",
    "compute_kronecker_factors",
    "compute_margins",
    "compute_objective",
    "compute_per_example_grads",
    "compute_projected_ggn",
    "compute_representer_alpha",
    "compute_representer_embeddings",
    "compute_representer_logits",
    "compute_representer_queries",
    "compute_top_eigenpairs",
    "cross_entropy",
    "deflated_inverse",
    "deflated_rows",
    "deflation_power",
    "dense_curvature_rows",
    "eigenpair_residuals",
    "estimate_top_eigenvalue",
    "fit_kronecker_curvature",
    "fit_representer",
    "flatten_params",
    "ggn_correction_sums",
    "ggn_diagonal_sums",
    "kronecker_layout",
    "last_linear_index",
    "layer_seed",
    "lissa",
    "make_head_matvec",
    "make_hvp",
    "make_loss_fn",
    "make_projection",
    "matrix_layout",
    "merge_topk",
    "n_params",
    "normalize_rows",
    "pencil_eigenvalues",
    "pencil_eigh",
    "penultimate_features",
    "project",
    "reference_eigenvalue",
    "rescaling_directions",
    "resolve_batch_size",
    "resolve_damping",
    "resolve_representer_lambda",
    "select_topk",
    "softmax",
    "solve_exact",
    "solve_lissa",
    "solve_pcg",
    "topk_both_signs",
    "validate_head_params",
    "validate_head_spec",
]
