"""Merge sample shards (whole batches each) into one samples file."""

from __future__ import annotations

import logging
from pathlib import Path

from modiff.io import save_images
from modiff.results import merge_shards

log = logging.getLogger(__name__)


def run(*, shards: list[Path], samples: Path) -> None:
    images, meta = merge_shards(shards)
    save_images(samples, images, **meta.to_json())
    log.info("merged %d shards, %d images -> %s", len(shards), len(images), samples)
