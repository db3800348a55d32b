"""Training of the digits preset's DDIM UNet (DDPM's eps-prediction loss, EMA weights).

Seeded and deterministic on the CPU for a fixed thread count; the committed checkpoint under
``data/pretrained/`` was made by ``modiff train`` with the settings in params.yaml.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from modiff.checkpoint import save_state_dict
from modiff.data import digits_images, uint8_to_model_space
from modiff.diffusion import alpha_bar, beta_schedule
from modiff.models import build_model

log = logging.getLogger(__name__)


def train_diffusion(
    config: dict[str, Any], out: str | Path | None = None, *, progress: bool = True
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train ``config``'s model on its dataset; return the EMA model and a summary.

    Loss: ||eps - model(sqrt(a) x0 + sqrt(1-a) eps, t)||^2 with t uniform over all diffusion
    steps, as in DDPM.
    """
    if config["data"]["dataset"] != "digits":
        raise ValueError(
            f"modiff train only trains the digits preset; '{config['data']['dataset']}' uses a "
            "published checkpoint (see presets.*.checkpoint)"
        )
    tcfg = config["training"]
    torch.manual_seed(int(tcfg["seed"]))
    data = uint8_to_model_space(digits_images())
    model = build_model(config)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ema_rate = float(config["model"].get("ema_rate", 0.999))
    betas = beta_schedule(config)
    n_steps = betas.numel()
    opt = torch.optim.Adam(model.parameters(), lr=float(tcfg["lr"]))
    warmup = int(tcfg.get("warmup", 0))
    iterations, batch_size = int(tcfg["iterations"]), int(tcfg["batch_size"])
    grad_clip = float(tcfg.get("grad_clip", 1.0))

    start = time.perf_counter()
    model.train()
    bar = tqdm(range(iterations), desc="train", disable=not progress)
    running = None
    for it in bar:
        x0 = data[torch.randint(0, data.shape[0], (batch_size,))]
        t = torch.randint(0, n_steps, (batch_size,))
        eps = torch.randn_like(x0)
        a = alpha_bar(betas, t)
        loss = (eps - model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t.float())).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        for group in opt.param_groups:
            group["lr"] = float(tcfg["lr"]) * min(1.0, (it + 1) / max(1, warmup))
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - ema_rate)
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        if it % 100 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
    seconds = time.perf_counter() - start
    summary = {
        "iterations": iterations,
        "final_loss_ema": running,
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in ema.parameters()),
    }
    log.info("trained %d iterations in %.0f s, loss %.4f", iterations, seconds, running)
    if out is not None:
        save_state_dict(ema, out)
    return ema, summary


def train_preset(
    params: Any, out: Path, summary: Path | None = None, *, classifier: bool = False
) -> None:
    """``modiff train``: the selected preset's diffusion model (its ``training`` settings), or
    with ``classifier`` the digits classifier FID uses; writes ``out`` and a JSON ``summary``."""
    import json

    from modiff.fetch import file_digest
    from modiff.io import write_json
    from modiff.runtime import configure_process

    if classifier:
        from modiff.classifier import train_classifier

        _, result = train_classifier(seed=params.seed, out=Path(out))
    else:
        preset = params.preset_layout()
        if "training" not in preset:
            raise ValueError(f"preset {params.preset} has no 'training' section: nothing to train")
        configure_process(params.threads)
        _, result = train_diffusion(preset, out)
        result["sha256"] = file_digest(out, "sha256")
        log.info("set presets.%s.checkpoint.sha256 to %s", params.preset, result["sha256"])
    if summary:
        write_json(result, summary)
    print(json.dumps(result, indent=2, default=str))
