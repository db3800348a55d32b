"""Quantized conv/linear layers: native (integer kernels) or simulated (fake quantization).

A layer's quantization state is explicit tensors handed to its constructor: int8 weight codes,
per-output-channel weight scales and zero points (the codes' grid), the float bias, and, for
static activations, the activation scale and zero point. Derived forms (the packed weight for
the kernels, the dequantised weight for simulation, the static scale as a number) are built from
them in the constructor and again after every ``load_state_dict``, so they cannot go stale.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modiff.quant import fused, kernels
from modiff.quant.config import QuantConfig
from modiff.quant.quantizer import (
    act_grid,
    asymmetric_params,
    fake_quantize,
    symmetric_scale,
)

# The state protocol lives in modiff.state (the sampler uses it without importing quant); its
# functions stay importable from here, where callers (modiff.bench, scripts) look for them.
from modiff.state import cache_bytes as cache_bytes
from modiff.state import reset_caches as reset_caches


@dataclass
class LayerParams:
    """The saved quantization state of one layer (or one half of a split layer)."""

    weight_codes: torch.Tensor  # int8, the layer's weight shape
    weight_scale: torch.Tensor  # float32 (out_channels,)
    bias: torch.Tensor | None  # float32 (out_channels,)
    act_scale: torch.Tensor | None  # float32 () for static activations, else None
    act_zero_point: torch.Tensor | None  # int64 ()
    # int64 (out_channels,): the weight grid is codes -z .. 2^b - 1 - z (None: the symmetric one)
    weight_zero_point: torch.Tensor | None = None


class QuantLayer(nn.Module):
    """A Conv2d or Linear with quantized weights and inputs."""

    def __init__(self, template: nn.Conv2d | nn.Linear, params: LayerParams, config: QuantConfig):
        super().__init__()
        self.is_conv = isinstance(template, nn.Conv2d)
        self.config = config
        self.a_qmin, self.a_qmax = act_grid(config.a_bits, config.a_symmetric)
        if self.is_conv:
            self.stride = list(template.stride)
            self.padding = list(template.padding)
            self.dilation = list(template.dilation)
            self.groups = template.groups
            if template.padding_mode != "zeros" or isinstance(template.padding, str):
                raise ValueError("only zero-padded convs with explicit padding are supported")
        self.register_buffer("weight_codes", params.weight_codes.to(torch.int8))
        self.register_buffer("weight_scale", params.weight_scale.float())
        w_zp = params.weight_zero_point
        if w_zp is None:  # symmetric: -2^(b-1) .. 2^(b-1) - 1
            w_zp = torch.full_like(self.weight_scale, 2 ** (config.w_bits - 1), dtype=torch.long)
        self.register_buffer("weight_zero_point", w_zp.long())  # the grid; the kernels take q - z
        self.register_buffer("bias", None if params.bias is None else params.bias.float())
        static = config.a_scale == "static"
        if static and params.act_scale is None:
            raise ValueError("static activations need an act_scale (calibrate first)")
        self.register_buffer("act_scale", params.act_scale.float() if static else None)
        self.register_buffer("act_zero_point", params.act_zero_point.long() if static else None)
        # A 1x1 conv with stride 1 is a linear over the channels of a channels-last tensor. The
        # linear kernel adds into an accumulator in place; the conv kernel's in-place sum returns
        # a full copy of it besides (an extra pass per call for MoDiff's output cache).
        self.pointwise = self.is_conv and (
            tuple(template.kernel_size) == (1, 1) and self.stride == [1, 1]
            and self.padding == [0, 0] and self.groups == 1
        )  # fmt: skip
        # Codes go to the kernels shifted by a_qmin, on 0..a_qmax - a_qmin: a 7-bit grid then
        # lies in 0..127, where even the saturating int8 kernels are exact (kernels module).
        self.code_shift = self.a_qmin
        self.code_max = self.a_qmax - self.a_qmin
        self.channel_dim = 1 if self.is_conv else -1
        self.scheme = None  # native only: "direct" or "split" (kernels module)
        self._derive()
        self.reset_cache()

    def _derive(self) -> None:
        """Build what is derived from the saved weight codes and scales: the native kernels'
        packed weight and scheme, and the dequantised weight (simulation, MoDiff's warm-up).

        Runs at construction and after every ``load_state_dict``, so it follows the saved state.
        """
        if self.config.backend == "native":
            self._init_native()
        # Static scale and zero point as Python numbers, bound once rather than read per call.
        static = self.act_scale is not None
        self._static = (float(self.act_scale), int(self.act_zero_point)) if static else None
        if self.config.backend == "simulated" or self.config.modulation != "none":
            w_shape = (-1,) + (1,) * (self.weight_codes.dim() - 1)
            w_float = self.weight_codes.float() * self.weight_scale.reshape(w_shape)
            # Not saved; a buffer so that .to(device) moves it with the layer.
            self.register_buffer("_w_float", w_float, persistent=False)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._derive()

    def _init_native(self) -> None:
        if not kernels.available():
            raise RuntimeError(
                "backend 'native' needs torch's oneDNN int8 CPU kernels, not in this build; "
                "use backend 'simulated'"
            )
        kind = "conv" if self.is_conv and not self.pointwise else "linear"
        w = self.weight_codes
        split = kernels.needs_split(kind, self.code_max, int(w.min()), int(w.max()))
        self.scheme = "split" if split else "direct"
        if split:
            if self.is_conv and self.groups != 1:
                raise ValueError(
                    "a grouped conv with 8-bit weights and activations has no exact native scheme "
                    f"on this CPU ({kernels.cpu_isa()}, no VNNI): use w_bits <= 7, a_bits <= 7 "
                    "or backend 'simulated'"
                )
            w = kernels.repeat_input_channels(w)
        self._w_zero_point = torch.zeros(self.weight_scale.numel(), dtype=torch.long)
        if kind == "conv":
            self._packed = kernels.pack_conv_weight(
                w, self.weight_scale, self.stride, self.padding, self.dilation, self.groups
            )
        else:
            self._packed = kernels.pack_linear_weight(w.flatten(1))

    # -- activations ------------------------------------------------------------------------

    def act_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point for input ``x``: static, or computed from ``x`` now."""
        if self.act_scale is not None:
            return self.act_scale, self.act_zero_point
        if self.config.a_granularity == "per_sample":
            dims = tuple(range(1, x.dim()))
            return self._params_for_range(x.amin(dim=dims), x.amax(dim=dims))
        return self._params_for_range(*torch.aminmax(x))

    def _params_for_range(self, lo: torch.Tensor, hi: torch.Tensor):
        if self.config.a_symmetric:
            scale = symmetric_scale(torch.maximum(-lo, hi), self.a_qmin, self.a_qmax)
            return scale, torch.full_like(scale, 128, dtype=torch.long)
        scale, zp = asymmetric_params(lo, hi, self.a_qmin, self.a_qmax)
        return scale, zp.long()

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.modulation != "none":
            return self._forward_modulated(x)
        return self.quantized_op(x, self.bias)

    def quantized_op(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This layer applied to Q(x), plus ``bias``."""
        scale, zp = self.act_params(x)
        shape = (-1,) + (1,) * (x.dim() - 1)
        if self.config.backend == "simulated":
            xq = fake_quantize(x, scale.reshape(shape), zp.reshape(shape).float(), self.a_qmin,
                               self.a_qmax)  # fmt: skip
            return self.float_op(xq, bias)
        self._check_native(x)
        if scale.dim() == 0:
            scale_f, zp_f = self._static or (float(scale), int(zp))
            zp_k = zp_f - self.code_shift
            codes = kernels.quantize_activation(x, scale_f, zp_k, 0, self.code_max)
            return self._int_op(codes, scale_f, zp_k, bias)
        # One scale per sample: quantize each sample by its own scale, run the kernel with a
        # unit input scale, rescale each sample's output, then add the bias once.
        zp_k = 128 - self.code_shift
        codes = kernels.quantize_activation(
            x * (1.0 / scale.reshape(shape)), 1.0, zp_k, 0, self.code_max
        )
        out = self._int_op(codes, 1.0, zp_k, None) * scale.reshape(shape)
        return out if bias is None else out + self._bias_view(bias, x)

    def _check_native(self, x: torch.Tensor) -> None:
        if x.device.type != "cpu":
            raise RuntimeError("backend 'native' runs on the CPU; use 'simulated' on CUDA")

    def float_op(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer in float with the dequantised weights (simulation and MoDiff's warm-up)."""
        if self.is_conv:
            return F.conv2d(
                x, self._w_float, bias, self.stride, self.padding, self.dilation, self.groups
            )
        return F.linear(x, self._w_float, bias)

    def _kernel_operand(self, codes: torch.Tensor, zp: int) -> tuple[torch.Tensor, int]:
        """Codes and zero point as this layer's scheme hands them to the kernel."""
        if self.scheme == "split":
            return kernels.split_codes(codes, zp, self.channel_dim), kernels.split_offset(zp)
        return codes, zp

    def _int_op(self, codes: torch.Tensor, scale: float, zp: int, bias) -> torch.Tensor:
        """This layer on uint8 ``codes`` (shifted grid, zero point ``zp``), float32 out."""
        shape = codes.shape
        codes, zp = self._kernel_operand(codes, zp)
        if self.is_conv and not self.pointwise:
            return kernels.conv2d(
                codes, scale, zp, self._packed, self.weight_scale, self._w_zero_point, bias,
                self.stride, self.padding, self.dilation, self.groups,
            )  # fmt: skip
        out = kernels.linear(
            _rows(codes, self.channel_dim), scale, zp, self._packed, self.weight_scale,
            self._w_zero_point, bias,
        )  # fmt: skip
        if self.pointwise:  # rows are (n, h, w): back to an (N, C, H, W) channels-last view
            n, _, h, w = shape
            return out.view(n, h, w, -1).permute(0, 3, 1, 2)
        return out.reshape(*shape[:-1], -1)

    def _int_op_accumulate_(self, codes: torch.Tensor, scale: float, zp: int, accum) -> None:
        """``accum += A(codes)`` in place; ``accum`` in the kernels' layout (channels-last)."""
        codes, zp = self._kernel_operand(codes, zp)
        if self.is_conv and not self.pointwise:
            kernels.conv2d_accumulate_(
                codes, scale, zp, self._packed, self.weight_scale, self._w_zero_point,
                self.stride, self.padding, self.dilation, self.groups, accum,
            )  # fmt: skip
        else:
            kernels.linear_accumulate_(
                _rows(codes, self.channel_dim), scale, zp, self._packed, self.weight_scale,
                self._w_zero_point, _rows(accum, self.channel_dim, in_place=True),
            )  # fmt: skip

    # -- MoDiff modulation -------------------------------------------------------------------

    def reset_cache(self) -> None:
        """Forget the trajectory: the next call is a warm-up step (modulated layers only: a
        plain INT8 layer carries no modulation state)."""
        if self.config.modulation == "none":
            return
        self.a_hat = None  # input accumulator (reconstructed input)
        self.o_hat = None  # output cache: the layer applied to a_hat, bias included once
        self.a_prev = None  # true previous input (uncompensated mode only)
        self._handed, self._handed_version = None, 0  # o_hat as last returned (see _hand_out)

    def _forward_modulated(self, x: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        if self.config.backend == "native":  # before any cache changes: a refused call keeps them
            self._check_native(x)
        if self.a_hat is None:
            self._warm_up(x, into)
        else:
            self._check_cache(x)
            self._claim_output_cache()
            self._modulated_step(x, into)
        return self._hand_out() if into is None else into

    # The output cache is handed to the caller without a copy, as a view (its own Python object
    # sharing the cache's memory and version counter). Contract: the caller reads it, and may
    # keep it; it never modifies it in place. At the next step the layer checks the version
    # counter (a change is an error, not a silently corrupted cache) and, if the view is still
    # alive, updates a copy instead of the memory the caller holds. (Tensors made under
    # torch.inference_mode() keep no version counter: there only the second half applies. A
    # caller that keeps only a further view of the output, not the output, must clone it.)

    def _hand_out(self) -> torch.Tensor:
        out = self.o_hat.view_as(self.o_hat)
        self._handed, self._handed_version = weakref.ref(out), _version(out)
        return out

    def _claim_output_cache(self) -> None:
        if self._handed is None:
            return
        if _version(self.o_hat) != self._handed_version:
            raise RuntimeError(
                "the output of a modulated (MoDiff) layer was modified in place after it was "
                "returned (e.g. by ReLU(inplace=True) or +=); it is the layer's output cache: "
                "clone it before modifying it"
            )
        if self._handed() is not None:  # the caller kept last step's output: leave it intact
            self.o_hat = self.o_hat.clone()
        self._handed = None

    def partner_added_into_output(self, out: torch.Tensor) -> None:
        """The other half of a split layer added its part into this layer's handed-out cache
        (``out``): an update of the cache by its owners, not by a caller."""
        self._handed_version = _version(out)

    def accumulate_(self, x: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        """Add this modulated layer's output for ``x`` into another layer's output cache.

        For layers whose outputs are summed (the halves of a split input): they share one
        output cache, since only the sum is ever used. This layer keeps its input caches only.
        """
        return self._forward_modulated(x, into)

    def _warm_up(self, x: torch.Tensor, into: torch.Tensor | None) -> None:
        mode, _, repeats = self.config.warmup.partition(":")
        if mode == "fp":  # full precision: a_hat = a_T exactly, o_hat = A(a_T) + b
            self.a_hat = x.clone()
        else:  # quantized (once) or repeat:k (a_T fed k times), from empty caches
            self.a_hat = torch.zeros_like(x)
        out = self.float_op(self.a_hat, self.bias)
        if into is not None:
            into.add_(out)
        elif self.is_conv and self.config.backend == "native":  # the kernels' accumulator layout
            self.o_hat = out.contiguous(memory_format=torch.channels_last)
        else:
            self.o_hat = out
        if mode != "fp":
            for _ in range(int(repeats) if mode == "repeat" else 1):
                self._modulated_step(x, into)
        self.a_prev = x.clone() if self.config.modulation == "uncompensated" else None

    def _modulated_step(self, x: torch.Tensor, into: torch.Tensor | None) -> None:
        """d = Q(x - base); a_hat += d; o_hat (or ``into``) += A(d). base: a_hat or a_prev."""
        per_sample = self.config.a_granularity == "per_sample"
        base = self.a_prev if self.a_prev is not None else self.a_hat
        if self.act_scale is not None:
            scale, zp = self.act_scale, self.act_zero_point
        else:
            scale, zp = self._params_for_range(*fused.residual_range(x, base, per_sample))
        shape = (-1,) + (1,) * (x.dim() - 1) if per_sample else ()
        zp = zp - self.code_shift  # codes on the shifted grid 0..code_max, as the kernels take
        scale_b, zp_b = scale.reshape(shape), zp.reshape(shape).to(x.dtype)
        codes = fused.residual_codes_(x, base, self.a_hat, scale_b, zp_b, 0, self.code_max)
        if self.config.modulation == "uncompensated":
            self.a_prev = x.clone()
        if self.config.backend == "simulated":
            dq = (codes.to(x.dtype) - zp_b) * scale_b
            if into is not None:
                into.add_(self.float_op(dq, None))
            else:
                self.o_hat = self.o_hat + self.float_op(dq, None)
            return
        accum = self.o_hat if into is None else into
        if per_sample:  # unit input scale, then each sample's output times its scale
            accum.add_(self._int_op(codes, 1.0, 128 - self.code_shift, None) * scale_b)
        elif self._static:
            scale_f, zp_f = self._static
            self._int_op_accumulate_(codes, scale_f, zp_f - self.code_shift, accum)
        else:
            self._int_op_accumulate_(codes, float(scale), int(zp), accum)

    def _check_cache(self, x: torch.Tensor) -> None:
        cached = self.a_hat
        if x.shape != cached.shape or x.device != cached.device or x.dtype != cached.dtype:
            raise RuntimeError(
                f"modulation caches hold a batch of {tuple(cached.shape)} {cached.dtype} on "
                f"{cached.device}, "
                f"got {tuple(x.shape)} {x.dtype} on {x.device}; call "
                "modiff.quant.reset_caches(model) before a new batch of trajectories"
            )

    def _bias_view(self, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return bias.reshape((1, -1) + (1,) * (x.dim() - 2)) if self.is_conv else bias

    def cache_bytes(self) -> int:
        """Memory held by this layer's modulation caches."""
        if self.config.modulation == "none":
            return 0
        tensors = (self.a_hat, self.o_hat, self.a_prev)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def extra_repr(self) -> str:
        config = self.config
        kind = "conv" if self.is_conv else "linear"
        modulation = "" if config.modulation == "none" else f", modulation {config.modulation}"
        backend = config.backend if self.scheme is None else f"{config.backend} ({self.scheme})"
        bits = f"W{config.w_bits}A{config.a_bits}"
        return f"{kind}, {bits}, {config.a_scale} activations, {backend}{modulation}"


def _rows(t: torch.Tensor, channel_dim: int, in_place: bool = False) -> torch.Tensor:
    """A linear's 2-D operand: rows of the channels at ``channel_dim`` (for a channels-last
    (N, C, H, W) conv tensor, (N*H*W, C) as a view). ``in_place``: must be a view (an error
    rather than a silent copy)."""
    if channel_dim != -1:
        t = t.movedim(channel_dim, -1)
    return t.view(-1, t.shape[-1]) if in_place else t.reshape(-1, t.shape[-1])


def _version(t: torch.Tensor) -> int | None:
    """``t``'s version counter (bumped by every in-place change); None for inference tensors."""
    return None if t.is_inference() else t._version


class SplitInputLayer(nn.Module):
    """A layer whose input is two parts joined along channels, each part quantized on its own.

    Runs one quantized layer per part on its input channels and sums the outputs (the bias
    belongs to the first part only), exactly ``layer(x)`` without quantization.
    """

    def __init__(self, parts: list[QuantLayer], split: int):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.split = split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head, tail = x[:, : self.split], x[:, self.split :]
        first, second = self.parts
        if first.config.modulation != "none":  # one output cache for both halves (their sum)
            out = second.accumulate_(tail, first(head))
            first.partner_added_into_output(out)
            return out
        return first(head) + second(tail)


def native_schemes(model: nn.Module) -> dict[str, int]:
    """How many integer layer parts of ``model`` (native or openvino) run each scheme ("direct",
    "split")."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLayer) and m.scheme is not None:
            counts[m.scheme] = counts.get(m.scheme, 0) + 1
        for scheme, n in getattr(m, "engine_schemes", {}).items():  # backend openvino
            counts[scheme] = counts.get(scheme, 0) + n
    return dict(sorted(counts.items()))


def kernel_record(model: nn.Module) -> dict:
    """What ran ``model``, for its records: the CPU's ISA (and oneDNN's cap on it); where layers
    run the native kernels, also whether those are exact or saturating here and how many layer
    parts run each scheme."""
    record: dict = kernels.isa_record()
    engines = [m for m in model.modules() if callable(getattr(m, "engine_record", None))]
    for engine in engines:  # a compiled engine (backend openvino) describes itself
        record.update(engine.engine_record())
    schemes = native_schemes(model)
    if schemes and not engines:  # (no oneDNN probe for a model the engine runs)
        record.update(int8_kernels=kernels.probe().describe(), schemes=schemes)
    return record
