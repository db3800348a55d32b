"""The DDIM/DDPM UNet ("simple" model type of ermongroup/ddim), rebuilt from its published facts.

Module names, registration order and numerics follow the original exactly so that the official
CIFAR-10 checkpoint loads with a strict ``load_state_dict`` and ``model(x, t)`` matches the
original outputs. Every detail that changes numbers is commented where it happens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding: all sines, then all cosines (concatenated, not interleaved)."""
    if t.dim() != 1:
        raise ValueError(f"t must be a 1-D tensor of time steps, got shape {tuple(t.shape)}")
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freq.to(t.device)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), as one fused kernel (within 1 ulp of the two-op form, 1.7x faster)."""
    return F.silu(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            # No padding in the conv: the original pads right/bottom only (asymmetric), below.
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    # Declared for quantization (modiff.quant.surgery): BRECQ-style block reconstruction learns
    # the block's layers together against its FP32 output.
    reconstruction_unit = True

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float):
        super().__init__()
        # Registration order fixes the state_dict order of the checkpoint.
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = h + self.temb_proj(swish(temb))[:, :, None, None]
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h  # no 1/sqrt(2) rescale


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with 1x1 conv projections."""

    reconstruction_unit = True  # as ResnetBlock's: one unit of block reconstruction

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)  # b, query, c
        k = k.reshape(b, c, hh * ww)  # b, c, key
        weights = torch.bmm(q, k) * (int(c) ** (-0.5))
        weights = torch.softmax(weights, dim=2)  # over key positions
        v = v.reshape(b, c, hh * ww)
        h = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class DDIMUNet(nn.Module):
    """The UNet of DDIM's ``configs/*.yml`` (model type ``simple``); ``forward(x, t) -> eps``."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_ch: int,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_resolutions: tuple[int, ...],
        dropout: float,
        resolution: int,
        resamp_with_conv: bool = True,
    ):
        super().__init__()
        self.ch = ch
        self.temb_ch = ch * 4
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList(
            [nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)]
        )
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        in_ch_mult = (1, *ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for level in range(self.num_resolutions):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[level]
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, self.temb_ch, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            down = nn.Module()
            down.block, down.attn = blocks, attns
            if level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, self.temb_ch, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, self.temb_ch, dropout)

        ups: list[nn.Module] = []
        for level in reversed(range(self.num_resolutions)):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[level]
            skip_in = ch * ch_mult[level]
            for i_block in range(num_res_blocks + 1):
                if i_block == num_res_blocks:
                    skip_in = ch * in_ch_mult[level]
                block = ResnetBlock(block_in + skip_in, block_out, self.temb_ch, dropout)
                # The block's input is cat([h, skip]) and its shortcut, a 1x1 conv, sees it as it
                # is: declared (modiff.quant.surgery) so that a quantizer may treat the two parts
                # separately, as their ranges differ widely. (conv1 sees it normalised, as one.)
                if hasattr(block, "nin_shortcut"):
                    block.nin_shortcut.input_split = block_in
                blocks.append(block)
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = blocks, attns
            if level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            ups.insert(0, up)  # up.i is level i
        self.up = nn.ModuleList(ups)

        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            raise ValueError(
                f"input is {tuple(x.shape[2:])} pixels, this model expects "
                f"{self.resolution}x{self.resolution}"
            )
        temb = timestep_embedding(t, self.ch)
        temb = self.temb.dense[1](swish(self.temb.dense[0](temb)))

        hs = [self.conv_in(x)]
        for level in range(self.num_resolutions):
            down = self.down[level]
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](hs[-1], temb)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
                hs.append(h)
            if level != self.num_resolutions - 1:
                hs.append(down.downsample(hs[-1]))

        h = hs[-1]
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, temb)), temb)

        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](torch.cat([h, hs.pop()], dim=1), temb)  # running first
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if level != 0:
                h = up.upsample(h)

        return self.conv_out(swish(self.norm_out(h)))
