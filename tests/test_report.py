"""results/report.md names the CPU, the int8 schemes, the peers (or why they did not run) and
the INT8 accuracy; built here from small hand-made records."""

import json

from conftest import ROOT

from modiff.config import load_params
from modiff.records import VariantRecord
from modiff.report import format_schemes, write_report

NATIVE = "qdiff-static-w8a8@native"
SAT = {"cpu_isa": "avx2", "onednn_max_cpu_isa": None, "int8_kernels": "saturating (int16 pairs)"}


def _variant(variant: str, **fields) -> VariantRecord:
    """A record of results/metrics.json, built as the pipeline builds it (typed), with
    placeholder scores."""
    quantized = variant != "fp32"
    defaults = {"variant": variant, "method": variant.split("-")[0], "a_scale": None,
                "a_granularity": "per_tensor" if quantized else None, "w_bits": 32,
                "a_bits": 32, "reconstruction": "none" if quantized else None,
                "learn_act_scales": False if quantized else None, "backend": "fp32",
                "device": "cpu", "kernels": None, "n_samples": 40, "steps": 10, "fid": 1.5,
                "kid": 0.001, "psnr_vs_fp32": 40.0, "step_ms": 10.0, "speedup_vs_fp32": 1.0,
                "bench_batch": 2, "cache_mb_per_image": 0.0}  # fmt: skip
    return VariantRecord(**{**defaults, **fields})


def _record(variant, method, backend, kernels, device="cpu", **bits):
    return _variant(variant, method=method, backend=backend, kernels=kernels, device=device,
                    **bits)  # fmt: skip


def _bench(peers, accuracy):
    row = {"model": "cifar10", "weights": "random (timing only)", "batch": 16, "step_ms": 100.0,
           "images_per_s": 160.0, "speedup_vs_fp32": 1.0, "schemes": {}}  # fmt: skip
    rows = [{**row, "variant": "fp32"},
            {**row, "variant": NATIVE, "schemes": {"split": 125}, "speedup_vs_fp32": 0.7},
            {**row, "variant": "openvino-int8", "speedup_vs_fp32": 1.7}]  # fmt: skip
    env = {"torch": "2.14.1", "cpu": "AMD EPYC", "threads": 2, "quantized_engine": "x86", **SAT}
    return {"environment": env, "peers": peers, "rows": rows, "accuracy": accuracy}


def _report(tmp_path, bench, records):
    params = load_params(ROOT / "params.yaml")
    files = {}
    records = [r.to_json() for r in records]
    for name, data in {"records": records, "bench": bench}.items():
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(data))
    out = tmp_path / "report.md"
    write_report(params, str(files["records"]), "plot.png", [],
                 str(files["bench"]), [], out)  # fmt: skip
    return out.read_text()


def test_report_names_the_cpu_schemes_peers_and_accuracy(tmp_path):
    records = [
        _record("fp32", "fp32", "fp32", {"cpu_isa": "avx2", "onednn_max_cpu_isa": None}),
        _record("qdiff-static-w8a8", "qdiff", "native", {**SAT, "schemes": {"split": 102}},
                a_scale="static", w_bits=8, a_bits=8),
        _record("qdiff-static-w8a4", "qdiff", "simulated", {"cpu_isa": "avx2"}, device="cuda",
                a_scale="static", w_bits=8, a_bits=4),
    ]  # fmt: skip
    accuracy = [{"variant": NATIVE, "n_inputs": 260, "eps_rel_rms_vs_fp32": 0.0831,
                 "eps_max_abs_vs_fp32": 1.03},
                {"variant": "openvino-int8", "n_inputs": 260, "eps_rel_rms_vs_fp32": 0.3687,
                 "eps_max_abs_vs_fp32": 1.75},
                {"variant": "onnxruntime-int8", "n_inputs": 260,
                 "error": "process died (exit code -11)"}]  # fmt: skip
    peers = {"requested": ["openvino", "pt2e"], "skipped": {"pt2e": "not installed (torchao)"}}
    text = _report(tmp_path, _bench(peers, accuracy), records)
    assert "int8 kernels: saturating (int16 pairs) on this CPU (avx2)" in text
    assert "*split* scheme" in text
    assert "| qdiff-static-w8a8 | native on cpu | split 102 (avx2) |" in text
    assert "| qdiff-static-w8a4 | simulated on cuda | - |" in text  # a GPU run says so
    assert "| openvino-int8 | - | 16 |" in text  # the peer in the speed table
    assert "Other engines in the same paired runs: openvino" in text
    assert "**pt2e did not run**: not installed (torchao)" in text
    assert "| openvino-int8 | 0.36870 | 1.7500 |" in text
    assert "| onnxruntime-int8 | failed: process died (exit code -11) | - |" in text
    assert "260 calibration inputs" in text


def test_report_says_when_no_peers_ran(tmp_path):
    records = [_record("fp32", "fp32", "fp32", None)]
    text = _report(tmp_path, _bench({"requested": [], "skipped": {}}, []), records)
    assert "No other engines ran (params.yaml `bench.peers` is empty)" in text
    assert "INT8 accuracy" not in text


def test_schemes_read_largest_first():
    assert format_schemes({"direct": 58, "split": 67}) == "split 67, direct 58"
    assert format_schemes({}) == "-" and format_schemes(None) == "-"


def test_only_reconstruction_is_called_q_diffusion():
    from modiff.report import method_label

    plain = _variant("qdiff-static-w8a8")
    assert method_label(plain) == "PTQ (nearest rounding)"
    brecq = _variant("modiff-static-w8a8-brecq-lsq", reconstruction="block", learn_act_scales=True)
    assert method_label(brecq) == "Q-Diffusion (BRECQ), learned step sizes + MoDiff"
    adaround = _variant("qdiff-static-w8a8-adaround", reconstruction="layer")
    assert method_label(adaround).startswith("Q-Diffusion (AdaRound per layer)")


def test_the_quality_table_has_the_papers_rows_and_columns():
    from modiff.report import paper_table

    def rec(method, scale, w, a, fid, **kw):
        return _variant(f"{method}-{scale}-w{w}a{a}", method=method, w_bits=w, a_bits=a,
                        a_scale="static" if scale == "static" else "dynamic",
                        a_granularity="per_sample" if scale == "lcq" else "per_tensor",
                        fid=fid, **kw)  # fmt: skip

    records = [
        _variant("fp32", fid=1.0),
        rec("modiff", "lcq", 4, 4, 1.2),
        rec("qdiff", "lcq", 4, 4, 9.0),
        rec("qdiff", "static", 8, 4, 5.0),
        rec("qdiff", "static", 4, 8, 3.0, reconstruction="block"),
        rec("modiff", "static", 8, 8, 1.1),
        rec("qdiff", "dynamic", 8, 8, 1.05),
    ]
    header, _, fp32, *rows = paper_table(records, "fid", 2)
    assert header == "| method | W8A8 | W8A4 | W4A8 | W4A4 |"
    assert fp32.startswith("| FP32 | 1.00 (all columns) |")
    assert rows == [
        "| PTQ (nearest rounding), static scales |  | 5.00 |  |  |",
        "| PTQ (nearest rounding) + MoDiff, static scales | 1.10 |  |  |  |",
        "| Q-Diffusion (BRECQ), static scales |  |  | 3.00 |  |",
        "| PTQ (nearest rounding), dynamic per-tensor (LTQ) scales | 1.05 |  |  |  |",
        "| PTQ (nearest rounding), dynamic per-sample (LCQ) scales |  |  |  | 9.00 |",
        "| PTQ (nearest rounding) + MoDiff, dynamic per-sample (LCQ) scales |  |  |  | 1.20 |",
    ]
