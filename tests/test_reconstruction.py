"""Q-Diffusion's reconstruction (AdaRound per layer and per block) and learned step sizes, on a
tiny UNet of the DDIM family with random calibration inputs."""

import copy

import pytest
import torch
from conftest import tiny_config
from torch import nn

from modiff.models import build_model
from modiff.quant import QuantConfig, quantize_, reconstruction
from modiff.quant.api import load_quantized, save_quant_params
from modiff.quant.layers import QuantLayer
from modiff.quant.quantizer import weight_code_range
from modiff.quant.reconstruction import reconstruct_, reconstruction_units

ITERS = 150


def _model():
    torch.manual_seed(0)
    return build_model(tiny_config(ch_mult=[1, 2])).eval()


def _calibration(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 3, 8, 8, generator=g)
    ts = torch.randint(0, 1000, (n,), generator=g).float()
    return {"xs": xs, "ts": ts, "xs_prev": xs + 0.05 * torch.randn(xs.shape, generator=g),
            "ts_prev": ts + 10}  # fmt: skip


def _config(**kw):
    base = {"w_bits": 4, "a_bits": 8, "backend": "simulated", "calib_max_values": 1 << 14,
            "reconstruction_iters": ITERS}  # fmt: skip
    return QuantConfig(**{**base, **kw})


def _codes(model):
    return {
        n: m.weight_codes.clone() for n, m in model.named_modules() if isinstance(m, QuantLayer)
    }


def _nearest_then_reconstructed(granularity, **kw):
    """The nearest-rounding model, and a copy reconstructed from it with its losses."""
    fp, calibration = _model(), _calibration()
    nearest = quantize_(copy.deepcopy(fp), _config(**kw), calibration)
    learned = copy.deepcopy(nearest)
    losses = reconstruct_(learned, fp, _config(reconstruction=granularity, **kw), calibration)
    return fp, calibration, nearest, learned, losses


@pytest.mark.parametrize(
    "granularity, scales",
    [("layer", {}), ("block", {}),
     ("block", {"a_scale": "dynamic", "a_granularity": "per_sample"}),  # LCQ
     ("block", {"modulation": "compensated"})],  # MoDiff
)  # fmt: skip
def test_adaround_stays_within_a_step_of_nearest_and_lowers_the_loss(granularity, scales):
    fp, calibration, nearest, learned, losses = _nearest_then_reconstructed(granularity, **scales)
    before, after = _codes(nearest), _codes(learned)
    assert before.keys() == after.keys()
    changed = 0
    for name in before:
        step = (after[name].int() - before[name].int()).abs()
        assert step.max() <= 1, name  # up or down from the floor: at most one step from nearest
        changed += int(step.sum())
        layer = learned.get_submodule(name)  # and on the channel's own (asymmetric) grid
        lo, hi = weight_code_range(layer.weight_zero_point, layer.config.w_bits)
        codes = after[name].flatten(1).int()
        assert (codes.amin(1) >= lo).all() and (codes.amax(1) <= hi).all(), name
    assert changed > 0  # the rounding was learned, not left as it was
    assert all(a <= b * 1.001 for b, a in losses.values()), losses
    assert sum(a for _, a in losses.values()) < sum(b for b, _ in losses.values()), losses
    assert max(1 - a / b for b, a in losses.values()) > 0.1, losses  # some unit gains a lot
    # The whole model follows: closer to FP32 on the calibration inputs than nearest rounding.
    with torch.no_grad():
        ref = fp(calibration["xs"], calibration["ts"])
        err = {m: (model(calibration["xs"], calibration["ts"]) - ref).pow(2).mean().item()
               for m, model in (("nearest", nearest), ("learned", learned))}  # fmt: skip
    assert err["learned"] < err["nearest"], err


def test_adaround_decides_every_rounding_within_its_iterations(monkeypatch, caplog):
    """At the rate BRECQ sets for 20,000 iterations, a short run cannot move V far enough for
    h(V) to reach 0 or 1, hard rounding then discards what was learned and a warning says so;
    the rate scaled to the iterations decides every rounding."""
    fp, calibration = _model(), _calibration()
    nearest = quantize_(copy.deepcopy(fp), _config(), calibration)
    undecided = {}
    for rate in ("scaled", "brecq"):
        if rate == "brecq":
            monkeypatch.setattr(reconstruction, "rounding_rate", lambda iters: 1e-3)
        record = []

        def commit(self, record=record, commit=reconstruction.LearnedLayer.commit):
            record.append(self.undecided())  # before the rounding is made hard
            commit(self)

        monkeypatch.setattr(reconstruction.LearnedLayer, "commit", commit)
        caplog.clear()
        reconstruct_(copy.deepcopy(nearest), fp, _config(reconstruction="layer"), calibration)
        monkeypatch.undo()
        undecided[rate] = sum(u for u, _ in record) / sum(n for _, n in record)
        warned = [r for r in caplog.records if "raise reconstruction_iters" in r.getMessage()]
        assert bool(warned) == (rate == "brecq"), (rate, undecided)
    assert undecided["scaled"] < 0.01 < 0.2 < undecided["brecq"], undecided
    assert reconstruction.rounding_rate(20_000) == reconstruction.rounding_rate(40_000) == 1e-3
    assert reconstruction.rounding_rate(2_000) == pytest.approx(1e-2)


def test_modulated_units_learn_on_the_quantized_models_inputs_at_a_warm_up_step():
    """Under MoDiff a unit's inputs carry the earlier units' weight error, with activations as
    exact as at a warm-up step: every captured batch starts from empty caches (300 inputs: two
    batches of different sizes, which a continued trajectory would refuse)."""
    capture = reconstruction._capture
    fp, calibration = _model(), _calibration(n=300)
    xs, ts = calibration["xs"], calibration["ts"]
    model = quantize_(copy.deepcopy(fp), _config(modulation="compensated"), calibration)
    got = capture(model, "conv_out", xs, ts, "inputs")[0]
    assert torch.equal(got, capture(model, "conv_out", xs, ts, "inputs")[0])
    assert not torch.allclose(got, capture(fp, "conv_out", xs, ts, "inputs")[0], atol=1e-4)
    assert all(m.a_hat is None for m in model.modules() if isinstance(m, QuantLayer))


def test_block_units_are_residual_and_attention_blocks_and_outer_layers_in_run_order():
    fp, calibration = _model(), _calibration()
    model = quantize_(copy.deepcopy(fp), _config(), calibration)
    example = calibration["xs"][:1], calibration["ts"][:1]
    units = reconstruction_units(model, "block", *example)
    kinds = {type(model.get_submodule(u)).__name__ for u in units}
    assert kinds == {"ResnetBlock", "AttnBlock", "QuantLayer"}, kinds
    assert units[:3] == ["temb.dense.0", "temb.dense.1", "conv_in"] and units[-1] == "conv_out"
    # The up path is defined top-down (up.0 is the last level to run) but runs bottom-up.
    ups = [u for u in units if u.startswith("up.")]
    assert ups[0].startswith("up.1.") and ups[-1].startswith("up.0."), ups
    layers = reconstruction_units(model, "layer", *example)
    assert len(layers) > len(units) and all(
        any(layer == u or layer.startswith(u + ".") for u in units) for layer in layers
    )


def test_learned_step_sizes_lower_the_loss_of_plain_and_modiff_layers():
    fp, calibration = _model(), _calibration()
    for kw, suffix in (({}, ""), ({"modulation": "compensated"}, ":residual")):
        model = quantize_(copy.deepcopy(fp), _config(a_bits=4, w_bits=8, **kw), calibration)
        scales = {n: float(m.act_scale) for n, m in model.named_modules()
                  if isinstance(m, QuantLayer)}  # fmt: skip
        config = _config(a_bits=4, w_bits=8, learn_act_scales=True, reconstruction_iters=60, **kw)
        losses = reconstruct_(model, fp, config, calibration)
        assert losses and all(k.endswith(suffix) for k in losses), list(losses)[:3]
        assert sum(a for _, a in losses.values()) < sum(b for b, _ in losses.values())
        moved = [n for n, m in model.named_modules()
                 if isinstance(m, QuantLayer) and float(m.act_scale) != scales[n]]  # fmt: skip
        assert moved


def test_the_rounding_is_learned_first_then_the_step_sizes_with_the_codes_fixed():
    """Q-Diffusion's order: a run that also learns step sizes ends with the same codes as one
    that learns only the rounding (same seed), and with other scales."""
    fp, calibration = _model(), _calibration()
    runs = {}
    for learn in (False, True):
        config = _config(a_bits=4, reconstruction="block", reconstruction_iters=60,
                         learn_act_scales=learn)  # fmt: skip
        model = quantize_(copy.deepcopy(fp), config, calibration)
        scales = [float(m.act_scale) for m in model.modules() if isinstance(m, QuantLayer)]
        runs[learn] = _codes(model), scales
    for name, codes in runs[False][0].items():
        assert torch.equal(codes, runs[True][0][name]), name
    assert runs[False][1] != runs[True][1]


def test_learned_codes_and_scales_are_saved_and_loaded_without_relearning(tmp_path):
    fp, calibration = _model(), _calibration()
    config = _config(reconstruction="layer", learn_act_scales=True, reconstruction_iters=40)
    model = quantize_(copy.deepcopy(fp), config, calibration)
    nearest = quantize_(copy.deepcopy(fp), _config(), calibration)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(_codes(model).values(), _codes(nearest).values(), strict=True)
    )
    save_quant_params(model, config, tmp_path / "q.pt", {"variant": "x"})
    loaded, loaded_config = load_quantized(copy.deepcopy(fp), tmp_path / "q.pt")
    assert loaded_config == config
    for (name, a), b in zip(_codes(model).items(), _codes(loaded).values(), strict=True):
        assert torch.equal(a, b), name
        zero_points = (m.get_submodule(name).weight_zero_point for m in (model, loaded))
        assert torch.equal(*zero_points), name
    with torch.no_grad():
        x, t = calibration["xs"][:4], calibration["ts"][:4]
        torch.testing.assert_close(loaded(x, t), model(x, t), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"reconstruction": "blocks"}, "reconstruction must be one of"),
        ({"reconstruction_iters": -1}, "reconstruction_iters must be an integer >= 0"),
        ({"learn_act_scales": True, "a_scale": "dynamic"}, "learn_act_scales needs a_scale"),
    ],
)
def test_bad_reconstruction_settings_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kw)


def test_reconstruction_needs_calibration_data():
    with pytest.raises(ValueError, match="need calibration data"):
        quantize_(_model(), _config(a_scale="dynamic", reconstruction="layer"), None)


def test_recipe_names_what_was_learned():
    assert _config().recipe == "MSE scale search, nearest rounding"
    recipe = _config(reconstruction="block", learn_act_scales=True).recipe
    assert "AdaRound per block (BRECQ)" in recipe and "learned step sizes" in recipe
    assert f"{ITERS} iterations" in recipe


def test_a_grid_entry_names_its_recipe():
    from modiff.config import QuantSettings, Variant

    entry = {"method": "qdiff", "a_scale": "static", "w_bits": 4, "a_bits": 8}
    learned = Variant(**entry, reconstruction="block", reconstruction_iters=500,
                      learn_act_scales=True)  # fmt: skip
    assert learned.name == "qdiff-static-w4a8-brecq-lsq"
    assert Variant(**entry, reconstruction="layer").name == "qdiff-static-w4a8-adaround"
    assert Variant(**entry).name == "qdiff-static-w4a8"
    quant = QuantSettings(backend="native", warmup="fp")
    config = QuantConfig.from_variant(learned, quant)
    assert (config.reconstruction, config.reconstruction_iters, config.learn_act_scales) == (
        "block", 500, True)  # fmt: skip
    assert QuantConfig.from_variant(Variant(**entry), quant).reconstruction == "none"


def test_an_lcq_entry_quantizes_each_sample_by_its_own_scale():
    from modiff.config import QuantSettings, Variant

    entry = Variant(method="modiff", a_scale="dynamic", w_bits=4, a_bits=4)
    lcq = Variant(**{**entry.model_dump(), "a_granularity": "per_sample"})
    assert (entry.name, lcq.name) == ("modiff-dynamic-w4a4", "modiff-lcq-w4a4")
    quant = QuantSettings(backend="native", warmup="fp")
    assert QuantConfig.from_variant(entry, quant).a_granularity == "per_tensor"
    assert QuantConfig.from_variant(lcq, quant).a_granularity == "per_sample"


@pytest.mark.native
def test_native_layers_are_reconstructed_in_place_and_run_the_learned_codes(tmp_path):
    """Native layers hold packed weights that cannot be copied: reconstruction swaps in place,
    and afterwards they run the learned codes: exactly what a model loaded from the file runs
    (whose packed weights are built from the saved codes)."""
    fp, calibration = _model(), _calibration(n=16)
    config = _config(backend="native", reconstruction="block", reconstruction_iters=20)
    native = quantize_(copy.deepcopy(fp), config, calibration)
    nearest = quantize_(copy.deepcopy(fp), _config(backend="native"), calibration)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(_codes(native).values(), _codes(nearest).values(), strict=True)
    )
    save_quant_params(native, config, tmp_path / "q.pt")
    loaded, _ = load_quantized(copy.deepcopy(fp), tmp_path / "q.pt")
    x, t = calibration["xs"][:4], calibration["ts"][:4]
    with torch.no_grad():
        out, ref, nearest_out = native(x, t), loaded(x, t), nearest(x, t)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.equal(out, nearest_out)


def test_block_units_are_what_the_model_declares():
    """Any module with ``reconstruction_unit = True`` is one unit of block reconstruction."""

    class Block(nn.Module):
        reconstruction_unit = True

        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return x + self.second(self.first(x))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.head = Block(), nn.Conv2d(3, 3, 1)

        def forward(self, x, t):
            return self.head(self.block(x))

    model = quantize_(Model(), QuantConfig(a_scale="dynamic", backend="simulated"))
    example = torch.randn(1, 3, 4, 4), torch.zeros(1)
    assert reconstruction_units(model, "block", *example) == ["block", "head"]
    assert reconstruction_units(model, "layer", *example) == ["block.first", "block.second", "head"]
