"""Backend ``openvino``: the quantized model compiled as one OpenVINO graph, from modiff's own
quantization parameters.

Each quantized layer is written as the pattern OpenVINO's CPU plugin runs in integer (FACTS §5b):
its input through a 256-level ``FakeQuantize`` with the layer's constant scale and zero point,
its weight as the int8 codes -> ``Convert`` -> ``Multiply`` by the per-channel scale. The CPU
plugin's low-precision pass turns that into a u8 x i8 convolution or matmul with int32 sums;
:func:`integer_ops` reads the compiled model to check it. Nothing is re-quantized: the codes,
scales and zero points are those ``modiff calibrate`` saved (learned rounding included).

**MoDiff.** A modulated layer's caches (the reconstructed input a_hat and the output cache o_hat)
are OpenVINO state: ``ReadValue`` / ``Assign`` variables updated inside the step graph, so no
cache crosses into Python between steps. A trajectory's first call (after
:meth:`OpenVINOModel.reset_cache`) runs a second graph in which the warm-up is built: ``fp``
starts from a_hat = x and o_hat = A(x) + b in float; ``quantized`` / ``repeat:k`` from a_hat = 0,
o_hat = b, with k - 1 modulated steps unrolled and the k-th taken by the step itself. Its caches
after that step become the step graph's state, once per trajectory.

**Exact on every CPU.** Without VNNI the u8 x s8 products are added in int16 pairs with
saturation (FACTS §5a/§5b), in OpenVINO as in oneDNN. :func:`probe` finds out once per process
whether this CPU's integer kernels are exact; where they are not, a layer whose codes and weights
could overflow a pair runs the *split* form: its signed codes as two halves in 0..128 on the
channel axis, against the weights repeated (one integer call, twice the input channels).
Grids of at most 7 bits are placed in codes 0..127 on every CPU, where one call is exact.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modiff.quant import kernels
from modiff.quant.layers import QuantLayer, SplitInputLayer

log = logging.getLogger(__name__)

LEVELS = 256  # OpenVINO runs a FakeQuantize in integer only at 256 (or 255) levels
INTEGER_PRECISIONS = ("u8", "i8")
MATMUL_TYPES = ("Convolution", "FullyConnected", "MatMul", "GroupConvolution")


def available() -> bool:
    """Whether OpenVINO is installed."""
    return importlib.util.find_spec("openvino") is not None


def require() -> Any:
    """The ``openvino`` module, or an error that says how to install it."""
    if not available():
        raise ImportError(
            "backend 'openvino' needs OpenVINO, a dependency of modiff: `pip install -e .` "
            "(or `pip install openvino`), or use backend 'native'"
        )
    import openvino

    return openvino


def cpu_supported() -> bool:
    """Whether this CPU (as capped by ``ONEDNN_MAX_CPU_ISA``) has AVX2: under SSE4.1 the CPU
    plugin failed to compile the whole model ("bad combination"), though single layers compiled."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return "avx2" in kernels.cpu_flags() and not cap.startswith("SSE")


def unsupported(config: Any) -> str | None:
    """Why ``config`` cannot run on this backend (None: it can), in words that name the fix."""
    if not cpu_supported():
        return "OpenVINO's integer path needs AVX2 (this CPU, or its cap, has less): use 'native'"
    if config.a_scale != "static":
        return (
            "dynamic activation scales (computed at run time) do not run as integer in OpenVINO, "
            "whose low-precision pass needs constant quantization ranges: use backend 'native'"
        )
    if config.modulation == "uncompensated":
        return "the uncompensated modulation ablation runs on backend 'native' or 'simulated'"
    return None


def compile_config(threads: int | None = None) -> dict[str, Any]:
    """The CPU plugin's settings: latency mode on ``threads`` threads (torch's by default); float
    parts in f32 (a bf16-capable CPU would otherwise run them in bf16)."""
    return {"INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}  # fmt: skip


# --- the graph of one quantized layer -----------------------------------------------------------


class ExportLayer(nn.Module):
    """One quantized layer (or half of a split layer) as the ops OpenVINO compiles to integer.

    ``scheme``: ``direct`` (one 256-level FakeQuantize, codes shifted to 0..code_max) or ``split``
    (two halves in 0..128, see the module docs). Evaluated eagerly it is the simulated layer.
    """

    def __init__(self, layer: QuantLayer, scheme: str):
        super().__init__()
        if layer.act_scale is None:
            raise ValueError("backend 'openvino' needs static activation scales")
        self.is_conv, self.pointwise = layer.is_conv, layer.pointwise
        if self.is_conv:
            self.stride, self.padding = layer.stride, layer.padding
            self.dilation, self.groups = layer.dilation, layer.groups
        self.scheme = scheme
        self.scale = float(layer.act_scale)
        self.zero_point = int(layer.act_zero_point) - layer.code_shift  # on codes 0..code_max
        self.code_max = layer.code_max
        codes = layer.weight_codes
        if scheme == "split":
            if self.is_conv and self.groups != 1:
                raise ValueError("a grouped conv has no split form: use w_bits or a_bits <= 7")
            codes = kernels.repeat_input_channels(codes)
            self.half_zero_point = kernels.split_offset(self.zero_point)
        self.register_buffer("weight_codes", codes.clone())
        w_shape = (-1,) + (1,) * (codes.dim() - 1)
        self.register_buffer("weight_scale", layer.weight_scale.reshape(w_shape).clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.clone())
        float_weight = layer.weight_codes.float() * self.weight_scale  # the split's undone
        self.register_buffer("float_weight", float_weight, persistent=False)

    def weight(self) -> torch.Tensor:
        # Traced as an int8 Constant -> Convert -> Multiply: kept as int8 by OpenVINO.
        return self.weight_codes.to(torch.float32) * self.weight_scale

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q(x) dequantized, the operand the integer op takes: Q(x) or its split halves)."""
        s, z = self.scale, self.zero_point
        if self.code_max < LEVELS - 1:  # a narrower grid: its codes within 0..code_max
            x = torch.clamp(x, -z * s, (self.code_max - z) * s)
        xq = torch.fake_quantize_per_tensor_affine(x, s, z, 0, LEVELS - 1)
        if self.scheme == "direct":
            return xq, xq
        # Each half is on the grid already: re-quantizing it only marks it integer (codes 0..128).
        half_z = self.half_zero_point
        base = z - half_z
        low = torch.clamp(xq, (base - z) * s, (base + kernels.SPLIT_HALF_MAX - z) * s)
        halves = [torch.fake_quantize_per_tensor_affine(h, s, half_z, 0, LEVELS - 1)
                  for h in (low, xq - low)]  # fmt: skip
        return xq, torch.cat(halves, dim=1 if self.is_conv else -1)

    def op(self, operand: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """The layer's conv or linear of ``operand`` with the dequantized weight."""
        bias = self.bias if with_bias else None
        if self.is_conv:
            return F.conv2d(operand, self.weight(), bias, self.stride, self.padding,
                            self.dilation, self.groups)  # fmt: skip
        return F.linear(operand, self.weight(), bias)

    def float_op(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """The layer on an unquantized input (MoDiff's warm-up) with the dequantized weights as
        a float constant: int8 weights decompressed inside a float matmul are a pattern the CPU
        plugin's AVX2 kernels refuse for some linears."""
        w = self.float_weight
        bias = self.bias if with_bias else None
        if self.is_conv:
            return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, w, bias)

    def forward(self, x: torch.Tensor, base: torch.Tensor | None = None, with_bias: bool = True):
        """Plain: the layer on Q(x). MoDiff (``base`` given): (d, the layer on d) for
        d = Q(x - base). (Through ``forward`` so that the traced ops carry this part's name.)"""
        if base is None:
            return self.op(self.quantize(x)[1], with_bias)
        dq, operand = self.quantize(x - base)
        return dq, self.op(operand, with_bias)


class ExportUnit(nn.Module):
    """A quantized layer, or a split layer's two parts (outputs summed), in the exported graph.

    Plain: each part on its quantized input. Modulated: takes its caches from ``state_in``
    (set by :class:`ExportRoot` while tracing) and leaves the updated and the initial caches in
    ``state_out``: for each part its base (a_hat), then the shared output cache o_hat.
    """

    def __init__(self, parts: list[ExportLayer], split: int | None, modulation: str, warmup: str):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.split = split
        self.modulated = modulation != "none"
        self.warmup = warmup
        self.state_in: list[torch.Tensor] | None = None
        self.state_out: list[torch.Tensor] = []

    def _inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x] if self.split is None else [x[:, : self.split], x[:, self.split :]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self._inputs(x)
        if not self.modulated:
            out = self.parts[0](xs[0])
            for part, xp in zip(self.parts[1:], xs[1:], strict=True):
                out = out + part(xp, with_bias=False)
            return out
        bases_init, out_init = self._warm_up(xs)
        bases, out = self.state_in[:-1], self.state_in[-1]
        bases_new, out_new = self._step(xs, bases, out)
        self.state_out = [*bases_new, out_new, *bases_init, out_init]
        return out_new

    def _step(self, xs, bases, out):
        """d = Q(x - a_hat); a_hat += d; o_hat += A(d), for each part."""
        new_bases = []
        for part, xp, base in zip(self.parts, xs, bases, strict=True):
            dq, change = part(xp, base, with_bias=False)
            new_bases.append(base + dq)
            out = out + change
        return new_bases, out

    def _warm_up(self, xs):
        """The caches' initial values (run only on a trajectory's first call)."""
        mode, _, repeats = self.warmup.partition(":")
        if mode == "fp":  # a_hat = a_T, o_hat = A(a_T) + b in float
            out = self.parts[0].float_op(xs[0])
            for part, xp in zip(self.parts[1:], xs[1:], strict=True):
                out = out + part.float_op(xp, with_bias=False)
            return list(xs), out
        bases = [xp * 0.0 for xp in xs]  # zeros shaped like each input, from the graph
        out = self.parts[0].float_op(bases[0])  # = b everywhere (zero-padded conv of zeros)
        for _ in range((int(repeats) if mode == "repeat" else 1) - 1):  # the last: the step's
            bases, out = self._step(xs, bases, out)
        return bases, out


class ExportGroupNorm(nn.Module):
    """GroupNorm as reshape -> layer norm (OpenVINO's MVN) -> reshape -> per-channel affine: the
    form whose normalization the CPU plugin fuses with the following activation and quantizer
    (its GroupNormalization op runs as separate float passes)."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.groups, self.eps = norm.num_groups, norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        grouped = x.reshape(n, self.groups, -1)
        y = F.layer_norm(grouped, grouped.shape[-1:], eps=self.eps).reshape(x.shape)
        shape = (1, c) + (1,) * (x.dim() - 2)
        if self.weight is not None:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y


class ExportRoot(nn.Module):
    """``(x, t, *caches) -> (eps, *updated caches, *initial caches)``: what is traced."""

    def __init__(self, model: nn.Module, units: list[ExportUnit]):
        super().__init__()
        self.model = model
        self.units = units  # modulated units, in cache order (not registered twice)

    def forward(self, x: torch.Tensor, t: torch.Tensor, *caches: torch.Tensor):
        i = 0
        for unit in self.units:
            n = len(unit.parts) + 1
            unit.state_in = list(caches[i : i + n])
            i += n
        eps = self.model(x, t)
        updated, initial = [], []
        for unit in self.units:
            n = len(unit.parts) + 1
            updated += unit.state_out[:n]
            initial += unit.state_out[n:]
            unit.state_in = None
        return (eps, *updated, *initial)


# --- which kernels this CPU runs ----------------------------------------------------------------


@functools.cache
def probe() -> bool:
    """Whether OpenVINO's integer convolution and matmul are exact on full-range u8 x s8 operands
    on this CPU (False: they saturate int16 pairs, without VNNI). Cached per process."""
    ov = require()
    core = ov.Core()
    exact = True
    for is_conv in (True, False):
        template = nn.Conv2d(64, 8, 3, padding=1) if is_conv else nn.Linear(64, 8)
        shape = (8, 64, 3, 3) if is_conv else (8, 64)
        codes = torch.full(shape, 127, dtype=torch.int8)
        layer = _probe_layer(template, codes)
        export = ExportLayer(layer, "direct").eval()
        x = torch.full((1, 64, 4, 4) if is_conv else (4, 64), 255.0)  # codes 255, zero point 0
        with torch.no_grad():
            model = ov.convert_model(export, example_input=(x,))
        compiled = core.compile_model(model, "CPU", compile_config(1))
        out = torch.from_numpy(compiled([x.numpy()])[0].copy()).double()
        with torch.no_grad():
            ref = export.op(x.double().float(), with_bias=False).double()
        exact &= bool(torch.allclose(out, ref, rtol=1e-5, atol=0))
    log.info("OpenVINO int8 kernels on %s: %s", kernels.cpu_isa(),
             "exact" if exact else "saturating (int16 pairs)")  # fmt: skip
    return exact


def _probe_layer(template: nn.Module, codes: torch.Tensor) -> QuantLayer:
    from modiff.quant.config import QuantConfig
    from modiff.quant.layers import LayerParams

    out = codes.shape[0]
    params = LayerParams(weight_codes=codes, weight_scale=torch.ones(out), bias=None,
                         act_scale=torch.tensor(1.0), act_zero_point=torch.tensor(128),
                         weight_zero_point=None)  # fmt: skip
    layer = QuantLayer(template, params, QuantConfig(backend="simulated", a_symmetric=True))
    # Codes 0..255 with zero point 0: the largest products (255 x 127) the kernels can see.
    layer.act_zero_point.fill_(0)
    return layer


def layer_scheme(layer: QuantLayer, exact: bool | None = None) -> str:
    """``direct`` where one integer call is exact on this CPU, else ``split``."""
    exact = probe() if exact is None else exact
    w = layer.weight_codes
    fits = kernels.fits_int16_pairs(layer.code_max, int(w.min()), int(w.max()))
    return "direct" if exact or fits else "split"


# --- the model --------------------------------------------------------------------------------


def quantized_units(model: nn.Module) -> dict[str, tuple[list[QuantLayer], int | None]]:
    """Each quantized layer of ``model`` by name: its parts (two for a split input) and split."""
    units = {}
    for name, module in model.named_modules():
        if isinstance(module, SplitInputLayer):
            units[name] = (list(module.parts), module.split)
        elif isinstance(module, QuantLayer) and ".parts." not in f".{name}.":
            units[name] = ([module], None)
    return units


def count_schemes(model: nn.Module) -> dict[str, int]:
    """How many layer parts of ``model`` run each scheme on this CPU."""
    counts: dict[str, int] = {}
    for layers, _ in quantized_units(model).values():
        for layer in layers:
            scheme = layer_scheme(layer)
            counts[scheme] = counts.get(scheme, 0) + 1
    return dict(sorted(counts.items()))


def export_model(model: nn.Module, config: Any) -> ExportRoot:
    """A copy of the quantized ``model`` as the graph to trace: its quantized layers as
    :class:`ExportUnit` s, its GroupNorms as :class:`ExportGroupNorm` s."""
    copied = copy.deepcopy(model)
    units = {
        name: ExportUnit([ExportLayer(layer, layer_scheme(layer)) for layer in layers], split,
                         config.modulation, config.warmup)
        for name, (layers, split) in quantized_units(copied).items()
    }  # fmt: skip
    for name, unit in units.items():
        copied.set_submodule(name, unit)
    for name, module in list(copied.named_modules()):
        if isinstance(module, nn.GroupNorm):
            copied.set_submodule(name, ExportGroupNorm(module))
    return ExportRoot(copied, [unit for unit in units.values() if unit.modulated]).eval()


def _cache_shapes(root: ExportRoot, x: torch.Tensor, t: torch.Tensor) -> list[torch.Size]:
    """Each cache's shape for inputs like ``x``: from one float pass that records unit inputs."""
    shapes: dict[int, list[torch.Size]] = {}
    handles = []
    for unit in root.units:

        def hook(mod, args, out):
            shapes[id(mod)] = [xp.shape for xp in mod._inputs(args[0])] + [out.shape]

        handles.append(unit.register_forward_hook(hook))
        unit.modulated = False  # plain for this pass: no caches needed
    try:
        with torch.no_grad():
            root.model(x, t)
    finally:
        for unit, handle in zip(root.units, handles, strict=True):
            handle.remove()
            unit.modulated = True
    return [shape for unit in root.units for shape in shapes[id(unit)]]


@dataclass
class Graphs:
    """The OpenVINO models of one input shape: ``step`` (caches as state, one call per step) and,
    for MoDiff, ``warm_up`` (a trajectory's first call: the warm-up caches built in the graph,
    returning eps and the caches after that step, which then become ``step``'s state)."""

    step: Any
    warm_up: Any | None


def trace(root: ExportRoot, x: torch.Tensor, t: torch.Tensor) -> tuple[Any, int]:
    """``root`` as an OpenVINO model with a dynamic batch dimension, and its number of caches.

    Traced on one image of ``x``: tracing at the sampling batch size took 45 s and 8.5 GB more
    memory for the CIFAR-10 model with MoDiff; :func:`specialize` sets the batch afterwards."""
    ov = require()
    x, t = x[:1], t[:1]
    caches = [torch.zeros(s) for s in _cache_shapes(root, x, t)]
    example = (x, t, *caches)
    inputs = [ov.PartialShape([-1, *v.shape[1:]]) for v in example]
    with torch.no_grad():
        return ov.convert_model(root, example_input=example, input=inputs), len(caches)


def specialize(graph: Any, n_caches: int, batch: int) -> Graphs:
    """The models to compile for ``batch`` images (static shapes: the CPU plugin keeps the
    states in place only with them)."""
    ov = require()
    graph = graph.clone()
    shapes = {}
    for i, parameter in enumerate(graph.get_parameters()):
        shape = parameter.get_partial_shape()
        dims = [shape[k].get_length() for k in range(1, shape.rank.get_length())]
        shapes[i] = ov.PartialShape([batch, *dims])
    graph.reshape(shapes)
    if not n_caches:
        return Graphs(graph, None)
    return Graphs(_stateful(graph.clone(), n_caches), _warm_up(graph, n_caches))


def _stateful(graph: Any, n: int) -> Any:
    """Cache inputs read from state variables, updated caches assigned back to them.

    No ReadValue initializer: the CPU plugin then keeps each state in place (a plain ReadValue
    and its Assign cost no copy; with an initializer subgraph the caches were copied every
    step, 2.2x the step time on the CIFAR-10 model)."""
    ov = require()
    from openvino import opset6
    from openvino.op.util import Variable, VariableInfo

    parameters, results = graph.get_parameters(), graph.get_results()
    sinks = []
    for i, parameter in enumerate(parameters[2 : 2 + n]):
        info = VariableInfo()
        info.data_shape = parameter.get_partial_shape()
        info.data_type = parameter.get_element_type()
        info.variable_id = cache_name(i)
        variable = Variable(info)
        read = opset6.read_value(variable)
        _replace(parameter, read.output(0))
        sinks.append(opset6.assign(_as_node(results[1 + i].input_value(0)), variable))
    return ov.Model([results[0]], sinks, list(parameters[:2]), "modiff-step")


def _warm_up(graph: Any, n: int) -> Any:
    """Cache inputs wired to their warm-up values; outputs eps and the updated caches."""
    ov = require()
    parameters, results = graph.get_parameters(), graph.get_results()
    for i, parameter in enumerate(parameters[2 : 2 + n]):
        _replace(parameter, results[1 + n + i].input_value(0))
    return ov.Model(list(results[: 1 + n]), list(parameters[:2]), "modiff-warm-up")


def cache_name(index: int) -> str:
    return f"modiff_cache_{index}"


def _replace(parameter: Any, source: Any) -> None:
    for target in list(parameter.output(0).get_target_inputs()):
        target.replace_source_output(source)


def _as_node(output: Any) -> Any:
    """A node whose only output is ``output`` (Assign takes a node, not one of its outputs)."""
    node = output.get_node()
    if node.get_output_size() == 1:
        return node
    from openvino import opset13

    return opset13.convert(output, output.get_element_type())


def integer_ops(compiled: Any) -> dict[str, list[str]]:
    """The convolutions and matmuls of a compiled model by the precision they run in, as the
    runtime model says: their original names (``<module>/aten::.../Convolution``) listed under
    ``integer`` (u8/i8) and ``float``. A runtime node may fuse several original ones (a
    matmul inside a fused subgraph is found by its original name too)."""
    found: dict[str, list[str]] = {"integer": [], "float": []}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        names = info["originalLayersNames"].astype(str).split(",")
        computes = [n for n in names
                    if any(part.startswith(MATMUL_TYPES) for part in n.split("/")[1:])]  # fmt: skip
        if not computes:
            continue
        precision = info["runtimePrecision"].astype(str)
        found["integer" if precision in INTEGER_PRECISIONS else "float"] += computes
    return found


class OpenVINOModel(nn.Module):
    """``model(x, t)`` run by compiled OpenVINO models, one set per input shape.

    ``model`` is the quantized torch model (simulated layers: the float reference of the same
    parameters, kept as ``self.model`` for saving and inspection). Graphs are compiled on first
    use of a shape, from the current parameters. MoDiff's caches live in the infer requests'
    state; a trajectory's first call runs the warm-up graph and hands its caches to that state.
    """

    def __init__(self, model: nn.Module, config: Any):
        super().__init__()
        require()
        why = unsupported(config)
        if why:
            raise ValueError(why)
        self.model = model
        self.config = config
        self.engine_schemes = count_schemes(model)
        self._traced: tuple[Any, int] | None = None  # (OpenVINO model, number of caches)
        self._compiled: dict[tuple, tuple[Any, Any | None]] = {}  # shape: (step, warm-up)
        self._requests: dict[tuple, Any] = {}
        self._fresh: set[tuple] = set()  # shapes whose next call starts a trajectory

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError("backend 'openvino' runs on the CPU; use 'simulated' on CUDA")
        x = x.float().contiguous()
        t = t.float().reshape(x.shape[0]).contiguous()
        key = tuple(x.shape)
        if key not in self._compiled:
            self._compile(x, t)
        step, warm_up = self._compiled[key]
        request = self._requests[key]
        if warm_up is not None and key in self._fresh:
            return self._warm_up(warm_up, request, x, t, key)
        request.infer({0: x.numpy(), 1: t.numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    def _warm_up(self, warm_up, request, x, t, key) -> torch.Tensor:
        warm_request = warm_up.create_infer_request()  # dropped after: its buffers are freed
        warm_request.infer({0: x.numpy(), 1: t.numpy()})
        states = {state.name: state for state in request.query_state()}
        for i in range(len(states)):
            states[cache_name(i)].state = warm_request.get_output_tensor(1 + i)
        self._fresh.discard(key)
        return torch.from_numpy(warm_request.get_output_tensor(0).data.copy())

    def _compile(self, x: torch.Tensor, t: torch.Tensor) -> None:
        ov = require()
        if self._traced is None:
            self._traced = trace(export_model(self.model, self.config), x, t)
        log.info("compiling the OpenVINO graph for inputs %s (layer parts: %s)", tuple(x.shape),
                 ", ".join(f"{n} {k}" for k, n in self.engine_schemes.items()))  # fmt: skip
        graphs = specialize(*self._traced, batch=x.shape[0])
        core = ov.Core()
        step = core.compile_model(graphs.step, "CPU", compile_config())
        warm_up = None
        if graphs.warm_up is not None:
            warm_up = core.compile_model(graphs.warm_up, "CPU", compile_config())
        key = tuple(x.shape)
        self._compiled[key] = (step, warm_up)
        self._requests[key] = step.create_infer_request()
        self._fresh.add(key)

    def compiled(self, shape: tuple[int, ...]) -> Any:
        """The compiled step model for inputs of ``shape`` (after a call with that shape)."""
        return self._compiled[tuple(shape)][0]

    def reset_cache(self) -> None:
        """A new trajectory: the next call of every shape runs the warm-up."""
        self._fresh = set(self._compiled)

    def cache_bytes(self) -> int:
        """Bytes of MoDiff state held by the infer requests."""
        total = 0
        for request in self._requests.values():
            for state in request.query_state():
                total += int(np.prod(state.state.shape)) * state.state.element_type.size
        return total

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._traced = None  # derived from the parameters: traced and compiled on next use
        self._compiled.clear()
        self._requests.clear()
        self._fresh.clear()

    def engine_record(self) -> dict[str, Any]:
        """What ran the model, for its records (:func:`modiff.quant.layers.kernel_record`)."""
        ov = require()
        kind = "exact" if probe() else "saturating (int16 pairs): split where needed"
        return {"engine": f"openvino {ov.__version__}", "int8_kernels": kind,
                "schemes": dict(self.engine_schemes)}  # fmt: skip

    def extra_repr(self) -> str:
        return f"OpenVINO, W{self.config.w_bits}A{self.config.a_bits}, {self.config.modulation}"
