"""Model construction from DDIM-style configs (sections ``data``, ``model``, ``diffusion``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from modiff.models.unet import DDIMUNet

__all__ = ["DDIMUNet", "build_model"]


def _require(config: dict[str, Any], section: str, key: str) -> Any:
    try:
        return config[section][key]
    except (KeyError, TypeError):
        raise KeyError(
            f"model config is missing '{section}.{key}' (DDIM config layout: sections "
            f"'data' and 'model', e.g. DDIM's configs/cifar10.yml)"
        ) from None


def build_model(config: dict[str, Any]) -> nn.Module:
    """Build the DDIM UNet described by ``config`` (DDIM's YAML layout). ``model(x, t)`` -> eps."""
    model_type = config.get("model", {}).get("type", "simple")
    if model_type != "simple":
        raise ValueError(f"model.type '{model_type}' is not supported; only 'simple' (DDIM's UNet)")
    return DDIMUNet(
        in_channels=int(_require(config, "model", "in_channels")),
        out_ch=int(_require(config, "model", "out_ch")),
        ch=int(_require(config, "model", "ch")),
        ch_mult=tuple(int(m) for m in _require(config, "model", "ch_mult")),
        num_res_blocks=int(_require(config, "model", "num_res_blocks")),
        attn_resolutions=tuple(int(r) for r in _require(config, "model", "attn_resolutions")),
        dropout=float(config["model"].get("dropout", 0.0)),
        resolution=int(_require(config, "data", "image_size")),
        resamp_with_conv=bool(config["model"].get("resamp_with_conv", True)),
    )
