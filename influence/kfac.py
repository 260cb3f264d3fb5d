"""K-FAC and EK-FAC approximations of the head's Gauss-Newton curvature, and preconditioned CG on the exact one.

The curvature is the GGN of the mean cross-entropy (``influence.hvp.make_head_matvec``, curvature="ggn"),

    C = (1/n) sum_i J_i^T (diag p_i - p_i p_i^T) J_i = (1/n) sum_i sum_c p_ic g_ic g_ic^T,
    g_ic = J_i^T (p_i - e_c)  (the gradient of CE at class c),

because diag p - p p^T = sum_c p_c (p - e_c)(p - e_c)^T: the expectation over the model's own predictive
distribution, taken exactly over the classes (no sampled labels).

Linear layer l, s = W a + b (a the layer input with a 1 appended when the layer has a bias, M = [W | b] of shape
[out, k]), d_ic = dCE(class c)/ds the output gradient; the per-example, per-class gradient of M is
D_ic = d_ic a_i^T. With the rows of M flattened in order (theta's order, row-major),

    K-FAC:   C_l ~ G_l (x) A_l,   A_l = (1/n) sum_i a_i a_i^T,   G_l = (1/n) sum_i sum_c p_ic d_ic d_ic^T
             (a column-major vec of M gives the usual A_l (x) G_l); with A_l = Q_A diag(lambda_A) Q_A^T,
             G_l = Q_G diag(lambda_G) Q_G^T the block is (Q_G (x) Q_A) diag(Lambda) (Q_G (x) Q_A)^T with
             Lambda[j, k] = lambda_G[j] lambda_A[k].
    EK-FAC:  the same eigenbasis, Lambda replaced by the diagonal of the exact block C_l in it,
             Lambda[j, k] = (1/n) sum_i sum_c p_ic ((Q_G^T D_ic Q_A)[j, k])^2,
             the Frobenius-optimal diagonal in that basis (George et al. 2018).

A linear layer applied to inputs with extra dimensions (positions t, e.g. [n, T, in]) shares its weights over them:
D_ic = sum_t d_ict a_it^T is still the exact per-example gradient (EK-FAC stays exact on the diagonal), and the
factors are K-FAC-expand's, A_l = (1/(n T)) sum_i sum_t a_it a_it^T, G_l = (1/n) sum_i sum_c p_ic sum_t
d_ict d_ict^T (Eschenhagen et al. 2023). Parameters outside linear layers (layernorm weight and bias) form one
diagonal block each, Lambda = (1/n) sum_i sum_c p_ic g_ic^2 (the diagonal of C) in the identity basis, so the
approximation covers every entry of theta.

Inverse (``KroneckerCurvature.solve``), block-diagonal over the layers, l2 and damping d added to every eigenvalue:

    x_l = Q (Lambda + l2 + d)^-1 Q^T g_l,   for a linear block  X = Q_G [(Q_G^T G Q_A) / (Lambda + l2 + d)] Q_A^T

on the [out, k] matrix G of the block's gradient entries. Preconditioned CG (``solve_pcg``) solves the exact
system (C + l2 I + d I) x = b with that inverse as the preconditioner M^-1:

    r_0 = b, z_0 = M^-1 r_0, p_0 = z_0;  alpha = r^T z / p^T A p,  x += alpha p,  r -= alpha A p,
    z = M^-1 r,  beta = r_new^T z_new / r^T z,  p = z + beta p          (A = C + l2 I + d I)

which converges in ~ sqrt(cond(M^-1 A)) ln(1/tol) products instead of cond(A).

References: Martens & Grosse 2015, "Optimizing Neural Networks with Kronecker-factored Approximate Curvature"
(arXiv:1503.05671); George et al. 2018, "Fast Approximate Natural Gradient Descent in a Kronecker-factored
Eigenbasis" (arXiv:1806.03884); Grosse et al. 2023, "Studying Large Language Model Generalization with Influence
Functions" (arXiv:2308.03296); Eschenhagen et al. 2023, "Kronecker-Factored Approximate Curvature for Modern Neural
Network Architectures" (arXiv:2311.00636); preconditioned CG: Saad 2003, "Iterative Methods for Sparse Linear
Systems", 2nd ed., ch. 9.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from jax.typing import ArrayLike

from influence.checks import check_nonnegative, check_rows, is_int, is_real
from influence.head import HeadParams, HeadSpec, apply_head, validate_head_params, validate_head_spec
from influence.hvp import MatVec, as_matvec_pytree
from influence.objective import spec_key
from influence.solvers import SolveResult, _residuals

__all__ = [
    "KRONECKER_KINDS",
    "DiagonalBlock",
    "KroneckerCurvature",
    "KroneckerFactors",
    "KroneckerSums",
    "LinearBlock",
    "compute_correction_sums",
    "compute_factor_sums",
    "compute_kronecker_factors",
    "fit_kronecker_curvature",
    "ggn_correction_sums",
    "ggn_diagonal_sums",
    "kronecker_layout",
    "matrix_layout",
    "solve_pcg",
]

KRONECKER_KINDS = ("kfac", "ekfac")
SUM_KINDS = ("factors", "correction")


# ----------------------------------------------------------------------------------------------- layout of theta


@dataclass(frozen=True)
class LinearBlock:
    """The parameters of one linear layer in theta: bias [out] (if any) then weight [out, in], from ``offset``.

    Attributes:
        layer: index of the layer in the head spec.
        offset: first entry of the layer in theta.
        in_features: input width.
        out_features: output width.
        bias: whether the layer has a bias (then k = in_features + 1, the bias is the last column of [W | b]).
    """

    layer: int
    offset: int
    in_features: int
    out_features: int
    bias: bool

    @property
    def k(self) -> int:
        """Width of the input factor A (in_features, plus 1 with a bias)."""
        return self.in_features + int(self.bias)

    @property
    def size(self) -> int:
        """Number of entries of theta in this block (out_features * k)."""
        return self.out_features * self.k


@dataclass(frozen=True)
class DiagonalBlock:
    """The parameters of one non-linear layer (layernorm: bias then weight) in theta, treated diagonally.

    Attributes:
        layer: index of the layer in the head spec.
        offset: first entry of the layer in theta.
        size: number of entries.
    """

    layer: int
    offset: int
    size: int


Block = LinearBlock | DiagonalBlock


def kronecker_layout(spec: HeadSpec) -> tuple[Block, ...]:
    """Returns the blocks of theta (``flatten_params`` order), one per layer that has parameters.

    ``flatten_params`` ravels the list of per-layer dicts in layer order and each dict in sorted key order, so a
    linear layer is [bias (out), weight (out x in, row-major)] and a layernorm [bias, weight]; the blocks are
    contiguous and cover theta.

    Args:
        spec: a valid head spec.
    """
    validate_head_spec(spec)
    blocks: list[Block] = []
    offset = 0
    for index, layer in enumerate(spec):
        if layer["kind"] == "linear":
            block = LinearBlock(
                layer=index,
                offset=offset,
                in_features=int(layer["in_features"]),
                out_features=int(layer["out_features"]),
                bias=bool(layer["bias"]),
            )
            blocks.append(block)
            offset += block.size
        elif layer["kind"] == "layernorm" and layer["elementwise_affine"]:
            size = 2 * math.prod(int(s) for s in layer["normalized_shape"])
            blocks.append(DiagonalBlock(layer=index, offset=offset, size=size))
            offset += size
    return tuple(blocks)


def _layout_size(blocks: Sequence[Block]) -> int:
    return sum(block.size for block in blocks)


def _block_to_dict(block: Block) -> dict[str, Any]:
    if isinstance(block, LinearBlock):
        return {
            "type": "linear",
            "layer": block.layer,
            "offset": block.offset,
            "in_features": block.in_features,
            "out_features": block.out_features,
            "bias": block.bias,
        }
    return {"type": "diagonal", "layer": block.layer, "offset": block.offset, "size": block.size}


def _block_from_dict(d: Mapping[str, Any]) -> Block:
    if d.get("type") == "linear":
        return LinearBlock(
            layer=int(d["layer"]),
            offset=int(d["offset"]),
            in_features=int(d["in_features"]),
            out_features=int(d["out_features"]),
            bias=bool(d["bias"]),
        )
    if d.get("type") == "diagonal":
        return DiagonalBlock(layer=int(d["layer"]), offset=int(d["offset"]), size=int(d["size"]))
    raise ValueError(f"description block type must be 'linear' or 'diagonal', got {d.get('type')!r}")


def _check_layout(blocks: Sequence[Block]) -> None:
    offset = 0
    for block in blocks:
        if block.offset != offset:
            raise ValueError(
                f"blocks must be contiguous in theta: block of layer {block.layer} starts at "
                f"{block.offset}, expected {offset}"
            )
        offset += block.size


def matrix_layout(shapes: Sequence[tuple[int, int] | int]) -> tuple[Block, ...]:
    """Blocks of a vector made of consecutive row-major matrices and plain vectors (scope="model"'s phi).

    A pair (out, k) is a ``LinearBlock`` without bias of an [out, k] matrix (a layer's bias, if any, is already
    one more input column: its ones are part of the input side a), an int is a ``DiagonalBlock`` of that size.
    ``layer`` is the position in ``shapes``.

    Args:
        shapes: per block, (out, k) or size, all >= 1.
    """
    blocks: list[Block] = []
    offset = 0
    for index, shape in enumerate(shapes):
        if is_int(shape):
            if shape < 1:
                raise ValueError(f"shapes[{index}] must be a size >= 1, got {shape!r}")
            blocks.append(DiagonalBlock(layer=index, offset=offset, size=int(shape)))
        else:
            out, k = shape  # type: ignore[misc]
            if not (is_int(out) and is_int(k) and out >= 1 and k >= 1):
                raise ValueError(f"shapes[{index}] must be (out, k) with ints >= 1, got {shape!r}")
            blocks.append(
                LinearBlock(layer=index, offset=offset, in_features=int(k), out_features=int(out), bias=False)
            )
        offset += blocks[-1].size
    if not blocks:
        raise ValueError("shapes must hold at least one block")
    return tuple(blocks)


def _ggn_block(ggn: np.ndarray, b: Block) -> np.ndarray:
    return ggn[b.offset : b.offset + b.size, b.offset : b.offset + b.size]


def _check_ggn(blocks: Sequence[Block], ggn: Any, n: Any) -> np.ndarray:
    G = np.asarray(ggn, np.float64)
    p = _layout_size(blocks)
    if G.shape != (p, p):
        raise ValueError(f"ggn must have shape ({p}, {p}) (the layout's size), got shape {G.shape}")
    if not is_int(n) or n < 1:
        raise ValueError(f"n must be the number of rows the ggn averages, an int >= 1, got {n!r}")
    return G


def ggn_diagonal_sums(blocks: Sequence[Block], ggn: Any, n: int) -> dict[str, np.ndarray]:
    """The diagonal blocks' factor sums from the exact GGN: "layer{l}.diagonal" = n diag(C_ll)
    = sum_i sum_c p_ic g_ic^2 over the block's entries (C = (1/n) sum_i sum_c p_ic g_ic g_ic^T, without l2).

    Args:
        blocks: the layout (``matrix_layout``).
        ggn: C [p, p], the mean over the n rows.
        n: rows C averages.
    """
    G = _check_ggn(blocks, ggn, n)
    return {
        f"layer{b.layer}.diagonal": n * np.maximum(np.diag(_ggn_block(G, b)), 0.0)
        for b in blocks
        if isinstance(b, DiagonalBlock)
    }


def ggn_correction_sums(curvature: KroneckerCurvature, ggn: Any, n: int) -> KroneckerSums:
    """EK-FAC correction sums (kind "correction") from the exact GGN's diagonal blocks C_ll:

        Lambda_sum[j, k] = n ((Q_G (x) Q_A)^T C_ll (Q_G (x) Q_A))[jk, jk] = sum_i sum_c p_ic ((Q_G^T D_ic Q_A)[j, k])^2

    (D_ic the block of g_ic as [out, k], row-major): the same sums as ``compute_correction_sums`` where the GGN of
    the per-class gradients is at hand (scope="model" computes it for its own solves), with no second pass over
    the examples. Only the diagonal blocks of C are read. George et al. 2018 (arXiv:1806.03884).

    Args:
        curvature: the K-FAC curvature whose eigenbases are used (fitted on the same rows).
        ggn: C [p, p], the mean over the n rows, without l2.
        n: rows C averages.
    """
    if not isinstance(curvature, KroneckerCurvature):
        raise ValueError(f"curvature must be a KroneckerCurvature, got {type(curvature).__name__}")
    G = _check_ggn(curvature.blocks, ggn, n)
    arrays: dict[str, np.ndarray] = {}
    for b, qa, qg in zip(curvature.blocks, curvature.q_a, curvature.q_g, strict=True):
        if not isinstance(b, LinearBlock):
            continue
        o, k = b.out_features, b.k
        C = _ggn_block(G, b).reshape(o, k, o, k)
        qa64, qg64 = np.asarray(qa, np.float64), np.asarray(qg, np.float64)
        T = np.einsum("abcd,cj,dl->abjl", C, qg64, qa64, optimize=True)  # C (Q_G (x) Q_A), columns (j, l)
        lam = n * np.einsum("aj,bl,abjl->jl", qg64, qa64, T, optimize=True)
        arrays[f"layer{b.layer}.eigenvalues"] = np.maximum(lam, 0.0)  # >= 0 in exact arithmetic (C_ll is PSD)
    return KroneckerSums(kind="correction", arrays=arrays, n=int(n))


# ----------------------------------------------------------------------------------------------- the head's terms


def _forward(
    spec: HeadSpec,
    params: HeadParams,
    x: jax.Array,
    eps: Mapping[int, jax.Array] | None,
    free: Mapping[int, Any],
) -> tuple[jax.Array, dict[int, jax.Array]]:
    """Logits of x [1, ...] with eps added to every linear output and the diagonal layers' params taken from free;
    also returns each linear layer's input."""
    acts: dict[int, jax.Array] = {}
    for index, layer in enumerate(spec):
        if layer["kind"] == "linear":
            acts[index] = x
            x = apply_head([layer], [params[index]], x)
            if eps is not None:
                x = x + eps[index]
        else:
            x = apply_head([layer], [free.get(index, params[index])], x)
    return x, acts


def _example_terms(
    spec: HeadSpec, blocks: tuple[Block, ...], params: HeadParams, h_i: jax.Array
) -> tuple[jax.Array, dict[int, jax.Array], dict[int, jax.Array], dict[int, jax.Array]]:
    """For one example: p [C], linear inputs {l: [T, in]}, output gradients {l: [C, T, out]} at every class,
    and the diagonal blocks' gradients {l: [C, size]} at every class (g_ic = J_i^T (p_i - e_c))."""
    x = h_i[None]
    linear = [b for b in blocks if isinstance(b, LinearBlock)]
    free = {b.layer: params[b.layer] for b in blocks if isinstance(b, DiagonalBlock)}
    shapes = jax.eval_shape(lambda z: _forward(spec, params, z, None, free)[1], jax.ShapeDtypeStruct(x.shape, x.dtype))
    eps = {
        b.layer: jnp.zeros(
            (*shapes[b.layer].shape[:-1], b.out_features),
            jnp.result_type(shapes[b.layer].dtype, jnp.asarray(params[b.layer]["weight"]).dtype),
        )
        for b in linear
    }

    def logits_fn(e: dict[int, jax.Array], f: dict[int, Any]) -> tuple[jax.Array, dict[int, jax.Array]]:
        logits, acts = _forward(spec, params, x, e, f)
        return logits[0], acts

    logits, vjp_fn, acts = jax.vjp(logits_fn, eps, free, has_aux=True)
    probs = jax.nn.softmax(logits)
    cotangents = probs[None, :] - jnp.eye(probs.shape[0], dtype=probs.dtype)  # row c: p - e_c
    d_eps, d_free = jax.vmap(vjp_fn)(cotangents)
    n_classes = probs.shape[0]
    inputs = {b.layer: acts[b.layer].reshape(-1, b.in_features) for b in linear}
    outputs = {b.layer: d_eps[b.layer].reshape(n_classes, -1, b.out_features) for b in linear}
    diagonal = {
        layer: jnp.concatenate([grads[key].reshape(n_classes, -1) for key in sorted(grads)], axis=-1)
        for layer, grads in d_free.items()
    }
    return probs, inputs, outputs, diagonal


def _batch_terms(
    spec: HeadSpec, blocks: tuple[Block, ...], params: HeadParams, h: jax.Array
) -> tuple[jax.Array, dict[int, jax.Array], dict[int, jax.Array], dict[int, jax.Array]]:
    """``_example_terms`` over the rows of h; linear inputs get the appended 1 of the bias: a [m, T, k]."""
    probs, inputs, outputs, diagonal = jax.vmap(lambda row: _example_terms(spec, blocks, params, row))(h)
    for b in blocks:
        if isinstance(b, LinearBlock) and b.bias:
            a = inputs[b.layer]
            inputs[b.layer] = jnp.concatenate([a, jnp.ones((*a.shape[:-1], 1), a.dtype)], axis=-1)
    return probs, inputs, outputs, diagonal


@functools.lru_cache(maxsize=32)
def _factor_fn(key: str) -> Callable[..., dict[str, jax.Array]]:
    spec = json.loads(key)
    blocks = kronecker_layout(spec)

    @jax.jit
    def fn(params: HeadParams, h: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
        probs, inputs, outputs, diagonal = _batch_terms(spec, blocks, params, h)
        pw = probs * weights[:, None]  # [m, C]
        out: dict[str, jax.Array] = {}
        for b in blocks:
            if isinstance(b, LinearBlock):
                a, d = inputs[b.layer], outputs[b.layer]
                out[f"layer{b.layer}.a"] = jnp.einsum("mtk,mtj,m->kj", a, a, weights.astype(a.dtype))
                out[f"layer{b.layer}.positions"] = jnp.sum(weights) * a.shape[1]  # n T, A's normaliser
                out[f"layer{b.layer}.g"] = jnp.einsum("mcto,mctq,mc->oq", d, d, pw.astype(d.dtype))
            else:
                g = diagonal[b.layer]
                out[f"layer{b.layer}.diagonal"] = jnp.einsum("mcq,mc->q", g * g, pw.astype(g.dtype))
        return out

    return fn


@functools.lru_cache(maxsize=32)
def _correction_fn(key: str) -> Callable[..., dict[str, jax.Array]]:
    spec = json.loads(key)
    blocks = kronecker_layout(spec)

    @jax.jit
    def fn(
        params: HeadParams,
        h: jax.Array,
        weights: jax.Array,
        q_a: dict[int, jax.Array],
        q_g: dict[int, jax.Array],
    ) -> dict[str, jax.Array]:
        probs, inputs, outputs, _ = _batch_terms(spec, blocks, params, h)
        pw = probs * weights[:, None]
        out: dict[str, jax.Array] = {}
        for b in blocks:
            if not isinstance(b, LinearBlock):
                continue
            a = inputs[b.layer] @ q_a[b.layer].astype(inputs[b.layer].dtype)  # [m, T, k]
            d = outputs[b.layer] @ q_g[b.layer].astype(outputs[b.layer].dtype)  # [m, C, T, out]
            w = pw.astype(d.dtype)
            if a.shape[1] == 1:
                # (Q_G^T D_ic Q_A)[j, k] = (Q_G^T d_ic)[j] (Q_A^T a_i)[k]: the square factorises.
                u = jnp.einsum("mco,mc->mo", d[:, :, 0] ** 2, w)
                lam = u.T @ (a[:, 0] ** 2)
            else:

                def per_class(acc: jax.Array, dc_wc: tuple[jax.Array, jax.Array], a: jax.Array = a) -> Any:
                    d_c, w_c = dc_wc  # [m, T, out], [m]
                    s = jnp.einsum("mto,mtk->mok", d_c, a)
                    return acc + jnp.einsum("mok,m->ok", s * s, w_c), None

                lam, _ = jax.lax.scan(
                    per_class,
                    jnp.zeros((b.out_features, b.k), d.dtype),
                    (jnp.moveaxis(d, 1, 0), w.T),
                )
            out[f"layer{b.layer}.eigenvalues"] = lam
        return out

    return fn


def _check_features(spec: HeadSpec, params: HeadParams, h: Any, weights: Any | None) -> tuple[Any, np.ndarray]:
    validate_head_params(spec, params)
    h_arr = np.asarray(h)
    if h_arr.ndim < 2 or h_arr.shape[0] == 0:
        raise ValueError(f"h must have shape [m, ...] with m >= 1 and at least 2 dims, got shape {h_arr.shape}")
    if not np.issubdtype(h_arr.dtype, np.floating):
        raise ValueError(f"h must be a floating array, got dtype {h_arr.dtype}")
    try:
        jax.eval_shape(lambda x: apply_head(spec, params, x), jax.ShapeDtypeStruct(h_arr.shape, h_arr.dtype))
    except (TypeError, ValueError) as e:
        raise ValueError(f"h has shape {h_arr.shape}, which the head cannot take: {e}") from e
    if weights is None:
        w = np.ones(h_arr.shape[0], dtype=h_arr.dtype)
    else:
        w = np.asarray(weights, dtype=h_arr.dtype)
        if w.shape != (h_arr.shape[0],):
            raise ValueError(f"weights must have shape ({h_arr.shape[0]},), got shape {w.shape}")
    return h_arr, w


def _as_jax_params(params: HeadParams) -> list[dict[str, jax.Array]]:
    return [{k: jnp.asarray(v) for k, v in p.items()} for p in params]


# ----------------------------------------------------------------------------------------------- partial sums


@dataclass(frozen=True, eq=False)
class KroneckerSums:
    """Partial sums over a set of training rows, added chunk by chunk (resumable: persist with ``to_arrays``).

    kind "factors": "layer{l}.a" = sum_i sum_t a a^T [k, k], "layer{l}.g" = sum_i sum_c p_ic sum_t d d^T [out, out]
    per linear layer l, "layer{l}.diagonal" = sum_i sum_c p_ic g_ic^2 [size] per diagonal block.
    kind "correction": "layer{l}.eigenvalues" = sum_i sum_c p_ic (Q_G^T D_ic Q_A)^2 [out, k] per linear layer.

    Attributes:
        kind: "factors" or "correction".
        arrays: the sums, float64.
        n: number of rows summed.
    """

    kind: str
    arrays: Mapping[str, np.ndarray]
    n: int

    def __post_init__(self) -> None:
        if self.kind not in SUM_KINDS:
            raise ValueError(f"kind must be one of {SUM_KINDS}, got {self.kind!r}")
        if not is_int(self.n) or self.n < 0:
            raise ValueError(f"n must be an int >= 0, got {self.n!r}")

    def __add__(self, other: KroneckerSums) -> KroneckerSums:
        """Sums of the union of two disjoint sets of rows."""
        if not isinstance(other, KroneckerSums):
            return NotImplemented
        if other.kind != self.kind:
            raise ValueError(f"other: cannot add {other.kind!r} sums to {self.kind!r} sums")
        shapes = {k: v.shape for k, v in self.arrays.items()}
        other_shapes = {k: v.shape for k, v in other.arrays.items()}
        if shapes != other_shapes:
            raise ValueError(f"other: sums of another head (arrays {other_shapes}, expected {shapes})")
        arrays = {k: self.arrays[k] + other.arrays[k] for k in self.arrays}
        return KroneckerSums(kind=self.kind, arrays=arrays, n=self.n + other.n)

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Returns ({"sums": every array raveled and concatenated, float64}, a JSON-able description)."""
        names = sorted(self.arrays)
        flat = np.concatenate([np.ravel(self.arrays[k]) for k in names]) if names else np.zeros(0)
        description = {
            "kind": self.kind,
            "n": int(self.n),
            "arrays": [{"name": k, "shape": list(self.arrays[k].shape)} for k in names],
        }
        return {"sums": flat.astype(np.float64)}, description

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], description: Mapping[str, Any]) -> KroneckerSums:
        """Rebuilds the sums from ``to_arrays()``."""
        flat = np.asarray(arrays["sums"], dtype=np.float64)
        out: dict[str, np.ndarray] = {}
        start = 0
        for entry in description["arrays"]:
            shape = tuple(int(s) for s in entry["shape"])
            size = math.prod(shape)
            out[str(entry["name"])] = flat[start : start + size].reshape(shape).copy()
            start += size
        if start != flat.shape[0]:
            raise ValueError(f"arrays['sums'] has {flat.shape[0]} entries, the description declares {start}")
        return cls(kind=str(description["kind"]), arrays=out, n=int(description["n"]))


def compute_factor_sums(
    spec: HeadSpec, params: HeadParams, h: ArrayLike, *, weights: Any | None = None
) -> KroneckerSums:
    """Returns the K-FAC partial sums of one chunk of training rows (kind "factors", see ``KroneckerSums``).

    a and d come from one jitted forward with zero perturbations added to every linear output (the gradient
    with respect to the perturbation is d), its VJP vmapped over the cotangents p_i - e_c of all classes.
    Chunks add with ``+``; ``compute_kronecker_factors`` divides by n. Compiled once per (spec, chunk shape).

    Reference: Martens & Grosse 2015 (arXiv:1503.05671); Grosse et al. 2023 (arXiv:2308.03296).

    Args:
        spec: head spec.
        params: head params (one dict per layer).
        h: cut features of the chunk [m, ...].
        weights: per-row weights [m] (0 masks a padded row; the count n adds their sum), or None for ones.
    """
    h_arr, w = _check_features(spec, params, h, weights)
    out = _factor_fn(spec_key(spec))(_as_jax_params(params), jnp.asarray(h_arr), jnp.asarray(w))
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
    return KroneckerSums(kind="factors", arrays=arrays, n=round(float(np.sum(w))))


def compute_correction_sums(
    spec: HeadSpec,
    params: HeadParams,
    h: ArrayLike,
    curvature: KroneckerCurvature,
    *,
    weights: Any | None = None,
) -> KroneckerSums:
    """Returns the EK-FAC eigenvalue-correction partial sums of one chunk (kind "correction").

    Lambda_sum[j, k] = sum_i sum_c p_ic ((Q_G^T D_ic Q_A)[j, k])^2 in the eigenbasis of ``curvature`` (a K-FAC
    fit on the same head). Finish with ``curvature.with_correction(total_sums)``.

    Reference: George et al. 2018 (arXiv:1806.03884); Grosse et al. 2023 (arXiv:2308.03296).

    Args:
        spec: head spec.
        params: head params.
        h: cut features of the chunk [m, ...].
        curvature: the K-FAC (or EK-FAC) curvature whose eigenbases are used.
        weights: per-row weights [m], or None for ones.
    """
    if not isinstance(curvature, KroneckerCurvature):
        raise ValueError(f"curvature must be a KroneckerCurvature, got {type(curvature).__name__}")
    h_arr, w = _check_features(spec, params, h, weights)
    if kronecker_layout(spec) != curvature.blocks:
        raise ValueError("curvature: fitted on another head (its blocks differ from this spec's)")
    q_a = {b.layer: jnp.asarray(q) for b, q in zip(curvature.blocks, curvature.q_a, strict=True) if q is not None}
    q_g = {b.layer: jnp.asarray(q) for b, q in zip(curvature.blocks, curvature.q_g, strict=True) if q is not None}
    out = _correction_fn(spec_key(spec))(_as_jax_params(params), jnp.asarray(h_arr), jnp.asarray(w), q_a, q_g)
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
    return KroneckerSums(kind="correction", arrays=arrays, n=round(float(np.sum(w))))


# ----------------------------------------------------------------------------------------------- factors


@dataclass(frozen=True, eq=False)
class KroneckerFactors:
    """The K-FAC factors of a head: per block, A [k, k] and G [out, out] (linear) or the diagonal [size].

    Attributes:
        blocks: the layout of theta (``kronecker_layout``).
        a: per block, A_l = (1/(n T)) sum a a^T, or None for a diagonal block.
        g: per block, G_l = (1/n) sum_i sum_c p_ic sum_t d d^T, or None for a diagonal block.
        diagonal: per block, (1/n) sum_i sum_c p_ic g_ic^2 [size] for a diagonal block, else None.
        n: number of training rows.
    """

    blocks: tuple[Block, ...]
    a: tuple[np.ndarray | None, ...]
    g: tuple[np.ndarray | None, ...]
    diagonal: tuple[np.ndarray | None, ...]
    n: int


def compute_kronecker_factors(spec: HeadSpec | Sequence[Block], sums: KroneckerSums) -> KroneckerFactors:
    """Finishes the factor sums: A_l = A_sum / (n T), G_l = G_sum / n, diagonal = diagonal_sum / n.

    Args:
        spec: head spec the sums were computed for, or the blocks themselves (``matrix_layout``).
        sums: the total "factors" sums over the training set.
    """
    if not isinstance(sums, KroneckerSums) or sums.kind != "factors":
        got = getattr(sums, "kind", type(sums).__name__)
        raise ValueError(f"sums must be KroneckerSums of kind 'factors', got {got!r}")
    if sums.n <= 0:
        raise ValueError(f"sums: no rows were summed (n={sums.n})")
    if spec and all(isinstance(b, LinearBlock | DiagonalBlock) for b in spec):
        blocks = tuple(spec)  # type: ignore[arg-type]
        _check_layout(blocks)
    else:
        blocks = kronecker_layout(spec)  # type: ignore[arg-type]
    a_list: list[np.ndarray | None] = []
    g_list: list[np.ndarray | None] = []
    diag_list: list[np.ndarray | None] = []
    for b in blocks:
        if isinstance(b, LinearBlock):
            name = f"layer{b.layer}"
            positions = float(_get_sum(sums, f"{name}.positions", ()))
            a_list.append(_get_sum(sums, f"{name}.a", (b.k, b.k)) / positions)
            g_list.append(_get_sum(sums, f"{name}.g", (b.out_features, b.out_features)) / sums.n)
            diag_list.append(None)
        else:
            a_list.append(None)
            g_list.append(None)
            diag_list.append(_get_sum(sums, f"layer{b.layer}.diagonal", (b.size,)) / sums.n)
    return KroneckerFactors(blocks=blocks, a=tuple(a_list), g=tuple(g_list), diagonal=tuple(diag_list), n=sums.n)


def _get_sum(sums: KroneckerSums, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in sums.arrays:
        raise ValueError(f"sums: no array {name!r} (sums of another head?); has {sorted(sums.arrays)}")
    arr = np.asarray(sums.arrays[name], dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"sums: array {name!r} has shape {arr.shape}, expected {shape}")
    return arr


# ----------------------------------------------------------------------------------------------- the curvature


def _apply_power(
    blocks: tuple[Block, ...],
    q_a: tuple[jax.Array, ...],
    q_g: tuple[jax.Array, ...],
    eigenvalues: tuple[jax.Array, ...],
    shift: jax.Array,
    power: float,
    R: jax.Array,
) -> jax.Array:
    """Applies Q (Lambda + shift)^power Q^T block by block to the rows of R [m, p]; q_a / q_g hold one array per
    linear block (in order). power = -1 divides (the inverse, as before powers were added)."""
    m = R.shape[0]
    parts = []
    linear_index = 0

    def scale(x: jax.Array, lam: jax.Array) -> jax.Array:
        denom = lam.astype(R.dtype) + shift.astype(R.dtype)
        return x / denom if power == -1.0 else x * denom**power

    for b, lam in zip(blocks, eigenvalues, strict=True):
        seg = R[:, b.offset : b.offset + b.size]
        if isinstance(b, DiagonalBlock):
            parts.append(scale(seg, lam))
            continue
        qa = q_a[linear_index].astype(R.dtype)
        qg = q_g[linear_index].astype(R.dtype)
        linear_index += 1
        o, i = b.out_features, b.in_features
        if b.bias:
            M = jnp.concatenate([seg[:, o:].reshape(m, o, i), seg[:, :o, None]], axis=-1)
        else:
            M = seg.reshape(m, o, i)
        X = scale(qg.T @ M @ qa, lam)
        Y = qg @ X @ qa.T
        if b.bias:
            parts.extend([Y[:, :, i], Y[:, :, :i].reshape(m, o * i)])
        else:
            parts.append(Y.reshape(m, o * i))
    return jnp.concatenate(parts, axis=1)


@functools.lru_cache(maxsize=32)
def _power_fn(blocks: tuple[Block, ...], power: float) -> Callable[..., jax.Array]:
    @jax.jit
    def fn(
        q_a: tuple[jax.Array, ...],
        q_g: tuple[jax.Array, ...],
        eigenvalues: tuple[jax.Array, ...],
        shift: jax.Array,
        R: jax.Array,
    ) -> jax.Array:
        return _apply_power(blocks, q_a, q_g, eigenvalues, shift, power, R)

    return fn


@dataclass(frozen=True, eq=False)
class KroneckerCurvature:
    """A block-diagonal K-FAC / EK-FAC approximation of C (GGN), with its l2 and damping, and its inverse.

    Per block: a linear layer's eigenbasis Q_G (x) Q_A (q_g [out, out], q_a [k, k], columns the eigenvectors) and
    eigenvalues Lambda [out, k] (K-FAC: lambda_G lambda_A^T; EK-FAC: the corrected ones); a diagonal block's
    eigenvalues [size] in the identity basis (q_a = q_g = None).

    Attributes:
        kind: "kfac" or "ekfac".
        blocks: the layout of theta (``kronecker_layout``).
        q_a: per block, Q_A [k, k] or None.
        q_g: per block, Q_G [out, out] or None.
        eigenvalues: per block, Lambda [out, k] (linear) or [size] (diagonal), >= 0, of C without l2.
        l2: the L2 coefficient of the objective (added to every eigenvalue).
        damping: added to every eigenvalue on top of l2.
    """

    kind: str
    blocks: tuple[Block, ...]
    q_a: tuple[np.ndarray | None, ...]
    q_g: tuple[np.ndarray | None, ...]
    eigenvalues: tuple[np.ndarray, ...]
    l2: float
    damping: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KRONECKER_KINDS:
            raise ValueError(f"kind must be one of {KRONECKER_KINDS}, got {self.kind!r}")
        check_nonnegative("l2", self.l2)
        check_nonnegative("damping", self.damping)
        if not (len(self.blocks) == len(self.q_a) == len(self.q_g) == len(self.eigenvalues)) or not self.blocks:
            raise ValueError(
                f"blocks, q_a, q_g and eigenvalues must have one entry per block, got lengths {len(self.blocks)}, "
                f"{len(self.q_a)}, {len(self.q_g)}, {len(self.eigenvalues)}"
            )
        _check_layout(self.blocks)
        for b, qa, qg, lam in zip(self.blocks, self.q_a, self.q_g, self.eigenvalues, strict=True):
            linear = isinstance(b, LinearBlock)
            expected: dict[str, tuple[int, ...] | None] = {
                "q_a": (b.k, b.k) if isinstance(b, LinearBlock) else None,
                "q_g": (b.out_features, b.out_features) if isinstance(b, LinearBlock) else None,
                "eigenvalues": (b.out_features, b.k) if isinstance(b, LinearBlock) else (b.size,),
            }
            got = {
                "q_a": None if qa is None else np.shape(qa),
                "q_g": None if qg is None else np.shape(qg),
                "eigenvalues": np.shape(lam),
            }
            for name, shape in expected.items():
                if got[name] != shape:
                    kind = "linear" if linear else "diagonal"
                    raise ValueError(
                        f"{name} of the {kind} block of layer {b.layer} has shape {got[name]}, expected {shape}"
                    )
            if not np.all(np.isfinite(lam)) or np.any(np.asarray(lam) < 0):
                raise ValueError(f"eigenvalues of the block of layer {b.layer} must be finite and >= 0")

    @property
    def n_params(self) -> int:
        """p, the length of theta."""
        return _layout_size(self.blocks)

    @classmethod
    def from_factors(cls, factors: KroneckerFactors, *, l2: float, damping: float = 0.0) -> KroneckerCurvature:
        """K-FAC: eigendecomposes A and G (float64 ``eigh``, eigenvalues clipped at 0), Lambda = lambda_G lambda_A^T.

        Args:
            factors: from ``compute_kronecker_factors``.
            l2: L2 coefficient of the objective.
            damping: added on top of l2.
        """
        if not isinstance(factors, KroneckerFactors):
            raise ValueError(f"factors must be KroneckerFactors, got {type(factors).__name__}")
        q_a: list[np.ndarray | None] = []
        q_g: list[np.ndarray | None] = []
        eigenvalues: list[np.ndarray] = []
        for b, a, g, diag in zip(factors.blocks, factors.a, factors.g, factors.diagonal, strict=True):
            if isinstance(b, LinearBlock):
                if a is None or g is None:
                    raise ValueError(f"factors: the linear block of layer {b.layer} has no A or G")
                lam_a, vec_a = np.linalg.eigh(0.5 * (a + a.T))
                lam_g, vec_g = np.linalg.eigh(0.5 * (g + g.T))
                q_a.append(vec_a)
                q_g.append(vec_g)
                eigenvalues.append(np.outer(np.maximum(lam_g, 0.0), np.maximum(lam_a, 0.0)))
            else:
                if diag is None:
                    raise ValueError(f"factors: the diagonal block of layer {b.layer} has no diagonal")
                q_a.append(None)
                q_g.append(None)
                eigenvalues.append(np.maximum(np.asarray(diag, np.float64), 0.0))
        return cls(
            kind="kfac",
            blocks=factors.blocks,
            q_a=tuple(q_a),
            q_g=tuple(q_g),
            eigenvalues=tuple(eigenvalues),
            l2=float(l2),
            damping=float(damping),
        )

    def with_correction(self, sums: KroneckerSums) -> KroneckerCurvature:
        """EK-FAC: the eigenvalues of the linear blocks replaced by the correction sums / n (same eigenbases).

        Args:
            sums: the total "correction" sums over the training set, computed with this curvature's eigenbases.
        """
        if not isinstance(sums, KroneckerSums) or sums.kind != "correction":
            raise ValueError(
                f"sums must be KroneckerSums of kind 'correction', got {getattr(sums, 'kind', type(sums).__name__)!r}"
            )
        if sums.n <= 0:
            raise ValueError(f"sums: no rows were summed (n={sums.n})")
        eigenvalues = tuple(
            _get_sum(sums, f"layer{b.layer}.eigenvalues", (b.out_features, b.k)) / sums.n
            if isinstance(b, LinearBlock)
            else lam
            for b, lam in zip(self.blocks, self.eigenvalues, strict=True)
        )
        return replace(self, kind="ekfac", eigenvalues=eigenvalues)

    def _shift(self, damping: float | None) -> float:
        d = self.damping if damping is None else check_nonnegative("damping", damping)
        shift = self.l2 + d
        low = min(float(np.min(lam)) for lam in self.eigenvalues)
        if low + shift <= 0:
            raise ValueError(
                f"damping={d!r} with l2={self.l2!r} leaves a zero eigenvalue (min eigenvalue {low!r}): "
                "the approximation is singular; pass damping > 0"
            )
        return shift

    def preconditioner(self, *, damping: float | None = None) -> Partial:
        """Returns R [m, p] -> the inverse applied to every row, as a jitted ``Partial`` (arrays as leaves).

        Args:
            damping: replaces this curvature's damping (None keeps it).
        """
        return self.power_fn(-1.0, damping=damping)

    def power_fn(self, power: float, *, damping: float | None = None) -> Partial:
        """Returns R [m, p] -> K^power applied to every row, K = Q (Lambda + l2 + damping) Q^T this approximation
        (block-diagonal; per linear block X = Q_G [(Q_G^T G Q_A) * (Lambda + l2 + d)^power] Q_A^T on the [out, k]
        matrix G of the row's block), as a jitted ``Partial`` (arrays as leaves). power -1 is ``preconditioner``;
        -1/2 and +1/2 whiten gradients and un-whiten queries (z = K^-1/2 g, y = K^1/2 x: y . z = x . g for any
        such K, `indexer.training_set.whitened_stage`).

        Args:
            power: a real exponent (K is positive definite once l2 + damping > 0 or every eigenvalue is).
            damping: replaces this curvature's damping (None keeps it).
        """
        if not is_real(power) or not math.isfinite(power):
            raise ValueError(f"power must be a finite real number, got {power!r}")
        shift = self._shift(damping)
        q_a = tuple(jnp.asarray(q) for q in self.q_a if q is not None)
        q_g = tuple(jnp.asarray(q) for q in self.q_g if q is not None)
        eigenvalues = tuple(jnp.asarray(lam) for lam in self.eigenvalues)
        return Partial(_power_fn(self.blocks, float(power)), q_a, q_g, eigenvalues, jnp.asarray(shift, jnp.float64))

    def power(self, G: ArrayLike, power: float, *, damping: float | None = None) -> np.ndarray:
        """Returns K^power g for every row g of G [m, p], in G's dtype (``power_fn``; ``solve`` is power -1).

        Args:
            G: flat gradients [m, p] (``flatten_params`` order).
            power: a real exponent, e.g. -0.5 or 0.5.
            damping: replaces this curvature's damping (None keeps it).
        """
        return np.asarray(self.power_fn(power, damping=damping)(self._check_rows(G)))

    def solve(self, G: ArrayLike, *, damping: float | None = None) -> np.ndarray:
        """Returns Q (Lambda + l2 + damping)^-1 Q^T g for every row g of G [m, p], in G's dtype.

        Args:
            G: flat gradients [m, p] (``flatten_params`` order).
            damping: replaces this curvature's damping (None keeps it).
        """
        return np.asarray(self.preconditioner(damping=damping)(self._check_rows(G)))

    def _check_rows(self, G: ArrayLike) -> jax.Array:
        G_arr = jnp.asarray(G)
        p = self.n_params
        if G_arr.ndim != 2 or G_arr.shape[1] != p:
            raise ValueError(f"G must have shape [m, {p}], got shape {G_arr.shape}")
        if not jnp.issubdtype(G_arr.dtype, jnp.floating):
            raise ValueError(f"G must be a floating array, got dtype {G_arr.dtype}")
        return G_arr

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Returns the arrays to store and a JSON-able description (``from_arrays`` rebuilds the object).

        arrays: "eigenvalues" [p] float64, each block's Lambda raveled (a linear block's [out, k] row-major, the
        bias as the last column), blocks in theta order; "bases" float64, Q_A [k, k] then Q_G [out, out] of every
        linear block raveled row-major, in order.
        description: {"kind", "l2", "damping", "n_params", "blocks": [{"type": "linear", "layer", "offset",
        "in_features", "out_features", "bias"} | {"type": "diagonal", "layer", "offset", "size"}]}.
        """
        eigenvalues = np.concatenate([np.ravel(lam) for lam in self.eigenvalues]).astype(np.float64)
        bases = [np.ravel(q) for pair in zip(self.q_a, self.q_g, strict=True) for q in pair if q is not None]
        flat = np.concatenate(bases).astype(np.float64) if bases else np.zeros(0, np.float64)
        description = {
            "kind": self.kind,
            "l2": float(self.l2),
            "damping": float(self.damping),
            "n_params": self.n_params,
            "blocks": [_block_to_dict(b) for b in self.blocks],
        }
        return {"eigenvalues": eigenvalues, "bases": flat}, description

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], description: Mapping[str, Any]) -> KroneckerCurvature:
        """Rebuilds the curvature from ``to_arrays()`` (validated: sizes must match the description)."""
        for name in ("eigenvalues", "bases"):
            if name not in arrays:
                raise ValueError(f"arrays must hold {name!r}, got {sorted(arrays)}")
        blocks = tuple(_block_from_dict(d) for d in description["blocks"])
        eig_flat = np.asarray(arrays["eigenvalues"], dtype=np.float64)
        bases_flat = np.asarray(arrays["bases"], dtype=np.float64)
        p = _layout_size(blocks)
        if eig_flat.shape != (p,):
            raise ValueError(f"arrays['eigenvalues'] has shape {eig_flat.shape}, the description declares ({p},)")
        n_bases = sum(b.k**2 + b.out_features**2 for b in blocks if isinstance(b, LinearBlock))
        if bases_flat.shape != (n_bases,):
            raise ValueError(f"arrays['bases'] has shape {bases_flat.shape}, the description declares ({n_bases},)")
        q_a: list[np.ndarray | None] = []
        q_g: list[np.ndarray | None] = []
        eigenvalues: list[np.ndarray] = []
        start = 0
        for b in blocks:
            lam = eig_flat[b.offset : b.offset + b.size]
            if isinstance(b, LinearBlock):
                eigenvalues.append(lam.reshape(b.out_features, b.k).copy())
                q_a.append(bases_flat[start : start + b.k**2].reshape(b.k, b.k).copy())
                start += b.k**2
                q_g.append(bases_flat[start : start + b.out_features**2].reshape(b.out_features, b.out_features).copy())
                start += b.out_features**2
            else:
                eigenvalues.append(lam.copy())
                q_a.append(None)
                q_g.append(None)
        return cls(
            kind=str(description["kind"]),
            blocks=blocks,
            q_a=tuple(q_a),
            q_g=tuple(q_g),
            eigenvalues=tuple(eigenvalues),
            l2=float(description["l2"]),
            damping=float(description["damping"]),
        )


def fit_kronecker_curvature(
    spec: HeadSpec,
    params: HeadParams,
    h: ArrayLike,
    *,
    kind: Literal["kfac", "ekfac"] = "ekfac",
    l2: float,
    damping: float = 0.0,
    batch_size: int = 1024,
) -> KroneckerCurvature:
    """Fits K-FAC (one pass over h) or EK-FAC (a second pass for the eigenvalue correction) in memory.

    The chunks of batch_size rows are padded to one shape (padded rows weigh 0), so each pass compiles once;
    chunking does not change the result (the sums are exact).

    Args:
        spec: head spec.
        params: head params.
        h: training cut features [n, ...].
        kind: "kfac" or "ekfac".
        l2: L2 coefficient of the objective.
        damping: added on top of l2 in the inverse.
        batch_size: rows per chunk.
    """
    if kind not in KRONECKER_KINDS:
        raise ValueError(f"kind must be one of {KRONECKER_KINDS}, got {kind!r}")
    if not is_int(batch_size) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    check_nonnegative("l2", l2)
    check_nonnegative("damping", damping)
    h_arr, _ = _check_features(spec, params, h, None)

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        n = h_arr.shape[0]
        size = min(batch_size, n)
        for start in range(0, n, size):
            rows = h_arr[start : start + size]
            w = np.ones(rows.shape[0], h_arr.dtype)
            if rows.shape[0] < size:
                pad = size - rows.shape[0]
                rows = np.concatenate([rows, np.zeros((pad, *rows.shape[1:]), rows.dtype)])
                w = np.concatenate([w, np.zeros(pad, h_arr.dtype)])
            yield rows, w

    pieces = chunks()
    rows, w = next(pieces)
    total = compute_factor_sums(spec, params, rows, weights=w)
    for rows, w in pieces:
        total = total + compute_factor_sums(spec, params, rows, weights=w)
    curvature = KroneckerCurvature.from_factors(compute_kronecker_factors(spec, total), l2=l2, damping=damping)
    if kind == "kfac":
        return curvature
    pieces = chunks()
    rows, w = next(pieces)
    correction = compute_correction_sums(spec, params, rows, curvature, weights=w)
    for rows, w in pieces:
        correction = correction + compute_correction_sums(spec, params, rows, curvature, weights=w)
    return curvature.with_correction(correction)


# ----------------------------------------------------------------------------------------------- preconditioned CG


def _identity(R: jax.Array) -> jax.Array:
    return R


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


@jax.jit
def _pcg_run(
    mv: Partial, pre: Partial, B: jax.Array, damping: jax.Array, tol: jax.Array, max_iter: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batched PCG over the rows of B; returns (X, iterations run, iterations per row until converged)."""
    batched = jax.vmap(mv)

    def apply_a(P: jax.Array) -> jax.Array:
        return jnp.asarray(batched(P)).astype(B.dtype) + damping * P

    def precondition(R: jax.Array) -> jax.Array:
        return jnp.asarray(pre(R)).astype(B.dtype)

    b_norm = jnp.linalg.norm(B, axis=1)
    X = jnp.zeros_like(B)
    R = B
    Z = precondition(R)
    P = Z
    rz = jnp.sum(R * Z, axis=1)
    active = jnp.linalg.norm(R, axis=1) > tol * b_norm
    row_iters = jnp.zeros(B.shape[0], jnp.int32)

    def cond(state: tuple[Any, ...]) -> jax.Array:
        it, _, _, _, _, active, _ = state
        return jnp.logical_and(it < max_iter, jnp.any(active))

    def body(state: tuple[Any, ...]) -> tuple[Any, ...]:
        it, X, R, P, rz, active, row_iters = state
        AP = apply_a(P)
        alpha = jnp.where(active, _safe_div(rz, jnp.sum(P * AP, axis=1)), 0)
        X = X + alpha[:, None] * P
        R = R - alpha[:, None] * AP
        Z = precondition(R)
        rz_new = jnp.sum(R * Z, axis=1)
        beta = jnp.where(active, _safe_div(rz_new, rz), 0)
        P = jnp.where(active[:, None], Z + beta[:, None] * P, P)
        row_iters = row_iters + active.astype(jnp.int32)
        active = jnp.logical_and(active, jnp.linalg.norm(R, axis=1) > tol * b_norm)
        return it + 1, X, R, P, jnp.where(active, rz_new, rz), active, row_iters

    it, X, _, _, _, _, row_iters = jax.lax.while_loop(
        cond, body, (jnp.asarray(0, jnp.int32), X, R, P, rz, active, row_iters)
    )
    return X, it, row_iters


def solve_pcg(
    matvec: MatVec,
    B: ArrayLike,
    *,
    precondition: KroneckerCurvature | Callable[[jax.Array], jax.Array] | None,
    damping: float,
    tol: float = 1e-5,
    max_iter: int = 100,
) -> SolveResult:
    """Solves (C + l2 I + damping I) x = b for every row b of B by preconditioned conjugate gradients.

    See the module docstring for the recursion. All rows run at once in one jitted ``lax.while_loop`` around the
    vmapped matvec; a row stops updating once its recursive residual ||r|| <= tol ||b||, the loop when every row
    has or after max_iter products. The reported residual is the true one, ||(A + damping I) x - b|| / ||b||
    (0 where b = 0), as ``solve_lissa``'s.

    Reference: Saad 2003, "Iterative Methods for Sparse Linear Systems", alg. 9.1; preconditioner: George et al.
    2018 (arXiv:1806.03884), Grosse et al. 2023 (arXiv:2308.03296).

    Args:
        matvec: v -> (C + l2 I) v on vectors [p] (vmap-able, e.g. ``make_head_matvec``).
        B: right-hand sides [m, p].
        precondition: a ``KroneckerCurvature`` (its inverse at this damping is M^-1), a callable R [m, p] ->
            M^-1 R (symmetric positive definite), or None for plain CG (M = I).
        damping: added to the diagonal on top of the matvec.
        tol: target relative residual per row, in (0, 1).
        max_iter: most matvec products.

    Returns:
        a SolveResult with method "pcg" (preconditioned) or "cg", x [m, p] in B's dtype, the residual per row,
        depth = the iterations run (the slowest row's).
    """
    damping = check_nonnegative("damping", damping)
    if not is_real(tol) or not 0 < tol < 1:
        raise ValueError(f"tol must be a float in (0, 1), got {tol!r}")
    if not is_int(max_iter) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    B_arr = check_rows(B, "B")
    if isinstance(precondition, KroneckerCurvature):
        if precondition.n_params != B_arr.shape[1]:
            raise ValueError(f"precondition covers {precondition.n_params} parameters, B has shape {B_arr.shape}")
        pre = precondition.preconditioner(damping=damping)
    elif precondition is None:
        pre = Partial(_identity)
    elif callable(precondition):
        pre = as_matvec_pytree(precondition)
    else:
        raise ValueError(f"precondition must be a KroneckerCurvature, a callable or None, got {precondition!r}")
    mv = as_matvec_pytree(matvec)
    X, iterations, _ = _pcg_run(
        mv,
        pre,
        B_arr,
        jnp.asarray(damping, B_arr.dtype),
        jnp.asarray(tol, B_arr.dtype),
        jnp.asarray(max_iter, jnp.int32),
    )
    residual = _residuals(jax.vmap(mv), X, B_arr, damping)
    return SolveResult(
        x=np.asarray(X),
        residual=residual,
        method="cg" if precondition is None else "pcg",
        depth=int(iterations),
        scale=float("nan"),
        damping=damping,
    )
