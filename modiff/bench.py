"""Speed and memory benchmark: per-step latency of DDIM sampling, ratios against FP32 in one run.

Protocol: every variant is timed inside real DDIM trajectories; each repetition runs one short
trajectory per variant back to back (paired, so machine noise hits all variants alike) and
records the median time of the model calls after the first. The reported latency is the median
over repetitions; the speedup is the median of the per-repetition ratios against FP32. Peak
memory is measured in a fresh process per case (peak RSS growth while sampling). FP32 runs
eagerly in inference mode, channels-last when that is faster on this machine (a compiled FP32
UNet was 2-4% faster still here; see the README).
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import platform
import queue as queue_mod
import resource
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modiff.diffusion import beta_schedule, ddim_sample, timestep_sequence
from modiff.quant import kernels
from modiff.quant.layers import cache_bytes, native_schemes
from modiff.runtime import release_freed_memory

log = logging.getLogger(__name__)

VariantBuilder = Callable[[nn.Module], nn.Module]


@dataclass
class BenchCase:
    """One model to time: a preset config and where its weights come from."""

    name: str
    config: dict[str, Any]
    weights: str  # "checkpoint" or "random (timing only)"
    state_dict: dict[str, torch.Tensor] | None = None


@dataclass
class BenchSettings:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    repetitions: int = 5
    steps: int = 6  # model calls per trajectory; the first is excluded from the median
    threads: int = 2
    memory: bool = True


class _CallTimer(nn.Module):
    """Wraps a model and records the wall time of each call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.times: list[float] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.model(x, t)
        self.times.append(time.perf_counter() - start)
        return out


def _fp32(model: nn.Module) -> nn.Module:
    return model


def _fp32_channels_last(model: nn.Module) -> nn.Module:
    return _ChannelsLast(model.to(memory_format=torch.channels_last))


class _ChannelsLast(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last), t)


def _build(case: BenchCase) -> nn.Module:
    from modiff.models import build_model

    torch.manual_seed(0)
    model = build_model(case.config).eval()
    if case.state_dict is not None:
        model.load_state_dict(case.state_dict)
    return model


def _trajectory_step_time(model: nn.Module, case: BenchCase, batch: int, steps: int) -> float:
    cfg = case.config
    shape = (
        batch,
        cfg["model"]["in_channels"],
        cfg["data"]["image_size"],
        cfg["data"]["image_size"],
    )
    seq = timestep_sequence(steps, "uniform", cfg["diffusion"]["num_diffusion_timesteps"])
    timer = _CallTimer(model)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ddim_sample(timer, x_T, seq, beta_schedule(cfg))
    return statistics.median(timer.times[1:])


def time_variants(
    case: BenchCase, variants: dict[str, VariantBuilder], settings: BenchSettings
) -> list[dict[str, Any]]:
    """Paired per-step latency of each variant at each batch size; 'fp32' must be among them."""
    torch.set_num_threads(settings.threads)
    # Compiled graphs of earlier cases (other shapes, bit-widths) would only add guard checks.
    torch._dynamo.reset()
    fp32_best = _pick_fp32_layout(case, settings)
    variants = {"fp32": fp32_best, **{k: v for k, v in variants.items() if k != "fp32"}}
    models = {name: build(_build(case)) for name, build in variants.items()}
    rows = []
    for batch in settings.batch_sizes:
        times: dict[str, list[float]] = {name: [] for name in models}
        for model in models.values():  # warm-up: allocator, kernels, packed weights
            _trajectory_step_time(model, case, batch, 2)
        for _ in range(settings.repetitions):
            for name, model in models.items():
                times[name].append(_trajectory_step_time(model, case, batch, settings.steps))
        for name in models:
            ratios = [f / v for f, v in zip(times["fp32"], times[name], strict=True)]
            _trajectory_step_time(models[name], case, batch, 2)  # caches as sampling leaves them
            median_s = statistics.median(times[name])
            rows.append(
                {
                    "model": case.name,
                    "weights": case.weights,
                    "variant": name,
                    "batch": batch,
                    "step_ms": round(median_s * 1e3, 3),
                    "step_ms_all": [round(t * 1e3, 3) for t in times[name]],
                    "images_per_s": round(batch / median_s, 2),
                    "speedup_vs_fp32": round(statistics.median(ratios), 3),
                    "cache_mb_per_image": round(cache_bytes(models[name]) / batch / 2**20, 2),
                    "schemes": native_schemes(models[name]),  # native layer parts per scheme
                    "fp32_layout": fp32_best.__name__.removeprefix("_"),
                }
            )
    if settings.memory:
        for row in rows:
            row.update(peak_memory(case, variants[row["variant"]], row["batch"], settings))
    return rows


def _pick_fp32_layout(case: BenchCase, settings: BenchSettings) -> VariantBuilder:
    """FP32 in its faster eager layout on this machine: NCHW or channels-last."""
    batch = max(settings.batch_sizes)
    best, best_t = _fp32, float("inf")
    for build in (_fp32, _fp32_channels_last):
        model = build(_build(case))
        _trajectory_step_time(model, case, batch, 2)
        t = min(_trajectory_step_time(model, case, batch, 3) for _ in range(2))
        if t < best_t:
            best, best_t = build, t
    return best


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _peak_memory_child(case, build, batch, settings, queue) -> None:
    torch.set_num_threads(settings.threads)
    model = build(_build(case))
    _trajectory_step_time(model, case, 1, 2)  # load kernels and libraries before the baseline
    gc.collect()
    release_freed_memory()  # memory freed while building is not sampling's: honest baseline
    base = peak = _rss_bytes()
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.wait(0.001):
            peak = max(peak, _rss_bytes())

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _trajectory_step_time(model, case, batch, 3)
    done.set()
    poller.join()
    peak = max(peak, _rss_bytes())
    params = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    queue.put({"sampling_bytes": peak - base, "param_bytes": params, "peak_rss_bytes": peak})


def peak_memory(
    case: BenchCase, build: VariantBuilder, batch: int, settings: BenchSettings
) -> dict[str, float]:
    """Peak memory of a fresh process sampling with this variant, in MB.

    ``peak_rss_mb`` is the whole process (interpreter and libraries included);
    ``sampling_mem_mb`` is the peak growth of resident memory while sampling (activations,
    caches), polled every millisecond, over the process after the model was built;
    ``param_mb`` is the model's parameters and buffers.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory_child, args=(case, build, batch, settings, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except queue_mod.Empty:
            if not proc.is_alive():
                raise RuntimeError(
                    f"memory probe process died (exit code {proc.exitcode})"
                ) from None
    proc.join()
    return {
        "peak_rss_mb": round(result["peak_rss_bytes"] / 2**20, 1),
        "sampling_mem_mb": round(result["sampling_bytes"] / 2**20, 1),
        "param_mb": round(result["param_bytes"] / 2**20, 2),
    }


def environment() -> dict[str, Any]:
    """What the numbers depend on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(
                line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    int8 = kernels.probe().describe() if kernels.available() else "none"
    return {
        "torch": torch.__version__,
        "cpu": cpu,
        **kernels.isa_record(),
        "int8_kernels": int8,
        "threads": torch.get_num_threads(),
        "quantized_engine": torch.backends.quantized.engine,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| model | weights | variant | int8 scheme | batch | ms/step | img/s | x FP32 "
        "| sampling MB | peak RSS MB | cache MB/img |"
    )
    lines = [header, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['weights']} | {r['variant']} | {format_schemes(r.get('schemes'))}"
            f" | {r['batch']} | {r['step_ms']:.2f} | {r['images_per_s']:.1f}"
            f" | {r['speedup_vs_fp32']:.2f} | {r.get('sampling_mem_mb', '-')}"
            f" | {r.get('peak_rss_mb', '-')} | {r.get('cache_mb_per_image', '-')} |"
        )
    return "\n".join(lines)


def format_schemes(schemes: dict[str, int] | None) -> str:
    """Native layer parts per kernel scheme, e.g. ``split 67, direct 58``; ``-`` for none."""
    if not schemes:
        return "-"
    return ", ".join(f"{name} {count}" for name, count in sorted(schemes.items(), reverse=True))


class QuantizedVariant:
    """A benchmark variant: the model quantized by ``config`` (picklable for the memory probe).

    Static scales are calibrated on a few random model inputs: their values do not change
    the speed, only the accuracy, which the pipeline measures separately.
    """

    def __init__(self, config: Any, channels_last: bool = True):
        self.config = config
        self.channels_last = channels_last
        self.__name__ = "quantized"

    def __call__(self, model: nn.Module) -> nn.Module:
        from modiff.quant import quantize_

        calibration = None
        if self.config.a_scale == "static":
            g = torch.Generator().manual_seed(0)
            res, ch = model.resolution, model.in_channels
            xs = torch.randn(8, ch, res, res, generator=g)
            ts = torch.randint(0, 990, (8,), generator=g).float()
            calibration = {"xs": xs, "ts": ts, "xs_prev": 1.01 * xs, "ts_prev": ts + 10}
        model = quantize_(model, self.config, calibration)
        if self.channels_last:
            return _ChannelsLast(model.to(memory_format=torch.channels_last))
        return model
