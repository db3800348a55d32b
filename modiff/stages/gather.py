"""results/metrics.json (one record per variant), its summary and the FID-against-bits plot."""

from __future__ import annotations

import logging
from pathlib import Path

from modiff import results
from modiff.config import Params
from modiff.io import write_json
from modiff.stages import expand, foreach_items

log = logging.getLogger(__name__)


def run(
    params: Params,
    *,
    metrics: str,
    bench: Path,
    records: Path,
    summary: Path,
    plot: Path,
    plot_data: Path,
) -> None:
    """``metrics``: the per-variant metrics files' pattern (``{variant}`` in it)."""
    files = expand(metrics, foreach_items("variants", params))
    gathered = [record.to_json() for record in results.gather(files, bench)]
    write_json(gathered, records)
    write_json(results.summary(gathered), summary)
    write_json(results.plot_points(gathered), plot_data)
    results.plot_fid_vs_bits(gathered, plot)
    log.info("gathered %d variants into %s", len(gathered), records)
