"""Model surgery shared by :mod:`modiff.quant.api` and :mod:`modiff.quant.reconstruction`, and the
protocol by which a model declares the parts of it that quantization treats specially.

Quantization knows no model. A model declares, on its own modules:

- ``input_split`` (an int attribute on a Conv2d): the layer's input is two parts joined along
  channels, and the second part starts at this channel. With
  ``QuantConfig.split_shortcut`` the two parts are quantized separately (their ranges can differ
  widely), the layer running as a :class:`~modiff.quant.layers.SplitInputLayer`.
- ``reconstruction_unit = True`` (a class or instance attribute on any module): with
  ``reconstruction="block"`` the module is reconstructed as one unit, BRECQ-style (its quantized
  layers learned together against its FP32 output).

A module without the attribute is an ordinary layer (or not a unit).
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SPLIT = "input_split"
RECONSTRUCTION_UNIT = "reconstruction_unit"


def declared_input_split(layer: nn.Module) -> int | None:
    """The channel at which the model declares ``layer``'s input splits in two, if it does."""
    return getattr(layer, INPUT_SPLIT, None)


def is_reconstruction_unit(module: nn.Module) -> bool:
    """Whether the model declares ``module`` a block reconstructed as one unit."""
    return bool(getattr(module, RECONSTRUCTION_UNIT, False))


def split_by_input(layer: nn.Module, split: int | None) -> list[nn.Module]:
    """``[layer]``, or for a split input (``split`` channels, then the rest) its two halves as
    Conv2d layers of their own, whose outputs sum to the layer's: the bias goes to the first."""
    if split is None:
        return [layer]
    halves = []
    for index, channels in enumerate((slice(0, split), slice(split, None))):
        with_bias = index == 0 and layer.bias is not None
        half = nn.Conv2d(
            layer.weight[:, channels].shape[1], layer.out_channels, layer.kernel_size,
            layer.stride, layer.padding, layer.dilation, layer.groups, bias=with_bias,
        )  # fmt: skip
        with torch.no_grad():
            half.weight.copy_(layer.weight[:, channels])
            if with_bias:
                half.bias.copy_(layer.bias)
        halves.append(half)
    return halves


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of ``model``'s submodule called ``name`` (a dotted path)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
