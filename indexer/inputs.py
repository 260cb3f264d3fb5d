"""Raw query inputs through the task's body: the torch side of `Index.explain(inputs=...)`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .task import Task


def features_of_inputs(task: Task, inputs: Any, feature_shape: tuple[int, ...]) -> np.ndarray:
    """Cut features ``[m, *feature_shape]`` of raw inputs: a batch tensor/array, or a list of texts for a text body.

    Raises:
        ValueError: The inputs are not a batch, not float, not finite, or do not fit the model; the message
            names them.
    """
    if isinstance(inputs, str):
        raise ValueError(f"inputs must be a list of texts, got one str: pass [{inputs[:40]!r}]")
    if isinstance(inputs, list | tuple) and inputs and all(isinstance(t, str) for t in inputs):
        return task.features(list(inputs))  # a text body (Task.from_hf) tokenizes the texts itself
    x = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(np.asarray(inputs))
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"inputs must be a float tensor/array, got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("inputs contain NaN or inf")
    try:
        h = task.features(x.float())
    except RuntimeError as err:
        raise ValueError(f"inputs of shape {tuple(x.shape)} do not fit the model: {err}") from err
    if h.ndim != len(feature_shape) + 1 or tuple(h.shape[1:]) != feature_shape:
        raise ValueError(
            f"inputs of shape {tuple(x.shape)} give features {tuple(h.shape)}, expected [m, {feature_shape}]"
        )
    return h
