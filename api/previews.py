"""Reading stored previews back as pixels, for the CLI's character grids and figures.

Two image forms are stored (see `indexer.previews`): PNG thumbnails as `data:image/png;base64,...` data URIs, and
the demo's rows of shade characters joined by '/' (`indexer.demo.digit_preview`). Anything else is text. This
module imports no torch (the CLI stays light); Pillow is imported only when a PNG is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np

SHADES = " .:-=+*#%@"
"""Characters of increasing ink (the same as indexer.demo.SHADES)."""

PNG_PREFIX = "data:image/png;base64,"
"""The start of an image preview stored as a PNG thumbnail (the same as indexer.previews.PNG_PREFIX)."""


def preview_pixels(preview: str) -> np.ndarray | None:
    """An image preview as grey-scale ink in [0, 1], `[H, W]` (1 = darkest); None for a text preview."""
    if preview.startswith(PNG_PREFIX):
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(io.BytesIO(base64.b64decode(preview[len(PNG_PREFIX) :], validate=True)))
            grey = np.asarray(img.convert("L"), np.float64) / 255.0
        except (binascii.Error, UnidentifiedImageError, OSError):
            return None
        return grey  # a thumbnail keeps the data's own polarity: bright = high value = more ink
    rows = preview.split("/")
    if len(rows) < 4 or len({len(r) for r in rows}) != 1 or any(c not in SHADES for r in rows for c in r):
        return None
    return np.array([[SHADES.index(c) for c in r] for r in rows], np.float64) / (len(SHADES) - 1)


def shade_rows(pixels: np.ndarray, *, max_side: int = 14) -> list[str]:
    """Ink `[H, W]` in [0, 1] as rows of shade characters, block-averaged to at most `max_side` per side."""
    step = max(1, -(-max(pixels.shape) // max_side))
    h, w = (pixels.shape[0] // step) * step or pixels.shape[0], (pixels.shape[1] // step) * step or pixels.shape[1]
    small = pixels[:h, :w].reshape(h // step, step, w // step, step).mean(axis=(1, 3)) if step > 1 else pixels
    idx = np.minimum((small * len(SHADES)).astype(int), len(SHADES) - 1)
    return ["".join(SHADES[i] for i in row) for row in idx]
