"""The head as one object: its spec, its parameters and their flat vector theta, with the operations on them.

With f(h; theta) the head's logits and CE the cross-entropy:

    logits(h)          = f(h; theta)                                      [m, C]
    gradients(h, y)    = g_i = grad_theta CE(f(h_i; theta), y_i)          [m, p]
    gradient_products(h, y, V) = V g_i^T = d/de CE(f(h_i; theta + e v_j), y_i)  [k, m]  (forward mode, no [m, p])
    matvec(h, y, l2)   = v -> (C + l2 I) v, C the GGN (or Hessian) of the mean CE over the rows   [p] -> [p]

One object instead of the (spec, unravel, theta) triple every caller used to thread through.

Reference: Koh & Liang 2017 (arXiv:1703.04730); Schraudolph 2002 (GGN products).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from influence.head import HeadParams, HeadSpec, apply_head, flatten_params
from influence.hvp import MatVec, make_head_matvec
from influence.objective import compute_per_example_grads, make_loss_fn


@dataclass(frozen=True, eq=False)
class Head:
    """A head (`influence.head` spec and parameters) and its flat parameter vector.

    Attributes:
        spec: One dict per layer.
        params: One parameter dict per layer.
    """

    spec: HeadSpec
    params: HeadParams

    @cached_property
    def _flat(self) -> tuple[jax.Array, Any]:
        return flatten_params(self.params)

    @property
    def theta(self) -> jax.Array:
        """The parameters as one flat vector [p] (`flatten_params` order)."""
        return self._flat[0]

    @property
    def unravel(self) -> Any:
        """Flat vector [p] -> per-layer parameters."""
        return self._flat[1]

    def logits(self, h: Any) -> np.ndarray:
        """f(h; theta) ``[m, C]`` float64."""
        return np.asarray(apply_head(self.spec, self.params, h), np.float64)

    def gradients(self, h: Any, y: Any) -> np.ndarray:
        """Per-example gradients of CE at labels (or targets) y, ``[m, p]`` in the dtype of h (no l2 term)."""
        return np.asarray(compute_per_example_grads(self.spec, self.unravel, self.theta, h, y))

    def gradient_products(self, h: Any, y: Any, V: Any) -> np.ndarray:
        """v_j . g_i for every row v_j of V [k, p] and every example (h_i, y_i): ``[k, m]`` float64.

        Each row is one forward-mode directional derivative of the per-example losses along v_j (``jax.jvp``),
        so no [m, p] gradient is formed: re-scoring m candidates costs k forward passes over them.
        """
        V = jnp.asarray(np.atleast_2d(np.asarray(V)), self.theta.dtype)
        h, y = np.asarray(h), np.asarray(y)
        m = len(h)
        size = max(64, 1 << (m - 1).bit_length())  # padded to a power of two: one compilation per size class
        h_pad = np.concatenate([h, np.zeros((size - m, *h.shape[1:]), h.dtype)])
        y_pad = np.concatenate([y, np.zeros(size - m, y.dtype)])
        out = self._products(self.theta, jnp.asarray(h_pad), jnp.asarray(y_pad), V)
        return np.asarray(out, np.float64)[:, :m]

    @cached_property
    def _products(self) -> Any:
        loss_fn = make_loss_fn(self.spec, self.unravel)

        @jax.jit
        def products(theta: jax.Array, h: jax.Array, y: jax.Array, V: jax.Array) -> jax.Array:
            def along(v: jax.Array) -> jax.Array:
                return jax.jvp(lambda t: loss_fn(t, h, y), (theta,), (v,))[1]

            return jax.vmap(along)(V)

        return products

    def matvec(
        self,
        h: Any,
        y: Any,
        *,
        l2: float,
        curvature: str = "ggn",
        batch_size: int | Literal["auto"] | None = "auto",
    ) -> MatVec:
        """v -> (C + l2 I) v over the rows (h, y) (`make_head_matvec`), damping not included."""
        return make_head_matvec(
            self.spec, self.unravel, self.theta, h, y, l2=l2, curvature=curvature, batch_size=batch_size
        )
