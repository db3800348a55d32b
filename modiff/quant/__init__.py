"""Quantization: ``quantize_(model, QuantConfig(...), calibration)``, torchao style."""

from modiff.quant.api import quantize_, target_layers
from modiff.quant.config import QuantConfig

__all__ = ["QuantConfig", "quantize_", "target_layers"]
