"""Paired per-step timing of the CIFAR-10 UNet (random weights): torch FP32, OpenVINO FP32 and
NNCF INT8 (default and with the attention matmuls in float) beside modiff variants given as
``backend:w_bits:a_bits:modulation``; ratios against torch FP32 and the fastest FP32 engine,
all in one run. Run it under ``ONEDNN_MAX_CPU_ISA=AVX2`` to time a CPU without VNNI.

    python scripts/paired_speed.py --batches 1 16 openvino:8:7:none openvino:8:7:compensated
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch

from modiff.bench import TIMING_CALIB_VALUES, timing_calibration
from modiff.config import load_params
from modiff.models import build_model
from modiff.peers import PeerVariant
from modiff.quant import QuantConfig, quantize_, reset_caches
from modiff.quant.layers import native_schemes

PEERS = ["openvino-fp32", "openvino-int8", "openvino-int8-same-layers"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="backend:w_bits:a_bits:modulation")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repetitions", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_params("params.yaml").preset_layout("cifar10")
    torch.manual_seed(0)
    fp32 = build_model(config).eval()
    calibration = timing_calibration(3, 32)
    models = {"fp32": fp32}
    workdir = tempfile.mkdtemp(prefix="modiff-paired-")
    for name in PEERS:
        models[name] = PeerVariant(name, workdir, args.threads, calibration)(copy.deepcopy(fp32))
    for spec in args.variants:
        backend, w_bits, a_bits, modulation = spec.split(":")
        quant = QuantConfig(backend=backend, w_bits=int(w_bits), a_bits=int(a_bits),
                            modulation=modulation,
                            calib_max_values=TIMING_CALIB_VALUES)  # fmt: skip
        models[spec] = quantize_(copy.deepcopy(fp32), quant, calibration)
    print(f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}, {args.threads} threads")
    for batch in args.batches:
        x = torch.randn(batch, 3, 32, 32)
        times: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            for _ in range(args.repetitions + 1):  # the first: compile and warm up
                for name, model in models.items():
                    reset_caches(model)
                    model(x, torch.full((batch,), 900.0))  # a trajectory's first call
                    steps = []
                    for i in range(3):
                        start = time.perf_counter()
                        model(x * (1 - 0.01 * i), torch.full((batch,), 890.0 - 10 * i))
                        steps.append(time.perf_counter() - start)
                    times[name].append(statistics.median(steps))
        median = {name: statistics.median(t[1:]) for name, t in times.items()}
        fastest = min(median["fp32"], median["openvino-fp32"])
        for name, model in models.items():
            ms = median[name] * 1e3
            print(f"batch {batch:3d} {name:28s} {native_schemes(model)} {ms:8.1f} ms"
                  f" {median['fp32'] / median[name]:5.2f}x torch FP32"
                  f" {fastest / median[name]:5.2f}x fastest FP32")  # fmt: skip


if __name__ == "__main__":
    main()
