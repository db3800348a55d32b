"""Uniform affine quantizers and their scale searches.

Rounding and clamping follow PyTorch's reference ops exactly
(``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine``): codes are
``clamp(round_half_even(x * (1 / scale)) + zero_point, qmin, qmax)``; dequantised values are
``(code - zero_point) * scale``. The tests compare against those ops.

Grids, for ``bits`` b:
- symmetric activations: codes ``128 - 2^(b-1) .. 128 + 2^(b-1) - 1`` of uint8, zero point 128
  (the uint8 kernels need quint8 inputs; symmetric means zero point 128);
- asymmetric activations: codes ``0 .. 2^b - 1``, zero point from the clipping range;
- weights, one scale per output channel: symmetric, codes ``-2^(b-1) .. 2^(b-1) - 1``; or
  Q-Diffusion's asymmetric grid, ``2^b`` levels over the channel's clipped ``[min, max]`` with a
  zero point ``z``. Either way the codes are stored as int8 values ``q - z`` (so the symmetric grid
  is the asymmetric one with ``z = 2^(b-1)``): the kernels take them as zero-point-free weights.
  At 8 bits ``q - z`` can leave int8, so 8-bit weights are symmetric.
"""

from __future__ import annotations

import torch

LP_NORM = 2.4  # Q-Diffusion's L_p for scale searches
SEARCH_STEPS = 80  # Q-Diffusion's grid: shrink the range by 1% steps, 80 candidates
SEARCH_SHRINK = 0.01
MIN_SCALE = 1e-8


def act_grid(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of uint8 activation codes."""
    if symmetric:
        return 128 - 2 ** (bits - 1), 128 + 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def weight_grid(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of symmetric int8 weight codes."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def weight_code_range(zero_point: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (lowest, highest) stored code ``q - z`` of a grid with zero points ``z``."""
    return -zero_point, 2**bits - 1 - zero_point


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


def search_weight_params(
    w: torch.Tensor, bits: int, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel scales and zero points minimising the L_p error of the quantised weights.

    Candidates (Q-Diffusion's MSE search grid), for i in 0..79: symmetric, the range
    ``max|w| (1 - 0.01 i)``; asymmetric, ``[min w, max w] (1 - 0.01 i)`` (widened to hold 0).
    Zero points are int64, in stored-code terms (codes ``-z .. 2^b - 1 - z``).
    """
    if not symmetric and bits == 8:
        raise ValueError("8-bit weights are symmetric: asymmetric codes minus their zero point "
                         "do not fit int8")  # fmt: skip
    flat = w.detach().reshape(w.shape[0], -1).float()
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    best_scale = best_zp = None
    best_err = torch.full_like(lo, float("inf"))
    for i in range(SEARCH_STEPS):
        shrink = 1 - SEARCH_SHRINK * i
        scale, zp = _weight_candidate(lo * shrink, hi * shrink, bits, symmetric)
        codes = quantize_weight(flat, scale, zp, bits).float()
        err = lp_error(codes * scale[:, None], flat, dims=(1,))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = scale if best_scale is None else torch.where(better, scale, best_scale)
        best_zp = zp if best_zp is None else torch.where(better, zp, best_zp)
    return best_scale, best_zp


def _weight_candidate(lo, hi, bits, symmetric) -> tuple[torch.Tensor, torch.Tensor]:
    if symmetric:
        qmin, qmax = weight_grid(bits)
        scale = symmetric_scale(torch.maximum(-lo, hi), qmin, qmax)
        return scale, torch.full_like(scale, -qmin, dtype=torch.long)
    scale, zp = asymmetric_params(lo, hi, 0, 2**bits - 1)
    return scale, zp.long()


def quantize_weight(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """Stored int8 codes ``q - z`` of ``w`` with per-output-channel ``scale`` and ``zero_point``."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    lo, hi = weight_code_range(zero_point.reshape(shape), bits)
    codes = torch.clamp(torch.round(w.float() * (1.0 / scale.reshape(shape))), lo, hi)
    return codes.to(torch.int8)
