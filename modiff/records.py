"""The pipeline's records, typed: what made a samples file, a variant's scores, a table row.

Each has one constructor and one JSON form (``to_json``/``from_json``); the stages write them,
the report and the tests read them. JSON key order is part of the form: equal records make
equal bytes, which both workflow tools compare.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def _ordered(record: Any, optional: tuple[str, ...]) -> dict[str, Any]:
    """A dataclass record as a dict in field order, without the ``optional`` fields left None."""
    data = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    return {k: v for k, v in data.items() if not (k in optional and v is None)}


@dataclass(frozen=True)
class SampleMeta:
    """What made a samples file (stored in it): variant, settings, where it ran, which images."""

    variant: str
    preset: str
    method: str  # fp32, qdiff or modiff
    quant: dict[str, Any] | None  # the QuantConfig that ran; None for FP32
    seed: int
    sampling: dict[str, Any]  # the preset's sampling settings but shards
    device: str
    threads: int
    indices: list[int]  # [first, stop) of the images held
    shards: int | None = None  # merged from this many shards
    shard: list[int] | None = None  # [i, of]: one shard's file
    kernels: Any = None  # CPU ISA and int8 schemes (a list when merged shards' CPUs differed)
    noise_sigma: float | None = None  # FP32 samples with noise added (the damage check)

    OPTIONAL = ("shards", "shard", "noise_sigma")

    def to_json(self) -> dict[str, Any]:
        return _ordered(self, self.OPTIONAL)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SampleMeta:
        fields = dataclasses.fields(cls)
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
        unknown, missing = set(data) - {f.name for f in fields}, required - set(data)
        if unknown or missing:
            raise ValueError(f"samples metadata with unknown keys {sorted(unknown)} and missing "
                             f"keys {sorted(missing)}: not written by `modiff sample`")  # fmt: skip
        return cls(**data)


@dataclass(frozen=True)
class FidRecord:
    """A variant's metrics file: FID/KID, PSNR against FP32, and what made the samples."""

    fid: float
    kid: float
    kid_std: float
    n_samples: int
    reference: str
    feature_extractor: str
    variant: str
    samples: str
    psnr_vs_fp32: float | None  # median per-image PSNR (dB); identical images count as 100
    psnr_vs_fp32_mean: float | None
    steps: int
    method: str
    backend: str
    device: str | None
    kernels: Any
    noise_sigma: float | None = None
    w_bits: int | None = None
    a_bits: int | None = None
    a_scale: str | None = None
    a_granularity: str | None = None
    reconstruction: str | None = None
    learn_act_scales: bool | None = None
    class_histogram: list[int] | None = None  # digits: the classifier's classes of the samples

    OPTIONAL = ("psnr_vs_fp32", "psnr_vs_fp32_mean", "noise_sigma", "w_bits", "a_bits",
                "a_scale", "a_granularity", "reconstruction", "learn_act_scales",
                "class_histogram")  # fmt: skip
    QUANT_KEYS = ("w_bits", "a_bits", "a_scale", "a_granularity", "reconstruction",
                  "learn_act_scales")  # fmt: skip

    @classmethod
    def from_scores(
        cls,
        scores: dict[str, Any],
        samples: str | Path,
        meta: SampleMeta,
        psnr_values: np.ndarray | None = None,
        class_histogram: list[int] | None = None,
    ) -> FidRecord:
        """The record of ``scores`` (:func:`modiff.metrics.compute_fid`) for the samples of
        ``meta``, with PSNR summarised from per-image ``psnr_values`` (None: FP32 itself)."""
        quant = meta.quant or {}
        psnr = {"psnr_vs_fp32": None, "psnr_vs_fp32_mean": None}
        if psnr_values is not None:
            capped = np.minimum(psnr_values, 100.0)
            psnr = {"psnr_vs_fp32": round(float(np.median(capped)), 3),
                    "psnr_vs_fp32_mean": round(float(np.mean(capped)), 3)}  # fmt: skip
        return cls(
            **scores, variant=meta.variant, samples=str(samples), **psnr,
            steps=meta.sampling["steps"], method=meta.method,
            backend=quant.get("backend", "fp32"), device=meta.device, kernels=meta.kernels,
            noise_sigma=meta.noise_sigma, **{k: quant.get(k) for k in cls.QUANT_KEYS},
            class_histogram=class_histogram,
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return _ordered(self, self.OPTIONAL)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FidRecord:
        return cls(**{"psnr_vs_fp32": None, "psnr_vs_fp32_mean": None, **data})


@dataclass(frozen=True)
class VariantRecord:
    """One row of results/metrics.json: a variant's quality and its speed on the preset model."""

    variant: str
    method: str
    a_scale: str | None  # None: FP32
    a_granularity: str | None
    w_bits: int  # 32 for FP32
    a_bits: int
    reconstruction: str | None
    learn_act_scales: bool | None
    backend: str
    device: str | None
    kernels: Any  # CPU ISA; native: exact or saturating, schemes
    n_samples: int
    steps: int
    fid: float
    kid: float
    psnr_vs_fp32: float | None
    step_ms: float | None  # per model call, at the benchmark's largest batch (bench_batch)
    speedup_vs_fp32: float | None
    bench_batch: int | None
    cache_mb_per_image: float | None

    @classmethod
    def from_metrics(cls, metrics: FidRecord, bench_rows: list[dict[str, Any]]) -> VariantRecord:
        """Quality from ``metrics``, speed from the benchmark's rows of the preset model."""
        quantized = metrics.variant != "fp32"
        timed = [
            r for r in bench_rows if r["model"] != "cifar10" and r["variant"] == metrics.variant
        ]
        speed = max(timed, key=lambda r: r["batch"]) if timed else {}
        return cls(
            variant=metrics.variant,
            method=metrics.method,
            a_scale=metrics.a_scale if quantized else None,
            a_granularity=(metrics.a_granularity or "per_tensor") if quantized else None,
            w_bits=metrics.w_bits or 32,
            a_bits=metrics.a_bits or 32,
            reconstruction=(metrics.reconstruction or "none") if quantized else None,
            learn_act_scales=bool(metrics.learn_act_scales) if quantized else None,
            backend=metrics.backend,
            device=metrics.device,
            kernels=metrics.kernels,
            n_samples=metrics.n_samples,
            steps=metrics.steps,
            fid=metrics.fid,
            kid=metrics.kid,
            psnr_vs_fp32=metrics.psnr_vs_fp32,
            step_ms=speed.get("step_ms"),
            speedup_vs_fp32=speed.get("speedup_vs_fp32"),
            bench_batch=speed.get("batch"),
            cache_mb_per_image=speed.get("cache_mb_per_image"),
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VariantRecord:
        return cls(**data)
