"""How exact the native backend is on this CPU, against exact integer sums and the simulation.

1. Kernel level: conv 3x3, conv 1x1 (the linear kernel) and linear layers with unit scales on
   full-range 8-bit codes and weights (random, and every operand at its largest value): the
   largest |native - exact int32| over all of them.
2. Model level, on the trained digits model and inputs from its FP32 trajectories:
   rms(native - simulated) / rms(simulated - FP32) for static and dynamic W8A8 (a tiny ratio
   means native computes what the simulation does; above 1, native adds its own error).

``--direct`` runs every layer as one kernel call whatever the probe found (the behaviour before
the split scheme existed), to show what that costs where the kernels saturate. Run it with
``ONEDNN_MAX_CPU_ISA=AVX2`` to see a VNNI machine's saturating path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modiff.calibration import collect_calibration
from modiff.checkpoint import load_model
from modiff.config import load_params
from modiff.models import build_model
from modiff.quant import QuantConfig, kernels, quantize_
from modiff.quant.layers import LayerParams, QuantLayer, native_schemes
from modiff.runtime import configure_process

ROOT = Path(__file__).resolve().parents[1]


def kernel_errors() -> dict[str, float]:
    """Largest |native - exact| per layer kind over random and largest-value 8-bit operands."""
    templates = {"conv3x3": nn.Conv2d(64, 16, 3, padding=1, bias=False),
                 "conv1x1": nn.Conv2d(256, 16, 1, bias=False),
                 "linear": nn.Linear(256, 16, bias=False)}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    errors = {}
    for name, template in templates.items():
        shape = (4, 256) if name == "linear" else (4, template.in_channels, 6, 6)
        worst = 0.0
        for largest in (False, True):
            if largest:
                w = torch.full(template.weight.shape, 127, dtype=torch.int8)
                x = torch.full(shape, 127.0)
            else:
                w = torch.randint(-128, 128, template.weight.shape, dtype=torch.int8, generator=g)
                x = torch.randint(-128, 128, shape, generator=g).float()
            params = LayerParams(w, torch.ones(w.shape[0]), None, torch.tensor(1.0),
                                 torch.tensor(128))  # fmt: skip
            layer = QuantLayer(template, params, QuantConfig(backend="native"))
            if name != "linear":
                x = x.contiguous(memory_format=torch.channels_last)
                exact = F.conv2d(x.double(), w.double(), padding=template.padding)
            else:
                exact = F.linear(x.double(), w.double())
            with torch.no_grad():
                worst = max(worst, (layer(x).double() - exact).abs().max().item())
        errors[f"{name} ({layer.scheme})"] = worst
    return errors


def model_ratios() -> dict[str, float]:
    """rms(native - simulated) / rms(simulated - fp32) on the digits model, W8A8."""
    params = load_params(ROOT / "params.yaml")
    preset = params.preset_layout("digits")
    # the committed checkpoint (the preset's source), verified against params.yaml's digest
    state = load_model(preset, ROOT / "data/pretrained/digits_ddim.pt").state_dict()

    def model() -> nn.Module:
        m = build_model(preset).eval()
        m.load_state_dict(state)
        return m

    cal = collect_calibration(model(), preset, cali_st=5, cali_n=32, seed=0, batch_size=32)
    x, t = cal["xs"][::4], cal["ts"][::4]
    ratios = {}
    with torch.no_grad():
        ref = model()(x, t)
        for a_scale in ("static", "dynamic"):
            out = {}
            for backend in ("native", "simulated"):
                config = QuantConfig(a_scale=a_scale, backend=backend)
                q = quantize_(model(), config, cal if a_scale == "static" else None)
                out[backend] = q(x, t)
                if backend == "native":
                    schemes = native_schemes(q)
            quant_error = (out["simulated"] - ref).pow(2).mean().sqrt()
            native_error = (out["native"] - out["simulated"]).pow(2).mean().sqrt()
            ratios[f"{a_scale} W8A8 ({schemes})"] = (native_error / quant_error).item()
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--direct", action="store_true", help="never split (the old behaviour)")
    args = parser.parse_args()
    configure_process(load_params(ROOT / "params.yaml").threads)
    if args.direct:
        kernels.needs_split = lambda *_: False
    isa = kernels.isa_record()
    forced = " (forced direct)" if args.direct else ""
    print(f"CPU ISA {isa['cpu_isa']}, ONEDNN_MAX_CPU_ISA={isa['onednn_max_cpu_isa']}, int8 "
          f"kernels {kernels.probe().describe()}{forced}")  # fmt: skip
    print("\n| layer (scheme) | max abs(native - exact int32) |\n|---|---|")
    for name, err in kernel_errors().items():
        print(f"| {name} | {err:.0f} |")
    print("\n| digits model | rms(native - simulated) / rms(simulated - FP32) |\n|---|---|")
    for name, ratio in model_ratios().items():
        print(f"| {name} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
