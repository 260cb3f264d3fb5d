"""Ready-made `Task(preview=...)` functions: how an example is shown in explanations, the CLI, the page and the API.

The contract: `preview(x) -> str`, called once per example at build time (and for added examples) with the
raw input `x` the dataset yields; the string is stored with the example in SQLite and returned as `preview`.
The default (`indexer.task.default_preview`) shows texts as they are and arrays by shape and range.

- `tabular_preview(feature_names)`: a table row as `name=value` pairs, e.g. `alcohol=13.2 malic_acid=1.71 ...`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

MAX_CHARS = 200
"""Longest preview stored (longer ones end with '...')."""


def tabular_preview(feature_names: Sequence[str], *, digits: int = 4) -> Callable[[Any], str]:
    """A preview of one tabular row: `name=value` per feature, values with `digits` significant digits.

    Raises:
        ValueError: `feature_names` is empty or not strings (at once), or a row has another number of
            values than names (at build time, naming both counts).
    """
    names = list(feature_names) if not isinstance(feature_names, str) else []
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"feature_names must be a non-empty list of names, got {feature_names!r}")

    def preview(x: Any) -> str:
        row = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, np.float64).reshape(-1)
        if row.size != len(names):
            raise ValueError(f"tabular_preview: a row has {row.size} values, feature_names has {len(names)}")
        text = " ".join(f"{n}={v:.{digits}g}" for n, v in zip(names, row, strict=True))
        return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 3] + "..."

    return preview
