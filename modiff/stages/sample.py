"""Sample images with DDIM; saves uint8 images (N, H, W, C) and what made them as .npz."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from modiff.checkpoint import load_model
from modiff.choices import Backend
from modiff.config import Params
from modiff.diffusion import sample_images
from modiff.io import save_images
from modiff.quant.api import load_quantized, read_quant_params
from modiff.quant.config import QuantConfig
from modiff.quant.layers import kernel_record
from modiff.records import SampleMeta
from modiff.runtime import configure_process, resolve_execution

log = logging.getLogger(__name__)


def run(
    params: Params,
    *,
    variant: str,
    ckpt: Path,
    qparams: Path,
    samples: Path,
    shard: int | None = None,
    backend: Backend | None = None,
) -> None:
    """``shard``: sample only shard I of sampling.shards (whole batches); ``backend``: run the
    quantized model on another backend than the file's."""
    sampling = params.selected.sampling
    indices = sampling.shard_range(shard) if shard is not None else range(sampling.n_samples)
    configure_process(params.threads)
    saved = read_quant_params(qparams)  # read and checked first: a bad file fails before the model
    config = None if saved["config"] is None else QuantConfig.from_dict(saved["config"])
    made_for = saved.get("meta", {}).get("variant")
    if made_for != variant:
        raise ValueError(f"{qparams} holds variant {made_for}, not --variant {variant}: "
                         f"pass the file `modiff calibrate --variant {variant}` wrote")  # fmt: skip
    if config is not None:
        backend = backend or config.backend
    execution = resolve_execution(params.device, backend if config else None)
    preset = params.preset_layout()
    model = load_model(preset, ckpt, execution.device)
    model, qconfig = load_quantized(model.cpu(), qparams, backend=execution.backend)
    model = model.to(execution.device)
    log.info("sampling %s: images %d..%d", variant, indices.start, indices.stop)
    started = time.perf_counter()
    images = sample_images(
        model, preset, indices=indices, batch_size=sampling.batch_size, steps=sampling.steps,
        skip_type=sampling.skip_type, eta=sampling.eta, seed=params.seed, device=execution.device,
    )  # fmt: skip
    meta = SampleMeta(
        variant=variant,
        preset=params.preset,
        method="fp32" if qconfig is None else qconfig.method,
        quant=None if qconfig is None else qconfig.to_dict(),
        seed=params.seed,
        sampling=sampling.model_dump(mode="json", exclude={"shards"}),
        device=str(execution.device),
        threads=params.threads,
        indices=[indices.start, indices.stop],
        shard=None if shard is None else [shard, sampling.shards],
        kernels=kernel_record(model),  # CPU ISA; native: exact or saturating, schemes
    )  # no run time: equal images make an equal file (DVC and Snakemake compare checksums)
    save_images(samples, images, **meta.to_json())
    log.info("wrote %d images to %s in %.1f s", len(images), samples,
             time.perf_counter() - started)  # fmt: skip
