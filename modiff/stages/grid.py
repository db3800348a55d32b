"""A PNG grid of the first images of a samples file."""

from __future__ import annotations

from pathlib import Path

from modiff.io import load_images
from modiff.plots import save_grid


def run(*, samples: Path, grid: Path, n: int = 100, nrow: int = 10, scale: int = 4) -> None:
    """``n`` images, ``nrow`` per row, each pixel ``scale`` x ``scale``."""
    images, _ = load_images(samples)
    save_grid(images[:n], grid, nrow=nrow, scale=scale)
