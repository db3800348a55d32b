"""The peer engines (OpenVINO, ONNX Runtime, PT2E + Inductor) in the benchmark's paired runs."""

import importlib.util

import pytest
import torch
from conftest import tiny_config

from modiff import peers
from modiff.bench import (
    BenchCase,
    BenchSettings,
    _build,
    bench_variants,
    peer_variants,
    time_variants,
    timing_calibration,
)

ONNX_ENGINES = ["onnxruntime", "openvino"]
needs_peers = pytest.mark.skipif(
    bool(peers.unavailable(ONNX_ENGINES)), reason="pip install -e '.[peers]'"
)


@pytest.fixture
def case():
    return BenchCase("tiny", tiny_config(), "random (timing only)")


def _calibration(case):
    config = case.config
    return timing_calibration(config["model"]["in_channels"], config["data"]["image_size"], n=16)


@needs_peers
def test_peers_are_timed_in_the_same_paired_run(case, tmp_path):
    variants = {
        **bench_variants(["qdiff-static-w8a8@native"]),
        **peer_variants(ONNX_ENGINES, str(tmp_path), 2, _calibration(case)),
    }
    settings = BenchSettings(
        batch_sizes=(
            2,
            3,
        ),
        repetitions=2,
        steps=3,
        threads=2,
        memory=False,
    )
    rows = time_variants(case, variants, settings)
    names = {r["variant"] for r in rows}
    assert names == {"fp32", "qdiff-static-w8a8@native", "onnxruntime-fp32", "onnxruntime-int8",
                     "openvino-fp32", "openvino-int8", "openvino-int8-same-layers"}  # fmt: skip
    assert all(len(r["step_ms_all"]) == 2 and r["speedup_vs_fp32"] > 0 for r in rows)
    assert {r["batch"] for r in rows} == {2, 3}  # one exported model serves every batch size
    assert all(r["schemes"] == {} for r in rows if "-" in r["variant"] and "w8" not in r["variant"])
    assert (tmp_path / "onnxruntime-int8.onnx").is_file()  # one export, quantized per engine
    assert (tmp_path / "openvino-int8.xml").is_file()
    assert (tmp_path / "openvino-int8-same-layers.xml").is_file()  # attention matmuls in float
    for batch in (2, 3):  # ratios against the fastest FP32 engine: that one is 1
        fp32_rows = [r for r in rows if r["batch"] == batch and r["variant"].endswith("fp32")]
        assert max(r["speedup_vs_fastest_fp32"] for r in fp32_rows) == 1.0


@needs_peers
def test_fp32_peers_compute_the_same_model_and_int8_peers_approximate_it(case, tmp_path):
    calibration = _calibration(case)
    builders = peer_variants(ONNX_ENGINES, str(tmp_path), 2, calibration)
    models = {name: build(_build(case)) for name, build in builders.items()}
    errors = {r["variant"]: r for r in peers.eps_errors(_build(case), models, calibration)}
    for name in ("onnxruntime-fp32", "openvino-fp32"):
        assert errors[name]["eps_rel_rms_vs_fp32"] < 1e-5, errors[name]
    for name in ("onnxruntime-int8", "openvino-int8"):
        assert 1e-4 < errors[name]["eps_rel_rms_vs_fp32"] < 0.5, errors[name]
    assert all(r["n_inputs"] == 16 for r in errors.values())


@pytest.mark.slow
@pytest.mark.skipif(bool(peers.unavailable(["pt2e"])), reason="pip install -e '.[peers]'")
def test_pt2e_inductor_int8_runs_and_approximates_fp32(case, tmp_path):
    calibration = _calibration(case)
    model = peer_variants(["pt2e"], str(tmp_path), 2, calibration)["pt2e-inductor-int8"]
    errors = peers.eps_errors(_build(case), {"pt2e": model(_build(case))}, calibration)
    assert 1e-4 < errors[0]["eps_rel_rms_vs_fp32"] < 0.5


def test_unknown_and_missing_engines_are_named(monkeypatch):
    with pytest.raises(ValueError, match="unknown peer engine 'tensorrt'"):
        peers.unavailable(["tensorrt"])
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "openvino" else real(name)
    )
    missing = peers.unavailable(["openvino"])
    assert "openvino" in missing["openvino"] and "pip install -e '.[peers]'" in missing["openvino"]
    calibration = {"xs": torch.zeros(1), "ts": torch.zeros(1)}
    assert peer_variants(["openvino"], "unused", 2, calibration) == {}
