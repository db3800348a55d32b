"""Pipeline results: merging sample shards, the damage check, results/metrics.json and its plot."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from modiff.io import atomic_output, load_images
from modiff.records import FidRecord, SampleMeta, VariantRecord

# Metadata that may differ between the shards of one variant. Shards sampled on other CPUs
# (cluster nodes) record other ISAs: the native kernels are exact on each, so they merge.
_PER_SHARD = ("indices", "shard", "kernels")


def merge_shards(paths: list[str | Path]) -> tuple[np.ndarray, SampleMeta]:
    """Concatenate sample shards in index order; they must tile 0..N and share settings."""
    loaded = sorted((load_images(p) + (str(p),) for p in paths), key=lambda t: t[1]["indices"][0])
    expected_start = 0
    first_meta = loaded[0][1]
    for images, meta, path in loaded:
        start, stop = meta["indices"]
        if start != expected_start or len(images) != stop - start:
            raise ValueError(
                f"{path} holds images {start}..{stop}, expected to start at {expected_start}: "
                "shards must tile the index range (was a shard made with other sampling settings?)"
            )
        other = {k: v for k, v in meta.items() if k not in _PER_SHARD}
        if other != {k: v for k, v in first_meta.items() if k not in _PER_SHARD}:
            raise ValueError(f"{path} was sampled with other settings than {loaded[0][2]}")
        expected_start = stop
    kernels = []
    for _, shard_meta, _ in loaded:
        if shard_meta.get("kernels") not in kernels:
            kernels.append(shard_meta.get("kernels"))
    shared = {k: v for k, v in first_meta.items() if k not in _PER_SHARD}
    meta = SampleMeta.from_json({**shared, "indices": [0, expected_start]})
    meta = dataclasses.replace(meta, shards=len(loaded),
                               kernels=kernels[0] if len(kernels) == 1 else kernels)  # fmt: skip
    return np.concatenate([images for images, _, _ in loaded]), meta


def add_noise(images: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """uint8 images plus Gaussian noise of std ``sigma`` on the [-1, 1] scale, re-quantized."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(images).float() / 127.5 - 1.0
    x = x + sigma * torch.randn(x.shape, generator=g)
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def gather(metric_files: list[str | Path], bench_file: str | Path) -> list[VariantRecord]:
    """All variants' records: FP32 first, then in the order given."""
    rows = json.loads(Path(bench_file).read_text())["rows"]
    records = [
        VariantRecord.from_metrics(FidRecord.from_json(json.loads(Path(f).read_text())), rows)
        for f in metric_files
    ]
    return sorted(records, key=lambda r: r.variant != "fp32")


def summary(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The headline numbers by variant (results/summary.json, for ``dvc metrics``)."""
    keys = ("fid", "kid", "psnr_vs_fp32", "step_ms", "speedup_vs_fp32")
    return {r["variant"]: {k: r[k] for k in keys} for r in records}


def plot_points(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The FID-against-bits plot's data (for ``dvc plots``)."""
    keys = ("variant", "method", "a_scale", "a_granularity", "w_bits", "a_bits", "fid")
    return [{k: r[k] for k in keys} for r in records]


def plot_fid_vs_bits(records: list[dict[str, Any]], dest: str | Path) -> None:
    """FID against activation bits, one line per method, scales and recipe (8-bit weights)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    lines: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r["method"] != "fp32" and r["w_bits"] == 8:
            label = re.sub(r"-w\d+a\d+", "", r["variant"])  # the name without its bits
            lines.setdefault(label, []).append((r["a_bits"], r["fid"]))
    for label, points in sorted(lines.items()):
        bits, fids = zip(*sorted(points), strict=True)
        ax.plot(bits, fids, marker="o", label=label)
    fp32 = [r["fid"] for r in records if r["method"] == "fp32"]
    if fp32:
        ax.axhline(fp32[0], color="black", linestyle="--", linewidth=1, label="FP32")
    n = {r["n_samples"] for r in records}
    ax.set(xlabel="activation bits (weights 8-bit)", ylabel="FID (lower is better)",
           title=f"FID vs activation bits (N = {', '.join(map(str, sorted(n)))})")  # fmt: skip
    all_fids = [f for pts in lines.values() for _, f in pts] + fp32
    if all_fids and max(all_fids) > 10 * min(all_fids):
        ax.set_yscale("log")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(dest) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
