"""MoDiff's per-layer elementwise work, fused: one pass over the input instead of five.

A modulated layer reads its input ``x`` and the input accumulator ``a_hat``, quantizes the
residual and adds the dequantized residual back into ``a_hat``. Written as separate eager ops
that is five full-size passes and three fresh tensors per layer and step, which cost more than
the integer conv saves (FACTS §5: 1.07x FP32). Here it is one function, compiled with
``torch.compile`` into a single loop; the same function runs eagerly where compiling is off or
fails, with the same results up to float rounding of ``a_hat``.

``MODIFF_COMPILE=0`` turns compiling off (tests use it to keep start-up fast).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)
RECOMPILE_LIMIT = 64


def residual_codes_eager(
    x: torch.Tensor,
    base: torch.Tensor,
    a_hat: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """uint8 codes of Q(x - base); adds the dequantized codes into ``a_hat`` in place.

    ``base`` is ``a_hat`` itself for MoDiff's compensated mode. ``scale``/``zero_point``
    broadcast against ``x`` (0-dim per tensor, (N, 1, ...) per sample). Rounding as in
    :func:`modiff.quant.quantizer.quantize` (PyTorch's reference ops).
    """
    codes = torch.clamp(torch.round((x - base) * (1.0 / scale)) + zero_point, qmin, qmax)
    a_hat.add_((codes - zero_point) * scale)
    return codes.to(torch.uint8)


def residual_range_eager(
    x: torch.Tensor, base: torch.Tensor, per_sample: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of ``x - base``, over the whole tensor or per sample (without storing it)."""
    residual = x - base
    if per_sample:
        dims = tuple(range(1, x.dim()))
        return residual.amin(dim=dims), residual.amax(dim=dims)
    return torch.aminmax(residual)


class _Fused:
    """One eager function and its compiled twin, compiled on first use."""

    def __init__(self, eager: Callable):
        self.eager = eager
        self.compiled: Callable | None = None
        self.failed = False

    def __call__(self, *args):
        if self.failed or not compile_enabled():
            return self.eager(*args)
        if self.compiled is None:
            # One graph per input layout (channels-last, sliced, 2-D, ...) and bit-width: a whole
            # model has a few dozen; the default limit of 8 would silently fall back to eager.
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, RECOMPILE_LIMIT)
            self.compiled = torch.compile(self.eager, dynamic=True, fullgraph=True)
        try:
            return self.compiled(*args)
        except Exception as err:  # no C++ compiler, unsupported device, ...: stay correct
            log.warning("torch.compile of %s failed (%s); running eager", self.eager.__name__, err)
            self.failed = True
            return self.eager(*args)


def compile_enabled() -> bool:
    """Whether the fused functions are compiled (``MODIFF_COMPILE``, default on)."""
    return os.environ.get("MODIFF_COMPILE", "1") != "0"


residual_codes_ = _Fused(residual_codes_eager)
residual_range = _Fused(residual_range_eager)
