"""The integer kernels, and nothing else: every call into ``torch.ops.onednn`` lives here.

``torch.ao.quantization`` and ``torch.ops.quantized`` are deprecated in torch 2.14; keeping the
kernel calls behind these few functions lets the backend be swapped (torchao, a compiled
extension) without touching the layers.

The kernels take plain uint8 activations with one scale and zero point, int8 weights with one
scale per output channel (zero point 0), accumulate in int32 and return float32 directly: no
8-bit re-rounding of the output, which MoDiff's output cache needs.

**Exactness differs between CPUs.** With VNNI (or AMX) the int32 sums are exact. Without it
(AVX2, SSE4.1) oneDNN multiplies uint8 by int8 with ``vpmaddubsw``, which adds each pair of
products in int16 *with saturation*: exact only while ``2 * max(code) * max|weight|`` fits in
int16 (codes 0..128 with any int8 weight, or any code with |weight| <= 64). :func:`probe` finds
out once per process which kind this CPU runs, and :func:`needs_split` tells a layer whether
its operands fit; those that do not run the *split* scheme: each code's signed value
``q = code - zero_point`` becomes two halves in 0..128 (:func:`split_codes`), concatenated along
the input channels, against the weights repeated twice (:func:`repeat_input_channels`). One
kernel call with twice the input channels (twice the integer work), exact on every CPU. Same
bits, same results.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

ACT_DTYPE = torch.uint8
ACT_QMIN, ACT_QMAX = 0, 255
WEIGHT_QMIN, WEIGHT_QMAX = -128, 127
INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1
SPLIT_HALF_MAX = 128  # each half of a split code lies in 0..128: exact with any int8 weight


def available() -> bool:
    """Whether this torch build has the oneDNN int8 kernels (x86 CPUs)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")


# --- which kernels this CPU runs ------------------------------------------------------------------


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            line = next((ln for ln in fh if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def cpu_isa() -> str:
    """The best int8-relevant instruction set of this CPU, as ``lscpu`` names its flag."""
    flags = cpu_flags()
    for flag in ("amx_int8", "avx512_vnni", "avx_vnni", "avx512f", "avx2", "sse4_1"):
        if flag in flags:
            return flag
    return os.uname().machine


@dataclass(frozen=True)
class KernelProbe:
    """What :func:`probe` found: whether each kernel's int32 sums are exact on full-range
    uint8 x int8 operands (``False``: they saturate in int16 pairs, see the module docs)."""

    conv_exact: bool
    linear_exact: bool

    def exact(self, kind: str) -> bool:
        return self.conv_exact if kind == "conv" else self.linear_exact

    def describe(self) -> str:
        return "exact" if self.conv_exact and self.linear_exact else "saturating (int16 pairs)"


def isa_record() -> dict[str, str | None]:
    """The CPU's ISA and oneDNN's cap on it (``ONEDNN_MAX_CPU_ISA``), for every record."""
    return {"cpu_isa": cpu_isa(), "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")}


def fits_int16_pairs(code_max: int, w_min: int, w_max: int) -> bool:
    """Whether a sum of two products of codes in 0..code_max and weights in w_min..w_max
    always fits in int16 (the saturating kernels are then exact)."""
    return 2 * code_max * w_max <= INT16_MAX and 2 * code_max * w_min >= INT16_MIN


def needs_split(kind: str, code_max: int, w_min: int, w_max: int) -> bool:
    """Whether a layer of ``kind`` ("conv"/"linear") must run the split scheme to be exact."""
    return not probe().exact(kind) and not fits_int16_pairs(code_max, w_min, w_max)


def split_offset(zero_point: int) -> int:
    """Zero point of both halves of a split code (see :func:`split_codes`).

    With offset o = ceil(z / 2), any signed value q = code - z in -z..255-z is the sum of two
    halves in -o..128-o, so both halves plus o lie in 0..128."""
    return (zero_point + 1) // 2


def split_codes(codes: torch.Tensor, zero_point: int, channel_dim: int) -> torch.Tensor:
    """The split scheme's kernel operand: uint8 ``codes`` with ``zero_point`` -> twice the
    channels, both halves in 0..128, zero point :func:`split_offset`; the halves of each code
    sum to its signed value ``code - zero_point`` (less twice the offset).

    With o = split_offset(z) and b = z - o: low = clamp(code, b, b + 128) - b and
    high = code - clamp(code, b, b + 128) + o, all in uint8 (both lie in 0..128, and the
    wrap-around of the intermediate sum is harmless). The halves go side by side along
    ``channel_dim``, channels-last (a 4-D result is an (N, 2C, H, W) view of (N, H, W, 2C)).
    Plain torch ops into one buffer: faster here than a compiled version (1.0 ms against
    2.7-14 ms for 16x128x32x32; a copy of the same bytes takes 0.74 ms).
    """
    offset = split_offset(zero_point)
    base = zero_point - offset
    codes = codes.movedim(channel_dim, -1)
    channels = codes.shape[-1]
    out = torch.empty((*codes.shape[:-1], 2 * channels), dtype=ACT_DTYPE, device=codes.device)
    low, high = out[..., :channels], out[..., channels:]
    torch.clamp(codes, base, base + SPLIT_HALF_MAX, out=low)
    torch.sub(codes, low, out=high)
    high.add_(offset)
    low.sub_(base)
    return out.movedim(-1, channel_dim)


def repeat_input_channels(w_int8: torch.Tensor) -> torch.Tensor:
    """The weights of the split scheme: each output channel sees both halves of every input."""
    return torch.cat([w_int8, w_int8], dim=1)


@functools.cache
def probe() -> KernelProbe:
    """Run each kernel once on operands built to saturate int16 pairs (cached per process).

    Where they saturate, also check that operands in the exact range stay exact and that the
    split scheme is exact: if not, no native scheme can be trusted here and this raises.
    """
    conv_exact, linear_exact = _conv_probe(255, 0, 127), _linear_probe(255, 0, 127)
    if not (conv_exact and linear_exact):
        safe = [(128, 0, -128), (128, 128, 127), (255, 0, 64), (255, 255, -64)]
        trusted = all(_conv_probe(*c) and _linear_probe(*c) for c in safe)
        if not (trusted and _split_probe()):
            raise RuntimeError(
                f"torch's oneDNN int8 kernels on this CPU ({cpu_isa()}) are not exact even on "
                "operands within the int16 range; the native backend cannot be trusted here: "
                "use backend 'simulated'"
            )
    result = KernelProbe(conv_exact, linear_exact)
    log.info("int8 kernels on %s: %s", cpu_isa(), result.describe())
    return result


def _linear_exact(codes: torch.Tensor, zero_point: int, w: torch.Tensor) -> bool:
    ones, zeros = torch.ones(w.shape[0]), torch.zeros(w.shape[0], dtype=torch.long)
    out = linear(codes, 1.0, zero_point, pack_linear_weight(w), ones, zeros, None)
    exact = (codes.long() - zero_point) @ w.long().T
    return torch.equal(out.double(), exact.double())


def _linear_probe(code: int, zero_point: int, weight: int) -> bool:
    codes = torch.full((4, 64), code, dtype=ACT_DTYPE)
    return _linear_exact(codes, zero_point, torch.full((8, 64), weight, dtype=torch.int8))


def _conv_probe(code: int, zero_point: int, weight: int) -> bool:
    x = torch.full((1, 64, 4, 4), code, dtype=ACT_DTYPE).contiguous(
        memory_format=torch.channels_last
    )
    w = torch.full((8, 64, 3, 3), weight, dtype=torch.int8)
    ones, zeros = torch.ones(8), torch.zeros(8, dtype=torch.long)
    packed = pack_conv_weight(w, ones, [1, 1], [1, 1], [1, 1], 1)
    out = conv2d(x, 1.0, zero_point, packed, ones, zeros, None, [1, 1], [1, 1], [1, 1], 1)
    exact = torch.nn.functional.conv2d(x.double() - zero_point, w.double(), padding=1)
    return torch.equal(out.double(), exact)  # float64 holds these integer sums exactly


def _split_probe() -> bool:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (16, 64), dtype=ACT_DTYPE, generator=g)
    w = torch.randint(-128, 128, (8, 64), dtype=torch.int8, generator=g)
    for zero_point in (0, 128, 255, 77):
        halves = split_codes(codes, zero_point, -1)
        ones, zeros = torch.ones(8), torch.zeros(8, dtype=torch.long)
        packed = pack_linear_weight(repeat_input_channels(w))
        out = linear(halves, 1.0, split_offset(zero_point), packed, ones, zeros, None)
        if not torch.equal(out.double(), ((codes.long() - zero_point) @ w.long().T).double()):
            return False
    return True


# --- the kernels ----------------------------------------------------------------------------------


def quantize_activation(
    x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int
) -> torch.Tensor:
    """Float -> uint8 codes ``clamp(round(x / scale) + zero_point, qmin, qmax)``.

    Uses the fused ``quantize_per_tensor`` kernel (keeps channels-last) and reinterprets its
    quint8 storage as uint8 (``int_repr()`` would copy: 8 ms against 1 ms at CIFAR-10 sizes).
    A grid narrower than 8 bits is clamped on the uint8 codes, which is the same as clamping
    the unclamped codes, one byte per value instead of a float copy.
    """
    q = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)
    codes = torch.empty(0, dtype=ACT_DTYPE, device=q.device)
    codes = codes.set_(q.untyped_storage(), q.storage_offset(), q.size(), q.stride())
    if qmin > ACT_QMIN or qmax < ACT_QMAX:
        codes.clamp_(qmin, qmax)
    return codes


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
