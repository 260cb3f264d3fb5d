"""torch.func backend for scopes wider than the JAX head: the last transformer block plus the classifier head.

A *scope* is the set of trained parameters theta together with a pure function logits = f(theta, inputs) of
cached inputs (the frozen body runs once, in no_grad, and its output is cached):

- `HeadScope(layers)`: the classifier head alone, inputs = the pooled features h_i (the JAX head-scope
  parameters in the same flat order: `influence.flatten_params`, i.e. layers in order, each layer's
  parameters by sorted name, row-major). It exists so the torch backend can be checked against the JAX path.
- `LastBlockScope(model)`: the last transformer block (BERT/MiniLM, RoBERTa, DistilBERT) followed by the
  pooling and the classifier head of a `Task.from_hf`-style model; inputs = the hidden states entering the
  last block [n, tokens, hidden] and the attention mask [n, tokens]. The frozen body is everything up to
  that block (captured with a forward pre-hook on the block, which then stops the forward). Flat order: the
  block's parameters by sorted name, then the head's as in `HeadScope`.

Inside the scope the padding mask is a 4-D float additive mask (0 for tokens, dtype-min for padding) built
from the 2-D mask: transformers 5 builds masks from a 2-D mask with data-dependent control flow that
`torch.func.vmap` cannot trace, a 4-D float mask is used as is.

Per-example gradients (`compute_torch_per_example_grads`): g_i = d CE(f(theta, x_i), y_i) / d theta through
`vmap(grad(...))` over the examples of a micro-batch (padding tokens masked, so g_i does not depend on the
batch it sits in). They are projected as they are computed, never stored at full size:

- `SketchProjection` (`kind="sketch"`, the default): a seeded count-sketch fold of the p coordinates to
  q = 65,536 buckets (random signs, bucket j mod q: one pass, no gather or scatter), then `influence.projection`'s
  Gaussian P [q, d] (same seed and rows). E[<S x, S y>] = <x, y>; the fold adds a variance of order
  ||x||^2 ||y||^2 / q to the Gaussian's. It costs O(p + q d) per example instead of O(p d): the dense Gaussian
  of `influence.projection` at p ~ 1.8M (MiniLM's last block), d = 1024 is 7 GB and 3.6 GFLOP per example.
  For p <= q it *is* `influence.project` (no fold).
- `TorchGaussianProjection` (`kind="gaussian"`): exactly `influence.projection`'s P (same seed and row layout,
  materialised once from JAX), so the torch side projects identically to the JAX side; for small p only.

Curvature-vector products (`make_torch_matvec`): v -> (C + l2 I) v with C the GGN
(1/n) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i (`torch.func.jvp` then `torch.func.vjp` of the logits) or the
Hessian of the mean CE (`torch.func.jvp(grad(loss))`, Pearlmutter 1994), the same operator as
`influence.make_head_matvec`, returned as a JAX-callable (`jax.pure_callback`) so that `influence.solve_lissa`
and `influence.estimate_top_eigenvalue` use it unchanged.

References: Koh & Liang 2017 (arXiv:1703.04730); Pruthi et al. 2020 (TracIn, arXiv:2002.08484); Park et al.
2023 (TRAK, arXiv:2303.14186) for projected per-example gradients; Schraudolph 2002 (GGN products).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from .errors import TaskError, UnsupportedLayerError
from .hf import check_texts, pool_hidden, split_hf_model

PROJECTIONS = ("sketch", "gaussian")


# ------------------------------------------------------------------------------------------------ scopes
def head_param_names(layers: list[nn.Module]) -> list[tuple[int, str]]:
    """(layer index, parameter name) in the flat order of `influence.flatten_params`."""
    return [(i, name) for i, layer in enumerate(layers) for name in sorted(dict(layer.named_parameters(recurse=False)))]


class TorchScope:
    """Trained parameters (flat order fixed by `names`) and logits = f(params, *inputs) as a pure function."""

    names: list[str]
    params: dict[str, torch.Tensor]

    @property
    def n_params(self) -> int:
        return sum(self.params[k].numel() for k in self.names)

    def flatten(self, tree: dict[str, torch.Tensor], batch: int | None = None) -> torch.Tensor:
        """dict -> flat [p] (or [batch, p] for per-example trees), in the scope's order."""
        if batch is None:
            return torch.cat([tree[k].reshape(-1) for k in self.names])
        return torch.cat([tree[k].reshape(batch, -1) for k in self.names], dim=1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for k in self.names:
            t = self.params[k]
            out[k] = flat[start : start + t.numel()].reshape(t.shape)
            start += t.numel()
        return out

    def theta(self) -> np.ndarray:
        return self.flatten(self.params).detach().cpu().numpy()

    def logits(self, params: dict[str, torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _head_params(layers: list[nn.Module], dtype: torch.dtype) -> tuple[nn.Sequential, list[str], dict]:
    head = nn.Sequential(*layers).eval()
    names = [f"{i}.{name}" for i, name in head_param_names(layers)]
    params = {k: head.get_parameter(k).detach().to(dtype) for k in names}
    return head, names, params


class HeadScope(TorchScope):
    """The classifier head alone (inputs: pooled features [n, hidden]); flat order = `influence.flatten_params`."""

    def __init__(self, layers: Sequence[nn.Module], *, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self.head, self.names, self.params = _head_params(list(layers), dtype)

    def logits(self, params: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        return functional_call(self.head, params, (h.to(self.dtype),))


class _StopForward(Exception):
    """Raised by the pre-hook on the last block once its inputs are captured."""


def last_block(encoder: nn.Module) -> nn.Module:
    """The last transformer block of a BERT/RoBERTa (`encoder.layer`) or DistilBERT (`transformer.layer`)."""
    for path in ("encoder.layer", "transformer.layer"):
        try:
            layers = encoder.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers[-1]
    raise UnsupportedLayerError(
        f"encoder {type(encoder).__name__} is unsupported for scope='last-block': it needs a ModuleList of "
        "transformer blocks at encoder.layer (BERT, MiniLM, RoBERTa) or transformer.layer (DistilBERT)"
    )


def eager_copy(block: nn.Module) -> nn.Module:
    """A copy of the block (own config) with eager attention: `vmap` has no batching rule for SDPA on CPU and
    falls back to a loop over examples. The model itself is left as it is."""
    block = copy.deepcopy(block).eval()
    configs = {id(m.config): m.config for m in block.modules() if hasattr(m, "config")}
    for config in configs.values():
        if hasattr(config, "_attn_implementation"):
            config._attn_implementation = "eager"
    return block


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[b, tokens] 0/1 -> [b, 1, 1, tokens] float: 0 where attended, dtype-min at padding."""
    return (1.0 - mask.to(dtype))[:, None, None, :] * torch.finfo(dtype).min


@dataclass
class BlockBatch:
    """One length-sorted micro-batch of the frozen body's output: inputs of the last block."""

    positions: list[int]
    hidden: torch.Tensor  # [b, tokens, hidden]
    mask: torch.Tensor  # [b, tokens] 0/1


class LastBlockScope(TorchScope):
    """The last transformer block + pooling + classifier head of a Hugging Face sequence classifier.

    Args:
        model: a model `Task.from_hf` supports (BERT/MiniLM, RoBERTa, DistilBERT `*ForSequenceClassification`,
            or `indexer.hf.HFEncoderClassifier`).
        tokenizer: its tokenizer (for `block_inputs` on texts).
        batch_size: texts per micro-batch of the frozen body (sorted by length).
        max_length: tokens per text (truncation).
        dtype: dtype of the scope's parameters and computations (float64 for exactness tests).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        *,
        batch_size: int = 64,
        max_length: int = 128,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TaskError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for arg, value in (("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TaskError(f"{arg} must be a positive int, got {value!r}")
        encoder, self.pooling, head_layers = split_hf_model(model)
        model.eval()
        self.model, self.encoder, self.tokenizer, self.dtype = model, encoder, tokenizer, dtype
        self.batch_size, self.max_length = batch_size, max_length
        self.body_block = last_block(encoder)  # the model's own block: the body stops where it starts
        self.block = eager_copy(self.body_block)
        self.head, head_names, head_params = _head_params(head_layers, dtype)
        block_names = sorted(name for name, _ in self.block.named_parameters())
        self.names = [f"block.{k}" for k in block_names] + [f"head.{k}" for k in head_names]
        self.params = {f"block.{k}": self.block.get_parameter(k).detach().to(dtype) for k in block_names}
        self.params.update({f"head.{k}": v for k, v in head_params.items()})
        self._n_block = len(block_names)

    # ----------------------------------------------------------------------------------- frozen body
    def tokenize(self, texts: Sequence[str]) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
        from .hf import TextBody

        if self.tokenizer is None:
            raise TaskError("tokenizer is None: LastBlockScope(model, tokenizer) is needed for texts")
        body = TextBody(self.encoder, self.tokenizer, pooling=self.pooling, batch_size=self.batch_size)
        body.max_length = self.max_length
        return body.tokenize(texts)

    @torch.no_grad()
    def block_inputs(self, texts: Sequence[str]) -> list[BlockBatch]:
        """The frozen body on texts (no grad, length-sorted micro-batches): the hidden states entering the last
        block and the 2-D attention mask of each micro-batch, with the texts' positions."""
        texts = check_texts(texts, "texts")
        if not texts:
            raise TaskError("texts is empty")
        device = next(self.encoder.parameters()).device
        captured: dict[str, torch.Tensor] = {}

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            raise _StopForward

        handle = self.body_block.register_forward_pre_hook(hook, with_kwargs=True)
        out = []
        try:
            for pos, cpu_batch in self.tokenize(texts):
                batch = {k: v.to(device) for k, v in cpu_batch.items()}
                try:
                    self.encoder(**batch)
                except _StopForward:
                    pass
                else:
                    raise RuntimeError("the last block was not called by the encoder's forward")
                out.append(BlockBatch(pos, captured.pop("hidden").detach(), batch["attention_mask"].detach()))
        finally:
            handle.remove()
        return out

    # ----------------------------------------------------------------------------------- the scope
    def logits(self, params: dict[str, torch.Tensor], hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits [b, classes] of the last block + pooling + head on its inputs (hidden [b, t, h], mask [b, t])."""
        hidden = hidden.to(self.dtype)
        block_p = {k[6:]: params[k] for k in self.names[: self._n_block]}
        head_p = {k[5:]: params[k] for k in self.names[self._n_block :]}
        out = functional_call(self.block, block_p, (hidden,), {"attention_mask": additive_mask(mask, self.dtype)})
        if isinstance(out, tuple):  # transformers 4 returns a tuple
            out = out[0]
        return functional_call(self.head, head_p, (pool_hidden(out, mask, self.pooling),))


# ------------------------------------------------------------------------------------------- projections
@dataclass(frozen=True, kw_only=True)
class SketchProjection:
    """Seeded two-stage JL transform S: R^p -> R^d, a count-sketch fold to q buckets, then a Gaussian q -> d.

        S^T x = P^T (F^T x),   (F^T x)_b = sum_{j : j mod q = b} sigma_j x_j,   sigma_j = +-1,   P [q, d] ~ N(0, 1/d)

    P is `influence.projection`'s (same seed, same rows). E[F F^T] = I (independent random signs) and
    E[P P^T] = I, so E[<S^T x, S^T y>] = <x, y>; the fold adds a variance of order ||x||^2 ||y||^2 / q to the
    Gaussian's (<x, y>^2 + ||x||^2 ||y||^2) / d, small for q >> d. The fold is one pass over the gradients
    (sign flip, reshape, sum: no gather or scatter), the dense part costs q x d per example, not p x d. When
    p <= q there is no fold and S is exactly `influence.project`'s P.

    References: Charikar, Chen & Farach-Colton 2002 (count sketch); Woodruff 2014, "Sketching as a Tool for
    Numerical Linear Algebra", sec. 2 (composing sketches); Johnson & Lindenstrauss 1984.
    """

    p: int
    d: int
    seed: int
    buckets: int = 65_536
    _signs: torch.Tensor | None = field(init=False, repr=False)  # [p] +-1 (None when p <= buckets)
    _P: torch.Tensor = field(init=False, repr=False)  # [min(p, buckets), d]

    def __post_init__(self) -> None:
        import influence as inf

        for name in ("p", "d", "buckets"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        q = min(self.p, self.buckets)
        P = inf.make_projection(q, self.d, seed=int(self.seed)).matrix(dtype=np.float32)
        object.__setattr__(self, "_P", torch.from_numpy(np.ascontiguousarray(P)))
        signs = None
        if self.p > self.buckets:
            rng = np.random.default_rng([int(self.seed), 1])  # independent of P's stream
            signs = torch.from_numpy((rng.integers(0, 2, size=self.p) * 2 - 1).astype(np.float32))
        object.__setattr__(self, "_signs", signs)

    def fold(self, G: torch.Tensor) -> torch.Tensor:
        """F^T applied to each row: [m, p] -> [m, q]."""
        if self._signs is None:
            return G
        x = G * self._signs.to(G.dtype)
        q, whole = self.buckets, (self.p // self.buckets) * self.buckets
        out = x[:, :whole].reshape(len(x), -1, q).sum(1)
        out[:, : self.p - whole] += x[:, whole:]
        return out

    def project(self, G: torch.Tensor) -> torch.Tensor:
        """[m, p] -> [m, d] (G's dtype)."""
        if G.ndim != 2 or G.shape[1] != self.p:
            raise ValueError(f"G must have shape [m, {self.p}], got {tuple(G.shape)}")
        return self.fold(G) @ self._P.to(G.dtype)

    def gram(self) -> np.ndarray:
        """S^T S [d, d] (float64) without forming S: P^T diag(c) P, c_b = #{j < p : j mod q = b} (sigma_j^2 = 1)."""
        P = self._P.double().numpy()
        q = P.shape[0]
        counts = np.full(q, self.p // q, np.float64) + (np.arange(q) < self.p % q)
        return P.T @ (counts[:, None] * P)

    def matrix(self) -> np.ndarray:
        """The dense S [p, d] (tests only): row j is sigma_j P[j mod q]."""
        P = self._P.double().numpy()
        if self._signs is None:
            return P
        return P[np.arange(self.p) % self.buckets] * self._signs.double().numpy()[:, None]


@dataclass(frozen=True, kw_only=True)
class TorchGaussianProjection:
    """`influence.projection`'s P [p, d] (same seed, same rows), materialised once: projects like the JAX side."""

    p: int
    d: int
    seed: int
    _P: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        import influence as inf

        P = inf.make_projection(self.p, self.d, seed=self.seed).matrix(dtype=np.float32)
        object.__setattr__(self, "_P", torch.from_numpy(np.ascontiguousarray(P)))

    def project(self, G: torch.Tensor) -> torch.Tensor:
        if G.ndim != 2 or G.shape[1] != self.p:
            raise ValueError(f"G must have shape [m, {self.p}], got {tuple(G.shape)}")
        return G @ self._P.to(G.dtype)

    def gram(self) -> np.ndarray:
        """P^T P [d, d] (float64)."""
        P = self._P.double().numpy()
        return P.T @ P

    def matrix(self) -> np.ndarray:
        return self._P.double().numpy()


def make_torch_projection(
    p: int, d: int, *, seed: int, kind: str = "sketch"
) -> SketchProjection | TorchGaussianProjection:
    """The projection of a torch-backend scope: "sketch" (count-sketch fold + `influence.project`'s Gaussian) or
    "gaussian" (`influence.project`'s dense P)."""
    if kind not in PROJECTIONS:
        raise ValueError(f"kind must be one of {PROJECTIONS}, got {kind!r}")
    return SketchProjection(p=p, d=d, seed=seed) if kind == "sketch" else TorchGaussianProjection(p=p, d=d, seed=seed)


# ------------------------------------------------------------------------------------ per-example grads
def _per_example_fn(scope: TorchScope, n_inputs: int) -> Callable[..., dict[str, torch.Tensor]]:
    def loss(params: dict[str, torch.Tensor], y: torch.Tensor, *x: torch.Tensor) -> torch.Tensor:
        logits = scope.logits(params, *(t.unsqueeze(0) for t in x))
        return nn.functional.cross_entropy(logits, y.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0) + (0,) * n_inputs)


def _check_targets(y: Any, n: int) -> torch.Tensor:
    y = torch.as_tensor(np.array(y, dtype=np.int64))  # a copy: y may be a read-only memmap
    if y.shape != (n,):
        raise ValueError(f"targets must have shape [{n}], got {tuple(y.shape)}")
    return y


def compute_torch_per_example_grads(
    scope: TorchScope, inputs: Sequence[torch.Tensor], targets: Any, *, chunk: int = 32
) -> torch.Tensor:
    """Per-example gradients [n, p] of CE(f(theta, x_i), y_i) by `vmap(grad)` (chunks of `chunk` examples).

    Args:
        scope: the trained parameters and f.
        inputs: the scope's inputs, each with a leading example axis (HeadScope: (h,), LastBlockScope:
            (hidden, mask)).
        targets: class ids [n] (labels for training examples, the explained class for queries).
    """
    n = inputs[0].shape[0]
    y = _check_targets(targets, n)
    fn = _per_example_fn(scope, len(inputs))
    out = []
    for s in range(0, n, chunk):
        sl = slice(s, min(s + chunk, n))
        g = fn(scope.params, y[sl], *(t[sl] for t in inputs))
        out.append(scope.flatten(g, sl.stop - sl.start))
    return torch.cat(out)


def compute_projected_grads(
    scope: LastBlockScope,
    batches: Sequence[BlockBatch],
    targets: Any,
    projection: SketchProjection | TorchGaussianProjection | None,
    *,
    chunk: int = 32,
) -> np.ndarray:
    """Projected per-example gradients [n, d] of the last-block scope, rows in the texts' order (full
    gradients only exist one chunk at a time). projection=None returns the full [n, p] gradients."""
    n = sum(len(b.positions) for b in batches)
    y = _check_targets(targets, n)
    d = scope.n_params if projection is None else projection.d
    out = np.empty((n, d), np.float32 if scope.dtype == torch.float32 else np.float64)
    fn = _per_example_fn(scope, 2)
    for b in batches:
        for s in range(0, len(b.positions), chunk):
            pos = b.positions[s : s + chunk]
            g = scope.flatten(fn(scope.params, y[pos], b.hidden[s : s + chunk], b.mask[s : s + chunk]), len(pos))
            out[pos] = (g if projection is None else projection.project(g)).detach().cpu().numpy()
    return out


def embed_texts(
    scope: LastBlockScope,
    texts: Sequence[str],
    targets: Any,
    *,
    dim: int = 1024,
    seed: int = 0,
    kind: str = "sketch",
) -> np.ndarray:
    """Gradient embeddings [n, dim] of texts in the last-block scope: frozen body once, then projected
    per-example gradients at `targets` (labels of training texts, explained classes of queries)."""
    projection = make_torch_projection(scope.n_params, dim, seed=seed, kind=kind)
    return compute_projected_grads(scope, scope.block_inputs(texts), targets, projection)


# ------------------------------------------------------------------------------------- curvature products
def _chunk_product(
    scope: TorchScope, curvature: str, xs: list[torch.Tensor], ys: torch.Tensor, v: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """sum_i C_i v over the rows of one chunk (C_i the GGN or Hessian of example i's CE loss)."""

    def logits_fn(prm: dict[str, torch.Tensor]) -> torch.Tensor:
        return scope.logits(prm, *xs)

    if curvature == "hessian":

        def loss(prm: dict[str, torch.Tensor]) -> torch.Tensor:
            return nn.functional.cross_entropy(logits_fn(prm), ys, reduction="sum")

        return jvp(grad(loss), (scope.params,), (v,))[1]
    logits, jv = jvp(logits_fn, (scope.params,), (v,))
    probs = torch.softmax(logits, dim=-1)
    hjv = probs * jv - probs * (probs * jv).sum(-1, keepdim=True)  # Hessian of CE w.r.t. the logits
    _, vjp_fn = vjp(logits_fn, scope.params)
    return vjp_fn(hjv)[0]


def make_torch_matvec(
    scope: TorchScope,
    inputs: Sequence[torch.Tensor] | Sequence[BlockBatch],
    targets: Any,
    *,
    l2: float,
    curvature: str = "ggn",
    batch_size: int = 256,
):
    """v -> (C + l2 I) v on flat vectors [p], C the GGN or Hessian of the mean CE over all rows of `inputs`
    (the scope's input tensors, or `LastBlockScope.block_inputs` micro-batches with `targets` in text order).

    The same operator as `influence.make_head_matvec`, computed with torch.func (GGN: J^T H_logits J v via
    `jvp` then `vjp` of the logits; Hessian: `jvp(grad(loss))`), summed over chunks of `batch_size` rows.
    Returned as a JAX function (through `jax.pure_callback`, vmap-able) so that `influence.solve_lissa`,
    `estimate_top_eigenvalue` and `compute_dense_curvature` take it as they take the JAX matvec. Damping is
    not included.
    """
    import jax
    import jax.numpy as jnp

    if curvature not in ("ggn", "hessian"):
        raise ValueError(f"curvature must be 'ggn' or 'hessian', got {curvature!r}")
    if isinstance(l2, bool) or not isinstance(l2, int | float) or not math.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2 must be a finite float >= 0, got {l2!r}")
    if inputs and isinstance(inputs[0], BlockBatch):  # length-sorted micro-batches of LastBlockScope
        n = sum(len(b.positions) for b in inputs)
        y = _check_targets(targets, n)
        groups = [([b.hidden, b.mask], y[b.positions]) for b in inputs]
    else:
        n = inputs[0].shape[0]
        y = _check_targets(targets, n)
        groups = [(list(inputs), y)]
    chunks = [
        ([t[s : s + batch_size] for t in xs], ys[s : s + batch_size])
        for xs, ys in groups
        for s in range(0, len(ys), batch_size)
    ]
    p = scope.n_params
    np_dtype = np.float64 if scope.dtype == torch.float64 else np.float32

    def product(v_flat: torch.Tensor) -> torch.Tensor:
        v = scope.unflatten(v_flat)
        total = torch.zeros_like(v_flat)
        for xs, ys in chunks:
            total += scope.flatten(_chunk_product(scope, curvature, xs, ys, v))
        return total / n + l2 * v_flat

    def callback(v: np.ndarray) -> np.ndarray:
        flat = np.asarray(v).reshape(-1, p)
        out = np.stack([product(torch.as_tensor(np.array(row, dtype=np_dtype))).detach().numpy() for row in flat])
        return out.reshape(np.shape(v)).astype(np_dtype)

    def matvec(v: jax.Array) -> jax.Array:
        v = jnp.asarray(v, dtype=np_dtype)
        if v.shape[-1] != p:
            raise ValueError(f"v must have {p} entries, got shape {v.shape}")
        return jax.pure_callback(callback, jax.ShapeDtypeStruct(v.shape, np_dtype), v, vmap_method="broadcast_all")

    matvec.product = product  # the torch operator itself (flat torch vectors)
    return matvec
