"""Quantization: ``quantize_(model, QuantConfig(...), calibration)``, torchao style."""

from modiff.quant.api import quantize_, target_layers
from modiff.quant.config import QuantConfig
from modiff.state import cache_bytes, reset_caches  # the state protocol, re-exported

__all__ = ["QuantConfig", "cache_bytes", "quantize_", "reset_caches", "target_layers"]
