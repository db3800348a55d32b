"""Uniform affine quantizers and their scale searches.

Rounding and clamping follow PyTorch's reference ops exactly
(``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine``): codes are
``clamp(round_half_even(x * (1 / scale)) + zero_point, qmin, qmax)``; dequantised values are
``(code - zero_point) * scale``. The tests compare against those ops.

Grids, for ``bits`` b:
- symmetric activations: codes ``128 - 2^(b-1) .. 128 + 2^(b-1) - 1`` of uint8, zero point 128
  (the uint8 kernels need quint8 inputs; symmetric means zero point 128);
- asymmetric activations: codes ``0 .. 2^b - 1``, zero point from the clipping range;
- weights: symmetric int8 codes ``-2^(b-1) .. 2^(b-1) - 1``, one scale per output channel.
"""

from __future__ import annotations

import torch

LP_NORM = 2.4  # Q-Diffusion's L_p for scale searches
SEARCH_STEPS = 80  # Q-Diffusion's grid: shrink the range by 1% steps, 80 candidates
SEARCH_SHRINK = 0.01
MIN_SCALE = 1e-8


def check_bits(bits: int, what: str) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{what} must be an integer from 2 to 8, got {bits!r}")


def act_grid(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of uint8 activation codes."""
    if symmetric:
        return 128 - 2 ** (bits - 1), 128 + 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def weight_grid(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of int8 weight codes."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Integer codes (as float) of ``x``; ``scale``/``zero_point`` broadcast against ``x``."""
    return torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, qmin, qmax)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Quantize then dequantize, in float (the simulated backend and the reference)."""
    return (quantize(x, scale, zero_point, qmin, qmax) - zero_point) * scale


def symmetric_scale(absmax: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Scale mapping [-absmax, absmax] onto a symmetric grid centred on its zero point."""
    half = min(-qmin, qmax) if qmin < 0 else min(128 - qmin, qmax - 128)
    return (absmax / half).clamp_min(MIN_SCALE)


def asymmetric_params(
    lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering [lo, hi] (which is widened to contain 0)."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(MIN_SCALE)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero_point


def lp_error(a: torch.Tensor, b: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """Sum of |a - b|^p (over ``dims``, or all)."""
    err = (a - b).abs().pow(LP_NORM)
    return err.sum() if dims is None else err.sum(dim=dims)


def search_weight_scales(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric scales minimising the L_p error of the quantised weights.

    Candidates: ``max|w| * (1 - 0.01 i)`` for i in 0..79 (Q-Diffusion's MSE search grid).
    """
    qmin, qmax = weight_grid(bits)
    flat = w.detach().reshape(w.shape[0], -1).float()
    absmax = flat.abs().amax(dim=1)
    best_scale = symmetric_scale(absmax, qmin, qmax)
    best_err = torch.full_like(absmax, float("inf"))
    zero = torch.zeros(())
    for i in range(SEARCH_STEPS):
        scale = symmetric_scale(absmax * (1 - SEARCH_SHRINK * i), qmin, qmax)
        err = lp_error(fake_quantize(flat, scale[:, None], zero, qmin, qmax), flat, dims=(1,))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes of ``w`` with per-output-channel ``scale``."""
    qmin, qmax = weight_grid(bits)
    shape = (-1,) + (1,) * (w.dim() - 1)
    return quantize(w.float(), scale.reshape(shape), torch.zeros(()), qmin, qmax).to(torch.int8)
