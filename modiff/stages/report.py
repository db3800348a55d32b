"""Write results/report.md from the metrics, benchmark and grids."""

from __future__ import annotations

from pathlib import Path

from modiff.config import Params
from modiff.report import write_report
from modiff.stages import expand


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
    sigmas = [f"{s:g}" for s in params.damage_check.sigmas]
    write_report(params, records, plot, expand(damage, sigmas), bench,
                 expand(grids, list(params.variants)), report)  # fmt: skip
