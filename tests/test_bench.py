import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from torch import nn

from modiff.bench import BenchCase, BenchSettings, bench_variants, time_variants
from modiff.models import build_model


def test_bench_times_fp32_int8_and_modiff_in_one_paired_run():
    case = BenchCase("tiny", tiny_config(), "random (timing only)")
    names = [
        "qdiff-static-w8a8@native",
        "modiff-static-w8a8@native",
        "qdiff-dynamic-w8a4@simulated",
    ]
    variants = bench_variants(names)
    settings = BenchSettings(batch_sizes=(2,), repetitions=2, steps=3, threads=2, memory=False)
    rows = time_variants(case, variants, settings)
    by_name = {r["variant"]: r for r in rows}
    assert set(by_name) == {"fp32", *names}
    assert by_name["fp32"]["speedup_vs_fp32"] == 1.0
    assert all(r["step_ms"] > 0 and len(r["step_ms_all"]) == 2 for r in rows)
    assert by_name["modiff-static-w8a8@native"]["cache_mb_per_image"] > 0
    assert by_name["qdiff-static-w8a8@native"]["cache_mb_per_image"] == 0


def test_bad_bench_variant_name():
    with pytest.raises(ValueError, match="is not <grid variant name>@<backend>"):
        bench_variants(["w8a8-native"])
    with pytest.raises(ValueError, match="'int8' is not a variant name"):
        bench_variants(["int8@native"])


def _load_script(name: str):
    path = Path(__file__).parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_traffic_floor_counts_every_layer_input_and_output():
    """scripts/modiff_traffic.py against a count by hooks on the float model's layers."""
    config = tiny_config()
    traffic, copies = _load_script("modiff_traffic").extra_bytes_per_image(config)
    model = build_model(config).eval()
    counts = {"in": 0, "out": 0, "out3x3": 0}

    def count(layer, args, out):
        counts["in"] += args[0].numel()
        counts["out"] += out.numel()
        if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1):
            counts["out3x3"] += out.numel()

    for layer in model.modules():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            layer.register_forward_hook(count)
    with torch.inference_mode():
        model(torch.randn(1, 3, 8, 8), torch.full((1,), 900.0))
    assert counts["out3x3"] > 0
    assert traffic == 8 * counts["in"] + 4 * counts["out"]
    assert copies == 8 * counts["out3x3"]


@pytest.mark.slow
def test_benchmark_of_the_pipeline_records_accuracy_and_skipped_peers(monkeypatch, tmp_path):
    """`modiff bench`'s whole run on small settings: the grid on the digits model, the INT8
    accuracy of native and simulated twins, and a peer that cannot run is named, not dropped."""
    from conftest import ROOT

    from modiff import bench, peers
    from modiff.config import load_params

    monkeypatch.chdir(tmp_path)  # the digits checkpoint where `modiff fetch` puts it
    (tmp_path / "data/checkpoints").mkdir(parents=True)
    (tmp_path / "data/checkpoints/digits.ckpt").write_bytes(
        (ROOT / "data/pretrained/digits_ddim.pt").read_bytes()
    )
    monkeypatch.setattr(peers, "unavailable", lambda engines: {e: "not here" for e in engines})
    grid = ('{"fp32": {"method": "fp32"}, "qdiff-dynamic-w8a8": {"method": "qdiff", '
            '"a_scale": "dynamic", "w_bits": 8, "a_bits": 8}}')  # fmt: skip
    params = load_params(ROOT / "params.yaml", [
        f"variants={grid}", "bench.batch_sizes=[2]", "bench.repetitions=1", "bench.steps=2",
        "bench.cifar10=false", "bench.variants=[qdiff-static-w8a8@native]",
        "bench.peers=[openvino]",
        "presets.digits.calibration.cali_st=4", "presets.digits.sampling.steps=8",
    ])  # fmt: skip
    from modiff.calibration import collect_calibration
    from modiff.checkpoint import load_into
    from modiff.models import build_model

    preset = params.preset_layout()
    model = load_into(build_model(preset), ROOT / "data/pretrained/digits_ddim.pt").eval()
    calibration = collect_calibration(model, preset, cali_st=4, cali_n=10, seed=0, batch_size=10)
    result = bench.run(params, Path("data/checkpoints/digits.ckpt"), calibration)
    assert result["peers"] == {"requested": ["openvino"], "skipped": {"openvino": "not here"}}
    assert [r["variant"] for r in result["rows"]] == ["fp32", "qdiff-dynamic-w8a8"]
    assert result["rows"][1]["schemes"]  # the native layers say which scheme they ran
    accuracy = {r["variant"]: r for r in result["accuracy"]}
    assert set(accuracy) == {"qdiff-static-w8a8@native", "qdiff-static-w8a8@simulated"}
    assert {r["n_inputs"] for r in accuracy.values()} == {40}  # the calibration it was given
    native, simulated = (
        accuracy[n]["eps_rel_rms_vs_fp32"]
        for n in ("qdiff-static-w8a8@native", "qdiff-static-w8a8@simulated")
    )
    assert 0 < simulated < 0.5 and abs(native - simulated) < 0.05 * simulated
    assert result["environment"]["cpu_isa"] and result["environment"]["int8_kernels"]


class _CrashingEngine:
    """A peer whose native code dies while quantizing (as OpenVINO's did under an ISA cap)."""

    def __call__(self, model: nn.Module) -> nn.Module:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGSEGV)
        return model


def _divide(a: float, b: float) -> float:
    return a / b


def test_fresh_process_returns_results_and_names_failures():
    from modiff.runtime import in_fresh_process

    assert in_fresh_process(_divide, 6.0, 3.0) == 2.0
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        in_fresh_process(_divide, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"process died \(exit code -11\)"):
        in_fresh_process(_CrashingEngine(), None)


@pytest.mark.slow
def test_a_peer_crashing_in_the_accuracy_check_is_a_row_not_the_end(monkeypatch):
    from modiff import bench
    from modiff.config import Bench

    case = BenchCase("tiny", tiny_config(), "random (timing only)")
    calibration = bench.timing_calibration(3, 8, n=8)
    crashing = {"crashing-int8": _CrashingEngine()}
    monkeypatch.setattr(bench, "peer_variants", lambda *args, **kwargs: crashing)
    settings = Bench(batch_sizes=(2,), repetitions=1, steps=2, cifar10=False,
                     variants=("qdiff-static-w8a8@native",), peers=())  # fmt: skip
    rows = {r["variant"]: r for r in bench.int8_accuracy(case, settings, 2, "unused", calibration)}
    native, simulated = "qdiff-static-w8a8@native", "qdiff-static-w8a8@simulated"
    assert set(rows) == {native, simulated, "crashing-int8"}
    assert "process died" in rows["crashing-int8"]["error"]
    assert rows[native]["eps_rel_rms_vs_fp32"] > 0
