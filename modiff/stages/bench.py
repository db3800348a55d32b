"""Per-step latency, images/s and peak memory for the preset model and CIFAR-10's UNet, next
to other engines (bench.peers), and each INT8 variant's accuracy against FP32."""

from __future__ import annotations

from pathlib import Path

from modiff.bench import run as run_benchmark
from modiff.calibration import calibration_meta, load_calibration
from modiff.config import Params
from modiff.io import write_json
from modiff.report import format_table
from modiff.runtime import configure_process


def run(params: Params, *, ckpt: Path, calib: Path, bench: Path) -> None:
    """``calib``: the preset's calibration data, the inputs of the INT8 accuracy check."""
    calibration = load_calibration(calib, calibration_meta(params, ckpt))
    configure_process(params.threads)
    result = run_benchmark(params, ckpt, calibration)
    print(format_table(result["rows"]))
    write_json(result, bench)
