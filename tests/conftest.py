import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"
# Unit tests run the fused MoDiff passes eagerly (compiling costs seconds per test process);
# tests/test_modulation.py checks the compiled ones against them, the pipeline test runs them.
os.environ.setdefault("MODIFF_COMPILE", "0")


def copy_project(dest: Path) -> Path:
    """The project's files as git sees them (tracked and untracked, not ignored) under ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


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
