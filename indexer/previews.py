"""Ready-made `Task(preview=...)` functions: how an example is shown in explanations, the CLI, the page and the API.

The contract: `preview(x) -> str`, called once per example at build time (and for added examples) with the
raw input `x` the dataset yields; the string is stored with the example in SQLite and returned as `preview`.
The default (`indexer.task.default_preview`) shows texts as they are and arrays by shape and range.

- `tabular_preview(feature_names)`: a table row as `name=value` pairs, e.g. `alcohol=13.2 malic_acid=1.71 ...`.
- `image_preview(size=32)`: an image (`[H, W]`, `[1|3, H, W]` or `[H, W, 3]`) as a PNG thumbnail, stored as a
  `data:image/png;base64,...` string; the page shows it as an image, the CLI as a grid of shade characters.
  The default preview uses it for arrays of that shape.
- `text_preview(max_chars=200)`: a text on one line (runs of white space as one space), cut with '...'.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

MAX_CHARS = 200
"""Longest preview stored (longer ones end with '...')."""

PNG_PREFIX = "data:image/png;base64,"
"""How an image preview starts (api/previews.py and the page read it)."""


def image_pixels(x: Any) -> np.ndarray | None:
    """`x` as `[H, W]` or `[H, W, 3]` float pixels if it is shaped like an image (both sides >= 8), else None."""
    a = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
    if a.dtype.kind not in "biuf":
        return None
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)) or min(a.shape[:2]) < 8:
        return None
    return a.astype(np.float64)


def image_preview(*, size: int = 32) -> Callable[[Any], str]:
    """A preview of one image: a grey-scale or RGB PNG thumbnail (longest side at most `size` pixels) as a data URI.

    Pixels are scaled from the image's own min..max to 0..255 (a constant image is black).

    Raises:
        ValueError: `size` is not an integer in [8, 256] (at once), or an input is not shaped like an image
            (at build time, naming its shape).
    """
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 256:
        raise ValueError(f"size must be an integer in [8, 256], got {size!r}")

    def preview(x: Any) -> str:
        from PIL import Image

        a = image_pixels(x)
        if a is None:
            shape = list(np.shape(x.detach().cpu() if hasattr(x, "detach") else x))
            raise ValueError(f"image_preview: an input of shape {shape} is not an image ([H, W], [C, H, W], [H, W, 3])")
        lo, hi = np.nanmin(a), np.nanmax(a)
        u8 = np.nan_to_num((a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)).round().astype(np.uint8)
        img = Image.fromarray(u8)
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        return PNG_PREFIX + base64.b64encode(buf.getvalue()).decode("ascii")

    return preview


def text_preview(*, max_chars: int = MAX_CHARS) -> Callable[[Any], str]:
    """A preview of one text: on one line (runs of white space as one space), cut to `max_chars` with '...'.

    Raises:
        ValueError: `max_chars` is not an integer >= 8.
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 8:
        raise ValueError(f"max_chars must be an integer >= 8, got {max_chars!r}")

    def preview(x: Any) -> str:
        text = " ".join(str(x).split())
        return text if len(text) <= max_chars else text[: max_chars - 3] + "..."

    return preview


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
