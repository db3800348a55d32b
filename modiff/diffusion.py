"""DDIM sampling ("generalized steps" of ermongroup/ddim), noise schedules and data transforms.

Reproducibility contract: image ``i`` of a run with seed ``s`` draws its x_T (and, with eta > 0,
its per-step noise) from its own generator seeded by ``(s, i)``, always on the CPU. The same image
therefore comes out whatever the batch size, shard or device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from modiff.state import reset_caches
from modiff.timesteps import timestep_sequence

log = logging.getLogger(__name__)


def beta_schedule(config: dict[str, Any]) -> torch.Tensor:
    """Betas of ``config['diffusion']`` as float32 (computed in float64 as DDIM does)."""
    diffusion = config["diffusion"]
    kind = diffusion["beta_schedule"]
    start, end = float(diffusion["beta_start"]), float(diffusion["beta_end"])
    n = int(diffusion["num_diffusion_timesteps"])
    if kind == "linear":
        betas = np.linspace(start, end, n, dtype=np.float64)
    elif kind == "quad":
        betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    elif kind == "const":
        betas = end * np.ones(n, dtype=np.float64)
    elif kind == "jsd":
        betas = 1.0 / np.linspace(n, 1, n, dtype=np.float64)
    elif kind == "sigmoid":
        betas = 1 / (np.exp(-np.linspace(-6, 6, n)) + 1) * (end - start) + start
    else:
        raise ValueError(
            f"diffusion.beta_schedule '{kind}' is unknown; use linear, quad, const, jsd or sigmoid"
        )
    return torch.from_numpy(betas).float()


def alpha_bar(betas: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """prod_{i<=t}(1 - beta_i) as a float32 cumprod with a 0 prepended, so alpha_bar(-1) = 1."""
    padded = torch.cat([torch.zeros(1, device=betas.device, dtype=betas.dtype), betas])
    return (1 - padded).cumprod(dim=0).index_select(0, t.long() + 1).view(-1, 1, 1, 1)


StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def ddim_sample(
    model: nn.Module,
    x_T: torch.Tensor,
    seq: Sequence[int],
    betas: torch.Tensor,
    eta: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    *,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run DDIM generalized steps from ``x_T``; returns the final x (before the inverse transform).

    ``generator`` feeds the eta > 0 step noise: one generator for the batch, or one per image
    (the per-image streams that make sampling independent of batching). Noise is drawn on the
    CPU and moved to ``x_T``'s device. ``callback(i, t, x)`` sees each model input (used to
    collect calibration data). Every module of ``model`` that keeps state across steps (e.g. the
    modulation caches of quantized layers) is reset first (:mod:`modiff.state`).
    """
    reset_caches(model)  # a new batch of trajectories: state from the last one must go
    device = x_T.device
    betas = betas.to(device)
    n = x_T.shape[0]
    seq_next = [-1, *list(seq[:-1])]
    x = x_T
    pairs = list(zip(reversed(seq), reversed(seq_next), strict=True))
    for i, (t_now, t_next) in enumerate(
        tqdm(pairs, desc="ddim", leave=False, disable=not progress)
    ):
        t = torch.full((n,), float(t_now), device=device)
        a = alpha_bar(betas, torch.full((n,), t_now, device=device))
        a_next = alpha_bar(betas, torch.full((n,), t_next, device=device))
        if callback is not None:
            callback(i, t, x)
        eps = model(x, t)
        x0 = (x - eps * (1 - a).sqrt()) / a.sqrt()
        c1 = eta * ((1 - a / a_next) * (1 - a_next) / (1 - a)).sqrt()
        c2 = ((1 - a_next) - c1**2).sqrt()
        if eta > 0:  # same summation order as DDIM: sqrt(a_next) x0 + c1 z + c2 eps
            x = a_next.sqrt() * x0 + c1 * _noise_like(x, generator) + c2 * eps
        else:
            x = a_next.sqrt() * x0 + c2 * eps
    return x


def _noise_like(x: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None):
    if generator is None or isinstance(generator, torch.Generator):
        noise = torch.randn(x.shape, generator=generator)
    else:
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]} images")
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator])
    return noise.to(device=x.device, dtype=x.dtype)


def image_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image index, seeded from (seed, index) via numpy's SeedSequence."""
    gens = []
    for i in indices:
        state = np.random.SeedSequence([int(seed), int(i)]).generate_state(1, dtype=np.uint64)[0]
        gens.append(torch.Generator().manual_seed(int(state)))
    return gens


def initial_noise(
    generators: Sequence[torch.Generator], shape: tuple[int, int, int]
) -> torch.Tensor:
    """x_T for each image from its own generator (advances the generators)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def data_transform(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> model space [-1, 1]."""
    return 2 * images - 1


def inverse_data_transform(x: torch.Tensor) -> torch.Tensor:
    """Model space -> images in [0, 1], clamped."""
    return torch.clamp((x + 1) / 2, 0.0, 1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model-space batch (N, C, H, W) -> uint8 images (N, H, W, C), rounded as torchvision saves."""
    images = inverse_data_transform(x.float().cpu())
    return images.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def sample_images(
    model: nn.Module,
    config: dict[str, Any],
    *,
    indices: Sequence[int],
    batch_size: int,
    steps: int,
    skip_type: str,
    eta: float,
    seed: int,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """Sample the images with the given global indices in batches; uint8 (N, H, W, C).

    Batches are consecutive runs of ``indices``; callers that need bit-exact sharding with
    batch-dependent quantization pass whole, globally aligned batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    betas = beta_schedule(config)
    seq = timestep_sequence(steps, skip_type, int(config["diffusion"]["num_diffusion_timesteps"]))
    shape = (
        int(config["model"]["in_channels"]),
        int(config["data"]["image_size"]),
        int(config["data"]["image_size"]),
    )
    indices = list(indices)
    out = []
    model.eval()
    bar = tqdm(total=len(indices), desc="sampling", unit="img", disable=not progress)
    for start in range(0, len(indices), batch_size):
        batch = indices[start : start + batch_size]
        gens = image_generators(seed, batch)
        x_T = initial_noise(gens, shape).to(device)
        x = ddim_sample(model, x_T, seq, betas, eta=eta, generator=gens)
        out.append(to_uint8(x))
        bar.update(len(batch))
    bar.close()
    return np.concatenate(out) if out else np.zeros((0, shape[1], shape[2], shape[0]), np.uint8)
