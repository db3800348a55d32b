from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"


@pytest.fixture(autouse=True)
def _fixed_threads():
    torch.set_num_threads(2)


def tiny_config(**model_overrides) -> dict:
    """A small config of the DDIM UNet family (fast on the CPU)."""
    model = {
        "type": "simple",
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [4],
        "dropout": 0.0,
        "resamp_with_conv": True,
    }
    model.update(model_overrides)
    return {
        "data": {"image_size": 8, "channels": model["in_channels"]},
        "model": model,
        "diffusion": {
            "beta_schedule": "linear",
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "num_diffusion_timesteps": 1000,
        },
    }
