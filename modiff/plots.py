"""Pictures: sample grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from modiff.io import atomic_output


def save_grid(images: np.ndarray, dest: str | Path, *, nrow: int = 10, scale: int = 1) -> None:
    """Tile uint8 images (N, H, W, C) into one PNG, ``nrow`` per row, 1-pixel gaps, upscaled."""
    n, h, w, c = images.shape
    rows = (n + nrow - 1) // nrow
    canvas = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), 128, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = (
            img
        )
    if scale > 1:
        canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    pil = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    with atomic_output(dest) as tmp:
        pil.save(tmp, format="PNG")
