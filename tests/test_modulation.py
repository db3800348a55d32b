"""MoDiff's modulated quantization: equivalence, error compensation, cache life cycle."""

import pytest
import torch
from conftest import ROOT
from torch import nn

from modiff.checkpoint import load_into
from modiff.config import load_params
from modiff.diffusion import beta_schedule, ddim_sample
from modiff.models import build_model
from modiff.quant import QuantConfig, quantize_, reset_caches
from modiff.quant.layers import LayerParams, QuantLayer, SplitInputLayer, cache_bytes
from modiff.quant.quantizer import quantize_weight, search_weight_params
from modiff.timesteps import timestep_sequence

BACKENDS = ["native", "simulated"]
BACKEND_PARAMS = [pytest.param("native", marks=pytest.mark.native), "simulated"]


def _layer(modulation, backend, a_bits=8, scale=None, warmup="fp", kernel=3, bias=True, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 6, kernel, padding=kernel // 2, bias=bias)
    w_scale, w_zp = search_weight_params(conv.weight, 8)
    static = scale is not None
    config = QuantConfig(a_bits=a_bits, a_scale="static" if static else "dynamic", backend=backend,
                         modulation=modulation, warmup=warmup)  # fmt: skip
    params = LayerParams(
        weight_codes=quantize_weight(conv.weight.detach(), w_scale, w_zp, 8),
        weight_scale=w_scale,
        bias=conv.bias.detach() if bias else None,
        act_scale=torch.tensor(scale) if static else None,
        act_zero_point=torch.tensor(128) if static else None,
    )
    return QuantLayer(conv, params, config)


def _random_walk(steps, step_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 5, 5, generator=g)
    seq = [x]
    for _ in range(steps - 1):
        x = x + step_size * torch.randn(x.shape, generator=g)
        seq.append(x)
    return seq


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("modulation", ["compensated", "uncompensated"])
@pytest.mark.parametrize("kernel", [3, 1])  # a 1x1 conv runs on the linear kernel
def test_output_cache_equals_layer_on_reconstructed_input(backend, modulation, kernel):
    layer = _layer(modulation, backend, kernel=kernel)
    for x in _random_walk(30, 0.05):
        out = layer(x)
        expected = layer.float_op(layer.a_hat, layer.bias)  # bias once, on A(a_hat)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("kernel", [1, 3])
def test_split_input_halves_share_one_output_cache(backend, kernel):
    """cat([h, skip]) split in two layers: one output cache holds the sum, bias once."""
    first = _layer("compensated", backend, kernel=kernel)
    second = _layer("compensated", backend, kernel=kernel, bias=False, seed=1)  # other weights
    split = SplitInputLayer([first, second], split=4)
    heads, tails = _random_walk(20, 0.05), _random_walk(20, 0.05, seed=1)
    for head, tail in zip(heads, tails, strict=True):
        out = split(torch.cat([head, tail], 1))
        expected = first.float_op(first.a_hat, first.bias) + second.float_op(second.a_hat, None)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert out.data_ptr() == first.o_hat.data_ptr() and second.o_hat is None  # one cache
    assert cache_bytes(split) == 2 * heads[0].numel() * 4 + out.numel() * 4


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_error_compensation_keeps_input_error_within_half_a_step(backend):
    scale = 0.02
    seq = _random_walk(300, scale)  # increments of one step: never clipped on a 4-bit grid
    comp = _layer("compensated", backend, a_bits=4, scale=scale)
    uncomp = _layer("uncompensated", backend, a_bits=4, scale=scale)
    comp_err, uncomp_err = [], []
    for x in seq:
        comp(x)
        uncomp(x)
        comp_err.append((x - comp.a_hat).abs().max().item())
        uncomp_err.append((x - uncomp.a_hat).abs().max().item())
    assert max(comp_err) <= scale / 2 * (1 + 1e-4)
    # Without compensation the rounding errors add up like a random walk.
    assert uncomp_err[-1] > 5 * scale
    assert sum(uncomp_err[200:]) > 1.5 * sum(uncomp_err[1:101])  # ~sqrt(t) growth


@pytest.mark.parametrize("warmup", ["fp", "quantized", "repeat:4"])
def test_warmup_modes(warmup):
    layer = _layer("compensated", "simulated", scale=0.01, warmup=warmup)
    x = (torch.randn(2, 4, 5, 5) * 0.3).clamp(-1, 1)  # inside the grid's range of +-1.27
    out = layer(x)
    if warmup == "fp":
        assert torch.equal(layer.a_hat, x)
        torch.testing.assert_close(out, layer.float_op(x, layer.bias))
    else:
        # From empty caches: a_hat is x on the grid, within half a step (repeats add nothing
        # once the residual is below half a step), and the output the layer applied to it.
        err = (x - layer.a_hat).abs().max().item()
        assert 0 < err <= 0.005 * (1 + 1e-4)
        assert torch.equal(layer.a_hat, torch.round(layer.a_hat / 0.01) * 0.01)
        torch.testing.assert_close(out, layer.float_op(layer.a_hat, layer.bias))
    with pytest.raises(ValueError, match="warmup"):
        QuantConfig(modulation="compensated", warmup="twice")


def test_cache_misuse_is_an_error_and_reset_starts_over():
    layer = _layer("compensated", "simulated")
    x = torch.randn(2, 4, 5, 5)
    layer(x)
    with pytest.raises(RuntimeError, match="reset_caches"):
        layer(torch.randn(3, 4, 5, 5))
    with pytest.raises(RuntimeError, match="reset_caches"):
        layer(x.double())
    model = nn.Sequential(layer)
    reset_caches(model)
    assert layer.a_hat is None
    out = layer(torch.randn(3, 4, 5, 5))  # a new batch after the reset: warm-up again
    assert out.shape == (3, 6, 5, 5)


@pytest.fixture(scope="module")
def digits():
    preset = load_params(ROOT / "params.yaml").preset_layout("digits")
    state = load_into(build_model(preset), ROOT / "data/pretrained/digits_ddim.pt").state_dict()
    return preset, state


def _modulated(preset, state, **kw):
    m = build_model(preset).eval()
    m.load_state_dict(state)
    return quantize_(m, QuantConfig(a_scale="dynamic", modulation="compensated", **kw))


def test_sampler_resets_caches_for_every_batch(digits):
    preset, state = digits
    model = _modulated(preset, state, a_bits=6)
    seq, betas = timestep_sequence(10, "quad"), beta_schedule(preset)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    first = ddim_sample(model, x_T, seq, betas)
    second = ddim_sample(model, x_T, seq, betas)  # would fail or differ without a reset
    assert torch.equal(first, second)
    ddim_sample(model, x_T[:2], seq, betas)  # another batch size is fine after a reset


@pytest.mark.native
def test_native_and_simulated_modulated_trajectories_agree(digits):
    """Over a whole 20-step trajectory the backends differ only by float-vs-int32 rounding
    flips, which dynamic scales and the caches carry forward. Bound: the rms difference of the
    final x stays below half the quantization error itself and below 0.01 on the [-1, 1]
    scale (about one uint8 grey level); measured 0.0023 against an error of 0.0078."""
    preset, state = digits
    seq, betas = timestep_sequence(20, "quad"), beta_schedule(preset)
    x_T = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    fp = build_model(preset).eval()
    fp.load_state_dict(state)
    ref = ddim_sample(fp, x_T, seq, betas)
    out = {b: ddim_sample(_modulated(preset, state, a_bits=6, backend=b), x_T, seq, betas)
           for b in BACKENDS}  # fmt: skip

    def rms(v):
        return v.pow(2).mean().sqrt().item()

    diff = rms(out["native"] - out["simulated"])
    assert diff < 0.5 * rms(out["simulated"] - ref) and diff < 0.01


@pytest.mark.native
def test_output_kept_by_the_caller_is_not_overwritten():
    layer = _layer("compensated", "native", scale=0.05)
    seq = _random_walk(4, 0.05)
    outputs = [layer(x) for x in seq]  # all kept: the layer must not update them in place
    fresh = _layer("compensated", "native", scale=0.05)
    for x, kept in zip(seq, outputs, strict=True):
        torch.testing.assert_close(kept, fresh(x).clone(), rtol=0, atol=0)


@pytest.mark.native
def test_output_dropped_by_the_caller_is_updated_in_place():
    layer = _layer("compensated", "native", scale=0.05)
    addresses = {layer(x).data_ptr() for x in _random_walk(4, 0.05)}  # each output dropped at once
    assert len(addresses) == 1  # so the kernel added into the same cache every step, no copy


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_an_output_modified_in_place_is_an_error_not_a_corrupt_cache(backend):
    layer = _layer("compensated", backend, scale=0.05)
    model = nn.Sequential(layer, nn.ReLU(inplace=True))
    seq = _random_walk(3, 0.05)
    model(seq[0])
    with pytest.raises(RuntimeError, match="modified in place.*clone it"):
        model(seq[1])
    reset_caches(model)
    plain = nn.Sequential(layer, nn.ReLU())  # the same layer with an out-of-place consumer
    assert all(plain(x).min() >= 0 for x in seq)


@pytest.mark.slow
@pytest.mark.parametrize("per_sample", [False, True])
def test_compiled_fused_passes_equal_eager(monkeypatch, per_sample):
    from modiff.quant import fused

    monkeypatch.setenv("MODIFF_COMPILE", "1")
    g = torch.Generator().manual_seed(0)
    x, base = torch.randn(2, 2, 8, 5, 5, generator=g).unbind(0)
    x = x.contiguous(memory_format=torch.channels_last)
    lo, hi = fused.residual_range(x, base, per_sample)
    lo_ref, hi_ref = fused.residual_range_eager(x, base, per_sample)
    torch.testing.assert_close((lo, hi), (lo_ref, hi_ref), rtol=0, atol=0)
    shape = (-1, 1, 1, 1) if per_sample else ()
    scale = (torch.maximum(-lo, hi) / 127).reshape(shape)
    zero_point = torch.full_like(scale, 128.0)
    a_hat, a_hat_ref = base.clone(), base.clone()
    codes = fused.residual_codes_(x, a_hat, a_hat, scale, zero_point, 0, 255)
    codes_ref = fused.residual_codes_eager(x, a_hat_ref, a_hat_ref, scale, zero_point, 0, 255)
    assert not fused.residual_codes_.failed
    assert codes.dtype == torch.uint8
    torch.testing.assert_close(codes, codes_ref, rtol=0, atol=0)
    torch.testing.assert_close(a_hat, a_hat_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_many_layouts_and_bit_widths_stay_compiled(monkeypatch):
    from modiff.quant import fused

    monkeypatch.setenv("MODIFF_COMPILE", "1")
    g = torch.Generator().manual_seed(1)
    shapes = [(2, 4, 6, 6), (2, 8, 3, 3), (3, 5), (2, 1, 8, 8), (2, 16, 1, 1)]
    for shape in shapes:
        for channels_last in (False, True):
            for qmax in (255, 135):  # 8 and 4 bits
                x = torch.randn(shape, generator=g)
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                a_hat = torch.zeros_like(x)
                one = torch.tensor(0.05)
                fused.residual_codes_(x, a_hat, a_hat, one, torch.tensor(128.0), 255 - qmax, qmax)
    assert not fused.residual_codes_.failed


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("modulation", ["none", "compensated"])
def test_loading_a_state_dict_rebuilds_what_the_layer_derives_from_it(backend, modulation):
    """Packed and dequantised weights follow the loaded codes: the layer computes what a layer
    built from those codes computes, at the warm-up (float) and at later (integer) steps."""
    layer, other = (
        _layer(modulation, backend, scale=s, seed=seed) for seed, s in ((0, 0.05), (1, 0.07))
    )
    inputs = [torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    assert not torch.equal(layer(inputs[0]), other(inputs[0]))
    layer.load_state_dict(other.state_dict())
    reset_caches(layer), reset_caches(other)
    for x in inputs:
        assert torch.equal(layer(x).clone(), other(x).clone())


@pytest.mark.native
def test_a_refused_native_call_leaves_the_caches_as_they_were():
    layer = _layer("compensated", "native", scale=0.05).to("meta")  # as a non-CPU device would
    with pytest.raises(RuntimeError, match="runs on the CPU"):
        layer(torch.randn(2, 4, 5, 5, device="meta"))
    assert layer.a_hat is None and layer.o_hat is None


@pytest.mark.native
def test_plain_native_layers_refuse_tensors_off_the_cpu():
    layer = _layer("none", "native", scale=0.05)
    with pytest.raises(RuntimeError, match="runs on the CPU; use 'simulated'"):
        layer(torch.randn(2, 4, 5, 5, device="meta"))  # as a CUDA tensor would be


def test_plain_layers_carry_no_modulation_state():
    layer = _layer("none", "simulated", scale=0.05)
    reset_caches(nn.Sequential(layer))
    layer(torch.randn(2, 4, 5, 5))
    assert not any(hasattr(layer, name) for name in ("a_hat", "o_hat", "a_prev", "_handed"))
    assert cache_bytes(layer) == 0


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_modulated_layers_run_under_inference_mode(backend):
    """Inference tensors keep no version counter: the layer still steps (the benchmark's mode)."""
    layer, fresh = (_layer("compensated", backend, scale=0.05) for _ in range(2))
    seq = _random_walk(3, 0.05)
    with torch.inference_mode():
        outputs = [layer(x).clone() for x in seq]
    for x, out in zip(seq, outputs, strict=True):
        torch.testing.assert_close(out, fresh(x).clone(), rtol=0, atol=0)
