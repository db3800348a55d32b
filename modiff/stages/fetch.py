"""Fetch the preset's checkpoint and verify its digest."""

from __future__ import annotations

import logging
from pathlib import Path

from modiff.config import Params
from modiff.fetch import fetch

log = logging.getLogger(__name__)


def run(params: Params, *, ckpt: Path, timeout: float = 30.0) -> None:
    digests = params.selected.checkpoint
    fetch(digests.source, ckpt, md5=digests.md5, sha256=digests.sha256, timeout=timeout)
    log.info("checkpoint of preset %s ready at %s", params.preset, ckpt)
