"""FID and KID of a samples file against the preset's reference set, and PSNR against FP32."""

from __future__ import annotations

from pathlib import Path

from modiff.config import Params
from modiff.io import load_images, write_json
from modiff.metrics import FID_CACHE, compute_fid, psnr
from modiff.records import FidRecord, SampleMeta
from modiff.runtime import resolve_execution


def run(
    params: Params, *, samples: Path, reference: Path, metrics: Path, fid_cache: Path = FID_CACHE
) -> None:
    """``reference``: FP32's samples from the same x_T (PSNR); ``fid_cache``: reference
    statistics, computed once per preset and checked when read."""
    images, meta = load_images(samples)
    reference_images, reference_meta = load_images(reference)  # checked before the features
    meta, reference_meta = SampleMeta.from_json(meta), SampleMeta.from_json(reference_meta)
    if (reference_meta.indices, reference_meta.seed) != (meta.indices, meta.seed):
        raise ValueError(f"{reference} holds other images (indices/seed) than {samples}: "
                         "PSNR compares samples from the same x_T")  # fmt: skip
    fid = params.selected.fid
    scores = compute_fid(images, preset=params.preset, fid_config=fid.model_dump(),
                         cache_dir=fid_cache,
                         device=resolve_execution(params.device).device.type)  # fmt: skip
    psnr_values = psnr(images, reference_images) if reference_meta.variant != meta.variant else None
    histogram = None
    if fid.feature_extractor == "digits-classifier":
        from modiff.classifier import class_histogram, load_classifier

        histogram = class_histogram(load_classifier(fid.classifier), images)
    record = FidRecord.from_scores(scores, samples, meta, psnr_values, histogram)
    write_json(record.to_json(), metrics)
