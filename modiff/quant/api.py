"""``quantize_(model, config, calibration)``: swap every selected Conv2d/Linear for a quantized one.

Method (Q-Diffusion's calibration):
- weights: per output channel, asymmetric as in Q-Diffusion (``config.symmetric_weights``):
  scale and zero point by an L_p (p = 2.4) search over 80 clipping ranges
  ``[min w, max w] (1 - 0.01 i)`` (symmetric: ``max|w| (1 - 0.01 i)``), nearest rounding; with
  ``config.reconstruction`` the rounding is then learned (AdaRound per layer or per block,
  :mod:`modiff.quant.reconstruction`);
- static activations: one scale per layer input, chosen from the same 80 clipping ranges of the
  input's max |a| by the least L_p error of the quantised input over the calibration data
  (a bounded random subsample of each layer's inputs; the max is exact), with
  ``config.learn_act_scales`` then refined LSQ-style;
- dynamic activations: scale from each tensor's range at run time (per tensor or per sample).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from modiff.io import atomic_output, load_tagged
from modiff.quant import openvino
from modiff.quant.config import QuantConfig
from modiff.quant.layers import LayerParams, QuantLayer, SplitInputLayer
from modiff.quant.openvino import OpenVINOModel
from modiff.quant.quantizer import (
    SEARCH_SHRINK,
    SEARCH_STEPS,
    act_grid,
    asymmetric_params,
    fake_quantize,
    lp_error,
    quantize_weight,
    search_weight_params,
    symmetric_scale,
)
from modiff.quant.reconstruction import reconstruct_
from modiff.quant.surgery import declared_input_split, replace_submodule, split_by_input

log = logging.getLogger(__name__)

QUANTIZABLE = (nn.Conv2d, nn.Linear)


def target_layers(model: nn.Module, config: QuantConfig) -> dict[str, nn.Module]:
    """The Conv2d/Linear modules ``config`` selects, by qualified name, in model order."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, QUANTIZABLE) and config.selects(name)
    }


def input_split(model: nn.Module, name: str, config: QuantConfig) -> int | None:
    """Channel index splitting the layer's input in two parts, where the model declares one
    (:mod:`modiff.quant.surgery`) and ``config.split_shortcut`` asks for split parts."""
    if not config.split_shortcut:
        return None
    return declared_input_split(model.get_submodule(name))


class _InputRecorder:
    """Keeps, per layer input, the exact min/max and a random subsample of about
    ``max_values`` values (spread evenly over the calibration batches)."""

    def __init__(self, max_values: int, totals: dict[str, int], seed: int):
        self.max_values = max_values
        self.totals = totals
        self.generator = torch.Generator().manual_seed(seed)
        self.stats: dict[str, dict[str, Any]] = {}

    def record(self, key: str, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1).cpu()
        stats = self.stats.setdefault(key, {"lo": float("inf"), "hi": float("-inf"), "sample": []})
        stats["lo"] = min(stats["lo"], flat.min().item())
        stats["hi"] = max(stats["hi"], flat.max().item())
        keep = max(1, round(self.max_values * flat.numel() / self.totals[key]))
        if keep < flat.numel():
            flat = flat[torch.randint(0, flat.numel(), (keep,), generator=self.generator)]
        stats["sample"].append(flat.clone())


class _SizeRecorder:
    def __init__(self):
        self.numel: dict[str, int] = {}

    def record(self, key: str, x: torch.Tensor) -> None:
        self.numel[key] = x.numel()


def _run_with_hooks(model, names, splits, recorder, batches) -> None:
    handles = []
    for name in names:
        split = splits[name]

        def hook(_mod, args, name=name, split=split):
            layer_input = args[0]
            if split is None:
                recorder.record(name, layer_input)
            else:
                recorder.record(f"{name}.part0", layer_input[:, :split])
                recorder.record(f"{name}.part1", layer_input[:, split:])

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        for x, t in batches:
            model(x, t)
    finally:
        for h in handles:
            h.remove()


class _ResidualRecorder:
    """Records layer-input residuals: first pass stores each input of the previous step, the
    second pass hands ``input - stored`` to the statistics recorder."""

    def __init__(self, stats: _InputRecorder):
        self.stats = stats
        self.previous: dict[str, torch.Tensor] | None = None
        self.current: dict[str, torch.Tensor] = {}

    def record(self, key: str, x: torch.Tensor) -> None:
        if self.previous is None:
            self.current[key] = x.detach().clone()
        else:
            self.stats.record(key, x - self.previous[key])


@torch.no_grad()
def collect_inputs(
    model: nn.Module,
    names: list[str],
    splits: dict[str, int | None],
    calibration: dict[str, torch.Tensor],
    config: QuantConfig,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per-layer input statistics of the float model on calibration inputs.

    With modulation the quantized tensors are residuals, so the statistics are those of each
    layer's input at x_t minus its input at the previous step (x_prev, t_prev).
    """
    device = next(model.parameters()).device
    xs, ts = calibration["xs"], calibration["ts"]
    sizes = _SizeRecorder()
    _run_with_hooks(model, names, splits, sizes, [(xs[:1].to(device), ts[:1].to(device))])
    totals = {k: n * xs.shape[0] for k, n in sizes.numel.items()}
    recorder = _InputRecorder(config.calib_max_values, totals, seed)
    batch_size = config.calib_batch_size
    for start in tqdm(range(0, len(xs), batch_size), desc="calibrate", leave=False):
        rows = slice(start, start + batch_size)
        batch = [(xs[rows].to(device), ts[rows].to(device))]
        if config.modulation == "none":
            _run_with_hooks(model, names, splits, recorder, batch)
            continue
        prev = [(calibration["xs_prev"][rows].to(device),
                 calibration["ts_prev"][rows].to(device))]  # fmt: skip
        residuals = _ResidualRecorder(recorder)
        _run_with_hooks(model, names, splits, residuals, prev)
        residuals.previous = residuals.current
        _run_with_hooks(model, names, splits, residuals, batch)
    return recorder.stats


def search_act_params(
    stats: dict[str, Any], bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static activation scale/zero point with the least L_p error on the recorded inputs."""
    qmin, qmax = act_grid(bits, symmetric)
    sample = torch.cat(stats["sample"])
    lo, hi = torch.tensor(stats["lo"]), torch.tensor(stats["hi"])
    best, best_err = None, float("inf")
    for i in range(SEARCH_STEPS):
        shrink = 1 - SEARCH_SHRINK * i
        if symmetric:
            scale = symmetric_scale(torch.maximum(-lo, hi) * shrink, qmin, qmax)
            zp = torch.tensor(128.0)
        else:
            scale, zp = asymmetric_params(lo * shrink, hi * shrink, qmin, qmax)
        err = lp_error(fake_quantize(sample, scale, zp, qmin, qmax), sample).item()
        if err < best_err:
            best, best_err = (scale.float(), zp.long()), err
    return best


def resolve_backend(config: QuantConfig, device: str | torch.device = "cpu") -> str:
    """The backend ``config`` runs on: its own, or for ``auto`` openvino where it is installed
    and runs the variant in integer (static scales), native otherwise; on CUDA, simulated (the
    integer backends are CPU backends). Raises where an explicit ``openvino`` cannot run."""
    on_cpu = torch.device(device).type == "cpu"
    if config.backend == "openvino":
        openvino.require()
        why = openvino.unsupported(config)
        if why:
            raise ValueError(f"backend 'openvino': {why}")
        return "openvino"
    if config.backend != "auto":
        return config.backend
    if not on_cpu:
        return "simulated"
    why = "OpenVINO is not installed" if not openvino.available() else openvino.unsupported(config)
    if why:
        log.info("backend auto -> native: %s", why)
        return "native"
    return "openvino"


def _layer_config(config: QuantConfig, backend: str) -> QuantConfig:
    """The config of the torch layers: openvino compiles simulated layers' parameters."""
    return dataclasses.replace(config, backend="simulated" if backend == "openvino" else backend)


def _wrap_for_backend(
    model: nn.Module, config: QuantConfig, backend: str, source: str
) -> nn.Module:
    """``model``, or for backend openvino the compiled model around it. ``source``: the
    fingerprint of the float weights it was quantized from (:func:`weights_fingerprint`), kept
    on the torch model as ``quantized_from`` for :func:`save_quant_params` to record."""
    model.quantized_from = source
    if backend != "openvino":
        return model
    return OpenVINOModel(model, dataclasses.replace(config, backend="openvino"))


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    calibration: dict[str, torch.Tensor] | None = None,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Quantize ``model`` in place (every selected Conv2d/Linear) and return it.

    ``calibration`` is the dict ``modiff calib-data`` writes (``xs``, ``ts``, ...); static
    activation scales need it, and so do reconstruction and learned step sizes, which run their
    optimisation on ``device``. With backend ``openvino`` (or ``auto`` choosing it) the returned
    module is an :class:`~modiff.quant.openvino.OpenVINOModel` around the quantized ``model``.
    """
    backend = resolve_backend(config)  # before any work: a backend that cannot run fails now
    final_config, config = config, _layer_config(config, backend)
    if config.a_scale == "static" and calibration is None:
        raise ValueError("static activation scales need calibration data (modiff calib-data)")
    if config.learns and calibration is None:
        raise ValueError("reconstruction and learned step sizes need calibration data")
    names = list(target_layers(model, config))
    if not names:
        raise ValueError("the config selects no Conv2d/Linear layer of this model")
    source = weights_fingerprint(model, names)
    splits = {n: input_split(model, n, config) for n in names}
    stats = {}
    if config.a_scale == "static":
        model.eval()
        stats = collect_inputs(model, names, splits, calibration, config, seed)
    params = {}
    for name in tqdm(names, desc="quantize", leave=False):
        layer = model.get_submodule(name)
        for i, part in enumerate(split_by_input(layer, splits[name])):
            key = name if splits[name] is None else f"{name}.part{i}"
            params[key] = make_layer_params(part, config, stats.get(key))
    fp_model = copy.deepcopy(model).eval() if config.learns else None
    apply_params(model, config, params, splits)
    if config.learns:
        reconstruct_(model, fp_model, config, calibration, seed=seed, device=device)
    return _wrap_for_backend(model, final_config, backend, source)


def make_layer_params(layer: nn.Module, config: QuantConfig, stats: dict | None) -> LayerParams:
    weight = layer.weight.detach().cpu()
    w_scale, w_zp = search_weight_params(weight, config.w_bits, config.symmetric_weights)
    act_scale = act_zp = None
    if config.a_scale == "static":
        act_scale, act_zp = search_act_params(stats, config.a_bits, config.a_symmetric)
    return LayerParams(
        weight_codes=quantize_weight(weight, w_scale, w_zp, config.w_bits),
        weight_scale=w_scale,
        weight_zero_point=w_zp,
        bias=None if layer.bias is None else layer.bias.detach().cpu().float(),
        act_scale=act_scale,
        act_zero_point=act_zp,
    )


def apply_params(
    model: nn.Module,
    config: QuantConfig,
    params: dict[str, LayerParams],
    splits: dict[str, int | None],
) -> nn.Module:
    """Swap the layers for quantized ones built from ``params``."""
    for name, split in splits.items():
        layer = model.get_submodule(name)
        if split is None:
            new = QuantLayer(layer, params[name], config)
        else:
            parts = split_by_input(layer, split)
            new = SplitInputLayer(
                [QuantLayer(p, params[f"{name}.part{i}"], config) for i, p in enumerate(parts)],
                split,
            )
        replace_submodule(model, name, new)
    return model


# --- saved quantization parameters -------------------------------------------------------------

PARAMS_FORMAT = "modiff-qparams-v3"  # v2: the weight codes are saved; v3: their zero points


def weights_fingerprint(model: nn.Module, names: list[str]) -> str:
    """sha256 over the float weights and biases of the named layers (which model was quantized)."""
    import hashlib

    digest = hashlib.sha256()
    for name in names:
        layer = model.get_submodule(name)
        for t in (layer.weight, layer.bias):
            if t is not None:
                digest.update(name.encode())
                digest.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_quant_params(
    model: nn.Module | None,
    config: QuantConfig | None,
    dest: str | Path,
    meta: dict[str, Any] | None = None,
) -> None:
    """Save a quantized model's parameters (config, layers, scales, zero points) as one file,
    with the fingerprint of the float weights :func:`quantize_` made it from.

    ``model=None, config=None`` saves the FP32 reference's file: the model runs as it is.
    """
    layers: dict[str, dict[str, Any]] = {}
    if isinstance(model, OpenVINOModel):  # its parameters are those of the torch model inside
        model = model.model
    fingerprint = "" if model is None else model.quantized_from
    for name, m in model.named_modules() if model is not None else ():
        if isinstance(m, SplitInputLayer):
            layers[name] = {"split": m.split, "parts": [_layer_state(p) for p in m.parts]}
        elif isinstance(m, QuantLayer) and ".parts." not in f".{name}.":  # halves saved above
            layers[name] = {"split": None, "parts": [_layer_state(m)]}
    blob = {
        "format": PARAMS_FORMAT,
        "config": None if config is None else config.to_dict(),
        "fingerprint": fingerprint,
        "meta": meta or {},
        "layers": layers,
    }
    with atomic_output(dest) as tmp, open(tmp, "wb") as fh:
        torch.save(blob, fh)


def _layer_state(m: QuantLayer) -> dict[str, Any]:
    # The codes too: learned rounding (AdaRound) is not nearest rounding of the weights.
    state = {"weight_codes": m.weight_codes.clone(), "weight_scale": m.weight_scale.clone(),
             "weight_zero_point": m.weight_zero_point.clone()}  # fmt: skip
    if m.act_scale is not None:
        state["act_scale"] = m.act_scale.clone()
        state["act_zero_point"] = m.act_zero_point.clone()
    return state


def read_quant_params(path: str | Path) -> dict[str, Any]:
    return load_tagged(path, PARAMS_FORMAT, "quantization parameters", "modiff calibrate")


def load_quantized(
    model: nn.Module, path: str | Path, **config_overrides: Any
) -> tuple[nn.Module, QuantConfig | None]:
    """Rebuild the quantized model saved by :func:`save_quant_params` from float ``model``.

    ``config_overrides`` may change how the same parameters run (e.g. ``backend``: a file
    calibrated for one backend runs on any). The returned config names the backend that runs
    (``auto`` resolved). The FP32 reference's file returns ``model`` unchanged and no config.
    """
    blob = read_quant_params(path)
    if blob["config"] is None:
        return model, None
    config = QuantConfig.from_dict({**blob["config"], **config_overrides})
    backend = resolve_backend(config)
    config = dataclasses.replace(config, backend=backend)
    layers = blob["layers"]
    missing = [n for n in layers if not _has_layer(model, n)]
    if missing:
        raise ValueError(
            f"{path} does not fit this model: no layer {missing[:5]} (quantized another model?)"
        )
    fingerprint = weights_fingerprint(model, list(layers))
    if fingerprint != blob["fingerprint"]:
        raise ValueError(
            f"{path} was calibrated on other weights (fingerprint {blob['fingerprint'][:12]} vs "
            f"this model's {fingerprint[:12]}); calibrate again for this checkpoint"
        )
    params, splits = {}, {}
    for name, entry in layers.items():
        splits[name] = entry["split"]
        layer = model.get_submodule(name)
        for i, part in enumerate(split_by_input(layer, entry["split"])):
            key = name if entry["split"] is None else f"{name}.part{i}"
            state = entry["parts"][i]
            params[key] = LayerParams(
                weight_codes=state["weight_codes"],
                weight_scale=state["weight_scale"],
                weight_zero_point=state["weight_zero_point"],
                bias=None if part.bias is None else part.bias.detach().cpu().float(),
                act_scale=state.get("act_scale"),
                act_zero_point=state.get("act_zero_point"),
            )
    apply_params(model, _layer_config(config, backend), params, splits)
    return _wrap_for_backend(model, config, backend, fingerprint), config


def _has_layer(model: nn.Module, name: str) -> bool:
    try:
        return isinstance(model.get_submodule(name), QUANTIZABLE)
    except AttributeError:
        return False
