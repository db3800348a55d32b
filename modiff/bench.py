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

import dataclasses
import gc
import logging
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from modiff.diffusion import beta_schedule, ddim_sample
from modiff.quant import kernels
from modiff.quant.layers import cache_bytes, native_schemes
from modiff.runtime import in_fresh_process, release_freed_memory
from modiff.timesteps import timestep_sequence

if TYPE_CHECKING:
    from modiff.config import Bench, Params

log = logging.getLogger(__name__)
ACCURACY_INPUTS = 256  # calibration inputs for the INT8 accuracy check (each method, same ones)
# Added on CPUs whose 8-bit OpenVINO kernels saturate: the exact one-call 7-bit form.
SEVEN_BIT_OPENVINO = "qdiff-static-w8a7@openvino"
TIMING_CALIB_VALUES = 1 << 12  # values per layer input for the scale search of timing variants

VariantBuilder = Callable[[nn.Module], nn.Module]


@dataclass
class BenchCase:
    """One model to time: a preset config and where its weights come from."""

    name: str
    config: dict[str, Any]
    weights: str  # "checkpoint" or "random (timing only)"
    state_dict: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class BenchSettings:
    """How one case is timed (from params.yaml's ``bench`` section and ``threads``)."""

    batch_sizes: tuple[int, ...]
    repetitions: int
    steps: int  # model calls per trajectory; the first is excluded from the median
    threads: int
    memory: bool = True  # peak memory of each variant, in a fresh process


def timing_calibration(in_channels: int, image_size: int, n: int = 8) -> dict[str, torch.Tensor]:
    """Random model inputs for static scales and peers' INT8 calibration where only speed is
    measured (their values change the accuracy, not the speed)."""
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(n, in_channels, image_size, image_size, generator=g)
    ts = torch.randint(0, 990, (n,), generator=g).float()
    return {"xs": xs, "ts": ts, "xs_prev": 1.01 * xs, "ts_prev": ts + 10}


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
        for name in models:  # caches as the last trajectory left them: as sampling does
            ratios = [f / v for f, v in zip(times["fp32"], times[name], strict=True)]
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
    for batch in settings.batch_sizes:  # against the fastest FP32 engine (torch's or a peer's)
        at_batch = [r for r in rows if r["batch"] == batch]
        fastest = min(r["step_ms"] for r in at_batch if _is_fp32(r["variant"]))
        for row in at_batch:
            row["speedup_vs_fastest_fp32"] = round(fastest / row["step_ms"], 3)
    if settings.memory:  # a fresh process per variant, at the largest batch size
        for row in rows:  # (other engines' FP32: their INT8 is the comparison that matters)
            peer_fp32 = row["variant"] != "fp32" and row["variant"].endswith("-fp32")
            if row["batch"] == max(settings.batch_sizes) and not peer_fp32:
                row.update(peak_memory(case, variants[row["variant"]], row["batch"], settings))
    return rows


def _is_fp32(variant: str) -> bool:
    return variant == "fp32" or variant.endswith("-fp32")


def _pick_fp32_layout(case: BenchCase, settings: BenchSettings) -> VariantBuilder:
    """FP32 in its faster eager layout on this machine: NCHW or channels-last."""
    batch = max(settings.batch_sizes)
    best, best_t = _fp32, float("inf")
    for build in (_fp32, _fp32_channels_last):  # the layouts differ by about 2x, or not at all
        model = build(_build(case))
        _trajectory_step_time(model, case, batch, 2)
        t = _trajectory_step_time(model, case, batch, 2)
        if t < best_t:
            best, best_t = build, t
    return best


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _peak_memory_child(case, build, batch, settings) -> dict[str, int]:
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
    _trajectory_step_time(model, case, batch, 2)  # MoDiff's caches are full from the first call
    done.set()
    poller.join()
    peak = max(peak, _rss_bytes())
    params = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {"sampling_bytes": peak - base, "param_bytes": params, "peak_rss_bytes": peak}


def peak_memory(
    case: BenchCase, build: VariantBuilder, batch: int, settings: BenchSettings
) -> dict[str, float]:
    """Peak memory of a fresh process sampling with this variant, in MB.

    ``peak_rss_mb`` is the whole process (interpreter and libraries included);
    ``sampling_mem_mb`` is the peak growth of resident memory while sampling (activations,
    caches), polled every millisecond, over the process after the model was built;
    ``param_mb`` is the model's parameters and buffers.
    """
    try:
        result = in_fresh_process(_peak_memory_child, case, build, batch, settings)
    except RuntimeError as err:
        raise RuntimeError(f"memory probe failed: {err}") from None
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


class QuantizedVariant:
    """A benchmark variant: the model quantized by ``config`` (picklable for the memory probe).

    Static scales are calibrated on ``calibration`` (default: :func:`timing_calibration`).
    With ``cache_dir`` the parameters are saved there once and loaded (checked against the
    model's weights) by later builds, such as the memory probe's fresh processes.
    """

    def __init__(
        self,
        config: Any,
        calibration: dict | None = None,
        channels_last: bool = True,
        cache_dir: str | None = None,
    ):
        self.config = config
        self.calibration = calibration
        self.channels_last = channels_last
        self.cache_dir = cache_dir
        self.__name__ = "quantized"

    def __call__(self, model: nn.Module) -> nn.Module:
        import hashlib
        import json
        from pathlib import Path

        from modiff.quant import quantize_
        from modiff.quant.api import load_quantized, save_quant_params

        key = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        cached = Path(self.cache_dir) / f"{key.hexdigest()[:16]}.pt" if self.cache_dir else None
        if cached is not None and cached.is_file():
            model, _ = load_quantized(model, cached)
        else:
            config, calibration = self.config, None
            if config.a_scale == "static" and self.calibration is not None:
                calibration = self.calibration
            elif config.a_scale == "static":  # timing only: a small scale search will do
                calibration = timing_calibration(model.in_channels, model.resolution)
                config = dataclasses.replace(config, calib_max_values=TIMING_CALIB_VALUES)
            model = quantize_(model, config, calibration)
            if cached is not None:
                save_quant_params(model, self.config, cached)
        if self.channels_last and not callable(getattr(model, "engine_record", None)):
            return _ChannelsLast(model.to(memory_format=torch.channels_last))
        return model  # (a compiled engine takes its input as it is)


# --- the benchmark of the pipeline ---------------------------------------------------------------


def bench_variants(
    names: list[str], calibration: dict | None = None, cache_dir: str | None = None
) -> dict[str, VariantBuilder]:
    """Benchmark variants by name, ``<grid variant name>@<backend>`` (e.g.
    ``modiff-static-w8a8@openvino``), as params.yaml's ``bench.variants`` names them."""
    from modiff.config import BenchVariant, QuantSettings
    from modiff.quant import QuantConfig

    variants: dict[str, VariantBuilder] = {}
    for name in names:
        timed = BenchVariant.from_name(name)
        quant = QuantSettings(backend=timed.backend, warmup=QuantConfig().warmup)  # the default
        config = QuantConfig.from_variant(timed.variant, quant)
        variants[name] = QuantizedVariant(config, calibration, cache_dir=cache_dir)
    return variants


def grid_variants(params: Params, cache_dir: str | None = None) -> dict[str, VariantBuilder]:
    """Benchmark variants for params.yaml's variant grid, by the grid's names."""
    from modiff.quant import QuantConfig

    # Timing only: learned rounding and step sizes change the values, not the work, so the
    # benchmark does not spend minutes relearning them.
    timed = {"reconstruction": "none", "learn_act_scales": False}
    return {
        name: QuantizedVariant(
            dataclasses.replace(QuantConfig.from_variant(v, params.quant), **timed),
            cache_dir=cache_dir,
        )
        for name, v in params.quantized_variants.items()
    }


def peer_variants(
    engines: list[str], workdir: str, threads: int, calibration: dict, int8_only: bool = False
) -> dict[str, VariantBuilder]:
    """The available engines' variants (``modiff.peers``), by their row names."""
    from modiff.peers import ENGINES, PeerVariant, unavailable

    skipped = unavailable(engines)
    return {
        name: PeerVariant(name, workdir, threads, calibration)
        for engine in engines
        if engine not in skipped
        for name in ENGINES[engine]
        if "-int8" in name or not int8_only
    }


def run(params: Params, checkpoint: Path, calibration: dict | None = None) -> dict[str, Any]:
    """params.yaml's benchmark: the variant grid on the preset model (largest batch size), the
    ``bench.variants`` and peers on CIFAR-10's UNet, and the INT8 accuracy of each against FP32
    on the preset model's ``calibration`` inputs (what ``modiff calib-data`` writes; without
    them, collected here). ``checkpoint``: the preset's (random weights when absent)."""
    import tempfile

    from modiff.checkpoint import load_state_dict
    from modiff.fetch import verified_checkpoint
    from modiff.peers import unavailable

    bench = params.bench
    settings = BenchSettings(batch_sizes=bench.batch_sizes, repetitions=bench.repetitions,
                             steps=bench.steps, threads=params.threads)  # fmt: skip
    preset = params.preset_layout()
    has_weights = Path(checkpoint).is_file()
    state = load_state_dict(verified_checkpoint(checkpoint, preset)) if has_weights else None
    preset_case = BenchCase(params.preset, preset, "checkpoint" if state else "random", state)
    skipped = unavailable(list(bench.peers))
    for engine, reason in skipped.items():
        log.warning("peer %s skipped: %s", engine, reason)
    rows, accuracy = [], []
    with tempfile.TemporaryDirectory(prefix="modiff-peers-") as workdir:
        if params.preset != "cifar10":  # speed only: a small model's memory says little
            largest = (max(bench.batch_sizes),)
            grid = dataclasses.replace(settings, batch_sizes=largest, memory=False)
            rows += _time_case(preset_case, grid_variants(params), grid)
        if bench.cifar10 or params.preset == "cifar10":
            rows += _time_cifar10(params, settings, f"{workdir}/cifar10")
        if state is not None:
            accuracy = int8_accuracy(
                preset_case, bench, settings.threads, f"{workdir}/accuracy", calibration
            )
    return {
        "environment": environment(),
        "settings": dataclasses.asdict(settings),
        "peers": {"requested": list(bench.peers), "skipped": skipped},
        "rows": rows,
        "accuracy": accuracy,
    }


def _time_cifar10(params: Params, settings: BenchSettings, workdir: str) -> list[dict]:
    """``bench.variants`` and the peers on CIFAR-10's UNet (random weights: timing only)."""
    config = params.preset_layout("cifar10")
    inputs = timing_calibration(config["model"]["in_channels"], config["data"]["image_size"])
    names = list(params.bench.variants)
    if "qdiff-static-w8a8@openvino" in names and not _openvino_exact():
        names.append(SEVEN_BIT_OPENVINO)  # the exact one-call form where 8 bits saturate
    variants = {**bench_variants(names, cache_dir=workdir),
                **peer_variants(list(params.bench.peers), workdir, settings.threads,
                                inputs)}  # fmt: skip
    return _time_case(BenchCase("cifar10", config, "random (timing only)"), variants, settings)


def _openvino_exact() -> bool:
    from modiff.quant import openvino

    return not openvino.available() or openvino.probe()


def _time_case(case: BenchCase, variants: dict, settings: BenchSettings) -> list[dict]:
    log.info("timing %s (%s weights) at batch %s: %s", case.name, case.weights,
             settings.batch_sizes, ", ".join(variants))  # fmt: skip
    return time_variants(case, variants, settings)


def int8_accuracy(
    case: BenchCase, bench: Bench, threads: int, workdir: str, calibration: dict | None = None
) -> list[dict]:
    """eps error against FP32 on calibration inputs of ``case``'s (trained) model: each
    unmodulated ``bench.variants`` entry, its simulated twin (the native one must match it) and
    every available peer's INT8, all calibrated on the same (about 256) inputs."""
    from modiff.calibration import collect_calibration
    from modiff.peers import QDQ_IN_FLOAT, PeerVariant, eps_errors

    if calibration is None:
        c = case.config["calibration"]
        n = min(c["cali_n"], -(-ACCURACY_INPUTS // c["cali_st"]))  # trajectories for the inputs
        calibration = collect_calibration(_build(case), case.config, cali_st=c["cali_st"],
                                          cali_n=n, seed=0, batch_size=c["batch_size"])  # fmt: skip
    step = max(1, len(calibration["xs"]) // ACCURACY_INPUTS)  # spread over steps and samples
    calibration = {k: v[::step][:ACCURACY_INPUTS] for k, v in calibration.items()}
    log.info("INT8 accuracy on %s: %d calibration inputs", case.name, len(calibration["xs"]))
    plain = [n for n in bench.variants if not n.startswith("modiff-")]
    names = plain + [n.replace("@native", "@simulated") for n in plain if n.endswith("@native")]
    peers = peer_variants(list(bench.peers), workdir, threads, calibration, int8_only=True)
    if "onnxruntime-int8" in peers:  # the same QDQ model without int8 kernels: saturation's cost
        peers[QDQ_IN_FLOAT] = PeerVariant(QDQ_IN_FLOAT, workdir, threads, calibration)
    builders = bench_variants(list(dict.fromkeys(names)), calibration)
    models = {name: build(_build(case)) for name, build in builders.items()}
    rows = eps_errors(_build(case), models, calibration)
    for name, build in peers.items():  # each in its own process: an engine's crash is its row
        try:
            rows += in_fresh_process(_peer_accuracy, case, name, build, calibration, threads)
        except RuntimeError as err:
            log.warning("INT8 accuracy of %s failed: %s", name, err)
            rows.append({"variant": name, "n_inputs": len(calibration["xs"]), "error": str(err)})
    return rows


def _peer_accuracy(case: BenchCase, name: str, build: VariantBuilder, calibration: dict,
                   threads: int) -> list[dict]:  # fmt: skip
    from modiff.peers import eps_errors

    torch.set_num_threads(threads)
    return eps_errors(_build(case), {name: build(_build(case))}, calibration)
