"""Backend ``openvino``: exact integer layers, MoDiff's caches as OpenVINO state, errors.

Marked ``openvino``: tests/test_isa.py reruns them with oneDNN (and so OpenVINO's CPU plugin)
capped to AVX2 and SSE4.1, where the u8 x s8 kernels saturate int16 pairs.
"""

import logging
import os

import pytest
import torch
from conftest import tiny_config
from torch import nn

from modiff.diffusion import ddim_sample
from modiff.models import build_model
from modiff.quant import QuantConfig, kernels, quantize_, reset_caches
from modiff.quant import openvino as qov
from modiff.quant.api import load_quantized, save_quant_params
from modiff.quant.layers import LayerParams, QuantLayer, kernel_record
from modiff.quant.quantizer import act_grid

pytestmark = [
    pytest.mark.openvino,
    pytest.mark.skipif(not qov.available(), reason="OpenVINO is not installed"),
]

CAPPED = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ("SSE41", "AVX", "AVX2")


def _calibration(n: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 3, 8, 8, generator=g)
    ts = torch.randint(0, 1000, (n,), generator=g).float()
    return {"xs": xs, "ts": ts, "xs_prev": xs * 1.02, "ts_prev": (ts + 20).clamp(max=999)}


@pytest.fixture(scope="module")
def tiny_state():
    torch.manual_seed(0)
    return build_model(tiny_config()).eval().state_dict()


def _tiny(state) -> nn.Module:
    model = build_model(tiny_config()).eval()
    model.load_state_dict(state)
    return model


# --- one layer: the compiled integer op equals the simulated layer --------------------------------

LAYERS = {
    "conv3x3": lambda: nn.Conv2d(64, 32, 3, padding=1),
    "conv3x3-stride2": lambda: nn.Conv2d(64, 32, 3, stride=2, padding=1),
    "conv1x1": lambda: nn.Conv2d(64, 32, 1),
    "linear": lambda: nn.Linear(64, 32),
}
GRIDS = [  # (w_bits, a_bits, symmetric activations)
    (8, 8, True),
    (8, 7, True),
    (7, 8, True),
    (8, 4, True),
    (4, 8, False),
]


def _saturating_layer(template: nn.Module, w_bits: int, a_bits: int, symmetric: bool):
    """A quantized layer whose weights sit at the grid's ends (+-127 at 8 bits) and an input
    whose codes include 0, 1, 254, 255 (or the narrower grid's ends), zero and out-of-range
    values: every value on the grid (no rounding ties) but those clamped."""
    g = torch.Generator().manual_seed(w_bits * 10 + a_bits)
    out_ch = template.weight.shape[0]
    w_lo, w_hi = -(2 ** (w_bits - 1)) + (w_bits == 8), 2 ** (w_bits - 1) - 1
    codes = torch.randint(w_lo, w_hi + 1, template.weight.shape, generator=g)
    codes.view(out_ch, -1)[:, ::3] = w_hi  # many products at the largest weight
    codes.view(out_ch, -1)[::2, 1::3] = w_lo
    qmin, qmax = act_grid(a_bits, symmetric)
    zero_point = 128 if symmetric else 3
    scale = 2.0**-5
    params = LayerParams(
        weight_codes=codes.to(torch.int8), weight_scale=torch.rand(out_ch, generator=g) / 64 + 1e-3,
        bias=torch.randn(out_ch, generator=g), act_scale=torch.tensor(scale),
        act_zero_point=torch.tensor(zero_point),
    )  # fmt: skip
    config = QuantConfig(w_bits=w_bits, a_bits=a_bits, a_symmetric=symmetric, backend="simulated",
                         w_symmetric=True)  # fmt: skip
    layer = QuantLayer(template, params, config)
    shape = (4, 64, 6, 6) if isinstance(template, nn.Conv2d) else (24, 64)
    x_codes = torch.randint(qmin, qmax + 1, shape, generator=g)
    flat = x_codes.view(-1)
    flat[::5], flat[1::5], flat[2::7] = qmax, qmin, zero_point  # the ends and exact zeros
    flat[3::11] = qmax - 1
    x = (x_codes - zero_point).float() * scale
    x.view(-1)[4::13] *= 3.0  # beyond the range: clamped
    return layer, x


@pytest.mark.parametrize(
    "grid", GRIDS, ids=lambda g: "w{}a{}{}".format(g[0], g[1], "" if g[2] else "-asym")
)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_compiled_layer_equals_simulated_layer(kind, grid):
    import openvino as ov

    layer, x = _saturating_layer(LAYERS[kind](), *grid)
    scheme = qov.layer_scheme(layer)
    export = qov.ExportLayer(layer, scheme).eval()
    with torch.no_grad():
        compiled = ov.Core().compile_model(
            ov.convert_model(export, example_input=(x,)), "CPU", qov.compile_config()
        )
        out = torch.from_numpy(compiled([x.numpy()])[0].copy())
        ref = layer(x)
    found = qov.integer_ops(compiled)
    assert found["integer"] and not found["float"], found
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-4, f"{kind} {grid} ({scheme}): relative max difference {rel:.2e}"


def test_scheme_is_split_only_where_pairs_could_overflow():
    layer8, _ = _saturating_layer(LAYERS["conv3x3"](), 8, 8, True)
    layer7, _ = _saturating_layer(LAYERS["conv3x3"](), 8, 7, True)
    assert qov.layer_scheme(layer8, exact=True) == "direct"
    assert qov.layer_scheme(layer8, exact=False) == "split"
    assert qov.layer_scheme(layer7, exact=False) == "direct"  # codes 0..127: exact in one call


def test_probe_agrees_with_the_cpu():
    """OpenVINO's integer kernels are exact with VNNI/AMX, and saturate without them or with
    oneDNN capped below them (the plugin honours ``ONEDNN_MAX_CPU_ISA``)."""
    flags = kernels.cpu_flags()
    vnni = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
    assert qov.probe() is (vnni and not CAPPED)


# --- the whole model ------------------------------------------------------------------------------


def _trajectory_error(model, fp32, steps: int = 10) -> float:
    """rms of the final samples' difference from FP32's after ``steps`` DDIM steps."""
    from modiff.diffusion import beta_schedule
    from modiff.timesteps import timestep_sequence

    cfg = tiny_config()
    seq = timestep_sequence(steps, "uniform", 1000)
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = ddim_sample(fp32, x_T, seq, beta_schedule(cfg))
        out = ddim_sample(model, x_T, seq, beta_schedule(cfg))
    return (out - ref).pow(2).mean().sqrt().item()


@pytest.mark.parametrize(
    "modulation, bits", [("none", (8, 8)), ("compensated", (8, 8)), ("compensated", (8, 4))]
)
def test_model_error_is_no_larger_than_the_simulated_reference(tiny_state, modulation, bits):
    """rms(openvino - FP32) <= 1.15 x rms(simulated - FP32) over a 10-step trajectory: the
    engine adds no error of its own (a saturating engine is several times the reference). And
    the compiled model's runtime precisions: every part of every quantized conv is a u8/i8
    convolution, and the only float matmuls are the attention's."""
    w_bits, a_bits = bits
    config = QuantConfig(w_bits=w_bits, a_bits=a_bits, modulation=modulation)
    cal = _calibration()
    fp32 = _tiny(tiny_state)
    simulated = quantize_(
        _tiny(tiny_state), QuantConfig(**{**config.to_dict(), "backend": "simulated"}), cal
    )
    compiled = quantize_(
        _tiny(tiny_state), QuantConfig(**{**config.to_dict(), "backend": "openvino"}), cal
    )
    assert isinstance(compiled, qov.OpenVINOModel)
    err_sim, err_ov = _trajectory_error(simulated, fp32), _trajectory_error(compiled, fp32)
    assert err_sim > 0
    assert err_ov <= 1.15 * err_sim, f"openvino {err_ov:.4g} vs simulated {err_sim:.4g}"

    found = qov.integer_ops(compiled.compiled((4, 3, 8, 8)))
    for name, (layers, _) in qov.quantized_units(compiled.model).items():
        for i, layer in enumerate(layers):
            # (the time embedding's small linears may be fused into integer subgraphs that
            # keep no original name; the float check below covers them)
            prefix = f"__module.model.{name}.parts.{i}/"
            if layer.is_conv:
                assert any(op.startswith(prefix) for op in found["integer"]), f"{name} part {i}"
    assert all(".attn" in op and ".parts." not in op for op in found["float"]), found["float"]
    record = kernel_record(compiled)
    assert record["engine"].startswith("openvino") and sum(record["schemes"].values()) == sum(
        len(layers) for layers, _ in qov.quantized_units(compiled.model).values()
    )


@pytest.mark.parametrize("warmup", ["fp", "repeat:2"])
def test_modiff_caches_follow_the_simulated_recursion(tiny_state, warmup):
    """MoDiff's caches live in OpenVINO state: step by step the outputs follow the simulated
    layers' recursion (differences of float rounding, far below the quantization error), the
    warm-up as configured; reset_caches starts the same trajectory again."""
    cal = _calibration()
    config = QuantConfig(modulation="compensated", warmup=warmup)
    fp32 = _tiny(tiny_state)
    simulated = quantize_(
        _tiny(tiny_state), QuantConfig(**{**config.to_dict(), "backend": "simulated"}), cal
    )
    compiled = quantize_(
        _tiny(tiny_state), QuantConfig(**{**config.to_dict(), "backend": "openvino"}), cal
    )
    xs = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    ts = [torch.full((2,), 900.0 - 150 * i) for i in range(5)]

    def run(model):
        reset_caches(model)
        with torch.inference_mode():
            return [model(x, t) for x, t in zip(xs, ts, strict=True)]

    out_sim, out_ov, out_ov_again, out_fp = run(simulated), run(compiled), run(compiled), run(fp32)
    assert compiled.cache_bytes() > 0
    for step, (a, b, c, f) in enumerate(zip(out_sim, out_ov, out_ov_again, out_fp, strict=True)):
        torch.testing.assert_close(c, b, rtol=0, atol=0)  # reset: the same trajectory again
        quant_error = (a - f).pow(2).mean().sqrt().item()
        assert (b - a).pow(2).mean().sqrt().item() <= 0.5 * quant_error + 1e-6, step


def test_parameters_load_on_any_backend(tiny_state, tmp_path):
    """A file calibrated for native runs on openvino (same parameters), and one saved from an
    openvino model holds the same tensors as the native one's."""
    cal = _calibration()
    config = QuantConfig(backend="native", modulation="compensated")
    native = quantize_(_tiny(tiny_state), config, cal)
    save_quant_params(native, config, tmp_path / "native.pt")
    compiled, loaded_config = load_quantized(
        _tiny(tiny_state), tmp_path / "native.pt", backend="openvino"
    )
    assert isinstance(compiled, qov.OpenVINOModel) and loaded_config.backend == "openvino"
    save_quant_params(compiled, loaded_config, tmp_path / "openvino.pt")
    a, b = torch.load(tmp_path / "native.pt"), torch.load(tmp_path / "openvino.pt")
    for name, entry in a["layers"].items():
        for part_a, part_b in zip(entry["parts"], b["layers"][name]["parts"], strict=True):
            for key, value in part_a.items():
                assert torch.equal(value, part_b[key]), (name, key)


# --- choosing the backend, and bad input -------------------------------------------------------


def test_auto_picks_openvino_for_static_scales_and_native_for_dynamic(tiny_state, caplog):
    from modiff.quant.api import resolve_backend

    assert resolve_backend(QuantConfig(backend="auto")) == "openvino"
    assert resolve_backend(QuantConfig(backend="auto"), "cuda") == "simulated"
    with caplog.at_level(logging.INFO, logger="modiff.quant.api"):
        assert resolve_backend(QuantConfig(backend="auto", a_scale="dynamic")) == "native"
    assert "constant quantization ranges" in caplog.text


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(a_scale="dynamic"), "backend 'native'"),
        (dict(modulation="uncompensated"), "backend 'native'"),
    ],
)
def test_unsupported_settings_are_refused_before_any_work(tiny_state, kw, message):
    config = QuantConfig(backend="openvino", **kw)
    with pytest.raises(ValueError, match=message):
        quantize_(_tiny(tiny_state), config, calibration=None)  # fails before calibration


def test_missing_openvino_names_the_fix(tiny_state, monkeypatch):
    monkeypatch.setattr(qov, "available", lambda: False)
    with pytest.raises(ImportError, match="pip install"):
        quantize_(_tiny(tiny_state), QuantConfig(backend="openvino"), _calibration())
    from modiff.quant.api import resolve_backend

    assert resolve_backend(QuantConfig(backend="auto")) == "native"


def test_openvino_runs_on_the_cpu_only(tiny_state):
    model = quantize_(_tiny(tiny_state), QuantConfig(backend="openvino"), _calibration())
    meta = torch.empty(2, 3, 8, 8, device="meta")
    with pytest.raises(RuntimeError, match="CPU"):
        model(meta, torch.zeros(2, device="meta"))


def test_exported_layer_is_the_simulated_layer_in_torch():
    """The traced form evaluated eagerly is the simulated layer (both schemes)."""
    layer, x = _saturating_layer(LAYERS["conv3x3"](), 8, 8, True)
    with torch.no_grad():
        ref = layer(x)
        for scheme in ("direct", "split"):
            out = qov.ExportLayer(layer, scheme)(x)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
