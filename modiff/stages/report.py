"""Write results/report.md from the metrics, benchmark and grids."""

from __future__ import annotations

from pathlib import Path

from modiff.config import Params
from modiff.report import write_report
from modiff.stages import expand, foreach_items


def run(
    params: Params,
    *,
    records: Path,
    plot: Path,
    damage: str,
    bench: Path,
    grids: str,
    report: Path,
) -> None:
    """``damage`` and ``grids``: file patterns over the noise levels and the variants."""
    write_report(params, records, plot, expand(damage, foreach_items("sigmas", params)), bench,
                 expand(grids, foreach_items("variants", params)), report)  # fmt: skip
