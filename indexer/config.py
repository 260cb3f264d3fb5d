"""How a run is built: `IndexConfig`, saved in the manifest (as ``methods``) and compared when a build resumes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    """How a run is built; saved in the manifest and compared when a build resumes.

    Args:
        curvature: "ggn" (Gauss-Newton, PSD; equals the Hessian for a linear head) or "hessian".
        project_above: gradients are randomly projected when the head has more parameters than this.
        projection_dim: dimension of the projected gradient space.
        projection_seed: seed of the Gaussian projection.
        layer_projection_dim: scope="model": when the scope has more than min(`project_above`, `exact_max_params`)
            parameters (its curvature is a dense [d, d] matrix), each side
            (inputs, output gradients) of each layer larger than this is projected to this many dimensions
            (LoGra, `indexer.logra`), so a layer's vector has at most this squared entries; except the layers
            nearest the output that together fit that same min(...) budget, kept whole
            (`indexer.logra.unprojected_layers`: the classifier of a CNN or an encoder is exact).
        exact_max_params: heads up to this many parameters get a dense eigendecomposition (method "exact").
        deflation_rank: top eigenpairs of the curvature computed once and deflated in LiSSA (0 = plain LiSSA).
        curvature_rows: the top-eigenpair subspace iterations run over a seeded subsample of this many
            training rows (all rows when there are fewer); one final Rayleigh-Ritz step uses every row. The
            eigenpairs only precondition LiSSA (its fixed point is exact whatever the subspace), so the
            subsample costs iterations, never accuracy; it makes 100k-parameter heads buildable on a CPU.
        representer_l2: the representer fit's lambda (not an l2 coefficient of the model, despite the name, which
            stored manifests keep): Yeh et al.'s Theta* = argmin (1/n) sum_i CE(Theta phi_i, y_i) + lambda
            ||Theta||^2. None = `influence.resolve_representer_lambda(task l2)`: l2 / 2 of the task (the model's
            own regularisation), or 1e-3 when the task's l2 is 0.
        logit_tolerance: max abs difference allowed between torch and JAX head logits (relative to max |logit|).
        chunk_rows: examples per resumable chunk.
        factory: FAISS index factory string: "Flat" (exact inner product, default), or approximate/compressed
            ones such as "IVF,Flat", "IVF,PQ32", "IVF,SQfp16" (IVF list count chosen from n when omitted),
            "HNSW32", "SQfp16"; their search breadth is tuned to recall@10 >= 0.95 against exact search and
            the measured recall recorded per space in the manifest.
        damping_subsets: subsets of the training set the head is refit on to calibrate the damping
            (`indexer.calibration`: the damping whose influence best ranks the refits' test margins, recorded
            with its evidence in the manifest); 0 = the eigenvalue rule only (`influence.compute_damping`).
            Heads with one linear layer are convex and never calibrated.
        damping_queries: stored test examples the calibration scores (a seeded sample when there are more).
        cache_queries: solve LiSSA once at build time for every stored test example (at its predicted class)
            and store the vectors, so that `explain(test_ids=..., method="lissa")` skips the solve; see
            `indexer.queries` (cheap when the head has a dense eigendecomposition, else n_test x depth
            curvature products over the training set).
    """

    curvature: str = "ggn"
    project_above: int = 16_384
    projection_dim: int = 1024
    projection_seed: int = 0
    layer_projection_dim: int = 16
    exact_max_params: int = 4096
    deflation_rank: int = 64
    curvature_rows: int = 4096
    representer_l2: float | None = None
    logit_tolerance: float = 1e-4
    chunk_rows: int = 2048
    factory: str = "Flat"
    cache_queries: bool = False
    damping_subsets: int = 16
    damping_queries: int = 256

    def __post_init__(self) -> None:
        if self.curvature not in ("ggn", "hessian"):
            raise ValueError(f"curvature must be 'ggn' or 'hessian', got {self.curvature!r}")
        for name in ("project_above", "projection_dim", "chunk_rows", "curvature_rows", "layer_projection_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.deflation_rank, int) or self.deflation_rank < 0:
            raise ValueError(f"deflation_rank must be an int >= 0, got {self.deflation_rank!r}")
        if not isinstance(self.exact_max_params, int) or self.exact_max_params < 0:
            raise ValueError(f"exact_max_params must be an int >= 0, got {self.exact_max_params!r}")
        if self.representer_l2 is not None and not (math.isfinite(self.representer_l2) and self.representer_l2 > 0):
            raise ValueError(f"representer_l2 must be > 0, got {self.representer_l2!r}")
        if not isinstance(self.factory, str) or not self.factory.strip():
            raise ValueError(f"factory must be a non-empty FAISS factory string, got {self.factory!r}")
        if not (math.isfinite(self.logit_tolerance) and self.logit_tolerance > 0):
            raise ValueError(f"logit_tolerance must be > 0, got {self.logit_tolerance!r}")
        if (
            isinstance(self.damping_subsets, bool)
            or not isinstance(self.damping_subsets, int)
            or (self.damping_subsets != 0 and self.damping_subsets < 3)
        ):
            raise ValueError(f"damping_subsets must be 0 or an int >= 3, got {self.damping_subsets!r}")
        if (
            isinstance(self.damping_queries, bool)
            or not isinstance(self.damping_queries, int)
            or self.damping_queries < 1
        ):
            raise ValueError(f"damping_queries must be a positive int, got {self.damping_queries!r}")
        if not isinstance(self.cache_queries, bool):
            raise ValueError(f"cache_queries must be a bool, got {self.cache_queries!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_stored(cls, methods: dict[str, Any]) -> IndexConfig:
        """The config a run was built with, from its manifest's ``methods`` (fields added since hold defaults)."""
        return cls(**{**cls().to_dict(), **methods})
