"""The integer kernels, and nothing else: every call into ``torch.ops.onednn`` lives here.

``torch.ao.quantization`` and ``torch.ops.quantized`` are deprecated in torch 2.14; keeping the
kernel calls behind these few functions lets the backend be swapped (torchao, a compiled
extension) without touching the layers.

The kernels take plain uint8 activations with one scale and zero point, int8 weights with one
scale per output channel (zero point 0), accumulate exactly in int32 and return float32
directly: no 8-bit re-rounding of the output, which MoDiff's output cache needs.
"""

from __future__ import annotations

import torch

ACT_DTYPE = torch.uint8
ACT_QMIN, ACT_QMAX = 0, 255
WEIGHT_QMIN, WEIGHT_QMAX = -128, 127


def available() -> bool:
    """Whether this torch build has the oneDNN int8 kernels (x86 CPUs)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")


def quantize_activation(
    x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int
) -> torch.Tensor:
    """Float -> uint8 codes ``clamp(round(x / scale) + zero_point, qmin, qmax)``.

    Uses the fused ``quantize_per_tensor`` kernel (keeps channels-last) and reinterprets its
    quint8 storage as uint8 (``int_repr()`` would copy: 8 ms against 1 ms at CIFAR-10 sizes).
    A grid narrower than 8 bits is enforced by clamping the float input first, which lands
    exactly on the codes.
    """
    if qmin > ACT_QMIN or qmax < ACT_QMAX:
        x = x.clamp((qmin - zero_point) * scale, (qmax - zero_point) * scale)
    q = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)
    codes = torch.empty(0, dtype=ACT_DTYPE, device=q.device)
    return codes.set_(q.untyped_storage(), q.storage_offset(), q.size(), q.stride())


def pack_conv_weight(
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """Prepack int8 conv weights (O, I, kH, kW) once for :func:`conv2d`."""
    return torch.ops.onednn.qconv_prepack(
        w_int8, w_scale, 1.0, 0, stride, padding, dilation, groups, None
    )


def conv2d(
    x_codes: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    packed_weight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero_point: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """Integer conv of uint8 codes with packed int8 weights; float32 output (bias added)."""
    return torch.ops.onednn.qconv2d_pointwise(
        x_codes,
        x_scale,
        x_zero_point,
        packed_weight,
        w_scale,
        w_zero_point,
        bias,
        stride,
        padding,
        dilation,
        groups,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )


def conv2d_accumulate_(
    x_codes: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    packed_weight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero_point: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    accum: torch.Tensor,
) -> None:
    """``accum += conv(codes)`` in place, inside the kernel (oneDNN's sum post-op)."""
    torch.ops.onednn.qconv2d_pointwise.binary(
        x_codes, x_scale, x_zero_point, packed_weight, w_scale, w_zero_point, accum, None,
        stride, padding, dilation, groups, 1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none",
        [], "",
    )  # fmt: skip


def pack_linear_weight(w_int8: torch.Tensor) -> torch.Tensor:
    """Prepack int8 linear weights (O, I) once for :func:`linear`."""
    return torch.ops.onednn.qlinear_prepack(w_int8, None)


def linear(
    x_codes: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    packed_weight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero_point: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Integer linear of uint8 codes with packed int8 weights; float32 output (bias added)."""
    return torch.ops.onednn.qlinear_pointwise(
        x_codes,
        x_scale,
        x_zero_point,
        packed_weight,
        w_scale,
        w_zero_point,
        bias,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )


def linear_accumulate_(
    x_codes: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    packed_weight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero_point: torch.Tensor,
    accum: torch.Tensor,
) -> None:
    """``accum += linear(codes)`` in place (2-D ``accum``), inside the kernel."""
    torch.ops.onednn.qlinear_pointwise.binary(
        x_codes, x_scale, x_zero_point, packed_weight, w_scale, w_zero_point, accum, None, 1.0,
        0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], "",
    )  # fmt: skip
