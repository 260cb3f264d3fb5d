"""Argument checks shared by the math modules: each names the argument and shows the value it refuses."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_int(value: Any) -> bool:
    """An int (numpy's too), not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A real number (int or float, numpy's too), not a bool."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def check_nonnegative(name: str, value: Any) -> float:
    """value as a finite float >= 0, else a ValueError naming it."""
    if not is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


def check_rows(value: Any, name: str) -> jax.Array:
    """value as a finite floating matrix [m, p] (right-hand sides, one per row), else a ValueError naming it."""
    arr = jnp.asarray(value)
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape [m, p], got shape {arr.shape}")
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating array, got dtype {arr.dtype}")
    if not bool(jnp.all(jnp.isfinite(arr))):
        raise ValueError(f"{name} must be finite, got NaN or inf entries")
    return arr
