"""The engines users would otherwise pick, timed in the same paired runs as modiff's variants.

- ``onnxruntime-fp32`` / ``onnxruntime-int8``: the UNet exported to ONNX (opset 17) and run by
  ONNX Runtime; INT8 by its ``quantize_static`` (QDQ, per-channel int8 weights, uint8
  activations, min-max calibration) on the convs and linears, the layers modiff quantizes.
- ``openvino-fp32`` / ``openvino-int8``: the same ONNX model converted by OpenVINO, inference
  precision f32 (a bf16-capable CPU would otherwise run bf16 and call it FP32); INT8 by NNCF's
  post-training ``nncf.quantize`` (its default INT8 preset, fast bias correction);
  ``openvino-int8-same-layers``: the same, with the attention matmuls left in float (NNCF's
  ignored scope) as modiff leaves them.
- ``pt2e-inductor-int8``: PyTorch's own INT8 path: ``torch.export``, torchao's
  ``X86InductorQuantizer`` (its default static config), ``torch.compile`` with freezing.

Optional: ``pip install -e '.[peers]'``. Each engine runs with the benchmark's thread count.
Every INT8 engine calibrates on the same inputs as modiff's static scales. Without VNNI, these
engines' u8 x s8 kernels saturate as oneDNN's do (FACTS §5a): :func:`eps_errors` measures
what that costs on a real model, beside the speed.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

ENGINES = {
    "onnxruntime": ("onnxruntime-fp32", "onnxruntime-int8"),
    "openvino": ("openvino-fp32", "openvino-int8", "openvino-int8-same-layers"),
    "pt2e": ("pt2e-inductor-int8",),
}
_MODULES = {"onnxruntime": ["onnx", "onnxruntime"], "openvino": ["onnx", "openvino", "nncf"],
            "pt2e": ["torchao"]}  # fmt: skip
# The ONNX Runtime INT8 model's own QDQ graph run unfused, in float: its quantization without
# the int8 kernels (accuracy only), to tell saturation from quantization error.
QDQ_IN_FLOAT = "onnxruntime-int8-qdq-in-float"


def unavailable(engines: list[str]) -> dict[str, str]:
    """Engines of ``engines`` that cannot run here, with the reason (a package missing)."""
    out = {}
    for engine in engines:
        if engine not in ENGINES:
            raise ValueError(f"unknown peer engine {engine!r}; known: {sorted(ENGINES)}")
        missing = [m for m in _MODULES[engine] if importlib.util.find_spec(m) is None]
        if missing:
            out[engine] = f"not installed ({', '.join(missing)}): pip install -e '.[peers]'"
    return out


class PeerVariant:
    """A benchmark variant run by another engine (picklable: the memory probe rebuilds it in a
    fresh process). Exported and quantized models are kept in ``workdir`` and reused."""

    def __init__(self, name: str, workdir: str | Path, threads: int, calibration: dict):
        if not any(name in names for names in ENGINES.values()) and name != QDQ_IN_FLOAT:
            raise ValueError(f"unknown peer {name!r}")
        self.name = name
        self.workdir = Path(workdir)
        self.threads = threads
        self.calibration = {k: calibration[k] for k in ("xs", "ts")}
        self.__name__ = name

    def __call__(self, model: nn.Module) -> nn.Module:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.name.startswith("pt2e"):
            return _pt2e_inductor(model, self.calibration)
        onnx_path = _export_onnx(model, self.workdir / "model.onnx", self.calibration)
        if self.name == "onnxruntime-fp32":
            return _OnnxRuntime(onnx_path, self.threads)
        if self.name in ("onnxruntime-int8", QDQ_IN_FLOAT):
            quantized = _onnxruntime_int8(onnx_path, self.calibration)
            return _OnnxRuntime(quantized, self.threads, fused=self.name != QDQ_IN_FLOAT)
        if self.name == "openvino-fp32":
            return _OpenVINO(onnx_path, self.threads)
        same_layers = self.name == "openvino-int8-same-layers"
        quantized = _openvino_int8(onnx_path, self.workdir, self.calibration, same_layers)
        return _OpenVINO(quantized, self.threads)


def _export_onnx(model: nn.Module, dest: Path, calibration: dict) -> Path:
    if not dest.is_file():
        log.info("exporting the UNet to ONNX: %s", dest)
        x, t = calibration["xs"][:1], calibration["ts"][:1]
        axes = {name: {0: "batch"} for name in ("x", "t", "eps")}
        tmp = dest.with_suffix(".part.onnx")
        with torch.no_grad():
            torch.onnx.export(model.eval(), (x, t), str(tmp), dynamo=False, opset_version=17,
                              input_names=["x", "t"], output_names=["eps"],
                              dynamic_axes=axes)  # fmt: skip
        tmp.replace(dest)
    return dest


def _feeds(calibration: dict, batch: int = 8) -> list[dict[str, np.ndarray]]:
    xs, ts = calibration["xs"], calibration["ts"]
    return [{"x": xs[i : i + batch].numpy(), "t": ts[i : i + batch].float().numpy()}
            for i in range(0, len(xs), batch)]  # fmt: skip


def _onnxruntime_int8(onnx_path: Path, calibration: dict) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dest = onnx_path.with_name("onnxruntime-int8.onnx")
    if dest.is_file():
        return dest

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(_feeds(calibration))

        def get_next(self):
            return next(self.feeds, None)

    log.info("quantizing with ONNX Runtime (quantize_static, QDQ, per-channel)")
    pre = onnx_path.with_name("onnxruntime-pre.onnx")
    quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
    tmp = dest.with_suffix(".part.onnx")
    quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv", "Gemm"])  # fmt: skip
    tmp.replace(dest)
    return dest


def _openvino_int8(
    onnx_path: Path, workdir: Path, calibration: dict, same_layers: bool = False
) -> Path:
    """NNCF's INT8 model; ``same_layers``: the attention matmuls left in float, as modiff (and the
    paper) leave them, so that both quantize the same layers."""
    import nncf
    import openvino as ov

    stem = "openvino-int8-same-layers" if same_layers else "openvino-int8"
    dest = workdir / f"{stem}.xml"
    if dest.is_file():
        return dest
    log.info("quantizing with NNCF (nncf.quantize, post-training%s)",
             ", attention matmuls in float" if same_layers else "")  # fmt: skip
    feeds = _feeds(calibration)
    attention = nncf.IgnoredScope(patterns=[".*attn.*MatMul.*"], validate=False)
    ignored = attention if same_layers else None
    quantized = nncf.quantize(ov.convert_model(str(onnx_path)), nncf.Dataset(feeds),
                              subset_size=len(feeds), ignored_scope=ignored)  # fmt: skip
    tmp = workdir / f"{stem}.part.xml"
    ov.save_model(quantized, str(tmp))
    tmp.with_suffix(".bin").replace(dest.with_suffix(".bin"))
    tmp.replace(dest)
    return dest


class _OnnxRuntime(nn.Module):
    """An ONNX Runtime session; ``fused=False`` runs the graph as written (QDQ nodes stay
    quantize/dequantize ops around float convs: no int8 kernels)."""

    def __init__(self, path: Path, threads: int, fused: bool = True):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle workers would spin on the 2 cores the next variant of the paired run needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not fused:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        feeds = {"x": x.contiguous().numpy(), "t": t.float().numpy()}
        return torch.from_numpy(self.session.run(None, feeds)[0])


class _OpenVINO(nn.Module):
    def __init__(self, path: Path, threads: int):
        super().__init__()
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32"}  # fmt: skip
        core = ov.Core()
        self.request = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.request.create_infer_request()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.request.infer({"x": x.contiguous().numpy(), "t": t.float().numpy()})
        return torch.from_numpy(self.request.get_output_tensor(0).data.copy())


def _pt2e_inductor(model: nn.Module, calibration: dict) -> nn.Module:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    log.info("quantizing with PT2E (X86InductorQuantizer), compiling with Inductor")
    xs, ts = calibration["xs"], calibration["ts"].float()
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        exported = torch.export.export(
            model.eval(), (xs[:2], ts[:2]), dynamic_shapes=({0: batch}, {0: batch})
        ).module()
        quantizer = x86.X86InductorQuantizer()
        quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for feed in _feeds(calibration):
            prepared(torch.from_numpy(feed["x"]), torch.from_numpy(feed["t"]))
        converted = convert_pt2e(prepared)
    return _Compiled(converted)


class _Compiled(nn.Module):
    """A converted PT2E graph compiled by Inductor with freezing (its INT8 lowering needs the
    weights frozen). One graph per batch size: Inductor 2.14's qconv lowering fails on a
    dynamic batch (a stride assertion), so shapes stay static."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph
        self.compiled = torch.compile(graph, dynamic=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        from torch._inductor import config

        with config.patch(freezing=True):
            return self.compiled(x, t.float())


def eps_errors(
    fp32: nn.Module, models: dict[str, nn.Module], calibration: dict, batch: int = 64
) -> list[dict[str, Any]]:
    """Each model's eps error against FP32 on the calibration inputs: rms(eps - eps_fp32) over
    rms(eps_fp32), and the largest absolute difference."""
    xs, ts = calibration["xs"], calibration["ts"].float()

    def run(model: nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([model(xs[i : i + batch], ts[i : i + batch])
                              for i in range(0, len(xs), batch)])  # fmt: skip

    ref = run(fp32)
    rows = []
    for name, model in models.items():
        diff = run(model) - ref
        rows.append({
            "variant": name,
            "n_inputs": len(xs),
            "eps_rel_rms_vs_fp32": round((diff.pow(2).mean() / ref.pow(2).mean()).sqrt().item(), 6),
            "eps_max_abs_vs_fp32": round(diff.abs().max().item(), 5),
        })  # fmt: skip
    return rows
