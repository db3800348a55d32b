"""Quantize the preset model (scale search on calibration data); save its parameters."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from modiff.calibration import calibration_meta, load_calibration
from modiff.checkpoint import load_model
from modiff.config import Params, Variant
from modiff.quant import QuantConfig, quantize_
from modiff.quant.api import save_quant_params
from modiff.runtime import configure_process, resolve_device

log = logging.getLogger(__name__)


def run(
    params: Params,
    *,
    variant: str,
    qparams: Path,
    calib: Path | None = None,
    ckpt: Path | None = None,
) -> None:
    """``variant``: an entry of params.yaml's variants, or any name of the grid's grammar."""
    configure_process(params.threads)
    chosen = params.variants.get(variant) or Variant.from_name(variant)
    if chosen.method == "fp32":  # the reference: nothing to calibrate, a file saying so
        save_quant_params(None, None, qparams, {"variant": variant})
        return
    if ckpt is None:
        raise ValueError("a quantized variant needs --ckpt (the preset's checkpoint)")
    config = QuantConfig.from_variant(chosen, params.quant)
    meta = calibration_meta(params, ckpt)
    if config.needs_calibration and calib is None:
        raise ValueError(f"{variant} searches scales on calibration data: pass --calib")
    calibration = load_calibration(calib, meta) if config.needs_calibration else None
    model = load_model(params.preset_layout(), ckpt, "cpu")
    # Reconstruction's optimisation runs on params' device (CUDA when there); the scale search
    # and the layers stay on the CPU, where the native kernels are.
    device = resolve_device(params.device) if config.learns else "cpu"
    started = time.perf_counter()
    model = quantize_(model, config, calibration, seed=params.seed, device=device)
    meta.update(recipe=config.recipe, variant=variant)
    save_quant_params(model, config, qparams, meta)  # no run time: equal inputs, equal bytes
    log.info("calibrated %s in %.0f s -> %s", variant, time.perf_counter() - started, qparams)
