"""DDIM's time-step subsequences (plain Python: settings validation uses them without torch)."""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

SkipType = Literal["uniform", "quad"]
SKIP_TYPES: tuple[str, ...] = get_args(SkipType)


def timestep_sequence(steps: int, skip_type: str, num_diffusion_timesteps: int = 1000) -> list[int]:
    """DDIM's time-step subsequence; ``quad`` keeps its duplicate leading zeros on purpose."""
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if skip_type == "uniform":
        skip = num_diffusion_timesteps // steps
        if skip == 0:
            raise ValueError(
                f"uniform skip with {steps} steps over {num_diffusion_timesteps} diffusion steps "
                f"yields no sequence; use at most {num_diffusion_timesteps} steps"
            )
        return list(range(0, num_diffusion_timesteps, skip))
    if skip_type == "quad":
        seq = np.linspace(0, np.sqrt(num_diffusion_timesteps * 0.8), steps) ** 2
        return [int(s) for s in seq]
    raise ValueError(f"skip_type '{skip_type}' is unknown; use one of {SKIP_TYPES}")
