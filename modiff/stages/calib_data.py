"""Time-step-aware calibration inputs (with previous-step inputs) from FP32 sampling."""

from __future__ import annotations

import logging
from pathlib import Path

from modiff.calibration import calibration_meta, collect_calibration, save_calibration
from modiff.checkpoint import load_model
from modiff.config import Params
from modiff.runtime import configure_process, resolve_execution

log = logging.getLogger(__name__)


def run(params: Params, *, ckpt: Path, calib: Path) -> None:
    configure_process(params.threads)
    preset, settings = params.preset_layout(), params.selected.calibration
    device = resolve_execution(params.device).device
    model = load_model(preset, ckpt, device)
    data = collect_calibration(
        model, preset, cali_st=settings.cali_st, cali_n=settings.cali_n, seed=params.seed,
        batch_size=settings.batch_size, device=device,
    )  # fmt: skip
    save_calibration(data, calibration_meta(params, ckpt), calib)
    log.info("wrote %d calibration inputs to %s", len(data["xs"]), calib)
