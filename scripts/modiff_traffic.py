"""How close MoDiff can get to plain INT8 on this machine: the memory-traffic floor.

MoDiff's native path does the arithmetic plain INT8 does, plus memory traffic: per layer and
step it reads and writes the input accumulator ``a_hat`` (8 bytes per input element more than
quantizing the input) and reads the output cache ``o_hat`` in the kernel's epilogue (4 bytes per
output element); torch 2.14's in-place conv sum also returns a copy of ``o_hat`` (8 more bytes
per 3x3-conv output element). This script counts those bytes on the CIFAR-10 UNet, measures
this machine's streaming bandwidth, times FP32, plain INT8 and MoDiff in one paired run, and
prints the fastest MoDiff could be if it added nothing but that traffic.

    python scripts/modiff_traffic.py --batch 16
"""

from __future__ import annotations

import argparse
import time

import torch

from modiff.bench import BenchCase, BenchSettings, bench_variants, time_variants
from modiff.config import load_params
from modiff.models import build_model
from modiff.quant.layers import QuantLayer, reset_caches
from modiff.runtime import configure_process

PLAIN, MODIFF = "qdiff-static-w8a8@native", "modiff-static-w8a8@native"


def extra_bytes_per_image(config: dict) -> tuple[float, float]:
    """(bytes MoDiff moves per image and step beyond plain INT8, bytes of the conv's copies)."""
    model = bench_variants([MODIFF])[MODIFF](build_model(config).eval())
    with torch.inference_mode():  # one warm-up call at batch 1 fills every cache
        reset_caches(model)
        size = config["data"]["image_size"]
        model(torch.randn(1, config["model"]["in_channels"], size, size), torch.full((1,), 900.0))
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    inputs = sum(m.a_hat.numel() for m in layers)
    outputs = [m for m in layers if m.o_hat is not None]  # split halves share one o_hat
    conv3x3 = sum(m.o_hat.numel() for m in outputs if m.is_conv and not m.pointwise)
    traffic = 8 * inputs + 4 * sum(m.o_hat.numel() for m in outputs)
    return traffic, 8 * conv3x3


def streaming_bandwidth(mib: int = 256, repeats: int = 10) -> float:
    """Bytes per second of ``c = a + b`` over tensors far larger than the caches."""
    n = mib * 2**20 // 4
    a, b, c = (torch.randn(n) for _ in range(3))
    torch.add(a, b, out=c)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.add(a, b, out=c)
    return 12 * n * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    params = load_params("params.yaml")  # its thread count, as the pipeline's benchmark uses
    configure_process(params.threads)
    config = params.preset_layout("cifar10")

    traffic, copies = extra_bytes_per_image(config)
    bandwidth = streaming_bandwidth()
    settings = BenchSettings(batch_sizes=(args.batch,), repetitions=args.repetitions, steps=4,
                             threads=params.threads, memory=False)  # fmt: skip
    case = BenchCase("cifar10", config, "random (timing only)")
    rows = {r["variant"]: r for r in time_variants(case, bench_variants([PLAIN, MODIFF]), settings)}
    plain_ms, modiff_ms = rows[PLAIN]["step_ms"], rows[MODIFF]["step_ms"]
    floor_ms = plain_ms + args.batch * traffic / bandwidth * 1e3
    with_copies_ms = floor_ms + args.batch * copies / bandwidth * 1e3

    ratio = {"measured": modiff_ms, "traffic floor": floor_ms, "floor with copies": with_copies_ms}
    print(f"extra traffic per image and step: {traffic / 1e6:.1f} MB "
          f"(+{copies / 1e6:.1f} MB of the conv sum's returned copies)")  # fmt: skip
    print(f"streaming bandwidth: {bandwidth / 1e9:.1f} GB/s")
    print(f"batch {args.batch}, ms/step: FP32 {rows['fp32']['step_ms']:.1f}, "
          f"plain INT8 {plain_ms:.1f}, MoDiff {modiff_ms:.1f}")  # fmt: skip
    print("MoDiff / plain INT8: " + ", ".join(f"{k} {v / plain_ms:.3f}" for k, v in ratio.items()))


if __name__ == "__main__":
    main()
