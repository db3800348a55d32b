"""Training and reference images of the presets (the digits preset needs no download)."""

from __future__ import annotations

import numpy as np
import torch

DIGITS_MAX = 16.0  # load_digits pixel values are integers 0..16


def digits_images() -> np.ndarray:
    """scikit-learn's bundled 1,797 digits as uint8 images (N, 8, 8, 1), 0..16 mapped to 0..255."""
    from sklearn.datasets import load_digits

    raw = load_digits().images  # (1797, 8, 8) float64 in 0..16
    return np.round(raw / DIGITS_MAX * 255.0).astype(np.uint8)[..., None]


def digits_labels() -> np.ndarray:
    """Class labels 0..9 of :func:`digits_images`, same order."""
    from sklearn.datasets import load_digits

    return load_digits().target.astype(np.int64)


def uint8_to_model_space(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W, C) -> float tensor (N, C, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return 2 * x - 1
