"""The native backend's integer sums against exact integer arithmetic, on every CPU.

Layers get unit scales and integer-valued inputs, so their float32 outputs are the int32 sums
themselves (all below 2^24 here, so float32 holds them exactly); the reference is the same
conv/linear in float64 on the signed integer values. Without VNNI, oneDNN's kernels saturate
int16 pairs of products: these tests fail there unless the layer runs an exact scheme.
``tests/test_isa.py`` reruns them with oneDNN capped to AVX2 and SSE4.1, so every machine
tests the saturating kernels too.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modiff.quant import QuantConfig, kernels
from modiff.quant.layers import LayerParams, QuantLayer, kernel_record, native_schemes
from modiff.quant.quantizer import act_grid, weight_grid

pytestmark = [
    pytest.mark.native,
    pytest.mark.skipif(not kernels.available(), reason="no oneDNN int8 kernels in this build"),
]

# (w_bits, a_bits, symmetric, zero point of asymmetric activations)
GRIDS = [
    (8, 8, True, None),
    (8, 8, False, 0),
    (8, 8, False, 37),
    (8, 8, False, 255),
    (8, 7, True, None),
    (7, 8, True, None),
    (8, 6, False, 5),
    (4, 4, True, None),
]
TEMPLATES = {
    "conv3x3": lambda: nn.Conv2d(32, 8, 3, padding=1, bias=False),
    "conv1x1": lambda: nn.Conv2d(64, 8, 1, bias=False),  # runs on the linear kernel
    "linear": lambda: nn.Linear(256, 8, bias=False),
}


def _layer(template: nn.Module, w_bits, a_bits, symmetric, zero_point, weights, **config):
    zp = 128 if symmetric else zero_point
    out_channels = weights.shape[0]
    params = LayerParams(
        weight_codes=weights,
        weight_scale=torch.ones(out_channels),
        bias=None,
        act_scale=torch.tensor(1.0) if config.get("a_scale", "static") == "static" else None,
        act_zero_point=torch.tensor(zp),
    )
    cfg = QuantConfig(w_bits=w_bits, a_bits=a_bits, a_symmetric=symmetric, backend="native",
                      **config)  # fmt: skip
    return QuantLayer(template, params, cfg)


def _operands(name, w_bits, a_bits, symmetric, zero_point, adversarial, seed=0):
    """Weights (int8 codes) and signed integer inputs covering the whole grid; ``adversarial``:
    every input and weight at the grid's largest value (the sums that saturate first)."""
    g = torch.Generator().manual_seed(seed)
    template = TEMPLATES[name]()
    w_lo, w_hi = weight_grid(w_bits)
    qmin, qmax = act_grid(a_bits, symmetric)
    zp = 128 if symmetric else zero_point
    lo, hi = qmin - zp, qmax - zp  # signed values the grid holds
    x_shape = (3, template.in_features) if name == "linear" else (3, template.in_channels, 5, 5)
    if adversarial:
        w = torch.full(template.weight.shape, w_hi, dtype=torch.int8)
        big = hi if abs(hi) >= abs(lo) else lo
        return template, w, torch.full(x_shape, float(big))
    w = torch.randint(w_lo, w_hi + 1, template.weight.shape, generator=g, dtype=torch.int8)
    x = torch.randint(lo, hi + 1, x_shape, generator=g).float()
    return template, w, x


def _exact(template, w, x):
    if isinstance(template, nn.Conv2d):
        return F.conv2d(x.double(), w.double(), padding=template.padding)
    return F.linear(x.double(), w.double())


@pytest.mark.parametrize("adversarial", [False, True], ids=["random", "largest"])
@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"w{g[0]}a{g[1]}{'s' if g[2] else 'z'}{g[3]}")
def test_native_sums_equal_exact_integer_sums(grid, name, adversarial):
    template, w, x = _operands(name, *grid, adversarial)
    layer = _layer(template, *grid, w)
    if name != "linear":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = layer(x)
    assert torch.equal(out.double(), _exact(template, w, x)), (layer.scheme, kernels.probe())


@pytest.mark.parametrize("granularity", ["per_tensor", "per_sample"])
def test_dynamic_scales_give_exact_sums(granularity):
    """Symmetric dynamic scales are max|x| / 127: inputs whose every sample reaches +-127 get a
    unit scale, so the output is the exact integer sum again."""
    template, w, x = _operands("conv3x3", 8, 8, True, None, adversarial=False, seed=1)
    x = x.clamp(-127, 127)
    x[:, 0, 0, 0] = 127.0
    layer = _layer(template, 8, 8, True, None, w, a_scale="dynamic", a_granularity=granularity)
    with torch.no_grad():
        out = layer(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(out.double(), _exact(template, w, x))


def test_linear_on_more_than_two_dimensions_uses_the_last_as_features():
    template, w, _ = _operands("linear", 8, 8, True, None, adversarial=False)
    x = torch.randint(-128, 128, (2, 3, 4, 256), generator=torch.Generator().manual_seed(2))
    layer = _layer(template, 8, 8, True, None, w)
    with torch.no_grad():
        out = layer(x.float())
    assert torch.equal(out.double(), _exact(template, w, x.float()))


@pytest.mark.parametrize("name", ["conv3x3", "conv1x1"])
def test_modulated_accumulation_is_exact(name):
    """MoDiff adds each step's integer sums into its output cache inside the kernel."""
    template, w, x = _operands(name, 8, 8, True, None, adversarial=False, seed=3)
    layer = _layer(template, 8, 8, True, None, w, modulation="compensated", warmup="quantized")
    g = torch.Generator().manual_seed(4)
    x = x.clamp(-100, 100).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(3):  # warm-up from empty caches, then two steps of integer residuals
            out = layer(x)
            assert torch.equal(out.double(), _exact(template, w, x))
            x = (x + torch.randint(-20, 21, x.shape, generator=g)).clamp(-128, 127)


def test_scheme_follows_what_the_probe_found():
    """Saturating kernels: only operands too large for int16 pairs are split; the bits stay."""
    probe = kernels.probe()
    for grid in GRIDS:
        for name in TEMPLATES:
            template, w, _ = _operands(name, *grid, adversarial=True)
            layer = _layer(template, *grid, w)
            kind = "conv" if name == "conv3x3" else "linear"
            too_large = grid[0] == 8 and grid[1] == 8
            assert layer.scheme == ("split" if too_large and not probe.exact(kind) else "direct")
            assert native_schemes(nn.Sequential(layer)) == {layer.scheme: 1}
            record = kernel_record(nn.Sequential(layer))
            assert record["schemes"] == {layer.scheme: 1}
            assert record["int8_kernels"] == probe.describe()
            assert record["cpu_isa"] == kernels.cpu_isa()
            assert f"W{grid[0]}A{grid[1]}" in repr(layer) and layer.scheme in repr(layer)


def test_probe_agrees_with_the_cpu():
    """VNNI/AMX kernels are exact; without them (or with oneDNN capped below them) they
    saturate. Where the CPU flags cannot say (another architecture), the probe must still run."""
    probe = kernels.probe()
    flags = kernels.cpu_flags()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    x86 = bool({"avx2", "sse4_1"} & flags)
    vnni = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
    described = probe.describe()
    assert kernels.isa_record()["cpu_isa"] == kernels.cpu_isa()
    if x86 and (cap in ("SSE41", "AVX", "AVX2") or not vnni):
        assert not probe.conv_exact and not probe.linear_exact
        assert described == "saturating (int16 pairs)"
    elif {"avx512_vnni", "amx_int8"} & flags and not cap:
        assert probe.conv_exact and probe.linear_exact
        assert described == "exact"
    cap_recorded = kernels.isa_record()["onednn_max_cpu_isa"]
    assert cap_recorded == (os.environ.get("ONEDNN_MAX_CPU_ISA") or None)


def test_split_scheme_is_needed_only_where_int16_pairs_overflow():
    assert kernels.fits_int16_pairs(128, -128, 127)  # 7-bit codes with any int8 weight
    assert kernels.fits_int16_pairs(255, -64, 64)  # any code with 7-bit weights
    assert not kernels.fits_int16_pairs(129, -128, 127)
    assert not kernels.fits_int16_pairs(255, -65, 64)
    for zp in range(256):  # both halves of every code lie in 0..128 and sum to its value
        codes = torch.arange(256, dtype=torch.uint8)[None]
        halves = kernels.split_codes(codes, zp, -1).short()
        assert int(halves.min()) >= 0 and int(halves.max()) <= kernels.SPLIT_HALF_MAX
        offset = kernels.split_offset(zp)
        assert torch.equal(halves[:, :256] + halves[:, 256:] - 2 * offset, codes.short() - zp)
