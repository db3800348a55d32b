"""Q-Diffusion's reconstruction (BRECQ/AdaRound) and LSQ-style learned activation step sizes.

After the MSE initialisation of :func:`modiff.quant.api.quantize_`, each reconstruction unit (a
quantized layer, or with ``reconstruction="block"`` a block the model declares a unit,
:mod:`modiff.quant.surgery`) is
optimised in model order so that its output on cached calibration inputs matches the FP32
model's (BRECQ's "asym" mode: inputs from the already-quantized model, targets from FP32):

- AdaRound: each weight rounds to ``floor(w / delta) + h(V)``, h a rectified sigmoid; the loss
  adds ``lambda * sum(1 - |2h - 1|^b)`` after a warm-up, b annealed from 20 to 2, which drives
  h to 0 or 1. The result is hard rounding, i.e. integer codes within one step of nearest
  rounding, which the native kernels run unchanged.
- Learned step sizes (``learn_act_scales``): each static activation scale is a parameter,
  rounded with a straight-through estimator (LSQ). For MoDiff the quantized input is the
  residual against the previous step's input; its scale is learned on the calibration pairs
  (x_prev, x_t) with the loss on the layer output.

The numbers are BRECQ's and Q-Diffusion's defaults: batch 32, MSE loss on V, lambda 0.01,
warm-up 20%; step sizes with weights fixed, Adam 4e-5 (MoDiff's residuals: 4e-4) with a cosine
schedule, L_p loss with p = 2.4; losses summed over channels and averaged over samples and
positions, as BRECQ's. Adam's rate on V is BRECQ's 1e-3 at its 20,000 iterations and scaled up
at fewer (see :func:`rounding_rate`).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from modiff.quant.config import QuantConfig
from modiff.quant.layers import QuantLayer, SplitInputLayer
from modiff.quant.quantizer import LP_NORM, weight_code_range
from modiff.quant.surgery import is_reconstruction_unit, replace_submodule, split_by_input
from modiff.state import reset_caches

log = logging.getLogger(__name__)

GAMMA, ZETA = -0.1, 1.1  # the rectified sigmoid's stretch
REG_WEIGHT = 0.01
B_START, B_END = 20.0, 2.0
WARMUP = 0.2
BATCH = 32
# Adam's rate per pass: Q-Diffusion's on step sizes, MoDiff's (its official code's default) on
# residual step sizes; the rounding's is rounding_rate(iters)
LEARNING_RATES = {"scales": 4e-5, "residual": 4e-4}
BRECQ_RATE, BRECQ_ITERS = 1e-3, 20_000
MAX_INPUTS = 1024  # calibration inputs cached per unit (all of them if fewer)


def rounding_rate(iters: int) -> float:
    """Adam's rate on the rounding variables V: BRECQ's 1e-3 at its 20,000 iterations or more,
    and as much larger at fewer as keeps the distance V can travel (rate x iterations). Adam moves
    V by at most about the rate per step, and V must travel about 2.4 from the fractional start
    for h(V) to reach 0 or 1: at 2,000 iterations and 1e-3, a quarter to a half of the digits
    model's first units' rounding stayed undecided and hard rounding doubled their loss
    (measured), none at 1e-2."""
    return BRECQ_RATE * max(1.0, BRECQ_ITERS / max(1, iters))


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    p = ((h - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class LearnedLayer(nn.Module):
    """A quantized layer while it is reconstructed: fake quantization in float that gradients
    reach (rounding variables V, the static activation scale), on the layer's FP32 weight."""

    def __init__(self, layer: QuantLayer, weight: torch.Tensor, learn_rounding: bool,
                 learn_scale: bool):  # fmt: skip
        super().__init__()
        self.target = [layer]  # a list: not a submodule (it is restored in its place later)
        self.config = dataclasses.replace(layer.config, modulation="none")
        shape = (-1,) + (1,) * (weight.dim() - 1)
        lo, hi = weight_code_range(layer.weight_zero_point.reshape(shape), layer.config.w_bits)
        self.register_buffer("w_qmin", lo.float())  # each channel's grid
        self.register_buffer("w_qmax", hi.float())
        self.a_qmin, self.a_qmax = layer.a_qmin, layer.a_qmax
        self.register_buffer("w_scale", layer.weight_scale.reshape(shape).clone())
        self.rounding = None
        if learn_rounding:  # starts at the fractional part: h(V) = w / delta - floor
            scaled = weight.float() / self.w_scale
            self.register_buffer("w_floor", torch.floor(scaled))
            self.rounding = nn.Parameter(_inverse_rectified_sigmoid(scaled - self.w_floor))
        else:  # the layer's codes as they are
            self.register_buffer("fixed_codes", layer.weight_codes.float())
        self.act_scale = self.fixed_act_scale = None
        if layer.act_scale is not None:
            scale = layer.act_scale.detach().clone().float()
            if learn_scale:
                self.act_scale = nn.Parameter(scale)
            else:
                self.fixed_act_scale = scale
            self.act_zero_point = float(layer.act_zero_point)
        self.bias = None if layer.bias is None else layer.bias.detach().clone()
        self.is_conv = layer.is_conv
        self.conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups) \
            if layer.is_conv else None  # fmt: skip
        self.hard = False
        self.quantize_inputs = True
        self.use_bias = True

    def codes(self) -> torch.Tensor:
        if self.rounding is None:
            return self.fixed_codes
        h = rectified_sigmoid(self.rounding)
        up = (h >= 0.5).float() if self.hard else h
        return torch.clamp(self.w_floor + up, self.w_qmin, self.w_qmax)

    def undecided(self) -> tuple[int, int]:
        """How many rounding variables are still between down and up (h(V) more than 0.01 from
        0 and 1), of how many: hard rounding discards what those learned."""
        if self.rounding is None:
            return 0, 0
        h = rectified_sigmoid(self.rounding.detach())
        return int(((h > 0.01) & (h < 0.99)).sum()), h.numel()

    def regulariser(self, b: float) -> torch.Tensor:
        if self.rounding is None:
            return torch.zeros(())
        h = rectified_sigmoid(self.rounding)
        return (1 - (2 * h - 1).abs().pow(b)).sum()

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.target[0]
        if layer.act_scale is None:  # dynamic: the run-time scale, not learned
            scale, zp = layer.act_params(x.detach())
            shape = (-1,) + (1,) * (x.dim() - 1)
            scale, zp = scale.reshape(shape), zp.reshape(shape).float()
        else:
            scale = self.act_scale if self.act_scale is not None else self.fixed_act_scale
            zp = self.act_zero_point
        codes = torch.clamp(_round_ste(x / scale) + zp, self.a_qmin, self.a_qmax)
        return (codes - zp) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.codes() * self.w_scale
        xq = self.quantize_input(x) if self.quantize_inputs else x
        bias = self.bias if self.use_bias else None
        if self.is_conv:
            return F.conv2d(xq, weight, bias, *self.conv_args)
        return F.linear(xq, weight, bias)

    @torch.no_grad()
    def commit(self) -> None:
        """Write the learned codes (hard rounding) and scale into the quantized layer."""
        layer, self.hard = self.target[0], True
        layer.weight_codes.copy_(self.codes().to(torch.int8))
        if self.act_scale is not None:
            layer.act_scale.copy_(self.act_scale.detach().abs().clamp_min(1e-8))
        layer._derive()


def reconstruct_(
    model: nn.Module,
    fp_model: nn.Module,
    config: QuantConfig,
    calibration: dict[str, torch.Tensor],
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, tuple[float, float]]:
    """Optimise the quantized ``model`` against ``fp_model``, unit by unit in model order.

    The units' inputs and targets are captured where the models are (native layers: the CPU);
    the optimisation, nearly all of the work, runs on ``device`` (e.g. CUDA).

    Returns each unit's output mse on its cached inputs before and after, by unit name for the
    rounding, ``<name>:scales`` for learned step sizes and ``<name>:residual`` for MoDiff's
    residual step sizes.

    Q-Diffusion's order: the rounding first, then, with ``learn_act_scales``, the step sizes with
    the learned codes fixed (per unit again). Activations are quantized inside the unit in both
    passes: on the digits model, rounding learned on float activations (Q-Diffusion's first pass)
    gave W4A8 FID 5.37 against 3.00 with them quantized (measured at the earlier fixed rate
    1e-3, before :func:`rounding_rate`). Under MoDiff's modulation the weights
    are reconstructed on float activations (modulation nearly makes them exact) carrying the
    earlier units' weight error, and the step sizes are the residuals', learned per layer on
    the calibration pairs.
    """
    pick = torch.randperm(len(calibration["xs"]), generator=torch.Generator().manual_seed(seed))
    pick = pick[:MAX_INPUTS]
    batches = torch.Generator().manual_seed(seed)  # the training batches of every unit
    inputs = {k: v[pick] for k, v in calibration.items()}
    modulated = config.modulation != "none"
    passes = [("weights", config.reconstruction)] if config.reconstruction != "none" else []
    if config.learn_act_scales and config.a_scale == "static":
        if modulated:
            passes.append(("residual", "layer"))
        else:
            passes.append(("scales", "layer" if not passes else config.reconstruction))
    losses = {}
    for kind, granularity in passes:
        units = reconstruction_units(model, granularity, inputs["xs"][:1], inputs["ts"][:1])
        for name in tqdm(units, desc=f"reconstruct {kind} ({granularity})", leave=False):
            key = name if kind == "weights" else f"{name}:{kind}"
            losses[key] = _reconstruct_unit(
                model, fp_model, name, inputs, config.reconstruction_iters, kind=kind,
                quantized_inputs=not modulated, batches=batches, device=torch.device(device),
            )  # fmt: skip
            log.info("%s: output mse %.4g before, %.4g after", key, *losses[key])
    return losses


def reconstruction_units(
    model: nn.Module, granularity: str, xs: torch.Tensor, ts: torch.Tensor
) -> list[str]:
    """Names of the modules reconstructed one at a time, in the order the model runs them on
    ``(xs, ts)``: quantized layers (a split layer is one unit), or for ``block`` the modules the
    model declares reconstruction units (:mod:`modiff.quant.surgery`), with the quantized layers
    outside any of them on their own. Run order, not definition order: a model may define its
    modules in another order than it runs them (e.g. an up path defined top-down and run
    bottom-up), and each unit must see its predecessors already learned."""
    blocks = granularity == "block"
    units: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(u + ".") for u in units):
            continue
        if (blocks and is_reconstruction_unit(m)) or isinstance(m, SplitInputLayer | QuantLayer):
            units.append(name)
    ran: list[str] = []
    handles = [model.get_submodule(u).register_forward_pre_hook(
        lambda _m, _args, u=u: ran.append(u) if u not in ran else None) for u in units]  # fmt: skip
    try:
        with torch.no_grad():
            model(xs, ts)
    finally:
        for h in handles:
            h.remove()
        reset_caches(model)  # a modulated model's caches now hold this call: not a trajectory
    return ran + [u for u in units if u not in ran]


def _learned_layers(unit: nn.Module, fp_unit: nn.Module, rounding: bool, scales: bool) -> dict:
    """A LearnedLayer for each quantized layer of ``unit``, by its name in the unit."""
    found = {}
    for name, m in unit.named_modules():
        if isinstance(m, SplitInputLayer):
            for i, part in enumerate(split_by_input(fp_unit.get_submodule(name), m.split)):
                found[f"{name}.parts.{i}".lstrip(".")] = (m.parts[i], part.weight.detach())
        elif isinstance(m, QuantLayer) and ".parts." not in f".{name}.":
            found[name] = (m, fp_unit.get_submodule(name).weight.detach())
    return {n: LearnedLayer(q, w, rounding, scales) for n, (q, w) in found.items()}


class _StopForward(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


def _capture(model: nn.Module, name: str, xs: torch.Tensor, ts: torch.Tensor, what: str):
    """The unit's positional inputs (``what="inputs"``) or output over all of ``xs``, batched."""
    unit, got = model.get_submodule(name), []

    def hook(_m, args, out):
        got.append(tuple(a.detach() for a in args) if what == "inputs" else out.detach())
        raise _StopForward

    handle = unit.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for i in range(0, len(xs), 256):
                reset_caches(model)  # modulated layers: each batch a warm-up step
                try:
                    model(xs[i : i + 256], ts[i : i + 256])
                except _StopForward:
                    pass
    finally:
        handle.remove()
        reset_caches(model)  # the caches hold a capture, not a trajectory
    if what == "inputs":
        return tuple(torch.cat(parts) for parts in zip(*got, strict=True))
    return torch.cat(got)


def _swap_layers(unit: nn.Module, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put ``layers`` in place in ``unit`` (by name); returns what they replaced. In place, not on
    a copy: native layers hold packed weights that cannot be deep-copied."""
    replaced = {}
    for name, layer in layers.items():
        if name:
            replaced[name] = unit.get_submodule(name)
            replace_submodule(unit, name, layer)
    return replaced


def _reconstruct_unit(model, fp_model, name, inputs, iters, *, kind, quantized_inputs, batches,
                      device) -> tuple[float, float]:  # fmt: skip
    rounding, residual = kind == "weights", kind == "residual"
    fp_unit = fp_model.get_submodule(name)
    unit = model.get_submodule(name)
    # BRECQ's asym: inputs from the quantized model (under modulation, at a warm-up step: the
    # earlier units' weight error, exact activations); MoDiff's residual pairs: FP inputs
    source = fp_model if residual else model
    args = _capture(source, name, inputs["xs"], inputs["ts"], "inputs")
    prev = _capture(fp_model, name, inputs["xs_prev"], inputs["ts_prev"], "inputs") \
        if residual else None  # fmt: skip
    target = _capture(fp_model, name, inputs["xs"], inputs["ts"], "output").to(device)
    args = tuple(a.to(device) for a in args)
    prev = None if prev is None else tuple(p.to(device) for p in prev)
    learned = _learned_layers(unit, fp_unit, rounding, not rounding)
    runner = learned.get("", unit)
    originals = _swap_layers(unit, learned)
    home = next(iter(learned.values())).w_scale.device
    runner.to(device)  # only float modules now: the quantized layers are swapped out
    for m in learned.values():  # plain: activations quantized in every pass (QDrop's finding)
        m.quantize_inputs = quantized_inputs or residual

    def output(idx: torch.Tensor) -> torch.Tensor:
        batch = tuple(a[idx] for a in args)
        if prev is None:
            return runner(*batch)
        # MoDiff's first modulated step: a_prev is exact (FP warm-up), the residual quantized:
        # out = A(a_prev) + A(Q(a_t - a_prev)), with the bias once.
        (x,), (x_prev,) = batch, tuple(p[idx] for p in prev)
        _set_flags(learned, quantize_inputs=False)
        base = runner(x_prev)
        _set_flags(learned, quantize_inputs=True, use_bias=False)
        out = base + runner(x - x_prev)
        _set_flags(learned, use_bias=True)
        return out

    def loss_on_all() -> float:
        with torch.no_grad():
            total = sum(F.mse_loss(output(idx), target[idx], reduction="sum").item()
                        for idx in torch.arange(len(target)).split(256))  # fmt: skip
        return total / target.numel()

    _set_flags(learned, hard=True)  # the starting point: nearest rounding, MSE scales
    before = loss_on_all()
    _set_flags(learned, hard=False)
    params = [p for m in learned.values() for p in (m.rounding, m.act_scale) if p is not None]
    if iters and params:
        _optimise(learned, output, target, params, iters, batches, kind)
    undecided, total = map(sum, zip(*(m.undecided() for m in learned.values()), strict=True))
    if undecided > 0.01 * total:
        log.warning("%s: %.0f%% of the rounding is undecided after %d iterations, so hard rounding "
                    "loses what it learned: raise reconstruction_iters", name,
                    100 * undecided / total, iters)  # fmt: skip
    _set_flags(learned, hard=True)
    after = loss_on_all()
    for m in learned.values():
        m.commit()
    runner.to(home)
    _swap_layers(unit, originals)
    return before, after


def _optimise(learned, output, target, params, iters, batches, kind) -> None:
    """Adam on the rounding variables (constant rate, MSE loss: BRECQ's) or on the step sizes
    (cosine schedule to 0, L_p loss with p = 2.4: Q-Diffusion's and MoDiff's)."""
    rounding = kind == "weights"
    opt = torch.optim.Adam(params, lr=rounding_rate(iters) if rounding else LEARNING_RATES[kind])
    schedule = None if rounding else torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    for it in range(iters):
        idx = torch.randint(len(target), (min(BATCH, len(target)),), generator=batches)
        err = (output(idx) - target[idx]).abs().pow(2.0 if rounding else LP_NORM)
        loss = err.sum(1).mean()  # BRECQ's: over channels, then samples and positions
        if rounding and it >= WARMUP * iters:
            progress = (it - WARMUP * iters) / max(1.0, (1 - WARMUP) * iters)
            b = B_END + (B_START - B_END) * (1 - progress)  # linear, 20 -> 2
            loss = loss + REG_WEIGHT * sum(m.regulariser(b) for m in learned.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()


def _set_flags(learned: dict[str, LearnedLayer], **flags) -> None:
    for m in learned.values():
        for k, v in flags.items():
            setattr(m, k, v)
