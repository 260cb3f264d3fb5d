"""Raw query inputs through the task's body: the torch side of `Index.explain(inputs=...)`.

What a raw input must be is what the Task's own training examples are: texts (a list of str) for a model
trained on texts (`Task.from_hf`), else a batch of numbers, either shaped like the training examples
(`[m, *example_shape]`) or as flattened rows (`[m, prod(example_shape)]`, what the HTTP service receives),
which are reshaped to the examples' shape. Anything else is refused with a ValueError that names `inputs`
and says what was expected, never an AttributeError or a TypeError from inside the model.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .task import Task

#: errors a model's forward raises on an input it cannot take (shape, dtype, type)
MODEL_INPUT_ERRORS = (RuntimeError, TypeError, ValueError, IndexError, AttributeError)


def example_kind(task: Task) -> tuple[str, tuple[int, ...]]:
    """("text", ()) for a Task trained on texts, else ("array", the shape of one training example)."""
    x0 = task.train[0][0]
    if isinstance(x0, str):
        return "text", ()
    return "array", tuple(np.shape(x0.detach().cpu() if isinstance(x0, torch.Tensor) else x0))


def first_line(err: Exception) -> str:
    """The first line of a library's error (torch appends C++ signatures and tracebacks below it)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _describe(inputs: Any) -> str:
    head = list(inputs[:2]) if isinstance(inputs, list | tuple) else inputs
    return f"{type(inputs).__name__} {str(head)[:60]}{'...' if len(str(head)) > 60 else ''}"


def features_of_inputs(task: Task, inputs: Any, feature_shape: tuple[int, ...]) -> np.ndarray:
    """Cut features ``[m, *feature_shape]`` of raw inputs: a batch tensor/array, or a list of texts for a text body.

    Raises:
        ValueError: The inputs are not a batch of what the model takes (texts for a text model, finite
            numbers otherwise), or do not fit the model; the message names them.
    """
    kind, example_shape = example_kind(task)
    if isinstance(inputs, str):
        raise ValueError(f"inputs must be a batch (a list), got one str: pass [{inputs[:40]!r}]")
    is_list = isinstance(inputs, list | tuple)
    if is_list and len(inputs) == 0:
        raise ValueError("inputs is empty: pass at least one input")
    has_text = is_list and any(isinstance(t, str) for t in inputs)
    if kind == "text":
        if not is_list or not all(isinstance(t, str) for t in inputs):
            raise ValueError(f"inputs: this model takes texts (a list of str), got {_describe(inputs)}")
        try:
            return np.asarray(task.features(list(inputs)), np.float32)  # a text body tokenizes the texts itself
        except MODEL_INPUT_ERRORS as err:
            raise ValueError(f"inputs: the model's body refused these texts: {first_line(err)}") from err
    if has_text:
        raise ValueError(
            f"inputs: this model takes numbers (examples of shape {list(example_shape)}, or rows of "
            f"{math.prod(example_shape)} values), got texts {_describe(inputs)}"
        )
    try:
        x = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(np.asarray(inputs))
    except (ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"inputs must be a batch of equal-length rows of numbers, got {_describe(inputs)}") from err
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"inputs must be a float tensor/array, got dtype {x.dtype}")
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"inputs must be a non-empty batch [m, ...], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("inputs contain NaN or inf")
    if len(example_shape) > 1 and x.ndim == 2 and x.shape[1] == math.prod(example_shape):
        x = x.reshape(len(x), *example_shape)  # flattened rows (the HTTP form) of multi-dimensional examples
    try:
        h = np.asarray(task.features(x.float()), np.float32)
    except MODEL_INPUT_ERRORS as err:
        raise ValueError(
            f"inputs of shape {tuple(x.shape)} do not fit the model (its examples have shape {list(example_shape)}):"
            f" {first_line(err)}"
        ) from err
    if h.ndim != len(feature_shape) + 1 or tuple(h.shape[1:]) != feature_shape:
        raise ValueError(
            f"inputs of shape {tuple(x.shape)} give features {tuple(h.shape)}, expected [m, {feature_shape}]"
        )
    return h


def example_rows(task: Task, inputs: Any) -> list[Any]:
    """Validated raw inputs (`features_of_inputs` first) as a list of examples shaped like the training ones:
    texts as they are, flattened rows reshaped (what scope="model" runs through the whole model)."""
    kind, example_shape = example_kind(task)
    if kind == "text":
        return list(inputs)
    x = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(np.asarray(inputs))
    if len(example_shape) > 1 and x.ndim == 2 and x.shape[1] == math.prod(example_shape):
        x = x.reshape(len(x), *example_shape)
    return list(x)
