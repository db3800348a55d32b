"""Add Gaussian noise to samples (the check that the metrics can see damage)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from modiff.config import Params
from modiff.io import load_images, save_images
from modiff.records import SampleMeta
from modiff.results import add_noise


def run(params: Params, *, sigma: float, samples: Path, damaged: Path) -> None:
    """``sigma``: the noise's standard deviation on the [-1, 1] scale."""
    images, meta = load_images(samples)
    meta = SampleMeta.from_json(meta)
    meta = dataclasses.replace(meta, variant=f"{meta.variant}-noise{sigma:g}", noise_sigma=sigma)
    save_images(damaged, add_noise(images, sigma, params.seed), **meta.to_json())
