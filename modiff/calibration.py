"""Time-step-aware calibration data (Q-Diffusion), with each sample's previous-step input (MoDiff).

FP32 DDIM sampling with the preset's sampler keeps the model input x_t at every
``steps // cali_st``-th step for ``cali_n`` trajectories, together with the input of the step
before it (x_prev, t_prev), which MoDiff's residual calibration needs. The file records what
made it (preset, checkpoint digest, seed, settings); a file made for another model or other
settings is refused by :func:`load_calibration`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from modiff.diffusion import (
    beta_schedule,
    ddim_sample,
    image_generators,
    initial_noise,
)
from modiff.io import atomic_output, load_tagged
from modiff.timesteps import timestep_sequence

if TYPE_CHECKING:
    from modiff.config import Params

log = logging.getLogger(__name__)

# Calibration trajectories use image indices far from those of evaluated samples.
CALIB_INDEX_OFFSET = 1 << 40
FORMAT = "modiff-calibration-v1"
CALIBRATION_KEYS = ("xs", "ts", "xs_prev", "ts_prev")


class CalibrationMismatch(ValueError):
    """The calibration file was made for another model, preset or settings."""


def kept_steps(steps: int, cali_st: int) -> list[int]:
    """Loop indices (0 = first sampling step) whose inputs are kept; each has a previous step."""
    if not 1 <= cali_st <= steps - 1:
        raise ValueError(f"cali_st must be between 1 and steps - 1 = {steps - 1}, got {cali_st}")
    every = steps // cali_st
    return [i for i in range(1, steps) if (i + 1) % every == 0][:cali_st]


class _KeepInputs:
    """``ddim_sample`` callback keeping the inputs of chosen steps and of the step before."""

    def __init__(self, keep: set[int]):
        self.keep = keep
        self.data: dict[str, list[torch.Tensor]] = {
            "xs": [],
            "ts": [],
            "xs_prev": [],
            "ts_prev": [],
        }
        self.previous: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, i: int, t: torch.Tensor, x: torch.Tensor) -> None:
        x, t = x.cpu(), t.cpu()
        if i in self.keep:
            for key, value in zip(self.data, (x, t, *self.previous), strict=True):
                self.data[key].append(value)
        self.previous = (x, t)


@torch.no_grad()
def collect_calibration(
    model: nn.Module,
    config: dict[str, Any],
    *,
    cali_st: int,
    cali_n: int,
    seed: int,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Run FP32 sampling and keep {xs, ts, xs_prev, ts_prev} (CPU float32 tensors)."""
    s, d = config["sampling"], config["diffusion"]
    seq = timestep_sequence(s["steps"], s["skip_type"], d["num_diffusion_timesteps"])
    keeper = _KeepInputs(set(kept_steps(len(seq), cali_st)))
    betas = beta_schedule(config)
    size = config["data"]["image_size"]
    shape = (config["model"]["in_channels"], size, size)
    model.eval()
    for start in tqdm(range(0, cali_n, batch_size), desc="calib-data"):
        stop = min(cali_n, start + batch_size)
        gens = image_generators(seed, range(CALIB_INDEX_OFFSET + start, CALIB_INDEX_OFFSET + stop))
        x_T = initial_noise(gens, shape).to(device)
        keeper.previous = None
        ddim_sample(model, x_T, seq, betas, eta=s["eta"], generator=gens, callback=keeper)
    return {k: torch.cat(v) for k, v in keeper.data.items()}


def calibration_meta(params: Params, checkpoint: str | Path) -> dict[str, Any]:
    """What a calibration file is made from: written into it, and demanded of it when loaded."""
    from modiff.fetch import file_digest

    preset = params.selected
    return {
        "preset": params.preset,
        "checkpoint_sha256": file_digest(checkpoint, "sha256"),
        "seed": params.seed,
        "sampling": preset.sampling.model_dump(include={"steps", "skip_type", "eta"}),
        "calibration": preset.calibration.model_dump(include={"cali_st", "cali_n"}),
    }


def save_calibration(data: dict[str, torch.Tensor], meta: dict[str, Any], dest: str | Path) -> None:
    with atomic_output(dest) as tmp, open(tmp, "wb") as fh:
        torch.save({"format": FORMAT, "meta": meta, **data}, fh)


def load_calibration(path: str | Path, expected: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Load a calibration file, refusing one whose metadata differs from ``expected``."""
    try:
        blob = load_tagged(path, FORMAT, "calibration data", "modiff calib-data")
    except ValueError as exc:
        raise CalibrationMismatch(str(exc)) from None
    meta = blob["meta"]
    diffs = [
        f"{k}: file has {meta.get(k)!r}, expected {v!r}"
        for k, v in expected.items()
        if meta.get(k) != v
    ]
    if diffs:
        raise CalibrationMismatch(
            f"{path} was made for another model or settings ({'; '.join(diffs)}); "
            "rerun `modiff calib-data`"
        )
    return {k: blob[k] for k in CALIBRATION_KEYS}
